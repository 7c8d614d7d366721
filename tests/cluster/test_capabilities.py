"""Transfer handles and NIXL notifications from someone who is not a prefill/decode worker
of this cluster (the doors issue's probes, part 4), on a real 1 prefill + 1 decode cluster:
a handle with guessed block ids reads nothing, a forged KV notification frees nothing."""

from __future__ import annotations

import dataclasses

import grpc
import pytest
import torch
from serving_helpers import wait_until

from scission.cluster.launcher import ClusterConfig, LocalCluster, worker_stub
from scission.engine.config import CacheConfig, EngineConfig
from scission.kv_transfer.handle import (
    KVLayoutDescriptor,
    KVNotification,
    KVNotificationKind,
    TransferHandle,
)
from scission.proto.scission.internal.v1 import worker_pb2 as wpb
from scission.registry.directory import WorkerDirectory
from scission.registry.workers import EtcdClientConfig, RegistryConfig
from scission.registry.workers import connect as etcd_connect

SAMPLING = wpb.SamplingParams(temperature=0.0, top_p=1.0, max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def cluster():
    c = LocalCluster(ClusterConfig(num_prefill=1, num_decode=1, threads_per_worker=1,
                                   hold_timeout_s=120,
                                   engine=EngineConfig(cache=CacheConfig(num_blocks=128))))
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def directory(cluster):
    client = etcd_connect(EtcdClientConfig(endpoints=(cluster.etcd.endpoint,)))
    with WorkerDirectory(client, RegistryConfig(prefix=cluster.config.registry_prefix)) as d:
        yield d


def stub(cluster, directory, worker_id: str):
    return worker_stub(directory.get(worker_id).endpoint, cluster.cluster_token)


def stats(cluster, directory, worker_id: str) -> wpb.WorkerStats:
    return stub(cluster, directory, worker_id).GetStats(wpb.StatsRequest(), timeout=5)


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
    free_before = stats(cluster, directory, "decode-0").num_free_blocks
    for forged in (guessed, dataclasses.replace(real, mac=b"")):
        with pytest.raises(grpc.RpcError) as e:
            list(dec.Decode(wpb.DecodeRequest(
                request_id="cap-1", prompt_token_ids=ids, first_token_id=resp.first_token_id,
                sampling=SAMPLING, transfer_handle=forged.to_bytes()), timeout=60))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not issued by this cluster" in e.value.details()
    assert stats(cluster, directory, "decode-0").num_free_blocks == free_before
    assert stats(cluster, directory, "prefill-0").num_held == 1  # nothing was pulled
    chunks = list(dec.Decode(wpb.DecodeRequest(
        request_id="cap-1", prompt_token_ids=ids, first_token_id=resp.first_token_id,
        sampling=SAMPLING, transfer_handle=resp.transfer_handle), timeout=60))
    assert chunks[-1].finish_reason == "length"
    wait_until(lambda: stats(cluster, directory, "prefill-0").num_held == 0, 30)


def test_a_forged_kv_notification_frees_nothing(cluster, directory, chat_prompt_ids):
    """A NIXL agent that is no registered worker sends PULL_DONE naming a held request, with
    its real incarnation and even its real hold id: dropped and counted, the KV stays held
    until the router's Release."""
    from scission.kv_transfer.agent import KVTransferAgent

    resp = prefill(cluster, directory, "cap-2", chat_prompt_ids[3])
    handle = TransferHandle.from_bytes(resp.transfer_handle)
    info = directory.get("prefill-0")
    layout = KVLayoutDescriptor.from_bytes(info.kv_layout)
    shape = (1, layout.block_size, layout.num_kv_heads, layout.head_dim)
    caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(layout.num_layers)]
    dropped = stats(cluster, directory, "prefill-0").num_notifications_dropped_total
    with KVTransferAgent("intruder:1", caches) as intruder:
        intruder.add_peer(info.agent_name, info.agent_metadata,
                          dataclasses.replace(layout, num_blocks=layout.num_blocks))
        note = KVNotification(kind=KVNotificationKind.PULL_DONE, request_id="cap-2",
                              incarnation=handle.incarnation, hold_id=handle.hold_id)
        intruder.send_notification(info.agent_name, note.to_bytes())
        wait_until(lambda: stats(cluster, directory, "prefill-0")
                   .num_notifications_dropped_total == dropped + 1, 30)
    assert stats(cluster, directory, "prefill-0").num_held == 1
    assert stub(cluster, directory, "prefill-0").Release(
        wpb.ReleaseRequest(request_id="cap-2", hold_id=resp.hold_id), timeout=5).released
    assert stats(cluster, directory, "prefill-0").num_held == 0
