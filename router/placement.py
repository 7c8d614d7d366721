"""Placement: filter -> score -> pick (llm-d's scheduler pipeline; DESIGN: Placement).

Filter: ``WorkerPool.workers(role)`` (registered, not draining, not suspect). The decode worker
is chosen first: most free KV blocks, then fewest running requests; under ``KV_AWARE`` the one
holding the longest prefix of the prompt, when that prefix is at least
``decode_prefix_min_hit_ratio`` of the prompt, among those running at most
``decode_prefix_max_running_gap`` requests more than the least loaded decode worker and with
free blocks for the rest of the prompt (SGLang's cache-aware router: prefix match unless the
load is imbalanced), since it then pulls only the blocks it lacks and keeps one copy of the
shared ones. The ratio keeps a short preamble every prompt shares (a chat template's system
turn) from drawing all requests to the workers that served one. Then the prefill worker by cost (lower is better), in tokens plus blocks::

    cost = prefill_load_scale * max(queued_prefill_tokens + new_prompt_tokens
                                    - cached_prefix_tokens, 0) + decode_blocks_in_use

picked by argmin (temperature 0) or softmax sampling over -cost / temperature.
``cached_prefix_tokens`` = leading blocks the worker holds (prefix index, ``RoutingPolicy.
KV_AWARE`` only) * block_size, capped at ``(new_prompt_tokens - 1) // block_size * block_size``
because a worker always computes the last prompt token (``BlockManager.cached_prefix``).
Conditional disaggregation: the decode worker prefills locally when the uncached part of the
prompt is short or it already holds most of the prompt (``PlacementConfig.local_prefill_*``).
"""

from __future__ import annotations

import itertools
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from scission.registry.workers import WorkerInfo, WorkerRole
from scission.router.config import PlacementConfig, RoutingPolicy
from scission.router.worker_pool import WorkerLoad

PrefixMatch = Callable[[list[int]], dict[str, int]]  # block hashes -> worker_id -> blocks hit


class WorkerView(Protocol):
    """What placement reads (``WorkerPool``; tests and benchmarks pass fakes)."""

    def workers(self, role: WorkerRole) -> list[WorkerInfo]: ...

    def load(self, info: WorkerInfo) -> WorkerLoad: ...


@dataclass(frozen=True)
class Placement:
    decode: WorkerInfo  # the worker that streams tokens (decode or colocated role)
    prefill: WorkerInfo | None  # None = prefill on the decode worker (local / colocated)
    cached_prefix_tokens: int  # expected prefix-cache hit on the worker that prefills

    @property
    def disaggregated(self) -> bool:
        return self.prefill is not None

    @property
    def prefill_worker(self) -> WorkerInfo:
        """The worker that runs the prompt (the decode worker when not disaggregated)."""
        return self.prefill if self.prefill is not None else self.decode


class NoWorkersError(RuntimeError):
    """No alive worker can take the request (maps to UNAVAILABLE)."""


def prefill_cost(cfg: PlacementConfig, load: WorkerLoad, num_prompt_tokens: int,
                 cached_tokens: int) -> float:
    """The cost above for one candidate; ``cached_tokens`` already capped by the caller."""
    uncached = max(load.queued_prefill_tokens + num_prompt_tokens - cached_tokens, 0)
    return cfg.prefill_load_scale * uncached + load.blocks_in_use


def pick_min_cost(costs: list[float], temperature: float, rng: random.Random) -> int:
    """Index of the chosen candidate: argmin (first on ties), or softmax(-cost / temperature)
    sampling (shifted by the minimum, so large costs do not underflow)."""
    if temperature <= 0:
        return min(range(len(costs)), key=costs.__getitem__)
    lo = min(costs)
    weights = [math.exp(-(c - lo) / temperature) for c in costs]
    return rng.choices(range(len(costs)), weights=weights)[0]


class Placer:
    """Chooses workers for one request; thread-safe for concurrent ``place`` calls."""

    def __init__(self, cfg: PlacementConfig, pool: WorkerView,
                 prefix_match: PrefixMatch | None = None, seed: int = 0) -> None:
        self.cfg = cfg
        self.pool = pool
        self.prefix_match = prefix_match if cfg.policy is RoutingPolicy.KV_AWARE else None
        self.rng = random.Random(seed)
        self._turns = {role: itertools.count() for role in WorkerRole}  # ROUND_ROBIN

    def place(self, num_prompt_tokens: int, block_hashes: list[int],
              block_size: int) -> Placement:
        """Raises NoWorkersError when no decode-capable worker is alive.

        Args:
            block_hashes: the prompt's full-block hashes (``PromptHasher``); may be empty.
            block_size: tokens per block of those hashes.
        """
        hits = self.prefix_match(block_hashes) if self.prefix_match and block_hashes else {}
        max_cached = (num_prompt_tokens - 1) // block_size * block_size if block_size else 0

        def cached(w: WorkerInfo) -> int:
            return min(hits.get(w.worker_id, 0) * block_size, max_cached)

        decoders = self.pool.workers(WorkerRole.DECODE)
        prefillers = self.pool.workers(WorkerRole.PREFILL)
        if not decoders or not prefillers:
            colocated = self.pool.workers(WorkerRole.COLOCATED) or decoders
            if not colocated:
                raise NoWorkersError("no decode or colocated worker is registered")
            best = self._pick(colocated, num_prompt_tokens, cached, WorkerRole.COLOCATED)
            return Placement(best, None, cached(best))
        decode = self._pick_decode(decoders, num_prompt_tokens, block_size, cached)
        if self._prefill_locally(num_prompt_tokens, cached(decode)):
            return Placement(decode, None, cached(decode))
        prefill = self._pick(prefillers, num_prompt_tokens, cached, WorkerRole.PREFILL)
        return Placement(decode, prefill, cached(prefill))

    def place_decode(self) -> Placement:
        """A decode-capable worker (decode or colocated role) with the most free blocks, for
        a request migrating off a failed worker. Raises NoWorkersError when there is none."""
        workers = self.pool.workers(WorkerRole.DECODE) + self.pool.workers(WorkerRole.COLOCATED)
        if not workers:
            raise NoWorkersError("no decode or colocated worker left to migrate to")
        return Placement(max(workers, key=self._decode_score), None, 0)

    def _pick_decode(self, decoders: list[WorkerInfo], num_prompt_tokens: int, block_size: int,
                     cached: Callable[[WorkerInfo], int]) -> WorkerInfo:
        """The decode worker (module docstring): the prefix holder when the load allows."""
        gap = self.cfg.decode_prefix_max_running_gap
        min_hit = max(self.cfg.decode_prefix_min_hit_ratio * num_prompt_tokens, 1)
        if self.prefix_match is None or gap < 0 or \
                not any(cached(w) >= min_hit for w in decoders):
            return max(decoders, key=self._decode_score)
        loads = {w.worker_id: self.pool.load(w) for w in decoders}
        least = min(load.num_running for load in loads.values())
        need = -(-num_prompt_tokens // block_size)

        def fits(w: WorkerInfo) -> bool:
            load = loads[w.worker_id]
            return load.num_running - least <= gap and \
                load.num_free_blocks >= need - cached(w) // block_size
        eligible = [w for w in decoders if cached(w) >= min_hit and fits(w)]
        if not eligible:
            return max(decoders, key=self._decode_score)
        return max(eligible, key=lambda w: (cached(w), self._decode_score(w)))

    def _decode_score(self, w: WorkerInfo) -> tuple[int, int]:
        load = self.pool.load(w)
        return (load.num_free_blocks, -load.num_running)

    def _pick(self, workers: list[WorkerInfo], n: int, cached: Callable[[WorkerInfo], int],
              role: WorkerRole) -> WorkerInfo:
        if self.cfg.policy is RoutingPolicy.ROUND_ROBIN:
            return workers[next(self._turns[role]) % len(workers)]
        costs = [prefill_cost(self.cfg, self.pool.load(w), n, cached(w)) for w in workers]
        return workers[pick_min_cost(costs, self.cfg.temperature, self.rng)]

    def _prefill_locally(self, num_prompt_tokens: int, decode_hit_tokens: int) -> bool:
        """Conditional disaggregation (thresholds in ``PlacementConfig``)."""
        cfg = self.cfg
        uncached = num_prompt_tokens - decode_hit_tokens
        if 0 < cfg.local_prefill_max_uncached_tokens and \
                uncached <= cfg.local_prefill_max_uncached_tokens:
            return True
        return decode_hit_tokens >= cfg.local_prefill_min_hit_ratio * num_prompt_tokens


def place_or_wait(placer: Placer, num_prompt_tokens: int, block_hashes: list[int],
                  block_size: int, wait_s: float, poll_s: float = 0.05) -> Placement:
    """``placer.place``, retried every ``poll_s`` for up to ``wait_s`` while there is no worker
    to place on (workers re-registering after a restart or an etcd outage).

    Raises:
        NoWorkersError: still none after ``wait_s`` (at once when ``wait_s`` is 0).
    """
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return placer.place(num_prompt_tokens, block_hashes, block_size)
        except NoWorkersError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(poll_s)
