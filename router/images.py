"""Images in chat requests: bounded, sniffed and fully decoded once at the edge.

Every check that can run without decoding runs first, cheapest first, so a hostile image
costs the router as little as possible:

1. count: more than ``max_images_per_request`` in the request (``check_image_count``);
2. bytes: empty, or over ``max_image_bytes`` (before Pillow sees them);
3. header: ``PIL.Image.open`` reads only the header, with the parsers of the accepted
   formats alone (a GIF or BMP is named from its magic bytes, never parsed); width and
   height must be > 0 and ``width * height <= max_image_pixels`` (decompression bombs);
4. pixels: ``img.load()`` decodes the first frame in full, which catches truncated and
   corrupt files.

The declared MIME type is not checked against the bytes: the bytes are what gets decoded,
and clients commonly label every image ``image/jpeg`` (OpenAI's own examples do, and
OpenAI and vLLM accept it), so a mismatch would refuse good images and protect nothing.
``ImageData.format`` is the sniffed format.

Pillow's global ``Image.MAX_IMAGE_PIXELS`` is left alone (the process may hold other image
users): ``ImageLimits`` refuses a pixel bound above it, so Pillow's own bomb check (which
raises at twice that bound, while opening) only ever fires on an image over ours.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

from PIL import Image

from scission.engine.request import InvalidRequestError

SUPPORTED_IMAGE_FORMATS = frozenset({"PNG", "JPEG", "WEBP"})
# Pillow names a JPEG with a multi-picture (MPF) extension, as many cameras write, "MPO";
# its first frame is a plain JPEG.
_FORMAT_ALIASES = {"MPO": "JPEG"}
# Magic bytes of formats whose parsers are never run, to name them in the refusal.
_MAGIC = ((b"GIF87a", "GIF"), (b"GIF89a", "GIF"), (b"BM", "BMP"), (b"II*\x00", "TIFF"),
          (b"MM\x00*", "TIFF"), (b"\x00\x00\x01\x00", "ICO"), (b"\x89PNG\r\n\x1a\n", "PNG"),
          (b"\xff\xd8\xff", "JPEG"), (b"%PDF", "PDF"))
_PNG_IHDR = struct.Struct(">8sI4sII")  # signature, IHDR length, b"IHDR", width, height


@dataclass(frozen=True)
class ImageLimits:
    """What the router accepts (``RouterConfig``'s ``max_image_*`` and ``image_formats``).

    Attributes:
        max_image_bytes: largest encoded file, bytes.
        max_images_per_request: images in one request, across all its messages.
        max_image_pixels: largest ``width * height``, pixels; at most Pillow's
            ``Image.MAX_IMAGE_PIXELS`` (89,478,485 unless changed).
        formats: accepted Pillow format names, a subset of ``SUPPORTED_IMAGE_FORMATS``.

    Raises:
        ValueError: a bound < 1, a pixel bound over Pillow's, or an unknown format.
    """

    max_image_bytes: int = 20 * 2**20
    max_images_per_request: int = 8
    max_image_pixels: int = 4096 * 4096
    formats: frozenset[str] = SUPPORTED_IMAGE_FORMATS

    def __post_init__(self) -> None:
        if min(self.max_image_bytes, self.max_images_per_request, self.max_image_pixels) < 1:
            raise ValueError("max_image_bytes, max_images_per_request and max_image_pixels "
                             "must be >= 1")
        bomb = Image.MAX_IMAGE_PIXELS
        if bomb is not None and self.max_image_pixels > bomb:
            raise ValueError(f"max_image_pixels ({self.max_image_pixels}) must be <= Pillow's "
                             f"decompression-bomb bound Image.MAX_IMAGE_PIXELS ({bomb})")
        unknown = set(self.formats) - SUPPORTED_IMAGE_FORMATS
        if not self.formats or unknown:
            raise ValueError(f"image formats must be a non-empty subset of "
                             f"{sorted(SUPPORTED_IMAGE_FORMATS)}, got {sorted(self.formats)}")


@dataclass(frozen=True)
class ImageData:
    """One validated image of a request.

    Attributes:
        index: the image's position among the request's images, 0-based, in message and
            part order; chat parts refer to it as ``{"type": "image", "index": index}``.
        data: the encoded file as received, ``len(data) <= max_image_bytes``.
        format: the sniffed format: ``"PNG"``, ``"JPEG"`` or ``"WEBP"``.
        width: pixels, > 0.
        height: pixels, > 0; ``width * height <= max_image_pixels``.
    """

    index: int
    data: bytes
    format: str
    width: int
    height: int


def check_image_count(fields: list[str], limits: ImageLimits) -> None:
    """Refuses a request with more than ``limits.max_images_per_request`` images, before any
    is decoded. ``fields``: each image's field name, in request order.

    Raises:
        InvalidRequestError: naming the first image over the limit.
    """
    limit = limits.max_images_per_request
    if len(fields) > limit:
        raise InvalidRequestError(fields[limit], f"image {limit}: the request has "
                                  f"{len(fields)} images, limit {limit}")


def validate_image(index: int, field: str, data: bytes, limits: ImageLimits) -> ImageData:
    """Checks one encoded image (steps 2-4 of the module docstring) and decodes it once.

    Args:
        index: the image's 0-based position in the request (named in every error message).
        field: the request field holding it, e.g. ``chat.messages[1].parts[2].image``.
        data: the encoded file.
        limits: the bounds.

    Raises:
        InvalidRequestError: ``field`` named, the message starting ``image <index>: ``, for
            empty or oversize bytes, an unrecognised or unaccepted format, no pixels, too
            many pixels, or a truncated / corrupt file.
    """
    def bad(message: str) -> InvalidRequestError:
        return InvalidRequestError(field, f"image {index}: {message}")

    if not data:
        raise bad("empty (0 bytes)")
    if len(data) > limits.max_image_bytes:
        raise bad(f"{len(data)} bytes, limit {limits.max_image_bytes}")
    img = _open(data, limits, bad)
    with img:
        fmt = _FORMAT_ALIASES.get(img.format or "", img.format or "")
        width, height = img.size
        if width <= 0 or height <= 0:
            raise bad(f"{fmt} has no pixels ({width}x{height})")
        if width * height > limits.max_image_pixels:
            raise bad(f"{width}x{height} = {width * height} pixels, limit "
                      f"{limits.max_image_pixels}")
        try:
            img.load()
        # Decoders fail on hostile bytes in open-ended ways (OSError, SyntaxError,
        # ValueError, struct.error, ...): each is this request's bad input, re-raised as one.
        except Exception as e:
            raise bad(f"truncated or corrupt {fmt} ({_reason(e)})") from None
    return ImageData(index, data, fmt, width, height)


def _open(data: bytes, limits: ImageLimits, bad) -> Image.Image:
    """The image with only its header read, by the accepted formats' parsers alone."""
    try:  # the JPEG parser also opens multi-picture JPEGs (as "MPO")
        return Image.open(io.BytesIO(data), formats=sorted(limits.formats))
    except Image.DecompressionBombError as e:
        raise bad(f"too many pixels, limit {limits.max_image_pixels} ({e})") from None
    except Exception as e:  # as in validate_image: any failure here is bad input
        raise bad(_unopened(data, limits, e)) from None


def _unopened(data: bytes, limits: ImageLimits, error: Exception) -> str:
    """Why Pillow could not open ``data``: an unaccepted format named by its magic bytes, a
    PNG header declaring no pixels, or an undecodable file."""
    accepted = ", ".join(sorted(limits.formats))
    sniffed = _sniff(data)
    if sniffed is None:
        return f"not a recognised image file (accepted: {accepted})"
    if sniffed not in limits.formats:
        return f"{sniffed} is not an accepted format (accepted: {accepted})"
    if sniffed == "PNG" and len(data) >= _PNG_IHDR.size:
        _, _, tag, width, height = _PNG_IHDR.unpack_from(data)
        if tag == b"IHDR" and (width == 0 or height == 0):
            return f"PNG has no pixels ({width}x{height})"
    return f"truncated or corrupt {sniffed} ({_reason(error)})"


def _sniff(data: bytes) -> str | None:
    """The format named by ``data``'s magic bytes, or None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((name for magic, name in _MAGIC if data.startswith(magic)), None)


def _reason(error: Exception) -> str:
    # Pillow's messages may end with the stream's repr (" <_io.BytesIO object at 0x...>").
    return str(error).split(" <_io.", 1)[0] or type(error).__name__
