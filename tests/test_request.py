"""parse_request (handler/request.py): every rule of the public request contract."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from PIL import Image

from handler.config import RequestLimits
from handler.errors import InvalidRequest, PayloadTooLarge
from handler.request import FIELDS, MAX_SEED, GenerationRequest, OutputKind, parse_request
from handler.variants import I2V_A14B, OFFICIAL_NEGATIVE_PROMPT, T2V_A14B, TI2V_5B, VariantSpec
from tests.harness.payloads import png_base64

LIMITS = RequestLimits()
SPECS = [T2V_A14B, I2V_A14B, TI2V_5B]
SPEC_IDS = [spec.name for spec in SPECS]
TWO_EXPERTS = [T2V_A14B, I2V_A14B]


def png_b64(width: int = 64, height: int = 48, color=(10, 120, 200)) -> str:
    return png_base64(width, height, color)


IMAGE = png_b64()


def spec_id(value):
    return value.name if isinstance(value, VariantSpec) else None


def parse(body, spec: VariantSpec = T2V_A14B, storage: bool = False, limits: RequestLimits = LIMITS, defaults=None):
    return parse_request(body, spec, defaults or spec.defaults, limits, storage)


def valid_body(spec: VariantSpec = T2V_A14B, **fields) -> dict:
    """A minimal valid body for spec (an image where the variant requires one), plus fields."""
    body = {"prompt": "a red fox in the snow"}
    if spec is I2V_A14B:
        body["image"] = IMAGE
    body.update(fields)
    return body


def reject(body, spec: VariantSpec = T2V_A14B, field: str | None = None, words=(), exc_class=InvalidRequest,
           storage: bool = False, limits: RequestLimits = LIMITS):
    with pytest.raises(exc_class) as info:
        parse(body, spec, storage=storage, limits=limits)
    error = info.value
    assert type(error) is exc_class, f"{type(error).__name__}: {error}"
    assert error.http_status == (413 if exc_class is PayloadTooLarge else 400)
    assert error.field == field, error.message
    for word in [words] if isinstance(words, str) else words:
        assert word.lower() in error.message.lower(), error.message
    assert error.to_body()["error"]["field"] == field
    return error


# --- valid requests ------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_bare_request_gets_the_variant_defaults(spec):
    request = parse(valid_body(spec, seed=7), spec)
    d = spec.defaults
    assert isinstance(request, GenerationRequest)
    assert request.prompt == "a red fox in the snow"
    assert request.negative_prompt == d.negative_prompt == OFFICIAL_NEGATIVE_PROMPT
    if spec is I2V_A14B:
        # A 64x48 image: the 1280x720 area with a 4:3 aspect (tested in detail below).
        assert request.image is not None and request.image.mode == "RGB"
    else:
        assert request.image is None
        assert (request.width, request.height) == (d.width, d.height)
    assert request.num_frames == d.num_frames
    assert request.fps == d.fps
    assert request.num_inference_steps == d.num_inference_steps
    assert request.guidance_scale == d.guidance_scale
    assert request.guidance_scale_2 == d.guidance_scale_2
    assert request.seed == 7
    assert request.output is OutputKind.INLINE
    assert request.stream is False


@pytest.mark.parametrize(
    "spec, guidance, guidance_2",
    [(T2V_A14B, 4.0, 3.0), (I2V_A14B, 3.5, 3.5), (TI2V_5B, 5.0, None)],
    ids=SPEC_IDS,
)
def test_default_guidance_per_variant(spec, guidance, guidance_2):
    request = parse(valid_body(spec), spec)
    assert request.guidance_scale == guidance
    assert request.guidance_scale_2 == guidance_2


def test_full_request_is_kept_as_given():
    body = {
        "prompt": "a lighthouse at dusk",
        "negative_prompt": "blurry",
        "width": 832,
        "height": 480,
        "num_frames": 49,
        "fps": 24,
        "num_inference_steps": 30,
        "guidance_scale": 6,
        "guidance_scale_2": 2.5,
        "seed": 123456789,
        "output": "mp4",
        "stream": False,
    }
    request = parse(body, T2V_A14B)
    assert (request.prompt, request.negative_prompt) == ("a lighthouse at dusk", "blurry")
    assert (request.width, request.height, request.num_frames, request.fps) == (832, 480, 49, 24)
    assert request.num_inference_steps == 30
    assert request.guidance_scale == 6.0 and type(request.guidance_scale) is float
    assert request.guidance_scale_2 == 2.5
    assert request.seed == 123456789
    assert request.output is OutputKind.MP4
    assert request.stream is False
    assert request.image is None
    assert request.duration_s == pytest.approx(49 / 24)
    assert request.parameters() == {
        "prompt": "a lighthouse at dusk",
        "negative_prompt": "blurry",
        "has_image": False,
        "width": 832,
        "height": 480,
        "num_frames": 49,
        "fps": 24,
        "num_inference_steps": 30,
        "guidance_scale": 6.0,
        "guidance_scale_2": 2.5,
        "seed": 123456789,
        "output": "mp4",
    }
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.width = 64  # type: ignore[misc]


def test_request_defaults_come_from_the_defaults_argument():
    small = dataclasses.replace(TI2V_5B.defaults, width=256, height=256, num_frames=33, num_inference_steps=4,
                                negative_prompt="ugly")
    request = parse({"prompt": "x"}, TI2V_5B, defaults=small)
    assert (request.width, request.height, request.num_frames, request.num_inference_steps) == (256, 256, 33, 4)
    assert request.negative_prompt == "ugly"
    assert request.fps == 24


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_same_request_as_dict_bytes_bytearray_and_str(spec):
    body = valid_body(spec, seed=5, width=512, height=512, num_frames=17)
    text = json.dumps(body)
    expected = parse(body, spec).parameters()
    for form in (text, text.encode(), bytearray(text.encode()), ("\n  " + text + "\n").encode()):
        assert parse(form, spec).parameters() == expected


def test_unicode_prompt_through_bytes():
    request = parse(json.dumps({"prompt": "一只猫 🐱", "seed": 1}, ensure_ascii=False).encode("utf-8"))
    assert request.prompt == "一只猫 🐱"


def test_empty_negative_prompt_is_allowed():
    assert parse({"prompt": "x", "negative_prompt": ""}).negative_prompt == ""


@pytest.mark.parametrize(
    "fields",
    [
        {"prompt": "p" * LIMITS.max_prompt_chars},
        {"negative_prompt": "n" * LIMITS.max_prompt_chars},
        {"width": 1280, "height": 720},
        {"width": 720, "height": 1280},
        {"width": 16, "height": 16},
        {"width": 1264, "height": 720},
        {"num_frames": 1},
        {"num_frames": 5},
        {"num_frames": LIMITS.max_num_frames},
        {"fps": 1},
        {"fps": LIMITS.max_fps},
        {"num_inference_steps": 1},
        {"num_inference_steps": LIMITS.max_inference_steps},
        {"guidance_scale": LIMITS.max_guidance_scale, "guidance_scale_2": 0},
        {"guidance_scale": 1.5, "guidance_scale_2": LIMITS.max_guidance_scale},
        {"guidance_scale": 1.0, "guidance_scale_2": 1.0},
        {"guidance_scale": 0, "guidance_scale_2": 0.5},
        {"guidance_scale": 2, "guidance_scale_2": 0.5},
        {"seed": 0},
        {"seed": MAX_SEED},
    ],
    ids=lambda fields: "-".join(f"{k}={str(v)[:12]}" for k, v in fields.items()),
)
def test_boundaries_are_accepted(fields):
    request = parse(valid_body(T2V_A14B, **fields))
    for name, value in fields.items():
        assert getattr(request, name) == value


@pytest.mark.parametrize("value", [0, 0.0, 0.5, 1, 5.25, LIMITS.max_guidance_scale])
def test_guidance_scale_bounds_on_one_expert_variant(value):
    request = parse({"prompt": "x", "guidance_scale": value}, TI2V_5B)
    assert request.guidance_scale == value and type(request.guidance_scale) is float
    assert request.guidance_scale_2 is None


@pytest.mark.parametrize("spec", TWO_EXPERTS, ids=[s.name for s in TWO_EXPERTS])
def test_guidance_scale_2_is_accepted_on_two_expert_variants(spec):
    request = parse(valid_body(spec, guidance_scale=4.5, guidance_scale_2=2), spec)
    assert request.guidance_scale == 4.5
    assert request.guidance_scale_2 == 2.0 and type(request.guidance_scale_2) is float


@pytest.mark.parametrize("spec", TWO_EXPERTS, ids=[s.name for s in TWO_EXPERTS])
def test_guidance_off_without_guidance_scale_2_is_accepted(spec):
    # The client turns classifier-free guidance off and says nothing about guidance_scale_2:
    # nothing in its request contradicts itself, so it must not be refused over a field it
    # did not send (today the variant's default guidance_scale_2 > 1 trips the rule).
    request = parse(valid_body(spec, guidance_scale=1.0), spec)
    assert request.guidance_scale == 1.0


# --- prompt ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "body, words",
    [
        pytest.param({}, ["prompt", "required"], id="missing"),
        pytest.param({"prompt": None}, ["prompt", "required"], id="null"),
        pytest.param({"negative_prompt": "x"}, "required", id="only-negative"),
        pytest.param({"prompt": ""}, "must not be empty", id="empty"),
        pytest.param({"prompt": "   "}, "must not be empty", id="spaces"),
        pytest.param({"prompt": " \n\t\r "}, "must not be empty", id="whitespace"),
        pytest.param({"prompt": 42}, "must be a string", id="int"),
        pytest.param({"prompt": 4.2}, "must be a string", id="float"),
        pytest.param({"prompt": True}, "must be a string", id="bool"),
        pytest.param({"prompt": ["a cat"]}, "must be a string", id="list"),
        pytest.param({"prompt": {"text": "a cat"}}, "must be a string", id="object"),
        pytest.param({"prompt": "p" * (LIMITS.max_prompt_chars + 1)},
                     [f"{LIMITS.max_prompt_chars + 1} characters", "limit"], id="too-long"),
        pytest.param({"prompt": "a cat\x00 on a mat"}, "NUL", id="nul"),
        pytest.param({"prompt": "\x00"}, "NUL", id="only-nul"),
    ],
)
def test_prompt_rules(body, words):
    reject(body, field="prompt", words=words)


def test_prompt_limit_counts_characters_not_bytes():
    # 4000 three-byte characters: 12000 UTF-8 bytes, still within the character limit.
    assert parse({"prompt": "猫" * LIMITS.max_prompt_chars}).prompt == "猫" * LIMITS.max_prompt_chars
    reject({"prompt": "猫" * (LIMITS.max_prompt_chars + 1)}, field="prompt", words="characters")


def test_prompt_limit_follows_the_limits():
    limits = dataclasses.replace(LIMITS, max_prompt_chars=10)
    assert parse({"prompt": "0123456789", "negative_prompt": "n"}, limits=limits).prompt == "0123456789"
    reject({"prompt": "0123456789a", "negative_prompt": "n"}, field="prompt", words="10 limit", limits=limits)
    reject({"prompt": "p", "negative_prompt": "0123456789a"}, field="negative_prompt", words="10 limit", limits=limits)


def test_prompt_limit_does_not_apply_to_the_server_default_negative_prompt():
    # The limit bounds what a client sends. A request that gives no negative_prompt must not be
    # refused because the server's own default (the official one is 137 characters) is longer.
    limits = dataclasses.replace(LIMITS, max_prompt_chars=100)
    assert len(OFFICIAL_NEGATIVE_PROMPT) > 100
    request = parse({"prompt": "a cat"}, limits=limits)
    assert request.negative_prompt == OFFICIAL_NEGATIVE_PROMPT


@pytest.mark.parametrize(
    "value, words",
    [
        (5, "must be a string"),
        (False, "must be a string"),
        (["blurry"], "must be a string"),
        ("n" * (LIMITS.max_prompt_chars + 1), "limit"),
        ("blurry\x00", "NUL"),
    ],
)
def test_negative_prompt_rules(value, words):
    reject({"prompt": "x", "negative_prompt": value}, field="negative_prompt", words=words)


# --- unknown fields and nulls --------------------------------------------------------------------

@pytest.mark.parametrize(
    "extra, first",
    [
        ({"promt": "x"}, "promt"),
        ({"Prompt": "x"}, "Prompt"),
        ({"num_frame": 81}, "num_frame"),
        ({"steps": 10}, "steps"),
        ({"zeta": 1, "alpha": 2, "mid": 3}, "alpha"),
        ({"callback_url": None}, "callback_url"),  # null does not excuse an unknown name
        ({"": 1}, ""),
    ],
)
def test_unknown_fields_are_rejected(extra, first):
    error = reject({"prompt": "x", **extra}, field=first, words="unknown field")
    for name in extra:
        assert name in error.message
    for name in FIELDS:
        assert name in error.message.split("accepted fields:")[1]


def test_accepted_fields_are_the_contract():
    assert set(FIELDS) == {
        "prompt", "negative_prompt", "image", "width", "height", "num_frames", "fps",
        "num_inference_steps", "guidance_scale", "guidance_scale_2", "seed", "output", "stream",
        "profile", "lora",  # DESIGN.md's fast modes (issue 14)
    }


OPTIONAL_FIELDS = [name for name in FIELDS if name != "prompt"]
NULL_CASES = [  # an i2v request without its image is refused: test_image_null_on_i2v_is_missing
    pytest.param(spec, name, id=f"{spec.name}-{name}")
    for spec in SPECS for name in OPTIONAL_FIELDS if not (spec is I2V_A14B and name == "image")
]


@pytest.mark.parametrize("spec, name", NULL_CASES)
def test_null_means_absent(spec, name):
    seed = {} if name == "seed" else {"seed": 11}
    with_null = parse(valid_body(spec, **seed, **{name: None}), spec)
    without = parse(valid_body(spec, **seed), spec)
    if name == "seed":
        assert 0 <= with_null.seed <= MAX_SEED
        with_null = dataclasses.replace(with_null, seed=without.seed)
    assert with_null.parameters() == without.parameters()
    assert with_null.stream == without.stream


def test_null_prompt_is_not_a_prompt():
    reject({"prompt": None, "seed": None}, field="prompt", words="required")


# --- integer fields -------------------------------------------------------------------------------

INT_FIELDS = ["width", "height", "num_frames", "fps", "num_inference_steps", "seed"]
BAD_INTS = [
    pytest.param("256", id="string"),
    pytest.param(256.0, id="float-whole"),
    pytest.param(256.5, id="float"),
    pytest.param(True, id="true"),
    pytest.param(False, id="false"),
    pytest.param([256], id="list"),
    pytest.param({"value": 256}, id="object"),
    pytest.param(float("nan"), id="nan"),
    pytest.param(float("inf"), id="inf"),
]


def _int_body(name: str, value) -> dict:
    if name == "width":
        return {"prompt": "x", "width": value, "height": 720}
    if name == "height":
        return {"prompt": "x", "width": 1280, "height": value}
    return {"prompt": "x", name: value}


@pytest.mark.parametrize("value", BAD_INTS)
@pytest.mark.parametrize("name", INT_FIELDS)
def test_int_fields_reject_other_types(name, value):
    reject(_int_body(name, value), field=name, words=[name, "must be an integer"])


@pytest.mark.parametrize("literal", ["256.0", "2.56e2", "true", "\"256\"", "[256]", "NaN", "1e400"])
@pytest.mark.parametrize("name", INT_FIELDS)
def test_int_fields_reject_other_types_in_json_text(name, literal):
    body = json.dumps(_int_body(name, 0)).replace(f'"{name}": 0', f'"{name}": {literal}')
    assert literal in body
    reject(body.encode(), field=name, words="must be an integer")


# --- width and height ---------------------------------------------------------------------------

@pytest.mark.parametrize(
    "spec, width, height, field, multiple",
    [
        (T2V_A14B, 1000, 720, "width", 16),
        (T2V_A14B, 1280, 700, "height", 16),
        (T2V_A14B, 833, 480, "width", 16),
        (T2V_A14B, 1272, 720, "width", 16),  # a multiple of 8, not of 16
        (I2V_A14B, 832, 481, "height", 16),
        (TI2V_5B, 1264, 704, "width", 32),  # a multiple of 16, not of 32
        (TI2V_5B, 1280, 720, "height", 32),
        (TI2V_5B, 848, 480, "width", 32),
        (TI2V_5B, 704, 1270, "height", 32),
    ],
    ids=spec_id,
)
def test_size_must_be_a_multiple_and_is_not_rounded(spec, width, height, field, multiple):
    error = reject(valid_body(spec, width=width, height=height), spec, field=field,
                   words=[f"multiple of {multiple}", "not rounded", spec.name])
    assert str(width if field == "width" else height) in error.message


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
@pytest.mark.parametrize("given, missing", [("width", "height"), ("height", "width")])
def test_width_and_height_come_together(spec, given, missing):
    error = reject(valid_body(spec, **{given: 512}), spec, field=missing, words="both width and height")
    assert f"missing {missing}" in error.message


def test_width_with_null_height_is_only_width():
    reject({"prompt": "x", "width": 512, "height": None}, field="height", words="both width and height")


@pytest.mark.parametrize(
    "spec, width, height, field, words",
    [
        (T2V_A14B, 0, 720, "width", "between 16 and 1280"),
        (T2V_A14B, -16, 720, "width", "between 16 and 1280"),
        (T2V_A14B, 1296, 480, "width", "between 16 and 1280"),
        (T2V_A14B, 480, 1296, "height", "between 16 and 1280"),
        (T2V_A14B, 480, 0, "height", "between 16 and 1280"),
        (T2V_A14B, 2**40, 480, "width", "between"),
        (TI2V_5B, 16, 704, "width", "between 32 and 1280"),
        (TI2V_5B, 1280, 1312, "height", "between 32 and 1280"),
    ],
    ids=spec_id,
)
def test_size_bounds(spec, width, height, field, words):
    reject(valid_body(spec, width=width, height=height), spec, field=field, words=words)


@pytest.mark.parametrize(
    "spec, width, height",
    [
        (T2V_A14B, 1280, 1280), (T2V_A14B, 1280, 736), (T2V_A14B, 1008, 1008),
        (TI2V_5B, 1280, 1024), (I2V_A14B, 1280, 768),
    ],
    ids=spec_id,
)
def test_pixel_area_over_the_limit_is_rejected(spec, width, height):
    assert width * height > LIMITS.max_pixels
    error = reject(valid_body(spec, width=width, height=height), spec, field="width", words="pixels")
    assert str(width * height) in error.message and str(LIMITS.max_pixels) in error.message


def test_size_limits_follow_the_limits():
    limits = dataclasses.replace(LIMITS, max_side_px=640, max_pixels=256 * 256)
    assert parse({"prompt": "x", "width": 256, "height": 256}, TI2V_5B, limits=limits).width == 256
    reject({"prompt": "x", "width": 672, "height": 32}, TI2V_5B, field="width", words="between 32 and 640",
           limits=limits)
    reject({"prompt": "x", "width": 288, "height": 256}, TI2V_5B, field="width", words="pixels", limits=limits)


# --- frames, fps, steps -----------------------------------------------------------------------

@pytest.mark.parametrize("value", [80, 2, 3, 4, 6, 82, 100, 120, 160])
def test_num_frames_must_be_4k_plus_1(value):
    reject({"prompt": "x", "num_frames": value}, field="num_frames", words=["4k+1", "not rounded", str(value)])


@pytest.mark.parametrize("value", [0, -1, -3, LIMITS.max_num_frames + 4, 10**6 + 1])
def test_num_frames_bounds(value):
    reject({"prompt": "x", "num_frames": value}, field="num_frames",
           words=f"between 1 and {LIMITS.max_num_frames}")


@pytest.mark.parametrize("value", [0, -1, LIMITS.max_fps + 1, 1000])
def test_fps_bounds(value):
    reject({"prompt": "x", "fps": value}, field="fps", words=f"between 1 and {LIMITS.max_fps}")


@pytest.mark.parametrize("value", [0, -5, LIMITS.max_inference_steps + 1, 10**9])
def test_steps_bounds(value):
    reject({"prompt": "x", "num_inference_steps": value}, field="num_inference_steps",
           words=f"between 1 and {LIMITS.max_inference_steps}")


# --- guidance -------------------------------------------------------------------------------------

GUIDANCE_FIELDS = [
    pytest.param(T2V_A14B, "guidance_scale", id="t2v-guidance_scale"),
    pytest.param(T2V_A14B, "guidance_scale_2", id="t2v-guidance_scale_2"),
    pytest.param(I2V_A14B, "guidance_scale_2", id="i2v-guidance_scale_2"),
    pytest.param(TI2V_5B, "guidance_scale", id="ti2v-guidance_scale"),
]


@pytest.mark.parametrize("value", ["5", True, False, [5.0], {"v": 5}])
@pytest.mark.parametrize("spec, name", GUIDANCE_FIELDS)
def test_guidance_rejects_other_types(spec, name, value):
    reject(valid_body(spec, **{name: value}), spec, field=name, words=[name, "must be a number"])


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("spec, name", GUIDANCE_FIELDS)
def test_guidance_must_be_finite(spec, name, value):
    reject(valid_body(spec, **{name: value}), spec, field=name, words="finite")


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400", "-1e400"])
@pytest.mark.parametrize("spec, name", GUIDANCE_FIELDS)
def test_guidance_must_be_finite_in_json_text(spec, name, literal):
    # Python's json accepts NaN and Infinity, and reads 1e400 as inf.
    text = json.dumps(valid_body(spec, **{name: 1.5})).replace('1.5', literal)
    reject(text.encode(), spec, field=name, words="finite")
    reject(text, spec, field=name, words="finite")


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(-0.5, id="negative"),
        pytest.param(-1, id="negative-int"),
        pytest.param(LIMITS.max_guidance_scale + 0.01, id="just-over"),
        pytest.param(1e308, id="huge-float"),
        pytest.param(10**30, id="huge-int"),
    ],
)
@pytest.mark.parametrize("spec, name", GUIDANCE_FIELDS)
def test_guidance_bounds(spec, name, value):
    reject(valid_body(spec, **{name: value}), spec, field=name, words=f"between 0 and {LIMITS.max_guidance_scale}")


@pytest.mark.parametrize("spec, name", GUIDANCE_FIELDS)
def test_guidance_integer_beyond_float_range(spec, name):
    # JSON integers have no size limit; one too large for a float is out of bounds (400),
    # not an OverflowError (500).
    reject(valid_body(spec, **{name: 10**400}), spec, field=name, words="between")


def test_huge_guidance_integer_in_json_text():
    text = '{"prompt": "x", "guidance_scale": 1' + "0" * 400 + "}"
    reject(text.encode(), TI2V_5B, field="guidance_scale", words="between")


def test_guidance_scale_2_is_rejected_on_ti2v():
    reject({"prompt": "x", "guidance_scale_2": 3.0}, TI2V_5B, field="guidance_scale_2",
           words=["two-expert", "ti2v-5b"])
    reject({"prompt": "x", "guidance_scale_2": 0}, TI2V_5B, field="guidance_scale_2", words="two-expert")
    # null is absent, so it passes
    assert parse({"prompt": "x", "guidance_scale_2": None}, TI2V_5B).guidance_scale_2 is None


@pytest.mark.parametrize("spec", TWO_EXPERTS, ids=[s.name for s in TWO_EXPERTS])
@pytest.mark.parametrize("guidance, guidance_2", [(1.0, 2.0), (0.5, 5.0), (0, 1.01), (1, 20)])
def test_guidance_2_needs_guidance_on(spec, guidance, guidance_2):
    reject(valid_body(spec, guidance_scale=guidance, guidance_scale_2=guidance_2), spec,
           field="guidance_scale_2", words="needs guidance_scale > 1")


# --- seed -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [-1, -(2**63), MAX_SEED + 1, 2**64, 10**30])
def test_seed_bounds(value):
    reject({"prompt": "x", "seed": value}, field="seed", words=f"between 0 and {MAX_SEED}")


@pytest.mark.parametrize("value", [0, 1, 42, 2**32, MAX_SEED])
def test_seed_given_is_kept(value):
    assert parse({"prompt": "x", "seed": value}).seed == value
    assert parse(json.dumps({"prompt": "x", "seed": value}).encode()).seed == value


def test_seed_absent_is_random_within_range():
    assert MAX_SEED == 2**63 - 1
    seeds = [parse({"prompt": "x"}).seed for _ in range(8)]
    assert all(type(seed) is int and 0 <= seed <= MAX_SEED for seed in seeds)
    assert len(set(seeds)) > 1
    assert parse({"prompt": "x"}).parameters()["seed"] >= 0


# --- output and stream -----------------------------------------------------------------------------

@pytest.mark.parametrize(
    "storage, given, expected",
    [
        (False, None, OutputKind.INLINE),
        (False, "inline", OutputKind.INLINE),
        (False, "mp4", OutputKind.MP4),
        (True, None, OutputKind.URL),
        (True, "url", OutputKind.URL),
        (True, "inline", OutputKind.INLINE),
        (True, "mp4", OutputKind.MP4),
    ],
)
def test_output_values(storage, given, expected):
    body = {"prompt": "x"} if given is None else {"prompt": "x", "output": given}
    request = parse(body, storage=storage)
    assert request.output is expected
    assert request.parameters()["output"] == expected.value


def test_output_url_needs_storage():
    reject({"prompt": "x", "output": "url"}, field="output", words=["url", "storage", "WAN_S3_BUCKET"])


@pytest.mark.parametrize("value", ["URL", "Inline", "mp4 ", "file", "", "base64", 1, True, ["url"], {"kind": "url"}])
@pytest.mark.parametrize("storage", [False, True])
def test_unknown_output_is_rejected(value, storage):
    reject({"prompt": "x", "output": value}, field="output", words=["one of", "url", "inline", "mp4"], storage=storage)


@pytest.mark.parametrize("value", ["true", "false", 1, 0, "yes", [], {}, 1.0])
def test_stream_must_be_bool(value):
    reject({"prompt": "x", "stream": value}, field="stream", words="true or false")


@pytest.mark.parametrize(
    "storage, output", [(False, None), (False, "inline"), (True, None), (True, "url"), (True, "inline")]
)
def test_stream_with_json_outputs(storage, output):
    body = {"prompt": "x", "stream": True}
    if output:
        body["output"] = output
    request = parse(body, storage=storage)
    assert request.stream is True
    assert request.output is not OutputKind.MP4


@pytest.mark.parametrize("storage", [False, True])
def test_stream_with_mp4_is_rejected(storage):
    reject({"prompt": "x", "stream": True, "output": "mp4"}, field="output", words=["stream", "inline"],
           storage=storage)
    assert parse({"prompt": "x", "stream": False, "output": "mp4"}, storage=storage).output is OutputKind.MP4


# --- image ----------------------------------------------------------------------------------------

def test_image_is_rejected_for_t2v():
    reject({"prompt": "x", "image": IMAGE}, T2V_A14B, field="image", words=["t2v-a14b", "takes no image"])
    reject({"prompt": "x", "image": "not even base64"}, T2V_A14B, field="image", words="takes no image")
    assert parse({"prompt": "x", "image": None}, T2V_A14B).image is None


def test_image_is_required_for_i2v():
    reject({"prompt": "x"}, I2V_A14B, field="image", words=["i2v-a14b", "image is required"])


def test_image_null_on_i2v_is_missing():
    reject({"prompt": "x", "image": None}, I2V_A14B, field="image", words="image is required")


def test_image_is_optional_for_ti2v():
    without = parse({"prompt": "x"}, TI2V_5B)
    assert without.image is None and without.parameters()["has_image"] is False
    with_image = parse({"prompt": "x", "image": png_b64(96, 64, (1, 2, 3))}, TI2V_5B)
    assert with_image.image.size == (96, 64) and with_image.image.mode == "RGB"
    assert with_image.image.getpixel((0, 0)) == (1, 2, 3)
    assert with_image.parameters()["has_image"] is True


@pytest.mark.parametrize("spec", [I2V_A14B, TI2V_5B], ids=["i2v-a14b", "ti2v-5b"])
@pytest.mark.parametrize(
    "value, exc_class, words",
    [
        ("https://example.com/cat.png", InvalidRequest, "never fetches"),
        ("data:text/plain;base64,aGk=", InvalidRequest, "text/plain"),
        ("%%%", InvalidRequest, "base64"),
        (12, InvalidRequest, "base64 string"),
    ],
)
def test_image_errors_come_through(spec, value, exc_class, words):
    reject({"prompt": "x", "image": value}, spec, field="image", words=words, exc_class=exc_class)


def test_image_limits_come_from_the_limits():
    tiny = dataclasses.replace(LIMITS, max_image_bytes=64)
    reject({"prompt": "x", "image": IMAGE}, I2V_A14B, field="image", words="limit", exc_class=PayloadTooLarge,
           limits=tiny)
    few_pixels = dataclasses.replace(LIMITS, max_image_pixels=63 * 48)
    reject({"prompt": "x", "image": IMAGE}, I2V_A14B, field="image", words="pixel limit", limits=few_pixels)


@pytest.mark.parametrize(
    "spec, image_size, expected",
    [
        (I2V_A14B, (1280, 720), (1280, 720)),
        (I2V_A14B, (720, 1280), (720, 1280)),
        (I2V_A14B, (640, 360), (1280, 720)),
        (I2V_A14B, (512, 512), (960, 960)),
        (I2V_A14B, (832, 480), (1264, 720)),
        (I2V_A14B, (480, 832), (720, 1264)),
        (TI2V_5B, (1280, 704), (1280, 704)),
        (TI2V_5B, (704, 1280), (704, 1280)),
        (TI2V_5B, (512, 512), (928, 928)),
    ],
    ids=spec_id,
)
def test_image_request_size_comes_from_the_image(spec, image_size, expected):
    request = parse({"prompt": "x", "image": png_b64(*image_size)}, spec)
    assert (request.width, request.height) == expected


@pytest.mark.parametrize("spec", [I2V_A14B, TI2V_5B], ids=["i2v-a14b", "ti2v-5b"])
@pytest.mark.parametrize("image_size", [(64, 48), (48, 64), (100, 100), (300, 100), (100, 300), (1000, 563), (17, 31)])
def test_image_request_size_keeps_aspect_and_area(spec, image_size):
    request = parse({"prompt": "x", "image": png_b64(*image_size)}, spec)
    m = spec.size_multiple
    area = spec.defaults.width * spec.defaults.height
    assert request.width % m == 0 and request.height % m == 0
    assert request.width * request.height <= area
    # Floored to the multiple: within one step of the ideal size on each side.
    ideal_height = math.sqrt(area * image_size[1] / image_size[0])
    ideal_width = math.sqrt(area * image_size[0] / image_size[1])
    # Very wide or tall images: the area shrinks until the long side fits the side limit.
    shrink = min(1.0, LIMITS.max_side_px / max(ideal_width, ideal_height))
    ideal_height, ideal_width = ideal_height * shrink, ideal_width * shrink
    assert max(request.width, request.height) <= LIMITS.max_side_px
    assert ideal_height - m <= request.height <= ideal_height + 0.5
    assert ideal_width - m <= request.width <= ideal_width + 0.5
    image_aspect = image_size[0] / image_size[1]
    assert abs(request.width / request.height - image_aspect) / image_aspect < 0.1


def test_image_request_size_uses_the_defaults_area():
    small = dataclasses.replace(TI2V_5B.defaults, width=256, height=256)
    request = parse({"prompt": "x", "image": png_b64(200, 100)}, TI2V_5B, defaults=small)
    # sqrt(65536 * 2) = 362.0 -> 352; sqrt(65536 / 2) = 181.0 -> 160
    assert (request.width, request.height) == (352, 160)


@pytest.mark.parametrize("spec", [I2V_A14B, TI2V_5B], ids=["i2v-a14b", "ti2v-5b"])
def test_explicit_size_wins_over_the_image(spec):
    request = parse({"prompt": "x", "image": png_b64(64, 48), "width": 480, "height": 832}, spec)
    assert (request.width, request.height) == (480, 832)


@pytest.mark.parametrize(
    "spec, image_size",
    [(I2V_A14B, (4096, 16)), (I2V_A14B, (16, 2000)), (TI2V_5B, (100, 1000)), (TI2V_5B, (1600, 40))],
    ids=["i2v-4096x16", "i2v-16x2000", "ti2v-100x1000", "ti2v-1600x40"],
)
def test_image_derived_size_respects_the_side_limit(spec, image_size):
    # A very wide or tall image must not buy a side the client could not ask for directly:
    # refused (400), or sized within max_side_px.
    try:
        request = parse({"prompt": "x", "image": png_b64(*image_size)}, spec)
    except InvalidRequest as error:
        assert error.http_status == 400 and error.field in {"image", "width", "height"}
    else:
        assert request.width <= LIMITS.max_side_px, (request.width, request.height)
        assert request.height <= LIMITS.max_side_px, (request.width, request.height)
        assert request.width * request.height <= LIMITS.max_pixels


# --- the body itself ------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "body, words",
    [
        pytest.param(None, ["missing", "Content-Type: application/json"], id="none"),
        pytest.param(b"", "empty", id="empty-bytes"),
        pytest.param(bytearray(), "empty", id="empty-bytearray"),
        pytest.param("", "empty", id="empty-str"),
        pytest.param("  \n\t", "empty", id="whitespace-str"),
        pytest.param(b"\r\n", "empty", id="whitespace-bytes"),
        pytest.param(b"prompt=a+cat", "not valid JSON", id="form-encoded"),
        pytest.param(b"{", "not valid JSON", id="unclosed"),
        pytest.param("{'prompt': 'x'}", "not valid JSON", id="single-quotes"),
        pytest.param('{"prompt": "x",}', "not valid JSON", id="trailing-comma"),
        pytest.param('{"prompt": "x"} {"prompt": "y"}', "not valid JSON", id="two-objects"),
        pytest.param(b'\xef\xbb\xbf{"prompt": "x"}', "not valid JSON", id="utf8-bom"),
        pytest.param(b'{"prompt": "\xff\xfe"}', "UTF-8", id="not-utf8"),
        pytest.param('{"prompt": "x"}'.encode("utf-16"), "UTF-8", id="utf16"),
        pytest.param("[]", ["JSON object", "list"], id="empty-array"),
        pytest.param(b'[{"prompt": "x"}]', ["JSON object", "list"], id="array-of-objects"),
        pytest.param('"a cat"', ["JSON object", "str"], id="json-string"),
        pytest.param("42", ["JSON object", "int"], id="json-number"),
        pytest.param("null", ["JSON object", "NoneType"], id="json-null"),
        pytest.param(b"true", ["JSON object", "bool"], id="json-bool"),
        pytest.param([{"prompt": "x"}], "JSON object", id="python-list"),
        pytest.param(42, "JSON object", id="python-int"),
    ],
)
def test_body_rules(body, words):
    reject(body, field=None, words=words)


def test_deeply_nested_json_is_an_invalid_request():
    # Valid JSON syntax, but deep enough to exhaust the parser's recursion: still a client
    # error (400), not an internal error.
    depth = 100_000
    body = b'{"prompt": "x", "seed": ' + b"[" * depth + b"]" * depth + b"}"
    assert len(body) < LIMITS.max_body_bytes
    with pytest.raises(InvalidRequest) as info:
        parse(body)
    assert info.value.http_status == 400


def test_oversized_body_is_payload_too_large():
    limits = dataclasses.replace(LIMITS, max_body_bytes=100)
    body = json.dumps({"prompt": "x" * 200}).encode()
    error = reject(body, field=None, words=["bytes", "100 byte limit"], exc_class=PayloadTooLarge, limits=limits)
    assert str(len(body)) in error.message
    reject(bytearray(body), field=None, words="limit", exc_class=PayloadTooLarge, limits=limits)
    # Checked before decoding: oversized garbage is 413, not 400.
    reject(b"\xff" * 101, field=None, words="limit", exc_class=PayloadTooLarge, limits=limits)


def test_body_at_the_byte_limit_is_accepted():
    body = json.dumps({"prompt": "x"}).encode()
    body = body[:-1] + b" " * (100 - len(body)) + b"}"
    assert len(body) == 100
    limits = dataclasses.replace(LIMITS, max_body_bytes=100)
    assert parse(body, limits=limits).prompt == "x"


def test_default_body_limit():
    body = b" " * (LIMITS.max_body_bytes + 1)
    reject(body, field=None, words="limit", exc_class=PayloadTooLarge)


@pytest.mark.parametrize("image_size", [(4000, 3000), (3000, 2000), (800, 1000), (1920, 1080), (1000, 1000)])
def test_the_size_picked_for_an_image_splits_over_sequence_ranks(image_size):

    from handler.request import _size_for_image
    from handler.variants import VARIANTS

    defaults = VARIANTS["i2v-a14b"].defaults
    image = Image.new("RGB", image_size)
    one = _size_for_image(image, defaults, 16, 1280)
    split = _size_for_image(image, defaults, 16, 1280, patches_divisor=2)
    assert (split[0] // 16) * (split[1] // 16) % 2 == 0
    # Floored by at most one step per side, never grown past the one-GPU size.
    assert one[0] - 16 <= split[0] <= one[0] and one[1] - 16 <= split[1] <= one[1]
    if (one[0] // 16) * (one[1] // 16) % 2 == 0:
        assert split == one
