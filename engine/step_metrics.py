"""Forward-pass metrics: one ``StepSample`` per engine step, kept in a bounded ring.

``LLMEngine.step`` records each non-empty step (one O(batch) pass over the scheduled rows,
like the step's own update pass, plus one append under a lock); readers on other threads
(the worker's stats publisher, its ``/metrics`` endpoint) each keep a cursor and take the
samples recorded since (``StepRecorder.since``). Row kinds, as the scheduler scheduled them:

- a *decode row* computes one token of a request whose prompt is already computed
  (``num_scheduled_tokens == 1`` and ``num_computed_tokens >= num_prompt_tokens``); its
  context length is ``num_computed_tokens + 1`` (the tokens it attends over);
- every other row is prefill work (a prompt chunk, or a recompute after preemption or
  migration): its scheduled tokens count as prefill tokens.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from scission.engine.scheduler import SchedulerOutput

DEFAULT_RING_STEPS = 4096


class StepShape(NamedTuple):
    """What one step computes (from its ``SchedulerOutput``, before the step runs)."""

    num_prefill_tokens: int
    num_decode_requests: int  # decode rows = batch size in decode tokens
    num_context_tokens: int  # sum of the decode rows' context lengths

    @classmethod
    def of(cls, sched: SchedulerOutput) -> StepShape:
        num_prefill = num_decode = num_context = 0
        for req, n in sched.scheduled:
            if n == 1 and req.num_computed_tokens >= req.num_prompt_tokens:
                num_decode += 1
                num_context += req.num_computed_tokens + 1
            else:
                num_prefill += n
        return cls(num_prefill, num_decode, num_context)


class StepSample(NamedTuple):
    """One engine step. ``as_row()`` is the ``WorkerStatsRecord.steps`` entry."""

    end_wall_s: float  # time.time() when the step ended
    num_prefill_tokens: int
    num_decode_requests: int
    num_context_tokens: int
    step_ms: float  # schedule + execute + update
    num_running: int = 0  # after the step
    num_waiting: int = 0  # after the step (queue depth)
    kv_usage: float = 0.0  # used / total KV blocks after the step

    def as_row(self) -> list[float]:
        return [self.end_wall_s, float(self.num_prefill_tokens),
                float(self.num_decode_requests), float(self.num_context_tokens), self.step_ms]


class StepTotals(NamedTuple):
    """Cumulative since the engine started (empty steps are not steps)."""

    num_steps: int
    step_ms: float
    num_prefill_tokens: int
    num_decode_tokens: int


class StepRecorder:
    """The engine thread ``record``s; any thread reads. The ring keeps the newest
    ``ring_steps`` samples; a reader that falls further behind loses the oldest."""

    def __init__(self, ring_steps: int = DEFAULT_RING_STEPS) -> None:
        assert ring_steps > 0, "ring_steps must be > 0"
        self._lock = threading.Lock()
        self._ring: deque[StepSample] = deque(maxlen=ring_steps)
        self._totals = StepTotals(0, 0.0, 0, 0)

    def record(self, shape: StepShape, step_ms: float, num_running: int = 0,
               num_waiting: int = 0, kv_usage: float = 0.0,
               end_wall_s: float | None = None) -> None:
        sample = StepSample(time.time() if end_wall_s is None else end_wall_s, *shape, step_ms,
                            num_running, num_waiting, kv_usage)
        with self._lock:
            t = self._totals
            self._totals = StepTotals(t.num_steps + 1, t.step_ms + step_ms,
                                      t.num_prefill_tokens + shape.num_prefill_tokens,
                                      t.num_decode_tokens + shape.num_decode_requests)
            self._ring.append(sample)

    @property
    def totals(self) -> StepTotals:
        return self._totals

    @property
    def last(self) -> StepSample | None:
        with self._lock:
            return self._ring[-1] if self._ring else None

    def since(self, cursor: int) -> tuple[list[StepSample], int]:
        """The samples after step number ``cursor`` (0 = from the start) still in the ring,
        oldest first, and the cursor to pass next time."""
        with self._lock:
            num_steps = self._totals.num_steps
            num_new = min(num_steps - cursor, len(self._ring))
            new = list(itertools.islice(self._ring, len(self._ring) - num_new, None)) \
                if num_new > 0 else []
        return new, num_steps
