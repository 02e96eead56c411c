"""The Triton model repository of one model config: two Triton models over one ``WanService``.

::

    <repository>/
      wan_stream/config.pbtxt       decoupled, Python backend: holds the service and the weights
      wan_stream/model-config.yaml  the model's config/models/<name>.yaml (its handler: section)
      wan_stream/1/model.py         from handler.triton_model import WanStreamModel as TritonPythonModel
      wan/config.pbtxt              plain (/infer over HTTP and gRPC), forwarding to wan_stream
      wan/1/model.py                from handler.triton_model import WanModel as TritonPythonModel

No code but the two one-line ``model.py`` files and no weights: the ``handler`` package comes
from the image (or the local venv), and ``handler.model_path`` points at the weights (absolute,
or relative to ``wan_stream/``). Triton serves a decoupled model only through streaming calls,
hence the plain ``wan`` in front (DESIGN.md, "Triton data plane").

Batching: ``max_batch_size`` > 1 turns on Triton's dynamic batcher on ``wan_stream`` (requests of
the same shape are generated together, see ``WanService.handle_batch``); ``wan`` then runs as many
instances, so that many plain requests can wait in ``wan_stream``'s queue at once. With batching
on, Triton puts its batch dimension first: ``wan_stream``'s tensors are [1, 1] instead of [1]
(``wan``'s stay [1]). Off (1) in the shipped configs until a GPU shows it pays.

This module does not import torch or Triton.
"""

from __future__ import annotations

import argparse
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
STREAM_MODEL = "wan_stream"
PLAIN_MODEL = "wan"
MODEL_CONFIG_FILE = "model-config.yaml"  # handler.triton_model reads it from the model's folder
ENTRY = "from handler.triton_model import {cls} as TritonPythonModel  # noqa: F401\n"


@dataclass(frozen=True)
class TritonSettings:
    """What config.pbtxt says beyond the tensors, read from model-config.yaml's ``triton:``
    section (every key optional)."""

    # Requests generated together at most; 1: Triton's batcher is off.
    max_batch_size: int = 1
    # How long Triton holds a request for batch mates (microseconds).
    max_queue_delay_us: int = 100_000
    # KIND_GPU with one instance on the first GPU, or KIND_CPU (the tiny model, CPU machines).
    device: str = "gpu"

    @classmethod
    def from_model_yaml(cls, model_yaml: dict) -> TritonSettings:
        section = dict(model_yaml.get("triton") or {})
        unknown = set(section) - {"max_batch_size", "max_queue_delay_us", "device"}
        if unknown:
            raise ValueError(f"unknown key(s) triton.{', triton.'.join(sorted(unknown))}")
        device = section.get("device", model_yaml.get("deviceType", "gpu"))
        if device not in ("gpu", "cpu"):
            raise ValueError(f"triton.device must be gpu or cpu, got {device!r}")
        settings = cls(int(section.get("max_batch_size", 1)), int(section.get("max_queue_delay_us", 100_000)),
                       device)
        if settings.max_batch_size < 1:
            raise ValueError("triton.max_batch_size must be at least 1")
        return settings

    @property
    def batching(self) -> bool:
        return self.max_batch_size > 1


def _tensor(kind: str, name: str) -> str:
    return f'{kind} [\n  {{\n    name: "{name}"\n    data_type: TYPE_STRING\n    dims: [ 1 ]\n  }}\n]\n'


def stream_config(settings: TritonSettings) -> str:
    kind = "KIND_GPU\n    gpus: [ 0 ]" if settings.device == "gpu" else "KIND_CPU"
    text = (
        f'# Built by model_store/triton_repo.py. Holds the service: one instance, the weights once.\n'
        f'name: "{STREAM_MODEL}"\nbackend: "python"\n'
        f"max_batch_size: {settings.max_batch_size if settings.batching else 0}\n"
        + _tensor("input", "request") + _tensor("output", "response")
        + "# One response per progress event, then the answer (stream: true); one answer otherwise.\n"
        "model_transaction_policy {\n  decoupled: true\n}\n"
        f"instance_group [\n  {{\n    count: 1\n    kind: {kind}\n  }}\n]\n"
    )
    if settings.batching:
        text += (
            "# Requests of the same shape are generated together; each keeps its own answer.\n"
            f"dynamic_batching {{\n  max_queue_delay_microseconds: {settings.max_queue_delay_us}\n}}\n"
        )
    return text


def plain_config(settings: TritonSettings) -> str:
    return (
        f"# Built by model_store/triton_repo.py. Forwards each /infer to {STREAM_MODEL} (no weights here).\n"
        f'name: "{PLAIN_MODEL}"\nbackend: "python"\nmax_batch_size: 0\n'
        + _tensor("input", "request") + _tensor("output", "response")
        # One instance per request that may wait in wan_stream's queue for batch mates.
        + f"instance_group [\n  {{\n    count: {settings.max_batch_size}\n    kind: KIND_CPU\n  }}\n]\n"
        + "parameters [\n"
        + f'  {{\n    key: "forward_to"\n    value: {{ string_value: "{STREAM_MODEL}" }}\n  }},\n'
        + f'  {{\n    key: "target_batching"\n    value: {{ string_value: "{str(settings.batching).lower()}" }}\n  }}\n'
        + "]\n"
    )


def build_repository(config_file: str | Path, out_dir: str | Path, model_path: str | None = None,
                     max_batch_size: int | None = None) -> Path:
    """Build (or rebuild) the repository for one model-config.yaml and return its folder.

    ``model_path`` replaces ``handler.model_path`` (absolute, or relative to ``wan_stream/``);
    ``max_batch_size`` replaces ``triton.max_batch_size``."""
    config = yaml.safe_load(Path(config_file).read_text()) or {}
    if model_path is not None:
        config.setdefault("handler", {})["model_path"] = str(model_path)
    if max_batch_size is not None:
        config.setdefault("triton", {})["max_batch_size"] = max_batch_size
    if not config.get("handler", {}).get("model_path"):
        raise ValueError(f"{config_file}: handler.model_path is not set and no model_path was given")
    settings = TritonSettings.from_model_yaml(config)
    out = Path(out_dir)
    for name, text, cls in ((STREAM_MODEL, stream_config(settings), "WanStreamModel"),
                            (PLAIN_MODEL, plain_config(settings), "WanModel")):
        folder = out / name
        if folder.exists():
            shutil.rmtree(folder)
        (folder / "1").mkdir(parents=True)
        (folder / "config.pbtxt").write_text(text)
        (folder / "1" / "model.py").write_text(ENTRY.format(cls=cls))
    (out / STREAM_MODEL / MODEL_CONFIG_FILE).write_text(
        f"# Built by model_store/triton_repo.py from {Path(config_file).name}\n"
        + yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build a Triton model repository of the Wan2.2 service.")
    parser.add_argument("--config", default=str(REPO_ROOT / "config/models/tiny-ti2v.yaml"),
                        help="model-config.yaml (config/models/*.yaml)")
    parser.add_argument("--out", default=str(REPO_ROOT / "model_store/triton"))
    parser.add_argument("--model-path", help="weights folder, overriding handler.model_path")
    parser.add_argument("--max-batch-size", type=int, help="overrides triton.max_batch_size (1: no batching)")
    args = parser.parse_args(argv)
    print(build_repository(args.config, args.out, args.model_path, args.max_batch_size))


if __name__ == "__main__":
    main()
