"""How the router refuses or fails a request, independent of the door it came through.

``GenerationServicer.generate`` raises ``RequestRejected``; the gRPC door turns it into a
status (``context.abort``), the HTTP door into an OpenAI error object with an HTTP status
(``router/http_api.py``).
"""

from __future__ import annotations

import grpc


class RequestRejected(Exception):
    """The request ends with ``code``; ``param`` names the offending input field, if any;
    ``retry_after_s`` is set when the client should retry later (over capacity)."""

    def __init__(self, code: grpc.StatusCode, message: str, param: str | None = None,
                 retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        self.retry_after_s = retry_after_s
