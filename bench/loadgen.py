"""Async gRPC load generator for ``scission.v1.Generation/Generate``.

Sends each workload request at its send time (or keeps a fixed number in flight), timestamps every
streamed chunk on arrival with ``time.perf_counter`` and turns what it saw into
``RequestRecord``s. It only ever connects to the ``address`` it is given (HTTP proxies disabled).

Bounds: each request has a gRPC deadline (``request_timeout_s``); the whole run stops by itself
after ``max_duration_s``: requests not yet sent are counted as not sent, requests in flight are
cancelled and recorded as failed with ``BENCH_DEADLINE``.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field

import grpc
from tqdm import tqdm

from scission.bench.metrics import BENCH_DEADLINE, RequestRecord
from scission.bench.workload import WorkloadRequest
from scission.proto.scission.v1 import generation_pb2, generation_pb2_grpc

logger = logging.getLogger(__name__)

_FAILED_FINISH = {
    generation_pb2.FINISH_REASON_ERROR: "FINISH_REASON_ERROR",
    generation_pb2.FINISH_REASON_ABORT: "FINISH_REASON_ABORT",
}


@dataclass(frozen=True)
class LoadGenConfig:
    """Bounds and progress display of a run (the target address is passed separately)."""

    request_timeout_s: float = 300.0
    max_duration_s: float = 1800.0
    connect_timeout_s: float = 10.0
    show_progress: bool = True  # tqdm bar on stderr

    def __post_init__(self) -> None:
        if min(self.request_timeout_s, self.max_duration_s, self.connect_timeout_s) <= 0:
            raise ValueError(f"timeouts must be > 0: {self}")


@dataclass(frozen=True)
class LoadResult:
    records: tuple[RequestRecord, ...]  # one per sent request, in send order
    duration_s: float  # benchmark start -> last request finished (or the duration bound)
    num_not_sent: int


def make_request(request: WorkloadRequest, request_id: str) -> generation_pb2.GenerateRequest:
    """Token-id prompt (or, for an image request, one user chat message: its text, then its
    images), greedy, exactly ``output_tokens`` new tokens (``ignore_eos``)."""
    sampling = generation_pb2.SamplingParams(
        temperature=0.0, max_tokens=request.output_tokens, ignore_eos=True
    )
    if not request.is_chat:
        return generation_pb2.GenerateRequest(
            request_id=request_id,
            token_ids=generation_pb2.TokenIds(ids=request.prompt_token_ids),
            sampling=sampling,
        )
    parts = [generation_pb2.ContentPart(text=request.text)] + [
        generation_pb2.ContentPart(image=generation_pb2.Image(data=i.data, mime_type=i.mime_type))
        for i in request.images
    ]
    message = generation_pb2.ChatMessage(role="user", parts=parts)
    return generation_pb2.GenerateRequest(
        request_id=request_id,
        chat=generation_pb2.ChatMessages(messages=[message]),
        sampling=sampling,
    )


@dataclass(slots=True)
class _Stream:
    """Mutable observation of one request while its stream runs."""

    request: WorkloadRequest
    request_id: str
    start_s: float
    scheduled_s: float | None
    chunk_times_s: list[float] = field(default_factory=list)
    chunk_tokens: list[int] = field(default_factory=list)
    end_s: float | None = None
    error: str | None = None
    error_detail: str = ""
    last: generation_pb2.GenerateResponse | None = None  # the chunk with finish_reason

    def to_record(self, now_s: float) -> RequestRecord:
        error, end_s = self.error, self.end_s
        if end_s is None:  # still in flight when the duration bound hit
            error, end_s = BENCH_DEADLINE, now_s
        usage = self.last.usage if self.last is not None else generation_pb2.Usage()
        finish = self.last.finish_reason if self.last is not None else 0
        return RequestRecord(
            request_id=self.request_id,
            # a chat request's prompt is tokenized by the router: its length is in the usage
            prompt_tokens=usage.prompt_tokens if self.request.is_chat
            else len(self.request.prompt_token_ids),
            output_tokens=sum(self.chunk_tokens),
            start_s=self.start_s,
            chunk_times_s=tuple(self.chunk_times_s),
            chunk_tokens=tuple(self.chunk_tokens),
            end_s=end_s,
            error=error,
            error_detail=self.error_detail,
            scheduled_s=self.scheduled_s,
            requested_output_tokens=self.request.output_tokens,
            finish_reason=generation_pb2.FinishReason.Name(finish),
            cached_tokens=usage.cached_tokens,
            server_ttft_ms=usage.ttft_ms if self.last is not None else None,
            prefill_worker=usage.prefill_worker,
            decode_worker=usage.decode_worker,
            images=usage.images,
            cached_images=usage.cached_images,
        )


class _Runner:
    """One benchmark run: a channel, a clock origin, the streams so far and a progress bar."""

    def __init__(
        self,
        config: LoadGenConfig,
        stub: generation_pb2_grpc.GenerationStub,
        requests: Sequence[WorkloadRequest],
        progress: tqdm,
    ) -> None:
        self.config = config
        self.stub = stub
        self.requests = requests
        # Ids are unique per run (a workload may be sent several times to the same router).
        run_tag = uuid.uuid4().hex[:8]
        self.messages = [make_request(r, f"{r.request_id}.{run_tag}") for r in requests]
        self.progress = progress
        self.streams: list[_Stream] = []
        self.t0 = time.perf_counter()

    def now_s(self) -> float:
        return time.perf_counter() - self.t0

    async def send(self, index: int, scheduled_s: float | None) -> None:
        message = self.messages[index]
        stream = _Stream(self.requests[index], message.request_id, self.now_s(), scheduled_s)
        self.streams.append(stream)
        call = self.stub.Generate(message, timeout=self.config.request_timeout_s)
        try:
            async for chunk in call:
                if chunk.token_ids:
                    stream.chunk_times_s.append(self.now_s())
                    stream.chunk_tokens.append(len(chunk.token_ids))
                if chunk.finish_reason != generation_pb2.FINISH_REASON_UNSPECIFIED:
                    stream.last = chunk
            stream.end_s = self.now_s()
            if stream.last is None:
                stream.error = "INCOMPLETE"
            else:
                stream.error = _FAILED_FINISH.get(stream.last.finish_reason)
        except grpc.aio.AioRpcError as e:
            stream.end_s = self.now_s()
            stream.error, stream.error_detail = e.code().name, e.details() or ""
        finally:
            call.cancel()  # no-op when the stream already ended
            self.progress.update(1)

    async def run_scheduled(self, send_times_s: Sequence[float], tasks: list[asyncio.Task]) -> None:
        """Start request i at ``send_times_s[i]`` (seconds from t0), without waiting for it."""
        for index, at_s in enumerate(send_times_s):
            delay_s = at_s - self.now_s()
            if delay_s > 0:
                await asyncio.sleep(delay_s)
            tasks.append(asyncio.create_task(self.send(index, scheduled_s=at_s)))
        await asyncio.gather(*tasks)

    async def run_concurrent(self, concurrency: int, tasks: list[asyncio.Task]) -> None:
        """Keep ``concurrency`` requests in flight until all are sent."""
        indices: Iterator[int] = iter(range(len(self.requests)))

        async def worker() -> None:
            for index in indices:  # shared iterator: each index is taken once
                await self.send(index, scheduled_s=None)

        tasks.extend(asyncio.create_task(worker()) for _ in range(concurrency))
        await asyncio.gather(*tasks)

    async def bounded(self, start: Callable[[list[asyncio.Task]], Awaitable[None]]) -> LoadResult:
        """Run ``start(tasks)`` under the duration bound; cancel what is left when it expires."""
        tasks: list[asyncio.Task] = []
        try:
            async with asyncio.timeout(self.config.max_duration_s):
                await start(tasks)
        except TimeoutError:
            logger.warning(
                "duration bound of %.1f s reached: %d in flight cancelled, %d not sent",
                self.config.max_duration_s,
                sum(s.end_s is None for s in self.streams),
                len(self.requests) - len(self.streams),
            )
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        now_s = self.now_s()
        return LoadResult(
            records=tuple(s.to_record(now_s) for s in self.streams),
            duration_s=now_s,
            num_not_sent=len(self.requests) - len(self.streams),
        )


async def run_load(
    address: str,
    config: LoadGenConfig,
    requests: Sequence[WorkloadRequest],
    send_times_s: Sequence[float] | None,
    concurrency: int = 1,
    label: str = "bench",
) -> LoadResult:
    """Send ``requests`` to the router at ``address`` (``host:port``) and record what comes back.

    ``send_times_s[i]`` is when request i is sent (seconds from the start, non-decreasing); with
    None, ``concurrency`` requests are kept in flight instead. ``label`` names the progress bar.

    Raises:
        ConnectionError: the router did not become reachable within ``connect_timeout_s``.
    """
    assert send_times_s is None or len(send_times_s) == len(requests), "one send time per request"
    if not address:
        raise ValueError("address is required")
    options = [("grpc.enable_http_proxy", 0)]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        try:
            await asyncio.wait_for(channel.channel_ready(), config.connect_timeout_s)
        except TimeoutError as e:
            raise ConnectionError(
                f"router at {address} not reachable within {config.connect_timeout_s} s"
            ) from e
        stub = generation_pb2_grpc.GenerationStub(channel)
        with tqdm(
            total=len(requests),
            desc=label,
            file=sys.stderr,
            disable=not config.show_progress,
            unit="req",
        ) as progress:
            runner = _Runner(config, stub, requests, progress)
            if send_times_s is None:
                return await runner.bounded(lambda t: runner.run_concurrent(concurrency, t))
            return await runner.bounded(lambda t: runner.run_scheduled(send_times_s, t))
