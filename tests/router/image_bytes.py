"""Image files for the router's image tests, made in memory: real PNG / JPEG / WebP / GIF /
BMP files from Pillow, and crafted PNG headers (a width of 0, or huge dimensions) that no
encoder would write and that cost nothing to hold."""

from __future__ import annotations

import io
import random
import struct
import zlib

from PIL import Image


def encoded(fmt: str, width: int = 64, height: int = 48, noise: bool = False) -> bytes:
    """A ``width`` x ``height`` RGB image saved as ``fmt`` (``noise``: random pixels, so
    the file is large and any cut lands inside the pixel data)."""
    if noise:
        rng = random.Random(0)
        img = Image.frombytes("RGB", (width, height), rng.randbytes(width * height * 3))
    else:
        img = Image.new("RGB", (width, height), (200, 30, 60))
    out = io.BytesIO()
    img.save(out, fmt)
    return out.getvalue()


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def png_header(width: int, height: int) -> bytes:
    """A PNG of only a signature, an IHDR (8-bit RGB) declaring ``width`` x ``height``, and
    IEND: the header a decompression bomb or a 0-pixel image would carry, in 45 bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IEND", b"")


def random_bytes(n: int = 1000) -> bytes:
    return random.Random(1).randbytes(n)
