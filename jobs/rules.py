"""A job's fields, checked at submission by the handler's own rules.

The create body (JSON, or multipart form fields read by each field's type) is mapped onto the
handler's request fields and validated with ``handler.request.parse_request`` and the model's
config: a job the data plane would refuse is a 400 now, minutes before any GPU is involved, and
there is no second copy of the field rules here. Only what the Jobs API adds (model, size,
seconds, input_reference, metadata, webhook_url) is checked in this module.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import typing
from dataclasses import dataclass
from typing import Any

from handler import request as handler_request
from handler.errors import WanError
from jobs.config import ModelEntry, Settings
from jobs.errors import InvalidRequest, PayloadTooLarge
from jobs.webhooks import check_webhook_url

# The handler's fields a job may set. `output` and `stream` are the job service's business: the
# worker always streams (progress) and picks the output its endpoint is configured for.
HANDLER_FIELDS = tuple(name for name in handler_request.FIELDS if name not in ("output", "stream"))
JOB_FIELDS = ("model", "size", "seconds", "input_reference", "metadata", "webhook_url")
CREATE_FIELDS = HANDLER_FIELDS + JOB_FIELDS
MAX_METADATA_PAIRS = 16
MAX_METADATA_CHARS = 512


def _field_types() -> dict[str, type]:
    """The Python type of each handler field, from the one request type (for multipart text)."""
    hints = typing.get_type_hints(handler_request.GenerationRequest)
    types: dict[str, type] = {}
    for name in HANDLER_FIELDS:
        hint = hints.get(name, str)
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        base = args[0] if args else hint
        types[name] = base if base in (int, float, bool, str) else str
    return types


FIELD_TYPES = _field_types()


@dataclass(frozen=True)
class JobSpec:
    """A validated job: what goes to the data plane, what the handler's rules made of it, and
    what only the job service keeps."""

    model: ModelEntry
    request: dict[str, Any]  # the data-plane request, without the image
    image: str | None  # base64 text or data: URL, as sent to the data plane
    parameters: dict[str, Any]  # effective (defaults applied)
    metadata: dict[str, str]
    webhook_url: str | None
    fingerprint: str  # "the same body" for Idempotency-Key

    @property
    def seed(self) -> int:
        return self.request["seed"]


def from_form_text(name: str, text: str) -> Any:
    """A multipart field's text read by the field's type: "64" is 64 for width, "true" is true."""
    kind = FIELD_TYPES.get(name, str)
    if name == "lora":
        # A list of {"name", "scale"}: JSON text in a form field.
        try:
            return json.loads(text)
        except ValueError:
            raise InvalidRequest('lora must be a JSON list of {"name", "scale"}', name) from None
    if kind is bool:
        if text.lower() in ("true", "1"):
            return True
        if text.lower() in ("false", "0"):
            return False
        raise InvalidRequest(f"{name} must be true or false, got {text[:40]!r}", name)
    if kind is int:
        try:
            return int(text.strip())
        except ValueError:
            raise InvalidRequest(f"{name} must be an integer, got {text[:40]!r}", name) from None
    if kind is float:
        try:
            value = float(text.strip())
        except ValueError:
            raise InvalidRequest(f"{name} must be a number, got {text[:40]!r}", name) from None
        return int(value) if value.is_integer() and "." not in text and "e" not in text.lower() else value
    return text


def _size(value: Any) -> tuple[int, int]:
    if not isinstance(value, str):
        raise InvalidRequest("size must be a string \"WIDTHxHEIGHT\", e.g. \"1280x704\"", "size")
    parts = value.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise InvalidRequest(f"size must be \"WIDTHxHEIGHT\" (e.g. \"1280x704\"), got {value[:40]!r}", "size")
    return int(parts[0]), int(parts[1])


def _seconds(value: Any) -> float:
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise InvalidRequest(f"seconds must be a number, got {value[:40]!r}", "seconds") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise InvalidRequest("seconds must be a positive number", "seconds")
    return float(value)


def _metadata(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise InvalidRequest("metadata must be an object of string keys and string values", "metadata")
    if len(value) > MAX_METADATA_PAIRS:
        raise InvalidRequest(f"metadata holds at most {MAX_METADATA_PAIRS} pairs, got {len(value)}", "metadata")
    for key, item in value.items():
        if not isinstance(item, str):
            raise InvalidRequest(f"metadata values must be strings (metadata.{str(key)[:40]})", "metadata")
        if len(key) > 64 or len(item) > MAX_METADATA_CHARS:
            raise InvalidRequest(f"metadata keys hold at most 64 characters and values {MAX_METADATA_CHARS}",
                                 "metadata")
    return dict(value)


def fingerprint(fields: dict[str, Any]) -> str:
    """The same fields and values give the same fingerprint, whether they came as JSON or as
    multipart (after reading by type); the image counts by its content."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def validate_job(body: dict[str, Any], settings: Settings) -> JobSpec:
    """Check a create body (typed values) and turn it into a JobSpec, or raise InvalidRequest
    naming the field."""
    unknown = sorted(set(body) - set(CREATE_FIELDS))
    if unknown:
        raise InvalidRequest(f"unknown field(s): {', '.join(u[:40] for u in unknown[:5])}; accepted fields: "
                             f"{', '.join(CREATE_FIELDS)}", unknown[0])
    # JSON null means "not given" (generated clients send nulls), as on the data plane.
    body = {name: value for name, value in body.items() if value is not None}

    model_name = body.pop("model", settings.default_model.name)
    model = settings.model(model_name) if isinstance(model_name, str) else None
    if model is None:
        known = ", ".join(m.name for m in settings.models)
        raise InvalidRequest(f"model {str(model_name)[:40]!r} is not served here; models: {known}", "model")

    metadata = _metadata(body.pop("metadata", {}))
    webhook_url = body.pop("webhook_url", None)
    if webhook_url is not None:
        webhook_url = check_webhook_url(webhook_url, settings.webhook_allowed_hosts)

    image_field = "image"
    if "input_reference" in body:
        if "image" in body:
            raise InvalidRequest("give either image or input_reference, not both", "input_reference")
        body["image"] = body.pop("input_reference")
        image_field = "input_reference"

    if "size" in body:
        if "width" in body or "height" in body:
            raise InvalidRequest("give either size or width and height, not both", "size")
        body["width"], body["height"] = _size(body.pop("size"))

    seconds_given = None
    if "seconds" in body:
        if "num_frames" in body:
            raise InvalidRequest("give either seconds or num_frames, not both", "seconds")
        seconds = seconds_given = _seconds(body.pop("seconds"))
        fps = body.get("fps", model.defaults.fps)
        frames = seconds * fps + 1 if isinstance(fps, int) and not isinstance(fps, bool) else None
        if frames is None or not float(frames).is_integer():
            raise InvalidRequest(f"seconds x fps + 1 must be a whole number of frames; {seconds:g} s at {fps} fps is "
                                 f"not (durations are not rounded)", "seconds")
        frames = int(frames)
        if (frames - 1) % 4:
            valid = [f"{4 * k / fps:g}" for k in range(1, 7)]
            raise InvalidRequest(f"{seconds:g} s at {fps} fps is {frames} frames, and the frame count must be 4k+1 "
                                 f"(durations are not rounded); e.g. seconds {', '.join(valid[:6])}", "seconds")
        body["num_frames"] = frames

    try:
        parsed = handler_request.parse_request(
            body, model.spec, model.defaults, model.limits, storage_configured=False, fetch_s3=None,
            rules=model.rules,
        )
    except WanError as e:
        error = PayloadTooLarge if e.http_status == 413 else InvalidRequest
        param, message = getattr(e, "field", None), e.message
        if param == "image" and image_field != "image":
            param, message = image_field, message.replace("image", image_field, 1)
        elif param == "num_frames" and seconds_given is not None:
            # The client asked in seconds: name what they sent.
            param, message = "seconds", f"{seconds_given:g} s is {body['num_frames']} frames: {message}"
        raise error(message, param) from None

    image = body.get("image")
    request = {name: value for name, value in body.items() if name != "image"}
    request["seed"] = parsed.seed  # chosen now, so that every attempt makes the same video
    parameters = {k: v for k, v in parsed.parameters().items() if k != "output"}
    fields = dict(request, model=model.name, metadata=metadata, webhook_url=webhook_url,
                  image=hashlib.sha256(image.encode()).hexdigest() if image else None)
    if "seed" not in body:
        fields.pop("seed")  # a random seed is not part of what the client sent
    return JobSpec(model=model, request=request, image=image, parameters=parameters, metadata=metadata,
                   webhook_url=webhook_url, fingerprint=fingerprint(fields))


def image_from_upload(data: bytes) -> str:
    """An ``input_reference`` file as the base64 text the data plane reads. The format is told by
    the file's own signature (the handler's check), not by the part's declared content type."""
    return base64.b64encode(data).decode("ascii")
