"""A request_id that repeats on a worker (a router retry or migration landing on the same
worker, an internal client) is refused with ALREADY_EXISTS and leaves the original alone:
its stream, its blocks, its held KV; a Release or pull notification frees only the hold it
names. Real workers (tiny model, real etcd, NIXL and gRPC), called through their gRPC
stubs; prefill and decode hand KV over NIXL in this process."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import grpc
import pytest
from worker_helpers import tiny_worker_config, wait_for

from scission.decode_worker.servicer import DecodeServicer
from scission.engine.request import SamplingParams
from scission.kv_transfer.handle import KVNotification, KVNotificationKind
from scission.prefill_worker.servicer import PrefillServicer
from scission.proto.scission.internal.v1 import worker_pb2 as pb
from scission.proto.scission.internal.v1 import worker_pb2_grpc as pb_grpc
from scission.registry.workers import WorkerRole
from scission.worker.convert import sampling_to_proto
from scission.worker.runtime import WorkerRuntime

SERVICERS = {WorkerRole.PREFILL: PrefillServicer, WorkerRole.DECODE: DecodeServicer,
             WorkerRole.COLOCATED: DecodeServicer}
PROMPT = list(range(100, 120))  # 20 tokens: 2 blocks of 16
LONG = SamplingParams(temperature=0.0, max_tokens=300, ignore_eos=True)
STEP_DELAY_S = 0.005  # a hook slows each loop turn: the original surely runs meanwhile

Started = tuple[WorkerRuntime, pb_grpc.WorkerStub]


@pytest.fixture
def start_worker(tmp_path, tokenizer, etcd_server, etcd_prefix
                 ) -> Iterator[Callable[..., Started]]:
    """``start_worker(worker_id, role)`` -> a started runtime and a stub to it; stopped at
    teardown. Requests time out after 5 s (a hung original fails fast)."""
    started: list[tuple[WorkerRuntime, grpc.Channel]] = []

    def start(worker_id: str, role: WorkerRole, **overrides) -> Started:
        overrides.setdefault("request_timeout_s", 5.0)
        cfg = tiny_worker_config(tmp_path, tokenizer, etcd_server, etcd_prefix, worker_id,
                                 role, **overrides)
        runtime: WorkerRuntime = WorkerRuntime(cfg, lambda r: SERVICERS[r]).start()
        runtime.loop.add_hook(lambda: time.sleep(STEP_DELAY_S))
        channel = grpc.insecure_channel(runtime.endpoint)
        started.append((runtime, channel))
        return runtime, pb_grpc.WorkerStub(channel)

    yield start
    for runtime, channel in started:
        channel.close()
        runtime.stop()


def refused(call: Callable[[], object]) -> grpc.StatusCode:
    """The status code ``call()`` (a unary call, or a stream read to its end) fails with."""
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        if not isinstance(result, pb.PrefillResponse | pb.ReleaseResponse):
            list(result)
    return info.value.code()


def finish(stream: Iterator[pb.TokenChunk]) -> tuple[int, str]:
    """Read a token stream to its end: (tokens, finish_reason of the last chunk)."""
    chunks = list(stream)
    return sum(len(c.token_ids) for c in chunks), chunks[-1].finish_reason if chunks else ""


def test_duplicate_generate_leaves_the_original_stream(start_worker):
    """A second Generate with a running request's id is refused with ALREADY_EXISTS; the
    original streams on to its 300th token ("length"), and every block is free after."""
    runtime, stub = start_worker("c0", WorkerRole.COLOCATED)
    req = pb.GenerateRequest(request_id="r", prompt_token_ids=PROMPT,
                             sampling=sampling_to_proto(LONG))
    original = stub.Generate(req, timeout=60)
    first = next(original)
    assert "r" in runtime.engine.requests  # running while the duplicate arrives
    code = refused(lambda: stub.Generate(req, timeout=60))
    assert "r" in runtime.engine.requests, "the original finished before the duplicate: vacuous"
    n, reason = finish(original)
    assert (len(first.token_ids) + n, reason) == (300, "length")
    assert code == grpc.StatusCode.ALREADY_EXISTS
    assert runtime.engine.num_free_blocks == 64


def test_duplicate_decode_frees_its_blocks_and_leaves_the_original(start_worker):
    """A second Decode with a running request's id (and its transfer handle) is refused with
    ALREADY_EXISTS before it reserves anything; the original streams to the end and the
    decode worker ends with all 64 blocks free (the refused call leaked 2 before)."""
    _, pre = start_worker("p0", WorkerRole.PREFILL)
    decode, dec = start_worker("d0", WorkerRole.DECODE)
    sampling = sampling_to_proto(LONG)
    first = pre.Prefill(pb.PrefillRequest(request_id="r", prompt_token_ids=PROMPT,
                                          sampling=sampling), timeout=30)
    req = pb.DecodeRequest(request_id="r", prompt_token_ids=PROMPT, sampling=sampling,
                           first_token_id=first.first_token_id,
                           transfer_handle=first.transfer_handle)
    original = dec.Decode(req, timeout=60)
    streamed = len(next(original).token_ids) + 1  # + the first token, from the prefill
    assert "r" in decode.engine.requests
    code = refused(lambda: dec.Decode(req, timeout=60))
    assert "r" in decode.engine.requests, "the original finished before the duplicate: vacuous"
    n, reason = finish(original)
    assert decode.engine.num_free_blocks == 64
    assert (streamed + n, reason) == (300, "length")
    assert code == grpc.StatusCode.ALREADY_EXISTS
    assert decode.servicer.num_pull_failures == 0


def test_duplicate_prefill_leaves_the_original(start_worker):
    """A second Prefill with the id of one still computing its prompt is refused with
    ALREADY_EXISTS; the original returns its first token and a handle, and its hold is the
    only one (released by a Release naming it: every block free)."""
    runtime, stub = start_worker("p1", WorkerRole.PREFILL)
    prompt = list(range(100, 460))  # 360 tokens: 15 steps of 24
    req = pb.PrefillRequest(request_id="r", prompt_token_ids=prompt,
                            sampling=sampling_to_proto(LONG))
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(_call(stub.Prefill, req)))
    thread.start()
    wait_for(lambda: "r" in runtime.engine.requests, 10)
    code = refused(lambda: stub.Prefill(req, timeout=30))
    assert "r" in runtime.engine.requests, "the original finished before the duplicate: vacuous"
    thread.join(30)
    (resp,) = result
    assert isinstance(resp, pb.PrefillResponse) and resp.transfer_handle, resp
    assert code == grpc.StatusCode.ALREADY_EXISTS
    assert list(runtime.engine.held) == ["r"]
    assert stub.Release(pb.ReleaseRequest(request_id="r", hold_id=resp.hold_id),
                        timeout=10).released
    wait_for(lambda: runtime.engine.num_free_blocks == 64, 5)


def test_duplicate_of_a_held_prefill_keeps_the_hold(start_worker):
    """A Prefill whose id is held for a pull is refused with ALREADY_EXISTS; the held
    blocks stay pinned (the decode worker can still pull them)."""
    runtime, stub = start_worker("p2", WorkerRole.PREFILL)
    req = pb.PrefillRequest(request_id="r", prompt_token_ids=PROMPT,
                            sampling=sampling_to_proto(LONG))
    stub.Prefill(req, timeout=30)
    free = runtime.engine.num_free_blocks
    code = refused(lambda: stub.Prefill(req, timeout=30))
    assert list(runtime.engine.held) == ["r"] and runtime.engine.num_free_blocks == free
    assert code == grpc.StatusCode.ALREADY_EXISTS


def test_release_frees_only_the_hold_it_names(start_worker):
    """Attempt 1 of r is prefilled and released (hold A); attempt 2 of r is prefilled again
    (hold B). A late Release quoting A (a cancelled attempt's cleanup) and a late PULL_DONE
    naming A (sent over NIXL) both leave B pinned; the notification naming another request's
    hold frees that one; a Release quoting B frees B. Every block is free at the end."""
    runtime, stub = start_worker("p3", WorkerRole.PREFILL)
    decode, _ = start_worker("d3", WorkerRole.DECODE)
    prefill = lambda rid: stub.Prefill(pb.PrefillRequest(  # noqa: E731
        request_id=rid, prompt_token_ids=PROMPT, sampling=sampling_to_proto(LONG)), timeout=30)
    release = lambda rid, hold_id: stub.Release(  # noqa: E731
        pb.ReleaseRequest(request_id=rid, hold_id=hold_id), timeout=10).released
    hold_a = prefill("r").hold_id
    assert release("r", hold_a)
    retry, other = prefill("r"), prefill("s")
    assert retry.hold_id not in (0, hold_a)
    pinned = runtime.engine.num_free_blocks
    assert not release("r", hold_a)
    assert list(runtime.engine.held) == ["r", "s"] and runtime.engine.num_free_blocks == pinned

    agent, incarnation = decode.agent, runtime.info.incarnation
    agent.add_peer(runtime.agent.name, runtime.agent.metadata(), runtime.agent.layout())
    for rid, hold_id in (("r", hold_a), ("s", other.hold_id)):  # in order, from one sender
        agent.send_notification(runtime.agent.name, KVNotification(
            kind=KVNotificationKind.PULL_DONE, request_id=rid, incarnation=incarnation,
            hold_id=hold_id).to_bytes())
    wait_for(lambda: "s" not in runtime.engine.held, 10)
    assert list(runtime.engine.held) == ["r"]
    assert release("r", retry.hold_id)
    assert runtime.engine.num_free_blocks == 64


def _call(method, req):
    try:
        return method(req, timeout=30)
    except grpc.RpcError as e:
        return e.code()

