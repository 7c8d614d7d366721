"""Fitted step-latency model of one worker, and the capacity it implies (pure numpy, no I/O).

Step latency (DESIGN "Planner"; the shape DistServe §4 and the Dynamo SLA planner profile):

    prefill step_ms = a + b·t + c·t²          t = prompt tokens scheduled in the step
    decode  step_ms = a + b·n + c·k           n = decode rows (batch), k = Σ their context tokens

Both are fitted by non-negative least squares over engine steps (``ForwardSample``). Capacity
helpers turn the model plus an SLO into requests/s one worker sustains, which the planner divides
into the forecast load (DistServe §4 "goodput"/placement; Dynamo SLA planner
``replicas = ceil(predicted_load / per_engine_capacity)``; Splitwise sizes its pools the same way).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from scission.cluster.planner.types import ForwardSample

MIN_FIT_SAMPLES = 8  # fewer steps of a phase than this: keep the prior's part
MAX_DECODE_BATCH = 1024  # cap on ``max_decode_batch`` when the model has no per-row cost
# p90 of an (approximately) exponential waiting time = ln(10) x its mean (Kingman's
# heavy-traffic approximation: the M/G/1 waiting time is close to exponential).
P90_TAIL_FACTOR = math.log(10.0)


@dataclass(frozen=True)
class PrefillModel:
    """``step_ms(t) = a_ms + b_ms_per_token·t + c_ms_per_token2·t²`` for one prefill step."""

    a_ms: float
    b_ms_per_token: float
    c_ms_per_token2: float

    def step_ms(self, num_tokens: float) -> float:
        """Latency in ms of one step that prefills ``num_tokens`` prompt tokens."""
        t = float(num_tokens)
        return self.a_ms + self.b_ms_per_token * t + self.c_ms_per_token2 * t * t


@dataclass(frozen=True)
class DecodeModel:
    """``step_ms(n, k) = a_ms + b_ms_per_request·n + c_ms_per_context_token·k`` for a decode
    step of ``n`` rows whose context lengths sum to ``k`` tokens (attention reads ∝ k)."""

    a_ms: float
    b_ms_per_request: float
    c_ms_per_context_token: float

    def step_ms(self, batch: float, context_tokens: float) -> float:
        """Latency in ms of one decode step of ``batch`` rows and ``context_tokens`` in total."""
        return (self.a_ms + self.b_ms_per_request * float(batch)
                + self.c_ms_per_context_token * float(context_tokens))


def _nnls(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Exact non-negative least squares for a few columns: ordinary least squares on every
    subset of columns (the others pinned to 0), keep the feasible subset with least residual.

    x: ``[num_samples, num_cols]`` float64; y: ``[num_samples]`` float64 → ``[num_cols]``.
    With 3 columns that is 8 small solves, and it needs no scipy.
    """
    num_cols = x.shape[1]
    best, best_residual = np.zeros(num_cols), float(np.sum(y * y))
    for size in range(1, num_cols + 1):
        for cols in itertools.combinations(range(num_cols), size):
            sub = x[:, cols]
            coef, *_ = np.linalg.lstsq(sub, y, rcond=None)
            if np.any(coef < 0.0):
                continue
            residual = float(np.sum((y - sub @ coef) ** 2))
            if residual < best_residual - 1e-12 * max(1.0, best_residual):
                best = np.zeros(num_cols)
                best[list(cols)] = coef
                best_residual = residual
    return best


def _fittable(x: np.ndarray) -> bool:
    """Enough steps, and the design matrix has full column rank (x not degenerate)."""
    if x.shape[0] < MIN_FIT_SAMPLES:
        return False
    scale = np.maximum(np.abs(x).max(axis=0), 1e-12)  # rank on unit-scaled columns
    return int(np.linalg.matrix_rank(x / scale)) == x.shape[1]


def _fit_prefill(samples: Sequence[ForwardSample]) -> tuple[PrefillModel | None, int]:
    """Prefill-only steps → (model or None when not fittable, number of steps)."""
    steps = [s for s in samples if s.num_prefill_tokens > 0 and s.num_decode_requests == 0]
    t = np.array([s.num_prefill_tokens for s in steps], dtype=np.float64)
    x = np.stack([np.ones_like(t), t, t * t], axis=1)  # x: [num_steps, 3]
    if not _fittable(x):
        return None, len(steps)
    a, b, c = _nnls(x, np.array([s.step_ms for s in steps], dtype=np.float64))
    return PrefillModel(float(a), float(b), float(c)), len(steps)


def _fit_decode(samples: Sequence[ForwardSample]) -> tuple[DecodeModel | None, int]:
    """Decode-only steps → (model or None when not fittable, number of steps)."""
    steps = [s for s in samples if s.num_prefill_tokens == 0 and s.num_decode_requests > 0]
    n = np.array([s.num_decode_requests for s in steps], dtype=np.float64)
    k = np.array([s.num_context_tokens for s in steps], dtype=np.float64)
    x = np.stack([np.ones_like(n), n, k], axis=1)  # x: [num_steps, 3]
    if not _fittable(x):
        return None, len(steps)
    a, b, c = _nnls(x, np.array([s.step_ms for s in steps], dtype=np.float64))
    return DecodeModel(float(a), float(b), float(c)), len(steps)


@dataclass(frozen=True)
class PerformanceModel:
    """Prefill and decode step models of one worker, and the capacity helpers built on them.

    ``num_samples``: engine steps the last fit used (0 = not fitted: a default or a prior).
    """

    prefill: PrefillModel
    decode: DecodeModel
    num_samples: int = 0

    # -- (de)serialisation -------------------------------------------------------------------

    def to_dict(self) -> dict[str, object]:
        """JSON-able form (bench results, the simulator's input)."""
        return {
            "prefill": {"a_ms": self.prefill.a_ms, "b_ms_per_token": self.prefill.b_ms_per_token,
                        "c_ms_per_token2": self.prefill.c_ms_per_token2},
            "decode": {"a_ms": self.decode.a_ms,
                       "b_ms_per_request": self.decode.b_ms_per_request,
                       "c_ms_per_context_token": self.decode.c_ms_per_context_token},
            "num_samples": self.num_samples,
        }

    @classmethod
    def from_dict(cls, d: dict) -> PerformanceModel:
        """Inverse of ``to_dict``; raises ``KeyError``/``TypeError`` on a malformed dict."""
        p, dec = d["prefill"], d["decode"]
        return cls(
            prefill=PrefillModel(float(p["a_ms"]), float(p["b_ms_per_token"]),
                                 float(p["c_ms_per_token2"])),
            decode=DecodeModel(float(dec["a_ms"]), float(dec["b_ms_per_request"]),
                               float(dec["c_ms_per_context_token"])),
            num_samples=int(d.get("num_samples", 0)),
        )

    # -- fitting -----------------------------------------------------------------------------

    @classmethod
    def fit(cls, samples: Sequence[ForwardSample],
            prior: PerformanceModel | None = None) -> PerformanceModel | None:
        """Least-squares fit, coefficients clamped ≥ 0 (exact NNLS over column subsets).

        Prefill-only steps (``num_decode_requests == 0``) fit ``PrefillModel``; decode-only
        steps (``num_prefill_tokens == 0``) fit ``DecodeModel``; mixed (colocated) steps are
        skipped. A phase with fewer than ``MIN_FIT_SAMPLES`` steps or a rank-deficient design
        (e.g. every step the same size) keeps the prior's part; with no prior, returns None.
        """
        prefill, num_prefill = _fit_prefill(samples)
        decode, num_decode = _fit_decode(samples)
        if prior is None:
            if prefill is None or decode is None:
                return None
            return cls(prefill=prefill, decode=decode, num_samples=num_prefill + num_decode)
        if prefill is None and decode is None:
            return prior
        return cls(prefill=prefill if prefill is not None else prior.prefill,
                   decode=decode if decode is not None else prior.decode,
                   num_samples=(num_prefill if prefill is not None else 0)
                   + (num_decode if decode is not None else 0))

    def blend(self, other: PerformanceModel, weight: float) -> PerformanceModel:
        """``(1 − weight)·self + weight·other``, coefficient by coefficient: every step time of
        the result lies between the two models' (the planner damps its online fit with it)."""
        def mix(a: float, b: float) -> float:
            return (1.0 - weight) * a + weight * b

        p, q, d, e = self.prefill, other.prefill, self.decode, other.decode
        return PerformanceModel(
            PrefillModel(mix(p.a_ms, q.a_ms), mix(p.b_ms_per_token, q.b_ms_per_token),
                         mix(p.c_ms_per_token2, q.c_ms_per_token2)),
            DecodeModel(mix(d.a_ms, e.a_ms), mix(d.b_ms_per_request, e.b_ms_per_request),
                        mix(d.c_ms_per_context_token, e.c_ms_per_context_token)),
            other.num_samples)

    # -- prefill capacity --------------------------------------------------------------------

    def prefill_ttft_ms(self, prompt_tokens: float, queue_tokens: float = 0.0) -> float:
        """TTFT in ms of a ``prompt_tokens`` prompt behind ``queue_tokens`` queued prompt tokens.

        The queue is served as prompts of the same size, one per step, so the time is the
        per-token cost of a prompt-sized step times all tokens ahead and of the prompt:
        ``step_ms(p) · (p + q) / p``.
        """
        p = max(float(prompt_tokens), 1.0)
        return self.prefill.step_ms(p) * (p + max(float(queue_tokens), 0.0)) / p

    def max_prefill_rps_per_worker(self, mean_prompt_tokens: float, ttft_slo_ms: float) -> float:
        """Requests/s one prefill worker sustains with TTFT p90 ≤ ``ttft_slo_ms``.

        The worker is an M/D/1 queue (Poisson arrivals, one prompt per step of
        ``D = step_ms(mean_prompt_tokens)``), as in DistServe §4.1. Pollaczek–Khinchine gives
        the mean wait ``W = ρ·D / (2(1 − ρ))`` at utilization ``ρ = λ·D``; the wait is close to
        exponential (Kingman), so its p90 is ``ln(10)·W``. Requiring ``D + ln(10)·W ≤ SLO`` with
        headroom ``H = (SLO − D) / D`` gives

            ρ_max = 2H / (ln(10) + 2H),        λ_max = ρ_max / D   (requests/s, D in s).

        0 when one prompt alone misses the SLO. Conservative: a real worker batches queued
        prompts into one step, which serves them faster than one by one.
        """
        d_ms = self.prefill.step_ms(max(float(mean_prompt_tokens), 1.0))
        if d_ms <= 0.0:
            return math.inf
        headroom = (float(ttft_slo_ms) - d_ms) / d_ms
        if headroom <= 0.0:
            return 0.0
        rho_max = 2.0 * headroom / (P90_TAIL_FACTOR + 2.0 * headroom)
        return rho_max / (d_ms / 1000.0)

    # -- decode capacity ---------------------------------------------------------------------

    def decode_tpot_ms(self, batch: float, mean_context_tokens: float) -> float:
        """TPOT in ms = one decode step of ``batch`` rows, each ``mean_context_tokens`` long."""
        return self.decode.step_ms(batch, float(batch) * float(mean_context_tokens))

    def max_decode_batch(self, mean_context_tokens: float, tpot_slo_ms: float,
                         max_batch: int = MAX_DECODE_BATCH) -> int:
        """Largest batch ``n ≤ max_batch`` with ``decode_tpot_ms(n, ctx) ≤ tpot_slo_ms``:
        ``n = floor((SLO − a) / (b + c·ctx))`` (0 when even an empty step misses the SLO)."""
        per_row_ms = (self.decode.b_ms_per_request
                      + self.decode.c_ms_per_context_token * float(mean_context_tokens))
        spare_ms = float(tpot_slo_ms) - self.decode.a_ms
        if spare_ms < 0.0:
            return 0
        if per_row_ms <= 0.0:
            return max_batch
        return min(max_batch, int(math.floor(spare_ms / per_row_ms + 1e-9)))

    def max_decode_rps_per_worker(self, mean_prompt_tokens: float, mean_output_tokens: float,
                                  tpot_slo_ms: float) -> float:
        """Requests/s one decode worker sustains with TPOT ≤ ``tpot_slo_ms`` (Little's law).

        A request's mean context while decoding is ``ctx = prompt + output / 2``; the batch is
        ``n = max_decode_batch(ctx, SLO)``, each request stays ``output · step_s`` seconds, so
        ``λ_max = n / (output · step_s)`` with ``step_s = decode_tpot_ms(n, ctx) / 1000``
        (Dynamo SLA planner's decode sizing; DistServe §4.2).
        """
        out = max(float(mean_output_tokens), 1.0)
        ctx = float(mean_prompt_tokens) + out / 2.0
        batch = self.max_decode_batch(ctx, tpot_slo_ms)
        if batch == 0:
            return 0.0
        step_s = self.decode_tpot_ms(batch, ctx) / 1000.0
        if step_s <= 0.0:
            return math.inf
        return batch / (out * step_s)


    # -- pooled sizing (the planner core's; ``sizing.py``) --------------------------------------

    def prefill_service_ms(self, mean_prompt_tokens: float, rms_prompt_tokens: float,
                           budget_tokens: int) -> float:
        """ms of a busy prefill worker's time per prompt: its steps are full (``budget_tokens``
        each, several prompts or a chunk of one), so a prompt of ``p`` tokens pays ``p / B`` of
        a step's fixed cost, ``b·p``, and ``c·p²`` (a chunk ``[s, e)`` costs ``c·(e² − s²)``)::

            S = a·E[p] / B + b·E[p] + c·E[p²]        E[p²] = rms_prompt_tokens²
        """
        p, rms = max(float(mean_prompt_tokens), 1.0), max(float(rms_prompt_tokens), 1.0)
        return (self.prefill.a_ms * p / budget_tokens + self.prefill.b_ms_per_token * p
                + self.prefill.c_ms_per_token2 * rms * rms)

    def prefill_alone_ms(self, prompt_tokens: float, budget_tokens: int) -> float:
        """ms to prefill one ``prompt_tokens`` prompt on an idle worker: ``ceil(p / B)`` steps,
        ``a·ceil(p / B) + b·p + c·p²`` (the shortest TTFT it can get)."""
        p = max(float(prompt_tokens), 1.0)
        return (self.prefill.a_ms * math.ceil(p / budget_tokens - 1e-9)
                + self.prefill.b_ms_per_token * p + self.prefill.c_ms_per_token2 * p * p)


def servers_for_wait(offered_load: float, service_s: float, wait_s: float, miss: float,
                     service_cv2: float, min_servers: int, max_servers: int = 100_000) -> int:
    """Fewest servers ``c ≥ min_servers`` of one queue (the router sends each prompt to the
    worker with the least queued work, close to one queue for the pool: M/G/c) with
    ``P(wait > wait_s) ≤ miss``. Erlang C's tail ``P(W > t) = C(c, a)·exp(−(cμ − λ)·t)``, its
    decay scaled by ``2 / (1 + cv²)`` (the Allen–Cunneen correction: an M/D/c queue waits half
    as long as M/M/c). ``offered_load = a = λ·service_s``; 0 when there is no load. Erlang C
    from the Erlang B recursion: ``B_c = a·B_{c−1} / (c + a·B_{c−1})``, ``C = B / (1 − ρ(1 − B))``.
    """
    if offered_load <= 0.0:
        return 0
    b, c = 1.0, 0
    while c < max_servers:
        c += 1
        b = offered_load * b / (c + offered_load * b)
        if c < min_servers or offered_load >= c:
            continue
        waits = b / (1.0 - offered_load / c * (1.0 - b))
        decay_per_s = 2.0 * (c - offered_load) / service_s / (1.0 + service_cv2)
        if waits * math.exp(-decay_per_s * wait_s) <= miss:
            return c
    return max_servers


# SmolLM2-135M, float32, 1 CPU core (placeholder; to be replaced by a fit on the bench machine).
DEFAULT_MODEL = PerformanceModel(
    prefill=PrefillModel(a_ms=5.0, b_ms_per_token=1.2, c_ms_per_token2=0.0),
    decode=DecodeModel(a_ms=25.0, b_ms_per_request=1.5, c_ms_per_context_token=0.002),
)
