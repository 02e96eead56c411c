"""MP4 encoding (H.264, yuv420p) in-process with PyAV, and decoding for checks."""

from __future__ import annotations

import contextlib
import io
import os
import queue
import tempfile
import threading
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np

from handler.config import VideoEncoding

MP4_CONTENT_TYPE = "video/mp4"


def encode_mp4(frames: np.ndarray, fps: int, settings: VideoEncoding | None = None) -> bytes:
    """Encode uint8 frames shaped (F, H, W, 3) to MP4 bytes."""
    encoder = Mp4Encoder(fps, settings)
    encoder.add(frames)
    return encoder.finish()


_END, _ABORT = object(), object()


class Mp4Encoder:
    """H.264 (yuv420p) MP4 from frames that arrive in chunks, encoded on a background thread.

    The VAE decode hands over each chunk of frames as it finishes it, so the encoding (seconds
    for a 720p video) runs while the GPU decodes the rest instead of after it. ``finish`` waits
    for the last frames and returns the file; ``abort`` drops it (a failed decode).

    Written through a temporary file because ``movflags=faststart`` (moov atom first, so a
    player can start before the download ends) needs a seekable file; PyAV fails with it on
    an in-memory buffer.
    """

    def __init__(self, fps: int, settings: VideoEncoding | None = None):
        self.fps = fps
        self.settings = settings or VideoEncoding()
        self._chunks: queue.SimpleQueue = queue.SimpleQueue()
        self._result: bytes | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="mp4-encoder", daemon=True)
        self._thread.start()

    def add(self, frames: np.ndarray) -> None:
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"expected uint8 frames (F, H, W, 3), got {frames.dtype} {frames.shape}")
        self._chunks.put(frames)

    def finish(self) -> bytes:
        self._chunks.put(_END)
        self._thread.join()
        if self._error is not None:
            raise self._error
        if self._result is None:
            raise ValueError("no frames to encode")
        return self._result

    def abort(self) -> None:
        """Stop and drop the video; safe to call after finish, and more than once."""
        if self._thread.is_alive():
            self._chunks.put(_ABORT)
            self._thread.join()

    def _run(self) -> None:
        path = container = stream = None
        try:
            index = 0
            while True:
                chunk = self._chunks.get()
                if chunk is _ABORT:
                    return
                if chunk is _END:
                    break
                if container is None:
                    fd, path = tempfile.mkstemp(suffix=".mp4")
                    os.close(fd)
                    container, stream = self._open(path, chunk.shape[2], chunk.shape[1])
                for frame_pixels in chunk:
                    frame = av.VideoFrame.from_ndarray(frame_pixels, format="rgb24")
                    # Explicit timestamps: x264's rate control reads them, and frames without
                    # them made the same frames encode differently from run to run.
                    frame.pts = index
                    frame.time_base = stream.codec_context.time_base
                    container.mux(stream.encode(frame))
                    index += 1
            if container is None:
                return
            container.mux(stream.encode())
            container, closing = None, container
            closing.close()
            with open(path, "rb") as f:
                self._result = f.read()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller by finish()
            self._error = exc
        finally:
            if container is not None:  # aborted or failed half-way
                with contextlib.suppress(Exception):  # the video is dropped anyway
                    container.close()
            if path is not None:
                os.unlink(path)

    def _open(self, path: str, width: int, height: int):
        container = av.open(path, mode="w", format="mp4", options={"movflags": "+faststart"})
        stream = container.add_stream("libx264", rate=self.fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = Fraction(1, self.fps)
        options = {"crf": str(self.settings.crf), "preset": self.settings.preset}
        if self.settings.x264_params:
            options["x264-params"] = self.settings.x264_params
        stream.options = options
        return container, stream


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
