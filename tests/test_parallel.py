"""One worker over several ranks (torchrun), on CPU with gloo: the wiring the GPU path uses.

The GPU speed is measured in BENCHMARKS.md (scripts/benchmark.py --stages parallel). Here: the
rank layout, that N ranks answer exactly what one process answers (frames compared before the
video encoder), that the leader alone decides (refusals, s3-free parsing), and a real TorchServe
worker started by torchrun: plain, streamed, refused, past its deadline, and a rank killed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml

from handler.config import ParallelOptions, load_handler_config
from handler.errors import ConfigError, InvalidRequest
from handler.parallel import RankLayout
from scripts.serve import REPO_ROOT, free_ports
from tests.harness.faults import run_deadline
from tests.harness.payloads import BIG, SMALL, png_base64, video_problem
from tests.harness.servers import DEADLINE_HANDLER, DEADLINE_RESPONSE_TIMEOUT_S, model_config, running, wait_busy

TINY_CONFIG = REPO_ROOT / "config" / "models" / "tiny-ti2v.yaml"

# One body per kind of request the ranks must agree on.
REQUESTS = [
    {"prompt": "a cat", **SMALL, "num_inference_steps": 3, "seed": 7, "output": "inline"},
    {"prompt": "refused by the leader", "width": 12345},
    {"prompt": "an image", **SMALL, "seed": 3, "output": "inline", "image": png_base64(160, 120)},
    {"prompt": "no guidance", "width": 128, "height": 96, "num_frames": 9, "num_inference_steps": 2, "seed": 5,
     "guidance_scale": 1.0, "output": "inline"},
]


# -- the layout -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("world", "cfg_split", "expected"), [
    (1, True, None),
    (2, True, (2, 1)),
    (4, True, (2, 2)),
    (8, True, (2, 4)),
    (2, False, (1, 2)),
    (3, True, (1, 3)),  # odd: no guidance split, all ranks on the sequence
])
def test_rank_layout_follows_torchrun_environment(world, cfg_split, expected):
    env = {"WORLD_SIZE": str(world), "RANK": "1" if world > 1 else "0", "LOCAL_RANK": "1" if world > 1 else "0"}
    layout = RankLayout.from_environment(ParallelOptions(cfg_split=cfg_split), env)
    if expected is None:
        assert layout is None
        return
    assert (layout.cfg_degree, layout.ulysses_degree) == expected
    assert layout.rank == 1 and not layout.is_leader


def test_layout_refuses_a_sequence_split_that_does_not_divide_the_heads():
    layout = RankLayout(world_size=3, rank=0, local_rank=0, cfg_degree=1, ulysses_degree=3)
    with pytest.raises(ConfigError, match="40 attention heads"):
        layout.check_heads(40)  # the A14B experts on 3 GPUs
    RankLayout(world_size=4, rank=0, local_rank=0, cfg_degree=2, ulysses_degree=2).check_heads(24)


def test_parallel_options_are_checked(tmp_path):
    base = {"handler": {"model_path": str(tmp_path)}}
    config = load_handler_config({**base, "handler": {**base["handler"], "parallel": {"cfg_split": False}}}, tmp_path)
    assert config.parallel == ParallelOptions(cfg_split=False)
    with pytest.raises(ConfigError, match="handler.parallel.cfg_split must be bool"):
        load_handler_config({"handler": {**base["handler"], "parallel": {"cfg_split": "yes"}}}, tmp_path)
    with pytest.raises(ConfigError, match="unknown key handler.parallel.ulysses"):
        load_handler_config({"handler": {**base["handler"], "parallel": {"ulysses": 2}}}, tmp_path)


# -- N ranks in-process, as TorchServe's torchrun starts them ---------------------------------------

def run_ranks(weights: Path, out: Path, nproc: int, requests=REQUESTS, settings=(), config: Path = TINY_CONFIG) -> dict:
    out.mkdir(parents=True)
    (out / "requests.json").write_text(json.dumps(requests))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-addr", "127.0.0.1", "--master-port", str(free_ports(1)[0]),
               "-m", "scripts.ranks", "--model-config", str(config), "--model-path", str(weights),
               "--requests", str(out / "requests.json"), "--out", str(out), "--frames"]
    for setting in settings:
        command += ["--set", setting]
    log = out / "log.txt"
    with open(log, "w") as sink:
        code = subprocess.run(command, check=False, cwd=REPO_ROOT, stdout=sink, stderr=subprocess.STDOUT, timeout=300).returncode
    assert code == 0, log.read_text()[-3000:]
    return json.loads((out / "answers.json").read_text())


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_checkpoints):
    out = tmp_path_factory.mktemp("ranks") / "one"
    return out, run_ranks(tiny_checkpoints["ti2v-5b"], out, 1)


def _frames_difference(a: Path, b: Path) -> np.ndarray:
    return np.abs(np.load(a).astype(np.int16) - np.load(b).astype(np.int16))


def _same_answers(answers: dict, reference: dict) -> None:
    """Same statuses and bodies as one process, apart from timings and ids."""
    assert [a["status"] for a in answers["answers"]] == [a["status"] for a in reference["answers"]] == [
        200, 400, 200, 200]
    for mine, theirs in zip(answers["answers"], reference["answers"], strict=True):
        for key in ("error", "width", "height", "num_frames", "seed", "variant"):
            assert mine["body"].get(key) == theirs["body"].get(key)


def test_two_ranks_splitting_guidance_give_exactly_the_one_process_frames(one_process, tmp_path, tiny_checkpoints):
    reference_dir, reference = one_process
    answers = run_ranks(tiny_checkpoints["ti2v-5b"], tmp_path / "two", 2)
    assert (answers["world_size"], answers["cfg_degree"], answers["ulysses_degree"]) == (2, 2, 1)
    _same_answers(answers, reference)
    for index in (0, 2, 3):
        # Each branch of a guided step sees exactly its one-process inputs: bit-identical.
        assert _frames_difference(tmp_path / "two" / f"frames-{index}.npy",
                                  reference_dir / f"frames-{index}.npy").max() == 0


# Ulysses splits the tokens: attention sums in another order. Tolerance, in levels of 255 on
# decoded frames: at most 8 anywhere and 0.5 on average (measured: see BENCHMARKS.md for the GPU).
SEQUENCE_SPLIT_MAX_LEVELS = 8
SEQUENCE_SPLIT_MEAN_LEVELS = 0.5


@pytest.mark.parametrize(("nproc", "settings", "layout"), [
    (2, ("parallel.cfg_split=false",), (1, 2)),
    (4, (), (2, 2)),
], ids=["sequence-2", "guidance-2-x-sequence-2"])
def test_sequence_split_matches_one_process_within_tolerance(one_process, tmp_path, tiny_checkpoints, nproc,
                                                             settings, layout):
    reference_dir, reference = one_process
    answers = run_ranks(tiny_checkpoints["ti2v-5b"], tmp_path / "n", nproc, settings=settings)
    assert (answers["cfg_degree"], answers["ulysses_degree"]) == layout
    _same_answers(answers, reference)
    for index in (0, 2, 3):
        difference = _frames_difference(tmp_path / "n" / f"frames-{index}.npy", reference_dir / f"frames-{index}.npy")
        assert difference.max() <= SEQUENCE_SPLIT_MAX_LEVELS and difference.mean() <= SEQUENCE_SPLIT_MEAN_LEVELS


def test_a_size_whose_tokens_do_not_split_evenly_is_refused_naming_it(tmp_path, tiny_checkpoints):
    # 96x96 with one frame: 3 x 3 x 1 = 9 tokens for the tiny TI2V layout, odd.
    odd = {"prompt": "odd", "width": 96, "height": 96, "num_frames": 1, "num_inference_steps": 2, "output": "inline"}
    answers = run_ranks(tiny_checkpoints["ti2v-5b"], tmp_path / "odd", 2, requests=[odd, REQUESTS[0]],
                        settings=("parallel.cfg_split=false",))
    refused, served = answers["answers"]
    assert refused["status"] == 400
    error = refused["body"]["error"]
    assert error["type"] == InvalidRequest.error_type and error["field"] == "num_frames"
    assert "9 video tokens" in error["message"] and "2 ways" in error["message"]
    assert served["status"] == 200  # the ranks stayed in step after the refusal


def test_two_experts_split_over_ranks_give_the_one_process_frames(tmp_path, tiny_checkpoints):
    weights = tiny_checkpoints["t2v-a14b"]
    # The tiny TI2V config without its adapters and profiles: their files are the TI2V checkpoint's.
    config = yaml.safe_load(TINY_CONFIG.read_text())
    for fast in ("lora", "profiles"):
        config["handler"].pop(fast, None)
    (tmp_path / "a14b.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    request = [{"prompt": "two experts", **SMALL, "num_inference_steps": 4, "seed": 9, "output": "inline"}]
    one = run_ranks(weights, tmp_path / "one", 1, requests=request, config=tmp_path / "a14b.yaml")
    two = run_ranks(weights, tmp_path / "two", 2, requests=request, config=tmp_path / "a14b.yaml")
    assert one["answers"][0]["status"] == two["answers"][0]["status"] == 200
    assert _frames_difference(tmp_path / "one" / "frames-0.npy", tmp_path / "two" / "frames-0.npy").max() == 0


# -- a real TorchServe worker of two ranks ---------------------------------------------------------

@pytest.fixture(scope="module")
def two_rank_server(tmp_path_factory, server_weights):
    """The tiny model on one worker of two ranks (parallelType tp + torchrun), with the deadline
    scenario's timeouts so a long request can be stopped."""
    root = tmp_path_factory.mktemp("two-ranks")
    top = {"minWorkers": 1, "maxWorkers": 1, "deviceType": "cpu", "parallelType": "tp",
           "responseTimeout": DEADLINE_RESPONSE_TIMEOUT_S,
           # Its own rendezvous port: never the default 29400 another job may hold.
           "torchrun": {"nproc-per-node": 2, "rdzv-endpoint": f"127.0.0.1:{free_ports(1)[0]}"}}
    config = model_config(root / "model-config.yaml", top, DEADLINE_HANDLER)
    with running(root, config, server_weights) as server:
        yield server


def _ranks(server) -> list[psutil.Process]:
    pid, _ = server.wait_ready()
    assert pid is not None
    agent = psutil.Process(pid).parent()  # torchrun's agent; the ranks are its children
    return [p for p in agent.children() if "model_service_worker" in " ".join(p.cmdline())]


def test_torchserve_runs_one_worker_of_two_ranks_and_answers_like_one(two_rank_server):
    assert len(_ranks(two_rank_server)) == 2
    served = two_rank_server.post({"prompt": "a cat", **SMALL, "seed": 1, "output": "inline"})
    assert served.status_code == 200
    assert video_problem(served, SMALL) is None
    refused = two_rank_server.post({"prompt": "x", "width": 12345})
    assert refused.status_code == 400 and refused.json()["error"]["field"] == "height"
    streamed = two_rank_server.post({"prompt": "a cat", **SMALL, "stream": True, "output": "inline"})
    lines = [json.loads(line) for line in streamed.text.splitlines() if line.strip()]
    assert streamed.headers["Content-Type"].startswith("application/x-ndjson")
    # Progress from the leader only: one line per step, not one per rank.
    assert [line["step"] for line in lines if line["event"] == "progress"] == [1, 2]
    assert lines[-1]["event"] == "result"


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_two_ranks_stop_together_at_the_deadline_and_keep_serving(two_rank_server, stream):
    ranks_before = {p.pid for p in _ranks(two_rank_server)}
    result = run_deadline(two_rank_server, stream=stream)
    assert result["problems"] == []
    assert "stopped after step" in result["message"]
    assert {p.pid for p in _ranks(two_rank_server)} == ranks_before  # no rank restarted


@pytest.mark.parametrize("rank", ["1", "0"], ids=["follower", "leader"])
def test_a_rank_killed_mid_generation_gets_an_error_and_the_worker_comes_back(two_rank_server, rank):
    ranks = _ranks(two_rank_server)
    # TorchServe reports whichever rank printed its pid last; torchrun's RANK says which is which.
    victim = next(p for p in ranks if p.environ().get("RANK") == rank)
    reported_pid, _ = two_rank_server.wait_ready()
    answer: dict = {}

    def send() -> None:
        response = two_rank_server.post({"prompt": "killed", **BIG, "num_inference_steps": 20}, timeout=60)
        answer.update(status=response.status_code, body=response.text)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    # Killed once it is working on the request (a fixed sleep could fire before the request reached
    # the ranks on a loaded machine, and the restarted worker would then serve it).
    assert wait_busy(victim.pid, cpu_s=0.5, timeout_s=60) is not None, "the rank never started on the request"
    os.kill(victim.pid, signal.SIGKILL)
    thread.join(60)
    assert not thread.is_alive()
    assert answer["status"] >= 500 and "Worker died" in answer["body"]
    new_pid, _ = two_rank_server.wait_ready(120.0, not_pid=reported_pid)
    assert new_pid is not None
    assert len(_ranks(two_rank_server)) == 2
    after = two_rank_server.post({"prompt": "after", **SMALL, "output": "inline"})
    assert after.status_code == 200 and video_problem(after, SMALL) is None


def test_benchmark_parallel_stage_records_speedup_and_frame_difference(tmp_path):
    """The GPU benchmark's parallel stage, on CPU: both rank counts run, per-stage speedups and the
    frame difference are recorded, and the chart draws them."""
    from scripts import benchmark

    out = tmp_path / "parallel.json"
    benchmark.main(["--size", "tiny", "--checkpoint", str(tmp_path / "weights"), "--stages", "build,parallel",
                    "--nproc", "1,2", "--width", "128", "--height", "128", "--num-frames", "9", "--steps", "2",
                    "--out", str(out)])
    runs = json.loads(out.read_text())["parallel"]["runs"]
    assert set(runs) == {"1", "2"}
    assert runs["2"]["cfg_degree"] == 2
    assert set(runs["2"]["speedup"]) >= {"wall_median_s", "denoise_median_s", "vae_decode_median_s"}
    assert runs["2"]["frames_vs_1"]["max_abs"] == 0
    benchmark.chart([str(out)], str(tmp_path / "chart.png"))
    assert (tmp_path / "chart.png").stat().st_size > 0


def test_two_ranks_apply_the_leaders_adapters_and_step_cache_exactly_as_one_process(tmp_path, tiny_checkpoints):
    """Issue 14: the leader's decision carries the adapters and the profile; every rank applies
    them, and with the guidance split the frames are still the one process's, bit for bit (the
    step cache too: each branch keeps its own cache on its own rank)."""
    weights = tiny_checkpoints["ti2v-5b"]
    base = {"prompt": "fast modes", **SMALL, "seed": 3, "output": "inline"}
    requests = [dict(base, lora=[{"name": "tiny-lora", "scale": 0.8}, {"name": "tiny-lora-b", "scale": 0.5}]),
                dict(base, profile="cached"), base]
    one = run_ranks(weights, tmp_path / "one", 1, requests=requests, settings=("step_cache.threshold=1000.0",))
    two = run_ranks(weights, tmp_path / "two", 2, requests=requests, settings=("step_cache.threshold=1000.0",))
    assert two["cfg_degree"] == 2
    assert [a["status"] for a in two["answers"]] == [a["status"] for a in one["answers"]] == [200, 200, 200]
    assert two["answers"][0]["body"]["lora"] == [{"name": "tiny-lora", "scale": 0.8},
                                                 {"name": "tiny-lora-b", "scale": 0.5}]
    assert two["answers"][1]["body"]["lossy"] == ["step_cache"]
    for index in range(3):
        assert _frames_difference(tmp_path / "one" / f"frames-{index}.npy",
                                  tmp_path / "two" / f"frames-{index}.npy").max() == 0
    # And the adapters and the cache did change the video.
    for index in (0, 1):
        assert _frames_difference(tmp_path / "two" / f"frames-{index}.npy", tmp_path / "two" / "frames-2.npy").max() > 0
