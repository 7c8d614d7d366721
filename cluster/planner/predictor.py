"""Load forecasters for the planner's predictive loop: one observation per tick, one forecast
of the next tick's value (arrival requests/s). The Dynamo SLA planner has the same interface
(``load_predictor.py``: constant, ARIMA, Prophet, Kalman); these two need only the stdlib.
"""

from __future__ import annotations

import enum


class PredictorKind(enum.Enum):
    CONSTANT = "constant"  # next = last observation
    HOLT = "holt"  # double exponential smoothing (level + trend)


class ConstantPredictor:
    """Forecast = the last observed value (0.0 before any observation)."""

    def __init__(self) -> None:
        self._last = 0.0

    def observe(self, value: float) -> None:
        """Record one observation (e.g. arrival requests/s over the last window)."""
        self._last = float(value)

    def predict(self) -> float:
        """The forecast for the next interval, in the observations' unit."""
        return self._last


class HoltPredictor:
    """Holt's linear-trend method (double exponential smoothing), clamped at 0.

    Source: C. C. Holt, "Forecasting seasonals and trends by exponentially weighted moving
    averages" (1957); notation of Hyndman & Athanasopoulos, *Forecasting: Principles and
    Practice*, §8.2 (level ``ℓ``, trend ``b``)::

        ℓ_t = α·y_t + (1 − α)·(ℓ_{t−1} + b_{t−1})
        b_t = β·(ℓ_t − ℓ_{t−1}) + (1 − β)·b_{t−1}
        ŷ_{t+h} = ℓ_t + h·b_t

    The first observation initialises ``ℓ = y``, ``b = 0``. A load cannot be negative, so the
    forecast is ``max(0, ŷ)``. ``horizon_steps`` = h, in ticks.
    """

    def __init__(self, alpha: float = 0.5, beta: float = 0.2, horizon_steps: int = 1) -> None:
        assert 0.0 < alpha <= 1.0, f"alpha {alpha} not in (0, 1]"
        assert 0.0 <= beta <= 1.0, f"beta {beta} not in [0, 1]"
        assert horizon_steps >= 0, f"horizon_steps {horizon_steps} < 0"
        self.alpha, self.beta, self.horizon_steps = alpha, beta, horizon_steps
        self._level: float | None = None
        self._trend = 0.0

    def observe(self, value: float) -> None:
        """Update level and trend with one observation."""
        y = float(value)
        if self._level is None:
            self._level = y
            return
        prev_level = self._level
        self._level = self.alpha * y + (1.0 - self.alpha) * (prev_level + self._trend)
        self._trend = self.beta * (self._level - prev_level) + (1.0 - self.beta) * self._trend

    def predict(self) -> float:
        """``max(0, ℓ + h·b)``; 0.0 before any observation."""
        if self._level is None:
            return 0.0
        return max(0.0, self._level + self.horizon_steps * self._trend)


Predictor = ConstantPredictor | HoltPredictor


def make_predictor(kind: PredictorKind) -> Predictor:
    """A fresh forecaster of ``kind`` with default parameters."""
    match kind:
        case PredictorKind.CONSTANT:
            return ConstantPredictor()
        case PredictorKind.HOLT:
            return HoltPredictor()
    raise ValueError(f"unknown predictor kind {kind!r}")
