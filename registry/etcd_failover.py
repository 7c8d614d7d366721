"""Endpoint failover that leaves a dead etcd member (python3-etcd3 0.13's does not).

``etcd3.MultiEndpointEtcd3Client`` marks the endpoint of a call that failed with
UNAVAILABLE / DEADLINE_EXCEEDED / INTERNAL as failed for ``time_retry`` seconds, but keeps it
as the current endpoint: it moves to another one only if the *next* call comes while the mark
still holds. Our loops retry after an etcd error no sooner than the mark lasts
(``RegistryConfig.retry_interval_s`` = ``EtcdClientConfig.endpoint_retry_s`` = 0.5 s: lease
keepalives, watch resyncs, ``retry_etcd``), so a client that only such a loop uses went back
to a dead member forever (``tests/faults/test_etcd_leader_loss.py``: 0 of 16 reads in 8 s).
A client shared by several threads usually escapes, when one of them calls inside the mark
(the cluster's leader-loss test passes without this class), but only by timing.

``FailoverEtcdClient`` moves to the next endpoint (in the configured order) at the failure
itself; the failed one is still skipped for ``time_retry``. With one endpoint it behaves as
the base class.
"""

from __future__ import annotations

import logging

import etcd3
import grpc

logger = logging.getLogger(__name__)

# The codes on which the base class marks the endpoint failed (etcd3.client._FAILED_EP_CODES).
_FAILED_ENDPOINT_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                          grpc.StatusCode.INTERNAL)


class FailoverEtcdClient(etcd3.MultiEndpointEtcd3Client):
    """``MultiEndpointEtcd3Client`` whose current endpoint moves on when a call to it fails."""

    def _manage_grpc_errors(self, exc: grpc.RpcError):
        failed = self._current_endpoint_label
        try:
            super()._manage_grpc_errors(exc)  # marks ``failed``, raises the mapped error
        finally:
            if exc.code() in _FAILED_ENDPOINT_CODES and len(self.endpoints) > 1 \
                    and self._current_endpoint_label == failed:
                labels = list(self.endpoints)
                following = labels[(labels.index(failed) + 1) % len(labels)]
                self._current_endpoint_label = following  # the setter drops the old stubs
                logger.warning("etcd endpoint %s failed (%s); next calls go to %s", failed,
                               exc.code().name, following)
