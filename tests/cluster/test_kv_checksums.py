"""KV integrity checks (``--kv-checksums``, kv_transfer/integrity.py) on a real 1 prefill +
1 decode cluster: handles carry one checksum per block, which equal an independent XXH3 of
the decode worker's pulled KV; a corrupted transfer is detected, counted, recomputed, and the
request still gives the engine-alone tokens with every block free afterwards."""

from __future__ import annotations

import dataclasses

import pytest
from serving_helpers import run_concurrently, token_request, wait_until

from scission.cluster.launcher import ClusterConfig, LocalCluster, worker_stub
from scission.engine.config import CacheConfig, EngineConfig
from scission.kv_transfer.capability import transfer_key
from scission.kv_transfer.handle import TransferHandle
from scission.proto.scission.internal.v1 import worker_pb2 as wpb
from scission.registry.directory import WorkerDirectory
from scission.registry.workers import EtcdClientConfig, RegistryConfig
from scission.registry.workers import connect as etcd_connect

SAMPLING = wpb.SamplingParams(temperature=0.0, top_p=1.0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def cluster():
    c = LocalCluster(ClusterConfig(num_prefill=1, num_decode=1, threads_per_worker=1,
                                   hold_timeout_s=60, kv_checksums=True,
                                   engine=EngineConfig(cache=CacheConfig(num_blocks=128))))
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def stubs(cluster):
    client = etcd_connect(EtcdClientConfig(endpoints=(cluster.etcd.endpoint,)))
    with WorkerDirectory(client, RegistryConfig(prefix=cluster.config.registry_prefix)) as d:
        yield {w: worker_stub(d.get(w).endpoint, cluster.cluster_token)
               for w in ("prefill-0", "decode-0")}


def stats(stubs, worker_id: str) -> wpb.WorkerStats:
    return stubs[worker_id].GetStats(wpb.StatsRequest(), timeout=5)


def all_free(stubs) -> bool:
    return all(s.num_free_blocks == s.num_blocks and not s.num_held and not s.num_running
               for s in (stats(stubs, w) for w in stubs))


def test_served_requests_pass_their_checksums(cluster, stubs, chat_prompt_ids,
                                              engine_reference):
    results = run_concurrently(cluster.router_address,
                               [token_request(ids, 8) for ids in chat_prompt_ids[:6]], 6)
    for i, res in enumerate(results):
        assert res.error == "", res.error
        assert res.token_ids == engine_reference[i][:8]
    assert stats(stubs, "decode-0").num_kv_checksum_mismatches_total == 0
    wait_until(lambda: all_free(stubs), 30)


def test_a_corrupted_transfer_is_detected_and_recomputed(cluster, stubs, chat_prompt_ids,
                                                         engine_reference):
    """The handle's checksum of one block no longer matches what arrives (as if a byte of
    that block flipped on the way; re-signed with the cluster key, so only the checksum
    check can catch it): counted, the prompt recomputed on the decode worker, exact tokens."""
    ids = chat_prompt_ids[7]
    resp = stubs["prefill-0"].Prefill(wpb.PrefillRequest(
        request_id="sum-1", prompt_token_ids=ids, sampling=SAMPLING), timeout=60)
    handle = TransferHandle.from_bytes(resp.transfer_handle)
    assert len(handle.block_checksums) == handle.num_blocks == -(-len(ids) // 16)
    sums = list(handle.block_checksums)
    sums[1] ^= 1 << 17
    bad = dataclasses.replace(handle, block_checksums=tuple(sums)).signed(
        transfer_key(cluster.cluster_token))
    before = stats(stubs, "decode-0")
    chunks = list(stubs["decode-0"].Decode(wpb.DecodeRequest(
        request_id="sum-1", prompt_token_ids=ids, first_token_id=resp.first_token_id,
        sampling=SAMPLING, transfer_handle=bad.to_bytes()), timeout=120))
    tokens = [resp.first_token_id] + [t for c in chunks for t in c.token_ids]
    assert tokens == engine_reference[7][:8]
    after = stats(stubs, "decode-0")
    assert after.num_kv_checksum_mismatches_total == before.num_kv_checksum_mismatches_total + 1
    # Recomputed: prompt tokens ran through the decode worker's model (a pulled prompt runs
    # none; its prefix cache may hold the shared chat preamble).
    assert after.num_prompt_tokens_computed > before.num_prompt_tokens_computed
    wait_until(lambda: all_free(stubs), 30)
