"""load_handler_config (handler/config.py) and the repo's real model-config.yaml files."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import yaml

from handler.config import HandlerConfig, RequestLimits, VideoEncoding, load_handler_config
from handler.errors import ConfigError
from handler.request import parse_request
from handler.variants import I2V_A14B, T2V_A14B, TI2V_5B, VARIANTS, GenerationDefaults
from tests.harness.payloads import png_base64

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL_CONFIGS = sorted((REPO_ROOT / "config" / "models").glob("*.yaml"))
# Which variant each model-config.yaml serves (the tiny default model has the TI2V-5B layout).
CONFIG_VARIANTS = {"t2v-a14b": T2V_A14B, "i2v-a14b": I2V_A14B, "ti2v-5b": TI2V_5B, "tiny-ti2v": TI2V_5B,
                   "ti2v-5b-2gpu": TI2V_5B, "t2v-a14b-4gpu": T2V_A14B, "i2v-a14b-4gpu": I2V_A14B}
# One worker over several GPUs (torchrun ranks): config -> (its one-GPU config, ranks).
MULTI_GPU_CONFIGS = {"ti2v-5b-2gpu": ("ti2v-5b", 2), "t2v-a14b-4gpu": ("t2v-a14b", 4), "i2v-a14b-4gpu": ("i2v-a14b", 4)}
# Attention heads of the real transformers (diffusers configs of the Wan2.2 checkpoints): the
# sequence split gives each rank whole heads.
ATTENTION_HEADS = {"ti2v-5b": 24, "t2v-a14b": 40, "i2v-a14b": 40}


@pytest.fixture(autouse=True)
def _no_model_path_env(monkeypatch):
    # A WAN_MODEL_PATH in the developer's shell must not leak into these tests.
    monkeypatch.delenv("WAN_MODEL_PATH", raising=False)


def load(handler_section, model_dir) -> HandlerConfig:
    return load_handler_config({"minWorkers": 1, "handler": handler_section}, model_dir)


def config_error(model_yaml, model_dir, *words) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_handler_config(model_yaml, model_dir)
    error = info.value
    assert type(error) is ConfigError
    assert error.http_status == 500 and error.error_type == "config_error"
    for word in words:
        assert word in error.message, error.message
    return error


# --- model_path ---------------------------------------------------------------------------------

def test_minimal_config(tmp_path):
    weights = tmp_path / "weights"
    config = load({"model_path": str(weights)}, tmp_path / "model")
    assert config == HandlerConfig(model_path=weights.resolve())
    assert config.model_path == weights.resolve()
    assert dict(config.default_overrides) == {}
    assert config.limits == RequestLimits()
    assert config.video == VideoEncoding()
    assert config.cpu_threads is None


def test_relative_model_path_is_relative_to_the_model_dir(tmp_path):
    model_dir = tmp_path / "store" / "wan"
    model_dir.mkdir(parents=True)
    config = load({"model_path": "../../weights/tiny"}, model_dir)
    assert config.model_path == tmp_path.resolve() / "weights" / "tiny"
    config = load({"model_path": "weights"}, str(model_dir))
    assert config.model_path == model_dir.resolve() / "weights"


def test_relative_model_path_does_not_depend_on_the_working_directory(tmp_path, monkeypatch):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert load({"model_path": "w"}, model_dir).model_path == model_dir.resolve() / "w"


def test_relative_model_path_resolves_against_the_symlinks_target(tmp_path):
    # TorchServe hands a symlinked temp folder for no-archive models.
    real_model_dir = tmp_path / "repo" / "model_store" / "wan"
    real_model_dir.mkdir(parents=True)
    link = tmp_path / "ts-temp" / "models" / "abc123"
    link.parent.mkdir(parents=True)
    link.symlink_to(real_model_dir, target_is_directory=True)
    config = load({"model_path": "../../weights/tiny-ti2v-5b"}, link)
    assert config.model_path == (tmp_path / "repo" / "weights" / "tiny-ti2v-5b").resolve()
    assert not str(config.model_path).startswith(str(tmp_path / "ts-temp"))
    # Not where the link's own folder would put it.
    assert config.model_path != (tmp_path / "weights" / "tiny-ti2v-5b").resolve()


def test_absolute_model_path_is_kept(tmp_path):
    weights = tmp_path / "abs" / "weights"
    assert load({"model_path": str(weights)}, tmp_path / "model").model_path == weights.resolve()
    assert load({"model_path": str(weights) + "/"}, "/nonexistent/model").model_path == weights.resolve()


def test_absolute_model_path_through_a_symlink_is_resolved(tmp_path):
    real = tmp_path / "real-weights"
    real.mkdir()
    (tmp_path / "link-weights").symlink_to(real, target_is_directory=True)
    assert load({"model_path": str(tmp_path / "link-weights")}, tmp_path).model_path == real.resolve()


def test_wan_model_path_env_overrides_the_yaml(tmp_path, monkeypatch):
    monkeypatch.setenv("WAN_MODEL_PATH", str(tmp_path / "from-env"))
    config = load({"model_path": str(tmp_path / "from-yaml")}, tmp_path / "model")
    assert config.model_path == (tmp_path / "from-env").resolve()


def test_wan_model_path_env_without_a_yaml_path(tmp_path, monkeypatch):
    monkeypatch.setenv("WAN_MODEL_PATH", "/mnt/models/weights")
    assert load({}, tmp_path).model_path == Path("/mnt/models/weights").resolve()
    assert load_handler_config(None, tmp_path).model_path == Path("/mnt/models/weights").resolve()


def test_relative_wan_model_path_env_is_relative_to_the_model_dir(tmp_path, monkeypatch):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    monkeypatch.setenv("WAN_MODEL_PATH", "../env-weights")
    assert load({"model_path": "/x"}, model_dir).model_path == (tmp_path / "env-weights").resolve()


def test_empty_wan_model_path_env_falls_back_to_the_yaml(tmp_path, monkeypatch):
    monkeypatch.setenv("WAN_MODEL_PATH", "")
    assert load({"model_path": str(tmp_path / "y")}, tmp_path).model_path == (tmp_path / "y").resolve()


@pytest.mark.parametrize(
    "model_yaml",
    [
        pytest.param(None, id="no-yaml"),
        pytest.param({}, id="empty-yaml"),
        pytest.param({"minWorkers": 1}, id="no-handler-section"),
        pytest.param({"handler": None}, id="null-handler"),
        pytest.param({"handler": {}}, id="empty-handler"),
        pytest.param({"handler": {"model_path": None}}, id="null-path"),
        pytest.param({"handler": {"model_path": ""}}, id="empty-path"),
        pytest.param({"handler": {"model_path": 5}}, id="int-path"),
        pytest.param({"handler": {"model_path": ["/a"]}}, id="list-path"),
        pytest.param({"handler": {"defaults": {"width": 256}}}, id="defaults-only"),
    ],
)
def test_missing_model_path(model_yaml, tmp_path):
    config_error(model_yaml, tmp_path, "handler.model_path is required")


@pytest.mark.parametrize("section", [["model_path", "/w"], "model_path: /w", 5, True])
def test_handler_section_must_be_a_mapping(section, tmp_path):
    config_error({"handler": section}, tmp_path, "handler", "mapping")


# --- unknown keys -----------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["modelpath", "model_dir", "default", "limit", "Limits", "responseTimeout", "threads"])
def test_unknown_handler_key(key, tmp_path):
    error = config_error({"handler": {"model_path": "/w", key: 1}}, tmp_path, f"handler.{key}", "known")
    for known in ("model_path", "defaults", "limits", "video", "cpu_threads"):
        assert known in error.message


@pytest.mark.parametrize(
    "section, key, known",
    [
        ("defaults", "seed", "num_inference_steps"),
        ("defaults", "steps", "num_inference_steps"),
        ("defaults", "boundary_ratio", "flow_shift"),
        ("defaults", "Width", "width"),
        ("limits", "max_width", "max_side_px"),
        ("limits", "max_frames", "max_num_frames"),
        ("video", "bitrate", "crf"),
        ("video", "codec", "preset"),
    ],
)
def test_unknown_key_in_a_section(section, key, known, tmp_path):
    config_error({"handler": {"model_path": "/w", section: {key: 1}}}, tmp_path, f"handler.{section}.{key}", "known",
                 known)


@pytest.mark.parametrize("section", ["defaults", "limits", "video"])
@pytest.mark.parametrize("value", [[1, 2], "width: 256", 7])
def test_sections_must_be_mappings(section, value, tmp_path):
    config_error({"handler": {"model_path": "/w", section: value}}, tmp_path, f"handler.{section}", "mapping")


@pytest.mark.parametrize("section", ["defaults", "limits", "video"])
def test_empty_sections_mean_no_change(section, tmp_path):
    for value in (None, {}):
        config = load({"model_path": "/w", section: value}, tmp_path)
        assert config == HandlerConfig(model_path=Path("/w").resolve())


# --- types --------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "section, key, value, expected_type",
    [
        ("defaults", "width", "256", "int"),
        ("defaults", "width", True, "int"),
        ("defaults", "height", 256.0, "int"),
        ("defaults", "num_frames", [33], "int"),
        ("defaults", "fps", None, "int"),
        ("defaults", "num_inference_steps", False, "int"),
        ("defaults", "guidance_scale", "5.0", "float"),
        ("defaults", "guidance_scale", True, "float"),
        ("defaults", "guidance_scale_2", "3", "float"),
        ("defaults", "flow_shift", [5.0], "float"),
        ("defaults", "negative_prompt", 5, "str"),
        ("defaults", "negative_prompt", ["blurry"], "str"),
        ("limits", "max_side_px", "640", "int"),
        ("limits", "max_side_px", True, "int"),
        ("limits", "max_pixels", 262144.0, "int"),
        ("limits", "max_num_frames", None, "int"),
        ("limits", "max_guidance_scale", "20", "float"),
        ("limits", "max_guidance_scale", False, "float"),
        ("limits", "max_body_bytes", "24MB", "int"),
        ("video", "crf", "18", "int"),
        ("video", "crf", True, "int"),
        ("video", "crf", 18.5, "int"),
        ("video", "preset", 5, "str"),
        ("video", "preset", None, "str"),
    ],
)
def test_wrong_types(section, key, value, expected_type, tmp_path):
    config_error({"handler": {"model_path": "/w", section: {key: value}}}, tmp_path,
                 f"handler.{section}.{key} must be {expected_type}", repr(value))


@pytest.mark.parametrize("value", ["4", True, False, 2.0, [2]])
def test_cpu_threads_wrong_type(value, tmp_path):
    config_error({"handler": {"model_path": "/w", "cpu_threads": value}}, tmp_path, "handler.cpu_threads must be int")


@pytest.mark.parametrize("value", [0, -1, -64])
def test_cpu_threads_at_least_one(value, tmp_path):
    config_error({"handler": {"model_path": "/w", "cpu_threads": value}}, tmp_path, "handler.cpu_threads", "at least 1")


@pytest.mark.parametrize("value", [1, 2, 64])
def test_cpu_threads_accepted(value, tmp_path):
    assert load({"model_path": "/w", "cpu_threads": value}, tmp_path).cpu_threads == value
    assert load({"model_path": "/w", "cpu_threads": None}, tmp_path).cpu_threads is None


@pytest.mark.parametrize(
    "section, key, value",
    [
        ("defaults", "guidance_scale", 5),
        ("defaults", "guidance_scale_2", 2),
        ("defaults", "flow_shift", 3),
        ("limits", "max_guidance_scale", 25),
    ],
)
def test_int_is_accepted_for_float(section, key, value, tmp_path):
    config = load({"model_path": "/w", section: {key: value}}, tmp_path)
    got = config.default_overrides[key] if section == "defaults" else getattr(config.limits, key)
    assert got == float(value) and type(got) is float


def test_full_config(tmp_path):
    config = load(
        {
            "model_path": "/w",
            "defaults": {"width": 256, "height": 256, "num_frames": 33, "num_inference_steps": 4,
                         "guidance_scale": 4.5, "negative_prompt": "blurry"},
            "limits": {"max_side_px": 640, "max_pixels": 262144, "max_num_frames": 65, "max_fps": 30,
                       "max_inference_steps": 20, "max_guidance_scale": 10.0, "max_prompt_chars": 500,
                       "max_image_bytes": 1000000, "max_image_pixels": 4000000, "max_body_bytes": 2000000},
            "video": {"crf": 23, "preset": "medium"},
            "cpu_threads": 3,
        },
        tmp_path,
    )
    assert dict(config.default_overrides) == {"width": 256, "height": 256, "num_frames": 33, "num_inference_steps": 4,
                                              "guidance_scale": 4.5, "negative_prompt": "blurry"}
    assert config.limits == RequestLimits(max_side_px=640, max_pixels=262144, max_num_frames=65, max_fps=30,
                                          max_inference_steps=20, max_guidance_scale=10.0, max_prompt_chars=500,
                                          max_image_bytes=1000000, max_image_pixels=4000000, max_body_bytes=2000000)
    assert config.video == VideoEncoding(crf=23, preset="medium")
    assert config.cpu_threads == 3


def test_partial_limits_keep_the_other_defaults(tmp_path):
    limits = load({"model_path": "/w", "limits": {"max_side_px": 640}}, tmp_path).limits
    assert limits == dataclasses.replace(RequestLimits(), max_side_px=640)


# --- defaults_for ------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", [T2V_A14B, I2V_A14B, TI2V_5B], ids=lambda s: s.name)
def test_defaults_for_applies_overrides(spec, tmp_path):
    config = load({"model_path": "/w", "defaults": {"width": 256, "height": 256, "num_frames": 33,
                                                     "guidance_scale": 2, "negative_prompt": "blurry"}}, tmp_path)
    defaults = config.defaults_for(spec.defaults)
    assert isinstance(defaults, GenerationDefaults)
    assert defaults == dataclasses.replace(spec.defaults, width=256, height=256, num_frames=33, guidance_scale=2.0,
                                           negative_prompt="blurry")
    # Everything not overridden is the variant's own.
    assert defaults.fps == spec.defaults.fps
    assert defaults.num_inference_steps == spec.defaults.num_inference_steps
    assert defaults.guidance_scale_2 == spec.defaults.guidance_scale_2
    assert defaults.flow_shift == spec.defaults.flow_shift
    # The variant table itself is untouched.
    assert spec is VARIANTS[spec.name] and spec.defaults.width == 1280


def test_defaults_for_without_overrides_is_the_variant_defaults(tmp_path):
    config = load({"model_path": "/w"}, tmp_path)
    for spec in VARIANTS.values():
        assert config.defaults_for(spec.defaults) == spec.defaults


def test_defaults_for_flow_shift_and_guidance_2(tmp_path):
    config = load({"model_path": "/w", "defaults": {"flow_shift": 8, "guidance_scale_2": 2.5}}, tmp_path)
    defaults = config.defaults_for(T2V_A14B.defaults)
    assert (defaults.flow_shift, defaults.guidance_scale_2, defaults.guidance_scale) == (8.0, 2.5, 4.0)


# --- the repo's real model-config.yaml files -----------------------------------------------------

def test_the_expected_model_configs_exist():
    assert {path.stem for path in MODEL_CONFIGS} >= set(CONFIG_VARIANTS)


def _png_b64(width: int, height: int) -> str:
    return png_base64(width, height, (90, 90, 90))


@pytest.mark.parametrize("path", MODEL_CONFIGS, ids=lambda p: p.name)
def test_real_model_config_is_accepted(path, tmp_path):
    model_yaml = yaml.safe_load(path.read_text())
    assert isinstance(model_yaml, dict)
    for key in ("responseTimeout", "startupTimeout"):
        value = model_yaml.get(key)
        assert type(value) is int and value > 0, f"{path.name}: {key} = {value!r}"
    model_dir = tmp_path / "model_store" / path.stem
    model_dir.mkdir(parents=True)
    config = load_handler_config(model_yaml, model_dir)
    raw_path = Path(model_yaml["handler"]["model_path"])
    expected = raw_path if raw_path.is_absolute() else model_dir / raw_path
    assert config.model_path == expected.resolve()

    # The effective defaults must themselves pass the request rules of the variant served.
    spec = CONFIG_VARIANTS[path.stem]
    defaults = config.defaults_for(spec.defaults)
    body = {"prompt": "a boat", "seed": 1}
    if spec is I2V_A14B:
        body["image"] = _png_b64(defaults.width, defaults.height)
    request = parse_request(body, spec, defaults, config.limits, storage_configured=False)
    assert (request.width, request.height) == (defaults.width, defaults.height)
    assert request.num_frames == defaults.num_frames
    assert request.num_inference_steps == defaults.num_inference_steps
    assert request.fps == defaults.fps


def test_tiny_model_config_values(tmp_path):
    model_yaml = yaml.safe_load((REPO_ROOT / "config" / "models" / "tiny-ti2v.yaml").read_text())
    model_dir = tmp_path / "model_store" / "wan"
    model_dir.mkdir(parents=True)
    config = load_handler_config(model_yaml, model_dir)
    assert config.model_path == (tmp_path / "weights" / "tiny-ti2v-5b").resolve()
    defaults = config.defaults_for(TI2V_5B.defaults)
    assert (defaults.width, defaults.height, defaults.num_frames, defaults.num_inference_steps) == (256, 256, 33, 4)
    assert config.limits.max_side_px == 640 and config.limits.max_pixels == 262144
    assert os.path.isabs(config.model_path)


# --- one worker over several GPUs -----------------------------------------------------------------

def _model_yaml(stem: str) -> dict:
    return yaml.safe_load((REPO_ROOT / "config" / "models" / f"{stem}.yaml").read_text())


@pytest.mark.parametrize("stem", sorted(MULTI_GPU_CONFIGS))
def test_multi_gpu_config_is_its_one_gpu_config_run_by_torchrun(stem, tmp_path):
    one_gpu, ranks = MULTI_GPU_CONFIGS[stem]
    model_yaml, base = _model_yaml(stem), _model_yaml(one_gpu)
    # TorchServe starts the worker with torchrun, one rank per GPU; one worker spans them all.
    assert model_yaml["parallelType"] == "tp"
    assert model_yaml["torchrun"] == {"nproc-per-node": ranks}
    assert model_yaml["minWorkers"] == model_yaml["maxWorkers"] == 1
    assert model_yaml["deviceType"] == "gpu" and "deviceIds" not in model_yaml
    # The same generation as on one GPU: handler defaults, limits and speed options.
    handler, base_handler = dict(model_yaml["handler"]), dict(base["handler"])
    assert handler.pop("model_path") == f"/mnt/models/weights/{stem}"
    assert base_handler.pop("model_path") == f"/mnt/models/weights/{one_gpu}"
    parallel = handler.pop("parallel")
    assert handler == base_handler
    # The split is spelled out, not left to the defaults, and it loads.
    assert set(parallel) == {"cfg_split", "collective_timeout_s"}
    config = load_handler_config(model_yaml, tmp_path)
    assert config.model_path == Path(f"/mnt/models/weights/{stem}").resolve()
    assert config.parallel.cfg_split is True
    # A collective waits longer than any step, and gives up well before TorchServe does.
    assert 60 <= config.parallel.collective_timeout_s <= config.deadline_s / 1.5
    # Faster than one GPU: it does not wait longer for a hung request, nor queue fewer.
    assert model_yaml["responseTimeout"] <= base["responseTimeout"]
    assert model_yaml["startupTimeout"] == base["startupTimeout"]
    assert model_yaml["jobQueueSize"] >= base["jobQueueSize"]


@pytest.mark.parametrize("stem", sorted(MULTI_GPU_CONFIGS))
def test_multi_gpu_config_splits_the_real_transformer_and_the_default_sizes(stem):
    from handler.parallel import RankLayout

    one_gpu, ranks = MULTI_GPU_CONFIGS[stem]
    config = load_handler_config(_model_yaml(stem), "/nonexistent")
    layouts = [RankLayout.from_environment(config.parallel, {"WORLD_SIZE": str(ranks), "RANK": str(rank)})
               for rank in range(ranks)]
    assert {(layout.cfg_degree, layout.ulysses_degree) for layout in layouts} == \
        {(2, ranks // 2)}  # guidance 2 ways, the rest of the ranks on the sequence
    layouts[0].check_heads(ATTENTION_HEADS[one_gpu])  # raises if the heads do not divide
    # Every native size at the default frame count splits evenly (no 400 for a default request):
    # tokens = latent frames x (height / size_multiple) x (width / size_multiple).
    spec = CONFIG_VARIANTS[stem]
    defaults = config.defaults_for(spec.defaults)
    latent_frames = (defaults.num_frames - 1) // 4 + 1
    for width, height in spec.native_sizes:
        tokens = latent_frames * (height // spec.size_multiple) * (width // spec.size_multiple)
        assert tokens % layouts[0].ulysses_degree == 0, (width, height, tokens)


# --- one source: request rules for the job service, derived key lists, the TorchServe keys -----


def test_request_rules_without_weights_or_torch():
    """The job service reads a model's rules from its model-config.yaml alone: the weights need
    not exist, and the limits and defaults are the handler's own."""
    from handler.config import load_request_rules

    model_yaml = yaml.safe_load(Path("config/models/tiny-ti2v.yaml").read_text())
    model_yaml["handler"]["model_path"] = "/nowhere/at/all"
    rules = load_request_rules(model_yaml)
    config = load_handler_config(model_yaml, "/")
    assert (rules.limits, dict(rules.default_overrides)) == (config.limits, dict(config.default_overrides))
    assert rules.defaults_for(TI2V_5B.defaults) == config.defaults_for(TI2V_5B.defaults)
    assert rules.limits.max_side_px == 640 and rules.defaults_for(TI2V_5B.defaults).width == 256
    request = parse_request({"prompt": "x"}, TI2V_5B, rules.defaults_for(TI2V_5B.defaults), rules.limits, False)
    assert (request.width, request.num_frames) == (256, 33)
    assert load_request_rules(None) == load_request_rules({"handler": {}})
    with pytest.raises(ConfigError, match="handler.defaults.widht"):
        load_request_rules({"handler": {"defaults": {"widht": 64}}})
    with pytest.raises(ConfigError, match="handler.limits.max_side_px must be int"):
        load_request_rules({"handler": {"limits": {"max_side_px": "640"}}})


def test_the_request_modules_never_import_torch_or_diffusers():
    """The job service imports the request rules: they must not pull torch (seconds and GBs)."""
    import subprocess
    import sys

    code = ("import sys, handler.request, handler.config, handler.variants; "
            "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers', 'av') if m in sys.modules); "
            "print(','.join(heavy))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == ""


def test_key_lists_are_derived_from_the_dataclasses():
    from handler.config import DEFAULT_KEYS, HANDLER_KEYS, WorkerSettings
    from handler.request import FIELDS, GenerationRequest

    assert set(DEFAULT_KEYS) == {f.name for f in dataclasses.fields(GenerationDefaults)}
    assert DEFAULT_KEYS["guidance_scale_2"] is float and DEFAULT_KEYS["negative_prompt"] is str
    assert set(HANDLER_KEYS) == {"model_path", "defaults", "limits", "video", "speed", "parallel", "cpu_threads",
                                 "deadline_s", "lora", "profiles", "step_cache", "fp8"}
    # What a profile decides (scheduler, flow shift, lossy modes) is not a JSON field of its own.
    assert FIELDS == tuple(f.name for f in dataclasses.fields(GenerationRequest)
                           if f.name not in ("scheduler", "flow_shift", "lossy"))
    assert WorkerSettings().max_workers == 1


def test_torchserve_worker_keys_are_read_with_the_rest(tmp_path):
    config = load_handler_config({"maxWorkers": 3, "deviceType": "gpu", "handler": {"model_path": "/m"}}, tmp_path)
    assert (config.worker.max_workers, config.worker.wants_gpu) == (3, True)
    assert not load_handler_config({"handler": {"model_path": "/m"}}, tmp_path).worker.wants_gpu
    with pytest.raises(ConfigError, match="maxWorkers must be int"):
        load_handler_config({"maxWorkers": "2", "handler": {"model_path": "/m"}}, tmp_path)


@pytest.mark.parametrize("params", ["mbtree 0", "mbtree=0;rm -rf", "=1"])
def test_bad_x264_params_are_refused(params, tmp_path):
    with pytest.raises(ConfigError, match="x264_params"):
        load_handler_config({"handler": {"model_path": "/m", "video": {"x264_params": params}}}, tmp_path)


def test_the_job_service_reads_the_handlers_rules_and_names_a_bad_model_config(tmp_path):
    """jobs/config.py takes a model's limits and defaults from load_request_rules: the same as
    the handler's, with no torch; a bad handler section names the job service's model entry."""
    import subprocess
    import sys

    from handler.config import load_request_rules
    from jobs.config import JobsConfigError, load_settings

    jobs_yaml = Path("config/jobs.yaml").resolve()
    [model] = load_settings(jobs_yaml, tmp_path, environ={}).models
    rules = load_request_rules(yaml.safe_load(Path("config/models/tiny-ti2v.yaml").read_text()))
    assert (model.limits, model.defaults) == (rules.limits, rules.defaults_for(TI2V_5B.defaults))

    (tmp_path / "bad.yaml").write_text("handler:\n  defaults:\n    widht: 64\n")
    raw = yaml.safe_load(jobs_yaml.read_text())
    raw["models"][0]["model_config"] = str(tmp_path / "bad.yaml")
    (tmp_path / "jobs.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(JobsConfigError, match=r"models\[0\]\.model_config: unknown key handler\.defaults\.widht"):
        load_settings(tmp_path / "jobs.yaml", tmp_path, environ={})

    code = ("import sys, jobs.config; jobs.config.load_settings(sys.argv[1], sys.argv[2], environ={}); "
            "print(','.join(m for m in ('torch', 'diffusers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code, str(jobs_yaml), str(tmp_path)], capture_output=True,
                            text=True, timeout=120, check=True)
    assert result.stdout.strip() == ""
