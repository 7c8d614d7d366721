"""Windowed SLO aggregates of the requests one router served (pure: no I/O, injectable clocks).

Each finished request becomes a ``RequestRecord`` (``router/server.py`` builds it where the
request's ``_Outcome`` is recorded); ``SloTracker`` keeps the records of the last
``window_s`` seconds per *scope* and turns them into ``registry.metrics.SloWindow`` records
(published to etcd by ``registry/slo_publisher.py``, exported by ``router/metrics.py``).

Scopes and attribution (DistServe: prefill is judged by TTFT, decode by TPOT):

=================  ====================================  =================================
scope              TTFT, queue, prompt-length stats       TPOT, ITL, output-length stats
=================  ====================================  =================================
``"cluster"``      every finished request                 every finished request
a role (pool)      requests whose prefill ran there       requests whose decode ran there
=================  ====================================  =================================

A request counts in a pool scope's ``num_finished``, ``num_failed``, E2E p90, attainment
(both) and goodput when it touched the pool in either phase, and in its ``num_arrivals``
when it was placed there (arrivals are counted at the first placement, with the receipt
time; requests rejected as invalid never count). Definitions (``registry/metrics.py``):
TTFT = receipt -> first token sent; TPOT = (E2E - TTFT) / (output_tokens - 1); ITL = the
request's mean gap between tokens = (last token - first token) / (output_tokens - 1);
queue = receipt -> placed on a worker. A request *attains* TTFT when it finished ``ok``
with TTFT <= ``slo_ttft_ms``, TPOT when it finished ``ok`` with TPOT <= ``slo_tpot_ms``
(or one output token); a request that failed or was cancelled attains nothing.
Attainments are fractions of the requests finished in the window (1.0 when none);
percentiles are nearest-rank (``sorted(v)[ceil(q * n) - 1]``, 0.0 when empty); rates are per
second of the window, or of the tracker's age while that is shorter (but at least
``min(1 s, window_s)``), and ``SloWindow.window_s`` is that span.

Load shape (for the planner: the window above describes requests when they *finish*, i.e. the
load of up to a minute ago). Over the last ``shape_window_s`` (default ``min(20 s, window_s)``;
its span floors like the window's): the arrivals (rate, and the mean and root-mean-square prompt
length and mean requested ``max_tokens`` of those that carried them), and the mean output length
of the ``ok`` requests that finished (decode here), which is known only at the end.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from scission.registry.metrics import SCOPE_CLUSTER, SloWindow
from scission.registry.workers import WorkerRole

MIN_SPAN_S = 1.0  # rates of a just-started tracker are over at least this long
SHAPE_WINDOW_S = 20.0  # default load-shape window (capped at window_s)


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One finished request as the router measured it (milliseconds on its monotonic clock)."""

    status: str  # "ok", "cancelled" or a lower-case gRPC code name
    num_prompt_tokens: int
    num_output_tokens: int
    e2e_ms: float  # receipt -> finished
    queue_ms: float | None = None  # receipt -> placed; None = never placed
    ttft_ms: float | None = None  # None = no token sent
    tpot_ms: float | None = None  # None = fewer than 2 output tokens
    itl_ms: float | None = None  # mean inter-token gap; None = fewer than 2 output tokens
    prefill_worker: str = ""
    prefill_role: WorkerRole | None = None
    decode_worker: str = ""
    decode_role: WorkerRole | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def attains(self, slo_ttft_ms: float, slo_tpot_ms: float) -> tuple[bool, bool]:
        """(TTFT met, TPOT met), as defined in the module docstring."""
        ttft_ok = self.ok and self.ttft_ms is not None and self.ttft_ms <= slo_ttft_ms
        tpot_ok = self.ok and (self.tpot_ms is None or self.tpot_ms <= slo_tpot_ms)
        return ttft_ok, tpot_ok

    @property
    def roles(self) -> set[WorkerRole]:
        return {r for r in (self.prefill_role, self.decode_role) if r is not None}


@dataclass(frozen=True, slots=True)
class _Entry:
    """A finished request as one scope sees it."""

    at_s: float
    record: RequestRecord
    prefill_here: bool  # counts in this scope's TTFT / queue / prompt stats
    decode_here: bool  # counts in this scope's TPOT / ITL / output stats
    ttft_ok: bool
    tpot_ok: bool


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``0 < q <= 1``) of ``values``; 0.0 when empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(math.ceil(q * len(ordered)) - 1, 0)]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _fraction(flags: list[bool]) -> float:
    return sum(flags) / len(flags) if flags else 1.0


@dataclass(frozen=True, slots=True)
class _Arrival:
    at_s: float
    num_prompt_tokens: int  # 0 = not known
    max_tokens: int  # 0 = not requested


@dataclass(frozen=True, slots=True)
class _Shape:
    """A scope's load shape over the shape window (``SloWindow``'s shape fields)."""

    num_arrivals: int
    mean_prompt_tokens: float
    rms_prompt_tokens: float
    mean_max_tokens: float
    num_finished: int
    mean_output_tokens: float

    @classmethod
    def of(cls, arrivals: list[_Arrival], finished: list[_Entry]) -> _Shape:
        prompts = [a.num_prompt_tokens for a in arrivals if a.num_prompt_tokens > 0]
        outputs = [e.record.num_output_tokens for e in finished if e.decode_here and e.record.ok]
        return cls(len(arrivals), _mean(prompts), math.sqrt(_mean([p * p for p in prompts])),
                   _mean([a.max_tokens for a in arrivals if a.max_tokens > 0]), len(outputs),
                   _mean(outputs))


class SloTracker:
    """Records arrivals and finished requests; ``windows()`` aggregates the last ``window_s``.

    Thread-safe (gRPC handler threads record, the publisher and ``/metrics`` read). Work per
    request is O(number of scopes); ``windows()`` is O(n log n) in the requests of the window.
    """

    def __init__(self, slo_ttft_ms: float, slo_tpot_ms: float, window_s: float,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time,
                 shape_window_s: float | None = None) -> None:
        if min(slo_ttft_ms, slo_tpot_ms, window_s) <= 0:
            raise ValueError("SLOs and window_s must be > 0")
        shape_window_s = min(SHAPE_WINDOW_S, window_s) if shape_window_s is None \
            else shape_window_s
        if not 0 < shape_window_s <= window_s:
            raise ValueError(f"shape_window_s {shape_window_s} not in (0, window_s]")
        self.slo_ttft_ms = slo_ttft_ms
        self.slo_tpot_ms = slo_tpot_ms
        self.window_s = window_s
        self.shape_window_s = shape_window_s
        self._clock = clock
        self._wall_clock = wall_clock
        self._started_s = clock()
        self._lock = threading.Lock()
        self._arrivals: dict[str, deque[_Arrival]] = {SCOPE_CLUSTER: deque()}
        self._finished: dict[str, deque[_Entry]] = {SCOPE_CLUSTER: deque()}

    def arrive(self, at_s: float, roles: Iterable[WorkerRole] = (), num_prompt_tokens: int = 0,
               max_tokens: int = 0) -> None:
        """A request received at ``at_s`` (this tracker's clock) and placed on ``roles``, with
        its prompt length and requested ``max_tokens`` when known (0 = not known)."""
        arrival = _Arrival(at_s, num_prompt_tokens, max_tokens)
        with self._lock:
            for scope in (SCOPE_CLUSTER, *sorted({r.value for r in roles})):
                self._arrivals.setdefault(scope, deque()).append(arrival)
                self._finished.setdefault(scope, deque())

    def finish(self, record: RequestRecord) -> tuple[bool, bool]:
        """A request finished now; returns whether it met (TTFT, TPOT)."""
        now = self._clock()
        ttft_ok, tpot_ok = record.attains(self.slo_ttft_ms, self.slo_tpot_ms)
        with self._lock:
            self._finished[SCOPE_CLUSTER].append(_Entry(now, record, True, True, ttft_ok,
                                                        tpot_ok))
            for role in sorted(record.roles, key=lambda r: r.value):
                entry = _Entry(now, record, record.prefill_role is role,
                               record.decode_role is role, ttft_ok, tpot_ok)
                self._finished.setdefault(role.value, deque()).append(entry)
                self._arrivals.setdefault(role.value, deque())
            self._expire(now)
        return ttft_ok, tpot_ok

    def windows(self, router_id: str) -> list[SloWindow]:
        """One ``SloWindow`` per scope seen so far (cluster, then by name), as of now."""
        now, wall = self._clock(), self._wall_clock()
        span_s, shape_span_s = (min(max(now - self._started_s, min(MIN_SPAN_S, w)), w)
                                for w in (self.window_s, self.shape_window_s))
        recent_s = now - self.shape_window_s
        with self._lock:
            self._expire(now)
            snapshot = {scope: (len(self._arrivals[scope]), list(entries),
                                [a for a in self._arrivals[scope] if a.at_s > recent_s])
                        for scope, entries in self._finished.items()}
        order = sorted(snapshot, key=lambda scope: (scope != SCOPE_CLUSTER, scope))
        out = []
        for scope in order:
            num_arrivals, entries, recent = snapshot[scope]
            shape = _Shape.of(recent, [e for e in entries if e.at_s > recent_s])
            out.append(self._aggregate(router_id, scope, num_arrivals, entries, span_s, wall,
                                       shape, shape_span_s))
        return out

    def _expire(self, now: float) -> None:
        """Drop what is ``window_s`` or older. Lock held."""
        horizon = now - self.window_s
        for arrivals in self._arrivals.values():
            while arrivals and arrivals[0].at_s <= horizon:
                arrivals.popleft()
        for entries in self._finished.values():
            while entries and entries[0].at_s <= horizon:
                entries.popleft()

    def _aggregate(self, router_id: str, scope: str, num_arrivals: int, entries: list[_Entry],
                   span_s: float, wall_s: float, shape: _Shape,
                   shape_span_s: float) -> SloWindow:
        pre = [e for e in entries if e.prefill_here]
        dec = [e for e in entries if e.decode_here]

        def values(group: list[_Entry], name: str) -> list[float]:
            got = (getattr(e.record, name) for e in group)
            return [v for v in got if v is not None]

        ttft, tpot = values(pre, "ttft_ms"), values(dec, "tpot_ms")
        num_attained = sum(e.ttft_ok and e.tpot_ok for e in entries)
        return SloWindow(
            router_id=router_id, scope=scope, window_s=span_s, updated_at_s=wall_s,
            slo_ttft_ms=self.slo_ttft_ms, slo_tpot_ms=self.slo_tpot_ms,
            num_arrivals=num_arrivals, num_finished=len(entries),
            num_failed=sum(e.record.status not in ("ok", "cancelled") for e in entries),
            arrival_rps=num_arrivals / span_s,
            mean_prompt_tokens=_mean([e.record.num_prompt_tokens for e in pre]),
            mean_output_tokens=_mean([e.record.num_output_tokens for e in dec]),
            queue_p90_ms=percentile(values(pre, "queue_ms"), 0.9),
            ttft_p50_ms=percentile(ttft, 0.5), ttft_p90_ms=percentile(ttft, 0.9),
            tpot_p50_ms=percentile(tpot, 0.5), tpot_p90_ms=percentile(tpot, 0.9),
            itl_p90_ms=percentile(values(dec, "itl_ms"), 0.9),
            e2e_p90_ms=percentile([e.record.e2e_ms for e in entries], 0.9),
            ttft_attainment=_fraction([e.ttft_ok for e in pre]),
            tpot_attainment=_fraction([e.tpot_ok for e in dec]),
            attainment=_fraction([e.ttft_ok and e.tpot_ok for e in entries]),
            goodput_rps=num_attained / span_s,
            shape_window_s=shape_span_s, num_recent_arrivals=shape.num_arrivals,
            recent_arrival_rps=shape.num_arrivals / shape_span_s,
            arrival_mean_prompt_tokens=shape.mean_prompt_tokens,
            arrival_rms_prompt_tokens=shape.rms_prompt_tokens,
            arrival_mean_max_tokens=shape.mean_max_tokens,
            num_recent_finished=shape.num_finished,
            recent_mean_output_tokens=shape.mean_output_tokens,
        )
