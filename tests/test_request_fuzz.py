"""Property-based fuzzing of the request parser (handler/request.py, handler/images.py).

Whatever a client sends, the parser either returns a request that keeps every limit and can be
stored, or refuses it with a 400/413 whose message is short and whose field names a real field.
Nothing else may come out of it: any other exception would be a 500 from the server.

Examples per property: ``WAN_FUZZ_EXAMPLES`` (make test: the default below; the recorded campaign
runs thousands, see RELIABILITY.md). Derandomized: the same examples on every run.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import math
import os

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from handler.config import RequestLimits
from handler.envelopes import unwrap
from handler.errors import InvalidRequest, PayloadTooLarge, WanError
from handler.images import MIN_IMAGE_SIDE_PX, decode_image
from handler.request import FIELDS, MAX_SEED, GenerationRequest, OutputKind, parse_request
from handler.variants import I2V_A14B, T2V_A14B, TI2V_5B

EXAMPLES = int(os.environ.get("WAN_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# Small limits, so that valid values are easy to hit and the images decode fast.
LIMITS = RequestLimits(max_side_px=256, max_pixels=256 * 160, max_num_frames=33, max_inference_steps=8,
                       max_prompt_chars=300, max_image_bytes=64 * 1024, max_image_pixels=512 * 512)
SPECS = (T2V_A14B, I2V_A14B, TI2V_5B)
# An error message is read by people: it quotes the client's value, never all of it.
MAX_MESSAGE_CHARS = 600


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


_GRADIENT = Image.linear_gradient("L").resize((40, 30)).convert("RGB")
REAL_IMAGES = [_encoded(_GRADIENT, fmt) for fmt in ("PNG", "JPEG", "WEBP")]
IMAGE = base64.b64encode(REAL_IMAGES[0]).decode()

# -- strategies ------------------------------------------------------------------------------------

# Any text, lone UTF-16 surrogates included: JSON can carry them ("\ud800") and clients send them.
any_text = st.text(st.characters(exclude_categories=())
                   | st.sampled_from(["\ud800", "\udfff", "\x00", "\u202e", "\ufeff", "\U0001f98a"]), max_size=40)
scalars = (st.none() | st.booleans() | st.integers() | st.integers(min_value=-(2**80), max_value=2**80)
           | st.floats() | any_text)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(any_text, inner, max_size=4), max_leaves=10)
near = st.sampled_from([-1, 0, 1, 2, 4, 5, 8, 9, 15, 16, 17, 31, 32, 33, 64, 96, 128, 160, 255, 256, 257, 320,
                        1024, 2**31, 2**63 - 1, 2**63, 10**30])
ints = near | st.integers(min_value=-10, max_value=400) | st.integers()
numbers = ints | st.floats() | st.floats(min_value=0, max_value=25) | st.sampled_from([0.0, 1.0, 1.5, 20.0, 20.01])
FIELD_VALUES = {
    "prompt": any_text | st.text(min_size=290, max_size=310) | scalars,
    "negative_prompt": any_text | scalars,
    "image": st.just(IMAGE) | st.just("data:image/png;base64," + IMAGE) | any_text | scalars,
    "width": ints, "height": ints, "num_frames": ints, "fps": ints, "num_inference_steps": ints, "seed": ints,
    "guidance_scale": numbers, "guidance_scale_2": numbers,
    "output": st.sampled_from(["url", "inline", "mp4", "URL", "gif", ""]) | scalars,
    "stream": st.booleans() | scalars,
}
# Bodies shaped like requests: known fields with plausible and hostile values, sometimes more keys.
bodies = st.builds(
    lambda known, extra: {**known, **extra},
    st.fixed_dictionaries({}, optional=FIELD_VALUES),
    st.dictionaries(any_text, json_values, max_size=2) | st.just({}),
)
anything = bodies | json_values | st.binary(max_size=300) | any_text


def outcome(body, spec, storage: bool, limits: RequestLimits = LIMITS):
    """The request, or the 4xx error. Any other exception fails the test: it would be a 500."""
    try:
        return parse_request(body, spec, spec.defaults, limits, storage)
    except (InvalidRequest, PayloadTooLarge) as error:
        return error


def check_error(error, body) -> None:
    assert error.http_status in (400, 413)
    assert isinstance(error.message, str) and error.message.strip()
    assert len(error.message) <= MAX_MESSAGE_CHARS, error.message[:200]
    if error.field is not None:
        keys = list(body) if isinstance(body, dict) else []
        assert error.field in FIELDS or error.field in keys, error.field
    json.dumps(error.to_body())  # what TorchServe does with the answer


def check_request(request: GenerationRequest, spec, storage: bool, limits: RequestLimits = LIMITS) -> None:
    multiple = spec.size_multiple
    assert request.width % multiple == 0 and request.height % multiple == 0
    assert multiple <= request.width <= limits.max_side_px and multiple <= request.height <= limits.max_side_px
    assert request.width * request.height <= limits.max_pixels
    assert 1 <= request.num_frames <= limits.max_num_frames and (request.num_frames - 1) % 4 == 0
    assert 1 <= request.fps <= limits.max_fps
    assert 1 <= request.num_inference_steps <= limits.max_inference_steps
    for guidance in (request.guidance_scale, request.guidance_scale_2):
        assert guidance is None or (math.isfinite(guidance) and 0 <= guidance <= limits.max_guidance_scale)
    assert (request.guidance_scale_2 is not None) == spec.two_experts
    assert 0 <= request.seed <= MAX_SEED
    assert isinstance(request.output, OutputKind) and (storage or request.output is not OutputKind.URL)
    assert isinstance(request.stream, bool) and not (request.stream and request.output is OutputKind.MP4)
    assert isinstance(request.prompt, str) and request.prompt.strip() and "\x00" not in request.prompt
    assert len(request.prompt) <= limits.max_prompt_chars
    if spec.image_input.value == "required":
        assert request.image is not None
    if request.image is not None:
        assert request.image.mode == "RGB" and min(request.image.size) >= MIN_IMAGE_SIDE_PX
    # Whatever was accepted can be written to the JSON sidecar next to the video in S3.
    json.dumps(request.parameters(), ensure_ascii=False).encode("utf-8")


# -- properties ----------------------------------------------------------------------------------------


@FUZZ
@given(body=anything, spec=st.sampled_from(SPECS), storage=st.booleans())
@example(body={"prompt": "\ud800"}, spec=TI2V_5B, storage=True)
@example(body={"prompt": "x", "zz" * 400: 1}, spec=TI2V_5B, storage=False)
@example(body={"prompt": "x", "seed": 10**4000}, spec=TI2V_5B, storage=False)
def test_any_body_gives_a_request_within_the_limits_or_a_4xx(body, spec, storage):
    result = outcome(body, spec, storage)
    if isinstance(result, GenerationRequest):
        check_request(result, spec, storage)
    else:
        check_error(result, body)


# KServe bodies (handler/envelopes.py): well-formed and broken v1 and v2 wrappings of any body.
v2_inputs = st.fixed_dictionaries({}, optional={
    "name": any_text | json_values, "datatype": st.sampled_from(["BYTES", "FP32"]) | json_values,
    "shape": st.sampled_from([[1], [2]]) | json_values,
    "data": st.lists(bodies.map(json.dumps) | bodies | json_values, max_size=2) | json_values,
})
envelopes = (st.fixed_dictionaries({"instances": st.lists(anything, max_size=2) | json_values},
                                   optional={"signature_name": any_text})
             | st.fixed_dictionaries({"inputs": st.lists(v2_inputs | json_values, max_size=2) | json_values},
                                     optional={"id": any_text | json_values, "parameters": json_values}))


@FUZZ
@given(body=envelopes | anything, spec=st.sampled_from(SPECS), storage=st.booleans())
def test_any_kserve_body_gives_a_request_within_the_limits_or_a_4xx(body, spec, storage):
    """What the handler does with a body before the service (unwrap), then the parser."""
    envelope, inner = unwrap(body, LIMITS)
    if isinstance(inner, WanError):  # check_error: a 400 or 413, nothing else
        check_error(inner, body)
        return
    keys = list(body) if isinstance(body, dict) else []
    result = outcome(inner, spec, storage)
    if isinstance(result, GenerationRequest):
        check_request(result, spec, storage)
        answer = envelope.wrap({"seed": result.seed}, "wan", "1.0", "req")
        assert json.loads(json.dumps(answer)) == answer  # the answer is plain JSON
    else:
        check_error(result, inner if isinstance(inner, dict) else keys)


@FUZZ
@given(body=bodies, spec=st.sampled_from(SPECS), storage=st.booleans())
def test_json_text_and_the_decoded_object_get_the_same_answer(body, spec, storage):
    # TorchServe hands the handler a decoded object for application/json and bytes otherwise.
    text = json.dumps(body)
    results = [outcome(body, spec, storage), outcome(text.encode(), spec, storage), outcome(text, spec, storage)]
    if all(isinstance(r, GenerationRequest) for r in results):
        # The seed is random when the body gives none; everything else must be equal.
        assert len({dataclasses.replace(r, seed=0, image=None) for r in results}) == 1
    else:
        assert all(not isinstance(r, GenerationRequest) for r in results), results
        assert len({(type(r), r.field, r.message) for r in results}) == 1, [r.message for r in results]


def _valid_body(draw, spec) -> dict:
    multiple = spec.size_multiple
    width = draw(st.integers(1, LIMITS.max_side_px // multiple)) * multiple
    height = draw(st.integers(1, min(LIMITS.max_side_px, LIMITS.max_pixels // width) // multiple)) * multiple
    body = {
        "prompt": draw(st.text(min_size=1, max_size=LIMITS.max_prompt_chars).filter(
            lambda s: s.strip() and "\x00" not in s)),
        "width": width,
        "height": height,
        "num_frames": 4 * draw(st.integers(0, (LIMITS.max_num_frames - 1) // 4)) + 1,
        "fps": draw(st.integers(1, LIMITS.max_fps)),
        "num_inference_steps": draw(st.integers(1, LIMITS.max_inference_steps)),
        "guidance_scale": draw(st.floats(1.5, LIMITS.max_guidance_scale) | st.integers(2, 20)),
        "seed": draw(st.integers(0, MAX_SEED)),
        "output": draw(st.sampled_from(["inline", "mp4"])),
    }
    if body["output"] != "mp4":
        body["stream"] = draw(st.booleans())
    if spec.two_experts:
        body["guidance_scale_2"] = draw(st.floats(0, LIMITS.max_guidance_scale))
    if spec.image_input.value != "rejected" and (spec.image_input.value == "required" or draw(st.booleans())):
        body["image"] = IMAGE
    return body


@st.composite
def valid_requests(draw):
    spec = draw(st.sampled_from(SPECS))
    return spec, _valid_body(draw, spec)


@FUZZ
@given(valid_requests())
def test_valid_requests_are_kept_exactly(case):
    spec, body = case
    request = outcome(body, spec, storage=False)
    assert isinstance(request, GenerationRequest), request.message
    for name, value in body.items():
        if name == "image":
            assert request.image.size == _GRADIENT.size
        elif name == "output":
            assert request.output.value == value
        else:
            assert getattr(request, name) == value, name  # nothing rounded, nothing clamped


def _invalid_values(name: str, spec):
    """Values that break exactly one rule of field ``name`` (never null: null means absent)."""
    not_int = st.floats() | any_text | st.booleans() | st.lists(st.integers(), max_size=2)
    if name in ("width", "height"):
        return (not_int | st.integers(max_value=spec.size_multiple - 1) | st.integers(min_value=LIMITS.max_side_px + 1)
                | st.integers(spec.size_multiple, LIMITS.max_side_px).filter(lambda v: v % spec.size_multiple))
    if name == "num_frames":
        return (not_int | st.integers(max_value=0) | st.integers(min_value=LIMITS.max_num_frames + 1)
                | st.integers(1, LIMITS.max_num_frames).filter(lambda v: (v - 1) % 4))
    if name in ("fps", "num_inference_steps"):
        high = LIMITS.max_fps if name == "fps" else LIMITS.max_inference_steps
        return not_int | st.integers(max_value=0) | st.integers(min_value=high + 1)
    if name == "seed":
        return not_int | st.integers(max_value=-1) | st.integers(min_value=MAX_SEED + 1)
    if name == "guidance_scale":
        return (any_text | st.booleans() | st.just([1.0]) | st.sampled_from([math.nan, math.inf, -math.inf])
                | st.floats(max_value=-0.001) | st.floats(min_value=20.001) | st.integers(min_value=21))
    if name in ("prompt", "negative_prompt"):
        return (st.integers() | st.booleans() | st.lists(any_text, max_size=2)
                | st.text(min_size=LIMITS.max_prompt_chars + 1, max_size=LIMITS.max_prompt_chars + 20)
                | st.builds(lambda a, b: a + "\x00" + b, any_text, any_text)
                | st.builds(lambda a, s: a + s, any_text, st.sampled_from(["\ud800", "\udfff", "\udbff\ud800"]))
                | (st.sampled_from(["", " ", "\n\t"]) if name == "prompt" else st.nothing()))
    if name == "output":
        return st.sampled_from(["URL", "gif", "", "url"]) | st.integers() | st.lists(st.just("mp4"), max_size=1)
    if name == "stream":
        return st.integers() | any_text | st.just([True])
    if name == "image":
        return (st.integers() | st.booleans() | any_text.map(lambda s: "x" + s)
                | st.binary(min_size=1, max_size=64).map(lambda b: base64.b64encode(b"\x00" + b).decode()))
    raise AssertionError(name)


@st.composite
def one_bad_field(draw):
    spec = draw(st.sampled_from(SPECS))
    body = _valid_body(draw, spec)
    name = draw(st.sampled_from(["prompt", "negative_prompt", "image", "width", "height", "num_frames", "fps",
                                 "num_inference_steps", "guidance_scale", "seed", "output", "stream"]))
    if name == "image" and spec.image_input.value == "rejected":
        body["image"] = IMAGE  # a t2v model refuses any image
    else:
        body[name] = draw(_invalid_values(name, spec))
    return spec, body, name


@FUZZ
@given(one_bad_field())
def test_one_bad_field_is_refused_naming_that_field(case):
    spec, body, name = case
    error = outcome(body, spec, storage=False)
    assert not isinstance(error, GenerationRequest), (name, body[name])
    check_error(error, body)
    assert error.field == name, (error.field, error.message)


def _mutated(draw) -> bytes:
    raw = bytearray(draw(st.sampled_from(REAL_IMAGES)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["cut", "flip", "insert"]))
        position = draw(st.integers(0, max(0, len(raw) - 1)))
        if op == "cut":
            del raw[position:]
        elif op == "flip" and raw:
            raw[position] = draw(st.integers(0, 255))
        else:
            raw[position:position] = draw(st.binary(min_size=1, max_size=16))
    return bytes(raw)


@st.composite
def image_values(draw):
    kind = draw(st.sampled_from(["text", "base64", "mutated", "data-url"]))
    if kind == "text":
        return draw(any_text | st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=",
                                       max_size=200))
    raw = draw(st.binary(max_size=300)) if kind == "base64" else _mutated(draw)
    encoded = base64.b64encode(raw).decode()
    if kind == "data-url":
        mime = draw(st.sampled_from(["image/png", "image/jpeg", "image/webp", "image/gif", "text/plain", ""]))
        return f"data:{mime};base64,{encoded}"
    return encoded


@FUZZ
@given(image_values())
def test_any_image_value_is_decoded_within_limits_or_refused(value):
    try:
        image = decode_image(value, max_bytes=LIMITS.max_image_bytes, max_pixels=LIMITS.max_image_pixels)
    except (InvalidRequest, PayloadTooLarge) as error:
        assert error.field == "image" and error.message and len(error.message) <= MAX_MESSAGE_CHARS
        return
    assert image.mode == "RGB"
    assert min(image.size) >= MIN_IMAGE_SIDE_PX and image.width * image.height <= LIMITS.max_image_pixels


@FUZZ
@given(prompt=any_text | st.text(min_size=200, max_size=4000))
def test_the_service_parser_with_the_real_tokenizer_never_fails_on_text(services, prompt):
    # WanService.parse adds the tokenizer's 512-token check to parse_request.
    service = services["ti2v-5b"]
    try:
        request = service.parse({"prompt": prompt, "negative_prompt": prompt[::-1]})
    except (InvalidRequest, PayloadTooLarge) as error:
        assert error.field in ("prompt", "negative_prompt") and len(error.message) <= MAX_MESSAGE_CHARS
        return
    json.dumps(request.parameters(), ensure_ascii=False).encode("utf-8")


# -- regressions found by the fuzz campaign (tests/harness/campaign.py) -------------------------------------------


def _nested(depth: int) -> list:
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


@pytest.mark.parametrize("depth", [1, 50, 990, 1000, 5000])
@pytest.mark.parametrize("name", ["width", "num_frames", "seed", "guidance_scale", "output", "stream", "prompt",
                                  "image"])
def test_deeply_nested_values_are_a_400_naming_the_field(name, depth):
    # Was a 500: the error message rendered the value with json.dumps, which recursed past
    # Python's limit for values TorchServe had already decoded (988 levels deep on the server).
    body = {"prompt": "x", name: _nested(depth)}
    if name == "width":
        body["height"] = 128
    error = outcome(body, TI2V_5B, storage=False, limits=RequestLimits())
    assert isinstance(error, InvalidRequest) and error.field == name
    assert len(error.message) <= MAX_MESSAGE_CHARS


@pytest.mark.parametrize("name", ["prompt", "negative_prompt"])
@pytest.mark.parametrize("text", ["\ud800", "a fox \udfff", "\udfff\ud800"])
def test_lone_surrogates_are_a_400(name, text):
    # Was a 500 after the whole generation with S3 configured: JSON may carry "\ud800", and the
    # result's sidecar could not be written as UTF-8.
    body = {"prompt": "x", name: text}
    for form in (body, json.dumps(body).encode()):
        error = outcome(form, TI2V_5B, storage=True, limits=RequestLimits())
        assert isinstance(error, InvalidRequest) and error.field == name
        assert "unicode" in error.message.lower()
    # A proper pair written as JSON escapes is one valid character.
    assert outcome(json.dumps({"prompt": "\U0001f98a"}).encode(), TI2V_5B, True, RequestLimits()).prompt == "\U0001f98a"


def test_error_messages_quote_the_client_value_briefly():
    limits = RequestLimits()
    cases = [
        ({"prompt": "x", "seed": 10**4000}, "seed"),
        ({"prompt": "x", "width": "9" * 10_000, "height": 64}, "width"),
        ({"prompt": "x", "output": "y" * 10_000}, "output"),
        ({"prompt": "x", **{f"unknown_{i}": i for i in range(10_000)}}, "unknown_0"),
        ({"prompt": "x", "u" * 100_000: 1}, "u" * 100_000),
    ]
    for body, field in cases:
        error = outcome(body, TI2V_5B, storage=False, limits=limits)
        assert isinstance(error, InvalidRequest) and error.field == field
        assert len(error.message) <= MAX_MESSAGE_CHARS, (field[:20], len(error.message))
