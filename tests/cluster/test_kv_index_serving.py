"""KV-aware routing end to end on a real local cluster (embedded etcd + Ray + router + 2 prefill
+ 1 decode workers, default model): prefix hits, the global index, conditional disaggregation.

One module-scoped cluster. A second router runs in this process against the same etcd, so the
tests can read its prefix index and metrics directly.
"""

from __future__ import annotations

import random
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from serving_helpers import token_request, wait_until

from scission.cluster.client import GenerationResult, connect, generate
from scission.cluster.launcher import ClusterConfig, LocalCluster
from scission.engine.block_hash import hash_prompt_blocks, hash_seed
from scission.engine.config import CacheConfig, EngineConfig
from scission.registry.workers import EtcdClientConfig, RegistryConfig
from scission.router.config import PlacementConfig, RouterConfig
from scission.router.server import RouterServer

LEASE_TTL_S = 3
BLOCK_SIZE = 16
NEW_TOKENS = 6


def make_prompt(seed: int, num_tokens: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, 40_000) for _ in range(num_tokens)]


PROMPT_A = make_prompt(1, 301)  # 18 full blocks + 13 tokens
PROMPT_B = make_prompt(2, 301)
PROMPT_B2 = PROMPT_B[:200] + make_prompt(3, 90)  # shares 12 full blocks (192 tokens) with B


@pytest.fixture(scope="module")
def cluster():
    cfg = ClusterConfig(num_prefill=2, num_decode=1, lease_ttl_s=LEASE_TTL_S,
                        threads_per_worker=1, hold_timeout_s=60,
                        engine=EngineConfig(cache=CacheConfig(num_blocks=384)))
    c = LocalCluster(cfg)
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def local_router(cluster):
    """A router in this process; the decode worker prefills when it holds >= 90% of a prompt."""
    cfg = RouterConfig(etcd=EtcdClientConfig(endpoints=(cluster.etcd.endpoint,)),
                       cluster_token=cluster.cluster_token,
                       registry=RegistryConfig(prefix=cluster.config.registry_prefix),
                       placement=PlacementConfig(local_prefill_min_hit_ratio=0.9),
                       metrics_port=0)
    router = RouterServer(cfg).start()
    yield router
    router.stop()


def run(address: str, prompt: list[int]) -> GenerationResult:
    res = generate(connect(address), token_request(prompt, NEW_TOKENS), timeout_s=300)
    assert res.error == "", res.error
    assert res.output_tokens == NEW_TOKENS
    return res


@pytest.fixture(scope="module")
def seed(local_router) -> bytes:
    """The workers' block-hash seed (from their registered model id)."""
    return hash_seed(local_router.directory.workers()[0].model_id)


def full_block_hashes(seed: bytes, tokens: list[int]) -> set[int]:
    return set(hash_prompt_blocks(seed, tokens, BLOCK_SIZE))


def test_same_prefix_goes_to_the_worker_holding_it(cluster, local_router, seed):
    """Two prompts placed at once land on different prefill workers (in-flight load). Repeats
    go back to the worker holding the prompt, hit the full-block prefix (cached_tokens = 288)
    and give exactly the first tokens; a prompt sharing 12 blocks with B hits 192 tokens on
    B's worker. The router's index holds exactly the prompts' full blocks per worker."""
    address = cluster.router_address
    with ThreadPoolExecutor(2) as ex:
        first_a = ex.submit(run, address, PROMPT_A)
        time.sleep(0.05)
        first_b = ex.submit(run, address, PROMPT_B)
        first_a, first_b = first_a.result(), first_b.result()
    worker_a, worker_b = first_a.prefill_worker, first_b.prefill_worker
    assert {worker_a, worker_b} == {"prefill-0", "prefill-1"}
    assert first_a.cached_tokens == first_b.cached_tokens == 0
    again_a, again_b = run(address, PROMPT_A), run(address, PROMPT_B)
    assert (again_a.prefill_worker, again_b.prefill_worker) == (worker_a, worker_b)
    assert again_a.cached_tokens == again_b.cached_tokens == 288
    assert again_a.token_ids == first_a.token_ids and again_b.token_ids == first_b.token_ids
    shared = run(address, PROMPT_B2)
    assert shared.prefill_worker == worker_b and shared.cached_tokens == 192
    index = local_router.index
    want = {worker_a: full_block_hashes(seed, PROMPT_A),
            worker_b: full_block_hashes(seed, PROMPT_B) | full_block_hashes(seed, PROMPT_B2)}
    wait_until(lambda: all(index.hashes_of(w) == h for w, h in want.items()), 10)
    decode_want = set()
    for prompt, res in ((PROMPT_A, first_a), (PROMPT_B, first_b), (PROMPT_B2, shared)):
        computed = (prompt + res.token_ids)[:len(prompt) + NEW_TOKENS - 1]
        decode_want |= full_block_hashes(seed, computed)
    wait_until(lambda: index.hashes_of("decode-0") == decode_want, 10)


def test_decode_worker_prefills_locally_when_it_holds_the_prompt(cluster, local_router):
    """Through the in-process router (min hit ratio 0.9), a prompt the decode worker already
    holds (pulled KV of A) runs on the decode worker alone: prefill_worker = decode-0, 288
    cached tokens, tokens equal to the disaggregated run. A new prompt is still disaggregated.
    The router's metrics count both requests and their cached tokens."""
    address = local_router.address
    reference = run(cluster.router_address, PROMPT_A)
    local = run(address, PROMPT_A)
    assert local.prefill_worker == local.decode_worker == "decode-0"
    assert local.cached_tokens == 288 and local.token_ids == reference.token_ids
    fresh = run(address, make_prompt(4, 120))
    assert fresh.prefill_worker in ("prefill-0", "prefill-1") and fresh.cached_tokens == 0
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{local_router.metrics_port}/metrics", timeout=5) as rsp:
        text = rsp.read().decode()
    assert 'scission_router_requests_total{status="ok"} 2.0' in text
    assert "scission_router_cached_tokens_total 288.0" in text
    assert "scission_router_prompt_tokens_total 421.0" in text


def test_killed_worker_leaves_the_router_index_within_its_ttl(cluster, local_router):
    """A SIGKILLed prefill worker's entries leave the router's index within its lease TTL
    (+ etcd's expiry scan); the next request for its prompt goes to the other worker."""
    index = local_router.index
    victim = "prefill-1"
    assert index.hashes_of(victim)
    cluster.kill_worker(victim)
    gone_s = wait_until(lambda: not index.hashes_of(victim), LEASE_TTL_S + 5, 0.02)
    assert gone_s <= LEASE_TTL_S + 1.5
    res = run(cluster.router_address, PROMPT_B)
    assert res.prefill_worker == "prefill-0"
