"""Images on the CLI: ``scission generate --image`` (parts after the text in the one user
message, MIME type sniffed, a missing file is exit 2) and the image limits of
``scission up`` reaching ``RouterConfig``."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from scission.cluster.cli import build_parser, main
from scission.cluster.client import load_image, make_request
from scission.cluster.commands import cluster_config
from scission.proto.scission.v1 import generation_pb2 as pb


def png_bytes() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(out, "PNG")
    return out.getvalue()


def test_load_image_mime_from_bytes_then_suffix(tmp_path):
    """A PNG named .jpg is image/png (Pillow's sniffing wins); bytes Pillow does not know
    take the suffix's type; neither gives an empty type (the router decides)."""
    (tmp_path / "cat.jpg").write_bytes(png_bytes())
    (tmp_path / "odd.webp").write_bytes(b"not an image")
    (tmp_path / "odd").write_bytes(b"not an image")
    assert load_image(str(tmp_path / "cat.jpg")) == pb.Image(data=png_bytes(),
                                                             mime_type="image/png")
    assert load_image(str(tmp_path / "odd.webp")).mime_type == "image/webp"
    assert load_image(str(tmp_path / "odd")).mime_type == ""


def test_images_follow_the_text_in_the_user_message():
    """With images the user message is parts: the text, then each image in order; the
    system message stays plain content. Without images nothing changes."""
    a, b = pb.Image(data=b"a", mime_type="image/png"), pb.Image(data=b"b")
    req = make_request("what?", True, 8, 0.0, system="sys", images=[a, b])
    system, user = req.chat.messages
    assert system == pb.ChatMessage(role="system", content="sys")
    assert user == pb.ChatMessage(role="user", parts=[
        pb.ContentPart(text="what?"), pb.ContentPart(image=a), pb.ContentPart(image=b)])
    plain = make_request("what?", True, 8, 0.0)
    assert plain.chat.messages[0] == pb.ChatMessage(role="user", content="what?")


def test_generate_missing_image_is_exit_2(tmp_path, capsys):
    """A missing --image file: exit code 2 and a message naming it, before any call."""
    missing = tmp_path / "nope.png"
    code = main(["generate", "hi", "--router", "127.0.0.1:1", "--image", str(missing)])
    assert code == 2
    assert capsys.readouterr().err == f"scission: error: --image {missing}: no such file\n"


def test_up_image_flags_reach_router_config():
    """--max-image-bytes / --max-images-per-request / --max-image-pixels / --image-formats
    set the RouterConfig fields; the defaults are RouterConfig's; a GIF format is refused
    by argparse (exit 2)."""
    args = build_parser().parse_args(["up", "--max-image-bytes", "1000",
                                      "--max-images-per-request", "2",
                                      "--max-image-pixels", "4096", "--image-formats",
                                      "webp, PNG", "--max-message-bytes", "33554432"])
    router = cluster_config(args).router
    assert (router.max_image_bytes, router.max_images_per_request, router.max_image_pixels,
            router.image_formats, router.max_message_bytes) == \
        (1000, 2, 4096, ("PNG", "WEBP"), 32 * 2**20)
    default = cluster_config(build_parser().parse_args(["up"])).router
    assert default.image_limits == type(default)().image_limits
    assert default.max_message_bytes == type(default)().max_message_bytes
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["up", "--image-formats", "gif"])
    assert exit_.value.code == 2
