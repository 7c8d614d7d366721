"""``router/images.py``: each bad image is refused with its field and its index in the
request, the cheap checks before any decoding; good PNG / JPEG / WebP pass with their size.
Images are crafted in memory (``image_bytes.py``); nothing allocates a large bitmap."""

from __future__ import annotations

import io

import pytest
from image_bytes import encoded, png_header, random_bytes
from PIL import Image

from scission.engine.request import InvalidRequestError
from scission.router.config import RouterConfig
from scission.router.images import ImageData, ImageLimits, check_image_count, validate_image

FIELD = "chat.messages[1].parts[2].image"
LIMITS = ImageLimits()


def refusal(data: bytes, limits: ImageLimits = LIMITS, index: int = 3) -> str:
    """The message of ``validate_image``'s refusal, after checking it names ``FIELD``, is not
    OUT_OF_RANGE, and starts with the image's index."""
    with pytest.raises(InvalidRequestError) as err:
        validate_image(index, FIELD, data, limits)
    assert err.value.field == FIELD and not err.value.out_of_range
    prefix = f"{FIELD}: image {index}: "
    assert str(err.value).startswith(prefix), str(err.value)
    return str(err.value).removeprefix(prefix)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_valid_image_passes_with_its_size(fmt):
    """A real PNG / JPEG / WebP of 64x48 comes back as ImageData with the sniffed format,
    its width and height, its index and its bytes untouched."""
    data = encoded(fmt, 64, 48)
    assert validate_image(5, FIELD, data, LIMITS) == ImageData(5, data, fmt, 64, 48)


def test_multi_picture_jpeg_is_jpeg():
    """A camera JPEG with an MPF extension (Pillow: "MPO") is accepted as JPEG."""
    out = io.BytesIO()
    first = Image.new("RGB", (32, 16), (1, 2, 3))
    first.save(out, "MPO", save_all=True, append_images=[Image.new("RGB", (32, 16))])
    image = validate_image(0, FIELD, out.getvalue(), LIMITS)
    assert (image.format, image.width, image.height) == ("JPEG", 32, 16)


CASES = {
    "empty": (b"", "empty (0 bytes)"),
    "random bytes": (random_bytes(), "not a recognised image file (accepted: JPEG, PNG, WEBP)"),
    "GIF": (encoded("GIF"), "GIF is not an accepted format (accepted: JPEG, PNG, WEBP)"),
    "BMP": (encoded("BMP"), "BMP is not an accepted format (accepted: JPEG, PNG, WEBP)"),
    "width 0 in IHDR": (png_header(0, 10), "PNG has no pixels (0x10)"),
    "0x0 in IHDR": (png_header(0, 0), "PNG has no pixels (0x0)"),
    "5000x5000 header": (png_header(5000, 5000),
                         "5000x5000 = 25000000 pixels, limit 16777216"),
    "20000x20000 header (Pillow's bomb bound)": (png_header(20000, 20000),
                                                 "too many pixels, limit 16777216"),
    "PNG header alone": (png_header(64, 48), "truncated or corrupt PNG"),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_bad_image_is_refused_naming_field_and_index(case):
    """Each bad image gets InvalidRequestError (INVALID_ARGUMENT) on its field, its message
    starting ``image 3:`` and saying what is wrong."""
    data, reason = CASES[case]
    assert refusal(data).startswith(reason)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_truncated_image_is_refused(fmt):
    """A valid file cut in half is refused: PNG and JPEG open (the header is whole) and fail
    the full decode; libwebp refuses a short RIFF already when opening."""
    data = encoded(fmt, 200, 200, noise=True)
    assert validate_image(0, FIELD, data, LIMITS).width == 200
    assert refusal(data[: len(data) // 2]).startswith(f"truncated or corrupt {fmt} (")


def test_oversize_bytes_are_refused_before_opening():
    """Over max_image_bytes the byte count is the reason, even for bytes that are no image
    at all: nothing was parsed."""
    limits = ImageLimits(max_image_bytes=1000)
    assert refusal(random_bytes(1001), limits) == "1001 bytes, limit 1000"
    assert refusal(encoded("PNG", 300, 300, noise=True), limits).endswith(" bytes, limit 1000")
    small = encoded("PNG")
    assert len(small) <= 1000 and validate_image(0, FIELD, small, limits).width == 64


def test_pixel_bound_is_inclusive():
    """width * height == max_image_pixels passes; one row more is refused."""
    limits = ImageLimits(max_image_pixels=64 * 48)
    assert validate_image(0, FIELD, encoded("PNG", 64, 48), limits).height == 48
    assert refusal(encoded("PNG", 64, 49), limits) == "64x49 = 3136 pixels, limit 3072"


def test_formats_narrowed_by_config():
    """With only PNG accepted, a JPEG is refused by name, unparsed."""
    limits = RouterConfig(image_formats=("PNG",)).image_limits
    assert refusal(encoded("JPEG"), limits) == "JPEG is not an accepted format (accepted: PNG)"
    assert validate_image(0, FIELD, encoded("PNG"), limits).format == "PNG"


def test_too_many_images_names_the_first_one_over():
    """9 images with a limit of 8: the 9th image's field (index 8) is named."""
    fields = [f"chat.messages[0].parts[{j}].image" for j in range(9)]
    with pytest.raises(InvalidRequestError) as err:
        check_image_count(fields, LIMITS)
    assert err.value.field == fields[8]
    assert str(err.value) == f"{fields[8]}: image 8: the request has 9 images, limit 8"
    check_image_count(fields[:8], LIMITS)


@pytest.mark.parametrize("kw", [dict(max_image_bytes=0), dict(max_images_per_request=0),
                                dict(max_image_pixels=0), dict(max_image_pixels=10**9),
                                dict(image_formats=("GIF",)), dict(image_formats=())])
def test_router_config_refuses_bad_image_limits(kw):
    """Bounds < 1, a pixel bound over Pillow's bomb bound (89,478,485), an unknown or empty
    format list: ValueError when the RouterConfig is made."""
    with pytest.raises(ValueError):
        RouterConfig(**kw)


def test_router_config_image_defaults():
    limits = RouterConfig().image_limits
    assert limits == ImageLimits(20 * 2**20, 8, 4096 * 4096, frozenset({"PNG", "JPEG", "WEBP"}))
