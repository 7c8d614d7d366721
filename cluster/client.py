"""A small client for the public API, used by ``scission generate`` and ``scission demo``."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import grpc

from scission.proto.scission.v1 import generation_pb2 as pb
from scission.proto.scission.v1 import generation_pb2_grpc as pb_grpc

FINISH_NAMES = {v: k.removeprefix("FINISH_REASON_").lower()
                for k, v in pb.FinishReason.items()}


@dataclass
class GenerationResult:
    """One finished request, as ``scission generate --json`` prints it."""

    request_id: str = ""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    ttft_ms: float = 0.0  # router-measured
    tpot_ms: float = 0.0
    e2e_ms: float = 0.0
    client_ttft_ms: float = 0.0  # measured here, includes the network
    prefill_worker: str = ""
    decode_worker: str = ""
    error: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def make_request(prompt: str, chat: bool, max_tokens: int, temperature: float,
                 top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                 stop: tuple[str, ...] = (), system: str | None = None) -> pb.GenerateRequest:
    sp = pb.SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k,
                           max_tokens=max_tokens, stop=list(stop))
    if seed is not None:
        sp.seed = seed
    if not chat:
        return pb.GenerateRequest(prompt=prompt, sampling=sp)
    msgs = ([pb.ChatMessage(role="system", content=system)] if system else []) + [
        pb.ChatMessage(role="user", content=prompt)]
    return pb.GenerateRequest(chat=pb.ChatMessages(messages=msgs), sampling=sp)


def generate(stub: pb_grpc.GenerationStub, request: pb.GenerateRequest, timeout_s: float = 600,
             on_text=None) -> GenerationResult:
    """Run one request to completion; ``on_text(delta)`` sees the stream as it arrives.
    gRPC errors are returned in ``error`` (code: details), not raised."""
    res, start = GenerationResult(), time.monotonic()
    try:
        for chunk in stub.Generate(request, timeout=timeout_s):
            if not res.token_ids and chunk.token_ids:
                res.client_ttft_ms = (time.monotonic() - start) * 1e3
            res.request_id = chunk.request_id
            res.token_ids.extend(chunk.token_ids)
            res.text += chunk.text
            if on_text and chunk.text:
                on_text(chunk.text)
            if chunk.finish_reason:
                _finish(res, chunk)
    except grpc.RpcError as e:
        res.error = f"{e.code().name}: {e.details()}"
    return res


def _finish(res: GenerationResult, chunk: pb.GenerateResponse) -> None:
    u = chunk.usage
    res.finish_reason = FINISH_NAMES.get(chunk.finish_reason, "unspecified")
    res.prompt_tokens, res.output_tokens, res.cached_tokens = (
        u.prompt_tokens, u.output_tokens, u.cached_tokens)
    res.ttft_ms, res.tpot_ms, res.e2e_ms = u.ttft_ms, u.tpot_ms, u.e2e_ms
    res.prefill_worker, res.decode_worker = u.prefill_worker, u.decode_worker


def connect(address: str) -> pb_grpc.GenerationStub:
    return pb_grpc.GenerationStub(grpc.insecure_channel(address))
