"""The disaggregated flow re-checks its decode worker when the prefill returns
(``router/flows.py``): one that stopped serving meanwhile (flipped to prefill, drained) is
replaced by ``Placer.place_decode``'s choice, which pulls the same transfer handle; nothing is
recomputed and the request counts against the worker that decodes it. Worker doubles record
the calls; the pool is the real ``WorkerPool`` over a directory double."""

from __future__ import annotations

import dataclasses

import msgpack

from scission.engine.request import SamplingParams
from scission.proto.scission.internal.v1 import worker_pb2 as wpb
from scission.registry.workers import WorkerInfo, WorkerRole
from scission.router import flows
from scission.router.config import PlacementConfig
from scission.router.convert import ValidatedRequest
from scission.router.placement import Placement, Placer
from scission.router.worker_pool import WorkerPool

P, D = WorkerRole.PREFILL, WorkerRole.DECODE


def make_info(worker_id: str, role: WorkerRole, incarnation: int = 1) -> WorkerInfo:
    return WorkerInfo(worker_id=worker_id, role=role, endpoint=f"{worker_id}:1", agent_name="a",
                      agent_metadata=b"", kv_layout=msgpack.packb({}), num_blocks=100,
                      block_size=16, model_id="m", started_at_s=0.0, incarnation=incarnation)


class FakeDirectory:
    """``WorkerDirectory``'s reads over a dict the test changes."""

    def __init__(self, infos: list[WorkerInfo]) -> None:
        self.infos = {i.worker_id: i for i in infos}

    def workers(self, role: WorkerRole | None = None) -> list[WorkerInfo]:
        return [i for i in self.infos.values() if role is None or i.role is role]

    def get(self, worker_id: str) -> WorkerInfo | None:
        return self.infos.get(worker_id)

    def stats(self, worker_id: str):
        return None


class FakeCall:
    """A streaming call: iterates the chunks; ``cancel`` is a no-op once finished."""

    def __init__(self, chunks: list[wpb.TokenChunk]) -> None:
        self._it = iter(chunks)

    def __iter__(self):
        return self._it

    def cancel(self) -> None:
        pass


class FakeFuture:
    """A finished unary call (``stub.Prefill.future``)."""

    def __init__(self, response) -> None:
        self._response = response

    def result(self):
        return self._response

    def cancel(self) -> bool:
        return False


class FakeUnary:
    """``stub.Prefill``: callable, and ``.future(req, timeout)`` as a gRPC multicallable."""

    def __init__(self, fn) -> None:
        self._fn = fn

    def __call__(self, req, timeout=None):
        return self._fn(req)

    def future(self, req, timeout=None) -> FakeFuture:
        return FakeFuture(self._fn(req))


class FakeStub:
    def __init__(self, worker_id: str, calls: list, on_prefill=None, on_decode=None) -> None:
        self.worker_id, self.calls = worker_id, calls
        self.on_prefill, self.on_decode = on_prefill, on_decode
        self.Prefill = FakeUnary(self._prefill)

    def _prefill(self, req):
        self.calls.append(("Prefill", self.worker_id, req.request_id))
        if self.on_prefill is not None:
            self.on_prefill()
        return wpb.PrefillResponse(first_token_id=7, transfer_handle=b"handle-of-r1", text="a",
                                   hold_id=42)

    def Decode(self, req, timeout=None):
        self.calls.append(("Decode", self.worker_id, req.transfer_handle))
        if self.on_decode is not None:
            self.on_decode()
        return FakeCall([wpb.TokenChunk(token_ids=[8, 9], text="bc", finish_reason="length")])

    def Release(self, req, timeout=None):
        self.calls.append(("Release", self.worker_id, req.request_id, req.hold_id))


def run(flip_during_prefill: bool, repick: bool):
    """Prefill on prefill-0 with decode-0 chosen at placement. Returns (responses, calls,
    running): ``running`` = the router's request count per decode worker during Decode."""
    directory = FakeDirectory([make_info("prefill-0", P), make_info("decode-0", D),
                               make_info("decode-1", D)])
    pool = WorkerPool(directory)
    calls: list = []

    def flip() -> None:  # decode-0 becomes a prefill worker under a new lease
        if flip_during_prefill:
            directory.infos["decode-0"] = dataclasses.replace(
                directory.infos["decode-0"], role=P, incarnation=2)

    running: dict[str, int] = {}

    def snapshot() -> None:
        running.update({w: pool.load(directory.get(w)).num_running
                        for w in ("decode-0", "decode-1")})

    stubs = {w: FakeStub(w, calls, flip if w == "prefill-0" else None, snapshot)
             for w in ("prefill-0", "decode-0", "decode-1")}
    pool.stub = lambda info: stubs[info.worker_id]
    placement = Placement(directory.get("decode-0"), directory.get("prefill-0"), 0)
    vr = ValidatedRequest("r1", [1, 2, 3], SamplingParams(max_tokens=3, temperature=0.0))
    placer = Placer(PlacementConfig(), pool, seed=0)
    responses = list(flows.run_disaggregated(
        vr, placement, pool, 0.0, 10.0, 10.0, placer.place_decode if repick else None))
    assert all(pool.load(directory.get(w)).num_running == 0
               for w in ("decode-0", "decode-1")), "a request stayed counted"
    return responses, calls, running


def test_decode_worker_flipped_during_the_prefill_is_replaced():
    """decode-0 flips while prefill-0 computes: decode-1 pulls the same handle; the client
    gets every token; the usage names decode-1; no request is left counted on any worker."""
    responses, calls, running = run(flip_during_prefill=True, repick=True)
    assert calls == [("Prefill", "prefill-0", "r1"), ("Decode", "decode-1", b"handle-of-r1")]
    assert [t for r in responses for t in r.token_ids] == [7, 8, 9]
    assert responses[-1].usage.decode_worker == "decode-1"
    assert responses[-1].usage.prefill_worker == "prefill-0"
    assert running == {"decode-0": 0, "decode-1": 1}


def test_decode_worker_still_serving_is_kept():
    responses, calls, running = run(flip_during_prefill=False, repick=True)
    assert calls == [("Prefill", "prefill-0", "r1"), ("Decode", "decode-0", b"handle-of-r1")]
    assert responses[-1].usage.decode_worker == "decode-0"
    assert running == {"decode-0": 1, "decode-1": 0}


def test_without_repick_the_placement_stands():
    """The old behaviour (no re-pick): the Decode call goes to the flipped worker (which
    answers UNIMPLEMENTED in a real cluster, and the request migrates with a recompute)."""
    _, calls, _ = run(flip_during_prefill=True, repick=False)
    assert calls[1] == ("Decode", "decode-0", b"handle-of-r1")


def test_a_cancelled_request_releases_the_hold_its_prefill_made():
    """The client goes away after the first token: the router's cleanup Release quotes the
    hold id its own Prefill returned, so the prefill worker frees that hold only, never a
    later attempt's hold of the same request_id."""
    directory = FakeDirectory([make_info("prefill-0", P), make_info("decode-0", D)])
    pool, calls = WorkerPool(directory), []
    stubs = {w: FakeStub(w, calls) for w in ("prefill-0", "decode-0")}
    pool.stub = lambda info: stubs[info.worker_id]
    placement = Placement(directory.get("decode-0"), directory.get("prefill-0"), 0)
    vr = ValidatedRequest("r1", [1, 2, 3], SamplingParams(max_tokens=3, temperature=0.0))
    flow = flows.run_disaggregated(vr, placement, pool, 0.0, 10.0, 10.0)
    assert list(next(flow).token_ids) == [7]
    flow.close()
    assert calls == [("Prefill", "prefill-0", "r1"), ("Release", "prefill-0", "r1", 42)]
