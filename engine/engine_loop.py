"""Drives an ``LLMEngine`` from one thread so gRPC handler threads can talk to it.

Handlers ``call(fn)`` to run a function on the loop thread (the engine is single-threaded)
and read a request's ``RequestOutput`` deltas from its own queue. Between steps the loop
runs periodic hooks (KV notifications, held-block timeouts, KV events, stats).

Settling: a streaming handler ``ack``s each output once gRPC has sent it. After a step the
loop waits (at most ``settle_timeout_s``) until every acking stream that got an output has
acked, so the handlers' per-token Python (chunk, send, completion) runs between steps
instead of inside the next one, where it likely costs more than its CPU time: the engine
thread gives up the GIL at every torch op and, when every core runs a torch thread, may wait
to get it back from a handler thread that the scheduler preempted (the worker's decode step
measured 1.18-1.26x the engine alone's at batch 8, 2 threads on 2 cores, with ~1 % of the
CPU in other threads; after this change 1.06x, within that benchmark's noise:
``bench/worker_vs_engine.py``, bench/README.md "Worker vs engine alone"). A stream that
misses the deadline is not waited for again until it acks (a client that stops reading
costs one timeout, not one per step). The larger part of that gap turned out to be OpenMP,
not the GIL: a second OpenMP team in the process made the loop's intra-op thread sleep
between ops (``in_scratch_thread``).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

from scission.engine.llm_engine import LLMEngine, RequestOutput
from scission.engine.request import DuplicateRequestError, FinishReason

logger = logging.getLogger(__name__)
T = TypeVar("T")

FINISHED_ABORT = RequestOutput("", (), "", FinishReason.ABORT, 0, 0)
# Put on the stream of a request evicted by ``evict_all`` (a draining worker past its
# deadline); compared by identity: the servicer ends the call with UNAVAILABLE so the router
# migrates the request.
MIGRATE = RequestOutput("", (), "", FinishReason.ABORT, 0, 0)


def in_scratch_thread(fn: Callable[[], T]) -> T:
    """Run ``fn()`` in a new thread that exits when it returns; its result (or exception)
    comes back here. For building an engine (weights, KV cache, compile) in a process whose
    steps run on another thread (``EngineLoop``'s).

    Why: libgomp (torch's OpenMP on Linux) gives every thread that starts a parallel region
    a team of its own, kept until that thread exits, and once the process has more OpenMP
    threads than CPUs every waiting team thread spins ~100 times instead of ~300,000 before
    it sleeps on a futex (``do_spin``, libgomp/config/linux/wait.h: ``gomp_managed_threads >
    gomp_available_cpus``). A worker that loaded its model on Ray's actor thread then stepped
    on the loop thread had two teams: its intra-op thread slept and was woken between nearly
    every op of a step (~240 futex sleeps per step at batch 8, vs none in an engine alone)
    and ran at ~50 % of a core instead of ~100 %. A thread that exits frees its team, so the
    loop thread's is the only one left.

    Raises:
        BaseException: whatever ``fn`` raised.
    """
    result: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.append(fn())
        except BaseException as e:  # re-raised on the caller's thread
            error.append(e)

    t = threading.Thread(target=run, name="engine-build")
    t.start()
    t.join()
    if error:
        raise error[0]
    return result[0]


class StreamClosedError(RuntimeError):
    """The request's stream was aborted (or evicted) before the request was added."""


class EngineLoop:
    def __init__(self, engine: LLMEngine, idle_wait_s: float = 0.05,
                 settle_timeout_s: float = 0.01) -> None:
        self.engine = engine
        self.idle_wait_s = idle_wait_s
        self.settle_timeout_s = settle_timeout_s
        self._commands: queue.SimpleQueue[tuple[Callable[[], object], Future]] = queue.SimpleQueue()
        # request_id -> its output queue; written by handler threads (open/close) and the
        # loop thread, under the lock
        self._outputs: dict[str, queue.SimpleQueue[RequestOutput]] = {}
        self._streams_lock = threading.Lock()
        self._hooks: list[Callable[[], None]] = []
        # Settling (module docstring), under _acked: streams that ack; those that got an
        # output this step and have not acked it; those that missed a deadline
        self._acked = threading.Condition(threading.Lock())
        self._acking: set[queue.SimpleQueue[RequestOutput]] = set()
        self._unacked: set[queue.SimpleQueue[RequestOutput]] = set()
        self._lagging: set[queue.SimpleQueue[RequestOutput]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self.num_steps = 0

    def start(self) -> EngineLoop:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._commands.put((lambda: None, Future()))
        self._thread.join(timeout=10)

    def add_hook(self, hook: Callable[[], None]) -> None:
        """``hook()`` runs on the loop thread between steps (keep it cheap)."""
        self._hooks.append(hook)

    def remove_hook(self, hook: Callable[[], None]) -> None:
        """Stop running ``hook`` (a servicer swapped out by a role flip); no-op if absent."""
        self.call(lambda: self._hooks.remove(hook) if hook in self._hooks else None)

    def call(self, fn: Callable[[], T], timeout_s: float | None = 30.0) -> T:
        """Run ``fn`` on the loop thread and return its result (re-raises its exception)."""
        fut: Future = Future()
        self._commands.put((fn, fut))
        return fut.result(timeout=timeout_s)

    def open_stream(self, request_id: str) -> queue.SimpleQueue[RequestOutput]:
        """Claim ``request_id`` for a new request: register its output queue before adding it
        (``add_to_stream``). The queue is the request's identity on this worker: closing and
        aborting name it, so they never touch another request that later takes the id.

        Raises:
            DuplicateRequestError: the id has an open stream or is running or held in the
                engine; the existing request and its stream are untouched.
        """
        q: queue.SimpleQueue[RequestOutput] = queue.SimpleQueue()
        with self._streams_lock:
            # engine.knows reads two dicts from this thread: a stale answer only moves the
            # refusal to add_to_stream (the engine refuses a duplicate there too)
            if request_id in self._outputs or self.engine.knows(request_id):
                raise DuplicateRequestError(f"request_id {request_id!r} is already in use "
                                            "on this worker")
            self._outputs[request_id] = q
        return q

    def add_to_stream(self, request_id: str, q: queue.SimpleQueue[RequestOutput],
                      add: Callable[[], T]) -> T:
        """Run ``add()`` (which adds the request to the engine) on the loop thread, if ``q``
        is still the request's stream; returns what ``add`` returns.

        Raises:
            StreamClosedError: the stream was aborted or evicted since ``open_stream``
                (``add`` is not run).
            DuplicateRequestError, ValueError: from ``add``.
        """
        def _add() -> T:
            if self._outputs.get(request_id) is not q:
                raise StreamClosedError(f"request {request_id} was aborted before it started")
            return add()

        return self.call(_add)

    def close_stream(self, request_id: str, q: queue.SimpleQueue[RequestOutput]) -> None:
        """Forget the stream ``q`` of ``request_id``; no-op if the id now has another one."""
        self._take_stream(request_id, q)
        with self._acked:
            for streams in (self._acking, self._unacked, self._lagging):
                streams.discard(q)
            if not self._unacked:
                self._acked.notify()

    def ack(self, q: queue.SimpleQueue[RequestOutput]) -> None:
        """The handler of stream ``q`` has passed on the last output it took (gRPC sent it).
        A stream that acks once is waited for after each step that gives it an output
        (module docstring); one that never acks (a unary call) never is."""
        with self._acked:
            self._acking.add(q)
            self._unacked.discard(q)
            self._lagging.discard(q)
            if not self._unacked:
                self._acked.notify()

    def abort(self, request_id: str, q: queue.SimpleQueue[RequestOutput] | None = None) -> bool:
        """Abort wherever the request is; its stream gets a final ABORT output. With ``q``,
        only if ``q`` is still the request's stream (the caller's own request, not a later
        one with the same id). Returns whether a request was found."""
        def _abort() -> bool:
            if q is not None and self._outputs.get(request_id) is not q:
                return False
            found = self.engine.abort(request_id)
            stream = self._take_stream(request_id)
            if stream is not None:
                stream.put(FINISHED_ABORT)
            return found

        return self.call(_abort)

    def evict_all(self) -> int:
        """Abort every request that has an open stream and put ``MIGRATE`` on it (a draining
        worker past its deadline: the caller migrates the request). Returns how many."""
        def _evict() -> int:
            with self._streams_lock:
                streams, self._outputs = self._outputs, {}
            for rid, q in streams.items():
                self.engine.abort(rid)
                q.put(MIGRATE)
            return len(streams)

        return self.call(_evict)

    def _take_stream(self, request_id: str, q: queue.SimpleQueue[RequestOutput] | None = None
                     ) -> queue.SimpleQueue[RequestOutput] | None:
        """Remove and return the stream of ``request_id`` (only if it is ``q``, when given)."""
        with self._streams_lock:
            current = self._outputs.get(request_id)
            if current is None or (q is not None and current is not q):
                return None
            return self._outputs.pop(request_id)

    # -- loop thread ----------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            busy = self.engine.has_unfinished()
            self._drain_commands(block=not busy)
            for hook in self._hooks:
                self._guarded(hook)
            if self.engine.has_unfinished():
                self._step()
                self._settle()

    def _drain_commands(self, block: bool) -> None:
        try:
            fn, fut = self._commands.get(timeout=self.idle_wait_s) if block else \
                self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except BaseException as e:  # delivered to the caller, loop goes on
                    fut.set_exception(e)
            try:
                fn, fut = self._commands.get_nowait()
            except queue.Empty:
                return

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception:
            logger.exception("engine step failed; aborting its running requests")
            for rid in list(self.engine.requests):
                self.engine.abort(rid)
                q = self._take_stream(rid)
                if q is not None:
                    q.put(RequestOutput(rid, (), "", FinishReason.ERROR, 0, 0))
            return
        self.num_steps += 1
        for out in outputs:
            q = self._outputs.get(out.request_id)
            if q is not None:
                if q in self._acking:  # read here, written by ack(): a stale answer only
                    with self._acked:  # skips or adds one wait (bounded by the timeout)
                        if q not in self._lagging:
                            self._unacked.add(q)
                q.put(out)
                if out.finish_reason is not None:
                    self._take_stream(out.request_id, q)

    def _settle(self) -> None:
        """Wait until the acking streams have passed on this step's outputs, at most
        ``settle_timeout_s``; those still unacked then are not waited for until they ack."""
        with self._acked:
            if self._unacked and not self._acked.wait_for(lambda: not self._unacked,
                                                          self.settle_timeout_s):
                self._lagging |= self._unacked
                self._unacked.clear()

    def _guarded(self, hook: Callable[[], None]) -> None:
        try:
            hook()
        except Exception:
            logger.exception("engine loop hook %r failed", hook)


def wait_output(q: queue.SimpleQueue[RequestOutput], timeout_s: float,
                is_active: Callable[[], bool] = lambda: True) -> RequestOutput | None:
    """Next output, or None when ``timeout_s`` passes or ``is_active()`` turns False."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and is_active():
        try:
            return q.get(timeout=0.1)
        except queue.Empty:
            continue
    return None
