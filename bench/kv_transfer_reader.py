"""The reader ("decode") process of the KV-transfer benchmark: every method, timed per cell.

Methods (each moves the prompt's KV, ``KVShape.transfer_bytes`` bytes):

- ``nixl``: ``KVTransferAgent.read_blocks`` with a notification, the production path (plan
  the descriptors in Python, NIXL descriptor lists + transfer request, READ, release). The
  target starts polling for the notification once ``read_blocks`` returned (``notif``: its
  monotonic clock at receipt minus the reader's at return; one host, one clock; includes the
  target's wake-up on its command queue).
- ``nixl_busy_target``: the same while the target polls its notifications every 50 us
  during the READ (as a prefill engine loop polls between steps).
- ``nixl_phases``: the same calls on a raw NIXL agent, each phase timed: ``plan`` (block
  runs -> descriptor arrays), ``prep`` (``get_xfer_descs`` x2 + ``initialize_xfer``),
  ``xfer`` (``transfer`` + polling to DONE), ``release``.
- ``nixl_prepped``: NIXL's prepared lists (``prep_xfer_dlist`` once per peer over every
  block of every layer's K and V, then ``make_prepped_xfer`` by index per READ).
- ``memcpy``: one ``ctypes.memmove`` of the same byte count inside this process (glibc
  memcpy, one thread), from a second cache of the same shape.
- ``torch_copy``: ``Tensor.copy_`` of the same bytes (``PairConfig.threads`` threads).
- ``memcpy_layout``: ``ctypes.memmove`` per descriptor row, the same pieces NIXL moves.
- ``tcp``: the same byte count over a TCP loopback socket from the target process
  (``sendall`` there, ``recv_into`` here, one request/response, ``TCP_NODELAY``).
"""

from __future__ import annotations

import ctypes
import logging
import os
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from scission.bench.kv_transfer_pair import (
    READER_NAME,
    TARGET_NAME,
    TCP_HEADER,
    PairConfig,
    allocate_cache,
    blocks_checksum,
    fill_random,
)
from scission.bench.kv_transfer_shapes import block_ids, gb_per_s, latency_stats, repeats_for

logger = logging.getLogger(__name__)

METHODS = ("nixl", "nixl_busy_target", "nixl_phases", "nixl_prepped", "memcpy", "torch_copy", "memcpy_layout",
           "tcp")
_BACKEND, _MEM = "UCX", "DRAM"
# The agent's poll back-off while a READ is in flight (kv_transfer/agent.py), mirrored so
# the raw paths wait the same way.
_POLL_MIN_S, _POLL_MAX_S = 20e-6, 1e-3


def _wait_done(raw: Any, handle: Any) -> None:
    sleep_s = 0.0
    while True:
        state = raw.check_xfer_state(handle)
        if state == "DONE":
            return
        if state == "ERR":
            raise RuntimeError("READ failed (state ERR)")
        time.sleep(sleep_s)
        sleep_s = min(max(2 * sleep_s, _POLL_MIN_S), _POLL_MAX_S)


class Reader:
    """Everything the reader holds: its cache, agents, the reference source, the socket."""

    def __init__(self, cfg: PairConfig, target: tuple[bytes, bytes, int], target_q: Any,
                 target_out: Any) -> None:
        from scission.kv_transfer.agent import KVTransferAgent
        from scission.kv_transfer.descriptors import describe_kv_caches, registration_regions
        from scission.kv_transfer.handle import KVLayoutDescriptor
        from scission.kv_transfer.nixl_progress import DEFAULT_PROGRESS_TIMEOUT_MS, new_nixl_agent

        self.cfg, self.target_q, self.target_out = cfg, target_q, target_out
        metadata, layout_bytes, port = target
        self.cache = allocate_cache(cfg.shape, cfg.cache_blocks)
        self.cache.tensor.zero_()  # touch every page before timing
        self.ref = allocate_cache(cfg.shape, cfg.cache_blocks)  # memcpy reference source
        fill_random(self.ref, cfg.seed + 1)
        self.agent = KVTransferAgent(READER_NAME, self.cache.layers)
        self.remote_layout = KVLayoutDescriptor.from_bytes(layout_bytes)
        t0 = time.monotonic()
        self.agent.add_peer(TARGET_NAME, metadata, self.remote_layout)
        self.timings_ms = {"add_peer": (time.monotonic() - t0) * 1e3}
        # A second, raw NIXL agent over the same memory for the phase-timed and prepared paths.
        self.raw = new_nixl_agent(READER_NAME + "-raw", _BACKEND, DEFAULT_PROGRESS_TIMEOUT_MS)
        rows = np.array([(a, n, 0) for a, n in registration_regions(self.cache.layers)],
                        dtype=np.uint64)
        self.raw.register_memory(rows, _MEM, backends=[_BACKEND])
        self.raw.add_remote_agent(metadata)
        self.local_layout = describe_kv_caches(READER_NAME, self.cache.layers)
        self.ref_layout = describe_kv_caches("ref", self.ref.layers)
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.local_flat = self.cache.tensor.view(-1).view(torch.uint8)
        self.ref_flat = self.ref.tensor.view(-1).view(torch.uint8)
        self.prepped: tuple[Any, Any] | None = None
        self.num_notifs = 0

    # -- one cell ------------------------------------------------------------------------

    def run_cell(self, num_tokens: int, pattern: str) -> dict[str, Any]:
        shape = self.cfg.shape
        nb = shape.num_blocks(num_tokens)
        remote_ids, local_ids = block_ids(pattern, nb, self.cfg.cache_blocks, self.cfg.seed)
        runs = self._plan(remote_ids, local_ids)[2]
        nbytes = shape.transfer_bytes(num_tokens)
        fns: dict[str, Callable[[], dict[str, float]]] = {
            "nixl": lambda: self._nixl(remote_ids, local_ids),
            "nixl_busy_target": lambda: self._nixl(remote_ids, local_ids, busy_target=True),
            "nixl_phases": lambda: self._nixl_phases(remote_ids, local_ids),
            "nixl_prepped": lambda: self._nixl_prepped(remote_ids, local_ids),
            "memcpy": lambda: self._memcpy(nbytes),
            "torch_copy": lambda: self._torch_copy(nbytes),
            "memcpy_layout": lambda: self._memcpy_layout(remote_ids, local_ids),
            "tcp": lambda: self._tcp(nbytes),
        }
        methods = [m for m in METHODS if m in self.cfg.methods]
        repeats = repeats_for(num_tokens, self.cfg.repeats, self.cfg.min_repeats)
        samples: dict[str, list[dict[str, float]]] = {m: [] for m in methods}
        rng = np.random.default_rng(self.cfg.seed + num_tokens)
        for i in range(self.cfg.warmup + repeats):
            for m in rng.permutation(methods):  # fresh order each round: noise hits all alike
                sample = fns[m]()
                if i >= self.cfg.warmup:
                    samples[m].append(sample)
        cell = {"num_tokens": num_tokens, "pattern": pattern, "num_blocks": nb,
                "num_runs": runs, "descriptors": shape.num_descriptors(runs),
                "bytes": nbytes, "repeats": repeats, "methods": {}}
        for m, rows in samples.items():
            cell["methods"][m] = {k: latency_stats([r[k] * 1e-3 for r in rows]) for k in rows[0]}
            cell["methods"][m]["gb_per_s"] = gb_per_s(nbytes, cell["methods"][m]["total"]
                                                      ["median_ms"])
        if "nixl" in methods:
            cell["verified"] = self._verify(remote_ids, local_ids)
        return cell

    def _verify(self, remote_ids: list[int], local_ids: list[int]) -> bool:
        """One more READ, then the local blocks' checksum equals the target's."""
        self.agent.read_blocks(TARGET_NAME, remote_ids, local_ids, b"")
        self.target_q.put(("checksum", remote_ids))
        _, theirs = self.target_out.get(timeout=300)
        return theirs == blocks_checksum(self.cache, local_ids)

    # -- methods (each returns phase -> ms, with "total") ---------------------------------

    def _plan(self, remote_ids: list[int], local_ids: list[int]) -> tuple[Any, Any, int]:
        from scission.kv_transfer.descriptors import merge_block_runs, run_descriptors

        runs = merge_block_runs(remote_ids, local_ids)
        counts = [r.num_blocks for r in runs]
        local = run_descriptors(self.local_layout, [r.local_start for r in runs], counts)
        remote = run_descriptors(self.remote_layout, [r.remote_start for r in runs], counts)
        return local, remote, len(runs)

    def _nixl(self, remote_ids: list[int], local_ids: list[int],
              busy_target: bool = False) -> dict[str, float]:
        self.num_notifs += 1
        msg = b"kvbench-%d" % self.num_notifs
        if busy_target:
            self.target_q.put(("await_notif", msg, 60.0))
            time.sleep(0.002)  # the target is polling by now
        t0 = time.monotonic()
        self.agent.read_blocks(TARGET_NAME, remote_ids, local_ids, msg)
        t1 = time.monotonic()
        if not busy_target:
            self.target_q.put(("await_notif", msg, 60.0))
        _, received_s = self.target_out.get(timeout=90)
        assert received_s is not None, "the target never received the READ's notification"
        return {"total": (t1 - t0) * 1e3, "notif": (received_s - t1) * 1e3}

    def _nixl_phases(self, remote_ids: list[int], local_ids: list[int]) -> dict[str, float]:
        t0 = time.monotonic()
        local, remote, _ = self._plan(remote_ids, local_ids)
        t1 = time.monotonic()
        handle = self.raw.initialize_xfer("READ", self.raw.get_xfer_descs(local, _MEM),
                                          self.raw.get_xfer_descs(remote, _MEM), TARGET_NAME,
                                          b"", backends=[_BACKEND])
        t2 = time.monotonic()
        return {"plan": (t1 - t0) * 1e3, "prep": (t2 - t1) * 1e3,
                **self._post_and_release(handle, t0)}

    def _post_and_release(self, handle: Any, t0: float) -> dict[str, float]:
        t2 = time.monotonic()
        if self.raw.transfer(handle) == "ERR":
            raise RuntimeError("posting the READ failed")
        _wait_done(self.raw, handle)
        t3 = time.monotonic()
        self.raw.release_xfer_handle(handle)
        t4 = time.monotonic()
        return {"xfer": (t3 - t2) * 1e3, "release": (t4 - t3) * 1e3, "total": (t4 - t0) * 1e3}

    def _prepare_lists(self) -> tuple[Any, Any]:
        """Prepared lists over every block of every layer's K and V, on both sides
        (layer-major: row ``t * cache_blocks + b`` = tensor ``t`` (K0, V0, K1, ...), block
        ``b``; block-major: row ``b`` = block ``b``, all layers)."""
        from scission.kv_transfer.descriptors import run_descriptors

        if self.prepped is None:
            nb = self.cfg.cache_blocks
            t0 = time.monotonic()
            local = self.raw.prep_xfer_dlist(
                "NIXL_INIT_AGENT", run_descriptors(self.local_layout, range(nb), [1] * nb),
                _MEM, backends=[_BACKEND])
            remote = self.raw.prep_xfer_dlist(
                TARGET_NAME, run_descriptors(self.remote_layout, range(nb), [1] * nb), _MEM,
                backends=[_BACKEND])
            self.timings_ms["prep_xfer_dlist"] = (time.monotonic() - t0) * 1e3
            self.prepped = (local, remote)
        return self.prepped

    def _nixl_prepped(self, remote_ids: list[int], local_ids: list[int]) -> dict[str, float]:
        local_side, remote_side = self._prepare_lists()
        t0 = time.monotonic()
        nb = self.cfg.cache_blocks
        # rows per block: 2 * num_layers (layer-major), 1 (block-major: a block is one row)
        tensors = 1 if self.local_layout.is_block_major else 2 * self.cfg.shape.num_layers
        base = (np.arange(tensors, dtype=np.int32) * nb)[:, None]  # [tensors, 1]
        local_idx = (base + np.asarray(local_ids, dtype=np.int32)[None, :]).reshape(-1)
        remote_idx = (base + np.asarray(remote_ids, dtype=np.int32)[None, :]).reshape(-1)
        t1 = time.monotonic()
        handle = self.raw.make_prepped_xfer("READ", local_side, local_idx, remote_side,
                                            remote_idx, b"", backends=[_BACKEND])
        t2 = time.monotonic()
        return {"plan": (t1 - t0) * 1e3, "prep": (t2 - t1) * 1e3,
                **self._post_and_release(handle, t0)}

    def _memcpy(self, nbytes: int) -> dict[str, float]:
        dst, src = self.local_flat.data_ptr(), self.ref_flat.data_ptr()
        t0 = time.monotonic()
        ctypes.memmove(dst, src, nbytes)
        return {"total": (time.monotonic() - t0) * 1e3}

    def _torch_copy(self, nbytes: int) -> dict[str, float]:
        t0 = time.monotonic()
        self.local_flat[:nbytes].copy_(self.ref_flat[:nbytes])
        return {"total": (time.monotonic() - t0) * 1e3}

    def _memcpy_layout(self, remote_ids: list[int], local_ids: list[int]) -> dict[str, float]:
        from scission.kv_transfer.descriptors import merge_block_runs, run_descriptors

        t0 = time.monotonic()
        runs = merge_block_runs(remote_ids, local_ids)
        counts = [r.num_blocks for r in runs]
        dst = run_descriptors(self.local_layout, [r.local_start for r in runs], counts)
        src = run_descriptors(self.ref_layout, [r.remote_start for r in runs], counts)
        move = ctypes.memmove
        for (d, n, _), (s, _, _) in zip(dst.tolist(), src.tolist(), strict=True):
            move(d, s, n)
        return {"total": (time.monotonic() - t0) * 1e3}

    def _tcp(self, nbytes: int) -> dict[str, float]:
        view = memoryview(self.local_flat.numpy())[:nbytes]
        t0 = time.monotonic()
        self.sock.sendall(TCP_HEADER.pack(0, nbytes))
        got = 0
        while got < nbytes:
            n = self.sock.recv_into(view[got:], nbytes - got)
            if n == 0:
                raise RuntimeError("target closed the TCP connection")
            got += n
        return {"total": (time.monotonic() - t0) * 1e3}

    def close(self) -> None:
        self.sock.close()
        self.agent.close()


def reader_main(cfg: PairConfig, target: tuple[bytes, bytes, int], target_q: Any,
                target_out: Any, result_q: Any) -> None:
    """Reader process: run every (prompt length, pattern) cell; put the result dict (or a
    traceback string) on ``result_q``."""
    torch.set_num_threads(cfg.threads)
    try:
        reader = Reader(cfg, target, target_q, target_out)
        first = _first_read_ms(reader)
        cells = [reader.run_cell(n, p) for n in cfg.prompt_tokens for p in cfg.patterns]
        result = {"ucx_tls": os.environ.get("UCX_TLS", ""), "threads": cfg.threads,
                  "cache_blocks": cfg.cache_blocks, "first_read_ms": first,
                  "setup_ms": reader.timings_ms, "cells": cells}
        reader.close()
    except Exception:  # reported to the parent, which raises it
        result = traceback.format_exc()
    result_q.put(result)
    result_q.close()
    result_q.join_thread()
    os._exit(0)


def _first_read_ms(reader: Reader) -> float:
    """The first READ after ``add_peer`` (one block: the connection's first use)."""
    t0 = time.monotonic()
    reader.agent.read_blocks(TARGET_NAME, [0], [0], b"")
    return (time.monotonic() - t0) * 1e3
