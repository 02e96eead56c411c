"""decode_image (handler/images.py): real images made with PIL in memory, and hostile ones."""

from __future__ import annotations

import base64
import io
import random
import re
import struct
import sys
import time
import tracemalloc
import zlib
from pathlib import Path

import pytest
from PIL import Image, ImageFile

from handler.config import RequestLimits
from handler.errors import InvalidRequest, PayloadTooLarge
from handler.images import MIN_IMAGE_SIDE_PX, decode_image
from tests.harness.payloads import REMOTE_IMAGE_URLS

LIMITS = RequestLimits()
COLOR = (200, 30, 90)


def encode(image: Image.Image, fmt: str, **save_kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save_kwargs)
    return buffer.getvalue()


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def data_url(raw: bytes, mime: str) -> str:
    return f"data:{mime};base64,{b64(raw)}"


def decode(value, max_bytes: int = LIMITS.max_image_bytes, max_pixels: int = LIMITS.max_image_pixels, **kwargs):
    return decode_image(value, max_bytes=max_bytes, max_pixels=max_pixels, **kwargs)


def solid(width: int = 48, height: int = 32, mode: str = "RGB", color=COLOR) -> Image.Image:
    return Image.new(mode, (width, height), color)


def noise_png(width: int, height: int, seed: int = 0) -> bytes:
    """A PNG of random pixels: it does not compress, so its IDAT data is large."""
    pixels = random.Random(seed).randbytes(width * height * 3)
    return encode(Image.frombytes("RGB", (width, height), pixels), "PNG")


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_bomb(width: int, height: int) -> bytes:
    """A valid-looking greyscale PNG whose IHDR claims width x height, with a few rows of zeros.

    A few hundred bytes; decoding it for real would allocate width x height bytes (or x3 in RGB).
    """
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale, no interlace
    idat = zlib.compress(b"\x00" * 4096, 9)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def idat_span(png: bytes) -> tuple[int, int]:
    """(start, end) offsets of the first IDAT chunk's data in a PNG file."""
    offset = 8
    while offset < len(png):
        (length,) = struct.unpack(">I", png[offset:offset + 4])
        kind = png[offset + 4:offset + 8]
        if kind == b"IDAT":
            return offset + 8, offset + 8 + length
        offset += 12 + length
    raise AssertionError("no IDAT chunk")


def reject(value, exc_class=InvalidRequest, word: str = "", **kwargs):
    with pytest.raises(exc_class) as info:
        decode(value, **kwargs)
    error = info.value
    assert type(error) is exc_class
    assert error.http_status == (413 if exc_class is PayloadTooLarge else 400)
    assert error.field == kwargs.get("field", "image")
    assert word.lower() in error.message.lower(), error.message
    return error


_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _proc_kib(name: str) -> int:
    return int(re.search(rf"^{name}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE).group(1))


def rss_peak_growth_kib(fn) -> int | None:
    """Growth of the process's peak RSS while fn runs (Linux: VmHWM reset via clear_refs).

    PIL allocates pixels outside Python's allocator, so tracemalloc alone cannot see a decode.
    Returns None where /proc does not allow resetting the peak.
    """
    try:
        _CLEAR_REFS.write_text("5")
        before = _proc_kib("VmRSS")
    except OSError:
        fn()
        return None
    fn()
    return _proc_kib("VmHWM") - before


# --- accepted images ---------------------------------------------------------------------------

FORMATS = [
    pytest.param("PNG", "image/png", {}, 0, id="png"),
    pytest.param("JPEG", "image/jpeg", {"quality": 95}, 6, id="jpeg"),
    pytest.param("WEBP", "image/webp", {"lossless": True}, 0, id="webp"),
]


@pytest.mark.parametrize("as_data_url", [False, True], ids=["base64", "data-url"])
@pytest.mark.parametrize("fmt, mime, save_kwargs, tolerance", FORMATS)
def test_accepts_png_jpeg_webp(fmt, mime, save_kwargs, tolerance, as_data_url):
    raw = encode(solid(48, 32), fmt, **save_kwargs)
    value = data_url(raw, mime) if as_data_url else b64(raw)
    image = decode(value)
    assert isinstance(image, Image.Image)
    assert image.mode == "RGB"
    assert image.size == (48, 32)
    for channel, expected in zip(image.getpixel((24, 16)), COLOR):
        assert abs(channel - expected) <= tolerance


@pytest.mark.parametrize(
    "prefix",
    ["data:image/jpg;base64,", "data:IMAGE/JPEG;base64,", "data:image/jpeg;name=a.jpg;base64,"],
)
def test_data_url_mime_spellings(prefix):
    raw = encode(solid(20, 20), "JPEG", quality=95)
    assert decode(prefix + b64(raw)).size == (20, 20)


def test_surrounding_whitespace_is_ignored():
    raw = encode(solid(20, 20), "PNG")
    assert decode("  \n" + data_url(raw, "image/png") + "\n ").size == (20, 20)
    assert decode("\t" + b64(raw) + "\n").size == (20, 20)


@pytest.mark.parametrize(
    "mode, color, expected",
    [
        pytest.param("RGBA", (10, 20, 30, 255), (10, 20, 30), id="rgba"),
        pytest.param("RGBA", (10, 20, 30, 0), (10, 20, 30), id="rgba-transparent"),
        pytest.param("LA", (77, 255), (77, 77, 77), id="grey-alpha"),
        pytest.param("L", 100, (100, 100, 100), id="grey"),
        pytest.param("1", 1, (255, 255, 255), id="bilevel"),
    ],
)
def test_png_modes_are_converted_to_rgb(mode, color, expected):
    image = decode(b64(encode(solid(24, 24, mode, color), "PNG")))
    assert image.mode == "RGB"
    assert image.getpixel((5, 5)) == expected


def test_palette_png_is_converted_to_rgb():
    palette_image = solid(24, 24).convert("P")
    image = decode(b64(encode(palette_image, "PNG")))
    assert image.mode == "RGB"
    assert image.getpixel((3, 3)) == palette_image.convert("RGB").getpixel((3, 3))


def test_greyscale_and_cmyk_jpeg_are_converted_to_rgb():
    grey = decode(b64(encode(solid(24, 24, "L", 128), "JPEG", quality=95)))
    assert grey.mode == "RGB" and all(abs(c - 128) <= 3 for c in grey.getpixel((4, 4)))
    cmyk = decode(b64(encode(solid(24, 24, "CMYK", (0, 0, 0, 0)), "JPEG", quality=95)))
    assert cmyk.mode == "RGB" and all(c >= 250 for c in cmyk.getpixel((4, 4)))


def test_16_bit_greyscale_png_keeps_its_brightness():
    # A mid-grey 16-bit PNG (value 32768 of 65535) must come out mid-grey, not clipped to white.
    image = decode(b64(encode(solid(24, 24, "I;16", 32768), "PNG")))
    assert image.mode == "RGB"
    assert all(abs(c - 128) <= 2 for c in image.getpixel((4, 4))), image.getpixel((4, 4))


def test_whole_image_is_decoded_not_lazy():
    raw = noise_png(40, 40, seed=3)
    image = decode(b64(raw))
    assert image.tobytes() == Image.open(io.BytesIO(raw)).convert("RGB").tobytes()


def test_field_name_is_used_in_errors():
    reject(5, word="other_image must be", field="other_image")


# --- rejections --------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [None, 123, 1.5, True, b"iVBORw0KGgo=", ["aGk="], {"data": "aGk="}])
def test_non_string_is_rejected(value):
    reject(value, word="base64 string or a data: URL")


@pytest.mark.parametrize(
    "value", REMOTE_IMAGE_URLS)
def test_urls_are_never_fetched(value):
    reject(value, word="never fetches remote URLs")


@pytest.mark.parametrize(
    "value, word",
    [
        pytest.param("data:image/png," + b64(b"\x89PNG\r\n\x1a\n"), "data:image/png;base64", id="no-base64-marker"),
        pytest.param("data:image/png;charset=utf-8,abcd", "data:image/png;base64", id="params-without-base64"),
        pytest.param("data:image/png;base64", "data:image/png;base64", id="no-comma"),
        pytest.param("data:,aGVsbG8=", "data:image/png;base64", id="bare-data-url"),
        pytest.param("data:text/plain;base64,aGVsbG8gd29ybGQ=", "text/plain is not PNG, JPEG or WebP", id="text-plain"),
        pytest.param("data:application/octet-stream;base64,aGVsbG8=", "application/octet-stream", id="octet-stream"),
        pytest.param("data:;base64,aGVsbG8=", "missing", id="no-mime"),
        pytest.param("data:image/gif;base64,R0lGODlh", "image/gif is not PNG, JPEG or WebP", id="gif-mime"),
        pytest.param("data:image/svg+xml;base64,PHN2Zz4=", "image/svg+xml", id="svg-mime"),
    ],
)
def test_bad_data_urls_are_rejected(value, word):
    reject(value, word=word)


@pytest.mark.parametrize(
    "value",
    [
        "not base64 at all!",
        "iVBORw0KGgo$$$$",
        "iVBORw0KGgo=@@",
        "abc",  # bad padding
        "aGVsbG8=aGVsbG8=x",
        "iVBOR w0KGgo=",  # inner whitespace
        "\u00e9\u00e9\u00e9\u00e9",  # non-ASCII
        "data:image/png;base64,%%%%",
    ],
)
def test_invalid_base64_is_rejected(value):
    reject(value, word="not valid base64")


@pytest.mark.parametrize("value", ["", "   ", "\n", "data:image/png;base64,"])
def test_empty_image_is_rejected(value):
    reject(value, word="empty")


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"hello world, this is not an image at all", id="text"),
        pytest.param(b"\x00" * 64, id="zeros"),
        pytest.param(b"%PDF-1.7\n" + b"x" * 40, id="pdf"),
        pytest.param(b"\x89PNG\r\n", id="short-png-magic"),
        pytest.param(b"RIFF\x00\x00\x00\x00WAVEfmt ", id="riff-wave"),
        pytest.param(b"BM" + b"\x00" * 60, id="bmp-magic"),
    ],
)
def test_non_image_bytes_are_rejected_by_signature(raw):
    reject(b64(raw), word="unrecognised file signature")
    reject(data_url(raw, "image/png"), word="unrecognised file signature")


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_other_image_formats_are_not_accepted(fmt):
    raw = encode(solid(32, 32), fmt)
    reject(b64(raw), word="not a PNG, JPEG or WebP")
    # Labelled as PNG: the bytes decide, not the label.
    reject(data_url(raw, "image/png"), word="not a PNG, JPEG or WebP")


@pytest.mark.parametrize(
    "raw, fmt",
    [
        pytest.param(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20, "PNG", id="png-magic-then-garbage"),
        pytest.param(b"\xff\xd8\xff" + b"\x00" * 40, "JPEG", id="jpeg-magic-then-zeros"),
        pytest.param(b"RIFF\x10\x00\x00\x00WEBPVP8 " + b"\x00" * 20, "WEBP", id="webp-magic-then-zeros"),
    ],
)
def test_magic_without_a_readable_header_is_rejected(raw, fmt):
    reject(b64(raw), word=f"not a readable {fmt} image")


def test_png_truncated_in_pixel_data_is_rejected():
    raw = noise_png(64, 64)
    start, end = idat_span(raw)
    assert end - start > 4000
    truncated = raw[: (start + end) // 2]
    # The header is intact: open() works, only the pixel decode can tell.
    assert Image.open(io.BytesIO(truncated)).size == (64, 64)
    reject(b64(truncated), word="truncated or corrupt PNG")


def test_png_with_corrupt_pixel_data_is_rejected():
    raw = bytearray(noise_png(64, 64, seed=1))
    start, end = idat_span(bytes(raw))
    raw[start + 2:end] = bytes(end - start - 2)  # keep the zlib header, zero the deflate stream
    reject(b64(bytes(raw)), word="truncated or corrupt PNG")


def test_jpeg_truncated_in_pixel_data_is_rejected():
    pixels = random.Random(2).randbytes(64 * 64 * 3)
    raw = encode(Image.frombytes("RGB", (64, 64), pixels), "JPEG", quality=95)
    reject(b64(raw[: len(raw) // 2]), word="truncated or corrupt JPEG")


@pytest.mark.parametrize("size", [(15, 100), (100, 15), (1, 1), (15, 15)])
def test_images_smaller_than_16_px_are_rejected(size):
    reject(b64(encode(solid(*size), "PNG")), word=f"at least {MIN_IMAGE_SIDE_PX} px")


def test_image_of_exactly_16_px_is_accepted():
    assert MIN_IMAGE_SIDE_PX == 16
    assert decode(b64(encode(solid(16, 16), "PNG"))).size == (16, 16)


def test_pixel_limit_boundary_on_real_images():
    raw_ok = encode(solid(100, 100), "PNG")
    raw_over = encode(solid(101, 100), "PNG")
    assert decode(b64(raw_ok), max_pixels=100 * 100).size == (100, 100)
    reject(b64(raw_over), word="pixel limit", max_pixels=100 * 100)


# --- decompression bombs: refused from the header, before any pixel is decoded ----------------

@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("width, height", [(5000, 5000), (10000, 10000), (100000, 200), (20000, 20000), (65535, 65535)])
def test_decompression_bomb_is_refused_from_the_header(width, height, monkeypatch):
    raw = png_bomb(width, height)
    assert len(raw) < 2000
    with monkeypatch.context() as m:
        m.setattr(Image, "MAX_IMAGE_PIXELS", None)
        # A well-formed header: PIL itself reads this size.
        assert Image.open(io.BytesIO(raw)).size == (width, height)
    assert width * height > LIMITS.max_image_pixels

    loads = []
    real_load = ImageFile.ImageFile.load

    def spy_load(self, *args, **kwargs):
        loads.append(self.size)
        return real_load(self, *args, **kwargs)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy_load)
    value = b64(raw)
    errors = []

    def attempt():
        try:
            decode(value)
        except Exception as e:  # noqa: BLE001 - the assertions below say which one is right
            errors.append(e)

    tracemalloc.start()
    started = time.perf_counter()
    try:
        growth_kib = rss_peak_growth_kib(attempt)
        elapsed = time.perf_counter() - started
        _, python_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert len(errors) == 1
    error = errors[0]
    assert type(error) is InvalidRequest, f"{type(error).__name__}: {error}"
    assert error.http_status == 400 and error.field == "image"
    assert "pixel limit" in error.message
    if width * height <= 2 * Image.MAX_IMAGE_PIXELS:
        # Beyond that PIL itself refuses the header before our check can name the size.
        assert f"{width}x{height}" in error.message
    assert loads == []  # no pixel was decoded
    assert python_peak < 4 * 1024 * 1024
    assert elapsed < 2.0
    if growth_kib is None:  # said, not silent: only where /proc cannot reset the peak RSS
        assert sys.platform != "linux", "Linux resets the peak RSS through /proc/self/clear_refs: the bound must run"
        pytest.skip("no /proc/self/clear_refs here: the decoder's native memory bound is unchecked")
    assert growth_kib < 32 * 1024, f"peak RSS grew by {growth_kib} KiB"


def test_bomb_in_a_data_url_is_refused_too():
    reject(data_url(png_bomb(8000, 8000), "image/png"), word="pixel limit")


# --- size of the text: refused before decoding --------------------------------------------------

def test_oversized_base64_is_payload_too_large_before_decoding():
    max_bytes = 1000
    limit_chars = (max_bytes * 4) // 3 + 4
    # Invalid base64: had it been decoded first, this would be a 400 "not valid base64".
    error = reject("!" * (limit_chars + 1), PayloadTooLarge, word="limit", max_bytes=max_bytes)
    assert str(max_bytes) in error.message
    reject("data:image/png;base64," + "!" * (limit_chars + 1), PayloadTooLarge, word="limit", max_bytes=max_bytes)


def test_oversized_real_image_is_payload_too_large():
    raw = noise_png(40, 40)
    reject(b64(raw), PayloadTooLarge, word="byte limit", max_bytes=len(raw) // 2)


def test_image_at_the_byte_limit_is_accepted():
    raw = noise_png(40, 40, seed=5)
    assert decode(b64(raw), max_bytes=len(raw)).size == (40, 40)


def test_default_byte_limit_applies():
    too_long = "A" * ((LIMITS.max_image_bytes * 4) // 3 + 8)
    reject(too_long, PayloadTooLarge, word="limit")
