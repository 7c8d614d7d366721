"""A KV pull that timed out leaves its blocks in quarantine on the decode worker: NIXL may
still write into them (``KVTransferTimeoutError``), so they are not allocatable until the
prefill peer is disconnected (its incarnation left the directory, or the quarantine ran
``kv_quarantine_max_s``), then freed; nothing leaks. A real decode worker (tiny model, etcd,
NIXL, gRPC) pulls from a real NIXL agent in a spawned process that the test freezes
(SIGSTOP) and registers as a prefill worker."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
from worker_helpers import tiny_worker_config, wait_for

from scission.decode_worker.servicer import DecodeServicer
from scission.engine.request import SamplingParams
from scission.kv_transfer.handle import KVLayoutDescriptor, TransferHandle
from scission.proto.scission.internal.v1 import worker_pb2 as pb
from scission.proto.scission.internal.v1 import worker_pb2_grpc as pb_grpc
from scission.registry.workers import (
    EtcdClientConfig,
    RegistryConfig,
    WorkerInfo,
    WorkerRegistration,
    WorkerRole,
    connect,
)
from scission.worker.convert import sampling_to_proto
from scission.worker.runtime import WorkerRuntime

PEER = "prefill-frozen:1"
PROMPT = list(range(100, 120))  # 20 tokens: 2 blocks of 16


def peer_main(name: str, out_q, stop) -> None:
    """A NIXL agent over a cache shaped like the tiny model's (2 layers of [8, 16, 2, 16]
    float32) in the default KV layout (the decode worker's: a peer of another layout is
    refused); announces its metadata and layout, then idles until ``stop``."""
    import torch

    from scission.engine.config import CacheConfig, KVLayout
    from scission.kv_transfer.agent import KVTransferAgent

    cache = torch.ones(8, 2, 2, 16, 2, 16)  # [blocks, layers, K/V, block_size, heads, dim]
    if CacheConfig().kv_layout is KVLayout.LAYER_MAJOR:
        cache = cache.permute(1, 2, 0, 3, 4, 5).contiguous()
        caches = [(cache[i, 0], cache[i, 1]) for i in range(2)]
    else:
        caches = [(cache[:, i, 0], cache[:, i, 1]) for i in range(2)]
    agent = KVTransferAgent(name, caches)
    out_q.put((agent.metadata(), agent.layout().to_bytes()))
    stop.wait(300)
    agent.close()
    os._exit(0)


@dataclass
class Peer:
    info: WorkerInfo  # as registered
    registration: WorkerRegistration
    pid: int

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """SIGSTOP the peer process for the block (its READs stall), SIGCONT after."""
        os.kill(self.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(self.pid, signal.SIGCONT)


@pytest.fixture
def peer(etcd_server, etcd_prefix) -> Iterator[Peer]:
    """The peer process, registered in etcd as prefill worker "prefill-frozen"; stopped
    (killed if need be) at teardown."""
    ctx = mp.get_context("spawn")
    out_q, stop = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=peer_main, args=(PEER, out_q, stop), daemon=True)
    proc.start()
    etcd = connect(EtcdClientConfig(endpoints=(etcd_server.endpoint,)))
    registration = WorkerRegistration(etcd, RegistryConfig(prefix=etcd_prefix))
    try:
        metadata, layout = out_q.get(timeout=120)
        info = registration.register(WorkerInfo(
            worker_id="prefill-frozen", role=WorkerRole.PREFILL, endpoint="127.0.0.1:1",
            agent_name=PEER, agent_metadata=metadata, kv_layout=layout, num_blocks=8,
            block_size=16, model_id="tiny", started_at_s=time.time()), ttl_s=5)
        yield Peer(info, registration, proc.pid)
    finally:
        registration.deregister()
        stop.set()
        proc.join(10)
        if proc.is_alive():
            proc.kill()
        etcd.close()


def pull_that_times_out(decode: WorkerRuntime, info: WorkerInfo) -> int:
    """Connect to the peer, freeze it, and run a Decode whose pull times out (the prompt is
    recomputed here and streams to its end); returns the tokens streamed."""
    decode.agent.add_peer(PEER, info.agent_metadata, KVLayoutDescriptor.from_bytes(
        info.kv_layout))
    handle = TransferHandle(request_id="r", prefill_worker_id=info.worker_id,
                            incarnation=info.incarnation, agent_name=PEER, block_ids=(3, 5),
                            num_tokens=len(PROMPT), block_size=16, dtype="float32", hold_id=9)
    sampling = sampling_to_proto(SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    req = pb.DecodeRequest(request_id="r", prompt_token_ids=PROMPT, first_token_id=7,
                           sampling=sampling, transfer_handle=handle.to_bytes())
    with grpc.insecure_channel(decode.endpoint) as channel:
        chunks = list(pb_grpc.WorkerStub(channel).Decode(req, timeout=60))
    assert chunks[-1].finish_reason == "length"
    return sum(len(c.token_ids) for c in chunks)


@pytest.fixture
def decode_worker(tmp_path, tokenizer, etcd_server, etcd_prefix):
    started: list[WorkerRuntime] = []

    def start(**overrides) -> WorkerRuntime:
        cfg = tiny_worker_config(tmp_path, tokenizer, etcd_server, etcd_prefix, "d0",
                                 WorkerRole.DECODE, kv_pull_timeout_s=1.0, **overrides)
        started.append(WorkerRuntime(cfg, lambda role: DecodeServicer).start())
        return started[-1]

    yield start
    for runtime in started:
        runtime.stop()


def test_timed_out_pull_is_quarantined_until_the_peer_leaves(decode_worker, peer):
    """The pull from the frozen peer times out: the request is recomputed and finishes, but
    its 2 reserved blocks stay out of allocation (62 of 64 free, 2 quarantined in the
    stats), also a while later; once the peer's registration is gone the worker disconnects
    it and the 2 blocks come back (64 free, 0 quarantined)."""
    decode = decode_worker()
    wait_for(lambda: decode.directory.get(peer.info.worker_id) is not None, 10)
    with peer.frozen():
        assert pull_that_times_out(decode, peer.info) == 7  # max_tokens 8, the first given
        assert decode.servicer.num_pull_failures == 1
        time.sleep(1.0)  # hook turns go by: the peer is still registered
        assert decode.engine.num_free_blocks == 62
        assert decode.stats().num_quarantined_blocks == 2
        peer.registration.deregister()
        wait_for(lambda: decode.engine.num_free_blocks == 64, 10)
    assert decode.stats().num_quarantined_blocks == 0
    assert PEER not in decode.agent.peers()


def test_quarantine_ends_after_its_bound(decode_worker, peer):
    """With the peer still registered (frozen, not dead), the quarantine lasts at most
    ``kv_quarantine_max_s`` (3 s here): then the worker disconnects the peer itself and
    frees the blocks."""
    decode = decode_worker(kv_quarantine_max_s=3.0)
    wait_for(lambda: decode.directory.get(peer.info.worker_id) is not None, 10)
    with peer.frozen():
        pull_that_times_out(decode, peer.info)
        assert decode.stats().num_quarantined_blocks == 2
        wait_for(lambda: decode.engine.num_free_blocks == 64, 10)
    assert PEER not in decode.agent.peers()
