"""Image input: decode a base64 or ``data:`` URL image safely, or refuse it with a clear 4xx.

Checks run from cheapest to dearest so a hostile input is refused before it costs memory:
the text length, the base64 alphabet, the magic bytes, the header's dimensions (before any
pixel is decoded: decompression bombs), then a full decode that must not be truncated.
Nothing here ever fetches a URL.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from collections.abc import Callable

import numpy as np
from PIL import Image, UnidentifiedImageError

from handler.errors import InvalidRequest, PayloadTooLarge

# Magic bytes of the formats we accept, and the matching PIL format names.
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
)
_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^,;]*)*),", re.ASCII)
_ALLOWED_MIME = {"image/png", "image/jpeg", "image/jpg", "image/webp"}
_URL_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
MIN_IMAGE_SIDE_PX = 16


def _sniff_format(raw: bytes) -> str | None:
    for magic, name in _MAGIC:
        if raw.startswith(magic):
            return name
    if len(raw) >= 12 and raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
        return "WEBP"
    return None


# fetch_s3(uri) returns an object's bytes, or raises InvalidRequest / PayloadTooLarge; it
# enforces the bucket allowlist and the size limit (see handler.storage.ObjectStore).
S3Fetcher = Callable[[str, str], bytes]


def decode_image(value: object, *, max_bytes: int, max_pixels: int, field: str = "image",
                 fetch_s3: S3Fetcher | None = None) -> Image.Image:
    """Return an RGB PIL image from base64, a ``data:image/...;base64,`` URL, or (when
    ``fetch_s3`` is given) an ``s3://bucket/key`` in an allowed bucket."""
    if not isinstance(value, str):
        raise InvalidRequest(f"{field} must be a base64 string or a data: URL", field)
    text = value.strip()
    if text.startswith("s3://") and fetch_s3 is not None:
        return image_from_bytes(fetch_s3(text, field), max_pixels=max_pixels, field=field)
    if _URL_SCHEME.match(text):
        raise InvalidRequest(
            f"{field} must be the image itself (base64 or a data: URL)"
            + (" or an s3:// object in an allowed bucket" if fetch_s3 is not None else "")
            + "; the server never fetches remote URLs",
            field,
        )
    if text.startswith("data:"):
        match = _DATA_URL.match(text)
        if not match or ";base64" not in match.group("params"):
            raise InvalidRequest(f"{field} data: URL must be of the form data:image/png;base64,...", field)
        mime = (match.group("mime") or "").lower()
        if mime not in _ALLOWED_MIME:
            raise InvalidRequest(f"{field} data: URL type {mime or 'missing'} is not PNG, JPEG or WebP", field)
        text = text[match.end():]

    # base64 is 4/3 of the bytes; refuse oversized text before decoding it.
    if len(text) > (max_bytes * 4) // 3 + 4:
        raise PayloadTooLarge(f"{field} is larger than the {max_bytes} byte limit", field)
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{field} is not valid base64", field) from None
    return image_from_bytes(raw, max_pixels=max_pixels, field=field)


def image_from_bytes(raw: bytes, *, max_pixels: int, field: str = "image") -> Image.Image:
    """Decode image file bytes (PNG, JPEG, WebP) to RGB, refusing bombs and broken files."""
    if not raw:
        raise InvalidRequest(f"{field} is empty", field)
    sniffed = _sniff_format(raw)
    if sniffed is None:
        raise InvalidRequest(f"{field} is not a PNG, JPEG or WebP image (unrecognised file signature)", field)
    try:
        image = Image.open(io.BytesIO(raw), formats=[sniffed])
    except Image.DecompressionBombError:
        # PIL refuses headers over 2x its own MAX_IMAGE_PIXELS before decoding anything.
        raise InvalidRequest(f"{field} is larger than the {max_pixels} pixel limit", field) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise InvalidRequest(f"{field} is not a readable {sniffed} image", field) from None
    # Image.open only read the header: the size is known before any pixel is decoded.
    width, height = image.size
    if width * height > max_pixels:
        raise InvalidRequest(
            f"{field} is {width}x{height} pixels, more than the {max_pixels} pixel limit", field
        )
    if min(width, height) < MIN_IMAGE_SIDE_PX:
        raise InvalidRequest(f"{field} is {width}x{height}; each side must be at least {MIN_IMAGE_SIDE_PX} px", field)
    try:
        image.load()
        if image.mode.startswith("I"):
            # 16-bit greyscale: PIL's convert() clips to 0..255 instead of scaling.
            image = Image.fromarray((np.asarray(image).astype(np.uint32) >> 8).clip(0, 255).astype(np.uint8), "L")
        return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise InvalidRequest(f"{field} is a truncated or corrupt {sniffed} image", field) from None
