"""List-then-watch over etcd key prefixes: the loop shared by every in-memory etcd view.

A view (``WorkerDirectory``, the router's KV-block index) is rebuilt by ``resync()`` from range
reads at one revision R, then follows a single Watch stream over its prefixes from R + 1. When the
stream breaks (etcd error, compaction, cancel, end of stream) the loop calls ``resync()`` again
and re-watches from its new revision, retrying every ``retry_interval_s`` while etcd is down.

python3-etcd3 0.13's ``etcd3.watch.Watcher`` dies with ``NameError: six`` when its stream fails
and leaves its iterators blocked forever, so this drives the raw ``etcdrpc.WatchStub`` stream.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import etcd3
import grpc
from etcd3 import etcdrpc
from etcd3.utils import prefix_range_end

logger = logging.getLogger(__name__)

ETCD_ERRORS = (etcd3.Etcd3Exception, grpc.RpcError)  # what a call to etcd may raise

Resync = Callable[[], int]  # rebuild the view from range reads; returns their revision
Apply = Callable[[Sequence[Any], int], None]  # (watch events, response header revision)


class ResyncNeeded(Exception):
    """The watch cannot go on (compacted, canceled, ended): re-list, then re-watch."""


class WatchLoop:
    """Runs ``resync`` once in ``start()``, then a thread applies watch responses in order.

    Args:
        client: from ``registry.connect``.
        prefixes: key prefixes watched on one stream (so their events arrive in revision order).
        resync: rebuilds the caller's view; returns the etcd revision it reflects. Raises etcd
            errors (retried by the loop; raised to the caller of ``start()``).
        apply: called on the loop thread with each response's events (``etcdrpc`` ``Event``
            messages, possibly none for a progress notification) and its header revision.
        retry_interval_s: wait between attempts while etcd is unreachable.
        name: for logs and the thread name.
    """

    def __init__(self, client: etcd3.MultiEndpointEtcd3Client, prefixes: Sequence[str],
                 resync: Resync, apply: Apply, retry_interval_s: float, name: str) -> None:
        self._client = client
        self._prefixes = tuple(p.encode() for p in prefixes)
        self._resync = resync
        self._apply = apply
        self._retry_interval_s = retry_interval_s
        self._name = name
        self._lock = threading.Lock()  # guards _call and _requests
        self._call: Any = None  # the live gRPC Watch stream, cancelled by close()
        self._requests: queue.SimpleQueue[etcdrpc.WatchRequest | None] | None = None
        self._revision = 0  # revision the caller's view reflects (resync or last response)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.num_resyncs = 0  # metric: range-read rebuilds (the first one included)

    @property
    def started(self) -> bool:
        return self._thread is not None

    @property
    def revision(self) -> int:
        return self._revision

    def start(self) -> None:
        """Run the first resync (raises etcd errors) and start following the watch."""
        assert self._thread is None, f"{self._name}: WatchLoop.start called twice"
        self._do_resync()
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the thread; idempotent."""
        self._stop.set()
        with self._lock:
            call = self._call
        if call is not None:
            call.cancel()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()

    def request_progress(self) -> bool:
        """Ask etcd for a progress notification on the live stream (etcd >= 3.4): an event-less
        response whose header revision says every event up to it was delivered. False if no
        stream is open right now."""
        with self._lock:
            requests = self._requests
        if requests is None:
            return False
        requests.put(etcdrpc.WatchRequest(progress_request=etcdrpc.WatchProgressRequest()))
        return True

    def _do_resync(self) -> None:
        self._revision = self._resync()
        self.num_resyncs += 1

    def _run(self) -> None:
        synced, failures = True, 0  # synced: the view matches etcd at self._revision
        while not self._stop.is_set():
            try:
                if not synced:
                    self._do_resync()
                    if failures:
                        logger.info("%s watch recovered after %d failures", self._name, failures)
                    failures = 0
                synced = False
                self._watch()
            except ResyncNeeded as exc:
                logger.info("%s watch: %s; re-listing", self._name, exc)
            except ETCD_ERRORS as exc:
                if self._stop.is_set():
                    return
                failures += 1
                log = logger.warning if failures == 1 else logger.debug  # once per outage
                log("%s watch failed (%d in a row): %s; retrying every %.1fs", self._name,
                    failures, describe_etcd_error(exc), self._retry_interval_s)
                self._stop.wait(self._retry_interval_s)

    def _watch(self) -> None:
        """Follow every prefix from revision + 1 on one raw Watch stream until it breaks."""
        requests: queue.SimpleQueue[etcdrpc.WatchRequest | None] = queue.SimpleQueue()
        for prefix in self._prefixes:
            create = etcdrpc.WatchCreateRequest(
                key=prefix, range_end=prefix_range_end(prefix), start_revision=self._revision + 1
            )
            requests.put(etcdrpc.WatchRequest(create_request=create))
        stub = etcdrpc.WatchStub(self._client.channel)
        call = stub.Watch(_drain(requests), credentials=self._client.call_credentials,
                          metadata=self._client.metadata)
        with self._lock:
            self._call, self._requests = call, requests
        try:
            if self._stop.is_set():  # close() ran before the call was published
                call.cancel()
            for response in call:
                if response.compact_revision:
                    raise ResyncNeeded(f"revision {response.compact_revision} compacted")
                if response.canceled:
                    raise ResyncNeeded(f"watch canceled: {response.cancel_reason}")
                if response.created and not response.events:
                    continue
                self._apply(response.events, response.header.revision)
                self._revision = max(self._revision, response.header.revision)
            raise ResyncNeeded("watch stream ended")
        finally:
            requests.put(None)  # ends the request iterator (and gRPC's thread consuming it)
            with self._lock:
                self._call, self._requests = None, None


def describe_etcd_error(exc: BaseException) -> str:
    """One line for an etcd error (a grpc.RpcError's repr spans several lines)."""
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        return f"{exc.code().name}: {exc.details()}"
    return repr(exc)


def _drain(requests: queue.SimpleQueue[Any]) -> Iterator[Any]:
    while (request := requests.get()) is not None:
        yield request
