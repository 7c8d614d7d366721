"""Placement: filter -> score -> pick (llm-d's scheduler pipeline; DESIGN: Placement).

The decode worker is chosen first (most free KV blocks, then fewest running requests);
then the prefill worker by cost (lower is better)::

    cost = prefill_load_scale * max(queued_prefill_tokens + new_prompt_tokens
                                    - cached_prefix_tokens, 0) + decode_blocks_in_use

picked by argmin (temperature 0) or softmax sampling over -cost / temperature.
Conditional disaggregation: the decode worker prefills locally when the uncached part of
the prompt is short or it already holds most of the prompt.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

from scission.cluster.registry import WorkerInfo, WorkerRole
from scission.router.config import PlacementConfig
from scission.router.worker_pool import WorkerLoad, WorkerPool

PrefixMatch = Callable[[list[int]], dict[str, int]]  # block hashes -> worker_id -> blocks hit


@dataclass(frozen=True)
class Placement:
    decode: WorkerInfo  # the worker that streams tokens (decode or colocated role)
    prefill: WorkerInfo | None  # None = prefill on the decode worker (local / colocated)
    cached_prefix_tokens: int  # expected prefix-cache hit on the prefill side

    @property
    def disaggregated(self) -> bool:
        return self.prefill is not None


class NoWorkersError(RuntimeError):
    """No alive worker can take the request (maps to UNAVAILABLE)."""


def prefill_cost(cfg: PlacementConfig, load: WorkerLoad, num_prompt_tokens: int,
                 cached_tokens: int) -> float:
    uncached = max(load.queued_prefill_tokens + num_prompt_tokens - cached_tokens, 0)
    return cfg.prefill_load_scale * uncached + load.blocks_in_use


def pick_min_cost(costs: list[float], temperature: float, rng: random.Random) -> int:
    """Index of the chosen candidate: argmin, or softmax(-cost / temperature) sampling."""
    if temperature <= 0:
        return min(range(len(costs)), key=costs.__getitem__)
    lo = min(costs)
    weights = [math.exp(-(c - lo) / temperature) for c in costs]
    return rng.choices(range(len(costs)), weights=weights)[0]


class Placer:
    def __init__(self, cfg: PlacementConfig, pool: WorkerPool, block_size: int,
                 prefix_match: PrefixMatch | None = None, seed: int = 0) -> None:
        self.cfg = cfg
        self.pool = pool
        self.block_size = block_size
        self.prefix_match = prefix_match if cfg.kv_aware else None
        self.rng = random.Random(seed)

    def place(self, num_prompt_tokens: int, block_hashes: list[int]) -> Placement:
        """Raises NoWorkersError when no decode-capable worker is alive."""
        hits = self.prefix_match(block_hashes) if self.prefix_match and block_hashes else {}
        decoders = self.pool.workers(WorkerRole.DECODE)
        prefillers = self.pool.workers(WorkerRole.PREFILL)
        if not decoders or not prefillers:
            colocated = self.pool.workers(WorkerRole.COLOCATED) or decoders
            if not colocated:
                raise NoWorkersError("no decode or colocated worker is registered")
            best = self._cheapest(colocated, num_prompt_tokens, hits)
            return Placement(best, None, hits.get(best.worker_id, 0) * self.block_size)
        decode = max(decoders, key=lambda w: self._decode_score(w))
        decode_hit = hits.get(decode.worker_id, 0) * self.block_size
        if self._prefill_locally(num_prompt_tokens, decode_hit):
            return Placement(decode, None, decode_hit)
        prefill = self._cheapest(prefillers, num_prompt_tokens, hits)
        return Placement(decode, prefill, hits.get(prefill.worker_id, 0) * self.block_size)

    def _decode_score(self, w: WorkerInfo) -> tuple[int, int]:
        load = self.pool.load(w)
        return (load.num_free_blocks, -load.num_running)

    def _cheapest(self, workers: list[WorkerInfo], n: int, hits: dict[str, int]) -> WorkerInfo:
        costs = [prefill_cost(self.cfg, self.pool.load(w), n,
                              hits.get(w.worker_id, 0) * self.block_size) for w in workers]
        return workers[pick_min_cost(costs, self.cfg.temperature, self.rng)]

    def _prefill_locally(self, num_prompt_tokens: int, decode_hit_tokens: int) -> bool:
        uncached = num_prompt_tokens - decode_hit_tokens
        if uncached <= self.cfg.local_prefill_max_uncached_tokens:
            return True
        return decode_hit_tokens >= self.cfg.local_prefill_min_hit_ratio * num_prompt_tokens
