"""Blocks a failed or timed-out KV pull may still write into, kept out of allocation.

A NIXL READ that times out is cancelled locally, but with a transport served by the peer's
progress (UCX tcp) the peer may still complete it later and write into the destination
blocks (``KVTransferTimeoutError``). A READ that failed is no safer: NIXL reports the first
of its requests that failed while others may still be in flight, and a failure does not say
whether the peer died. Those blocks must not go to another request until the
transfer is known dead: the peer was disconnected from our agent (``remove_peer``), which
happens when its incarnation leaves the directory or the quarantine has lasted
``max_s``. Only then are they freed. All methods run on the engine loop thread; the
counters may be read from any thread.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class QuarantinedPull:
    request_id: str
    prefill_worker_id: str  # whose registration tells whether the peer still lives
    block_ids: tuple[int, ...]  # local blocks the READ targeted
    since_s: float  # monotonic time of the failure or timeout


class KVQuarantine:
    """Quarantined pulls by peer NIXL agent name."""

    def __init__(self) -> None:
        self._by_peer: dict[str, list[QuarantinedPull]] = {}
        self.num_blocks = 0  # blocks in quarantine now
        self.num_blocks_total = 0  # blocks ever quarantined

    def add(self, agent_name: str, pull: QuarantinedPull) -> None:
        self._by_peer.setdefault(agent_name, []).append(pull)
        self.num_blocks += len(pull.block_ids)
        self.num_blocks_total += len(pull.block_ids)
        logger.warning("KV pull of %s from %s failed: %d block(s) quarantined until the "
                       "peer is disconnected (%d in quarantine)", pull.request_id, agent_name,
                       len(pull.block_ids), self.num_blocks)

    def peers(self) -> list[tuple[str, QuarantinedPull]]:
        """``(agent name, its oldest quarantined pull)`` for every peer with one."""
        return [(name, pulls[0]) for name, pulls in self._by_peer.items()]

    def pop(self, agent_name: str) -> list[QuarantinedPull]:
        """Take the peer's pulls out (its transfers are dead: free their blocks)."""
        pulls = self._by_peer.pop(agent_name, [])
        self.num_blocks -= sum(len(p.block_ids) for p in pulls)
        return pulls

    def __bool__(self) -> bool:
        return bool(self._by_peer)
