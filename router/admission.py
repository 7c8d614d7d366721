"""Admission control: a per-router bound on requests in flight and on queued prompt tokens.

A request is admitted after validation (its prompt length is known) and before placement.
It holds one slot until it ends (finished, failed or cancelled), and its prompt tokens count
as *queued* until its first token reaches the client (the prefill is done). Beyond either
bound the request is refused at once (gRPC ``RESOURCE_EXHAUSTED``, HTTP 429 with
``Retry-After``): nothing waits in an unbounded queue inside the router.

A prompt longer than ``max_queued_prompt_tokens`` is still admitted when no prompt tokens are
queued, so a long (but valid) prompt is delayed by load, never refused forever.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class AdmissionStats:
    num_requests: int  # admitted and not yet ended
    queued_prompt_tokens: int  # of admitted requests that have no first token yet
    num_rejected: int  # since start


class OverCapacityError(Exception):
    """Admitting the request would exceed a bound (gRPC RESOURCE_EXHAUSTED, HTTP 429)."""


class Ticket:
    """One admitted request's hold on the bounds; ``first_token()`` and ``release()`` are
    idempotent, and ``release()`` also drops the queued tokens if they are still held."""

    __slots__ = ("_admission", "num_prompt_tokens", "_queued", "_held")

    def __init__(self, admission: Admission, num_prompt_tokens: int) -> None:
        self._admission = admission
        self.num_prompt_tokens = num_prompt_tokens
        self._queued = True
        self._held = True

    def first_token(self) -> None:
        """The prompt is computed: its tokens leave the queue."""
        if self._queued:
            self._queued = False
            self._admission._dequeue(self.num_prompt_tokens)

    def release(self) -> None:
        self.first_token()
        if self._held:
            self._held = False
            self._admission._end()


class Admission:
    """Thread-safe counters; ``admit`` never blocks."""

    def __init__(self, max_requests: int, max_queued_prompt_tokens: int) -> None:
        assert max_requests > 0 and max_queued_prompt_tokens > 0, "admission bounds must be > 0"
        self.max_requests = max_requests
        self.max_queued_prompt_tokens = max_queued_prompt_tokens
        self._lock = threading.Lock()
        self._num_requests = 0
        self._queued_tokens = 0
        self._num_rejected = 0

    def admit(self, num_prompt_tokens: int) -> Ticket:
        """A ticket; raises ``OverCapacityError`` (counted) when admitting would exceed a
        bound."""
        with self._lock:
            n, queued = self._num_requests, self._queued_tokens
            if n >= self.max_requests:
                reason = f"{n} requests in flight, limit {self.max_requests}"
            elif queued > 0 and queued + num_prompt_tokens > self.max_queued_prompt_tokens:
                reason = (f"{queued} prompt tokens queued + {num_prompt_tokens} would exceed "
                          f"the limit {self.max_queued_prompt_tokens}")
            else:
                self._num_requests += 1
                self._queued_tokens += num_prompt_tokens
                return Ticket(self, num_prompt_tokens)
            self._num_rejected += 1
        raise OverCapacityError(f"router over capacity: {reason}; retry later")

    def stats(self) -> AdmissionStats:
        with self._lock:
            return AdmissionStats(self._num_requests, self._queued_tokens, self._num_rejected)

    def _dequeue(self, num_prompt_tokens: int) -> None:
        with self._lock:
            self._queued_tokens -= num_prompt_tokens
            assert self._queued_tokens >= 0, "queued prompt tokens went negative"

    def _end(self) -> None:
        with self._lock:
            self._num_requests -= 1
            assert self._num_requests >= 0, "requests in flight went negative"
