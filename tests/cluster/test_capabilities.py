"""Transfer handles, NIXL notifications and registrations from someone who is not a worker
of this cluster (the doors issue's probes), on a real 1 prefill + 1 decode cluster: a handle
with guessed block ids reads nothing, a forged KV notification frees nothing, a registration
written by hand into etcd gets no request."""

from __future__ import annotations

import dataclasses
import threading
from concurrent import futures

import grpc
import pytest
import torch
from serving_helpers import (
    cluster_directory,
    run_concurrently,
    running_cluster,
    token_request,
    wait_until,
    worker_stats,
)

from scission.cluster.launcher import ClusterConfig, worker_stub
from scission.engine.config import CacheConfig, EngineConfig
from scission.kv_transfer.handle import (
    KV_LAYOUT_NHD,
    KVLayoutDescriptor,
    KVNotification,
    KVNotificationKind,
    TransferHandle,
)
from scission.proto.scission.internal.v1 import worker_pb2 as wpb
from scission.registry.signing import record_key
from scission.registry.workers import EtcdClientConfig, RegistryConfig
from scission.registry.workers import connect as etcd_connect

SAMPLING = wpb.SamplingParams(temperature=0.0, top_p=1.0, max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def cluster():
    with running_cluster(ClusterConfig(num_prefill=1, num_decode=1, threads_per_worker=1,
                                       hold_timeout_s=120,
                                       engine=EngineConfig(cache=CacheConfig(num_blocks=128)))) as c:
        yield c


@pytest.fixture(scope="module")
def directory(cluster):
    with cluster_directory(cluster) as d:
        yield d


def stub(cluster, directory, worker_id: str):
    return worker_stub(directory.get(worker_id).endpoint, cluster.cluster_token)


def prefill(cluster, directory, rid: str, ids: list[int]) -> wpb.PrefillResponse:
    return stub(cluster, directory, "prefill-0").Prefill(
        wpb.PrefillRequest(request_id=rid, prompt_token_ids=ids, sampling=SAMPLING), timeout=60)


def test_a_handle_with_guessed_block_ids_reads_nothing(cluster, directory, chat_prompt_ids):
    """Even with the cluster token, a handle whose block ids were changed (or that was never
    signed) is refused before a block is reserved or read; the genuine one still works."""
    ids = chat_prompt_ids[2]
    resp = prefill(cluster, directory, "cap-1", ids)
    real = TransferHandle.from_bytes(resp.transfer_handle)
    guessed = dataclasses.replace(real, block_ids=tuple(b + 1 for b in real.block_ids))
    dec = stub(cluster, directory, "decode-0")
    free_before = worker_stats(cluster, directory, "decode-0").num_free_blocks
    for forged in (guessed, dataclasses.replace(real, mac=b"")):
        with pytest.raises(grpc.RpcError) as e:
            list(dec.Decode(wpb.DecodeRequest(
                request_id="cap-1", prompt_token_ids=ids, first_token_id=resp.first_token_id,
                sampling=SAMPLING, transfer_handle=forged.to_bytes()), timeout=60))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not issued by this cluster" in e.value.details()
    assert worker_stats(cluster, directory, "decode-0").num_free_blocks == free_before
    assert worker_stats(cluster, directory, "prefill-0").num_held == 1  # nothing was pulled
    chunks = list(dec.Decode(wpb.DecodeRequest(
        request_id="cap-1", prompt_token_ids=ids, first_token_id=resp.first_token_id,
        sampling=SAMPLING, transfer_handle=resp.transfer_handle), timeout=60))
    assert chunks[-1].finish_reason == "length"
    wait_until(lambda: worker_stats(cluster, directory, "prefill-0").num_held == 0, 30)


def test_a_forged_kv_notification_frees_nothing(cluster, directory, chat_prompt_ids):
    """A NIXL agent that is no registered worker sends PULL_DONE naming a held request, with
    its real incarnation and even its real hold id: dropped and counted, the KV stays held
    until the router's Release."""
    from scission.kv_transfer.agent import KVTransferAgent

    resp = prefill(cluster, directory, "cap-2", chat_prompt_ids[3])
    handle = TransferHandle.from_bytes(resp.transfer_handle)
    info = directory.get("prefill-0")
    layout = KVLayoutDescriptor.from_bytes(info.kv_layout)
    # One block in the prefill worker's layout (a peer of another layout is refused).
    cache = torch.zeros(1, layout.num_layers, 2, layout.block_size, layout.num_kv_heads,
                        layout.head_dim)
    if layout.layout == KV_LAYOUT_NHD:
        cache = cache.permute(1, 2, 0, 3, 4, 5).contiguous()  # [L, 2, 1, ...]
        caches = [(cache[i, 0], cache[i, 1]) for i in range(layout.num_layers)]
    else:
        caches = [(cache[:, i, 0], cache[:, i, 1]) for i in range(layout.num_layers)]
    dropped = worker_stats(cluster, directory, "prefill-0").num_notifications_dropped_total
    with KVTransferAgent("intruder:1", caches) as intruder:
        intruder.add_peer(info.agent_name, info.agent_metadata,
                          dataclasses.replace(layout, num_blocks=layout.num_blocks))
        note = KVNotification(kind=KVNotificationKind.PULL_DONE, request_id="cap-2",
                              incarnation=handle.incarnation, hold_id=handle.hold_id)
        intruder.send_notification(info.agent_name, note.to_bytes())
        wait_until(lambda: worker_stats(cluster, directory, "prefill-0")
                   .num_notifications_dropped_total == dropped + 1, 30)
    assert worker_stats(cluster, directory, "prefill-0").num_held == 1
    assert stub(cluster, directory, "prefill-0").Release(
        wpb.ReleaseRequest(request_id="cap-2", hold_id=resp.hold_id), timeout=5).released
    assert worker_stats(cluster, directory, "prefill-0").num_held == 0


class _CallCounter(grpc.GenericRpcHandler):
    """A gRPC server's only handler: counts every call (any method), answers UNIMPLEMENTED."""

    def __init__(self) -> None:
        self.methods: list[str] = []
        self._lock = threading.Lock()

    def service(self, handler_call_details):
        with self._lock:
            self.methods.append(handler_call_details.method)
        return None


def test_a_registration_written_by_hand_gets_no_request(cluster, directory, chat_prompt_ids,
                                                        engine_reference):
    """A WorkerInfo (and an idle-looking stats record) put into etcd without the cluster token,
    copying prefill-0's fields but pointing at a listening fake server: etcd holds it, the
    cluster's router and a router of this process drop it (counted), and 6 requests through
    each are all served by the real workers with the engine-alone tokens; the fake server
    receives no call."""
    from scission.router.config import RouterConfig
    from scission.router.server import RouterServer

    counter = _CallCounter()
    fake_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2),
                              handlers=(counter,))
    port = fake_server.add_insecure_port("127.0.0.1:0")
    fake_server.start()
    registry = RegistryConfig(prefix=cluster.config.registry_prefix)
    client = etcd_connect(EtcdClientConfig(endpoints=(cluster.etcd.endpoint,)))
    real = directory.get("prefill-0")
    fakes = [dataclasses.replace(real, worker_id="prefill-fake", endpoint=f"127.0.0.1:{port}",
                                 mac=b""),
             dataclasses.replace(real, worker_id="prefill-fake2", endpoint=f"127.0.0.1:{port}",
                                 mac=b"\x01" * 16)]
    idle = dataclasses.replace(directory.stats("prefill-0"), num_running=0, num_waiting=0,
                               queued_prefill_tokens=0, mac=b"")
    router = RouterServer(RouterConfig(etcd=EtcdClientConfig(endpoints=(cluster.etcd.endpoint,)),
                                       cluster_token=cluster.cluster_token, registry=registry,
                                       metrics_port=0)).start()
    try:
        for fake in fakes:
            client.put(registry.workers_prefix + fake.worker_id, fake.to_bytes())
            client.put(registry.stats_prefix + fake.worker_id, idle.to_bytes())
        # Unverified, etcd's content shows both; verified with the cluster's key, neither.
        wait_until(lambda: directory.get("prefill-fake2") is not None, 10)
        wait_until(lambda: router.directory.num_rejected_records >= 4, 10)
        assert [w.worker_id for w in router.directory.workers()] == ["decode-0", "prefill-0"]
        assert router.directory.stats("prefill-fake") is None
        n = 6
        reqs = [token_request(ids, 8) for ids in chat_prompt_ids[:n]]
        for address in (router.address, cluster.router_address):
            results = run_concurrently(address, reqs, in_flight=n)
            for i, res in enumerate(results):
                assert res.error == "", res.error
                assert res.token_ids == engine_reference[i][:8], f"prompt {i} differs"
                assert res.prefill_worker == "prefill-0"
        assert counter.methods == []
        # The record as the cluster's workers sign it verifies; the same bytes unsigned don't.
        assert record_key(cluster.cluster_token) and real.mac != b""
    finally:
        router.stop()
        for fake in fakes:
            client.delete(registry.workers_prefix + fake.worker_id)
            client.delete(registry.stats_prefix + fake.worker_id)
        fake_server.stop(0)
