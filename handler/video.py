"""MP4 encoding (H.264, yuv420p) in-process with PyAV, and decoding for checks."""

from __future__ import annotations

import io
import os
import tempfile
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np

from handler.config import VideoEncoding

MP4_CONTENT_TYPE = "video/mp4"


def encode_mp4(frames: np.ndarray, fps: int, settings: VideoEncoding | None = None) -> bytes:
    """Encode uint8 frames shaped (F, H, W, 3) to MP4 bytes.

    Written through a temporary file because ``movflags=faststart`` (moov atom first, so a
    player can start before the download ends) needs a seekable file; PyAV fails with it on
    an in-memory buffer.
    """
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames (F, H, W, 3), got {frames.dtype} {frames.shape}")
    settings = settings or VideoEncoding()
    num_frames, height, width, _ = frames.shape
    fd, path = tempfile.mkstemp(suffix=".mp4")
    os.close(fd)
    try:
        with av.open(path, mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width, stream.height = width, height
            stream.pix_fmt = "yuv420p"
            stream.codec_context.time_base = Fraction(1, fps)
            stream.options = {"crf": str(settings.crf), "preset": settings.preset}
            for index in range(num_frames):
                frame = av.VideoFrame.from_ndarray(frames[index], format="rgb24")
                # Explicit timestamps: x264's rate control reads them, and frames without
                # them made the same frames encode differently from run to run.
                frame.pts = index
                frame.time_base = stream.codec_context.time_base
                container.mux(stream.encode(frame))
            container.mux(stream.encode())
        with open(path, "rb") as f:
            return f.read()
    finally:
        os.unlink(path)


@dataclass(frozen=True)
class VideoInfo:
    codec: str
    pix_fmt: str
    width: int
    height: int
    num_frames: int
    fps: float


def probe_mp4(data: bytes) -> VideoInfo:
    """Decode every frame of an MP4 and report what it holds (used by tests and the client)."""
    with av.open(io.BytesIO(data), mode="r") as container:
        stream = container.streams.video[0]
        count = sum(1 for _ in container.decode(stream))
        return VideoInfo(
            codec=stream.codec_context.name,
            pix_fmt=stream.codec_context.pix_fmt,
            width=stream.codec_context.width,
            height=stream.codec_context.height,
            num_frames=count,
            fps=float(stream.average_rate or stream.base_rate or 0),
        )


def decode_frames(data: bytes) -> np.ndarray:
    """All frames of an MP4 as uint8 (F, H, W, 3)."""
    with av.open(io.BytesIO(data), mode="r") as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
