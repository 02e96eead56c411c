"""Model archives over ``torch-model-archiver``: an entry file and model-config.yaml, no code, no weights.

The code has one owner, the installed ``handler`` package (the serving image installs it; a
checkout's venv has it editable). The archive carries only the entry file TorchServe loads, which
subclasses the installed handler, and the model's model-config.yaml; ``handler.model_path``
points at the weights outside it. (An archive that carried the package too would win on the
worker's PYTHONPATH over the image's copy, and the two would be built and versioned apart.) The default format is
``no-archive`` (a plain folder TorchServe symlinks instead of extracting), which is also what
KServe's model store holds. Weights are never put in an archive: a zipped ``.mar`` is copied
and extracted on every registration, doubling disk use and start time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
HANDLER_ENTRY = "wan_handler.py"
FORMATS = ("no-archive", "default", "tgz", "zip-store")
# The archive's whole code. TorchServe wants exactly one class defined in the entry file, and
# counts only classes defined there (not imported), hence a subclass rather than an import.
ENTRY_FILE_TEXT = '''"""TorchServe entry file of the Wan2.2 model (written by model_store/archive.py).

All code is the installed ``handler`` package (the serving image's): this file only names it.
"""

from handler.wan_handler import WanVideoHandler as InstalledHandler


class WanVideoHandler(InstalledHandler):
    pass
'''


def console_script(name: str, module_fallback: list[str]) -> list[str]:
    """The command for an installed console script: next to this Python (a venv), on PATH,
    or as ``python <module_fallback>`` when installed with ``pip --target`` (no scripts)."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return [str(beside)]
    found = shutil.which(name)
    return [found] if found else [sys.executable, *module_fallback]


def archive_path(export_dir: str | Path, model_name: str, archive_format: str) -> Path:
    base = Path(export_dir) / model_name
    return {"no-archive": base, "tgz": base.with_suffix(".tar.gz")}.get(archive_format, base.with_suffix(".mar"))


def _latest_source_mtime(config_file: Path) -> float:
    # The code is not in the archive: only its config and this builder (the entry file) make it stale.
    return max(p.stat().st_mtime for p in (config_file, Path(__file__)))


def is_current(export_dir: str | Path, model_name: str, config_file: str | Path) -> bool:
    """True when a no-archive folder exists and is newer than its config and its entry file."""
    manifest = archive_path(export_dir, model_name, "no-archive") / "MAR-INF" / "MANIFEST.json"
    return manifest.is_file() and manifest.stat().st_mtime >= _latest_source_mtime(Path(config_file))


def build_archive(
    model_name: str,
    config_file: str | Path,
    export_dir: str | Path,
    model_path: str | None = None,
    version: str = "1.0",
    archive_format: str = "no-archive",
) -> Path:
    """Build (or rebuild) one model archive and return its path.

    ``model_path`` replaces ``handler.model_path`` of the config (absolute, or relative to the
    archive's folder once extracted).
    """
    if archive_format not in FORMATS:
        raise ValueError(f"archive_format must be one of {FORMATS}")
    config = yaml.safe_load(Path(config_file).read_text()) or {}
    if model_path is not None:
        config.setdefault("handler", {})["model_path"] = str(model_path)
    if not config.get("handler", {}).get("model_path"):
        raise ValueError(f"{config_file}: handler.model_path is not set and no model_path was given")

    export_dir = Path(export_dir).resolve()
    export_dir.mkdir(parents=True, exist_ok=True)
    target = archive_path(export_dir, model_name, archive_format)
    with tempfile.TemporaryDirectory(prefix="wan-archive-") as staging_dir:
        staging = Path(staging_dir)
        entry = staging / HANDLER_ENTRY
        entry.write_text(ENTRY_FILE_TEXT)
        model_config = staging / "model-config.yaml"
        model_config.write_text(
            f"# Built by model_store/archive.py from {Path(config_file).name}\n"
            + yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
        )
        if target.is_dir():
            shutil.rmtree(target)
        command = [
            *console_script("torch-model-archiver", ["-m", "model_archiver.model_packaging"]),
            "--model-name", model_name,
            "--version", version,
            "--handler", str(entry),
            "--config-file", str(model_config),
            "--archive-format", archive_format,
            "--export-path", str(export_dir),
            "--force",
        ]
        # The archiver stages in $TMPDIR/<model-name> and wipes it first: give it its own.
        env = dict(os.environ, TMPDIR=str(staging))
        subprocess.run(command, check=True, env=env)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build a TorchServe archive of the Wan2.2 handler.")
    parser.add_argument("--model-name", default="wan")
    parser.add_argument("--config", default=str(REPO_ROOT / "config/models/tiny-ti2v.yaml"),
                        help="model-config.yaml template (config/models/*.yaml)")
    parser.add_argument("--export-path", default=str(REPO_ROOT / "model_store"))
    parser.add_argument("--model-path", help="weights folder, overriding handler.model_path")
    parser.add_argument("--version", default="1.0")
    parser.add_argument("--archive-format", choices=FORMATS, default="no-archive")
    args = parser.parse_args(argv)
    path = build_archive(args.model_name, args.config, args.export_path, args.model_path,
                         args.version, args.archive_format)
    print(path)


if __name__ == "__main__":
    main()
