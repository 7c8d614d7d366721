"""The process shell every worker role runs: engine loop, NIXL agent, internal gRPC server,
registration and stats."""
