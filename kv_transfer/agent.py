"""``KVTransferAgent``: one NIXL agent per worker, KV cache registered once, block READs.

Decode pulls prompt KV with a one-sided NIXL READ from the prefill worker's registered
cache; the READ carries a notification that tells the prefill worker to release the
blocks. Usage (decode side)::

    agent = KVTransferAgent("decode-0:42", kv_caches)        # registers memory once
    agent.add_peer(name, metadata_from_etcd, layout_from_etcd)
    agent.read_blocks(name, handle.block_ids, local_block_ids, notif.to_bytes())

Prefill side: publish ``agent.metadata()`` and ``agent.layout().to_bytes()`` with the
worker registration and call ``poll_notifications()`` from the engine loop.

Threading: every NIXL call is made under one lock, so one engine thread and several gRPC
threads may share an agent. ``read_blocks`` holds the lock only per call, never while it
sleeps between polls, so concurrent reads and notification polls interleave.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from nixl import _bindings as nixl_bindings
from nixl._api import nixl_xfer_handle

from scission.kv_transfer.descriptors import (
    describe_kv_caches,
    merge_block_runs,
    registration_regions,
    run_descriptors,
    validate_block_ids,
)
from scission.kv_transfer.embeddings import (
    EmbeddingLayout,
    describe_embedding_pages,
    plan_page_read,
)
from scission.kv_transfer.handle import KVLayoutDescriptor
from scission.kv_transfer.nixl_progress import DEFAULT_PROGRESS_TIMEOUT_MS, new_nixl_agent
from scission.kv_transfer.ucx import configure_ucx_env

logger = logging.getLogger(__name__)

_BACKEND = "UCX"
_MEM_TYPE = "DRAM"
# Exceptions the NIXL bindings raise (nixlBackendError, nixlRemoteDisconnectError, ...);
# they share no base class below Exception.
_NIXL_ERRORS: tuple[type[BaseException], ...] = tuple(
    obj
    for name, obj in vars(nixl_bindings).items()
    if name.startswith("nixl") and isinstance(obj, type) and issubclass(obj, Exception)
) + (RuntimeError,)
# Poll back-off while a READ is in flight: first polls back-to-back, then sleep, ≤ 1 ms.
_POLL_MIN_SLEEP_S = 20e-6
_POLL_MAX_SLEEP_S = 1e-3


class _Peer(NamedTuple):
    metadata: bytes  # NIXL agent metadata as loaded
    layout: KVLayoutDescriptor
    embedding_layout: EmbeddingLayout | None = None  # its image embedding pages, if any


class KVTransferError(RuntimeError):
    """A NIXL operation failed (peer unknown, unreachable or dead, backend error)."""


class KVTransferTimeoutError(KVTransferError):
    """A READ did not complete within its timeout; it was cancelled.

    The destination blocks are in an unknown state, and with a transport that is served
    by the peer's progress (tcp) they may still be written after this error if the peer
    wakes up. Do not hand them to another request until the peer is removed and the
    worker decides they are safe (or quarantine them).
    """


class KVTransferAgent:
    """NIXL agent over a worker's paged KV cache (DRAM, UCX backend).

    Args:
        name: unique NIXL agent name; include the incarnation (e.g.
            ``f"{worker_id}:{lease_id}"``) so a restarted worker never reuses a name.
        kv_caches: per-layer ``(k_cache, v_cache)``, each
            ``[num_blocks, block_size, num_kv_heads, head_dim]``, CPU, layer- or block-major
            (``descriptors.kv_layout_of``). The agent keeps references; the memory stays
            registered until ``close()``.
        progress_timeout_ms: longest NIXL's UCX progress thread sleeps between events
            (see ``nixl_progress``); 0 = NIXL's default busy polling, which costs a core.
        embedding_pages: optional image embedding pages ``[num_pages, page_tokens, hidden]``
            (CPU, contiguous), registered too (``kv_transfer.embeddings``).
    """

    def __init__(self, name: str, kv_caches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                 progress_timeout_ms: int = DEFAULT_PROGRESS_TIMEOUT_MS,
                 embedding_pages: torch.Tensor | None = None):
        configure_ucx_env()
        self._name = name
        self._layout = describe_kv_caches(name, kv_caches)
        self._kv_caches = list(kv_caches)  # keeps the registered memory alive
        self._embedding_pages = embedding_pages
        self._embedding_layout = (None if embedding_pages is None
                                  else describe_embedding_pages(name, embedding_pages))
        self._lock = threading.Lock()
        self._peers: dict[str, _Peer] = {}  # agent name -> loaded incarnation
        self._closed = False
        regions = registration_regions(kv_caches)
        if embedding_pages is not None:
            regions.append((embedding_pages.data_ptr(),
                            embedding_pages.numel() * embedding_pages.element_size()))
        try:
            self._agent = new_nixl_agent(name, _BACKEND, progress_timeout_ms)
        except _NIXL_ERRORS as e:
            raise KVTransferError(f"creating NIXL agent {name!r} failed: {e!r}") from e
        if _BACKEND not in self._agent.backends:
            raise KVTransferError(f"NIXL {_BACKEND} backend unavailable for agent {name!r}")
        try:
            rows = np.array([(addr, size, 0) for addr, size in regions], dtype=np.uint64)
            self._reg_descs = self._agent.register_memory(rows, _MEM_TYPE, backends=[_BACKEND])
        except _NIXL_ERRORS as e:
            raise KVTransferError(f"registering KV memory of {name!r} failed: {e!r}") from e
        logger.info("NIXL agent %s registered %d region(s), %d bytes: %d layers x %d blocks "
                    "of %d bytes", name, len(regions), sum(size for _, size in regions),
                    self._layout.num_layers, self._layout.num_blocks, self._layout.bytes_per_block)

    # -- identity ------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    def metadata(self) -> bytes:
        """NIXL agent metadata (connection info + registered memory keys), for etcd."""
        with self._lock:
            self._check_open()
            return self._agent.get_agent_metadata()

    def layout(self) -> KVLayoutDescriptor:
        """Layout of the registered cache, published next to ``metadata()``."""
        return self._layout

    def embedding_layout(self) -> EmbeddingLayout | None:
        """Layout of the registered embedding pages (None without them)."""
        return self._embedding_layout

    # -- peers ---------------------------------------------------------------------

    def add_peer(self, agent_name: str, metadata: bytes, layout: KVLayoutDescriptor,
                 embedding_layout: EmbeddingLayout | None = None) -> None:
        """Load a peer's NIXL metadata (replacing any previous incarnation's).

        Raises:
            ValueError: the layout is for another agent or incompatible with ours, or the
                metadata names another agent.
            KVTransferError: NIXL could not load the metadata (e.g. peer unreachable).
        """
        if layout.agent_name != agent_name:
            raise ValueError(f"layout is for {layout.agent_name!r}, not {agent_name!r}")
        self._layout.check_compatible(layout)
        peer = _Peer(bytes(metadata), layout, embedding_layout)
        with self._lock:
            self._check_open()
            stale = self._peers.pop(agent_name, None)
            if stale == peer:
                self._peers[agent_name] = peer  # same incarnation: keep the connection
                return
            if stale is not None:
                self._invalidate(agent_name)  # other incarnation: drop before reloading
            try:
                loaded = _as_str(self._agent.add_remote_agent(peer.metadata))
            except _NIXL_ERRORS as e:
                raise KVTransferError(f"loading metadata of {agent_name!r} failed: {e!r}") from e
            if loaded != agent_name:
                if loaded not in self._peers:
                    self._invalidate(loaded)
                raise ValueError(f"metadata is for agent {loaded!r}, not {agent_name!r}")
            self._peers[agent_name] = peer
        logger.info("NIXL agent %s added peer %s", self._name, agent_name)

    def remove_peer(self, agent_name: str) -> None:
        """Forget a peer and disconnect from it; unknown names are ignored."""
        with self._lock:
            self._check_open()
            if self._peers.pop(agent_name, None) is not None:
                self._invalidate(agent_name)
                logger.info("NIXL agent %s removed peer %s", self._name, agent_name)

    def peers(self) -> list[str]:
        with self._lock:
            return sorted(self._peers)

    # -- transfer ------------------------------------------------------------------

    def read_blocks(
        self,
        peer_name: str,
        remote_block_ids: Sequence[int],
        local_block_ids: Sequence[int],
        notify_msg: bytes,
        timeout_s: float = 10.0,
    ) -> None:
        """READ ``remote_block_ids`` of every layer's K and V into ``local_block_ids``.

        Block ``remote_block_ids[i]`` of the peer lands in ``local_block_ids[i]``. Runs
        consecutive on both sides become one descriptor (block-major; layer-major: one per
        layer and K/V). Blocks until the READ completes. On success the peer receives
        ``notify_msg`` (the READ's NIXL notification; with no blocks, a standalone one); an
        empty ``notify_msg`` sends nothing.

        Raises:
            ValueError: block ids out of range, lengths differ, duplicate local ids,
                ``timeout_s <= 0`` (checked before anything is posted).
            KVTransferTimeoutError: not done within ``timeout_s`` (READ cancelled).
            KVTransferError: unknown peer or NIXL failure (e.g. peer died).
        """
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        local_descs, remote_descs = self._plan_read(peer_name, remote_block_ids, local_block_ids)
        self._read(peer_name, local_descs, remote_descs, notify_msg, timeout_s)

    def read_pages(self, peer_name: str, remote_page_ids: Sequence[int],
                   local_page_ids: Sequence[int], notify_msg: bytes,
                   timeout_s: float = 10.0) -> None:
        """READ a peer's embedding pages: ``remote_page_ids[i]`` lands in our
        ``local_page_ids[i]``. As ``read_blocks`` (ValueError for bad page ids or
        incompatible layouts; KVTransferError also when a side has no embedding pages)."""
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        with self._lock:
            peer = self._peers.get(peer_name)
        if peer is None or peer.embedding_layout is None or self._embedding_layout is None:
            raise KVTransferError(f"no embedding pages to read from {peer_name!r} into "
                                  f"{self._name!r} (unknown peer, or pages not registered)")
        local_descs, remote_descs = plan_page_read(self._embedding_layout, peer.embedding_layout,
                                                   remote_page_ids, local_page_ids)
        self._read(peer_name, local_descs, remote_descs, notify_msg, timeout_s)

    def _read(self, peer_name: str, local_descs: np.ndarray, remote_descs: np.ndarray,
              notify_msg: bytes, timeout_s: float) -> None:
        if len(local_descs) == 0:
            if notify_msg:
                self.send_notification(peer_name, notify_msg)
            return
        start_s = time.monotonic()
        handle = self._post_read(peer_name, local_descs, remote_descs, notify_msg)
        try:
            self._wait(handle, peer_name, start_s + timeout_s)
        finally:
            self._release(handle)
        duration_s = time.monotonic() - start_s
        num_bytes = int(local_descs[:, 1].sum())
        logger.debug("READ %d descriptors, %d bytes from %s in %.3f ms (%.2f GB/s)",
                     len(local_descs), num_bytes, peer_name, duration_s * 1e3,
                     num_bytes / max(duration_s, 1e-9) / 1e9)

    def send_notification(self, peer_name: str, msg: bytes) -> None:
        """Send a standalone NIXL notification (e.g. a ``PULL_ABORTED``) to a peer."""
        self._peer_layout(peer_name)
        with self._lock:
            self._check_open()
            try:
                # No backend: nixl passes its handle where genNotif wants a list (TypeError)
                self._agent.send_notif(peer_name, msg)
            except _NIXL_ERRORS as e:
                raise KVTransferError(f"notification to {peer_name!r} failed: {e!r}") from e

    def poll_notifications(self) -> list[tuple[str, bytes]]:
        """New notifications as ``(sender agent name, message)``, oldest first per sender."""
        with self._lock:
            self._check_open()
            try:
                notifs = self._agent.get_new_notifs()
            except _NIXL_ERRORS as e:
                raise KVTransferError(f"polling notifications failed: {e!r}") from e
        return [(_as_str(sender), bytes(m)) for sender, msgs in notifs.items() for m in msgs]

    # -- lifecycle -----------------------------------------------------------------

    def close(self) -> None:
        """Disconnect peers, deregister the KV memory and free the agent (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for peer in list(self._peers):
                self._invalidate(peer)
            self._peers.clear()
            try:
                self._agent.deregister_memory(self._reg_descs, backends=[_BACKEND])
            except _NIXL_ERRORS as e:
                logger.warning("NIXL agent %s: deregistering memory failed: %r", self._name, e)
            del self._agent  # the bound C++ agent (and its UCX worker) goes with it
            self._kv_caches.clear()
            self._embedding_pages = None
        logger.info("NIXL agent %s closed", self._name)

    def __enter__(self) -> KVTransferAgent:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise KVTransferError(f"NIXL agent {self._name!r} is closed")

    def _peer_layout(self, peer_name: str) -> KVLayoutDescriptor:
        with self._lock:
            self._check_open()
            peer = self._peers.get(peer_name)
        if peer is None:
            raise KVTransferError(f"unknown peer {peer_name!r} (add_peer first)")
        return peer.layout

    def _plan_read(
        self, peer_name: str, remote_block_ids: Sequence[int], local_block_ids: Sequence[int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Validate ids and build matching ``(local, remote)`` descriptor arrays."""
        remote_layout = self._peer_layout(peer_name)
        validate_block_ids(remote_block_ids, remote_layout.num_blocks, "remote")
        validate_block_ids(local_block_ids, self._layout.num_blocks, "local")
        if len(set(local_block_ids)) != len(local_block_ids):
            raise ValueError("duplicate local block ids")
        runs = merge_block_runs(remote_block_ids, local_block_ids)
        counts = [run.num_blocks for run in runs]
        local_descs = run_descriptors(self._layout, [r.local_start for r in runs], counts)
        remote_descs = run_descriptors(remote_layout, [r.remote_start for r in runs], counts)
        return local_descs, remote_descs

    def _invalidate(self, agent_name: str) -> None:
        """Drop a remote agent's metadata in NIXL; caller holds the lock."""
        try:
            self._agent.remove_remote_agent(agent_name)
        except _NIXL_ERRORS as e:
            logger.warning("NIXL agent %s: removing %s failed: %r", self._name, agent_name, e)

    def _post_read(
        self, peer_name: str, local_descs: np.ndarray, remote_descs: np.ndarray, notify_msg: bytes
    ) -> nixl_xfer_handle:
        handle: nixl_xfer_handle | None = None
        with self._lock:
            self._check_open()
            try:
                local = self._agent.get_xfer_descs(local_descs, _MEM_TYPE)
                remote = self._agent.get_xfer_descs(remote_descs, _MEM_TYPE)
                handle = self._agent.initialize_xfer(
                    "READ", local, remote, peer_name, notify_msg, backends=[_BACKEND]
                )
                state = self._agent.transfer(handle)
            except _NIXL_ERRORS as e:
                if handle is not None:
                    self._release_locked(handle)
                raise KVTransferError(f"posting READ from {peer_name!r} failed: {e!r}") from e
            if state == "ERR":
                self._release_locked(handle)
                raise KVTransferError(f"posting READ from {peer_name!r} failed (state ERR)")
        return handle

    def _wait(self, handle: nixl_xfer_handle, peer_name: str, deadline_s: float) -> None:
        sleep_s = 0.0
        while True:
            with self._lock:
                self._check_open()
                try:
                    state = self._agent.check_xfer_state(handle)
                except _NIXL_ERRORS as e:
                    raise KVTransferError(f"READ from {peer_name!r} failed: {e!r}") from e
            if state == "DONE":
                return
            if state == "ERR":
                raise KVTransferError(f"READ from {peer_name!r} failed (state ERR)")
            if time.monotonic() >= deadline_s:
                raise KVTransferTimeoutError(f"READ from {peer_name!r} timed out")
            time.sleep(sleep_s)
            sleep_s = min(max(2 * sleep_s, _POLL_MIN_SLEEP_S), _POLL_MAX_SLEEP_S)

    def _release(self, handle: nixl_xfer_handle) -> None:
        with self._lock:
            if not self._closed:
                self._release_locked(handle)

    def _release_locked(self, handle: nixl_xfer_handle) -> None:
        """Release (cancelling if still active); a failure leaves it to NIXL's leak list."""
        try:
            self._agent.release_xfer_handle(handle)
        except _NIXL_ERRORS as e:
            logger.warning("NIXL agent %s: releasing a transfer failed: %r", self._name, e)


def _as_str(name: str | bytes) -> str:
    """NIXL returns agent names as ``bytes`` from some calls and ``str`` from others."""
    return name.decode() if isinstance(name, bytes) else name
