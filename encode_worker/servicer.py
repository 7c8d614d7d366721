"""Encode role: images through the vision tower into the embedding cache.

``Encode`` (``worker.encode_service.encode_rpc``) returns an image's prompt segment and an
``EmbeddingHandle``; the prefill worker pulls the pages with a NIXL READ whose notification
ends the pin. The hooks here handle those notifications and the router's ``Release`` of a
cancelled request's pins; pins nobody ends expire after ``hold_timeout_s`` (runtime hook).
"""

from __future__ import annotations

import logging

from scission.proto.scission.internal.v1 import worker_pb2 as pb
from scission.worker.runtime import BaseWorkerServicer, WorkerRuntime

logger = logging.getLogger(__name__)


class EncodeServicer(BaseWorkerServicer):
    def __init__(self, runtime: WorkerRuntime) -> None:
        super().__init__(runtime)
        if runtime.encode_service is None:
            raise ValueError(f"encode role needs a vision-language model; "
                             f"{runtime.engine.model_config.model_id} has no vision encoder")
        self.loop.add_hook(self._poll_notifications)

    def close(self) -> None:
        """Role flip away from encode."""
        self.loop.remove_hook(self._poll_notifications)

    def Release(self, request: pb.ReleaseRequest, context) -> pb.ReleaseResponse:
        return pb.ReleaseResponse(released=self.runtime.release_pins(request.embedding_pin_ids))

    def _poll_notifications(self) -> None:
        for peer, _msg in self.runtime.poll_notifications():  # embedding ones handled there
            logger.warning("encode worker: unexpected NIXL notification from %s", peer)
