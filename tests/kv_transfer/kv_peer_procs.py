"""Spawned peer processes for the NIXL transfer tests (not a test module).

Each peer is a real separate process (``spawn``) that owns one ``KVTransferAgent`` over a
deterministic multi-layer KV cache and serves commands from a queue; the queues stand in
for etcd and the worker gRPC API. ``make_kv_caches`` is deterministic in ``seed``, so the
test process recomputes any peer's initial cache bytes without shipping tensors around.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

READY_TIMEOUT_S = 120.0  # spawn + import torch/nixl + UCX init, on a loaded 2-core CI box


@dataclass(frozen=True)
class CacheSpec:
    num_layers: int = 3
    num_blocks: int = 16
    block_size: int = 4
    num_kv_heads: int = 2
    head_dim: int = 8
    dtype: str = "float32"
    one_tensor: bool = False  # per-layer views into one big tensor instead of 2L tensors
    # Block-major (KVLayout.BLOCK_MAJOR): strided per-layer views of one
    # [num_blocks, num_layers, 2, ...] tensor, same values as the layer-major cache of the seed.
    block_major: bool = False
    # Image embedding pages registered next to the KV cache (0 = none).
    embedding_pages: int = 0
    page_tokens: int = 4
    hidden_size: int = 24


def make_kv_caches(spec: CacheSpec, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer ``(k, v)``, ``[num_blocks, block_size, num_kv_heads, head_dim]``, CPU.

    Values are in [0.5, 1.5) — never zero, also after the cast to bf16 — so a block that
    was not transferred cannot look like one that was.
    """
    g = torch.Generator().manual_seed(seed)
    # data: [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
    shape = (spec.num_layers, 2, spec.num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
    data = (torch.rand(shape, generator=g) + 0.5).to(getattr(torch, spec.dtype))
    if spec.block_major:  # [num_blocks, num_layers, 2, ...] memory, same values
        blocks = data.permute(2, 0, 1, 3, 4, 5).contiguous()
        return [(blocks[:, layer, 0], blocks[:, layer, 1]) for layer in range(spec.num_layers)]
    if spec.one_tensor:
        return [(data[layer, 0], data[layer, 1]) for layer in range(spec.num_layers)]
    return [(data[layer, 0].clone(), data[layer, 1].clone()) for layer in range(spec.num_layers)]


def make_embedding_pages(spec: CacheSpec, seed: int) -> torch.Tensor | None:
    """``[embedding_pages, page_tokens, hidden_size]``, deterministic in ``seed``, values in
    [0.5, 1.5) like the KV caches (so an untouched page never looks transferred)."""
    if not spec.embedding_pages:
        return None
    g = torch.Generator().manual_seed(seed + 1000)
    shape = (spec.embedding_pages, spec.page_tokens, spec.hidden_size)
    return (torch.rand(shape, generator=g) + 0.5).to(getattr(torch, spec.dtype))


def page_bytes(pages: torch.Tensor) -> list[bytes]:
    return [bytes(p.contiguous().view(torch.uint8).numpy().tobytes()) for p in pages]


def cache_block_bytes(kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[list[bytes]]:
    """``[2 * num_layers][num_blocks]`` raw bytes of each block (K then V per layer)."""
    return [
        [bytes(t[b].contiguous().view(torch.uint8).numpy().tobytes()) for b in range(t.shape[0])]
        for pair in kv_caches
        for t in pair
    ]


def peer_main(name: str, spec: CacheSpec, seed: int, cmd_q: Any, out_q: Any) -> None:
    """Process entry: create the agent, announce it, then serve commands until ``stop``."""
    from scission.kv_transfer.agent import KVTransferAgent, KVTransferError
    from scission.kv_transfer.embeddings import EmbeddingLayout
    from scission.kv_transfer.handle import KVLayoutDescriptor

    kv_caches = make_kv_caches(spec, seed)
    pages = make_embedding_pages(spec, seed)
    agent = KVTransferAgent(name, kv_caches, embedding_pages=pages)
    emb = agent.embedding_layout()
    out_q.put(("ready", agent.metadata(), agent.layout().to_bytes(), os.getpid(),
               b"" if emb is None else emb.to_bytes()))
    while True:
        cmd, *args = cmd_q.get()
        if cmd == "stop":
            break
        start_s = time.monotonic()
        try:
            if cmd == "add_peer":
                peer, metadata, layout_bytes, emb_bytes = args
                agent.add_peer(peer, metadata, KVLayoutDescriptor.from_bytes(layout_bytes),
                               EmbeddingLayout.from_bytes(emb_bytes) if emb_bytes else None)
                result: Any = None
            elif cmd == "read_pages":
                agent.read_pages(*args)
                result = None
            elif cmd == "page_bytes":
                result = page_bytes(pages)
            elif cmd == "send_notification":
                result = agent.send_notification(*args)
            elif cmd == "read":
                agent.read_blocks(*args)
                result = None
            elif cmd == "read_threads":
                result = _read_in_threads(agent, *args)
            elif cmd == "poll_notifs":
                result = _poll_notifs(agent, wait_s=args[0])
            elif cmd == "cache_bytes":
                result = cache_block_bytes(kv_caches)
            elif cmd == "close":
                result = agent.close()
            else:
                raise AssertionError(f"unknown command {cmd!r}")
        except (ValueError, KVTransferError) as e:
            out_q.put(("error", type(e).__name__, str(e), time.monotonic() - start_s))
            continue
        out_q.put(("ok", result, time.monotonic() - start_s))
    agent.close()
    # Skip interpreter finalization (torch teardown takes seconds on a small CI box);
    # the agent is closed and the answers are flushed, so nothing is lost.
    out_q.close()
    out_q.join_thread()
    os._exit(0)


def _read_in_threads(agent: Any, peer: str, reads: list[tuple], timeout_s: float) -> list[str]:
    """Run ``reads`` (``(remote_ids, local_ids, notify_msg)``) concurrently, one thread each;
    returns ``"ok"`` or the exception type name per read."""
    from scission.kv_transfer.agent import KVTransferError

    results = ["pending"] * len(reads)

    def run(i: int) -> None:
        try:
            agent.read_blocks(peer, *reads[i], timeout_s)
            results[i] = "ok"
        except (ValueError, KVTransferError) as e:
            results[i] = type(e).__name__

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(reads))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s + 5)
    return results


def _poll_notifs(agent: Any, wait_s: float) -> list[tuple[str, bytes]]:
    deadline_s = time.monotonic() + wait_s
    notifs: list[tuple[str, bytes]] = []
    while not notifs and time.monotonic() < deadline_s:
        notifs = agent.poll_notifications()
        time.sleep(0.005)
    return notifs


class PeerProcess:
    """Parent-side proxy of one spawned peer; every wait is bounded."""

    def __init__(self, ctx: Any, name: str, spec: CacheSpec, seed: int):
        self.name, self.spec, self.seed = name, spec, seed
        self._cmd_q, self._out_q = ctx.Queue(), ctx.Queue()
        self.proc = ctx.Process(
            target=peer_main, args=(name, spec, seed, self._cmd_q, self._out_q), daemon=True
        )
        self.proc.start()
        self.metadata = b""
        self.layout_bytes = b""
        self.embedding_layout_bytes = b""

    def wait_ready(self) -> None:
        _, self.metadata, self.layout_bytes, pid, self.embedding_layout_bytes = \
            self._get(READY_TIMEOUT_S)
        assert pid == self.proc.pid

    def call(self, *cmd: Any, timeout_s: float = 60.0) -> tuple[Any, ...]:
        """Run a command; returns ``("ok", result, dt)`` or ``("error", type, msg, dt)``."""
        self._cmd_q.put(cmd)
        return self._get(timeout_s)

    def add_peer(self, other: PeerProcess) -> tuple[Any, ...]:
        return self.call("add_peer", other.name, other.metadata, other.layout_bytes,
                         other.embedding_layout_bytes)

    def signal(self, signum: int) -> None:
        os.kill(self.proc.pid, signum)

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(10)

    def request_stop(self) -> None:
        """Ask the peer to close its agent and exit (see ``stop``)."""
        if self.proc.is_alive():
            try:
                self.signal(signal.SIGCONT)  # in case a test stopped it
                self._cmd_q.put(("stop",))
            except (OSError, ValueError):
                pass

    def stop(self) -> None:
        """Wait for a requested stop, then kill; never leaves the process behind."""
        self.request_stop()
        self.proc.join(10)
        self.kill()
        for q in (self._cmd_q, self._out_q):
            q.cancel_join_thread()
            q.close()

    def _get(self, timeout_s: float) -> Any:
        deadline_s = time.monotonic() + timeout_s
        while True:
            try:
                return self._out_q.get(timeout=0.2)
            except queue.Empty:
                if not self.proc.is_alive():
                    raise RuntimeError(
                        f"peer {self.name} died (exit code {self.proc.exitcode})"
                    ) from None
                if time.monotonic() > deadline_s:
                    raise TimeoutError(f"peer {self.name}: no answer in {timeout_s} s") from None


def spawn_context() -> Any:
    return mp.get_context("spawn")
