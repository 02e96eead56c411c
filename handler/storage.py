"""Object storage for results: upload the MP4 and a JSON sidecar, hand out a presigned URL.

Configured from the environment (the contract): ``WAN_S3_BUCKET`` turns it on, ``WAN_S3_PREFIX``
prefixes keys; the endpoint, credentials and region come through boto3's own standard
variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_REGION`` ...). Retries are botocore's (standard mode), not a loop of ours.

A failed upload never loses the video: the caller returns it inline with a warning. After a
failure (or a bucket that was missing or unreachable at start) uploads are skipped for
``WAN_S3_RECHECK_S`` seconds, so an outage does not add retry time to every request; then the
next request tries again and URLs come back by themselves.

Images for image-to-video may be read from ``s3://`` URIs, only in the buckets listed in
``WAN_S3_INPUT_BUCKETS``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from handler.errors import ConfigError, InvalidRequest, PayloadTooLarge, StorageReadError

log = logging.getLogger(__name__)

MP4_CONTENT_TYPE = "video/mp4"
# Multipart above 16 MiB: a 5 s 720p video is 5-30 MB; parts upload in parallel.
_TRANSFER = TransferConfig(multipart_threshold=16 * 1024 * 1024, multipart_chunksize=16 * 1024 * 1024)


@dataclass(frozen=True)
class StorageConfig:
    bucket: str
    prefix: str = ""
    presign_expiry_s: int = 3600
    input_buckets: frozenset[str] = field(default_factory=frozenset)
    # botocore attempts per call (standard retry mode: exponential backoff with jitter).
    max_attempts: int = 4
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0
    # After a failure, skip uploads (inline + warning) for this long before trying again.
    recheck_s: float = 30.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> StorageConfig | None:
        """The storage settings, or None when ``WAN_S3_BUCKET`` is not set."""
        bucket = env.get("WAN_S3_BUCKET", "").strip()
        input_buckets = frozenset(b.strip() for b in env.get("WAN_S3_INPUT_BUCKETS", "").split(",") if b.strip())
        if not bucket:
            return cls(bucket="", input_buckets=input_buckets) if input_buckets else None
        return cls(
            bucket=bucket,
            prefix=env.get("WAN_S3_PREFIX", "").strip("/"),
            presign_expiry_s=_env_number(env, "WAN_S3_PRESIGN_EXPIRY_S", 3600, int, 1, 7 * 24 * 3600),
            input_buckets=input_buckets,
            max_attempts=_env_number(env, "WAN_S3_MAX_ATTEMPTS", 4, int, 1, 20),
            recheck_s=_env_number(env, "WAN_S3_RECHECK_S", 30.0, float, 0, 3600),
        )


def _env_number(env, name, default, kind, low, high):
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if not low <= value <= high:
        # Presigned S3 URLs cannot live longer than 7 days (SigV4).
        raise ConfigError(f"{name} must be between {low} and {high}, got {raw}")
    return value


@dataclass(frozen=True)
class StoredVideo:
    url: str
    s3_uri: str
    key: str


class StorageUnavailable(Exception):
    """The upload did not happen; the message says why (for the response's warning)."""


def _describe(exc: Exception) -> str:
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        return f"{error.get('Code', 'error')}: {error.get('Message', '')}".strip(": ")
    return f"{exc.__class__.__name__}: {exc}"


class ObjectStore:
    def __init__(self, config: StorageConfig, client=None):
        self.config = config
        self.client = client or boto3.client(
            "s3",
            config=Config(
                retries={"max_attempts": config.max_attempts, "mode": "standard"},
                connect_timeout=config.connect_timeout_s,
                read_timeout=config.read_timeout_s,
                signature_version="s3v4",
            ),
        )
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._down_reason: str | None = None

    @property
    def uploads_enabled(self) -> bool:
        return bool(self.config.bucket)

    # -- health -------------------------------------------------------------------------

    def check_at_start(self) -> None:
        """Log clearly whether the bucket is usable; never raise (no crash loop on S3 trouble)."""
        if not self.uploads_enabled:
            return
        try:
            self.client.head_bucket(Bucket=self.config.bucket)
            log.info("object storage: bucket %s is reachable; results go there", self.config.bucket)
        except (ClientError, BotoCoreError) as exc:
            reason = f"bucket {self.config.bucket} is not usable ({_describe(exc)})"
            self._mark_down(reason)
            log.error("object storage: %s; serving videos inline with a warning until it is back", reason)

    def _mark_down(self, reason: str) -> None:
        with self._lock:
            self._down_until = time.monotonic() + self.config.recheck_s
            self._down_reason = reason

    def _skip_reason(self) -> str | None:
        with self._lock:
            if self._down_reason is not None and time.monotonic() < self._down_until:
                return self._down_reason
            return None

    # -- results ------------------------------------------------------------------------

    def key_for(self, request_id: str, now: datetime, suffix: str) -> str:
        parts = [self.config.prefix, now.strftime("%Y-%m-%d"), f"{request_id}{suffix}"]
        return "/".join(part for part in parts if part)

    def store_video(self, mp4: bytes, request_id: str, record: dict[str, Any]) -> StoredVideo:
        """Upload the MP4 and its JSON sidecar; raise StorageUnavailable if it cannot be done."""
        skip = self._skip_reason()
        if skip is not None:
            raise StorageUnavailable(f"object storage unavailable: {skip}")
        now = datetime.now(timezone.utc)
        key = self.key_for(request_id, now, ".mp4")
        sidecar = dict(
            record,
            request_id=request_id,
            created_at=now.isoformat(),
            video={"s3_uri": f"s3://{self.config.bucket}/{key}", "content_type": MP4_CONTENT_TYPE,
                   "bytes": len(mp4), "sha256": hashlib.sha256(mp4).hexdigest()},
        )
        try:
            self.client.upload_fileobj(io.BytesIO(mp4), self.config.bucket, key,
                                       ExtraArgs={"ContentType": MP4_CONTENT_TYPE}, Config=_TRANSFER)
            self.client.put_object(Bucket=self.config.bucket, Key=self.key_for(request_id, now, ".json"),
                                   Body=json.dumps(sidecar, indent=2, ensure_ascii=False).encode("utf-8"),
                                   ContentType="application/json")
            url = self.client.generate_presigned_url(
                "get_object", Params={"Bucket": self.config.bucket, "Key": key},
                ExpiresIn=self.config.presign_expiry_s,
            )
        except (ClientError, BotoCoreError, OSError) as exc:
            reason = f"upload to s3://{self.config.bucket}/{key} failed ({_describe(exc)})"
            self._mark_down(reason)
            log.error("request %s: %s; returning the video inline", request_id, reason)
            raise StorageUnavailable(reason) from exc
        with self._lock:
            self._down_reason = None
        return StoredVideo(url=url, s3_uri=f"s3://{self.config.bucket}/{key}", key=key)

    # -- inputs -------------------------------------------------------------------------

    def fetch_image(self, uri: str, field: str, max_bytes: int) -> bytes:
        """Read an input image from an allowed bucket, refusing big objects before download."""
        bucket, _, key = uri[len("s3://"):].partition("/")
        if not bucket or not key:
            raise InvalidRequest(f"{field} must be s3://bucket/key, got {uri[:200]!r}", field)
        if bucket not in self.config.input_buckets:
            raise InvalidRequest(
                f"{field} bucket {bucket!r} is not an allowed input bucket (WAN_S3_INPUT_BUCKETS)", field
            )
        try:
            head = self.client.head_object(Bucket=bucket, Key=key)
            if head["ContentLength"] > max_bytes:
                raise PayloadTooLarge(
                    f"{field} object is {head['ContentLength']} bytes, over the {max_bytes} byte limit", field
                )
            body = self.client.get_object(Bucket=bucket, Key=key)["Body"]
            # Never trust the length header alone: read at most one byte past the limit.
            data = body.read(max_bytes + 1)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("404", "NoSuchKey", "NotFound", "NoSuchBucket"):
                raise InvalidRequest(f"{field} object {uri} does not exist", field) from None
            if code in ("403", "AccessDenied", "Forbidden"):
                raise InvalidRequest(f"{field} object {uri} is not readable by the server", field) from None
            raise StorageReadError(f"reading {field} from {uri} failed ({_describe(exc)})", field) from exc
        except BotoCoreError as exc:
            raise StorageReadError(f"reading {field} from {uri} failed ({_describe(exc)})", field) from exc
        if len(data) > max_bytes:
            raise PayloadTooLarge(f"{field} object is over the {max_bytes} byte limit", field)
        return data
