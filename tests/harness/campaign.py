"""Reliability campaign: load, faults and hostile input against real TorchServe processes.

    python -m tests.harness.campaign --quick          # the sizes tests/test_reliability.py uses
    python -m tests.harness.campaign --out reliability/results/campaign.json   # the recorded campaign

Each scenario starts its own TorchServe (127.0.0.1, free ports, one worker, the tiny model), so a
fault in one cannot hide in another, and returns a dict of counts plus ``problems``: every way
the run broke the contract. An empty ``problems`` everywhere is a pass (exit status 0).

- load: many concurrent clients against a small queue; every accepted request must come back
  with a valid video, the overflow must get TorchServe's 503 fast, nothing may hang, and the
  worker's memory must stay flat.
- faults: SIGKILL of the worker mid-generation (streamed and plain), out of memory for real
  (the worker's address space lowered with prlimit), a generation past its deadline; plus the
  S3 fault tests of tests/test_storage.py, rerun.
- hostile input: images built to hurt (bombs, huge headers, truncations, wrong magic, oversized
  base64), thousands of generated bodies checked against the parser run in-process as an
  oracle, and the hypothesis properties of tests/test_request_fuzz.py.

Everything is seeded, every wait is bounded, every server is stopped in a ``finally`` (SIGTERM
included). The servers get no storage or proxy settings from the caller's environment (only the
fuzz server gets S3, set explicitly: a moto server on 127.0.0.1), and the campaign's own HTTP
clients never go through a proxy: nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

from scripts.serve import REPO_ROOT, ServerLayout, without_outside
from tests.harness.faults import run_deadline, run_kill_plain, run_kill_streamed, run_oom, run_timeout_control
from tests.harness.fuzz import Oracle, run_fuzz, run_images
from tests.harness.load import run_load
from tests.harness.servers import Server, deadline_config, fuzz_config, moto_s3, running, service_config


@dataclass(frozen=True)
class Plan:
    """How much of everything one run does."""

    name: str
    load_clients: int
    load_requests_per_client: int
    load_queue_size: int
    # Memory growth allowed over the whole load and over its second half, in MiB (run_load says why).
    load_max_rss_growth_mib: int
    load_phases: int
    load_max_late_growth_mib: int | None
    kills: int  # SIGKILLs per mode (streamed, plain)
    ooms: int
    # Deadline runs, alternately plain and streamed: 2 covers both modes.
    deadlines: int
    fuzz_bodies: int
    hypothesis_examples: int
    # The long extras: the same request with no deadline left to stop it (run_timeout_control),
    # and the big request again after the first OOM, with its memory back.
    timeout_control: bool = False
    oom_retry_big: bool = False
    seed: int = 20251121


QUICK = Plan(name="quick", load_clients=12, load_requests_per_client=40, load_queue_size=4,
             load_max_rss_growth_mib=16, load_phases=1, load_max_late_growth_mib=None,
             kills=1, ooms=1, deadlines=2, fuzz_bodies=500, hypothesis_examples=150)
FULL = Plan(name="full", load_clients=16, load_requests_per_client=480, load_queue_size=4,
            load_max_rss_growth_mib=32, load_phases=4, load_max_late_growth_mib=16,
            kills=3, ooms=3, deadlines=3, fuzz_bodies=5000, hypothesis_examples=10000,
            timeout_control=True, oom_retry_big=True)


# -- pytest reruns: S3 faults and the parser's properties ---------------------------------------------------------


def _stop_group(process: subprocess.Popen, grace_s: float) -> None:
    """Stop a process started with ``start_new_session`` and everything in its group: SIGINT first
    (pytest runs its finalizers, which stop its servers), SIGKILL to whatever is left after
    ``grace_s``."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=grace_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


def run_pytest(args: list[str], env: dict[str, str] | None = None, timeout_s: float = 900,
               stop_grace_s: float = 60) -> dict[str, Any]:
    """Run pytest in a subprocess (its own process group, stopped with it past ``timeout_s``);
    return pass/fail counts and the test names (from JUnit XML). Like the campaign's servers, it
    gets none of the caller's storage or proxy variables: each test sets the ones it uses."""
    command_text = shlex.join(["python", "-m", "pytest", *args])
    with tempfile.TemporaryDirectory(prefix="wan-campaign-") as tmp:
        report = Path(tmp) / "report.xml"
        output = Path(tmp) / "output.txt"
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", *args]
        started = time.monotonic()
        # Output to a file, not a pipe: a server pytest leaves behind would hold a pipe open.
        with open(output, "wb") as out:
            process = subprocess.Popen(command, cwd=REPO_ROOT, env={**without_outside(dict(os.environ)), **(env or {})},
                                       stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                returncode = process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                returncode = None
                _stop_group(process, stop_grace_s)
            except BaseException:  # interrupted (SIGTERM on the campaign): leave nothing running
                _stop_group(process, stop_grace_s)
                raise
        tail = output.read_text(errors="replace")[-1500:]
        if returncode is None:
            return {"command": command_text, "seconds": round(time.monotonic() - started, 1),
                    "problems": [f"pytest ran past {timeout_s} s and was stopped:\n{tail}"]}
        tests = []
        if report.is_file():
            for case in ElementTree.parse(report).iter("testcase"):
                outcome = "passed"
                for child in case:
                    if child.tag in ("failure", "error"):
                        outcome = "failed"
                    elif child.tag == "skipped":
                        outcome = "skipped"
                tests.append({"name": case.get("name"), "outcome": outcome, "seconds": float(case.get("time") or 0)})
    counts = Counter(t["outcome"] for t in tests)
    problems = [] if returncode == 0 and counts["passed"] and not counts["failed"] else [f"pytest failed:\n{tail}"]
    return {"command": command_text, "passed": counts["passed"], "failed": counts["failed"],
            "skipped": counts["skipped"], "seconds": round(time.monotonic() - started, 1), "tests": tests,
            "problems": problems}


# The storage issue's fault tests: S3 down mid-run, bucket missing at start or deleted, storage down
# while reading an input, and hostile s3:// inputs.
S3_FAULT_TESTS = ["tests/test_storage.py", "-k", "outage or missing_bucket or is_down or falls_back or rejections"]



# -- the campaign: a table of scenarios ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    """One scenario: the model config its fresh server gets (None: no server of its own) and what
    it runs, given the plan and (when it has one) the server."""

    name: str
    config: Callable[[Path, Plan], Path] | None
    run: Callable[..., dict[str, Any]]
    s3: bool = False  # the server writes its results to a moto S3 of its own


def _faults(plan: Plan, server: Server) -> dict[str, Any]:
    out: dict[str, Any] = {"kill_streamed": [], "kill_plain": [], "oom": []}
    for i in range(plan.ooms):
        out["oom"].append(run_oom(server, retry_big=(plan.oom_retry_big and i == 0)))
    for _ in range(plan.kills):
        out["kill_streamed"].append(run_kill_streamed(server))
        out["kill_plain"].append(run_kill_plain(server))
    return out


def _deadline(plan: Plan, server: Server) -> dict[str, Any]:
    runs = [run_deadline(server, stream=bool(i % 2)) for i in range(plan.deadlines)]
    return {"runs": runs, "timeout_control": run_timeout_control(server) if plan.timeout_control else None}


SCENARIO_TABLE = (
    Scenario("load", lambda path, plan: service_config(path, plan.load_queue_size),
             lambda plan, server: {"queue_size": plan.load_queue_size, "workers": 1,
                                   **run_load(server, plan.load_clients, plan.load_requests_per_client, plan.seed,
                                              plan.load_max_rss_growth_mib, plan.load_phases,
                                              plan.load_max_late_growth_mib)}),
    Scenario("faults", lambda path, plan: service_config(path), _faults),
    Scenario("deadline", lambda path, plan: deadline_config(path), _deadline),
    Scenario("images", lambda path, plan: service_config(path), lambda plan, server: run_images(server)),
    Scenario("fuzz", lambda path, plan: fuzz_config(path),
             lambda plan, server: {"seed": plan.seed, "s3": True,
                                   **run_fuzz(server, plan.fuzz_bodies, plan.seed,
                                              Oracle(server.layout.model_config))}, s3=True),
    Scenario("properties", None, lambda plan: run_pytest(["tests/test_request_fuzz.py"],
                                                         {"WAN_FUZZ_EXAMPLES": str(plan.hypothesis_examples)})),
    Scenario("s3", None, lambda plan: run_pytest(S3_FAULT_TESTS)),
)
SCENARIOS = tuple(s.name for s in SCENARIO_TABLE)


def run_scenario(scenario: Scenario, plan: Plan, root: Path, weights_dir: Path) -> dict[str, Any]:
    """One scenario on a fresh server of its own (when it has a config), stopped however it ends."""
    if scenario.config is None:
        return scenario.run(plan)
    folder = root / scenario.name
    config = scenario.config(folder / "model-config.yaml", plan)
    with contextlib.ExitStack() as stack:
        env = stack.enter_context(moto_s3(folder / "moto.log")) if scenario.s3 else None
        server = stack.enter_context(running(folder, config, weights_dir, env))
        return scenario.run(plan, server)


def campaign(plan: Plan, root: Path, weights_dir: Path, only: tuple[str, ...] = SCENARIOS) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for scenario in SCENARIO_TABLE:
        if scenario.name not in only:
            continue
        started = time.monotonic()
        print(f"== {scenario.name} ...", flush=True)
        try:
            results[scenario.name] = run_scenario(scenario, plan, root, weights_dir)
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - a crashed scenario is a finding
            where = traceback.extract_tb(exc.__traceback__)[-1]
            crash = f"scenario crashed: {type(exc).__name__}: {exc} ({Path(where.filename).name}:{where.lineno})"
            results[scenario.name] = {"problems": [crash]}
        results[scenario.name]["scenario_s"] = round(time.monotonic() - started, 1)
        print(f"   {scenario.name}: {len(_problems(results[scenario.name]))} problems, "
              f"{results[scenario.name]['scenario_s']} s", flush=True)
    return results


def _problems(result: Any) -> list[str]:
    """Every problem string anywhere in a result tree."""
    if isinstance(result, dict):
        found = list(result.get("problems", []))
        for key, value in result.items():
            if key != "problems":
                found += _problems(value)
        return found
    if isinstance(result, list):
        return [p for item in result for p in _problems(item)]
    return []


def totals(results: dict[str, Any]) -> dict[str, Any]:
    """The figures RELIABILITY.md quotes."""
    load = results.get("load", {})
    faults = results.get("faults", {})
    deadline = results.get("deadline", {})
    images = results.get("images", {})
    fuzz = results.get("fuzz", {})
    s3 = results.get("s3", {})
    fault_runs = (faults.get("kill_streamed", []) + faults.get("kill_plain", []) + faults.get("oom", [])
                  + deadline.get("runs", []))
    survived = sum(1 for run in fault_runs
                   if not run.get("problems") and (run.get("next_request") or {}).get("status") == 200)
    image_5xx = sum(1 for case in images.get("cases", []) if case["status"] >= 500)
    return {
        "requests_sent": load.get("sent", 0),
        "requests_accepted": load.get("accepted", 0),
        "requests_completed_with_valid_video": load.get("completed_valid", 0),
        "requests_rejected_503": load.get("rejected_503", 0),
        "requests_lost": load.get("lost", 0),
        "faults_injected": len(fault_runs),
        "faults_survived": survived,
        "s3_fault_tests_passed": s3.get("passed", 0),
        "s3_fault_tests_failed": s3.get("failed", 0),
        "bad_inputs_tried": images.get("tried", 0) + fuzz.get("bodies", 0),
        "bad_input_5xx": fuzz.get("five_xx", 0) + image_5xx,
        "worker_deaths_from_bad_input": fuzz.get("worker_restarts", 0) + (
            0 if images.get("worker_pid_unchanged", True) else 1),
        "hypothesis_tests_passed": results.get("properties", {}).get("passed", 0),
        "hypothesis_tests_failed": results.get("properties", {}).get("failed", 0),
        "problems": len(_problems(results)),
    }


def machine() -> dict[str, Any]:
    import torch

    cpu = ""
    with contextlib.suppress(OSError):
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "")
    memory_gib = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        memory_gib = round(int(Path("/proc/meminfo").read_text().split()[1]) / 1024 / 1024, 1)
    versions = {}
    for package in ("torchserve", "diffusers", "transformers", "hypothesis"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            versions[package] = version(package)
    return {"platform": platform.platform(), "cpu": cpu, "cpus": os.cpu_count(), "memory_gib": memory_gib,
            "python": platform.python_version(), "torch": torch.__version__, **versions}


def git_commit() -> str | None:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def summary(record: dict[str, Any]) -> str:
    t = record["totals"]
    lines = [
        f"campaign {record['plan']['name']} ({record['seconds']:.0f} s) on {record['machine']['cpus']} CPUs",
        (f"  load:   {t['requests_sent']} sent, {t['requests_accepted']} accepted, "
         f"{t['requests_completed_with_valid_video']} completed with a valid video, "
         f"{t['requests_rejected_503']} rejected 503, {t['requests_lost']} lost"),
        (f"  faults: {t['faults_injected']} injected, {t['faults_survived']} survived; S3 fault tests "
         f"{t['s3_fault_tests_passed']} passed, {t['s3_fault_tests_failed']} failed"),
        (f"  input:  {t['bad_inputs_tried']} bad inputs, {t['bad_input_5xx']} 5xx, "
         f"{t['worker_deaths_from_bad_input']} worker deaths; {t['hypothesis_tests_passed']} property tests passed"),
        f"  problems: {t['problems']}",
    ]
    for problem in _problems(record["results"])[:20]:
        lines.append(f"    - {problem[:300]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the sizes make test uses (a few minutes)")
    parser.add_argument("--only", default=",".join(SCENARIOS), help=f"comma-separated subset of {','.join(SCENARIOS)}")
    parser.add_argument("--out", type=Path, help="write the JSON record here")
    parser.add_argument("--seed", type=int, help="seed for the load clients and the fuzzer")
    parser.add_argument("--weights", type=Path, default=ServerLayout.weights_dir,
                        help="folder holding tiny-ti2v-5b (built there when missing)")
    parser.add_argument("--work-dir", type=Path, help="where the servers keep their files (default: a temp dir)")
    args = parser.parse_args(argv)
    only = tuple(name.strip() for name in args.only.split(",") if name.strip())
    unknown = set(only) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    plan = QUICK if args.quick else FULL
    if args.seed is not None:
        plan = dataclasses.replace(plan, seed=args.seed)
    root = args.work_dir or Path(tempfile.mkdtemp(prefix="wan-campaign-"))
    # SIGTERM (a CI job cancelled, `timeout`, kill) unwinds like Ctrl-C: every finally stops its
    # server, moto, pytest's group. Only the main thread may set handlers (main() in a test's thread).
    previous_handler = None
    if threading.current_thread() is threading.main_thread():
        previous_handler = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        started = time.monotonic()
        results = campaign(plan, root, args.weights, only)
        record = {
            "command": shlex.join(["python", "-m", "tests.harness.campaign", *(argv if argv is not None else sys.argv[1:])]),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "git_commit": git_commit(),
            "machine": machine(),
            "plan": dataclasses.asdict(plan),
            "seconds": round(time.monotonic() - started, 1),
            "totals": totals(results),
            "results": results,
        }
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(record, indent=2, ensure_ascii=False, default=str) + "\n")
        print(summary(record))
        return 0 if record["totals"]["problems"] == 0 else 1
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
        if args.work_dir is None:
            shutil.rmtree(root, ignore_errors=True)


def _sigterm_as_interrupt(signum: int, frame: Any) -> None:
    """SIGTERM raises KeyboardInterrupt (``timed`` lets it through); later ones are ignored while
    the finally blocks stop the servers (each wait there is bounded)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    sys.exit(main())
