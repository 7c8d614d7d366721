"""Chat content parts through ``router/convert.py`` and the OpenAI body mapping
(``router/openai_types.py``): the proto round trip, images carried as ``ImageData`` with the
chat structure (and no tokenization), refusals naming message and part, text-only requests
exactly as before."""

from __future__ import annotations

import base64

import pytest
from image_bytes import encoded, random_bytes
from pydantic import ValidationError

from scission.engine.request import InvalidRequestError
from scission.proto.scission.v1 import generation_pb2 as pb
from scission.router.convert import validate
from scission.router.images import ImageData, ImageLimits
from scission.router.openai_types import BodyError, ChatCompletionRequest, UnsupportedError

CONTEXT = 8192
PNG, JPEG = encoded("PNG", 64, 48), encoded("JPEG", 30, 20)


class NoImageLimits:
    """Any use of the image limits fails the test: text-only requests must not touch them."""

    def __getattr__(self, name):
        raise AssertionError(f"image code ran for a text-only request ({name})")


class SpyTokenizer:
    """The real tokenizer, counting encode / chat-template calls."""

    def __init__(self, tokenizer) -> None:
        self._t, self.num_encodes = tokenizer, 0

    def __getattr__(self, name):
        return getattr(self._t, name)

    def apply_chat_template(self, messages):
        self.num_encodes += 1
        return self._t.apply_chat_template(messages)


def check(req: pb.GenerateRequest, tokenizer, **kw):
    return validate(req, tokenizer, CONTEXT, default_max_tokens=16, max_tokens_limit=4096,
                    max_prompt_tokens=None, **kw)


def image_part(data: bytes, mime: str = "") -> pb.ContentPart:
    return pb.ContentPart(image=pb.Image(data=data, mime_type=mime))


def chat(*messages: pb.ChatMessage) -> pb.GenerateRequest:
    return pb.GenerateRequest(chat=pb.ChatMessages(messages=list(messages)))


def two_image_request() -> pb.GenerateRequest:
    return chat(pb.ChatMessage(role="system", content="be brief"),
                pb.ChatMessage(role="user", parts=[pb.ContentPart(text="compare "), image_part(
                    PNG, "image/png"), pb.ContentPart(text=" and "), image_part(JPEG)]))


def test_proto_round_trip():
    """Parts (text, image bytes, mime type) survive serialization; a plain content message
    in the same chat is untouched."""
    req = two_image_request()
    back = pb.GenerateRequest.FromString(req.SerializeToString())
    assert back == req
    user = back.chat.messages[1]
    assert [p.WhichOneof("part") for p in user.parts] == ["text", "image", "text", "image"]
    assert (user.parts[1].image.data, user.parts[1].image.mime_type) == (PNG, "image/png")
    assert back.chat.messages[0].content == "be brief" and not back.chat.messages[0].parts


def test_images_carried_without_tokenizing(tokenizer):
    """A request with images (model accepts them): prompt_token_ids is [], the images are
    ImageData in order with their sizes, chat_messages keeps the parts with image indices,
    and the tokenizer never ran."""
    spy = SpyTokenizer(tokenizer)
    vr = check(two_image_request(), spy, accepts_images=True, model_name="vlm")
    assert vr.prompt_token_ids == [] and spy.num_encodes == 0
    assert vr.images == (ImageData(0, PNG, "PNG", 64, 48), ImageData(1, JPEG, "JPEG", 30, 20))
    assert vr.chat_messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "compare "},
                                     {"type": "image", "index": 0},
                                     {"type": "text", "text": " and "},
                                     {"type": "image", "index": 1}]}]
    assert vr.params.max_tokens == 16 and vr.request_id.startswith("r-")


def test_text_only_model_refuses_images_before_decoding(tokenizer):
    """Against a text-only model the first image part is named, with the model, even when
    the image bytes are garbage (nothing was decoded)."""
    req = chat(pb.ChatMessage(role="user", parts=[pb.ContentPart(text="hi"),
                                                  image_part(random_bytes())]))
    with pytest.raises(InvalidRequestError) as err:
        check(req, tokenizer, model_name="SmolLM2")
    assert err.value.field == "chat.messages[0].parts[1].image" and not err.value.out_of_range
    assert str(err.value) == ("chat.messages[0].parts[1].image: model SmolLM2 does not accept "
                              "images")


def test_bad_image_named_by_message_part_and_index(tokenizer):
    """The 3rd image of the request (index 2), in message 1 part 2, is a truncated PNG."""
    bad = encoded("PNG", 200, 200, noise=True)
    req = chat(pb.ChatMessage(role="user", parts=[image_part(PNG), image_part(PNG)]),
               pb.ChatMessage(role="user", parts=[pb.ContentPart(text="x"), pb.ContentPart(
                   text="y"), image_part(bad[: len(bad) // 2])]))
    with pytest.raises(InvalidRequestError) as err:
        check(req, tokenizer, accepts_images=True)
    assert err.value.field == "chat.messages[1].parts[2].image"
    assert "image 2: truncated or corrupt PNG" in str(err.value)


def test_nine_images_refused_before_any_decode(tokenizer):
    """9 images (limit 8), all garbage: the count is the reason, on the 9th image."""
    req = chat(pb.ChatMessage(role="user", parts=[image_part(random_bytes())] * 9))
    with pytest.raises(InvalidRequestError) as err:
        check(req, tokenizer, accepts_images=True, image_limits=ImageLimits())
    assert err.value.field == "chat.messages[0].parts[8].image"
    assert str(err.value).endswith("image 8: the request has 9 images, limit 8")


@pytest.mark.parametrize("message,field,reason", [
    (pb.ChatMessage(role="user", content="a", parts=[pb.ContentPart(text="b")]),
     "chat.messages[0]", "set content or parts, not both"),
    (pb.ChatMessage(role="user", parts=[pb.ContentPart(text="b"), pb.ContentPart()]),
     "chat.messages[0].parts[1]", "one of text or image is required"),
])
def test_malformed_parts_refused(tokenizer, message, field, reason):
    with pytest.raises(InvalidRequestError) as err:
        check(chat(message), tokenizer, accepts_images=True)
    assert err.value.field == field and str(err.value) == f"{field}: {reason}"


def test_text_only_requests_unchanged(tokenizer):
    """Text parts are joined into one content string: the same token ids as ``content``;
    text-only input never touches the image limits; prompt input has no chat_messages."""
    plain = check(chat(pb.ChatMessage(role="user", content="hello there")), tokenizer,
                  image_limits=NoImageLimits())
    parts = check(chat(pb.ChatMessage(role="user", parts=[
        pb.ContentPart(text="hello"), pb.ContentPart(text=" there")])), tokenizer,
        image_limits=NoImageLimits())
    expected = tokenizer.apply_chat_template([{"role": "user", "content": "hello there"}])
    assert plain.prompt_token_ids == parts.prompt_token_ids == expected
    assert plain.chat_messages == parts.chat_messages == [
        {"role": "user", "content": "hello there"}]
    assert plain.images == parts.images == ()
    prompt = check(pb.GenerateRequest(prompt="hello"), tokenizer, image_limits=NoImageLimits())
    assert prompt.chat_messages == [] and prompt.prompt_token_ids == tokenizer.encode("hello")


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def openai_chat(*parts: dict) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"messages": [{"role": "system", "content": "s"},
                      {"role": "user", "content": list(parts)}]})


def test_openai_data_uri_maps_to_image_part():
    """A data URI becomes a proto image part at the same index, bytes and mime type as sent
    (the mime type is only a label: a PNG labelled image/jpeg is passed on as is)."""
    req = openai_chat({"type": "text", "text": "what is it?"},
                      {"type": "image_url", "image_url": {"url": data_uri(PNG, "image/jpeg"),
                                                          "detail": "high"}}).to_proto()
    user = req.chat.messages[1]
    assert user.parts[0] == pb.ContentPart(text="what is it?")
    assert user.parts[1] == image_part(PNG, "image/jpeg")
    assert req.chat.messages[0] == pb.ChatMessage(role="system", content="s")


@pytest.mark.parametrize("url,error,reason", [
    ("https://example.com/cat.png", UnsupportedError, "remote image URLs are not fetched"),
    ("http://example.com/cat.png", UnsupportedError, "remote image URLs are not fetched"),
    ("data:image/png;base64,iVBOR!!w0KGgo=", BodyError, "invalid base64"),
    ("data:image/png;base64,iVBORw0KGgo", BodyError, "invalid base64"),
    ("data:image/png,rawbytes", BodyError, "the data URI must be base64"),
    ("file:///etc/passwd", BodyError, "must be a data URI"),
])
def test_openai_bad_image_url_is_400(url, error, reason):
    """Remote URLs (never fetched), other schemes, non-base64 data URIs and bad base64 are
    refused while mapping the body, naming ``messages[1].content[1].image_url.url``."""
    body = openai_chat({"type": "text", "text": "x"},
                       {"type": "image_url", "image_url": {"url": url}})
    with pytest.raises(error) as err:
        body.to_proto()
    param = "messages[1].content[1].image_url.url"
    assert type(err.value) is error and err.value.param == param
    assert str(err.value).startswith(f"{param}: {reason}"), str(err.value)


def test_openai_unknown_part_type_is_a_validation_error():
    with pytest.raises(ValidationError):
        openai_chat({"type": "input_audio", "input_audio": {"data": "", "format": "wav"}})
