"""Drives an ``LLMEngine`` from one thread so gRPC handler threads can talk to it.

Handlers ``call(fn)`` to run a function on the loop thread (the engine is single-threaded)
and read a request's ``RequestOutput`` deltas from its own queue. Between steps the loop
runs periodic hooks (KV notifications, held-block timeouts, KV events, stats).
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
from scission.engine.request import FinishReason

logger = logging.getLogger(__name__)
T = TypeVar("T")

FINISHED_ABORT = RequestOutput("", (), "", FinishReason.ABORT, 0, 0)
# Put on the stream of a request evicted by ``evict_all`` (a draining worker past its
# deadline); compared by identity: the servicer ends the call with UNAVAILABLE so the router
# migrates the request.
MIGRATE = RequestOutput("", (), "", FinishReason.ABORT, 0, 0)


class EngineLoop:
    def __init__(self, engine: LLMEngine, idle_wait_s: float = 0.05) -> None:
        self.engine = engine
        self.idle_wait_s = idle_wait_s
        self._commands: queue.SimpleQueue[tuple[Callable[[], object], Future]] = queue.SimpleQueue()
        self._outputs: dict[str, queue.SimpleQueue[RequestOutput]] = {}
        self._hooks: list[Callable[[], None]] = []
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
        """Register the output queue for a request before adding it to the engine."""
        q: queue.SimpleQueue[RequestOutput] = queue.SimpleQueue()
        self._outputs[request_id] = q
        return q

    def close_stream(self, request_id: str) -> None:
        self._outputs.pop(request_id, None)

    def abort(self, request_id: str) -> bool:
        """Abort wherever the request is; its stream gets a final ABORT output."""
        def _abort() -> bool:
            found = self.engine.abort(request_id)
            q = self._outputs.pop(request_id, None)
            if q is not None:
                q.put(FINISHED_ABORT)
            return found

        return self.call(_abort)

    def evict_all(self) -> int:
        """Abort every request that has an open stream and put ``MIGRATE`` on it (a draining
        worker past its deadline: the caller migrates the request). Returns how many."""
        def _evict() -> int:
            streams, self._outputs = self._outputs, {}
            for rid, q in streams.items():
                self.engine.abort(rid)
                q.put(MIGRATE)
            return len(streams)

        return self.call(_evict)

    # -- loop thread ----------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            busy = self.engine.has_unfinished()
            self._drain_commands(block=not busy)
            for hook in self._hooks:
                self._guarded(hook)
            if self.engine.has_unfinished():
                self._step()

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
                q = self._outputs.pop(rid, None)
                if q is not None:
                    q.put(RequestOutput(rid, (), "", FinishReason.ERROR, 0, 0))
            return
        self.num_steps += 1
        for out in outputs:
            q = self._outputs.get(out.request_id)
            if q is not None:
                q.put(out)
                if out.finish_reason is not None:
                    self._outputs.pop(out.request_id, None)

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
