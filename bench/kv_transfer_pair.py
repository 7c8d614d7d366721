"""Two spawned processes, each a real ``KVTransferAgent`` over a KV cache allocated like
``engine/kv_cache.py``: the target ("prefill") holds the prompt's KV, the reader ("decode")
pulls it and times every method (``kv_transfer_reader``). The reader drives the target
through its command queue (stand-in for etcd and the worker's gRPC door)::

    parent --spawn--> target: KVCache (random), agent, TCP server thread
           <-ready (metadata, layout, port)-
    parent --spawn--> reader: KVCache (zeros), agent, raw NIXL agent, reference source cache
                      reader --await_notif/checksum--> target
           <-result (one dict per cell)-- reader
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from scission.bench.kv_transfer_shapes import KVShape

logger = logging.getLogger(__name__)

TARGET_NAME = "kvbench-prefill"
READER_NAME = "kvbench-decode"
TCP_HEADER = struct.Struct("<QQ")  # (offset, num_bytes) asked of the target
_START_TIMEOUT_S = 180.0
_NOTIF_POLL_S = 50e-6


@dataclass(frozen=True)
class PairConfig:
    """One process pair: one dtype, one UCX transport selection, every prompt length."""

    shape: KVShape
    prompt_tokens: tuple[int, ...]
    patterns: tuple[str, ...]
    methods: tuple[str, ...]  # subset of kv_transfer_reader.METHODS
    warmup: int = 2
    repeats: int = 20
    min_repeats: int = 5
    threads: int = 1  # torch threads of the reader (the torch_copy reference)
    ucx_tls: str | None = None  # None = what KVTransferAgent configures (tcp,cma,self here)
    seed: int = 0
    timeout_s: float = 1800.0

    @property
    def cache_blocks(self) -> int:
        return self.shape.num_blocks(max(self.prompt_tokens))


def allocate_cache(shape: KVShape, num_blocks: int):
    """A ``KVCache`` of the engine (the real layout) for ``shape``; zeros, pages not yet
    touched."""
    from scission.engine.config import KVLayout, ModelConfig
    from scission.engine.kv_cache import KVCache

    # Only the KV geometry matters to KVCache; the rest of ModelConfig is inert here.
    model = ModelConfig(vocab_size=1, hidden_size=shape.num_kv_heads * shape.head_dim,
                        intermediate_size=1, num_layers=shape.num_layers,
                        num_heads=shape.num_kv_heads, num_kv_heads=shape.num_kv_heads,
                        head_dim=shape.head_dim, rope_theta=1.0, rms_norm_eps=1e-5,
                        max_position_embeddings=1)
    return KVCache(model, num_blocks, shape.block_size, getattr(torch, shape.dtype),
                   layout=KVLayout(shape.kv_layout))


def fill_random(cache, seed: int) -> None:
    """Values in [0.5, 1.5), layer by layer (no full-size temporary); touches every page."""
    g = torch.Generator().manual_seed(seed)
    layers = cache.layer_major()  # [L, 2, N, bs, H, D], a view in either layout
    for layer in range(layers.shape[0]):
        src = torch.rand(layers[layer].shape, generator=g) + 0.5
        layers[layer].copy_(src)


def blocks_checksum(cache, block_ids: list[int]) -> float:
    """Float64 sum of the blocks ``block_ids`` (in that order) over every layer, K and V."""
    idx = torch.tensor(block_ids, dtype=torch.int64)
    layers = cache.layer_major()
    return sum(float(layers[layer].index_select(1, idx).double().sum())
               for layer in range(layers.shape[0]))


def _serve_tcp(server: socket.socket, flat: memoryview) -> None:
    """Serve ``(offset, num_bytes)`` requests on one connection until it closes."""
    conn, _ = server.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with conn:
        while True:
            header = conn.recv(TCP_HEADER.size, socket.MSG_WAITALL)
            if len(header) < TCP_HEADER.size:
                return
            offset, num_bytes = TCP_HEADER.unpack(header)
            conn.sendall(flat[offset:offset + num_bytes])


def _await_notif(agent: Any, msg: bytes, timeout_s: float) -> float | None:
    """Poll notifications until ``msg`` arrives; its arrival time (monotonic), or None."""
    deadline_s = time.monotonic() + timeout_s
    while time.monotonic() < deadline_s:
        if any(m == msg for _, m in agent.poll_notifications()):
            return time.monotonic()
        time.sleep(_NOTIF_POLL_S)
    return None


def target_main(cfg: PairConfig, cmd_q: Any, out_q: Any) -> None:
    """Target process: random KV, an agent, a TCP server; serves the reader's commands."""
    from scission.kv_transfer.agent import KVTransferAgent

    torch.set_num_threads(1)
    cache = allocate_cache(cfg.shape, cfg.cache_blocks)
    fill_random(cache, cfg.seed)
    agent = KVTransferAgent(TARGET_NAME, cache.layers)
    server = socket.create_server(("127.0.0.1", 0))
    flat = memoryview(cache.tensor.view(-1).view(torch.uint8).numpy())
    threading.Thread(target=_serve_tcp, args=(server, flat), daemon=True).start()
    out_q.put(("ready", agent.metadata(), agent.layout().to_bytes(),
               server.getsockname()[1], os.environ.get("UCX_TLS", "")))
    while True:
        cmd, *args = cmd_q.get()
        if cmd == "stop":
            break
        if cmd == "await_notif":
            out_q.put(("notif", _await_notif(agent, *args)))
        elif cmd == "checksum":
            out_q.put(("checksum", blocks_checksum(cache, *args)))
        else:
            raise AssertionError(f"unknown command {cmd!r}")
    agent.close()
    out_q.close()
    out_q.join_thread()
    os._exit(0)  # skip torch's slow interpreter teardown; nothing is left to flush


def _get(q: Any, proc: Any, timeout_s: float) -> Any:
    deadline_s = time.monotonic() + timeout_s
    while True:
        try:
            return q.get(timeout=0.5)
        except queue.Empty:
            if not proc.is_alive():
                raise RuntimeError(f"{proc.name} died (exit code {proc.exitcode})") from None
            if time.monotonic() > deadline_s:
                raise TimeoutError(f"{proc.name}: no answer in {timeout_s:.0f} s") from None


def run_pair(cfg: PairConfig) -> dict[str, Any]:
    """Spawn target and reader, run every cell, stop both; the reader's result dict."""
    from scission.bench.kv_transfer_reader import reader_main

    ctx = mp.get_context("spawn")
    target_q, target_out, result_q = ctx.Queue(), ctx.Queue(), ctx.Queue()
    saved = os.environ.get("UCX_TLS")
    if cfg.ucx_tls is not None:  # children read it when their agent starts
        os.environ["UCX_TLS"] = cfg.ucx_tls
    procs = []
    try:
        target = ctx.Process(target=target_main, args=(cfg, target_q, target_out),
                             name="kvbench-target", daemon=True)
        target.start()
        procs.append(target)
        _, metadata, layout, port, target_tls = _get(target_out, target, _START_TIMEOUT_S)
        reader = ctx.Process(target=reader_main,
                             args=(cfg, (metadata, layout, port), target_q, target_out, result_q),
                             name="kvbench-reader", daemon=True)
        reader.start()
        procs.append(reader)
        result = _get(result_q, reader, cfg.timeout_s)
        if isinstance(result, str):
            raise RuntimeError(f"reader failed: {result}")
        result["target_ucx_tls"] = target_tls
        return result
    finally:
        if saved is None:
            os.environ.pop("UCX_TLS", None)
        else:
            os.environ["UCX_TLS"] = saved
        target_q.put(("stop",))
        for proc in reversed(procs):
            proc.join(20)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
