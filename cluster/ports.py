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
