"""The one request type, validated once at the edge.

``parse_request`` turns a JSON body into a frozen ``GenerationRequest`` or raises an
``InvalidRequest`` / ``PayloadTooLarge`` naming the field and the rule. Nothing is rounded or
silently changed: a size that is not a multiple of the variant's step, or a frame count that is
not 4k+1, is refused (diffusers would round it with only a log warning).
"""

from __future__ import annotations

import dataclasses
import json
import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any

from PIL import Image

from handler.config import LoraChoice, Profile, RequestLimits, RequestRules
from handler.errors import InvalidRequest, PayloadTooLarge
from handler.images import S3Fetcher, decode_image
from handler.variants import GenerationDefaults, ImageInput, VariantSpec

MAX_SEED = 2**63 - 1


class OutputKind(str, Enum):
    URL = "url"  # uploaded to object storage, presigned URL in the JSON
    INLINE = "inline"  # base64 MP4 in the JSON
    MP4 = "mp4"  # the MP4 bytes as the whole response body


# Field metadata: how a GenerationRequest field appears in parameters() (the echo in responses
# and records): (name, value -> shown value), or None when it is not echoed.
_ECHO = "echo"
# Field metadata: False for what a profile or the model decides, never a JSON field of its own.
_INPUT = "input"
# What an echo function returns for a value not worth showing (no profile, no adapter).
_HIDDEN = object()


@dataclass(frozen=True)
class GenerationRequest:
    """One validated request. The field names are the JSON request's fields (``FIELDS``): this
    class is the one list of them."""

    prompt: str
    negative_prompt: str
    image: Image.Image | None = field(metadata={_ECHO: ("has_image", lambda image: image is not None)})
    width: int
    height: int
    num_frames: int
    fps: int
    num_inference_steps: int
    guidance_scale: float
    guidance_scale_2: float | None
    seed: int
    output: OutputKind = field(metadata={_ECHO: ("output", lambda output: output.value)})
    # How the answer travels, not what is generated: not a parameter of the video.
    stream: bool = field(metadata={_ECHO: None})
    # The speed preset picked (handler.profiles), and the adapters that run, the profile's first.
    profile: str | None = field(default=None, metadata={_ECHO: ("profile", lambda p: _HIDDEN if p is None else p)})
    lora: tuple[LoraChoice, ...] = field(
        default=(), metadata={_ECHO: ("lora", lambda c: [x.to_json() for x in c] if c else _HIDDEN)})
    # From the profile: the sampler and its flow shift (None: the model's), and the
    # approximations it switches on (config.PROFILE_LOSSY).
    scheduler: str | None = field(default=None, metadata={_INPUT: False, _ECHO: (
        "scheduler", lambda s: _HIDDEN if s is None else s)})
    flow_shift: float | None = field(default=None, metadata={_INPUT: False, _ECHO: None})
    lossy: tuple[str, ...] = field(default=(), metadata={_INPUT: False, _ECHO: None})

    @property
    def duration_s(self) -> float:
        return self.num_frames / self.fps

    def parameters(self) -> dict[str, Any]:
        """The effective parameters, as echoed in responses and records (no image pixels)."""
        shown = {}
        for item in fields(self):
            name, show = item.metadata.get(_ECHO, (item.name, None)) or (None, None)
            if name is not None:
                value = getattr(self, item.name)
                value = show(value) if show is not None else value
                if value is not _HIDDEN:
                    shown[name] = value
        return shown

    @classmethod
    def from_defaults(cls, defaults: GenerationDefaults, prompt: str, seed: int, **changes: Any) -> GenerationRequest:
        """A request that takes every field the defaults have from them (the warm-up's)."""
        shared = {item.name: getattr(defaults, item.name) for item in fields(cls) if hasattr(defaults, item.name)}
        return cls(**{**shared, "prompt": prompt, "image": None, "seed": seed, "output": OutputKind.INLINE,
                      "stream": False, **changes})


# The request's JSON fields, in the order error messages list them.
FIELDS: tuple[str, ...] = tuple(item.name for item in fields(GenerationRequest) if item.metadata.get(_INPUT, True))


def decode_body(body: Any, limits: RequestLimits) -> dict[str, Any]:
    """Accept what TorchServe hands over (a dict, or bytes/str of JSON) and return a dict."""
    if body is None:
        raise InvalidRequest(
            "request body is missing; send a JSON object with the header Content-Type: application/json"
        )
    if isinstance(body, (bytes, bytearray)):
        if len(body) > limits.max_body_bytes:
            raise PayloadTooLarge(f"request body is {len(body)} bytes, over the {limits.max_body_bytes} byte limit")
        try:
            body = body.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidRequest("request body is not UTF-8 text") from None
    if isinstance(body, str):
        if not body.strip():
            raise InvalidRequest("request body is empty; send a JSON object with at least a prompt")
        try:
            body = json.loads(body)
        except ValueError as e:
            raise InvalidRequest(f"request body is not valid JSON: {e}") from None
        except RecursionError:
            raise InvalidRequest("request body is not valid JSON: nested too deeply") from None
    if not isinstance(body, dict):
        raise InvalidRequest(f"request body must be a JSON object, got {type(body).__name__}")
    return body


def show_value(value: Any) -> str:
    """A client's value as quoted in an error message: short, and cheap for any value (rendering
    a nested array with json.dumps can recurse past Python's limit: a 500 instead of a 400)."""
    if isinstance(value, (dict, list)):
        return "an object" if isinstance(value, dict) else "an array"
    if isinstance(value, str):
        return json.dumps(value[:40]) + ("..." if len(value) > 40 else "")
    text = json.dumps(value) if not isinstance(value, int) or isinstance(value, bool) else str(value)
    return text if len(text) <= 40 else text[:40] + "..."


def _int(body: Mapping[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = body.get(name, default)
    # bool is an int in Python; true as a width is a client bug, not 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"{name} must be an integer, got {show_value(value)}", name)
    if not low <= value <= high:
        raise InvalidRequest(f"{name} must be between {low} and {high}, got {show_value(value)}", name)
    return value


def _number(body: Mapping[str, Any], name: str, default: float, high: float) -> float:
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequest(f"{name} must be a number, got {show_value(value)}", name)
    if isinstance(value, int) and not -high <= value <= high:
        # Checked as an int: a huge JSON integer does not even convert to a float.
        raise InvalidRequest(f"{name} must be between 0 and {high}, got {show_value(value)}", name)
    if not math.isfinite(value):
        raise InvalidRequest(f"{name} must be a finite number, got {value}", name)
    if not 0 <= value <= high:
        raise InvalidRequest(f"{name} must be between 0 and {high}, got {value}", name)
    return float(value)


def _text(body: Mapping[str, Any], name: str, default: str | None, max_chars: int, required: bool) -> str:
    value = body.get(name, default)
    if not isinstance(value, str):
        raise InvalidRequest(f"{name} must be a string" + (" (it is required)" if value is None else ""), name)
    if required and not value.strip():
        raise InvalidRequest(f"{name} must not be empty", name)
    if len(value) > max_chars:
        raise InvalidRequest(f"{name} is {len(value)} characters, over the {max_chars} limit", name)
    if "\x00" in value:
        raise InvalidRequest(f"{name} contains a NUL character", name)
    try:
        # JSON can carry lone UTF-16 surrogates ("\ud800"); no UTF-8 consumer (the tokenizer, the
        # result's JSON sidecar in S3) can take them.
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest(f"{name} is not valid Unicode text (it holds a lone UTF-16 surrogate)", name) from None
    return value


def _size_for_image(image: Image.Image, defaults: GenerationDefaults, multiple: int,
                    max_side_px: int, patches_divisor: int = 1) -> tuple[int, int]:
    """Default size for an image request: the default pixel area with the image's aspect.

    This is how the official generate.py sizes image-to-video (``max_area``). For very wide or
    tall images the area is shrunk until the long side fits ``max_side_px``. The result is
    floored to the variant's multiple, so it never exceeds the area or the side limit.
    ``patches_divisor``: on a worker that splits the video's tokens over N ranks, the number
    of patches per frame (width / multiple x height / multiple) must divide by N; the size is
    then floored further, by whole multiples, to the largest one that does.
    """
    aspect = image.height / image.width
    area = min(defaults.width * defaults.height, max_side_px**2 * min(aspect, 1 / aspect))
    height = max(multiple, round(math.sqrt(area * aspect)) // multiple * multiple)
    width = max(multiple, round(math.sqrt(area / aspect)) // multiple * multiple)
    width, height = min(width, max_side_px // multiple * multiple), min(height, max_side_px // multiple * multiple)
    if patches_divisor > 1:
        candidates = [(width - i * multiple, height - j * multiple)
                      for i in range(patches_divisor) for j in range(patches_divisor)]
        fitting = [(w, h) for w, h in candidates
                   if w > 0 and h > 0 and (w // multiple) * (h // multiple) % patches_divisor == 0]
        if fitting:
            width, height = max(fitting, key=lambda size: (size[0] * size[1], -abs(size[1] / size[0] - aspect)))
    return width, height


def _check_size(name: str, value: int, spec: VariantSpec) -> None:
    if value % spec.size_multiple:
        raise InvalidRequest(
            f"{name} must be a multiple of {spec.size_multiple} for {spec.name}, got {value} "
            "(sizes are not rounded)",
            name,
        )


def _profile(body: Mapping[str, Any], rules: RequestRules) -> Profile | None:
    if "profile" not in body:
        return None
    name = body["profile"]
    if not isinstance(name, str):
        raise InvalidRequest(f"profile must be a string, got {show_value(name)}", "profile")
    if name not in rules.profiles:
        known = ", ".join(sorted(rules.profiles)) or "none: this model has no profiles"
        raise InvalidRequest(f"profile {show_value(name)} is not one of this model's profiles ({known})", "profile")
    profile = rules.profiles[name]
    for locked in profile.locked:
        if locked in body:
            raise InvalidRequest(f"{locked} is fixed by profile {name!r}; leave it out or pick no profile", locked)
    return profile


def _lora(body: Mapping[str, Any], rules: RequestRules, profile: Profile | None) -> tuple[LoraChoice, ...]:
    """The adapters that run: the profile's, then the request's, from the model's allow-list."""
    chosen = list(profile.lora) if profile is not None else []
    if "lora" not in body:
        return tuple(chosen)
    value, adapters, most = body["lora"], rules.lora.adapters, rules.lora.max_per_request
    if not adapters:
        raise InvalidRequest("lora: this model has no LoRA allow-list (handler.lora.adapters)", "lora")
    if not isinstance(value, list):
        raise InvalidRequest(f'lora must be a list of {{"name", "scale"}}, got {show_value(value)}', "lora")
    if len(value) + len(chosen) > most:
        extra = f" (its profile adds {len(chosen)})" if chosen else ""
        raise InvalidRequest(f"lora: at most {most} adapters per request{extra}, got {len(value)}", "lora")
    for i, item in enumerate(value):
        if not isinstance(item, dict) or set(item) - {"name", "scale"}:
            raise InvalidRequest(f'lora[{i}] must be an object with "name" and an optional "scale"', "lora")
        name = item.get("name")
        if not isinstance(name, str) or name not in adapters:
            raise InvalidRequest(f"lora[{i}].name {show_value(name)} is not in this model's allow-list "
                                 f"({', '.join(sorted(adapters))})", "lora")
        scale = item.get("scale", 1.0)
        high = adapters[name].max_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) \
                or not 0 < scale <= high:
            raise InvalidRequest(f"lora[{i}].scale must be a number above 0 and at most {high:g}, "
                                 f"got {show_value(scale)}", "lora")
        if any(c.name == name for c in chosen):
            raise InvalidRequest(f"lora[{i}].name {name!r} is named twice (or by the profile too)", "lora")
        chosen.append(LoraChoice(name, float(scale)))
    return tuple(chosen)


def parse_request(
    body: Any,
    spec: VariantSpec,
    defaults: GenerationDefaults,
    limits: RequestLimits,
    storage_configured: bool,
    fetch_s3: S3Fetcher | None = None,
    patches_divisor: int = 1,
    rules: RequestRules | None = None,
) -> GenerationRequest:
    """Validate a request body against the contract and the serving variant.

    ``storage_configured``: results can be uploaded (output ``url`` allowed and the default).
    ``fetch_s3``: reads ``s3://`` image inputs from allowed buckets; None refuses them.
    ``patches_divisor``: see ``_size_for_image`` (the size it picks; a size asked for is never changed).
    ``rules``: the model's LoRA allow-list and profiles (None: it has neither).
    """
    body = decode_body(body, limits)
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        shown = ", ".join(name if len(name) <= 40 else name[:40] + "..." for name in unknown[:5])
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise InvalidRequest(f"unknown field(s): {shown}{more}; accepted fields: {', '.join(FIELDS)}", unknown[0])
    # JSON null means "not given" for every optional field (generated clients send nulls).
    body = {name: value for name, value in body.items() if value is not None}
    rules = rules or RequestRules(limits=limits)
    # A profile is a second layer of defaults: the request's own fields still win (unless locked).
    profile = _profile(body, rules)
    if profile is not None:
        defaults = dataclasses.replace(defaults, **profile.defaults)
    lora = _lora(body, rules, profile)

    prompt = _text(body, "prompt", None, limits.max_prompt_chars, required=True)
    # The limit is on what clients send; the server's own default (the official one) is exempt.
    negative_prompt = (
        _text(body, "negative_prompt", None, limits.max_prompt_chars, required=False)
        if "negative_prompt" in body
        else defaults.negative_prompt
    )

    image = None
    if "image" in body:
        if spec.image_input is ImageInput.REJECTED:
            raise InvalidRequest(f"{spec.name} is text-to-video and takes no image", "image")
        image = decode_image(body["image"], max_bytes=limits.max_image_bytes, max_pixels=limits.max_image_pixels,
                             fetch_s3=fetch_s3)
    elif spec.image_input is ImageInput.REQUIRED:
        raise InvalidRequest(f"{spec.name} is image-to-video: image is required", "image")

    given = [name for name in ("width", "height") if name in body]
    if len(given) == 1:
        missing = "height" if given == ["width"] else "width"
        raise InvalidRequest(f"give both width and height, or neither (missing {missing})", missing)
    if given:
        width = _int(body, "width", 0, spec.size_multiple, limits.max_side_px)
        height = _int(body, "height", 0, spec.size_multiple, limits.max_side_px)
        _check_size("width", width, spec)
        _check_size("height", height, spec)
    elif image is not None:
        width, height = _size_for_image(image, defaults, spec.size_multiple, limits.max_side_px, patches_divisor)
    else:
        width, height = defaults.width, defaults.height
    if width * height > limits.max_pixels:
        raise InvalidRequest(
            f"width x height is {width * height} pixels, over the {limits.max_pixels} limit", "width"
        )

    num_frames = _int(body, "num_frames", defaults.num_frames, 1, limits.max_num_frames)
    if (num_frames - 1) % 4:
        raise InvalidRequest(
            f"num_frames must be 4k+1 (1, 5, 9, ..., 81, ..., 121), got {num_frames} (frame counts are not rounded)",
            "num_frames",
        )
    fps = _int(body, "fps", defaults.fps, 1, limits.max_fps)
    steps = _int(body, "num_inference_steps", defaults.num_inference_steps, 1, limits.max_inference_steps)
    guidance_scale = _number(body, "guidance_scale", defaults.guidance_scale, limits.max_guidance_scale)
    if spec.two_experts:
        if "guidance_scale_2" in body:
            guidance_scale_2 = _number(body, "guidance_scale_2", 0.0, limits.max_guidance_scale)
            if guidance_scale <= 1.0 < guidance_scale_2:
                # diffusers switches classifier-free guidance on or off for both experts
                # together, from guidance_scale alone: guidance_scale_2 would be ignored.
                raise InvalidRequest(
                    "guidance_scale_2 > 1 needs guidance_scale > 1 (guidance is on or off for both experts)",
                    "guidance_scale_2",
                )
        elif guidance_scale <= 1.0:
            # Guidance off for the high-noise expert turns it off for both; report what runs.
            guidance_scale_2 = guidance_scale
        else:
            guidance_scale_2 = defaults.guidance_scale_2 if defaults.guidance_scale_2 is not None else guidance_scale
    elif "guidance_scale_2" in body:
        raise InvalidRequest(f"guidance_scale_2 applies only to two-expert variants, not {spec.name}", "guidance_scale_2")
    else:
        guidance_scale_2 = None

    seed = _int(body, "seed", 0, 0, MAX_SEED) if "seed" in body else secrets.randbelow(MAX_SEED)

    output_value = body.get("output", OutputKind.URL.value if storage_configured else OutputKind.INLINE.value)
    try:
        if not isinstance(output_value, str):
            # Before the Enum lookup: its error message is a repr(), which recurses with the value.
            raise TypeError
        output = OutputKind(output_value)
    except (ValueError, TypeError):
        raise InvalidRequest(
            f"output must be one of {', '.join(k.value for k in OutputKind)}, got {show_value(output_value)}", "output"
        ) from None
    if output is OutputKind.URL and not storage_configured:
        raise InvalidRequest("output 'url' needs object storage, and this server has none configured (WAN_S3_BUCKET)", "output")

    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidRequest(f"stream must be true or false, got {show_value(stream)}", "stream")
    if stream and output is OutputKind.MP4:
        raise InvalidRequest("stream: true answers in NDJSON lines; use output 'inline' or 'url' with it", "output")

    return GenerationRequest(
        prompt=prompt, negative_prompt=negative_prompt, image=image, width=width, height=height,
        num_frames=num_frames, fps=fps, num_inference_steps=steps, guidance_scale=guidance_scale,
        guidance_scale_2=guidance_scale_2, seed=seed, output=output, stream=stream,
        profile=profile.name if profile is not None else None, lora=lora,
        scheduler=profile.scheduler if profile is not None else None,
        flow_shift=defaults.flow_shift, lossy=profile.lossy if profile is not None else (),
    )
