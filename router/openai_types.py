"""OpenAI-compatible request bodies (pydantic) and their mapping onto ``scission.v1``.

Fields scission does not know are accepted and ignored (``extra="ignore"``), as OpenAI
clients send many optional ones. Known fields that would change the answer in a way scission
cannot honour (``n`` > 1, ``best_of`` > 1, ``echo``, ``logprobs``, several prompts) are refused
with ``UnsupportedError`` (HTTP 400) instead of being silently dropped.

Extensions (as in vLLM): ``top_k``, ``ignore_eos``, and ``return_token_ids`` (each choice
also carries the generated ``token_ids``).

Chat ``content`` may be a list of ``{"type": "text", "text": ...}`` and
``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}`` parts; each
becomes a ``scission.v1.ContentPart`` at the same index, and the router checks the images
as it does on the gRPC door. Only base64 data URIs: the router fetches no remote URL (it
would make the router an open HTTP client of its users' choosing).
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from scission.proto.scission.v1 import generation_pb2 as pb

# Roles OpenAI clients send that the chat template knows under another name.
ROLE_ALIASES = {"developer": "system"}
MaxTokens = Annotated[int, Field(ge=1, le=2**31 - 1)]
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]  # the vocabulary is checked later


class BodyError(ValueError):
    """A body value pydantic lets through that scission refuses (HTTP 400, error ``code``);
    ``param`` names it."""

    code = "invalid_request"

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class UnsupportedError(BodyError):
    """A known OpenAI field with a value scission cannot serve."""

    code = "unsupported_parameter"


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class TextPart(_Body):
    type: Literal["text"]
    text: str


    def to_proto(self, param: str) -> pb.ContentPart:
        return pb.ContentPart(text=self.text)


class ImageUrl(_Body):
    url: str  # "data:<mime type>;base64,<data>"; ``detail`` and others are ignored


class ImageUrlPart(_Body):
    type: Literal["image_url"]
    image_url: ImageUrl

    def to_proto(self, param: str) -> pb.ContentPart:
        return pb.ContentPart(image=image_from_data_uri(self.image_url.url,
                                                        f"{param}.image_url.url"))


ContentPart = Annotated[TextPart | ImageUrlPart, Field(discriminator="type")]


def image_from_data_uri(url: str, param: str) -> pb.Image:
    """``data:<mime type>;base64,<data>`` as an image (bytes not checked here: the router's
    validation does that for both doors).

    Raises:
        UnsupportedError: an http(s) URL (never fetched).
        BodyError: another scheme, a data URI that is not base64, or bad base64.
    """
    scheme = url.partition(":")[0].lower() if ":" in url else ""
    if scheme in ("http", "https"):
        raise UnsupportedError(param, f"{param}: remote image URLs are not fetched; send the "
                                      "image inline as data:image/png;base64,...")
    if scheme != "data":
        raise BodyError(param, f"{param}: must be a data URI (data:<mime type>;base64,<data>)")
    header, comma, payload = url[len("data:"):].partition(",")
    mime, _, encoding = header.rpartition(";")
    if not comma or encoding.lower() != "base64":
        raise BodyError(param, f"{param}: the data URI must be base64 "
                               "(data:<mime type>;base64,<data>)")
    try:
        data = base64.b64decode(payload, validate=True)
    except binascii.Error as e:
        raise BodyError(param, f"{param}: invalid base64 ({e})") from None
    return pb.Image(data=data, mime_type=mime)


class ChatMessage(_Body):
    role: str
    content: str | list[ContentPart] | None = None

    def to_proto(self, index: int) -> pb.ChatMessage:
        """A string stays ``content``; a list becomes ``parts`` (same indices), which the
        router joins back into one text when it holds no image."""
        role = ROLE_ALIASES.get(self.role, self.role)
        if not isinstance(self.content, list):
            return pb.ChatMessage(role=role, content=self.content or "")
        return pb.ChatMessage(role=role, parts=[
            p.to_proto(f"messages[{index}].content[{j}]") for j, p in enumerate(self.content)])


class _SamplingBody(_Body):
    """Fields common to both endpoints."""

    model: str | None = None  # None = the served model
    max_tokens: MaxTokens | None = None
    temperature: float | None = None  # None = 1.0, as OpenAI
    top_p: float | None = None
    top_k: Annotated[int, Field(ge=0, le=2**31 - 1)] | None = None
    seed: Annotated[int, Field(ge=0, lt=2**63)] | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    return_token_ids: bool = False

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def _check_common(self) -> None:
        if self.n not in (None, 1):
            raise UnsupportedError("n", f"n={self.n} is not supported; only n=1")

    def sampling(self, max_tokens: int | None) -> pb.SamplingParams:
        sp = pb.SamplingParams(ignore_eos=self.ignore_eos)
        for name, value in (("temperature", self.temperature), ("top_p", self.top_p),
                            ("top_k", self.top_k), ("seed", self.seed),
                            ("max_tokens", max_tokens)):
            if value is not None:
                setattr(sp, name, value)
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        sp.stop.extend(stop)
        return sp


class ChatCompletionRequest(_SamplingBody):
    messages: list[ChatMessage]
    max_completion_tokens: MaxTokens | None = None  # OpenAI's newer name; wins over max_tokens
    logprobs: bool | None = None

    def to_proto(self) -> pb.GenerateRequest:
        self._check_common()
        if self.logprobs:
            raise UnsupportedError("logprobs", "logprobs are not supported")
        msgs = [m.to_proto(i) for i, m in enumerate(self.messages)]
        max_tokens = self.max_completion_tokens or self.max_tokens
        return pb.GenerateRequest(chat=pb.ChatMessages(messages=msgs),
                                  sampling=self.sampling(max_tokens))


class CompletionRequest(_SamplingBody):
    # A string, or token ids; a list of one of them is accepted too (one prompt per request).
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    best_of: int | None = None
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None

    def to_proto(self) -> pb.GenerateRequest:
        self._check_common()
        for param, bad in (("best_of", self.best_of not in (None, 1)), ("echo", self.echo),
                           ("logprobs", self.logprobs is not None),
                           ("suffix", bool(self.suffix))):
            if bad:
                raise UnsupportedError(param, f"{param} is not supported")
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            if len(prompt) != 1:
                raise UnsupportedError("prompt", f"{len(prompt)} prompts in one request are "
                                                 "not supported; send one per request")
            prompt = prompt[0]
        sampling = self.sampling(self.max_tokens)
        if isinstance(prompt, str):
            return pb.GenerateRequest(prompt=prompt, sampling=sampling)
        return pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling=sampling)
