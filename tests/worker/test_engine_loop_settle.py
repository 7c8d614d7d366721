"""EngineLoop settling: after a step the loop waits for the streaming handlers to pass on
their outputs (``ack``) before it steps again, at most ``settle_timeout_s``; a stream that
misses that deadline, or never acks (a unary call), is not waited for. Real engine (tiny
random-weight Llama), real loop thread; the handler is this test's thread."""

from __future__ import annotations

import time

import pytest
from worker_helpers import save_tiny_llama

from scission.engine.config import AttentionBackendKind, CacheConfig, EngineConfig
from scission.engine.engine_loop import EngineLoop
from scission.engine.llm_engine import LLMEngine
from scission.engine.request import SamplingParams

PROMPT = list(range(100, 120))
PARAMS = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
WITHHELD_S = 0.5  # an ack held back this long: a loop that does not wait steps meanwhile


@pytest.fixture(scope="module")
def engine(tmp_path_factory, tokenizer) -> LLMEngine:
    path = save_tiny_llama(str(tmp_path_factory.mktemp("tiny")), tokenizer)
    return LLMEngine(EngineConfig(model_path=path, num_threads=1,
                                  attention_backend=AttentionBackendKind.TORCH,
                                  cache=CacheConfig(block_size=16, num_blocks=32)))


def start(engine: LLMEngine, settle_timeout_s: float, rid: str):
    loop = EngineLoop(engine, settle_timeout_s=settle_timeout_s).start()
    q = loop.open_stream(rid)
    loop.add_to_stream(rid, q, lambda: engine.add_request(rid, PROMPT, PARAMS))
    return loop, q


def test_loop_waits_for_ack_before_next_step(engine):
    loop, q = start(engine, settle_timeout_s=30.0, rid="a")
    try:
        tokens = list(q.get(timeout=30).new_token_ids)
        loop.ack(q)  # from now on the loop waits for this stream after each step
        out = q.get(timeout=30)
        tokens += out.new_token_ids
        steps = loop.num_steps
        time.sleep(WITHHELD_S)  # not acked: no step may run, the next output must not come
        assert loop.num_steps == steps and q.empty()
        while out.finish_reason is None:
            loop.ack(q)
            out = q.get(timeout=30)
            tokens += out.new_token_ids
    finally:
        loop.close_stream("a", q)
        loop.stop()
    # the same tokens as the engine alone, without a loop (nothing lost or repeated)
    engine.add_request("ref", PROMPT, PARAMS)
    ref: list[int] = []
    while engine.has_unfinished():
        for o in engine.step():
            ref += o.new_token_ids
    assert len(tokens) == PARAMS.max_tokens and tokens == ref


def test_a_stream_that_misses_the_deadline_is_not_waited_for_again(engine):
    timeout_s = 2.0
    loop, q = start(engine, settle_timeout_s=timeout_s, rid="b")
    try:
        q.get(timeout=30)
        loop.ack(q)
        q.get(timeout=30)  # not acked: the loop waits for it once, timeout_s, then goes on
        start_s = time.monotonic()
        rest = [q.get(timeout=30) for _ in range(PARAMS.max_tokens - 2)]
        # waited once (timeout_s), then never again: far less than one wait per step
        assert time.monotonic() - start_s < timeout_s * 2.5
        assert rest[-1].finish_reason is not None
    finally:
        loop.close_stream("b", q)
        loop.stop()


def test_a_stream_that_never_acks_is_never_waited_for(engine):
    timeout_s = 2.0
    loop, q = start(engine, settle_timeout_s=timeout_s, rid="c")
    try:
        start_s = time.monotonic()
        outs = [q.get(timeout=30) for _ in range(PARAMS.max_tokens)]
        assert time.monotonic() - start_s < timeout_s  # 8 steps, not one wait among them
        assert outs[-1].finish_reason is not None
    finally:
        loop.close_stream("c", q)
        loop.stop()
