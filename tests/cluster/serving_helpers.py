"""Helpers for cluster tests (not collected: no test_ prefix)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from scission.cluster.client import GenerationResult, connect, generate
from scission.proto.scission.v1 import generation_pb2 as pb


def token_request(ids: list[int], max_tokens: int, **sampling) -> pb.GenerateRequest:
    sp = pb.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **sampling)
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), sampling=sp)


def run_concurrently(address: str, requests: list[pb.GenerateRequest],
                     in_flight: int) -> list[GenerationResult]:
    stub = connect(address)
    with ThreadPoolExecutor(in_flight) as ex:
        return list(ex.map(lambda r: generate(stub, r, timeout_s=600), requests))


def wait_until(pred, timeout_s: float, interval_s: float = 0.1) -> float:
    """Seconds until ``pred()`` held; raises AssertionError after ``timeout_s``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if pred():
            return time.monotonic() - start
        time.sleep(interval_s)
    raise AssertionError(f"condition not met within {timeout_s}s")
