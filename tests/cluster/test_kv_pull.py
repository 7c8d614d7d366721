"""The KV pull on a real 1 prefill + 2 decode cluster with ``--kv-checksums``:

- integrity (kv_transfer/integrity.py): served requests pass their checksums; a corrupted
  transfer is detected, counted, recomputed, and still gives the engine-alone tokens;
- pull only what is missing: a decode worker whose prefix cache holds the start of a prompt
  pulls exactly the other blocks (counted), and the tokens are the engine-alone ones;
- the router places a request on the decode worker holding its prefix (KV-aware decode).
"""

from __future__ import annotations

import dataclasses

import pytest
from serving_helpers import (
    cluster_directory,
    run_concurrently,
    running_cluster,
    token_request,
    wait_until,
)

from scission.cluster.launcher import ClusterConfig, worker_stub
from scission.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from scission.engine.llm_engine import LLMEngine
from scission.engine.request import SamplingParams
from scission.kv_transfer.capability import transfer_key
from scission.kv_transfer.handle import TransferHandle
from scission.proto.scission.internal.v1 import worker_pb2 as wpb
from scission.registry.workers import EtcdClientConfig, RegistryConfig

SAMPLING = wpb.SamplingParams(temperature=0.0, top_p=1.0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def cluster():
    with running_cluster(ClusterConfig(num_prefill=1, num_decode=2, threads_per_worker=1,
                                       hold_timeout_s=60, kv_checksums=True,
                                       engine=EngineConfig(cache=CacheConfig(num_blocks=128)))) as c:
        yield c


@pytest.fixture(scope="module")
def stubs(cluster):
    with cluster_directory(cluster) as d:
        yield {w: worker_stub(d.get(w).endpoint, cluster.cluster_token)
               for w in ("prefill-0", "decode-0", "decode-1")}


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
    assert [stats(stubs, w).num_kv_checksum_mismatches_total
            for w in ("decode-0", "decode-1")] == [0, 0]
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


def engine_tokens(tokenizer, prompts: dict[str, list[int]]) -> dict[str, list[int]]:
    """The engine alone's 8 greedy tokens (EOS ignored) of each prompt."""
    engine = LLMEngine(EngineConfig(num_threads=1, cache=CacheConfig(num_blocks=64),
                                    scheduler=SchedulerConfig(max_num_batched_tokens=512)),
                       tokenizer=tokenizer)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    for name, ids in prompts.items():
        engine.add_request(name, ids, params)
    ref: dict[str, list[int]] = {name: [] for name in prompts}
    while engine.has_unfinished():
        for o in engine.step():
            ref[o.request_id].extend(o.new_token_ids)
    return ref


def decode_directly(stubs, rid: str, ids: list[int], decode: str = "decode-0") -> list[int]:
    """Prefill on prefill-0, then Decode on ``decode`` with its handle: the greedy tokens."""
    resp = stubs["prefill-0"].Prefill(wpb.PrefillRequest(
        request_id=rid, prompt_token_ids=ids, sampling=SAMPLING), timeout=60)
    chunks = stubs[decode].Decode(wpb.DecodeRequest(
        request_id=rid, prompt_token_ids=ids, first_token_id=resp.first_token_id,
        sampling=SAMPLING, transfer_handle=resp.transfer_handle), timeout=120)
    return [resp.first_token_id] + [t for c in chunks for t in c.token_ids]


def test_a_decode_worker_pulls_only_the_blocks_it_lacks(stubs, tokenizer, chat_prompt_ids):
    """a (7 blocks) is pulled whole but for blocks already cached (the chat preamble of
    earlier tests); b shares a's first 4 full blocks then differs: exactly its other blocks
    are pulled; c is a's 6 full blocks: nothing is pulled. Tokens = the engine alone's, no
    prompt token recomputed."""
    base = [t for ids in chat_prompt_ids[8:12] for t in ids]
    assert len(base) >= 100
    a = base[:100]  # 6 full blocks + 4 tokens
    b = base[:64] + [t for ids in chat_prompt_ids[12:14] for t in ids][5:42]  # 4 shared, 7 in all
    c = base[:96]  # exactly a's 6 full blocks
    assert b[64:80] != a[64:80] and len(b) == 101
    ref = engine_tokens(tokenizer, {"a": a, "b": b, "c": c})
    counts = {}
    for rid, ids in (("pull-a", a), ("pull-b", b), ("pull-c", c)):  # in order: each leaves
        before = stats(stubs, "decode-0")                          # its full blocks cached
        assert decode_directly(stubs, rid, ids) == ref[rid[-1]], rid
        after = stats(stubs, "decode-0")
        counts[rid[-1]] = (after.num_kv_blocks_pulled_total - before.num_kv_blocks_pulled_total,
                           after.num_kv_blocks_reused_total - before.num_kv_blocks_reused_total)
        assert after.num_prompt_tokens_computed == before.num_prompt_tokens_computed  # no recompute
        assert after.num_kv_checksum_mismatches_total == before.num_kv_checksum_mismatches_total
    assert sum(counts["a"]) == 7
    assert counts["b"] == (7 - 4, 4)
    assert counts["c"] == (0, 6)
    # Nothing pulled for c, yet its hold on the prefill worker is released (the notification
    # goes without a READ).
    wait_until(lambda: all_free(stubs), 30)


def test_the_router_places_decode_on_the_worker_holding_the_prefix(cluster, stubs, tokenizer,
                                                                  chat_prompt_ids):
    """a is pulled onto decode-1 directly; b shares a's first 5 full blocks. Through a router
    (KV-aware), once its prefix index shows decode-1 holding a's blocks, b goes to decode-1
    (not decode-0, which an idle tie would pick) and decode-1 pulls exactly b's 2 other
    blocks and reuses 5; tokens = the engine alone's."""
    from scission.router.config import RouterConfig
    from scission.router.server import RouterServer

    base = [t for ids in chat_prompt_ids[14:18] for t in ids]
    a = base[:90]  # 5 full blocks + 10 tokens
    b = base[:80] + [t for ids in chat_prompt_ids[18:20] for t in ids][7:27]  # 7 blocks
    assert len(b) == 100 and b[80:96] != base[80:96]
    ref = engine_tokens(tokenizer, {"a": a, "b": b})
    assert decode_directly(stubs, "route-a", a, decode="decode-1") == ref["a"]
    wait_until(lambda: all_free(stubs), 30)
    etcd = EtcdClientConfig(endpoints=(cluster.etcd.endpoint,))
    router = RouterServer(RouterConfig(
        etcd=etcd, cluster_token=cluster.cluster_token,
        registry=RegistryConfig(prefix=cluster.config.registry_prefix))).start()
    try:
        wait_until(lambda: router.index.match(router.hasher(b).block_hashes)
                   .get("decode-1", 0) == 5, 30)
        before = {w: stats(stubs, w) for w in ("decode-0", "decode-1")}
        [res] = run_concurrently(router.address, [token_request(b, 8)], 1)
    finally:
        router.stop()
    assert res.error == "" and res.token_ids == ref["b"]
    assert (res.prefill_worker, res.decode_worker) == ("prefill-0", "decode-1")
    after = {w: stats(stubs, w) for w in ("decode-0", "decode-1")}
    pulled, reused = (after["decode-1"].num_kv_blocks_pulled_total
                      - before["decode-1"].num_kv_blocks_pulled_total,
                      after["decode-1"].num_kv_blocks_reused_total
                      - before["decode-1"].num_kv_blocks_reused_total)
    assert (pulled, reused) == (2, 5)
    assert after["decode-0"].num_kv_blocks_pulled_total == \
        before["decode-0"].num_kv_blocks_pulled_total
    wait_until(lambda: all_free(stubs), 30)
