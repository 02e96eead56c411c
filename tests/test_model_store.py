"""Tiny checkpoints and model archives: what make serve builds before TorchServe starts."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import yaml

from handler.variants import detect_variant
from model_store.archive import archive_path, build_archive, is_current
from model_store.tiny_model import COMPLETE_MARKER, build_tiny_checkpoint, build_tokenizer

WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".ckpt"}


def test_each_tiny_layout_is_detected_as_its_variant(tiny_checkpoints):
    for layout, path in tiny_checkpoints.items():
        assert detect_variant(path).name == layout
        assert (path / COMPLETE_MARKER).is_file()
        assert (path / "tokenizer" / "tokenizer.json").is_file()


def test_tiny_checkpoint_files_are_world_readable(tiny_checkpoints):
    for path in tiny_checkpoints["ti2v-5b"].rglob("*"):
        assert path.stat().st_mode & 0o004, path


def test_tokenizer_is_built_offline_and_umt5_shaped():
    tokenizer = build_tokenizer()
    ids = tokenizer("a cat walking in the city").input_ids
    assert ids[-1] == tokenizer.eos_token_id == 1
    assert tokenizer.pad_token_id == 0
    assert tokenizer.unk_token_id not in ids  # every word is in the vocabulary


def test_builder_skips_a_complete_checkpoint_and_rebuilds_a_partial_one(tmp_path):
    out = build_tiny_checkpoint("ti2v-5b", tmp_path / "m")
    stamp = (out / "model_index.json").stat().st_mtime_ns
    assert build_tiny_checkpoint("ti2v-5b", out) == out
    assert (out / "model_index.json").stat().st_mtime_ns == stamp
    (out / COMPLETE_MARKER).unlink()  # as if a build was interrupted
    build_tiny_checkpoint("ti2v-5b", out)
    assert (out / COMPLETE_MARKER).is_file()


def test_no_archive_holds_the_entry_file_and_config_but_no_code_or_weights(tmp_path):
    target = build_archive("wan", "config/models/ti2v-5b.yaml", tmp_path, model_path="/mnt/models/weights/x")
    assert target == archive_path(tmp_path, "wan", "no-archive") == tmp_path / "wan"
    manifest = json.loads((target / "MAR-INF" / "MANIFEST.json").read_text())["model"]
    assert manifest["handler"] == "wan_handler.py" and manifest["configFile"] == "model-config.yaml"
    # One copy of the code per pod: the installed handler package, never one in the store.
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()) == [
        "MAR-INF/MANIFEST.json", "model-config.yaml", "wan_handler.py"]
    config = yaml.safe_load((target / "model-config.yaml").read_text())
    assert config["handler"]["model_path"] == "/mnt/models/weights/x"
    assert config["responseTimeout"] == 900


def test_entry_file_is_the_installed_handler_as_torchserve_loads_it(tmp_path):
    """TorchServe imports the entry file by name from the model folder and takes the one class
    defined in it (ts.model_loader); that class must be the installed handler's."""
    from ts.utils.util import list_classes_from_module

    from handler.wan_handler import WanVideoHandler as Installed

    target = build_archive("wan", "config/models/tiny-ti2v.yaml", tmp_path, model_path="/w")
    spec = importlib.util.spec_from_file_location("wan_handler", target / "wan_handler.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    [entry_class] = list_classes_from_module(module)
    assert entry_class.__bases__ == (Installed,) and entry_class.__module__ == "wan_handler"


def test_zipped_archive_is_small_and_weightless(tmp_path):
    target = build_archive("wan", "config/models/ti2v-5b.yaml", tmp_path, archive_format="default")
    assert target.suffix == ".mar" and target.stat().st_size < 200_000


def test_archive_goes_stale_when_its_config_or_entry_file_changes(tmp_path):
    config = Path("config/models/tiny-ti2v.yaml")
    build_archive("wan", config, tmp_path, model_path="/w")
    assert is_current(tmp_path, "wan", config)
    manifest = tmp_path / "wan" / "MAR-INF" / "MANIFEST.json"
    for source in (config, Path("model_store/archive.py")):  # archive.py writes the entry file
        os.utime(manifest, (source.stat().st_mtime - 10, source.stat().st_mtime - 10))
        assert not is_current(tmp_path, "wan", config)
