"""The pipelined KV hand-off (``--kv-pipelining``) on a real 1 prefill + 1 decode cluster
whose engine steps are 64 tokens (prompts span several prefill chunks):

- tokens equal the engine alone's under concurrent load, and pieces of KV were pulled
  before their prefill finished (``num_kv_pipelined_reads_total``);
- a wrong pipeline secret is refused and leaves the prefill it names alone;
- a prefill preempted after pieces were pulled is read again whole (its blocks were freed);
- cancellation before the prefill starts, mid-prefill after a partial pull, and after the
  first token, and the prefill worker killed mid-prefill: no KV block stays held, reserved
  or quarantined on either side, and the cluster serves on.
"""

from __future__ import annotations

import json
import random
import threading
from pathlib import Path

import grpc
import pytest
from serving_helpers import (
    all_blocks_free,
    cluster_directory,
    run_concurrently,
    running_cluster,
    token_request,
    wait_until,
    worker_stats,
)

from scission.cluster.client import connect, generate
from scission.cluster.launcher import ClusterConfig, worker_stub
from scission.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from scission.engine.llm_engine import LLMEngine
from scission.engine.request import SamplingParams
from scission.proto.scission.internal.v1 import worker_pb2 as wpb
from scission.router.config import RouterConfig

NEW_TOKENS = 8
CHUNK_TOKENS = 64
NUM_BLOCKS = 256
# A prompt no other test uses (random plain tokens): the preemption test's request.
PREEMPTED_IDS = [random.Random(13).randrange(100, 40000) for _ in range(800)]
SAMPLING = wpb.SamplingParams(temperature=0.0, top_p=1.0, max_tokens=NEW_TOKENS,
                              ignore_eos=True)


@pytest.fixture(scope="module")
def cluster():
    engine = EngineConfig(cache=CacheConfig(num_blocks=NUM_BLOCKS),
                          scheduler=SchedulerConfig(max_num_batched_tokens=CHUNK_TOKENS))
    with running_cluster(ClusterConfig(num_prefill=1, num_decode=1, threads_per_worker=1,
                                       engine=engine, router=RouterConfig(kv_pipelining=True),
                                       hold_timeout_s=60)) as c:
        yield c


@pytest.fixture(scope="module")
def directory(cluster):
    with cluster_directory(cluster) as d:
        yield d


@pytest.fixture(scope="module")
def long_prompts(tokenizer) -> list[list[int]]:
    """Chat prompts of ~220-1570 tokens (4 to 25 prefill chunks): four for the load test,
    then three more of ~1570 that no worker has cached (a cached prompt is prefilled in one
    step: nothing to pipeline)."""
    texts = json.loads((Path(__file__).parents[1] / "data" / "chat_prompts.json").read_text())
    texts = [" ".join(texts[i:] + texts[:i]) for i in range(4)]
    contents = [t * k for t, k in zip(texts, (1, 2, 4, 8), strict=True)]
    contents += [f"Variant {tag}. {contents[3]}" for tag in "ABC"]
    return [tokenizer.apply_chat_template([{"role": "user", "content": c}]) for c in contents]


@pytest.fixture(scope="module")
def reference(tokenizer, long_prompts, chat_prompt_ids) -> dict[int, list[int]]:
    """The engine alone's greedy tokens: ``long_prompts[i]`` for i in 0-3 and 6 (key i),
    ``chat_prompt_ids[i]`` for i in 0-3 (key -1 - i), ``PREEMPTED_IDS`` (key 100)."""
    engine = LLMEngine(EngineConfig(num_threads=1, cache=CacheConfig(num_blocks=512),
                                    scheduler=SchedulerConfig(max_num_batched_tokens=512)),
                       tokenizer=tokenizer)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    prompts = {i: long_prompts[i] for i in (0, 1, 2, 3, 6)}
    prompts |= {-1 - i: chat_prompt_ids[i] for i in range(4)} | {100: PREEMPTED_IDS}
    for key, ids in prompts.items():
        engine.add_request(str(key), ids, params)
    out: dict[str, list[int]] = {str(key): [] for key in prompts}
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id].extend(o.new_token_ids)
    return {key: out[str(key)] for key in prompts}


def stub(cluster, directory, worker_id: str):
    return worker_stub(directory.get(worker_id).endpoint, cluster.cluster_token)


def pipelined_reads(cluster, directory) -> int:
    return worker_stats(cluster, directory, "decode-0").num_kv_pipelined_reads_total


def no_block_held(cluster, directory) -> bool:
    return all_blocks_free(cluster, directory) and \
        worker_stats(cluster, directory, "decode-0").num_quarantined_blocks == 0


def serves_exactly(cluster, ids: list[int], reference: list[int]) -> None:
    res = generate(connect(cluster.router_address), token_request(ids, NEW_TOKENS), 300)
    assert res.error == "", res.error
    assert res.token_ids == reference[:NEW_TOKENS]


def test_tokens_unchanged_and_pieces_pulled_before_the_prefill_ends(
        cluster, directory, chat_prompt_ids, long_prompts, reference):
    """8 concurrent requests (4 spanning 3-24 prefill chunks): the engine-alone tokens, and
    more pipelined READs than requests (the long ones are pulled in several pieces)."""
    before = pipelined_reads(cluster, directory)
    prompts = long_prompts[:4] + chat_prompt_ids[:4]
    refs = [reference[i] for i in range(4)] + [reference[-1 - i] for i in range(4)]
    results = run_concurrently(cluster.router_address,
                               [token_request(ids, NEW_TOKENS) for ids in prompts], 8)
    for res, ref in zip(results, refs, strict=True):
        assert res.error == "", res.error
        assert res.token_ids == ref[:NEW_TOKENS]
    assert pipelined_reads(cluster, directory) - before > len(prompts)
    wait_until(lambda: no_block_held(cluster, directory), 30)


def _prefill(cluster, directory, rid: str, ids: list[int], secret: bytes):
    return stub(cluster, directory, "prefill-0").Prefill.future(wpb.PrefillRequest(
        request_id=rid, prompt_token_ids=ids, sampling=SAMPLING, pipeline_secret=secret),
        timeout=120)


def _decode(cluster, directory, rid: str, ids: list[int], secret: bytes):
    return stub(cluster, directory, "decode-0").Decode(wpb.DecodeRequest(
        request_id=rid, prompt_token_ids=ids, sampling=SAMPLING,
        pipeline=wpb.KVPipeline(prefill_worker_id="prefill-0", pipeline_secret=secret)),
        timeout=120)


def test_a_wrong_secret_is_refused_and_the_prefill_goes_on(cluster, directory, long_prompts,
                                                           reference):
    """WatchPrefill quoting another secret: PERMISSION_DENIED; the decode worker holding the
    right one still gets the KV and the engine-alone tokens."""
    ids, secret = long_prompts[2], b"s" * 16
    prefill = _prefill(cluster, directory, "ws-1", ids, secret)
    watch = stub(cluster, directory, "prefill-0").WatchPrefill(
        wpb.WatchPrefillRequest(request_id="ws-1", pipeline_secret=b"x" * 16), timeout=30)
    with pytest.raises(grpc.RpcError) as refused:
        list(watch)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    chunks = list(_decode(cluster, directory, "ws-1", ids, secret))
    first = prefill.result()
    assert [first.first_token_id] + [t for c in chunks for t in c.token_ids] == \
        reference[2][:NEW_TOKENS]
    wait_until(lambda: no_block_held(cluster, directory), 30)


def test_a_preempted_prefill_is_read_again(cluster, directory, reference):
    """A held prefill (Y) leaves the prefill worker room for half of the pipelined prompt X:
    X's first pieces are pulled, then X cannot grow and is preempted (its blocks freed) and
    waits until Y is released. The decode worker reads X again whole (more blocks READ than
    X lacks), and the tokens are the engine alone's."""
    pre, bs = stub(cluster, directory, "prefill-0"), 16
    x_blocks = -(-len(PREEMPTED_IDS) // bs)
    free = worker_stats(cluster, directory, "prefill-0").num_free_blocks
    y_ids = [random.Random(17).randrange(100, 40000)
             for _ in range((free - x_blocks // 2) * bs - bs // 2)]
    y = pre.Prefill.future(wpb.PrefillRequest(request_id="pp-y", prompt_token_ids=y_ids,
                                              sampling=SAMPLING), timeout=300)
    wait_until(lambda: worker_stats(cluster, directory, "prefill-0").num_running == 1, 60,
               0.02)
    dec_before = worker_stats(cluster, directory, "decode-0")
    x = _prefill(cluster, directory, "pp-x", PREEMPTED_IDS, b"p" * 16)
    call = _decode(cluster, directory, "pp-x", PREEMPTED_IDS, b"p" * 16)
    y_hold = y.result().hold_id

    def x_preempted_after_a_piece() -> bool:
        pre_s = worker_stats(cluster, directory, "prefill-0")
        return pre_s.num_waiting == 1 and pre_s.num_held == 1 and \
            pipelined_reads(cluster, directory) > dec_before.num_kv_pipelined_reads_total

    wait_until(x_preempted_after_a_piece, 120, 0.05)
    pre.Release(wpb.ReleaseRequest(request_id="pp-y", hold_id=y_hold), timeout=10)
    tokens = [t for c in call for t in c.token_ids]
    assert [x.result().first_token_id] + tokens == reference[100][:NEW_TOKENS]
    dec = worker_stats(cluster, directory, "decode-0")
    reused = dec.num_kv_blocks_reused_total - dec_before.num_kv_blocks_reused_total
    pulled = dec.num_kv_blocks_pulled_total - dec_before.num_kv_blocks_pulled_total
    assert pulled > x_blocks - reused
    wait_until(lambda: no_block_held(cluster, directory), 30)


def test_cancel_before_the_prefill_starts(cluster, directory, long_prompts):
    """A Decode whose prefill never arrived, cancelled while it waits: its blocks are free."""
    call = _decode(cluster, directory, "cb-1", long_prompts[3], b"c" * 16)
    wait_until(lambda: worker_stats(cluster, directory, "decode-0").num_free_blocks
               < worker_stats(cluster, directory, "decode-0").num_blocks, 30, 0.02)
    call.cancel()
    wait_until(lambda: no_block_held(cluster, directory), 30)


def test_cancel_mid_prefill_after_a_partial_pull(cluster, directory, long_prompts,
                                                 reference):
    """The router's cancellation once a piece was pulled: Decode cancelled, the hold released
    when the Prefill returns. Then the same with the Prefill cancelled mid-way: the decode
    worker's watch ends and frees its blocks."""
    ids, before = long_prompts[4], pipelined_reads(cluster, directory)
    prefill = _prefill(cluster, directory, "cm-1", ids, b"m" * 16)
    call = _decode(cluster, directory, "cm-1", ids, b"m" * 16)
    wait_until(lambda: pipelined_reads(cluster, directory) > before, 60, 0.02)
    assert not prefill.done()
    call.cancel()
    resp = prefill.result()
    stub(cluster, directory, "prefill-0").Release(
        wpb.ReleaseRequest(request_id="cm-1", hold_id=resp.hold_id), timeout=10)
    wait_until(lambda: no_block_held(cluster, directory), 30)

    ids, before = long_prompts[5], pipelined_reads(cluster, directory)
    prefill = _prefill(cluster, directory, "cm-2", ids, b"n" * 16)
    call = _decode(cluster, directory, "cm-2", ids, b"n" * 16)
    wait_until(lambda: pipelined_reads(cluster, directory) > before, 60, 0.02)
    prefill.cancel()
    with pytest.raises(grpc.RpcError) as ended:
        list(call)
    assert ended.value.code() == grpc.StatusCode.ABORTED
    wait_until(lambda: no_block_held(cluster, directory), 30)
    serves_exactly(cluster, long_prompts[3], reference[3])


def test_cancel_after_the_first_token(cluster, directory, long_prompts):
    """The client goes away after its first streamed token: nothing stays held."""
    gen = connect(cluster.router_address).Generate(token_request(long_prompts[3], 256),
                                                   timeout=120)
    assert next(gen).token_ids
    gen.cancel()
    wait_until(lambda: no_block_held(cluster, directory), 30)


def test_prefill_worker_killed_mid_prefill(cluster, directory, long_prompts, reference):
    """SIGKILL of the prefill worker once a piece was pulled: the request is retried (or
    fails clearly), no block is left on the decode worker (a READ cut short stays quarantined
    until the dead incarnation leaves etcd), and the restarted cluster serves exactly."""
    ids, before = long_prompts[6], pipelined_reads(cluster, directory)
    result = {}
    t = threading.Thread(target=lambda: result.update(res=generate(
        connect(cluster.router_address), token_request(ids, NEW_TOKENS), 300)))
    t.start()
    wait_until(lambda: pipelined_reads(cluster, directory) > before, 60, 0.02)
    cluster.crash_worker("prefill-0")
    t.join(300)
    res = result["res"]
    assert res.error or res.token_ids == reference[6][:NEW_TOKENS], res.error
    wait_until(lambda: directory.get("prefill-0") is not None, 120)
    wait_until(lambda: no_block_held(cluster, directory), 60)
    serves_exactly(cluster, ids, reference[6])
