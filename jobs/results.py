"""Where finished videos are kept, and their poster frames.

With object storage on the data plane (an endpoint with ``output: url``), the handler uploads the
video and the job keeps its ``s3_uri``; the content call redirects to a fresh presigned URL.
Otherwise the data plane answers inline and the video is written to a results folder
(``.run/results`` locally, a volume in Kubernetes), named by the job id.
"""

from __future__ import annotations

import base64
import io
import os
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

import av
from PIL import Image

POSTER_MAX_SIDE_PX = 640
POSTER_QUALITY = 85


class ResultStore:
    def __init__(self, folder: Path):
        self.folder = folder

    def path(self, video_id: str) -> Path:
        return self.folder / f"{video_id}.mp4"

    def save(self, video_id: str, mp4: bytes) -> Path:
        """Write atomically: a reader never sees half a video, a crash leaves no partial file."""
        self.folder.mkdir(parents=True, exist_ok=True)
        target = self.path(video_id)
        fd, temp = tempfile.mkstemp(dir=self.folder, prefix=f".{video_id}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(mp4)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, target)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
        return target

    def remove(self, video_id: str) -> None:
        self.path(video_id).unlink(missing_ok=True)


def decode_inline(result: dict) -> bytes | None:
    video = result.get("video") or {}
    encoded = video.get("base64")
    return base64.b64decode(encoded) if isinstance(encoded, str) else None


def poster_jpeg(mp4: bytes) -> bytes:
    """The middle frame as a JPEG: a poster for lists and the page (the first frame of a
    generated video is often the least representative)."""
    with av.open(io.BytesIO(mp4)) as container:
        frames = [frame.to_image() for frame in container.decode(video=0)]
    if not frames:
        raise ValueError("the video holds no frame")
    image: Image.Image = frames[len(frames) // 2].convert("RGB")
    image.thumbnail((POSTER_MAX_SIDE_PX, POSTER_MAX_SIDE_PX))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=POSTER_QUALITY)
    return out.getvalue()


def presign(s3_uri: str, expires_s: int = 3600) -> str:
    """A fresh presigned GET URL for a result in object storage (boto3's standard variables
    give endpoint and credentials, as on the data plane)."""
    import boto3

    parts = urlsplit(s3_uri)
    client = boto3.client("s3")
    return client.generate_presigned_url("get_object", Params={"Bucket": parts.netloc, "Key": parts.path.lstrip("/")},
                                         ExpiresIn=expires_s)
