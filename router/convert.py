"""Public API (``scission.v1``) -> validated internal request. Bad input raises
``InvalidRequestError`` naming the field; the servicer maps it to a gRPC status."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from scission.engine.request import FinishReason, InvalidRequestError, SamplingParams
from scission.engine.tokenizer import Tokenizer
from scission.proto.scission.v1 import generation_pb2 as pb

FINISH_TO_PROTO = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "abort": pb.FINISH_REASON_ABORT,
    "error": pb.FINISH_REASON_ERROR,
}
MAX_REQUEST_ID_CHARS = 256


@dataclass(frozen=True)
class UndecodableRequest:
    """What ``parse_generate_request`` gives for bytes that are not a ``GenerateRequest``
    (e.g. a string field with invalid UTF-8): ``validate`` answers it INVALID_ARGUMENT,
    where gRPC's own deserializer failure would end the call INTERNAL, uncounted."""

    error: str


def parse_generate_request(data: bytes) -> pb.GenerateRequest | UndecodableRequest:
    """The Generation service's request deserializer (``router/server.py``); never raises."""
    try:
        return pb.GenerateRequest.FromString(data)
    except DecodeError as e:
        return UndecodableRequest(str(e))


@dataclass(frozen=True)
class ValidatedRequest:
    request_id: str  # internal identity, assigned here (unguessable); workers key on it
    prompt_token_ids: list[int]
    params: SamplingParams
    # The client's ``request_id`` (or one made up when it sent none): a label echoed back in
    # every response and written in logs, never an identity inside the cluster, so two
    # clients sending the same id cannot touch each other's requests.
    client_request_id: str = ""


def sampling_from_proto(m: pb.SamplingParams, default_max_tokens: int) -> SamplingParams:
    kw = dict(
        temperature=m.temperature if m.HasField("temperature") else 1.0,
        top_k=m.top_k if m.HasField("top_k") else 0,
        top_p=m.top_p if m.HasField("top_p") else 1.0,
        seed=m.seed if m.HasField("seed") else None,
        max_tokens=m.max_tokens if m.HasField("max_tokens") else default_max_tokens,
        stop=tuple(m.stop), stop_token_ids=tuple(m.stop_token_ids), ignore_eos=m.ignore_eos,
    )
    try:
        return SamplingParams(**kw)
    except InvalidRequestError as e:
        raise InvalidRequestError(f"sampling.{e.field}", str(e).split(": ", 1)[-1]) from None


def _refuse_oversized_text(field: str, texts: list[str], tokenizer: Tokenizer,
                           limit: int) -> None:
    """OUT_OF_RANGE before tokenizing when the text alone must exceed ``limit`` tokens
    (``Tokenizer.max_token_bytes``): a multi-megabyte prompt costs no tokenizer time."""
    per_token = tokenizer.max_token_bytes
    if per_token is None or 4 * sum(map(len, texts)) <= limit * per_token:
        return  # no bound, or too short to matter (UTF-8: at most 4 bytes a character)
    num_bytes = sum(len(t.encode("utf-8")) for t in texts)
    at_least = -(-num_bytes // per_token)
    if at_least > limit:
        raise InvalidRequestError(field, f"prompt has at least {at_least} tokens ({num_bytes} "
                                  f"bytes), limit {limit}", True)


def prompt_ids(req: pb.GenerateRequest, tokenizer: Tokenizer,
               limit: int | None = None) -> list[int]:
    """The prompt's token ids. ``limit`` (tokens): text that cannot fit is refused
    before it is tokenized."""
    kind = req.WhichOneof("input")
    if kind is None:
        raise InvalidRequestError("input", "one of prompt, chat or token_ids is required")
    if kind == "prompt":
        if not req.prompt.strip():
            raise InvalidRequestError("prompt", "must not be empty")
        if limit is not None:
            _refuse_oversized_text("input", [req.prompt], tokenizer, limit)
        return tokenizer.encode(req.prompt)
    if kind == "chat":
        msgs = [{"role": m.role, "content": m.content} for m in req.chat.messages]
        if not msgs:
            raise InvalidRequestError("chat.messages", "must not be empty")
        if limit is not None:
            _refuse_oversized_text("input", [m["content"] for m in msgs], tokenizer, limit)
        return tokenizer.apply_chat_template(msgs)
    ids = list(req.token_ids.ids)
    if not ids:
        raise InvalidRequestError("token_ids", "must not be empty")
    bad = next((t for t in ids if not 0 <= t < tokenizer.vocab_size), None)
    if bad is not None:
        raise InvalidRequestError("token_ids", f"id {bad} outside [0, {tokenizer.vocab_size})")
    return ids


def validate(req: pb.GenerateRequest, tokenizer: Tokenizer, context_len: int,
             default_max_tokens: int, max_tokens_limit: int,
             max_prompt_tokens: int | None) -> ValidatedRequest:
    """Raises InvalidRequestError (field named; ``out_of_range`` for length limits)."""
    if isinstance(req, UndecodableRequest):
        raise InvalidRequestError("request", f"not a valid scission.v1.GenerateRequest "
                                  f"({req.error.rsplit(': ', 1)[-1]})")
    if len(req.request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidRequestError("request_id", f"longer than {MAX_REQUEST_ID_CHARS} chars")
    params = sampling_from_proto(req.sampling, default_max_tokens)
    if params.max_tokens > max_tokens_limit:
        raise InvalidRequestError("sampling.max_tokens",
                                  f"{params.max_tokens} > limit {max_tokens_limit}", True)
    limit = min(max_prompt_tokens or context_len, context_len)
    ids = prompt_ids(req, tokenizer, limit)
    if len(ids) > limit:
        raise InvalidRequestError("input", f"prompt has {len(ids)} tokens, limit {limit}", True)
    if len(ids) + params.max_tokens > context_len:
        raise InvalidRequestError(
            "sampling.max_tokens", f"prompt ({len(ids)} tokens) + max_tokens "
            f"({params.max_tokens}) exceeds the context length ({context_len})", True)
    return ValidatedRequest(f"r-{uuid.uuid4().hex}", ids, params,
                            req.request_id or f"req-{uuid.uuid4().hex}")


def finish_to_proto(reason: str | FinishReason | None) -> int:
    if isinstance(reason, FinishReason):
        reason = reason.value
    return FINISH_TO_PROTO.get(reason or "", pb.FINISH_REASON_UNSPECIFIED)
