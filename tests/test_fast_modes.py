"""Fast modes on the tiny models (issue 14): LoRA adapters (fused, per request, hot-swapped, both
experts), speed profiles, the step cache and the FP8 refusal on CPU. Frames are compared
exactly where the math is the same; the weights are random, so nothing here says anything
about quality."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.torch import load_file

from handler.config import load_handler_config
from handler.errors import ConfigError, ModelLoadError
from handler.service import WanService
from model_store.tiny_model import lora_files
from tests.harness.payloads import SMALL

PROMPT = {"prompt": "a cat surfing", "seed": 5, "width": 64, "height": 64, "num_frames": 5}


def _handler_section(layout: str, **extra) -> dict:
    adapters = {name: dict(files) for name, files in lora_files(layout).items()}
    adapters["tiny-lora-b"]["max_scale"] = 1.5
    return {"defaults": dict(SMALL), "lora": {"adapters": adapters, **extra.pop("lora", {})}, **extra}


def _service(path, layout: str, **extra) -> WanService:
    return WanService.from_model_config({"maxWorkers": 1, "handler": {"model_path": str(path),
                                                                      **_handler_section(layout, **extra)}},
                                        path.parent)


@pytest.fixture(scope="module")
def ti2v(tiny_checkpoints):
    return _service(tiny_checkpoints["ti2v-5b"], "ti2v-5b", step_cache={"threshold": 1000.0}, profiles={
        "lightning": {"lora": [{"name": "tiny-lora", "scale": 1.0}], "scheduler": "euler",
                      "defaults": {"num_inference_steps": 4, "guidance_scale": 1.0, "flow_shift": 5.0},
                      "locked": ["guidance_scale"]},
        "cached": {"lossy": ["step_cache"]},
    })


@pytest.fixture(scope="module")
def t2v(tiny_checkpoints):
    return _service(tiny_checkpoints["t2v-a14b"], "t2v-a14b")


def frames(service: WanService, body: dict) -> np.ndarray:
    return service.pipeline.generate(service.parse(dict(PROMPT, **body))).frames


def answer(service: WanService, body: dict) -> dict:
    reply = service.handle(dict(PROMPT, **body), "r")
    assert reply.status == 200, reply.body
    return reply.body


def refused(service: WanService, body: dict, field: str, words: str = "") -> dict:
    reply = service.handle(dict(PROMPT, **body), "r")
    assert reply.status == 400, reply.body
    assert reply.body["error"]["field"] == field, reply.body
    assert words in str(reply.body), reply.body
    return reply.body


# -- LoRA per request ------------------------------------------------------------------------

def test_an_adapter_changes_the_frames_and_leaving_it_out_returns_exactly_to_the_base(ti2v):
    base = frames(ti2v, {})
    with_lora = frames(ti2v, {"lora": [{"name": "tiny-lora", "scale": 1.0}]})
    assert not np.array_equal(base, with_lora)
    half = frames(ti2v, {"lora": [{"name": "tiny-lora", "scale": 0.5}]})
    assert not np.array_equal(half, with_lora)
    both = frames(ti2v, {"lora": [{"name": "tiny-lora"}, {"name": "tiny-lora-b", "scale": 0.7}]})
    assert not np.array_equal(both, with_lora)
    assert np.array_equal(frames(ti2v, {}), base)
    assert np.array_equal(frames(ti2v, {"lora": [{"name": "tiny-lora", "scale": 1.0}]}), with_lora)


def test_the_response_and_the_record_echo_adapters_profile_and_lossy(ti2v):
    body = answer(ti2v, {"lora": [{"name": "tiny-lora-b", "scale": 0.7}]})
    assert body["lora"] == [{"name": "tiny-lora-b", "scale": 0.7}]
    assert body["lossy"] == [] and "profile" not in body
    plain = answer(ti2v, {})
    assert plain["lossy"] == [] and "lora" not in plain
    # The storage record holds the same echo (handler.service._fast_echo) next to the parameters.
    request = ti2v.parse(dict(PROMPT, lora=[{"name": "tiny-lora", "scale": 1.5}], profile="cached"))
    assert ti2v._fast_echo(request) == {"lossy": ["step_cache"], "profile": "cached",
                                        "lora": [{"name": "tiny-lora", "scale": 1.5}]}
    assert request.parameters()["lora"] == [{"name": "tiny-lora", "scale": 1.5}]


@pytest.mark.parametrize("lora,words", [
    ([{"name": "nope"}], "allow-list"),
    ([{"name": "tiny-lora", "scale": 0}], "above 0"),
    ([{"name": "tiny-lora", "scale": 2.5}], "at most 2"),
    ([{"name": "tiny-lora-b", "scale": 1.6}], "at most 1.5"),
    ([{"name": "tiny-lora", "scale": "1"}], "scale"),
    ([{"name": "tiny-lora"}, {"name": "tiny-lora"}], "twice"),
    ([{"name": "tiny-lora"}, {"name": "tiny-lora-b"}, {"name": "tiny-lora"}], "at most 2 adapters"),
    ("tiny-lora", "list"),
    ([{"name": "tiny-lora", "weight": 1}], "object"),
])
def test_bad_adapters_are_a_400_naming_lora_and_the_worker_goes_on(ti2v, lora, words):
    refused(ti2v, {"lora": lora}, "lora", words)


def test_after_refusals_the_worker_still_answers(ti2v):
    refused(ti2v, {"lora": [{"name": "nope"}]}, "lora")
    assert answer(ti2v, {"lora": [{"name": "tiny-lora"}]})["lossy"] == []


def test_lora_on_a_model_without_an_allow_list_is_a_400(services):
    refused(services["ti2v-5b"], {"lora": [{"name": "tiny-lora"}]}, "lora", "no LoRA allow-list")


def test_both_experts_receive_their_own_adapter(t2v, tiny_checkpoints):
    pipe = t2v.pipeline.text_pipe
    files = lora_files("t2v-a14b")["tiny-lora"]
    root = tiny_checkpoints["t2v-a14b"]
    for expert, key in (("transformer", "path"), ("transformer_2", "path_2")):
        model = getattr(pipe, expert)
        assert set(model.peft_config) == {"tiny-lora", "tiny-lora-b"}
        expected = load_file(root / files[key])["transformer.blocks.0.attn1.to_q.lora_A.weight"]
        loaded = model.blocks[0].attn1.to_q.lora_A["tiny-lora"].weight
        assert np.array_equal(loaded.detach().numpy(), expected.numpy())
    base = frames(t2v, {})
    assert not np.array_equal(frames(t2v, {"lora": [{"name": "tiny-lora"}]}), base)
    assert np.array_equal(frames(t2v, {}), base)


# -- fused at load, hot swap ----------------------------------------------------------------

def test_an_adapter_fused_at_load_changes_every_request(tiny_checkpoints, ti2v):
    fused = _service(tiny_checkpoints["ti2v-5b"], "ti2v-5b", lora={"fuse": [{"name": "tiny-lora", "scale": 1.0}]})
    got = frames(fused, {})
    assert not np.array_equal(got, frames(ti2v, {}))
    # The same adapter applied per request: the same math up to rounding (fused into the weights).
    per_request = frames(ti2v, {"lora": [{"name": "tiny-lora"}]})
    assert np.abs(got.astype(int) - per_request.astype(int)).mean() < 2
    assert answer(fused, {})["lora_fused"] == [{"name": "tiny-lora", "scale": 1.0}]


@pytest.mark.parametrize("layout", ["ti2v-5b", "t2v-a14b"])
def test_a_hot_swap_gives_what_loading_the_adapter_fresh_gives(tiny_checkpoints, services, layout):
    path = tiny_checkpoints[layout]
    swapping = _service(path, layout, lora={"hotswap": True})
    first = frames(swapping, {"lora": [{"name": "tiny-lora-b", "scale": 0.5}]})
    after_swap = frames(swapping, {"lora": [{"name": "tiny-lora", "scale": 1.5}]})
    base_after = frames(swapping, {})
    fresh = _service(path, layout, lora={"hotswap": True})
    assert np.array_equal(frames(fresh, {"lora": [{"name": "tiny-lora", "scale": 1.5}]}), after_swap)
    assert not np.array_equal(first, after_swap)
    # Empty slots hold zeros: exactly the frames of a model without adapters.
    assert np.array_equal(base_after, frames(services[layout], {}))


# -- profiles ---------------------------------------------------------------------------------

def test_a_profile_sets_steps_guidance_scheduler_and_adapter_and_is_echoed(ti2v):
    request = ti2v.parse({"prompt": "x", "profile": "lightning"})
    assert (request.num_inference_steps, request.guidance_scale, request.scheduler, request.flow_shift) == (
        4, 1.0, "euler", 5.0)
    assert [c.name for c in request.lora] == ["tiny-lora"]
    seen = []
    original = ti2v.pipeline._denoise

    def spy(pipe, req, on_step):
        seen.append((pipe.scheduler.__class__.__name__, pipe.scheduler.config.get("shift")))
        return original(pipe, req, on_step)

    ti2v.pipeline._denoise = spy
    try:
        body = answer(ti2v, {"profile": "lightning", "num_inference_steps": 2})
        answer(ti2v, {})
    finally:
        del ti2v.pipeline._denoise
    assert seen[0] == ("FlowMatchEulerDiscreteScheduler", 5.0)
    assert seen[1][0] == "UniPCMultistepScheduler"
    assert body["profile"] == "lightning" and body["lora"] == [{"name": "tiny-lora", "scale": 1.0}]
    # The request's own field wins where the profile allows it.
    assert ti2v.parse({"prompt": "x", "profile": "lightning", "num_inference_steps": 2}).num_inference_steps == 2
    stacked = ti2v.parse({"prompt": "x", "profile": "lightning", "lora": [{"name": "tiny-lora-b", "scale": 0.5}]})
    assert [(c.name, c.scale) for c in stacked.lora] == [("tiny-lora", 1.0), ("tiny-lora-b", 0.5)]


@pytest.mark.parametrize("body,field,words", [
    ({"profile": "turbo"}, "profile", "lightning"),
    ({"profile": 3}, "profile", "string"),
    ({"profile": "lightning", "guidance_scale": 5.0}, "guidance_scale", "fixed by profile"),
    ({"profile": "lightning", "lora": [{"name": "tiny-lora"}]}, "lora", "twice"),
    ({"profile": "lightning", "lora": [{"name": "tiny-lora-b"}, {"name": "tiny-lora-b"}]}, "lora", "at most 2"),
])
def test_bad_profiles_are_a_400_naming_the_field(ti2v, body, field, words):
    refused(ti2v, body, field, words)


def test_a_model_without_profiles_refuses_one(services):
    refused(services["ti2v-5b"], {"profile": "lightning"}, "profile", "no profiles")


# -- the step cache ---------------------------------------------------------------------------

def test_the_step_cache_changes_frames_and_says_lossy_and_off_is_exactly_the_exact_path(ti2v, services):
    exact = frames(services["ti2v-5b"], {})
    cached = frames(ti2v, {"profile": "cached"})
    assert not np.array_equal(cached, exact)
    assert answer(ti2v, {"profile": "cached"})["lossy"] == ["step_cache"]
    # Off again: the cache hooks are gone and the frames are the exact path's.
    assert np.array_equal(frames(ti2v, {}), exact)
    assert answer(ti2v, {})["lossy"] == []


# -- FP8 -----------------------------------------------------------------------------------------

def test_fp8_is_refused_on_a_cpu_worker(tmp_path):
    with pytest.raises(ConfigError, match="handler.fp8"):
        load_handler_config({"handler": {"model_path": "/m", "fp8": True}}, tmp_path)
    import torch

    from handler.adapters import quantize_fp8

    with pytest.raises(ModelLoadError, match="handler.fp8"):
        quantize_fp8([torch.nn.Linear(2, 2)], torch.device("cpu"))


def test_the_shipped_tiny_config_names_tiny_lora_and_lightning():
    from handler.config import load_request_rules

    rules = load_request_rules(yaml.safe_load(Path("config/models/tiny-ti2v.yaml").read_text()))
    assert "tiny-lora" in rules.lora.adapters
    assert [c.name for c in rules.profiles["lightning"].lora] == ["tiny-lora"]


def test_the_mp4_still_decodes_with_an_adapter(ti2v):
    body = answer(ti2v, {"profile": "lightning"})
    assert base64.b64decode(body["video"]["base64"])[4:8] == b"ftyp"


def test_the_client_sends_profile_and_adapters():
    from scripts.client import lora_choice

    assert lora_choice("tiny-lora") == {"name": "tiny-lora"}
    assert lora_choice("tiny-lora-b:0.5") == {"name": "tiny-lora-b", "scale": 0.5}
    with pytest.raises(SystemExit, match="scale"):
        lora_choice("tiny-lora:big")


def test_an_adapter_for_the_high_noise_expert_only_leaves_the_other_alone(tiny_checkpoints, services):
    layout = "t2v-a14b"
    high_only = {"tiny-lora": {"path": lora_files(layout)["tiny-lora"]["path"]}}
    service = WanService.from_model_config({"maxWorkers": 1, "handler": {
        "model_path": str(tiny_checkpoints[layout]), "defaults": dict(SMALL), "lora": {"adapters": high_only}}},
        tiny_checkpoints[layout].parent)
    assert not getattr(service.pipeline.text_pipe.transformer_2, "peft_config", None)
    base = frames(services[layout], {})
    assert not np.array_equal(frames(service, {"lora": [{"name": "tiny-lora"}]}), base)
    assert np.array_equal(frames(service, {}), base)
