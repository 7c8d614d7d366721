"""Token sampling: greedy, temperature, top-k, top-p, with per-request reproducible seeds.

Order of operations (as HF ``generate`` and vLLM): temperature scaling, top-k, top-p on the
top-k-renormalized distribution, then one draw. Top-p is nucleus sampling (Holtzman et al.
2020, "The Curious Case of Neural Text Degeneration", ICLR): keep the smallest set of tokens
whose probability mass is >= ``top_p``. The sorted-mask implementation follows vLLM's
``apply_top_k_top_p`` (``vllm/v1/sample/ops/topk_topp_sampler.py``).

The draw is an exponential race, ``argmax(probs / E)`` with ``E ~ Exp(1)`` i.i.d. per token,
which picks token ``v`` with probability ``probs[v]`` (the Gumbel-max trick in another form:
``-log E`` is Gumbel). It needs one noise row per request, so a request with a seed gets its
own noise from a generator seeded with ``splitmix64``-mixed ``(seed, output_position)`` and its
tokens do not depend on batch composition, batch order, worker or preemption. Requests without
a seed share torch's process-global default generator of the logits' device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from scission.engine.request import SamplingParams

_MASK64 = (1 << 64) - 1
# Below this a temperature only overflows float32 (logits / T); as in vLLM's _SAMPLING_EPS.
MIN_TEMPERATURE = 1e-5


def splitmix64(x: int) -> int:
    """One step of SplitMix64 (Steele, Lea, Flood 2014; Vigna's reference ``splitmix64.c``)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def position_seed(seed: int, output_position: int) -> int:
    """Generator seed for output token ``output_position`` of a request seeded with ``seed``.

    Stable across processes and Python versions (no ``hash()``); in ``[0, 2^63)``.
    """
    return splitmix64(splitmix64(seed) ^ output_position) >> 1


class Sampler:
    """Samples one token per request row from final-position logits.

    Stateless apart from a cached ``torch.Generator`` per device that is re-seeded for every
    seeded row, so two ``Sampler`` instances give identical tokens for seeded requests.
    """

    def __init__(self) -> None:
        self._generators: dict[torch.device, torch.Generator] = {}

    def sample(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        output_positions: Sequence[int],
    ) -> torch.Tensor:
        """Sample the next token of each request.

        Args:
            logits: shape ``[num_reqs, vocab_size]``, float32 (half types are upcast), any
                device; not modified.
            params: ``num_reqs`` sampling params, row-aligned with ``logits``.
            output_positions: ``num_reqs`` ints; index of the output token being sampled for
                each request (0 for the first token after the prompt).

        Returns:
            shape ``[num_reqs]``, int64, on ``logits.device``: the sampled token ids.
        """
        num_reqs = logits.shape[0]
        assert logits.dim() == 2 and logits.is_floating_point(), (logits.shape, logits.dtype)
        logits = logits.float()  # no-op for float32
        assert len(params) == num_reqs == len(output_positions), (
            num_reqs, len(params), len(output_positions),
        )  # fmt: skip
        greedy = [p.greedy for p in params]
        if all(greedy):  # fast path: no softmax, no sort
            return logits.argmax(dim=-1)
        probs = self._probs(logits, params)  # [num_reqs, vocab]
        noise = self._exponential_noise(probs, params, output_positions)  # [num_reqs, vocab]
        sampled = probs.div_(noise).argmax(dim=-1)  # [num_reqs]
        if any(greedy):
            greedy_mask = torch.tensor(greedy, dtype=torch.bool).to(
                logits.device, non_blocking=True
            )
            sampled = torch.where(greedy_mask, logits.argmax(dim=-1), sampled)
        return sampled

    def _probs(self, logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
        """Temperature-scaled, top-k/top-p-filtered probabilities.

        Args:
            logits: shape ``[num_reqs, vocab_size]``, float32 (not modified).
        Returns:
            shape ``[num_reqs, vocab_size]``, float32; rows sum to 1; greedy rows are unscaled.
        """
        device = logits.device
        # greedy rows get temperature 1 here; their sample is replaced by argmax afterwards
        temperatures = [
            max(p.temperature, MIN_TEMPERATURE) if not p.greedy else 1.0 for p in params
        ]
        temperature = torch.tensor(temperatures, dtype=torch.float32).to(device, non_blocking=True)
        logits = logits / temperature.unsqueeze(1)  # [num_reqs, vocab]
        vocab_size = logits.shape[1]
        top_ks = [p.top_k if 0 < p.top_k < vocab_size else 0 for p in params]
        top_ps = [p.top_p for p in params]
        if any(top_ks) or any(top_p < 1.0 for top_p in top_ps):
            top_k = torch.tensor([k or vocab_size for k in top_ks], dtype=torch.int64)
            top_p = torch.tensor(top_ps, dtype=torch.float32)
            logits = apply_top_k_top_p(
                logits, top_k.to(device, non_blocking=True), top_p.to(device, non_blocking=True)
            )
        return logits.softmax(dim=-1)

    def _exponential_noise(
        self,
        probs: torch.Tensor,
        params: Sequence[SamplingParams],
        output_positions: Sequence[int],
    ) -> torch.Tensor:
        """``Exp(1)`` noise, shape ``[num_reqs, vocab_size]``, float32, on ``probs.device``.

        Seeded rows use a generator seeded with ``position_seed(seed, output_position)``;
        the other rows use torch's default generator. Clamped away from 0 so that a
        filtered token (probability 0) can never win the race through ``0 / 0``.
        """
        noise = torch.empty_like(probs)
        if any(p.seed is None for p in params):
            noise.exponential_()  # default generator; seeded rows are overwritten below
        generator = None
        for row, (p, position) in enumerate(zip(params, output_positions, strict=True)):
            if p.seed is None:
                continue
            if generator is None:
                generator = self._generator(probs.device)
            generator.manual_seed(position_seed(p.seed, position))
            noise[row].exponential_(generator=generator)
        return noise.clamp_(min=torch.finfo(noise.dtype).tiny)

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device)
        return self._generators[device]


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Set logits outside each row's top-k and then its nucleus (top-p) to ``-inf``.

    Top-k keeps every token tied with the k-th largest logit. Top-p keeps the smallest set of
    most likely tokens whose mass is >= ``top_p`` (Holtzman et al. 2020), and always at least
    the most likely token.

    Args:
        logits: shape ``[num_reqs, vocab_size]``, float32.
        top_k: shape ``[num_reqs]``, int64, in ``[1, vocab_size]`` (``vocab_size`` = off).
        top_p: shape ``[num_reqs]``, float32, in ``(0, 1]`` (1 = off).

    Returns:
        shape ``[num_reqs, vocab_size]``, float32: a new tensor.
    """
    logits_sort, logits_idx = logits.sort(dim=-1, descending=False)  # ascending
    # -- top-k: drop everything below the k-th largest value --
    kth_index = (logits_sort.shape[1] - top_k).unsqueeze(1)  # [num_reqs, 1]
    kth_value = logits_sort.gather(1, kth_index)  # [num_reqs, 1]
    logits_sort.masked_fill_(logits_sort < kth_value, float("-inf"))
    # -- top-p: drop the longest low-probability run whose mass is <= 1 - top_p --
    probs_sort = logits_sort.softmax(dim=-1)
    probs_sum = probs_sort.cumsum(dim=-1)  # ascending cumulative mass
    top_p_mask = probs_sum <= (1.0 - top_p).unsqueeze(1)
    top_p_mask[:, -1] = False  # the most likely token always survives
    logits_sort.masked_fill_(top_p_mask, float("-inf"))
    return torch.empty_like(logits).scatter_(1, logits_idx, logits_sort)
