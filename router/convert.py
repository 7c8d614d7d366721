"""Public API (``scission.v1``) -> validated internal request. Bad input raises
``InvalidRequestError`` naming the field; the servicer maps it to a gRPC status."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import NamedTuple

from google.protobuf.message import DecodeError

from scission.engine.request import FinishReason, InvalidRequestError, SamplingParams
from scission.engine.tokenizer import Tokenizer
from scission.proto.scission.internal.v1 import worker_pb2 as wpb
from scission.proto.scission.v1 import generation_pb2 as pb
from scission.registry.workers import WorkerInfo
from scission.router.images import ImageData, ImageLimits, check_image_count, validate_image

FINISH_TO_PROTO = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "abort": pb.FINISH_REASON_ABORT,
    "error": pb.FINISH_REASON_ERROR,
}
MAX_REQUEST_ID_CHARS = 256
DEFAULT_IMAGE_LIMITS = ImageLimits()


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
    # Chat input, parsed: [{"role": str, "content": str | list[part]}], a part being
    # {"type": "text", "text": str} or {"type": "image", "index": k} (k indexes ``images``).
    # ``content`` is a list only in messages holding an image (text parts of other messages
    # are joined, as the chat template takes them). Empty for prompt and token_ids input.
    chat_messages: list[dict] = field(default_factory=list)
    # The images of a chat request, in message and part order. With images the prompt is
    # not tokenized here (its image segments come from the encode step): prompt_token_ids
    # is [] and chat_messages + images describe the prompt; the prompt-length checks wait
    # for the built prompt.
    images: tuple[ImageData, ...] = ()
    # Set by the encode step (``router/encode_step.py``) once the images are encoded: the
    # built prompt holds their segments; the refs name the embeddings; the pins are what
    # to release if the request ends before its prefill pulled them.
    image_refs: tuple[wpb.ImageRef, ...] = ()
    image_pins: tuple[tuple[WorkerInfo, str], ...] = ()
    num_cached_images: int = 0  # images served from an embedding cache, not encoded


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


class ParsedChat(NamedTuple):
    """``chat_messages`` (as on ``ValidatedRequest``) and, for each image part in order, its
    field name (``chat.messages[i].parts[j].image``) and encoded bytes (not yet checked)."""

    messages: list[dict]
    image_fields: list[str]
    image_bytes: list[bytes]


def parse_chat(chat: pb.ChatMessages) -> ParsedChat:
    """The messages in the chat template's shape; images are collected, not decoded.

    Raises:
        InvalidRequestError: a message with both ``content`` and ``parts``, or a part with
            neither text nor image.
    """
    parsed = ParsedChat([], [], [])
    for i, m in enumerate(chat.messages):
        if not m.parts:
            parsed.messages.append({"role": m.role, "content": m.content})
            continue
        if m.content:
            raise InvalidRequestError(f"chat.messages[{i}]", "set content or parts, not both")
        parts: list[dict] = []
        for j, part in enumerate(m.parts):
            kind = part.WhichOneof("part")
            if kind is None:
                raise InvalidRequestError(f"chat.messages[{i}].parts[{j}]",
                                          "one of text or image is required")
            if kind == "text":
                parts.append({"type": "text", "text": part.text})
                continue
            parts.append({"type": "image", "index": len(parsed.image_bytes)})
            parsed.image_fields.append(f"chat.messages[{i}].parts[{j}].image")
            parsed.image_bytes.append(part.image.data)
        has_image = any(p["type"] == "image" for p in parts)
        content = parts if has_image else "".join(p["text"] for p in parts)
        parsed.messages.append({"role": m.role, "content": content})
    return parsed


def _texts(messages: list[dict]) -> list[str]:
    """Every text of ``chat_messages``: string contents and text parts."""
    texts: list[str] = []
    for m in messages:
        content = m["content"]
        if isinstance(content, str):
            texts.append(content)
        else:
            texts.extend(p["text"] for p in content if p["type"] == "text")
    return texts


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
               limit: int | None = None, chat: ParsedChat | None = None) -> list[int]:
    """The prompt's token ids. ``limit`` (tokens): text that cannot fit is refused
    before it is tokenized. ``chat``: ``parse_chat(req.chat)`` if already parsed (it must
    hold no image)."""
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
        msgs = (chat or parse_chat(req.chat)).messages
        assert all(isinstance(m["content"], str) for m in msgs), "images are not tokenized"
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
             default_max_tokens: int, max_tokens_limit: int, max_prompt_tokens: int | None, *,
             accepts_images: bool = False, model_name: str = "",
             image_limits: ImageLimits = DEFAULT_IMAGE_LIMITS) -> ValidatedRequest:
    """The request checked and, unless it has images, tokenized (see ``ValidatedRequest``).

    ``accepts_images``: the model takes images (``model_name`` is named when it does not);
    a request without images never reaches the image code.

    Raises:
        InvalidRequestError: field named; ``out_of_range`` for length limits.
    """
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
    chat = parse_chat(req.chat) if req.WhichOneof("input") == "chat" else None
    if chat is not None and chat.image_bytes:  # cheapest refusal first; decoding last
        if not accepts_images:
            raise InvalidRequestError(chat.image_fields[0], f"model {model_name or '(unnamed)'}"
                                      " does not accept images")
        _refuse_oversized_text("input", _texts(chat.messages), tokenizer, limit)
        check_image_count(chat.image_fields, image_limits)
        images = tuple(validate_image(k, f, data, image_limits) for k, (f, data)
                       in enumerate(zip(chat.image_fields, chat.image_bytes, strict=True)))
        return ValidatedRequest(f"r-{uuid.uuid4().hex}", [], params,
                                req.request_id or f"req-{uuid.uuid4().hex}",
                                chat.messages, images)
    ids = prompt_ids(req, tokenizer, limit, chat)
    if len(ids) > limit:
        raise InvalidRequestError("input", f"prompt has {len(ids)} tokens, limit {limit}", True)
    if len(ids) + params.max_tokens > context_len:
        raise InvalidRequestError(
            "sampling.max_tokens", f"prompt ({len(ids)} tokens) + max_tokens "
            f"({params.max_tokens}) exceeds the context length ({context_len})", True)
    return ValidatedRequest(f"r-{uuid.uuid4().hex}", ids, params,
                            req.request_id or f"req-{uuid.uuid4().hex}",
                            chat.messages if chat is not None else [])


def finish_to_proto(reason: str | FinishReason | None) -> int:
    if isinstance(reason, FinishReason):
        reason = reason.value
    return FINISH_TO_PROTO.get(reason or "", pb.FINISH_REASON_UNSPECIFIED)
