"""Sizing the encode pool from its queue (a load-based rule, as Dynamo's load planner).

The encode pool's cost is not in the TTFT/TPOT model the core fits (an image's encode time
depends on its tiles, not its tokens), so the planner sizes it from what the encoders
report: ``num_encode_waiting`` (images queued or in the running batch), sampled once per
tick. Over the last ``window_ticks`` ticks, with ``q`` = mean queued images per encode
worker::

    q >= high_queue_per_worker            -> target + 1   (budget and cooldown permitting)
    q <= low_queue_per_worker, target > 1 -> target - 1   (all window_ticks samples low)

The planner only resizes a pool the operator created (target >= 1: ``scission up --encode
N`` or ``pools scale encode``) and never removes its last worker; an operator's hold and the
cooldown after each change apply. Without an encode pool, images are encoded by the worker
that runs the prompt (EP-D), whose load the core already sees.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class EncodeSizingConfig:
    high_queue_per_worker: float = 4.0  # images waiting per encode worker: add one
    low_queue_per_worker: float = 0.25  # below this on every sample of the window: remove one
    window_ticks: int = 3
    cooldown_s: float = 30.0  # after a change, before the next

    def __post_init__(self) -> None:
        if not 0 <= self.low_queue_per_worker < self.high_queue_per_worker:
            raise ValueError("need 0 <= low_queue_per_worker < high_queue_per_worker")
        if self.window_ticks < 1 or self.cooldown_s < 0:
            raise ValueError("window_ticks >= 1 and cooldown_s >= 0 required")


@dataclass(frozen=True)
class EncodeDecision:
    target: int  # the new encode target
    reason: str


class EncodeSizer:
    """Keeps the window of queue samples; ``on_tick`` once per planner tick."""

    def __init__(self, config: EncodeSizingConfig | None = None) -> None:
        self.config = config or EncodeSizingConfig()
        self._samples: deque[float] = deque(maxlen=self.config.window_ticks)
        self._last_change_s = float("-inf")

    def on_tick(self, now_s: float, target: int, queued: list[int], budget_left: int,
                held: bool) -> EncodeDecision | None:
        """A new encode target, or None to keep it.

        Args:
            target: the encode pool's target now (0 = no pool: nothing to size).
            queued: ``num_encode_waiting`` of each serving encode worker.
            budget_left: workers the budget still allows (``max_workers - sum(targets)``).
            held: an operator's hold is in force.
        """
        if target < 1 or not queued:
            self._samples.clear()
            return None
        self._samples.append(sum(queued) / len(queued))
        c = self.config
        if held or len(self._samples) < c.window_ticks or \
                now_s - self._last_change_s < c.cooldown_s:
            return None
        mean = sum(self._samples) / len(self._samples)
        if mean >= c.high_queue_per_worker and budget_left > 0:
            return self._change(now_s, target + 1, f"encode queue {mean:.1f} images/worker >= "
                                f"{c.high_queue_per_worker:g} over {c.window_ticks} ticks")
        if target > 1 and max(self._samples) <= c.low_queue_per_worker:
            return self._change(now_s, target - 1, f"encode queue <= "
                                f"{c.low_queue_per_worker:g} images/worker over "
                                f"{c.window_ticks} ticks")
        return None

    def _change(self, now_s: float, target: int, reason: str) -> EncodeDecision:
        self._last_change_s = now_s
        self._samples.clear()
        return EncodeDecision(target, reason)
