"""Free TCP port discovery for local servers (embedded etcd, test gRPC servers)."""

from __future__ import annotations

import logging
import socket

logger = logging.getLogger(__name__)


def find_free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that was free at the time of the call.

    The kernel picks the port (bind to port 0); the socket is closed before returning, so another
    process may take the port before the caller binds it. Callers that start a server on the port
    should retry with a new port if the bind fails.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
    return port


_WILDCARD_HOSTS = ("0.0.0.0", "::", "[::]", "")
NODE_HOST = "node"  # bind this Ray node's IP (multi-node: not every interface)


def bind_host(host: str) -> str:
    """The address to bind for ``host``: this node's IP as Ray reports it for ``NODE_HOST``
    (the address other Ray nodes reach this one at), else ``host`` itself."""
    if host != NODE_HOST:
        return host
    import ray

    return ray.util.get_node_ip_address()


def advertised_host(bind_host: str) -> str:
    """The address peers should dial for a server bound to ``bind_host``: the host itself,
    unless it is a wildcard (``0.0.0.0`` / ``::``), then this node's IP as Ray reports it
    (the address other Ray nodes reach this one at)."""
    if bind_host not in _WILDCARD_HOSTS:
        return bind_host
    import ray

    return ray.util.get_node_ip_address()
