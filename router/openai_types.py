"""OpenAI-compatible request bodies (pydantic) and their mapping onto ``scission.v1``.

Fields scission does not know are accepted and ignored (``extra="ignore"``), as OpenAI
clients send many optional ones. Known fields that would change the answer in a way scission
cannot honour (``n`` > 1, ``best_of`` > 1, ``echo``, ``logprobs``, several prompts) are refused
with ``UnsupportedError`` (HTTP 400) instead of being silently dropped.

Extensions (as in vLLM): ``top_k``, ``ignore_eos``, and ``return_token_ids`` (each choice
also carries the generated ``token_ids``).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from scission.proto.scission.v1 import generation_pb2 as pb

# Roles OpenAI clients send that the chat template knows under another name.
ROLE_ALIASES = {"developer": "system"}
MaxTokens = Annotated[int, Field(ge=1, le=2**31 - 1)]
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]  # the vocabulary is checked later


class UnsupportedError(ValueError):
    """A known OpenAI field with a value scission cannot serve; ``param`` names it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: str
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


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
        msgs = [pb.ChatMessage(role=ROLE_ALIASES.get(m.role, m.role), content=m.text())
                for m in self.messages]
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
