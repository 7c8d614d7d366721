"""What etcd knows, as typed records and their clients: worker registrations under leases,
the directory and its watch, the global KV-block index."""
