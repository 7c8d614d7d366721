"""The router's live SLO metrics end to end in one process: a real RouterServer and etcd,
fake prefill / decode workers (gRPC servers registered in etcd that stream fixed tokens)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent import futures

import grpc
import msgpack
import pytest

from scission.proto.scission.internal.v1 import worker_pb2 as wpb
from scission.proto.scission.internal.v1 import worker_pb2_grpc as wpb_grpc
from scission.proto.scission.v1 import generation_pb2 as pb
from scission.proto.scission.v1 import generation_pb2_grpc as pb_grpc
from scission.registry.metrics import SloWindow, slo_key, slo_prefix
from scission.registry.workers import (
    EtcdClientConfig,
    RegistryConfig,
    WorkerInfo,
    WorkerRegistration,
    WorkerRole,
)
from scission.router.config import RouterConfig
from scission.router.server import RouterServer

NUM_DECODE_TOKENS = 4  # after the first token


class FakeWorker(wpb_grpc.WorkerServicer):
    """Prefill returns token 7 (and an opaque handle); Decode streams 8, 9, ...; no engine."""

    def Prefill(self, request, context) -> wpb.PrefillResponse:
        return wpb.PrefillResponse(first_token_id=7, transfer_handle=b"h", text="a")

    def Decode(self, request, context) -> Iterator[wpb.TokenChunk]:
        for i in range(NUM_DECODE_TOKENS):
            time.sleep(0.01)
            last = i == NUM_DECODE_TOKENS - 1
            yield wpb.TokenChunk(token_ids=[8 + i], text="b", finish_reason="length" if last
                                 else "")

    def Release(self, request, context) -> wpb.ReleaseResponse:
        return wpb.ReleaseResponse(released=True)


def wait_for(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


@pytest.fixture
def fake_workers(etcd_client, etcd_prefix) -> Iterator[None]:
    """One fake prefill and one fake decode worker, registered under leases."""
    server = grpc.server(futures.ThreadPoolExecutor(8))
    wpb_grpc.add_WorkerServicer_to_server(FakeWorker(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    regs = []
    for worker_id, role in (("p0", WorkerRole.PREFILL), ("d0", WorkerRole.DECODE)):
        reg = WorkerRegistration(etcd_client, RegistryConfig(prefix=etcd_prefix))
        reg.register(WorkerInfo(worker_id=worker_id, role=role, endpoint=f"127.0.0.1:{port}",
                                agent_name=f"nixl-{worker_id}", agent_metadata=b"md",
                                kv_layout=msgpack.packb({}), num_blocks=64, block_size=16,
                                model_id="fake", started_at_s=1.0), ttl_s=5)
        regs.append(reg)
    try:
        yield
    finally:
        for reg in regs:
            reg.deregister()
        server.stop(grace=0)


def windows(client, prefix: str) -> dict[str, SloWindow]:
    return {w.scope: w for w in (SloWindow.from_bytes(v)
                                 for v, _ in client.get_prefix(slo_prefix(prefix)))}


def test_router_publishes_slo_windows_per_pool(etcd_server, etcd_client, etcd_prefix,
                                               fake_workers):
    """Two disaggregated requests and one invalid one: the router's windows in etcd count
    the two (cluster, prefill and decode scopes; TTFT in prefill, TPOT in decode) under
    ``router-<8 hex>`` with the load shape seen at arrival (prompt length, max_tokens), the
    latency histograms have two observations, and the keys vanish
    when the router stops."""
    cfg = RouterConfig(etcd=EtcdClientConfig(endpoints=(etcd_server.endpoint,)),
                       registry=RegistryConfig(prefix=etcd_prefix), slo_publish_interval_s=0.1)
    router = RouterServer(cfg).start()
    try:
        assert router.router_id.startswith("router-") and len(router.router_id) == 15
        wait_for(lambda: len(router.directory.workers()) == 2)
        stub = pb_grpc.GenerationStub(grpc.insecure_channel(router.address))
        for i in range(2):
            req = pb.GenerateRequest(request_id=f"r{i}", token_ids=pb.TokenIds(ids=[1, 2, 3]),
                                     sampling=pb.SamplingParams(max_tokens=8))
            chunks = list(stub.Generate(req, timeout=30))
            assert chunks[-1].usage.output_tokens == 1 + NUM_DECODE_TOKENS
        with pytest.raises(grpc.RpcError):  # invalid: not in the SLO windows
            list(stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[-1])), timeout=30))
        wait_for(lambda: windows(etcd_client, etcd_prefix).get("cluster", None) is not None
                 and windows(etcd_client, etcd_prefix)["cluster"].num_finished == 2)
        got = windows(etcd_client, etcd_prefix)
        assert sorted(got) == ["cluster", "decode", "prefill"]
        for scope in got:
            key = slo_key(etcd_prefix, router.router_id, scope)
            assert etcd_client.get(key)[1].lease_id == router.slo_publisher.lease_id
        cluster, pre, dec = got["cluster"], got["prefill"], got["decode"]
        assert (cluster.num_arrivals, cluster.num_finished, cluster.num_failed) == (2, 2, 0)
        assert (cluster.attainment, cluster.mean_prompt_tokens) == (1.0, 3.0)
        # the load shape at arrival: 3-token prompts asking for 8 tokens
        assert (cluster.num_recent_arrivals, cluster.arrival_mean_prompt_tokens,
                cluster.arrival_mean_max_tokens) == (2, 3.0, 8.0)
        assert cluster.mean_output_tokens == 1.0 + NUM_DECODE_TOKENS
        assert (pre.num_arrivals, pre.num_finished, pre.mean_prompt_tokens) == (2, 2, 3.0)
        assert pre.ttft_p90_ms > 0 and pre.tpot_p90_ms == 0.0 and pre.mean_output_tokens == 0
        assert dec.tpot_p90_ms >= 10.0 * (NUM_DECODE_TOKENS - 1) / NUM_DECODE_TOKENS
        assert dec.itl_p90_ms > 0 and dec.ttft_p90_ms == 0.0
        text = router.metrics.render().decode()
        assert "scission_router_ttft_seconds_count 2.0" in text
        assert "scission_router_tpot_seconds_count 2.0" in text
        assert 'scission_router_slo_attainment{scope="decode",slo="both"} 1.0' in text
    finally:
        router.stop()
    assert windows(etcd_client, etcd_prefix) == {}
