"""Load forecasters: hand-computed forecasts."""

from __future__ import annotations

import pytest

from scission.cluster.planner.predictor import (
    ConstantPredictor,
    HoltPredictor,
    PredictorKind,
    make_predictor,
)


def test_constant_predictor_returns_last_value():
    """The forecast is the last observation, 0.0 before any."""
    p = ConstantPredictor()
    assert p.predict() == 0.0
    for value in (3.0, 7.5, 2.0):
        p.observe(value)
    assert p.predict() == 2.0


def test_holt_predictor_follows_trend():
    """α = β = 0.5 on 10, 20, 30:
    ℓ=10, b=0 → 10;  ℓ=0.5·20+0.5·10=15, b=0.5·5=2.5 → 17.5;
    ℓ=0.5·30+0.5·17.5=23.75, b=0.5·8.75+0.5·2.5=5.625 → 29.375."""
    p = HoltPredictor(alpha=0.5, beta=0.5)
    assert p.predict() == 0.0
    expected = [10.0, 17.5, 29.375]
    for value, forecast in zip((10.0, 20.0, 30.0), expected, strict=True):
        p.observe(value)
        assert p.predict() == pytest.approx(forecast)


def test_holt_predictor_clamps_at_zero():
    """α = β = 0.5 on 10, 0, 0: ℓ=5, b=−2.5 → 2.5; ℓ=1.25, b=−3.125 → −1.875, clamped to 0."""
    p = HoltPredictor(alpha=0.5, beta=0.5)
    p.observe(10.0)
    p.observe(0.0)
    assert p.predict() == pytest.approx(2.5)
    p.observe(0.0)
    assert p.predict() == 0.0


def test_holt_predictor_is_exact_on_constant_load():
    """A constant series is forecast exactly (trend stays 0): no drift over 1,000 ticks."""
    p = HoltPredictor()
    for _ in range(1000):
        p.observe(3.7)
    assert p.predict() == pytest.approx(3.7, abs=1e-12)


def test_make_predictor_kinds():
    """Each kind builds its class."""
    assert isinstance(make_predictor(PredictorKind.CONSTANT), ConstantPredictor)
    assert isinstance(make_predictor(PredictorKind.HOLT), HoltPredictor)
