"""End to end on a real local cluster: embedded etcd + Ray + router + 2 prefill + 1 decode
workers running the default model, KV moved over NIXL."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import ray
from serving_helpers import (
    all_blocks_free,
    cluster_directory,
    run_concurrently,
    running_cluster,
    token_request,
    wait_until,
)

from scission.cluster.client import connect, generate
from scission.cluster.launcher import ClusterConfig
from scission.cluster.launcher import worker_stub as launcher_worker_stub
from scission.engine.config import CacheConfig, EngineConfig
from scission.kv_transfer.handle import TransferHandle
from scission.proto.scission.internal.v1 import worker_pb2 as wpb
from scission.proto.scission.internal.v1 import worker_pb2_grpc as wpb_grpc
from scission.proto.scission.v1 import generation_pb2 as pb
from scission.registry.workers import WorkerRole

LEASE_TTL_S = 3
NUM_BLOCKS = 384


@pytest.fixture(scope="module")
def cluster():
    cfg = ClusterConfig(num_prefill=2, num_decode=1, lease_ttl_s=LEASE_TTL_S,
                        threads_per_worker=1, hold_timeout_s=60,
                        engine=EngineConfig(cache=CacheConfig(num_blocks=NUM_BLOCKS)))
    with running_cluster(cfg) as c:
        yield c


@pytest.fixture(scope="module")
def directory(cluster):
    with cluster_directory(cluster) as d:
        yield d


def worker_stub(cluster, directory, worker_id: str) -> wpb_grpc.WorkerStub:
    return launcher_worker_stub(directory.get(worker_id).endpoint, cluster.cluster_token)


def test_cluster_tokens_equal_engine_alone(cluster, chat_prompt_ids, engine_reference):
    """Every prompt, 16 in flight, through router -> prefill -> NIXL -> decode gives exactly
    the engine-alone greedy tokens, and each request names the workers that served it."""
    reqs = [token_request(ids, len(ref)) for ids, ref in zip(chat_prompt_ids, engine_reference,
                                                               strict=True)]
    results = run_concurrently(cluster.router_address, reqs, in_flight=16)
    for i, (res, ref) in enumerate(zip(results, engine_reference, strict=True)):
        assert res.error == "", res.error
        assert res.token_ids == ref, f"prompt {i} differs"
        assert res.finish_reason == "length" and res.output_tokens == len(ref)
        assert res.prompt_tokens == len(chat_prompt_ids[i])
        assert res.prefill_worker in ("prefill-0", "prefill-1")
        assert res.decode_worker == "decode-0"
        assert res.ttft_ms > 0 and res.tpot_ms > 0


def test_same_client_request_id_twice(cluster, directory, chat_prompt_ids, engine_reference):
    """Four concurrent requests all carrying the client request_id "same-id" (different
    prompts): the router gives each its own internal id, so each gets exactly its own
    engine-alone tokens with "same-id" echoed back, and every block is free afterwards."""
    reqs = [token_request(ids, len(ref))
            for ids, ref in zip(chat_prompt_ids[:4], engine_reference[:4], strict=True)]
    for r in reqs:
        r.request_id = "same-id"
    results = run_concurrently(cluster.router_address, reqs, in_flight=4)
    for i, (res, ref) in enumerate(zip(results, engine_reference[:4], strict=True)):
        assert res.error == "", res.error
        assert res.token_ids == ref, f"prompt {i} differs"
        assert res.request_id == "same-id"
    wait_until(lambda: all_blocks_free(cluster, directory), 30)


def test_kv_crosses_over_nixl(cluster, directory, chat_prompt_ids):
    """Decode's blocks hold exactly prefill's KV bytes for the prompt, and decode never runs
    the prompt through the model (its prompt-token counter does not move)."""
    ids = chat_prompt_ids[5]
    pre = worker_stub(cluster, directory, "prefill-0")
    dec = worker_stub(cluster, directory, "decode-0")
    sampling = wpb.SamplingParams(temperature=0.0, top_p=1.0, max_tokens=4, ignore_eos=True)
    resp = pre.Prefill(wpb.PrefillRequest(request_id="kv-cross", prompt_token_ids=ids,
                                          sampling=sampling), timeout=60)
    handle = TransferHandle.from_bytes(resp.transfer_handle)
    prefill_bytes = ray.get(cluster.workers["prefill-0"].kv_token_bytes.remote(
        list(handle.block_ids), len(ids)))
    before = dec.GetStats(wpb.StatsRequest(), timeout=5).num_prompt_tokens_computed
    chunks = list(dec.Decode(wpb.DecodeRequest(
        request_id="kv-cross", prompt_token_ids=ids, first_token_id=resp.first_token_id,
        sampling=sampling, transfer_handle=resp.transfer_handle), timeout=60))
    assert chunks[-1].finish_reason == "length"
    assert sum(len(c.token_ids) for c in chunks) == 3  # the first token came from prefill
    local = ray.get(cluster.workers["decode-0"].pulled_blocks.remote("kv-cross"))
    decode_bytes = ray.get(cluster.workers["decode-0"].kv_token_bytes.remote(local, len(ids)))
    assert len(prefill_bytes) > 0 and decode_bytes == prefill_bytes
    assert dec.GetStats(wpb.StatsRequest(), timeout=5).num_prompt_tokens_computed == before
    wait_until(lambda: pre.GetStats(wpb.StatsRequest(), timeout=5).num_held == 0, 10)


def internal_calls(stub: wpb_grpc.WorkerStub, ids: list[int], sampling) -> list:
    """Every internal RPC, each as a call that raises the RPC's error."""
    return [
        lambda: stub.Prefill(wpb.PrefillRequest(request_id="x", prompt_token_ids=ids,
                                                sampling=sampling), timeout=10),
        lambda: list(stub.Decode(wpb.DecodeRequest(
            request_id="x", prompt_token_ids=ids, first_token_id=1, sampling=sampling,
            transfer_handle=b"guessed"), timeout=10)),
        lambda: list(stub.Generate(wpb.GenerateRequest(
            request_id="x", prompt_token_ids=ids, sampling=sampling), timeout=10)),
        lambda: stub.Encode(wpb.EncodeRequest(request_id="x", image=b"x"), timeout=10),
        lambda: stub.Release(wpb.ReleaseRequest(request_id="x"), timeout=10),
        lambda: stub.Abort(wpb.AbortRequest(request_id="x"), timeout=10),
        lambda: stub.GetStats(wpb.StatsRequest(), timeout=10)]


def test_internal_api_refuses_callers_without_the_cluster_token(cluster, directory,
                                                               chat_prompt_ids):
    """The probes of the doors issue, from outside the cluster: every internal RPC without
    the token (or with a wrong one) end UNAUTHENTICATED and reach
    no handler (the workers' prompt-token counters stay put); health checks stay open."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from scission.worker.cluster_auth import with_cluster_token

    ids = chat_prompt_ids[3]
    sampling = wpb.SamplingParams(temperature=0.0, max_tokens=2)
    counted = {w: worker_stub(cluster, directory, w).GetStats(wpb.StatsRequest(), timeout=5)
               .num_prompt_tokens_computed for w in ("prefill-0", "decode-0")}
    for token in ("", "not-the-token"):
        for worker_id in ("prefill-0", "decode-0"):
            channel = grpc.insecure_channel(directory.get(worker_id).endpoint)
            stub = wpb_grpc.WorkerStub(with_cluster_token(channel, token))
            calls = internal_calls(stub, ids, sampling)
            for call in calls:
                with pytest.raises(grpc.RpcError) as e:
                    call()
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, e.value
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                               timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            channel.close()
    assert counted == {w: worker_stub(cluster, directory, w).GetStats(
        wpb.StatsRequest(), timeout=5).num_prompt_tokens_computed for w in counted}


def test_cancelled_and_finished_requests_free_every_block(cluster, directory, chat_prompt_ids):
    """After finished and client-cancelled requests (during prefill and during decode), every
    worker's free block count is back to its total and nothing is held or running."""
    stub = connect(cluster.router_address)
    calls = [stub.Generate(token_request(ids, 200), timeout=120) for ids in chat_prompt_ids[:6]]
    next(calls[0])  # first token arrived: cancel during decode
    for c in calls:
        c.cancel()
    done = run_concurrently(cluster.router_address,
                            [token_request(ids, 8) for ids in chat_prompt_ids[6:10]], 4)
    assert all(r.error == "" and r.output_tokens == 8 for r in done)
    wait_until(lambda: all_blocks_free(cluster, directory), 30)


@pytest.mark.parametrize("request_, code, field", [
    (pb.GenerateRequest(), grpc.StatusCode.INVALID_ARGUMENT, "input"),
    (pb.GenerateRequest(prompt="   "), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 10**7])),
     grpc.StatusCode.INVALID_ARGUMENT, "token_ids"),
    (pb.GenerateRequest(chat=pb.ChatMessages(messages=[pb.ChatMessage(role="robot",
                                                                      content="hi")])),
     grpc.StatusCode.INVALID_ARGUMENT, "messages"),
    (pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(temperature=-1)),
     grpc.StatusCode.INVALID_ARGUMENT, "sampling.temperature"),
    (pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(top_p=0)),
     grpc.StatusCode.INVALID_ARGUMENT, "sampling.top_p"),
    (pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(max_tokens=0)),
     grpc.StatusCode.INVALID_ARGUMENT, "sampling.max_tokens"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5] * 8000),
                        sampling=pb.SamplingParams(max_tokens=1000)),
     grpc.StatusCode.OUT_OF_RANGE, "sampling.max_tokens"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5] * 9000),
                        sampling=pb.SamplingParams(max_tokens=1)),
     grpc.StatusCode.OUT_OF_RANGE, "input"),
])
def test_bad_input_gets_clear_status(cluster, request_, code, field):
    """Bad input is rejected with the right status and a message naming the field; the
    cluster keeps serving."""
    stub = connect(cluster.router_address)
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(request_, timeout=30))
    assert err.value.code() == code
    assert field in err.value.details()
    ok = generate(stub, pb.GenerateRequest(prompt="Hello", sampling=pb.SamplingParams(
        temperature=0, max_tokens=2)))
    assert ok.error == "" and ok.output_tokens == 2


def test_killed_prefill_worker_leaves_and_traffic_moves(cluster, directory, chat_prompt_ids):
    """A SIGKILLed prefill worker leaves etcd within its lease TTL (+ etcd's expiry tick),
    and every later request succeeds on the surviving prefill worker."""
    assert {w.worker_id for w in directory.workers(WorkerRole.PREFILL)} == {"prefill-0",
                                                                             "prefill-1"}
    cluster.kill_worker("prefill-0")
    gone_s = wait_until(lambda: directory.get("prefill-0") is None, LEASE_TTL_S + 5)
    assert gone_s <= LEASE_TTL_S + 1.5
    results = run_concurrently(cluster.router_address,
                               [token_request(ids, 4) for ids in chat_prompt_ids[:6]], 3)
    assert [r.error for r in results] == [""] * 6
    assert {r.prefill_worker for r in results} == {"prefill-1"}


def test_crashed_worker_is_restarted_and_serves_again(cluster, directory, chat_prompt_ids,
                                                      engine_reference):
    """A worker process that dies (SIGKILL, not a deliberate kill) is restarted by Ray,
    registers again as a new incarnation, and serves exactly the reference tokens."""
    before = directory.get("prefill-1")
    assert before is not None
    cluster.crash_worker("prefill-1")

    def restarted() -> bool:
        info = directory.get("prefill-1")
        return info is not None and info.incarnation != before.incarnation

    wait_until(restarted, 300, interval_s=0.5)
    time.sleep(1.0)  # the router's own watch
    prompts = chat_prompt_ids[6:10]
    results = run_concurrently(cluster.router_address,
                               [token_request(ids, 8) for ids in prompts], 4)
    for i, res in enumerate(results):
        assert res.error == "", res.error
        assert res.token_ids == engine_reference[6 + i][:8], f"prompt {6 + i} differs"
    assert {r.prefill_worker for r in results} == {"prefill-1"}


def test_requests_migrate_off_a_killed_decode_worker(cluster, directory, chat_prompt_ids,
                                                     engine_reference):
    """Requests streaming from a decode worker that is SIGKILLed mid-stream finish on the
    other decode worker (prompt + streamed tokens recomputed there), with exactly the greedy
    tokens they would have produced anyway."""
    new_id = cluster.add_worker(WorkerRole.DECODE)
    wait_until(lambda: directory.get(new_id) is not None, 30)
    time.sleep(1.0)  # the router's own watch
    n_tokens, prompts = 64, chat_prompt_ids[:6]
    streamed = [0] * len(prompts)  # text deltas seen by the client, per request
    stub = connect(cluster.router_address)

    def run(i: int):
        def on_text(_delta: str) -> None:
            streamed[i] += 1
        return generate(stub, token_request(prompts[i], n_tokens), timeout_s=600,
                        on_text=on_text)

    with ThreadPoolExecutor(len(prompts)) as ex:
        futs = [ex.submit(run, i) for i in range(len(prompts))]
        # Kill once every stream is under way (so none has finished on decode-0), decided by
        # what the client has seen rather than by a sleep that a slow machine can outrun.
        wait_until(lambda: min(streamed) >= 3, 120, interval_s=0.01)
        dec = worker_stub(cluster, directory, "decode-0")
        assert dec.GetStats(wpb.StatsRequest(), timeout=10).num_running > 0
        cluster.kill_worker("decode-0")
        results = [f.result(timeout=300) for f in futs]
    for i, res in enumerate(results):
        assert res.error == "", res.error
        assert res.token_ids == engine_reference[i][:n_tokens], f"prompt {i} differs"
    assert {r.decode_worker for r in results} == {new_id}
