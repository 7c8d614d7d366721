"""Tests for scission.engine.sampler (CPU)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch

from scission.engine.request import SamplingParams
from scission.engine.sampler import Sampler, apply_top_k_top_p, position_seed, splitmix64

GREEDY = SamplingParams(temperature=0.0)
CHI2_4DF_P999 = 18.467  # chi-square critical value, 4 degrees of freedom, p = 0.001


@pytest.fixture
def torch_rng() -> Iterator[None]:
    """Seed torch's global generator for the test and restore its state afterwards."""
    state = torch.get_rng_state()
    torch.manual_seed(0)
    yield
    torch.set_rng_state(state)


def make_logits(num_reqs: int, vocab_size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_reqs, vocab_size, generator=g) * 3.0


def sample_rows(
    sampler: Sampler, logits: torch.Tensor, params: list[SamplingParams], positions: list[int]
) -> list[int]:
    return sampler.sample(logits, params, positions).tolist()


def test_splitmix64_reference_values() -> None:
    """splitmix64 matches Vigna's reference sequence for state 0; position_seed is 63-bit."""
    assert splitmix64(0) == 0xE220A8397B1DCDAF
    assert splitmix64(0x9E3779B97F4A7C15) == 0x6E789E6AA1B965F4
    seeds = {position_seed(s, i) for s in range(20) for i in range(50)}
    assert len(seeds) == 1000 and all(0 <= s < 2**63 for s in seeds)


def test_greedy_is_argmax() -> None:
    """All-greedy batches return exactly argmax, int64, and leave the logits untouched."""
    logits = make_logits(16, 5000)
    before = logits.clone()
    out = Sampler().sample(logits, [GREEDY] * 16, [0] * 16)
    assert out.dtype == torch.int64 and out.shape == (16,)
    assert torch.equal(out, logits.argmax(dim=-1))
    assert torch.equal(logits, before)


def test_greedy_rows_in_mixed_batch_are_argmax(torch_rng: None) -> None:
    """Greedy rows are argmax even when batched with sampled and filtered rows."""
    logits = make_logits(6, 5000)
    params = [GREEDY, SamplingParams(top_p=0.5), GREEDY, SamplingParams(seed=3, top_k=5)]
    params += [GREEDY, SamplingParams(temperature=2.0)]
    out = sample_rows(Sampler(), logits, params, list(range(6)))
    argmax = logits.argmax(dim=-1).tolist()
    assert [out[i] for i in (0, 2, 4)] == [argmax[i] for i in (0, 2, 4)]


@pytest.mark.parametrize("temperature", [0.1, 0.7, 1.0, 2.0, 10.0, 100.0])
def test_top_k_1_is_greedy(temperature: float, torch_rng: None) -> None:
    """top_k=1 returns argmax at any temperature, seeded or not."""
    logits = make_logits(8, 5000, seed=1)
    params = [SamplingParams(temperature=temperature, top_k=1, seed=s) for s in (None, 7) * 4]
    out = Sampler().sample(logits, params, list(range(8)))
    assert torch.equal(out, logits.argmax(dim=-1))


NUCLEUS_PROBS = [0.04, 0.3, 0.01, 0.5, 0.1, 0.05]


@pytest.mark.parametrize(
    ("top_k", "top_p", "nucleus"),
    [
        (0, 1.0, {0, 1, 2, 3, 4, 5}),
        (0, 0.75, {1, 3}),  # 0.5 + 0.3 = 0.8 >= 0.75
        (0, 0.85, {1, 3, 4}),  # 0.5 + 0.3 + 0.1 = 0.9 >= 0.85
        (0, 0.3, {3}),  # the most likely token alone already covers top_p
        (0, 0.01, {3}),
        (3, 1.0, {1, 3, 4}),
        (2, 0.9, {1, 3}),  # top-p on the top-k-renormalized [0.625, 0.375]
        (2, 0.6, {3}),  # 0.625 >= 0.6
    ],
)
def test_top_k_top_p_nucleus(top_k: int, top_p: float, nucleus: set[int]) -> None:
    """The filter keeps exactly the expected nucleus, and samples never leave it."""
    logits = torch.tensor([NUCLEUS_PROBS]).log()
    kept = apply_top_k_top_p(logits, torch.tensor([top_k or 6]), torch.tensor([top_p]))
    assert set(torch.isfinite(kept[0]).nonzero().flatten().tolist()) == nucleus
    n = 4000
    params = [SamplingParams(top_k=top_k, top_p=top_p, seed=11)] * n
    out = Sampler().sample(logits.expand(n, -1).contiguous(), params, list(range(n)))
    assert set(out.tolist()) == nucleus


def test_top_p_mixed_with_unfiltered_rows() -> None:
    """Rows without top-k/top-p in a filtered batch keep their full distribution."""
    logits = torch.tensor([NUCLEUS_PROBS] * 2).log()
    kept = apply_top_k_top_p(logits, torch.tensor([6, 6]), torch.tensor([1.0, 0.3]))
    assert torch.isfinite(kept[0]).all()
    assert torch.isfinite(kept[1]).nonzero().flatten().tolist() == [3]
    torch.testing.assert_close(kept[0], logits[0], rtol=0, atol=0)


def test_seeded_sampling_independent_of_batch() -> None:
    """A seeded row gets the same token alone, in any batch order and from any Sampler."""
    logits = make_logits(6, 3000, seed=5)
    params = [
        SamplingParams(temperature=1.0, seed=1),
        SamplingParams(temperature=0.8, top_k=50, seed=2),
        SamplingParams(temperature=1.3, top_p=0.9, seed=3),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0),  # unseeded, shares the global generator
        SamplingParams(temperature=2.0, top_k=100, top_p=0.95, seed=2**63 - 1),
    ]
    positions = [0, 5, 17, 3, 9, 1000]
    seeded = [0, 1, 2, 5]
    full = sample_rows(Sampler(), logits, params, positions)
    for i in seeded:
        alone = sample_rows(Sampler(), logits[i : i + 1], [params[i]], [positions[i]])
        assert alone == [full[i]]
    order = [5, 3, 1, 4, 0, 2]
    permuted_params = [params[i] for i in order]
    permuted = sample_rows(Sampler(), logits[order], permuted_params, [positions[i] for i in order])
    assert [permuted[order.index(i)] for i in seeded] == [full[i] for i in seeded]
    sampler = Sampler()
    again = [sample_rows(sampler, logits, params, positions) for _ in range(2)]
    assert [[a[i] for i in seeded] for a in again] == [[full[i] for i in seeded]] * 2


def test_seeded_tokens_vary_with_position() -> None:
    """Each output position gets fresh noise: a flat distribution gives many distinct draws."""
    n = 200
    logits = torch.zeros(n, 1000)
    out = Sampler().sample(logits, [SamplingParams(seed=42)] * n, list(range(n))).tolist()
    assert len(set(out)) > 150
    other_seed = Sampler().sample(logits, [SamplingParams(seed=43)] * n, list(range(n))).tolist()
    assert sum(a == b for a, b in zip(out, other_seed, strict=True)) < 10


def chi_square(counts: list[int], probs: list[float]) -> float:
    n = sum(counts)
    return sum((c - n * p) ** 2 / (n * p) for c, p in zip(counts, probs, strict=True))


DIST = [0.5, 0.25, 0.125, 0.0625, 0.0625]


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_empirical_distribution_seeded(temperature: float) -> None:
    """20k seeded draws follow softmax(logits / T): chi-square below the p=0.001 bound."""
    n = 20_000
    logits = torch.tensor([DIST]).log().expand(n, -1).contiguous()
    params = [SamplingParams(temperature=temperature, seed=2024)] * n
    out = Sampler().sample(logits, params, list(range(n)))
    counts = torch.bincount(out, minlength=5).tolist()
    expected = torch.tensor(DIST).pow(1.0 / temperature)
    expected = (expected / expected.sum()).tolist()
    assert chi_square(counts, expected) < CHI2_4DF_P999
    total_variation = 0.5 * sum(abs(c / n - p) for c, p in zip(counts, expected, strict=True))
    assert total_variation < 0.015


def test_unseeded_rows_use_global_generator(torch_rng: None) -> None:
    """Unseeded rows follow the distribution and are reproducible via torch.manual_seed."""
    n = 20_000
    logits = torch.tensor([DIST]).log().expand(n, -1).contiguous()
    params = [SamplingParams()] * n
    out = Sampler().sample(logits, params, [0] * n)
    counts = torch.bincount(out, minlength=5).tolist()
    assert sum(counts) == n
    assert chi_square(counts, DIST) < CHI2_4DF_P999
    torch.manual_seed(0)
    assert torch.equal(Sampler().sample(logits, params, [0] * n), out)


def test_masked_tokens_never_sampled() -> None:
    """Tokens with -inf logits (probability 0) are never drawn, seeded or not."""
    n = 5000
    logits = torch.full((n, 100), float("-inf"))
    logits[:, 17] = 0.0
    logits[:, 42] = math.log(1e-6)
    params = [SamplingParams(seed=i % 2 or None) for i in range(n)]
    out = Sampler().sample(logits, params, list(range(n)))
    assert set(out.tolist()) <= {17, 42}
