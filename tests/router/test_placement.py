"""Placer: the cost formula, argmin / softmax picking, policies, conditional disaggregation."""

from __future__ import annotations

import math
import random

import msgpack
import pytest

from scission.registry.workers import WorkerInfo, WorkerRole
from scission.router.config import PlacementConfig, RoutingPolicy
from scission.router.placement import (
    NoWorkersError,
    Placer,
    pick_min_cost,
    prefill_cost,
)
from scission.router.worker_pool import WorkerLoad

BLOCK_SIZE = 16
NUM_BLOCKS = 100


def make_info(worker_id: str, role: WorkerRole) -> WorkerInfo:
    return WorkerInfo(worker_id=worker_id, role=role, endpoint="127.0.0.1:1", agent_name="a",
                      agent_metadata=b"", kv_layout=msgpack.packb({}), num_blocks=NUM_BLOCKS,
                      block_size=BLOCK_SIZE, model_id="m", started_at_s=0.0)


def make_load(queued: int = 0, free: int = NUM_BLOCKS, running: int = 0) -> WorkerLoad:
    return WorkerLoad(queued_prefill_tokens=queued, num_free_blocks=free, num_blocks=NUM_BLOCKS,
                      num_running=running)


class FakePool:
    """Static workers and loads (the WorkerView placement reads)."""

    def __init__(self, loads: dict[str, WorkerLoad], roles: dict[str, WorkerRole]) -> None:
        self.loads = loads
        self.infos = [make_info(w, roles[w]) for w in sorted(loads)]

    def workers(self, role: WorkerRole) -> list[WorkerInfo]:
        return [w for w in self.infos if w.role is role]

    def load(self, info: WorkerInfo) -> WorkerLoad:
        return self.loads[info.worker_id]


def make_placer(loads: dict[str, WorkerLoad], hits: dict[str, int] | None = None,
                **cfg) -> Placer:
    roles = {w: WorkerRole.PREFILL if w.startswith("p") else
             WorkerRole.COLOCATED if w.startswith("c") else WorkerRole.DECODE for w in loads}
    return Placer(PlacementConfig(**cfg), FakePool(loads, roles),
                  prefix_match=lambda hashes: dict(hits or {}))


def test_prefill_cost_formula():
    """cost = scale * max(queued + new - cached, 0) + blocks_in_use, exactly."""
    cfg = PlacementConfig(prefill_load_scale=2.0)
    assert prefill_cost(cfg, make_load(queued=100, free=70), 200, 64) == 2.0 * 236 + 30
    assert prefill_cost(cfg, make_load(queued=0, free=100), 10, 64) == 0.0  # clamped at 0


def test_kv_aware_prefers_the_worker_holding_the_prefix():
    """p0 holds 12 of 13 blocks: its cost (208 - 192 + 0) beats p1's (208 + 0) although p0
    has 100 more queued tokens; without the hit (least-loaded) p1 wins."""
    loads = {"d0": make_load(), "p0": make_load(queued=100), "p1": make_load()}
    hits = {"p0": 12}
    placement = make_placer(loads, hits).place(208, list(range(13)), BLOCK_SIZE)
    assert placement.prefill.worker_id == "p0" and placement.decode.worker_id == "d0"
    assert placement.cached_prefix_tokens == 192
    blind = make_placer(loads, hits, policy=RoutingPolicy.LEAST_LOADED)
    placement = blind.place(208, list(range(13)), BLOCK_SIZE)
    assert placement.prefill.worker_id == "p1" and placement.cached_prefix_tokens == 0


def test_cached_tokens_are_capped_below_the_prompt_length():
    """A full hit on a 13-block (208-token) prompt counts 12 blocks: the last token is always
    computed, as the worker's BlockManager.cached_prefix does."""
    loads = {"d0": make_load(), "p0": make_load()}
    placement = make_placer(loads, {"p0": 13}).place(208, list(range(13)), BLOCK_SIZE)
    assert placement.cached_prefix_tokens == 192
    placement = make_placer(loads, {"p0": 13}).place(209, list(range(13)), BLOCK_SIZE)
    assert placement.cached_prefix_tokens == 208


def test_load_outweighs_a_small_hit():
    """A 1-block hit does not beat 500 queued tokens."""
    loads = {"d0": make_load(), "p0": make_load(queued=500), "p1": make_load()}
    placement = make_placer(loads, {"p0": 1}).place(100, [1, 2, 3, 4, 5, 6], BLOCK_SIZE)
    assert placement.prefill.worker_id == "p1"


def test_temperature_zero_is_argmin_with_first_on_ties():
    """Temperature 0 picks the lowest cost, the first candidate among equals."""
    rng = random.Random(0)
    assert pick_min_cost([5.0, 3.0, 3.0], 0.0, rng) == 1
    assert pick_min_cost([1.0], 0.0, rng) == 0


def test_softmax_sampling_follows_exp_of_minus_cost_over_temperature():
    """Costs [0, T ln 3] give probabilities [3/4, 1/4]: 4000 seeded draws land within 4 sigma;
    a gap of 50 temperatures is never crossed."""
    rng = random.Random(7)
    temperature = 10.0
    costs = [0.0, temperature * math.log(3)]
    picks = [pick_min_cost(costs, temperature, rng) for _ in range(4000)]
    sigma = math.sqrt(4000 * 0.75 * 0.25)
    assert abs(picks.count(0) - 3000) < 4 * sigma
    assert {pick_min_cost([1e6, 1e6 + 500], temperature, rng) for _ in range(200)} == {0}


def test_placer_temperature_spreads_equal_costs():
    """With equal costs and temperature > 0 both prefill workers are used; at 0 only the first."""
    loads = {"d0": make_load(), "p0": make_load(), "p1": make_load()}
    warm = make_placer(loads, temperature=1.0)
    assert {warm.place(64, [], BLOCK_SIZE).prefill.worker_id for _ in range(50)} == {"p0", "p1"}
    cold = make_placer(loads)
    assert {cold.place(64, [], BLOCK_SIZE).prefill.worker_id for _ in range(50)} == {"p0"}


def test_round_robin_cycles_by_worker_id():
    """ROUND_ROBIN takes prefill workers in worker_id order, ignoring load and prefix hits."""
    loads = {"d0": make_load(), "p0": make_load(queued=10**6), "p1": make_load()}
    placer = make_placer(loads, {"p1": 5}, policy=RoutingPolicy.ROUND_ROBIN)
    picks = [placer.place(100, [1, 2, 3, 4, 5], BLOCK_SIZE).prefill.worker_id for _ in range(4)]
    assert picks == ["p0", "p1", "p0", "p1"]


def test_decode_is_the_worker_with_most_free_blocks_then_fewest_running():
    """Decode: most free KV blocks first, then fewest running requests."""
    loads = {"d0": make_load(free=50), "d1": make_load(free=80, running=3),
             "d2": make_load(free=80, running=1), "p0": make_load()}
    assert make_placer(loads).place(64, [], BLOCK_SIZE).decode.worker_id == "d2"


def test_local_prefill_when_the_uncached_part_is_short():
    """uncached = 40 - 32 = 8 <= 8: the decode worker prefills; 9 > 8: remote prefill."""
    loads = {"d0": make_load(), "p0": make_load()}
    placer = make_placer(loads, {"d0": 2}, local_prefill_max_uncached_tokens=8)
    local = placer.place(40, [1, 2], BLOCK_SIZE)
    assert local.prefill is None and local.decode.worker_id == "d0"
    assert local.cached_prefix_tokens == 32 and local.prefill_worker.worker_id == "d0"
    assert placer.place(41, [1, 2], BLOCK_SIZE).prefill.worker_id == "p0"


def test_local_prefill_when_the_decode_worker_holds_most_of_the_prompt():
    """A 0.9 hit ratio: 3 of 4 blocks of a 65-token prompt (48/65) is remote, 4 (64/65) local."""
    loads = {"d0": make_load(), "p0": make_load()}
    assert make_placer(loads, {"d0": 3}, local_prefill_min_hit_ratio=0.9).place(
        65, [1, 2, 3, 4], BLOCK_SIZE).prefill.worker_id == "p0"
    assert make_placer(loads, {"d0": 4}, local_prefill_min_hit_ratio=0.9).place(
        65, [1, 2, 3, 4], BLOCK_SIZE).prefill is None


def test_defaults_never_prefill_locally_even_on_a_full_hit():
    """With default thresholds even a prompt fully held by the decode worker (a multiple of
    the block size) is prefilled remotely."""
    loads = {"d0": make_load(), "p0": make_load()}
    placement = make_placer(loads, {"d0": 4}).place(64, [1, 2, 3, 4], BLOCK_SIZE)
    assert placement.prefill.worker_id == "p0"


def test_colocated_workers_are_picked_by_cost():
    """c0: 250 + 200 - 160 = 290 beats c1: 100 + 200 = 300."""
    loads = {"c0": make_load(queued=250), "c1": make_load(queued=100)}
    placement = make_placer(loads, {"c0": 10}).place(200, list(range(12)), BLOCK_SIZE)
    assert placement.prefill is None and placement.decode.worker_id == "c0"
    assert placement.cached_prefix_tokens == 160


def test_no_workers_raises():
    """Without a decode or colocated worker placement raises NoWorkersError (UNAVAILABLE)."""
    with pytest.raises(NoWorkersError):
        make_placer({"p0": make_load()}).place(10, [], BLOCK_SIZE)


def test_policy_must_be_an_enum():
    """Routing policies are enums, never strings."""
    with pytest.raises(ValueError, match="RoutingPolicy"):
        PlacementConfig(policy="kv-aware")  # type: ignore[arg-type]


def test_kv_aware_decode_prefers_the_worker_holding_the_prefix():
    """d1 holds 3 of the prompt's 5 blocks: it gets the request over d0's extra free blocks;
    the deeper hit wins among holders (d2: 4 blocks)."""
    loads = {"d0": make_load(free=90), "d1": make_load(free=60, running=2), "p0": make_load()}
    assert make_placer(loads, {"d1": 3}).place(80, [1, 2, 3, 4, 5], BLOCK_SIZE) \
        .decode.worker_id == "d1"
    loads["d2"] = make_load(free=50, running=1)
    placement = make_placer(loads, {"d1": 3, "d2": 4}).place(80, [1, 2, 3, 4, 5], BLOCK_SIZE)
    assert placement.decode.worker_id == "d2" and placement.prefill.worker_id == "p0"


def test_decode_prefix_preference_yields_to_load_and_memory():
    """The holder runs 5 more requests than d0 (gap 4): least loaded rule; with gap 5 it
    wins. A holder without free blocks for the rest of the prompt (5 - 3 = 2 > 1) never does;
    -1 turns the preference off; round-robin never uses hits."""
    hits = {"d1": 3}
    busy = {"d0": make_load(running=1), "d1": make_load(running=6), "p0": make_load()}
    assert make_placer(busy, hits).place(80, [1, 2, 3, 4, 5], BLOCK_SIZE) \
        .decode.worker_id == "d0"
    assert make_placer(busy, hits, decode_prefix_max_running_gap=5).place(
        80, [1, 2, 3, 4, 5], BLOCK_SIZE).decode.worker_id == "d1"
    full = {"d0": make_load(free=10), "d1": make_load(free=1), "p0": make_load()}
    assert make_placer(full, hits).place(80, [1, 2, 3, 4, 5], BLOCK_SIZE) \
        .decode.worker_id == "d0"
    idle = {"d0": make_load(free=90), "d1": make_load(free=60), "p0": make_load()}
    assert make_placer(idle, hits, decode_prefix_max_running_gap=-1).place(
        80, [1, 2, 3, 4, 5], BLOCK_SIZE).decode.worker_id == "d0"
    assert make_placer(idle, hits, policy=RoutingPolicy.ROUND_ROBIN).place(
        80, [1, 2, 3, 4, 5], BLOCK_SIZE).decode.worker_id == "d0"


def test_conditional_disaggregation_reads_the_chosen_prefix_holder():
    """With a 0.75 hit-ratio threshold, d1 holding 4 of a 65-token prompt's blocks (64/65)
    is chosen and prefills locally; d0 (more free blocks, no hit) would have sent it away."""
    loads = {"d0": make_load(free=99), "d1": make_load(free=50), "p0": make_load()}
    placement = make_placer(loads, {"d1": 4}, local_prefill_min_hit_ratio=0.75).place(
        65, [1, 2, 3, 4], BLOCK_SIZE)
    assert placement.decode.worker_id == "d1" and placement.prefill is None
    assert placement.cached_prefix_tokens == 64


def test_a_short_shared_preamble_does_not_draw_decode():
    """d1 holds 1 block (16 of 80 tokens, 0.2 < 0.5), say a chat template's system turn every
    prompt shares: the usual rule (most free blocks) picks d0; at ratio 0.2 d1 wins."""
    loads = {"d0": make_load(free=90), "d1": make_load(free=60), "p0": make_load()}
    assert make_placer(loads, {"d1": 1}).place(80, [1, 2, 3, 4, 5], BLOCK_SIZE) \
        .decode.worker_id == "d0"
    assert make_placer(loads, {"d1": 1}, decode_prefix_min_hit_ratio=0.2).place(
        80, [1, 2, 3, 4, 5], BLOCK_SIZE).decode.worker_id == "d1"
