"""What is sent to a server and what must come back: the request sizes tests use, images (plain
and hostile), and the check that a 200 carries a valid video."""

from __future__ import annotations

import base64
import io
import json
import random
import struct
import zlib
from typing import Any
from urllib.parse import urlsplit

import requests

from scripts.serve import local_session

# Small enough that a whole generation takes a fraction of a second on a CI core. Not smaller:
# at 64x64 libx264 encodes the same frames differently from run to run (seen with PyAV 18).
SMALL = {"width": 128, "height": 128, "num_frames": 9, "num_inference_steps": 2}
# The largest request tiny-ti2v.yaml allows (max_pixels 512x512, 65 frames, 20 steps): ~10 s on
# one core, most of it in the VAE decode, and ~0.7 GB over the worker's resting memory.
BIG = {"width": 512, "height": 512, "num_frames": 65}
# ~0.25 s a denoising step (50 steps, then a long decode: ~20 s in all): a deadline stops it after
# a few steps, with progress lines.
MIB = 1024 * 1024
LONG = {"width": 512, "height": 512, "num_frames": 161, "num_inference_steps": 50}


# Images given as URLs, each of which the handler must refuse without fetching anything.
REMOTE_IMAGE_URLS = (
    "http://example.com/cat.png",
    "https://example.com/cat.png",
    "HTTPS://EXAMPLE.COM/CAT.PNG",
    "  https://example.com/cat.png",
    "s3://bucket/cat.png",
    "file:///etc/passwd",
    "ftp://example.com/cat.png",
    "gs://bucket/cat.jpg",
)


def image_bytes(width: int = 96, height: int = 64, fmt: str = "PNG", color=(10, 120, 200)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, fmt)
    return buffer.getvalue()


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def png_base64(width: int = 96, height: int = 64, color=(200, 30, 30), data_url: bool = False) -> str:
    """A plain PNG as a request's ``image`` field: base64, or a data: URL."""
    encoded = b64(image_bytes(width, height, "PNG", color))
    return f"data:image/png;base64,{encoded}" if data_url else encoded


# -- hostile images -------------------------------------------------------------------------------------


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))




def png_header_bomb(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height over a few hundred bytes of data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(bytes(4096), 9))
            + _png_chunk(b"IEND", b""))


def png_deflate_bomb(side: int) -> bytes:
    """A complete, valid greyscale PNG of side x side zeros: ~side^2 / 1000 bytes of file."""
    compressor = zlib.compressobj(9)
    row = bytes(side + 1)
    data = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b"")


def png_text_bomb(kind: bytes = b"zTXt") -> bytes:
    """A real 64x64 PNG with a compressed text (or ICC) chunk that inflates to 64 MiB."""
    compressor = zlib.compressobj(9)
    bomb = compressor.compress(bytes(64 * MIB)) + compressor.flush()
    raw = image_bytes(64, 64)
    return raw[:33] + _png_chunk(kind, b"Comment\0\0" + bomb) + raw[33:]


def jpeg_claiming(width: int, height: int) -> bytes:
    """A real 32x32 JPEG whose frame header (SOF0) is patched to claim width x height."""
    raw = bytearray(image_bytes(32, 32, "JPEG"))
    sof = raw.index(b"\xff\xc0")
    raw[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(raw)


def webp_claiming(width: int, height: int) -> bytes:
    """A lossless WebP header (VP8L) claiming width x height, with no image data after it."""
    data = b"\x2f" + struct.pack("<I", (width - 1) | ((height - 1) << 14)) + bytes(32)
    chunk = b"VP8L" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk




# Who refuses a hostile image: the handler (our JSON error naming the field), or TorchServe's
# frontend before any worker sees the body (over max_request_size: its own answer, not ours).
HANDLER, FRONTEND = "handler", "frontend"


def hostile_images() -> list[tuple[str, Any, tuple[int, ...], str]]:
    """(name, image field value, accepted statuses, who refuses it: HANDLER or FRONTEND). Each must
    be refused fast, from headers."""
    png = image_bytes(200, 200)
    jpeg = image_bytes(200, 200, "JPEG")
    cases = [
        ("png header claims 65535x65535", b64(png_header_bomb(65535, 65535)), (400,)),
        ("png header claims 100000x200", b64(png_header_bomb(100000, 200)), (400,)),
        ("png header claims 5000x5000 (over our limit, under PIL's)", b64(png_header_bomb(5000, 5000)), (400,)),
        ("png deflate bomb 10000x10000 (100 MB of pixels, ~100 KB of file)", b64(png_deflate_bomb(10000)), (400,)),
        ("png zTXt chunk inflating to 64 MiB", b64(png_text_bomb(b"zTXt")), (400,)),
        ("png iCCP chunk inflating to 64 MiB", b64(png_text_bomb(b"iCCP")), (400,)),
        ("jpeg header claims 65000x65000", b64(jpeg_claiming(65000, 65000)), (400,)),
        ("jpeg header claims 5000x5000", "data:image/jpeg;base64," + b64(jpeg_claiming(5000, 5000)), (400,)),
        ("webp header claims 16383x16383", b64(webp_claiming(16383, 16383)), (400,)),
        ("png truncated in its header", b64(png[:30]), (400,)),
        ("png truncated in its pixel data", b64(png[: len(png) // 2]), (400,)),
        ("jpeg truncated in its pixel data", b64(jpeg[: len(jpeg) // 2]), (400,)),
        ("png magic, then garbage", b64(b"\x89PNG\r\n\x1a\n" + random.Random(1).randbytes(2000)), (400,)),
        ("jpeg magic, then garbage", b64(b"\xff\xd8\xff" + random.Random(2).randbytes(2000)), (400,)),
        ("GIF", b64(b"GIF89a" + bytes(100)), (400,)),
        ("BMP", b64(image_bytes(64, 64, "BMP")), (400,)),
        ("TIFF", b64(image_bytes(64, 64, "TIFF")), (400,)),
        ("PDF", b64(b"%PDF-1.7\n" + bytes(100)), (400,)),
        ("SVG as a data URL", "data:image/svg+xml;base64," + b64(b'<svg xmlns="http://www.w3.org/2000/svg"/>'), (400,)),
        ("SVG bytes with a png data URL", "data:image/png;base64," + b64(b'<svg xmlns="http://www.w3.org/2000/svg"/>'),
         (400,)),
        ("1x1 png", b64(image_bytes(1, 1)), (400,)),
        ("empty", "", (400,)),
        ("broken base64", "iVBORw0KGgo!!!!", (400,)),
        ("base64 with bad padding", b64(png)[:-3], (400,)),
        ("data URL without base64", "data:image/png,abc", (400,)),
        ("remote URL (SSRF)", "http://169.254.169.254/latest/meta-data/", (400,)),
        ("file URL", "file:///etc/passwd", (400,)),
        ("not a string", {"url": "x"}, (400,)),
        # Over the handler's 16 MiB image limit, under TorchServe's 24 MiB body limit: refused
        # by the text length before any base64 is decoded.
        ("17 MiB image as base64 (22.7 MB)", b64(b"\x89PNG\r\n\x1a\n" + bytes(17 * MIB)), (413,)),
    ]
    return [(*case, HANDLER) for case in cases] + [
        # Over TorchServe's max_request_size: refused by the frontend, the worker never sees it.
        ("26 MiB of base64 (over max_request_size)", "A" * (26 * MIB), (413,), FRONTEND),
    ]



# -- videos: what a 200 must carry --------------------------------------------------------------------


def answer_protocol(payload: Any) -> str:
    """How a JSON answer is wrapped (handler/envelopes.py): "v1", "v2" or "plain" (a plain answer
    has neither key)."""
    if isinstance(payload, dict) and "predictions" in payload:
        return "v1"
    if isinstance(payload, dict) and "outputs" in payload:
        return "v2"
    if isinstance(payload, dict) and set(payload) == {"error"} and isinstance(payload["error"], str):
        return "v2"  # the Open Inference Protocol's error; a plain answer's error is an object
    return "plain"


def unwrap_answer(payload: Any) -> Any:
    """The answer inside a KServe v1/v2 response (None if the wrapping is broken), or the payload."""
    try:
        if answer_protocol(payload) == "v1":
            [answer] = payload["predictions"]
            return answer
        if answer_protocol(payload) == "v2" and "error" in payload:
            return payload  # the protocol's error: {"error": "<message>"}
        if answer_protocol(payload) == "v2":
            [output] = payload["outputs"]
            [answer] = output["data"]
            # The protocol's BYTES element is a string: the answer's JSON text.
            return json.loads(answer) if isinstance(answer, str) else answer
    except (LookupError, TypeError, ValueError):
        return None
    return payload


def video_problem(response: requests.Response, expect: dict[str, int], output: str = "inline") -> str | None:
    """None when the 200 carries a valid H.264 MP4 of the expected size, else what is wrong."""
    from handler.video import probe_mp4

    try:
        if output == "mp4":
            mp4 = response.content
        else:
            if response.headers.get("Content-Type", "").startswith("application/x-ndjson"):
                lines = [json.loads(line) for line in response.text.splitlines() if line.strip()]
                if not lines or lines[-1].get("event") != "result":
                    return f"stream did not end with a result: {str(lines[-1:])[:200]}"
                result = lines[-1]
            else:
                result = unwrap_answer(response.json())
            video = result["video"]
            if "base64" in video:
                mp4 = base64.b64decode(video["base64"])
            else:
                # Only the campaign's own storage (moto on 127.0.0.1) may be fetched from.
                host = urlsplit(video["url"]).hostname
                if host != "127.0.0.1":
                    return f"video URL points at {host!r}, not 127.0.0.1: not downloaded ({str(video['url'])[:120]})"
                with local_session() as session:
                    download = session.get(video["url"], timeout=30)
                if download.status_code != 200:
                    return f"video URL answered {download.status_code}"
                mp4 = download.content
        info = probe_mp4(mp4)
    except Exception as exc:  # noqa: BLE001 - any failure to read the video is the finding
        return f"unreadable video ({type(exc).__name__}: {str(exc)[:120]})"
    got = {"width": info.width, "height": info.height, "num_frames": info.num_frames}
    wanted = {key: expect[key] for key in got if key in expect}
    if (info.codec, info.pix_fmt) != ("h264", "yuv420p") or any(got[k] != v for k, v in wanted.items()):
        return f"video is {info.codec}/{info.pix_fmt} {got}, expected h264/yuv420p {wanted}"
    return None


# Requests every data plane refuses with a 400 naming the field (the TorchServe and Triton tests).
BAD_REQUESTS = [
    ({}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": 42}, "prompt"),
    ({"prompt": "x" * 5000}, "prompt"),
    ({"prompt": "cat " * 600}, "prompt"),
    ({"prompt": "x", "promt": "typo"}, "promt"),
    ({"prompt": "x", "width": 100, "height": 64}, "width"),
    ({"prompt": "x", "width": 64}, "height"),
    ({"prompt": "x", "width": "64", "height": 64}, "width"),
    ({"prompt": "x", "width": 64000, "height": 64}, "width"),
    ({"prompt": "x", "num_frames": 10}, "num_frames"),
    ({"prompt": "x", "num_frames": -3}, "num_frames"),
    ({"prompt": "x", "num_frames": 10**12}, "num_frames"),
    ({"prompt": "x", "num_inference_steps": 0}, "num_inference_steps"),
    ({"prompt": "x", "num_inference_steps": 1.5}, "num_inference_steps"),
    ({"prompt": "x", "fps": True}, "fps"),
    ({"prompt": "x", "guidance_scale": -1}, "guidance_scale"),
    ({"prompt": "x", "guidance_scale": 1e308}, "guidance_scale"),
    ({"prompt": "x", "guidance_scale_2": 3.0}, "guidance_scale_2"),
    ({"prompt": "x", "seed": -1}, "seed"),
    ({"prompt": "x", "seed": "abc"}, "seed"),
    ({"prompt": "x", "output": "gif"}, "output"),
    ({"prompt": "x", "output": "url"}, "output"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": "x", "stream": True, "output": "mp4"}, "output"),
    ({"prompt": "x", "image": "not base64!!"}, "image"),
    ({"prompt": "x", "image": base64.b64encode(b"just some text, not an image").decode()}, "image"),
    ({"prompt": "x", "image": "https://example.com/cat.png"}, "image"),
    ({"prompt": "x", "image": "data:text/plain;base64,aGVsbG8="}, "image"),
    ({"prompt": "x", "image": 7}, "image"),
]
RAW_BAD_BODIES = [b"not json", b"[1, 2, 3]", b'{"prompt": "x", "guidance_scale": NaN}', b"\xff\xfe", b'"just a string"']
