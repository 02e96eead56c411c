"""Reliability campaign: load, faults and hostile input against real TorchServe processes.

    python -m scripts.campaign --quick          # the sizes tests/test_reliability.py uses
    python -m scripts.campaign --out reliability/results/campaign.json   # the recorded campaign

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
import base64
import contextlib
import dataclasses
import io
import json
import math
import os
import platform
import random
import resource
import shlex
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from xml.etree import ElementTree

import requests
import yaml

from scripts.serve import (
    REPO_ROOT,
    ServerLayout,
    free_ports,
    isolated_layout,
    local_session,
    read_key,
    start,
    stop,
    without_outside,
)

TINY_CONFIG = REPO_ROOT / "config" / "models" / "tiny-ti2v.yaml"
# The sizes tests use: a whole generation in ~0.1 s on one CI core.
SMALL = {"width": 128, "height": 128, "num_frames": 9, "num_inference_steps": 2}
# The largest request tiny-ti2v.yaml allows (max_pixels 512x512, 65 frames, 20 steps): ~10 s on
# one core, most of it in the VAE decode, and ~0.7 GB over the worker's resting memory.
BIG = {"width": 512, "height": 512, "num_frames": 65}
REQUEST_TIMEOUT_S = 120.0
# A 503 is TorchServe refusing at the door: it must not wait for the queue to move (absolute bound
# generous for a busy CI machine; run_load also compares it with the accepted requests' latency).
MAX_503_S = 2.0
# A refused hostile image costs a header read, not a decode (~10 ms measured; generous bound).
MAX_REFUSAL_S = 5.0
MIB = 1024 * 1024


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


# -- model configs for the scenarios --------------------------------------------------------------


def model_config(path: Path, top: dict[str, Any] | None = None, handler: dict[str, Any] | None = None) -> Path:
    """tiny-ti2v.yaml with overrides (top-level keys; handler keys merged one level deep)."""
    config = yaml.safe_load(TINY_CONFIG.read_text())
    config.update(top or {})
    for key, value in (handler or {}).items():
        section = config["handler"].get(key)
        config["handler"][key] = {**section, **value} if isinstance(section, dict) and isinstance(value, dict) else value
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def service_config(path: Path, queue_size: int = 4) -> Path:
    """The shipped tiny model (limits, timeouts) on one worker with a small queue."""
    return model_config(path, {"minWorkers": 1, "maxWorkers": 1, "jobQueueSize": queue_size})


# Every request the fuzzer gets accepted is SMALL at most, so thousands of bodies take minutes;
# the parser and its rules are the same, only the numbers are smaller.
FUZZ_LIMITS = {"max_side_px": 128, "max_pixels": 128 * 128, "max_num_frames": 9, "max_inference_steps": 2}


def fuzz_config(path: Path) -> Path:
    return model_config(path, {"minWorkers": 1, "maxWorkers": 1},
                        {"defaults": dict(SMALL), "limits": dict(FUZZ_LIMITS)})


# A responseTimeout small enough that TorchServe would kill the worker during a long request,
# a deadline far below it, and limits that allow a request of many seconds of denoising.
DEADLINE_RESPONSE_TIMEOUT_S = 10
DEADLINE_S = 2.0
# ~0.25 s a denoising step here (50 steps, then a long decode: ~20 s in all): the deadline stops it
# after a few steps, with progress lines.
LONG = {"width": 512, "height": 512, "num_frames": 161, "num_inference_steps": 50}


# The handler section of the deadline scenario: a deadline far below responseTimeout, and limits
# that allow a request of many seconds.
DEADLINE_HANDLER = {"deadline_s": DEADLINE_S,
                    "limits": {"max_side_px": 640, "max_pixels": 640 * 640, "max_num_frames": 161,
                               "max_inference_steps": 50}}


def deadline_config(path: Path) -> Path:
    return model_config(path, {"minWorkers": 1, "maxWorkers": 1, "responseTimeout": DEADLINE_RESPONSE_TIMEOUT_S},
                        DEADLINE_HANDLER)


# -- a server, its worker, its memory -------------------------------------------------------------


class Server:
    """One real TorchServe on free 127.0.0.1 ports (scripts.serve), with a model config of ours."""

    def __init__(self, layout: ServerLayout):
        self.layout = layout

    @property
    def predictions_url(self) -> str:
        return f"{self.layout.inference_url}/predictions/{self.layout.model_name}"

    def headers(self, kind: str = "inference") -> dict[str, str]:
        return {"Authorization": f"Bearer {read_key(self.layout.key_file, kind)}"}

    def post(self, body: Any = None, *, data: bytes | str | None = None, content_type: str | None = "application/json",
             timeout: float = REQUEST_TIMEOUT_S, session: requests.Session | None = None, **kwargs) -> requests.Response:
        """POST a JSON body (``body``) or raw ``data`` with the given content type (None: no header)."""
        headers = self.headers()
        if body is not None:
            data = json.dumps(body)
        if content_type is not None and data is not None:
            headers["Content-Type"] = content_type
        if session is not None:
            return session.post(self.predictions_url, data=data, headers=headers, timeout=timeout, **kwargs)
        with local_session() as own:
            return own.post(self.predictions_url, data=data, headers=headers, timeout=timeout, **kwargs)

    def workers(self) -> list[dict[str, Any]]:
        with local_session() as session:
            response = session.get(f"{self.layout.management_url}/models/{self.layout.model_name}",
                                   headers=self.headers("management"), timeout=10)
        response.raise_for_status()
        return response.json()[0]["workers"]

    def ready_pid(self) -> int | None:
        """The PID of the (single) READY worker, or None."""
        ready = [int(w["pid"]) for w in self.workers() if w.get("status") == "READY" and w.get("pid") is not None]
        return ready[0] if len(ready) == 1 else None

    def wait_ready(self, timeout_s: float = 120.0, not_pid: int | None = None) -> tuple[int | None, float]:
        """Wait for a READY worker (one other than ``not_pid``); return its PID and the wait."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            try:
                pid = self.ready_pid()
            except (requests.RequestException, ValueError, KeyError, IndexError):
                pid = None
            if pid is not None and pid != not_pid:
                return pid, time.monotonic() - started
            time.sleep(0.25)
        return None, time.monotonic() - started

    def frontend_pid(self) -> int | None:
        try:
            return int((self.layout.run_dir / "tmp" / ".model_server.pid").read_text().strip())
        except (OSError, ValueError):
            return None


def proc_kib(pid: int, field: str) -> int | None:
    """A ``/proc/<pid>/status`` memory field (VmRSS, VmHWM, VmSize) in KiB, None if unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux clear_refs "5"), so a later VmHWM is this window's peak."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@contextlib.contextmanager
def running(root: Path, config: Path, weights_dir: Path, extra_env: dict[str, str] | None = None) -> Iterator[Server]:
    """A fresh server for one scenario, stopped however the scenario ends. It gets none of the
    caller's storage or proxy variables (WAN_S3_*, AWS_*, *_PROXY): only those in ``extra_env``."""
    layout = isolated_layout(root, model_config=config, weights_dir=weights_dir)
    try:
        start(layout, timeout_s=240, extra_env=extra_env, isolated=True)
        yield Server(layout)
    finally:
        stop(layout)


def _stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    ordered = sorted(values)
    return {"n": len(ordered), "p50": round(statistics.median(ordered), 4),
            "p95": round(ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)], 4),
            "max": round(ordered[-1], 4)}


# -- videos: what a 200 must carry --------------------------------------------------------------------


def answer_protocol(payload: Any) -> str:
    """How a JSON answer is wrapped (handler/envelopes.py): "v1", "v2" or "plain" (a plain answer
    has neither key)."""
    if isinstance(payload, dict) and "predictions" in payload:
        return "v1"
    if isinstance(payload, dict) and "outputs" in payload:
        return "v2"
    return "plain"


def unwrap_answer(payload: Any) -> Any:
    """The answer inside a KServe v1/v2 response (None if the wrapping is broken), or the payload."""
    try:
        if answer_protocol(payload) == "v1":
            [answer] = payload["predictions"]
            return answer
        if answer_protocol(payload) == "v2":
            [output] = payload["outputs"]
            [answer] = output["data"]
            return answer
    except (LookupError, TypeError, ValueError):
        return None
    return payload


def video_problem(response: requests.Response, expect: dict[str, int], output: str = "inline") -> str | None:
    """None when the 200 carries a valid H.264 MP4 of the expected size, else what is wrong."""
    from handler.video import probe_mp4

    try:
        if output == "mp4":
            mp4 = response.content
        else:
            if response.headers.get("Content-Type", "").startswith("application/x-ndjson"):
                lines = [json.loads(line) for line in response.text.splitlines() if line.strip()]
                if not lines or lines[-1].get("event") != "result":
                    return f"stream did not end with a result: {str(lines[-1:])[:200]}"
                result = lines[-1]
            else:
                result = unwrap_answer(response.json())
            video = result["video"]
            if "base64" in video:
                mp4 = base64.b64decode(video["base64"])
            else:
                # Only the campaign's own storage (moto on 127.0.0.1) may be fetched from.
                host = urlsplit(video["url"]).hostname
                if host != "127.0.0.1":
                    return f"video URL points at {host!r}, not 127.0.0.1: not downloaded ({str(video['url'])[:120]})"
                with local_session() as session:
                    download = session.get(video["url"], timeout=30)
                if download.status_code != 200:
                    return f"video URL answered {download.status_code}"
                mp4 = download.content
        info = probe_mp4(mp4)
    except Exception as exc:  # noqa: BLE001 - any failure to read the video is the finding
        return f"unreadable video ({type(exc).__name__}: {str(exc)[:120]})"
    got = {"width": info.width, "height": info.height, "num_frames": info.num_frames}
    wanted = {key: expect[key] for key in got if key in expect}
    if (info.codec, info.pix_fmt) != ("h264", "yuv420p") or any(got[k] != v for k, v in wanted.items()):
        return f"video is {info.codec}/{info.pix_fmt} {got}, expected h264/yuv420p {wanted}"
    return None


# -- load -------------------------------------------------------------------------------------------


def _resting_rss(server: Server, pid: int, count: int, label: str, problems: list[str]) -> int | None:
    """The worker's resting memory: the lowest RSS seen after each of ``count`` sequential small
    requests. The service trims the C heap after each request, so readings barely move (~1 MiB);
    the lowest of several is still the floor a leak would raise, whatever one reading caught."""
    readings = []
    for i in range(count):
        response = server.post({"prompt": f"{label} {i}", **SMALL, "seed": i, "output": "inline"})
        if response.status_code != 200:
            problems.append(f"{label} request answered {response.status_code}: {response.text[:200]}")
        value = proc_kib(pid, "VmRSS")
        if value is not None:
            readings.append(value)
    return min(readings) if readings else None


def run_load(server: Server, clients: int, requests_per_client: int, seed: int, max_rss_growth_mib: float,
             phases: int = 1, max_late_growth_mib: float | None = None, warmup: int = 10,
             max_seconds: float = 900.0) -> dict[str, Any]:
    """Many clients against a small queue. Every answer is a valid video or TorchServe's 503.

    The clients run in ``phases`` rounds; between rounds the worker's resting memory is read.
    With the C heap trimmed after each request (service.handle) it moves by ~1-2 MiB over a few
    hundred requests, where a leak of any request-sized buffer adds that much every request. So:
    the whole growth must stay under ``max_rss_growth_mib``, and the growth over the second half
    of the phases under ``max_late_growth_mib`` (a leak keeps climbing, a warm-up does not).

    Each request waits at most REQUEST_TIMEOUT_S; no request starts after ``max_seconds``. Every
    planned request is counted once: sent (then answered, or still waiting at the end: hung) or
    not sent, and a request not sent is a problem too (the plan was not carried out)."""
    problems: list[str] = []
    pid = server.ready_pid()
    if pid is None:
        return {"problems": ["no READY worker"]}
    rss_start = _resting_rss(server, pid, warmup, "warm-up", problems)
    frontend = server.frontend_pid()
    frontend_start = proc_kib(frontend, "VmRSS") if frontend else None

    per_phase = requests_per_client // phases
    requests_per_client = per_phase * phases
    samples: list[tuple[float, int]] = []
    stop_sampling = threading.Event()
    started = time.monotonic()

    def sample() -> None:
        while not stop_sampling.wait(0.2):
            value = proc_kib(pid, "VmRSS")
            if value is not None:
                samples.append((time.monotonic() - started, value))

    # Shared with the clients, under ``lock``: what was sent, what is waiting for its answer, what
    # came back. Once ``closed`` the counts are final: a late answer is not appended (its request
    # was counted as hung) and no client sends again.
    lock = threading.Lock()
    outcomes: list[dict[str, Any]] = []
    waiting: set[tuple[int, int]] = set()
    crashes: list[str] = []
    attempted = 0
    closed = False

    def client(index: int, phase: int) -> None:
        nonlocal attempted
        try:
            rng = random.Random(seed * 1000 + index * 10 + phase)
            with local_session() as session:
                for i in range(phase * per_phase, (phase + 1) * per_phase):
                    with lock:
                        if closed or time.monotonic() - started > max_seconds:
                            return
                        attempted += 1
                        waiting.add((index, i))
                    sent = time.monotonic()
                    outcome: dict[str, Any] = {"client": index, "sent": sent - started}
                    crash = None
                    try:
                        body = {"prompt": f"load {index}-{i}", **SMALL, "seed": index * 100_000 + i, "output": "inline"}
                        response = server.post(body, session=session)
                        outcome.update(status=response.status_code, seconds=time.monotonic() - sent)
                        if response.status_code == 200:
                            outcome["video_problem"] = video_problem(response, SMALL)
                        else:
                            outcome["body"] = response.text[:300]
                    except requests.RequestException as exc:
                        outcome.update(status=None, seconds=time.monotonic() - sent,
                                       error=f"{type(exc).__name__}: {exc}"[:300])
                    except Exception as exc:  # noqa: BLE001 - a client that breaks is a finding, not a silent stop
                        crash = f"client {index} broke on request {i}: {type(exc).__name__}: {exc}"[:300]
                        outcome.update(status=None, seconds=time.monotonic() - sent, error=crash)
                    outcome["done"] = time.monotonic() - started
                    with lock:
                        if closed:
                            return
                        waiting.discard((index, i))
                        outcomes.append(outcome)
                        if crash:
                            crashes.append(crash)
                    if crash:
                        return
                    if outcome.get("status") == 503:
                        time.sleep(rng.uniform(0.05, 0.25))  # a polite client backs off a little
        except Exception as exc:  # noqa: BLE001 - as above, outside a request
            with lock:
                crashes.append(f"client {index} broke: {type(exc).__name__}: {exc}"[:300])

    resting = [rss_start]
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    join_by = started + max_seconds + REQUEST_TIMEOUT_S + 10
    try:
        for phase in range(phases):
            threads = [threading.Thread(target=client, args=(i, phase), daemon=True) for i in range(clients)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(max(0.0, join_by - time.monotonic()))
            if any(thread.is_alive() for thread in threads):
                break
            resting.append(_resting_rss(server, pid, warmup, f"settle {phase}", problems))
    finally:
        with lock:
            closed = True
            answered = list(outcomes)
            sent, hung, crashed = attempted, len(waiting), list(crashes)
        stop_sampling.set()
        sampler.join(5)
    load_s = time.monotonic() - started

    rss_end = resting[-1]
    pid_after = server.ready_pid()

    ok = [o for o in answered if o.get("status") == 200]
    valid = [o for o in ok if o.get("video_problem") is None]
    rejected = [o for o in answered if o.get("status") == 503]
    other = [o for o in answered if o.get("status") not in (200, 503)]
    # Lost: requests sent that ended neither as a valid video nor as a 503 (hung ones included:
    # they are sent and have no outcome).
    lost = sent - len(valid) - len(rejected)
    # Not sent: the clients stopped early (past max_seconds on a slow machine, a client that
    # broke, or a hung one that ended the phases).
    unsent = clients * requests_per_client - sent
    # Most accepted requests in flight at once, as the clients saw it: each from its send to its
    # answer. A client-side figure (it includes the network and the answer's transfer); TorchServe
    # does not report what its queue held.
    events = sorted([(o["sent"], 1) for o in ok] + [(o["sent"] + o["seconds"], -1) for o in ok])
    in_flight = max_in_flight = 0
    for _, delta in events:
        in_flight += delta
        max_in_flight = max(max_in_flight, in_flight)
    # The worker's RSS under load (requests in flight): medians of the first and last quarter of
    # the samples, reported only. The bounds below apply to the resting readings between phases.
    quarter = max(1, len(samples) // 4)
    first = statistics.median(v for _, v in samples[:quarter]) if samples else None
    last = statistics.median(v for _, v in samples[-quarter:]) if samples else None
    growth_mib = (rss_end - rss_start) / 1024 if rss_end and rss_start else None

    if hung:
        problems.append(f"{hung} clients still waiting for an answer at the end")
    if lost:
        problems.append(f"{lost} requests lost (neither a valid video nor a 503)")
    problems.extend(crashed[:5])
    if unsent:
        problems.append(f"{unsent} of {clients * requests_per_client} requests not sent: the clients stopped early "
                        f"(past {max_seconds:.0f} s, or a client broke or hung)")
    for o in [o for o in ok if o.get("video_problem")][:5]:
        problems.append(f"accepted request with a bad video: {o['video_problem']}")
    for o in other[:5]:
        problems.append(f"unexpected answer {o.get('status')}: {o.get('body') or o.get('error')}")
    if not rejected:
        problems.append("no request was refused: the queue never overflowed, the test proves nothing")
    if not valid:
        problems.append("no request was accepted")
    slow_503 = [o["seconds"] for o in rejected if o["seconds"] > MAX_503_S]
    if slow_503:
        problems.append(f"{len(slow_503)} 503s took longer than {MAX_503_S} s (max {max(slow_503):.2f} s)")
    if rejected and ok:
        refused_s = statistics.median(o["seconds"] for o in rejected)
        served_s = statistics.median(o["seconds"] for o in ok)
        if refused_s > served_s / 5:
            problems.append(f"a 503 took {refused_s:.3f} s (median) against {served_s:.3f} s for a served request: "
                            "the refusals waited")
    bad_503 = [o for o in rejected if "ServiceUnavailableException" not in o.get("body", "")]
    if bad_503:
        problems.append(f"503 that is not TorchServe's queue-full answer: {bad_503[0].get('body')}")
    late_mib = None
    if None not in resting and phases >= 2:
        late_mib = (resting[-1] - resting[len(resting) // 2]) / 1024
    if growth_mib is None:
        problems.append("could not read the worker's memory")
    elif growth_mib > max_rss_growth_mib:
        problems.append(f"worker RSS grew by {growth_mib:.1f} MiB over the load (bound {max_rss_growth_mib} MiB)")
    if max_late_growth_mib is not None and late_mib is not None and late_mib > max_late_growth_mib:
        problems.append(f"worker RSS still grew by {late_mib:.1f} MiB over the second half of the load "
                        f"(bound {max_late_growth_mib} MiB): a leak, not the allocator settling")
    if pid_after != pid:
        problems.append(f"the worker changed during the load ({pid} -> {pid_after})")
    return {
        "clients": clients,
        "requests_per_client": requests_per_client,
        "sent": sent,
        "accepted": len(ok),
        "completed_valid": len(valid),
        "rejected_503": len(rejected),
        "other_status": dict(Counter(str(o.get("status")) for o in other)),
        "lost": lost,
        "hung_clients": hung,
        "not_sent_time_limit": unsent,
        "client_crashes": len(crashed),
        "seconds": round(load_s, 2),
        "max_accepted_in_flight": max_in_flight,
        "latency_s": {"accepted": _stats([o["seconds"] for o in ok]), "503": _stats([o["seconds"] for o in rejected])},
        "phases": phases,
        "worker_rss_mib": {
            "after_warmup": round(rss_start / 1024, 1) if rss_start else None,
            "after_load": round(rss_end / 1024, 1) if rss_end else None,
            "resting_after_each_phase": [round(v / 1024, 1) if v else None for v in resting],
            "growth": round(growth_mib, 1) if growth_mib is not None else None,
            "growth_second_half": round(late_mib, 1) if late_mib is not None else None,
            "late_bound": max_late_growth_mib,
            "growth_kib_per_accepted_request": round(growth_mib * 1024 / len(ok), 1) if growth_mib and ok else None,
            "bound": max_rss_growth_mib,
            "first_quarter_median": round(first / 1024, 1) if first else None,
            "last_quarter_median": round(last / 1024, 1) if last else None,
            "peak": round(max(v for _, v in samples) / 1024, 1) if samples else None,
        },
        "frontend_rss_mib": {
            "before": round(frontend_start / 1024, 1) if frontend_start else None,
            "after": round((proc_kib(frontend, "VmRSS") or 0) / 1024, 1) if frontend else None,
        },
        "worker_pid_unchanged": pid_after == pid,
        "problems": problems,
    }


# -- faults: SIGKILL ----------------------------------------------------------------------------------


def run_kill_streamed(server: Server) -> dict[str, Any]:
    """Kill the worker after the first progress line of a streamed request, through the project's
    client (what a user sees), then wait for a new worker and send the next request."""
    from scripts.client import ServerError, WanClient

    problems: list[str] = []
    pid, _ = server.wait_ready()
    if pid is None:
        return {"problems": ["no READY worker before the kill"]}
    client = WanClient(server.layout.inference_url, key=read_key(server.layout.key_file), timeout_s=60)
    client.session.trust_env = False  # straight to 127.0.0.1, as every client of the campaign
    progress: list[dict[str, Any]] = []
    killed_at: list[float] = []

    def on_progress(event: dict[str, Any]) -> None:
        progress.append(event)
        if not killed_at:
            os.kill(pid, signal.SIGKILL)
            killed_at.append(time.monotonic())

    outcome: dict[str, Any] = {}
    try:
        result = client.generate({"prompt": "killed mid-stream", **BIG, "num_inference_steps": 20, "seed": 1},
                                 on_progress)
        outcome = {"raised": None, "video_bytes": len(result.mp4)}
        problems.append("the request succeeded although its worker was killed")
    except ServerError as exc:
        cause = exc.__cause__ or exc.__context__
        outcome = {"raised": "ServerError", "status": exc.status, "message": str(exc),
                   "cause": f"{type(cause).__name__}: {str(cause)[:160]}" if cause else None}
        # TorchServe had started the stream (200) and resets it: the client must say it broke off,
        # not pass for an answer of the server's.
        if "stream broke off" not in str(exc):
            problems.append(f"the client's error does not say the stream broke off: {str(exc)[:200]}")
    except Exception as exc:  # noqa: BLE001 - anything else is an unclear failure: the finding
        outcome = {"raised": type(exc).__name__, "message": str(exc)[:300]}
        problems.append(f"the client raised {type(exc).__name__}, not a ServerError: {str(exc)[:200]}")
    seen_s = time.monotonic() - killed_at[0] if killed_at else None
    if not killed_at:
        problems.append("no progress line arrived: nothing was killed")
    new_pid, recovery_s = server.wait_ready(120.0, not_pid=pid)
    after = _next_request(server, problems)
    if new_pid is None:
        problems.append("no new worker within 120 s")
    return {"mode": "streamed", "old_pid": pid, "new_pid": new_pid, "progress_lines_before_kill": len(progress),
            "client_saw": outcome, "seconds_kill_to_client_error": round(seen_s, 3) if seen_s is not None else None,
            "recovery_s": round(recovery_s, 2), "next_request": after, "problems": problems}


def run_kill_plain(server: Server, after_s: float = 1.0) -> dict[str, Any]:
    """Kill the worker ``after_s`` into a ~10 s non-streamed generation; record TorchServe's answer."""
    problems: list[str] = []
    pid, _ = server.wait_ready()
    if pid is None:
        return {"problems": ["no READY worker before the kill"]}
    answer: dict[str, Any] = {}

    def send() -> None:
        sent = time.monotonic()
        try:
            response = server.post({"prompt": "killed mid-generation", **BIG, "num_inference_steps": 20, "seed": 2},
                                   timeout=60)
            answer.update(status=response.status_code, body=response.text[:300], seconds=time.monotonic() - sent)
        except requests.RequestException as exc:
            answer.update(status=None, error=f"{type(exc).__name__}: {exc}"[:300], seconds=time.monotonic() - sent)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    time.sleep(after_s)
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    thread.join(90)
    seen_s = time.monotonic() - killed
    if thread.is_alive():
        problems.append("the client got no answer within 90 s of the kill")
    elif answer.get("status") is None or answer["status"] < 500 or "Worker died" not in answer.get("body", ""):
        problems.append(f"unclear answer to a killed request: {answer}")
    new_pid, recovery_s = server.wait_ready(120.0, not_pid=pid)
    after = _next_request(server, problems)
    if new_pid is None:
        problems.append("no new worker within 120 s")
    return {"mode": "plain", "old_pid": pid, "new_pid": new_pid, "killed_after_s": after_s,
            "client_saw": {k: (round(v, 3) if isinstance(v, float) else v) for k, v in answer.items()},
            "seconds_kill_to_client_error": round(seen_s, 3), "recovery_s": round(recovery_s, 2),
            "next_request": after, "problems": problems}


def _next_request(server: Server, problems: list[str], **fields: Any) -> dict[str, Any]:
    """After a fault: the next small request must succeed with a valid video."""
    try:
        response = server.post({"prompt": "the next request", **SMALL, "seed": 3, "output": "inline", **fields})
    except requests.RequestException as exc:
        problems.append(f"the next request failed: {exc}")
        return {"status": None}
    issue = video_problem(response, SMALL) if response.status_code == 200 else response.text[:200]
    if response.status_code != 200 or issue:
        problems.append(f"the next request answered {response.status_code}: {issue}")
    return {"status": response.status_code, "valid_video": response.status_code == 200 and issue is None}


# -- faults: out of memory ----------------------------------------------------------------------------

# Address space the worker may add over its current size during the OOM request: enough for a
# small allocation (text encoding, the error answer), far below what the BIG request needs.
OOM_HEADROOM_MIB = 160


def run_oom(server: Server, retry_big: bool = False) -> dict[str, Any]:
    """Real out-of-memory on CPU: lower the worker's RLIMIT_AS, send the largest request."""
    problems: list[str] = []
    pid, _ = server.wait_ready()
    if pid is None:
        return {"problems": ["no READY worker"]}
    # A small request first, so the worker's resting memory is read warm.
    before = server.post({"prompt": "before the OOM", **SMALL, "seed": 4, "output": "inline"})
    before_issue = video_problem(before, SMALL) if before.status_code == 200 else before.text[:200]
    if before.status_code != 200 or before_issue:
        problems.append(f"the request before the OOM answered {before.status_code}: {before_issue}")
    rss_before, vm_size = proc_kib(pid, "VmRSS"), proc_kib(pid, "VmSize")
    if rss_before is None or vm_size is None:
        return {"pid": pid, "problems": problems + [f"could not read the worker's memory (/proc/{pid}/status)"]}
    soft, hard = resource.prlimit(pid, resource.RLIMIT_AS)
    limit = vm_size * 1024 + OOM_HEADROOM_MIB * MIB
    # VmHWM is this request's peak only if it could be reset; otherwise it is not reported.
    can_peak = reset_peak_rss(pid)
    answer: dict[str, Any] = {}
    try:
        resource.prlimit(pid, resource.RLIMIT_AS, (limit, hard))
        sent = time.monotonic()
        response = server.post({"prompt": "more than the worker may have", **BIG, "num_inference_steps": 1, "seed": 4,
                                "output": "inline"}, timeout=REQUEST_TIMEOUT_S)
        answer = {"status": response.status_code, "seconds": round(time.monotonic() - sent, 2)}
        try:
            answer["error"] = response.json().get("error")
        except ValueError:
            answer["body"] = response.text[:300]
    except requests.RequestException as exc:
        answer = {"status": None, "error": f"{type(exc).__name__}: {exc}"[:300]}
    finally:
        with contextlib.suppress(ProcessLookupError):
            resource.prlimit(pid, resource.RLIMIT_AS, (soft, hard))
    rss_after, peak = proc_kib(pid, "VmRSS"), proc_kib(pid, "VmHWM") if can_peak else None
    pid_after = server.ready_pid()
    error = answer.get("error") if isinstance(answer.get("error"), dict) else {}
    if answer.get("status") != 507 or error.get("type") != "out_of_memory":
        problems.append(f"expected 507 out_of_memory, got {answer}")
    if pid_after != pid:
        problems.append(f"the worker changed ({pid} -> {pid_after}): the OOM killed it")
    released_mib = None
    if rss_after is not None and rss_before is not None:
        released_mib = (rss_after - rss_before) / 1024
        # What is left over must be small next to what the request needed (~700 MiB).
        if released_mib > 64:
            problems.append(f"worker RSS stayed {released_mib:.0f} MiB above where it was: memory not released")
    elif pid_after == pid:
        problems.append("could not read the worker's memory after the OOM")
    after = _next_request(server, problems)
    big_after = None
    if retry_big:
        response = server.post({"prompt": "the same request with memory", **BIG, "num_inference_steps": 1, "seed": 4,
                                "output": "inline"}, timeout=REQUEST_TIMEOUT_S)
        big_after = {"status": response.status_code,
                     "video_problem": video_problem(response, BIG) if response.status_code == 200 else response.text[:200]}
        if response.status_code != 200 or big_after["video_problem"]:
            problems.append(f"the big request failed with the limit restored: {big_after}")
    return {"pid": pid, "limit_mib_over_vmsize": OOM_HEADROOM_MIB, "client_saw": answer,
            "worker_rss_mib": {"before": round(rss_before / 1024, 1), "peak_during": round(peak / 1024, 1) if peak else None,
                               "after": round(rss_after / 1024, 1) if rss_after else None,
                               "left_over": round(released_mib, 1) if released_mib is not None else None},
            "worker_pid_unchanged": pid_after == pid, "next_request": after, "big_request_after": big_after,
            "problems": problems}


# -- faults: deadline -----------------------------------------------------------------------------------


def run_deadline(server: Server, stream: bool = False) -> dict[str, Any]:
    """A request of many seconds on a server whose deadline is DEADLINE_S (2 s) and responseTimeout
    DEADLINE_RESPONSE_TIMEOUT_S (10 s): it must stop itself (504, or an error line in a stream)
    before TorchServe's timeout, and the worker must stay."""
    problems: list[str] = []
    pid, _ = server.wait_ready()
    if pid is None:
        return {"problems": ["no READY worker"]}
    sent = time.monotonic()
    response = server.post({"prompt": "a very long video", **LONG, "seed": 5, "output": "inline", "stream": stream},
                           timeout=60)
    seconds = time.monotonic() - sent
    ndjson = response.headers.get("Content-Type", "").startswith("application/x-ndjson")
    try:
        lines = [json.loads(line) for line in response.text.splitlines() if line.strip()] if ndjson else []
        error = (lines[-1].get("error", {}) if lines and lines[-1].get("event") == "error"
                 else {} if ndjson else response.json().get("error", {}))
    except ValueError:
        lines, error = [], {}
    progress = sum(1 for line in lines if line.get("event") == "progress")
    # Streamed: once progress lines went out with a 200, the error is the stream's last line; a
    # first step slower than the deadline (a busy machine) stops before any line: a plain 504.
    status_ok = (response.status_code == 504 and not ndjson) or (
        stream and response.status_code == 200 and ndjson and progress > 0)
    message = error.get("message", "")
    if not status_ok or error.get("type") != "deadline_exceeded" or "stopped after step" not in message:
        problems.append(f"expected deadline_exceeded naming the step, got {response.status_code}: {response.text[-300:]}")
    if seconds >= DEADLINE_RESPONSE_TIMEOUT_S:
        problems.append(f"took {seconds:.1f} s: not before TorchServe's {DEADLINE_RESPONSE_TIMEOUT_S} s timeout")
    pid_after = server.ready_pid()
    if pid_after != pid:
        problems.append(f"the worker changed ({pid} -> {pid_after}): TorchServe killed it")
    # One step: the deadline is checked between steps only, so a busy machine cannot fail it.
    after = _next_request(server, problems, num_inference_steps=1)
    return {"stream": stream, "status": response.status_code, "message": message, "progress_lines": progress,
            "seconds": round(seconds, 2), "deadline_s": DEADLINE_S, "response_timeout_s": DEADLINE_RESPONSE_TIMEOUT_S,
            "worker_pid_unchanged": pid_after == pid, "next_request": after, "problems": problems}


def run_timeout_control(server: Server) -> dict[str, Any]:
    """What the deadline protects from, shown on purpose. Two requests of one denoising step (the
    deadline is only checked between steps: it cannot stop them) whose VAE decode outlasts
    responseTimeout, sent 0.5 s apart: the first runs, the second waits in the queue. TorchServe
    must cut each at responseTimeout with its ``Worker died.``, killing the worker under it, and
    the second's clock only starts when a new worker takes it (so it waits over two timeouts).
    Then a small request, which the new worker must serve: three requests in all."""
    problems: list[str] = []
    pid, _ = server.wait_ready()
    if pid is None:
        return {"problems": ["no READY worker before the control"]}
    answers: list[dict[str, Any]] = []
    lock = threading.Lock()

    def send(index: int) -> None:
        sent = time.monotonic()
        try:
            response = server.post({"prompt": f"one step, long decode {index}", **LONG, "num_inference_steps": 1,
                                    "output": "inline"}, timeout=120)
            answer = {"status": response.status_code, "body": response.text[:200]}
        except requests.RequestException as exc:
            answer = {"status": None, "body": f"{type(exc).__name__}: {exc}"[:200]}
        with lock:
            answers.append({"request": index, **answer, "seconds": round(time.monotonic() - sent, 2)})

    threads = [threading.Thread(target=send, args=(i,), daemon=True) for i in range(2)]
    for thread in threads:
        thread.start()
        time.sleep(0.5)  # the first one in the worker, the second one queued
    for thread in threads:
        thread.join(150)
    with lock:
        got = sorted(answers, key=lambda a: a["request"])
    timeout_s = DEADLINE_RESPONSE_TIMEOUT_S
    if len(got) < len(threads):
        problems.append(f"{len(threads) - len(got)} of the control's requests got no answer within 150 s")
    cut = [a for a in got if (a["status"] or 0) >= 500 and "Worker died" in a["body"]]
    for answer in got:
        if answer not in cut:
            problems.append(f"request {answer['request']} was not cut by TorchServe's responseTimeout: "
                            f"{answer['status']} {answer['body'][:160]}")
    by_time = sorted(cut, key=lambda a: a["seconds"])
    if by_time and by_time[0]["seconds"] < timeout_s - 0.5:
        problems.append(f"a request ended after {by_time[0]['seconds']} s, before the {timeout_s} s responseTimeout: "
                        "something else stopped it")
    if len(by_time) == 2 and by_time[1]["seconds"] < 2 * timeout_s - 1:
        problems.append(f"the queued request ended after {by_time[1]['seconds']} s, not after two {timeout_s} s "
                        "timeouts and a restart")
    new_pid, _ = server.wait_ready(120.0, not_pid=pid)
    if new_pid is None:
        problems.append(f"the worker ({pid}) was not replaced within 120 s")
    after = _next_request(server, problems, num_inference_steps=1)
    return {"response_timeout_s": timeout_s, "answers": got, "old_pid": pid, "new_pid": new_pid,
            "worker_killed_by_torchserve": new_pid is not None and len(cut) == len(threads),
            "next_request": after, "problems": problems}


# -- hostile images -------------------------------------------------------------------------------------


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def image_bytes(width: int, height: int, fmt: str = "PNG", color=(10, 120, 200)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, fmt)
    return buffer.getvalue()


def png_header_bomb(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height over a few hundred bytes of data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(bytes(4096), 9))
            + _png_chunk(b"IEND", b""))


def png_deflate_bomb(side: int) -> bytes:
    """A complete, valid greyscale PNG of side x side zeros: ~side^2 / 1000 bytes of file."""
    compressor = zlib.compressobj(9)
    row = bytes(side + 1)
    data = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b"")


def png_text_bomb(kind: bytes = b"zTXt") -> bytes:
    """A real 64x64 PNG with a compressed text (or ICC) chunk that inflates to 64 MiB."""
    compressor = zlib.compressobj(9)
    bomb = compressor.compress(bytes(64 * MIB)) + compressor.flush()
    raw = image_bytes(64, 64)
    return raw[:33] + _png_chunk(kind, b"Comment\0\0" + bomb) + raw[33:]


def jpeg_claiming(width: int, height: int) -> bytes:
    """A real 32x32 JPEG whose frame header (SOF0) is patched to claim width x height."""
    raw = bytearray(image_bytes(32, 32, "JPEG"))
    sof = raw.index(b"\xff\xc0")
    raw[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(raw)


def webp_claiming(width: int, height: int) -> bytes:
    """A lossless WebP header (VP8L) claiming width x height, with no image data after it."""
    data = b"\x2f" + struct.pack("<I", (width - 1) | ((height - 1) << 14)) + bytes(32)
    chunk = b"VP8L" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


# Who refuses a hostile image: the handler (our JSON error naming the field), or TorchServe's
# frontend before any worker sees the body (over max_request_size: its own answer, not ours).
HANDLER, FRONTEND = "handler", "frontend"


def hostile_images() -> list[tuple[str, Any, tuple[int, ...], str]]:
    """(name, image field value, accepted statuses, who refuses it: HANDLER or FRONTEND). Each must
    be refused fast, from headers."""
    png = image_bytes(200, 200)
    jpeg = image_bytes(200, 200, "JPEG")
    cases = [
        ("png header claims 65535x65535", b64(png_header_bomb(65535, 65535)), (400,)),
        ("png header claims 100000x200", b64(png_header_bomb(100000, 200)), (400,)),
        ("png header claims 5000x5000 (over our limit, under PIL's)", b64(png_header_bomb(5000, 5000)), (400,)),
        ("png deflate bomb 10000x10000 (100 MB of pixels, ~100 KB of file)", b64(png_deflate_bomb(10000)), (400,)),
        ("png zTXt chunk inflating to 64 MiB", b64(png_text_bomb(b"zTXt")), (400,)),
        ("png iCCP chunk inflating to 64 MiB", b64(png_text_bomb(b"iCCP")), (400,)),
        ("jpeg header claims 65000x65000", b64(jpeg_claiming(65000, 65000)), (400,)),
        ("jpeg header claims 5000x5000", "data:image/jpeg;base64," + b64(jpeg_claiming(5000, 5000)), (400,)),
        ("webp header claims 16383x16383", b64(webp_claiming(16383, 16383)), (400,)),
        ("png truncated in its header", b64(png[:30]), (400,)),
        ("png truncated in its pixel data", b64(png[: len(png) // 2]), (400,)),
        ("jpeg truncated in its pixel data", b64(jpeg[: len(jpeg) // 2]), (400,)),
        ("png magic, then garbage", b64(b"\x89PNG\r\n\x1a\n" + random.Random(1).randbytes(2000)), (400,)),
        ("jpeg magic, then garbage", b64(b"\xff\xd8\xff" + random.Random(2).randbytes(2000)), (400,)),
        ("GIF", b64(b"GIF89a" + bytes(100)), (400,)),
        ("BMP", b64(image_bytes(64, 64, "BMP")), (400,)),
        ("TIFF", b64(image_bytes(64, 64, "TIFF")), (400,)),
        ("PDF", b64(b"%PDF-1.7\n" + bytes(100)), (400,)),
        ("SVG as a data URL", "data:image/svg+xml;base64," + b64(b'<svg xmlns="http://www.w3.org/2000/svg"/>'), (400,)),
        ("SVG bytes with a png data URL", "data:image/png;base64," + b64(b'<svg xmlns="http://www.w3.org/2000/svg"/>'),
         (400,)),
        ("1x1 png", b64(image_bytes(1, 1)), (400,)),
        ("empty", "", (400,)),
        ("broken base64", "iVBORw0KGgo!!!!", (400,)),
        ("base64 with bad padding", b64(png)[:-3], (400,)),
        ("data URL without base64", "data:image/png,abc", (400,)),
        ("remote URL (SSRF)", "http://169.254.169.254/latest/meta-data/", (400,)),
        ("file URL", "file:///etc/passwd", (400,)),
        ("not a string", {"url": "x"}, (400,)),
        # Over the handler's 16 MiB image limit, under TorchServe's 24 MiB body limit: refused
        # by the text length before any base64 is decoded.
        ("17 MiB image as base64 (22.7 MB)", b64(b"\x89PNG\r\n\x1a\n" + bytes(17 * MIB)), (413,)),
    ]
    return [(*case, HANDLER) for case in cases] + [
        # Over TorchServe's max_request_size: refused by the frontend, the worker never sees it.
        ("26 MiB of base64 (over max_request_size)", "A" * (26 * MIB), (413,), FRONTEND),
    ]


def run_images(server: Server) -> dict[str, Any]:
    problems: list[str] = []
    pid, _ = server.wait_ready()
    if pid is None:
        return {"problems": ["no READY worker"]}
    cases = []
    for name, value, expected, refused_by in hostile_images():
        rss_before = proc_kib(pid, "VmRSS")
        can_peak = reset_peak_rss(pid)
        sent = time.monotonic()
        response = server.post({"prompt": "a hostile image", **SMALL, "image": value}, timeout=60)
        seconds = time.monotonic() - sent
        peak = proc_kib(pid, "VmHWM") if can_peak else None
        growth_mib = (peak - rss_before) / 1024 if peak and rss_before else None
        try:
            payload = response.json()
        except ValueError:
            payload = None
        error = payload.get("error") if isinstance(payload, dict) else None
        error = error if isinstance(error, dict) else {}
        # The big bodies the worker gets cost their own size to receive and parse as JSON
        # (TorchServe's Python side reads and json-decodes them); everything else must cost
        # almost nothing in the worker, and what the frontend refuses never reaches it.
        big = isinstance(value, str) and len(value) > MIB
        case = {"name": name, "status": response.status_code, "seconds": round(seconds, 3), "big_body": big,
                "refused_by": refused_by, "field": error.get("field"),
                "message": (error.get("message") or response.text)[:160],
                "worker_peak_growth_mib": round(growth_mib, 1) if growth_mib is not None else None}
        cases.append(case)
        if response.status_code not in expected:
            problems.append(f"{name}: {response.status_code} {response.text[:200]}")
        elif refused_by == HANDLER and not (error.get("field") == "image" and error.get("type")
                                            and isinstance(error.get("message"), str) and error["message"]):
            problems.append(f"{name}: refused without our JSON error naming the image field: {response.text[:200]}")
        elif refused_by == FRONTEND and error:
            problems.append(f"{name}: refused by the handler, so the worker received a body over max_request_size: "
                            f"{response.text[:200]}")
        if seconds > MAX_REFUSAL_S:
            problems.append(f"{name}: took {seconds:.2f} s")
        if growth_mib is not None and (not big or refused_by == FRONTEND) and growth_mib > 32:
            problems.append(f"{name}: worker peak memory grew {growth_mib:.0f} MiB: something was decoded")
    pid_after = server.ready_pid()
    if pid_after != pid:
        problems.append(f"the worker changed ({pid} -> {pid_after})")
    _next_request(server, problems)
    # None when no peak could be read (clear_refs refused): not a growth of 0.
    small_growth = [c["worker_peak_growth_mib"] for c in cases
                    if not c["big_body"] and c["worker_peak_growth_mib"] is not None]
    return {"tried": len(cases), "refused_4xx": sum(400 <= c["status"] < 500 for c in cases),
            "max_seconds": max(c["seconds"] for c in cases),
            "max_worker_peak_growth_mib_small_bodies": max(small_growth) if small_growth else None,
            "worker_pid_unchanged": pid_after == pid, "cases": cases, "problems": problems}


# -- fuzzing the running server ------------------------------------------------------------------------------

_RAW = "\x00raw:"  # marks a JSON token inserted verbatim (NaN, huge numbers, deep nesting)


def _raw(text: str) -> str:
    return f"{_RAW}{text}"


def _dump(value: Any) -> str:
    """json.dumps, with _raw(...) strings replaced by their verbatim text."""
    tokens: list[str] = []

    def swap(item: Any) -> Any:
        if isinstance(item, str) and item.startswith(_RAW):
            tokens.append(item[len(_RAW):])
            return f"@@RAW{len(tokens) - 1}@@"
        if isinstance(item, dict):
            return {key: swap(v) for key, v in item.items()}
        if isinstance(item, list):
            return [swap(v) for v in item]
        return item

    text = json.dumps(swap(value))
    for index, token in enumerate(tokens):
        text = text.replace(f'"@@RAW{index}@@"', token, 1)
    return text


FIELDS = ("prompt", "negative_prompt", "image", "width", "height", "num_frames", "fps", "num_inference_steps",
          "guidance_scale", "guidance_scale_2", "seed", "output", "stream")


class BodyFuzzer:
    """A seeded generator of request bodies, from valid to hostile, as (kind, bytes, content type)."""

    KINDS = (("valid", 14), ("bad_value", 34), ("structure", 10), ("random_json", 8), ("deep", 6),
             ("text", 10), ("bytes", 8), ("image", 6), ("content_type", 4), ("kserve", 8))

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.small_images = [b64(image_bytes(w, h, fmt)) for (w, h, fmt) in
                             ((16, 16, "PNG"), (48, 32, "JPEG"), (40, 64, "WEBP"), (128, 96, "PNG"))]
        self.deep_depths = iter(range(850, 1010))
        self.hostile_image_values = [value for _, value, _, _ in hostile_images() if not (
            isinstance(value, str) and len(value) > MIB)]

    def text(self, max_len: int = 60) -> str:
        rng = self.rng
        alphabets = ["abcdefghijklmnopqrstuvwxyz ", "日本語の猫が走る ", "😀🦊🌊🎬 ", "\u202e\u200b\u00ad\ufeff",
                     "\x00\x01\x1f\x7f", "\ud800\udfff\udbff", "'\"\\{}[]<>%$;", "Ω≈ç√∫˜µ≤≥÷"]
        weights = [20, 3, 3, 1, 1, 1, 2, 2]
        alphabet = rng.choices(alphabets, weights)[0]
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(1, max_len)))

    def valid(self) -> dict[str, Any]:
        rng = self.rng
        body: dict[str, Any] = {"prompt": "a " + self.text(40)}
        if rng.random() < 0.6:
            width, height = rng.choice([(128, 128), (96, 128), (128, 96), (64, 64), (32, 128), (128, 32), (32, 32)])
            body.update(width=width, height=height)
        options = {
            "negative_prompt": lambda: self.text(30) if rng.random() < 0.8 else "",
            "num_frames": lambda: rng.choice([1, 5, 9]),
            "fps": lambda: rng.randint(1, 60),
            "num_inference_steps": lambda: rng.choice([1, 2]),
            "guidance_scale": lambda: rng.choice([0, 1, 1.0, 5.0, 20, rng.uniform(0, 20)]),
            "seed": lambda: rng.choice([0, 1, 2**63 - 1, rng.randrange(2**63)]),
            "output": lambda: rng.choice(["url", "inline", "mp4"]),
            "stream": lambda: rng.random() < 0.3,
            "image": lambda: rng.choice(self.small_images) if rng.random() < 0.7 else
            "data:image/png;base64," + self.small_images[0],
        }
        for name, make in options.items():
            if rng.random() < 0.35:
                body[name] = make()
        if body.get("stream") and body.get("output") == "mp4":
            body["output"] = "inline"
        for name in rng.sample(FIELDS, 2) if rng.random() < 0.1 else ():
            body.setdefault(name, None)  # null means absent
        return body

    def hostile_value(self) -> Any:
        rng = self.rng
        pool = [
            None, True, False, 0, -1, 1, 2, 3, 5, 8, 9, 10, 13, 31, 32, 33, 64, 96, 127, 128, 129, 160, 256, 4096,
            2**31, 2**53 + 1, 2**63, 2**64, -2**63, 10**30, 1.0, 1.5, -0.0, 0.1, 1e-308, 5e-324, 1e308, -1e308,
            _raw("NaN"), _raw("Infinity"), _raw("-Infinity"), _raw("1e999"), _raw("-1e999"), _raw("1" * 5000),
            _raw("1" * 4300), _raw("0." + "1" * 5000), _raw("1E+400"), _raw("-0"),
            "", " ", "128", "0x80", "１２８", "1e3", "true", "null", "NaN", "url", "URL", "inline ", "mp4\x00",
            "x" * 4001, "x" * 4000, "\x00", "\ud800", "a\udfffb", "😀" * 10, "\u202eevil", "<script>alert(1)</script>",
            "'; DROP TABLE videos; --", "{{7*7}}", "%s%s%n", "../../etc/passwd", "http://169.254.169.254/",
            "s3://bucket/key", "file:///etc/passwd", "data:image/png;base64,", "data:,", [], [128], [[]], {}, {"a": 1},
            {"width": 128}, [None] * 100, list(range(1000)), {"x" * 100: "y"},
        ]
        return rng.choice(pool)

    def kserve_body(self) -> dict[str, Any]:
        """A KServe v1 or v2 body (handler/envelopes.py), well-formed or broken in one place."""
        rng = self.rng
        request: dict[str, Any] = self.valid()
        if rng.random() < 0.3:
            request[rng.choice(FIELDS)] = self.hostile_value()
        broken = rng.random() < 0.5
        if rng.random() < 0.5:
            instances: Any = [request]
            extra: dict[str, Any] = {}
            if broken:
                choice = rng.randrange(4)
                instances = {0: request, 1: [], 2: [request, request], 3: self.hostile_value()}[choice]
                extra = {"signature_name": "serving_default"} if rng.random() < 0.3 else {}
            return {"instances": instances, **extra}
        item: dict[str, Any] = {"name": "request", "datatype": "BYTES", "shape": [1],
                                "data": [_dump(request) if rng.random() < 0.8 else request]}
        body: dict[str, Any] = {"inputs": [item]}
        if rng.random() < 0.5:
            body["id"] = self.text(20)
        if broken:
            choice = rng.randrange(6)
            if choice == 0:
                item[rng.choice(["name", "datatype", "shape", "data"])] = self.hostile_value()
            elif choice == 1:
                item.pop(rng.choice(["name", "datatype", "shape"]))
            elif choice == 2:
                item["data"] = [_dump(request)] * 2
            elif choice == 3:
                body["inputs"] = rng.choice([[], [item, item], self.hostile_value()])
            elif choice == 4:
                body["id"] = self.hostile_value()
            else:
                body[rng.choice(["parameters", "outputs"])] = {"x": 1}
        return body

    def nested(self, depth: int, kind: str) -> str:
        return _raw(("[" * depth + "]" * depth) if kind == "list" else ('{"a":' * depth + "1" + "}" * depth))

    def case(self) -> tuple[str, bytes, str | None, dict[str, Any] | None]:
        """(kind, body bytes, content type, form fields for multipart/urlencoded or None)."""
        rng = self.rng
        kind = rng.choices([k for k, _ in self.KINDS], [w for _, w in self.KINDS])[0]
        content_type: str | None = "application/json"
        if kind == "valid":
            return kind, _dump(self.valid()).encode(), content_type, None
        if kind == "bad_value":
            body = self.valid()
            for _ in range(rng.choice([1, 1, 1, 2, 3])):
                body[rng.choice(FIELDS)] = self.hostile_value()
            return kind, _dump(body).encode(), content_type, None
        if kind == "structure":
            body = self.valid()
            choice = rng.randrange(7)
            if choice == 0:
                body.pop("prompt", None)
            elif choice == 1:
                body[rng.choice(["promt", "Prompt", "width ", "steps", "instances", "body", "data", "", "\ud800",
                                 "x" * 300])] = 1
            elif choice == 2:
                body.pop("height", None)
                body["width"] = 128
            elif choice == 3:
                return kind, b'{"prompt": "x", "prompt": ' + _dump(self.hostile_value()).encode() + b"}", content_type, None
            elif choice == 4:
                body = {name: self.hostile_value() for name in rng.sample(FIELDS, rng.randint(1, len(FIELDS)))}
            elif choice == 5:
                body = {f"k{i}": i for i in range(rng.choice([50, 1000, 5000]))} | {"prompt": "x"}
            else:
                body = {"instances": [body]} if rng.random() < 0.5 else {"inputs": [{"name": "x", "data": body}]}
            return kind, _dump(body).encode(), content_type, None
        if kind == "kserve":
            return kind, _dump(self.kserve_body()).encode(), content_type, None
        if kind == "random_json":
            return kind, _dump(self.random_json(4)).encode(), content_type, None
        if kind == "deep":
            depth = next(self.deep_depths, None) or rng.randint(850, 1010)
            shape = rng.choice(["list", "dict"])
            where = rng.choice(["width", "num_frames", "guidance_scale", "output", "stream", "seed", "prompt", "image",
                                "body", "unknown"])
            if where == "body":
                return kind, self.nested(depth, shape)[len(_RAW):].encode(), content_type, None
            body = {"prompt": "deep", **SMALL}
            if where == "width":
                body["height"] = 128
            body["zzz" if where == "unknown" else where] = self.nested(depth, shape)
            return kind, _dump(body).encode(), content_type, None
        if kind == "text":
            valid = _dump(self.valid())
            choice = rng.randrange(9)
            text = {
                0: valid[: rng.randrange(max(1, len(valid)))],
                1: valid + rng.choice(["}", "]", ",", " x", "\x00"]),
                2: rng.choice(["NaN", "Infinity", "null", "true", "0", '"string"', "[]", "{}", ""]),
                3: "\ufeff" + valid,
                4: valid.replace('"', "'"),
                5: '{"prompt": "x", "width": ' + "9" * rng.choice([20, 400, 4301, 10000]) + ', "height": 128}',
                6: json.dumps(valid),  # JSON text of a JSON string holding a request
                7: " " * rng.randint(0, 1000) + "\n\t",
                8: "".join(rng.choice('{}[]":,0123456789.eE+-truefalsnul \\u') for _ in range(rng.randint(1, 300))),
            }[choice]
            data = text.encode("utf-16" if rng.random() < 0.05 else "utf-8", errors="surrogatepass")
            return kind, data, content_type, None
        if kind == "bytes":
            data = rng.randbytes(rng.choice([0, 1, 7, 64, 1024, 65536]))
            return kind, data, rng.choice(["application/json", None, "application/octet-stream", "text/plain"]), None
        if kind == "image":
            body = {"prompt": "a hostile image", **SMALL}
            body["image"] = rng.choice(self.hostile_image_values + [self.hostile_value(), b64(rng.randbytes(500)),
                                                                    "data:image/png;base64," + b64(rng.randbytes(300))])
            return kind, _dump(body).encode(), content_type, None
        # content_type: a valid request under other content types and encodings
        body = self.valid()
        choice = rng.randrange(5)
        if choice == 0:
            return kind, _dump(body).encode(), "text/plain", None
        if choice == 1:
            return kind, _dump(body).encode(), "application/octet-stream", None
        if choice == 2:
            return kind, _dump(body).encode(), None, None
        # Form fields as bytes: a lone surrogate goes out as the (invalid) UTF-8 it would be.
        form = {k: str(v).encode("utf-8", "surrogatepass") for k, v in body.items()}
        return kind, b"", "application/x-www-form-urlencoded" if choice == 3 else "multipart/form-data", form

    def deep_sweep(self) -> Iterator[tuple[str, bytes, str | None, None]]:
        """Nesting around Python's recursion limit (1000), where the stack depths of TorchServe's
        json decoding and of the handler differ: a field 988 deep once made a 500."""
        for depth in range(960, 1001):
            for where in ("width", "guidance_scale", "output", "body"):
                if where == "body":
                    yield "deep", self.nested(depth, "list")[len(_RAW):].encode(), "application/json", None
                    continue
                body = {"prompt": "deep", **SMALL, where: self.nested(depth, "list")}
                yield "deep", _dump(body).encode(), "application/json", None

    def cases(self, count: int) -> Iterator[tuple[str, bytes, str | None, dict[str, Any] | None]]:
        """The deep sweep first, then seeded random cases: ``count`` in all."""
        sweep = self.deep_sweep()
        for _ in range(count):
            yield next(sweep, None) or self.case()

    def random_json(self, depth: int) -> Any:
        rng = self.rng
        if depth <= 0 or rng.random() < 0.4:
            return rng.choice([None, True, False, rng.randint(-10**6, 10**6), rng.uniform(-1e6, 1e6), self.text(20),
                               self.hostile_value()])
        if rng.random() < 0.5:
            return [self.random_json(depth - 1) for _ in range(rng.randint(0, 4))]
        keys = list(FIELDS) + ["x", "", "instances", "body"]
        return {rng.choice(keys): self.random_json(depth - 1) for _ in range(rng.randint(0, 5))}


class Oracle:
    """The parser run in-process with the fuzz server's own config: what the server must answer."""

    def __init__(self, config_path: Path):
        from handler.config import load_handler_config
        from handler.variants import TI2V_5B

        config = load_handler_config(yaml.safe_load(config_path.read_text()), REPO_ROOT)
        self.spec = TI2V_5B
        self.defaults = config.defaults_for(TI2V_5B.defaults)
        self.limits = config.limits

    def expect(self, data: bytes, content_type: str | None) -> dict[str, Any]:
        """The status (and field, or request) the server must answer, and in which protocol's
        wrapping: the handler opens KServe v1/v2 bodies itself (handler/envelopes.py)."""
        from handler.envelopes import PLAIN, unwrap
        from handler.errors import WanError
        from handler.request import parse_request

        body: Any = data
        if content_type == "application/json":
            # TorchServe's Python side json-decodes application/json bodies itself and hands the
            # handler the value (a JSON string arrives as text, which the handler reads as JSON).
            try:
                body = json.loads(data.decode("utf-8"))
            except Exception:  # noqa: BLE001 - exactly what TorchServe catches
                body = data
        # As handler/wan_handler.py: the envelope (if any) opened, the request parsed, its output
        # checked against the envelope (as WanService.parse).
        protocol = PLAIN.protocol
        try:
            envelope, inner = unwrap(body, self.limits)
            protocol = envelope.protocol
            if isinstance(inner, WanError):
                raise inner
            request = parse_request(inner, self.spec, self.defaults, self.limits, storage_configured=True)
            envelope.check_output(request)
        except WanError as error:
            return {"status": error.http_status, "field": error.field, "message": error.message,
                    "protocol": protocol.value}
        except Exception as exc:  # noqa: BLE001 - a parser bug: the server would answer 500
            return {"status": 500, "field": None, "message": f"the parser raised {type(exc).__name__}: {exc}",
                    "protocol": protocol.value}
        return {"status": 200, "request": request, "protocol": protocol.value}


def run_fuzz(server: Server, count: int, seed: int, oracle: Oracle, check_every: int = 50) -> dict[str, Any]:
    """``count`` generated bodies against the server: never a 5xx, never a worker restart, each
    answer the one the in-process parser gives, every 200 a valid video."""
    problems: list[str] = []
    pid, _ = server.wait_ready()
    if pid is None:
        return {"problems": ["no READY worker"]}
    fuzzer = BodyFuzzer(seed)
    by_status: Counter[str] = Counter()
    by_kind: Counter[str] = Counter()
    mismatches = five_xx = not_json = bad_video = restarts = 0
    seconds_4xx: list[float] = []
    session = local_session()
    started = time.monotonic()

    def note(text: str) -> None:
        if len(problems) < 30:
            problems.append(text)

    for index, (kind, data, content_type, form) in enumerate(fuzzer.cases(count)):
        by_kind[kind] += 1
        sent = time.monotonic()
        try:
            headers = server.headers()
            if form is not None and content_type == "multipart/form-data":
                response = session.post(server.predictions_url, files={k: (None, v) for k, v in form.items()},
                                        headers=headers, timeout=REQUEST_TIMEOUT_S)
            elif form is not None:
                response = session.post(server.predictions_url, data=form, headers=headers, timeout=REQUEST_TIMEOUT_S)
            else:
                response = server.post(data=data, content_type=content_type, session=session)
        except requests.RequestException as exc:
            five_xx += 1
            note(f"#{index} {kind}: no answer ({type(exc).__name__}: {str(exc)[:120]}) for {data[:200]!r}")
            continue
        seconds = time.monotonic() - sent
        status = response.status_code
        by_status[str(status)] += 1
        if status >= 500:
            five_xx += 1
            note(f"#{index} {kind}: {status} {response.text[:200]} for {data[:300]!r} ({content_type})")
            continue
        # The protocol the answer came back in (KServe v1/v2 wrapping or plain), if it is JSON.
        answered_as = None
        if response.headers.get("Content-Type", "").startswith("application/json"):
            with contextlib.suppress(ValueError):
                answered_as = answer_protocol(response.json())
        if 400 <= status < 500:
            seconds_4xx.append(seconds)
            try:
                error = unwrap_answer(response.json())["error"]
                assert isinstance(error["message"], str) and error["message"] and "type" in error and "field" in error
            except (ValueError, KeyError, TypeError, AssertionError):
                if not (status == 413 and "code" in response.text):  # TorchServe's own 413 has its own shape
                    not_json += 1
                    note(f"#{index} {kind}: {status} without a JSON error body: {response.text[:200]}")
                error = {}
        else:
            error = {}
        expected = oracle.expect(data, content_type) if form is None else None
        if expected is not None:
            tolerated = (
                # The tokenizer's 512-token limit is checked by the server, not by parse_request.
                (expected["status"] == 200 and status == 400 and "tokens" in error.get("message", ""))
                # TorchServe json-decodes application/json at a shallower stack than the handler:
                # nesting that is "too deep" for one may still parse in the other; both are 400.
                or (status == 400 and expected["status"] == 400 and "nested too deeply" in
                    (expected["message"] + error.get("message", "")))
            )
            if not tolerated:
                if status != expected["status"]:
                    mismatches += 1
                    note(f"#{index} {kind}: server {status} {response.text[:160]!r}, parser says {expected['status']} "
                         f"{expected.get('message', '')[:120]!r} for {data[:300]!r}")
                elif status == 400 and expected["field"] is not None and error.get("field") != expected["field"]:
                    mismatches += 1
                    note(f"#{index} {kind}: server names field {error.get('field')!r}, parser {expected['field']!r}")
            if (status == 200 or error) and answered_as is not None and answered_as != expected["protocol"]:
                mismatches += 1
                note(f"#{index} {kind}: answered as {answered_as}, the request came as {expected['protocol']}: "
                     f"{response.text[:160]!r}")
        if status == 200:
            request = expected.get("request") if expected else None
            expect = ({"width": request.width, "height": request.height, "num_frames": request.num_frames}
                      if request is not None else {})
            output = request.output.value if request is not None else "url"
            issue = video_problem(response, expect, output)
            if issue:
                bad_video += 1
                note(f"#{index} {kind}: 200 with a bad video: {issue}")
        if (index + 1) % check_every == 0 or index == count - 1:
            now_pid = server.ready_pid()
            if now_pid != pid:
                restarts += 1
                note(f"the worker changed between bodies {index + 1 - check_every} and {index}: {pid} -> {now_pid}")
                pid, _ = server.wait_ready(120.0)
    session.close()
    return {"bodies": count, "seconds": round(time.monotonic() - started, 1), "by_kind": dict(sorted(by_kind.items())),
            "by_status": dict(sorted(by_status.items())), "five_xx": five_xx, "not_json_errors": not_json,
            "oracle_mismatches": mismatches, "bad_videos": bad_video, "worker_restarts": restarts,
            "latency_4xx_s": _stats(seconds_4xx), "problems": problems}


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


# -- moto for the fuzz server (results go to S3, so storage is fuzzed too) ---------------------------------------


def moto_env(endpoint: str, bucket: str) -> dict[str, str]:
    """All the storage settings a server writing to a moto endpoint gets. ``running`` drops the
    caller's (AWS_ENDPOINT_URL_S3 would win over AWS_ENDPOINT_URL; a profile or config file could
    name other credentials or endpoints), so these are the only ones it has."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_EC2_METADATA_DISABLED": "true", "WAN_S3_BUCKET": bucket}


@contextlib.contextmanager
def moto_s3(log_path: Path, bucket: str = "wan-fuzz", timeout_s: float = 30.0) -> Iterator[dict[str, str]]:
    """moto in server mode on 127.0.0.1 with one bucket; yields the server's S3 environment
    (moto_env). Fails if moto does not listen within ``timeout_s``."""
    [port] = free_ports(1)
    endpoint = f"http://127.0.0.1:{port}"
    moto_server = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or "moto_server"
    with open(log_path, "ab") as log:
        process = subprocess.Popen([moto_server, "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                                   stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"moto_server exited ({process.returncode}) before listening on {endpoint}; "
                                   f"see {log_path}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() >= deadline:
                    raise RuntimeError(f"moto_server did not listen on {endpoint} within {timeout_s:.0f} s; "
                                       f"see {log_path}") from None
                time.sleep(0.1)
        import boto3
        from botocore.config import Config

        # Straight to moto: no proxy of the caller's environment (proxies={} is "none").
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key="testing", config=Config(proxies={})).create_bucket(Bucket=bucket)
        yield moto_env(endpoint, bucket)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


# -- the campaign -------------------------------------------------------------------------------------------------

SCENARIOS = ("load", "faults", "deadline", "images", "fuzz", "properties", "s3")


def campaign(plan: Plan, root: Path, weights_dir: Path, only: tuple[str, ...] = SCENARIOS) -> dict[str, Any]:
    results: dict[str, Any] = {}

    def timed(name: str, fn) -> None:
        started = time.monotonic()
        print(f"== {name} ...", flush=True)
        try:
            results[name] = fn()
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - a crashed scenario is a finding
            where = traceback.extract_tb(exc.__traceback__)[-1]
            crash = f"scenario crashed: {type(exc).__name__}: {exc} ({Path(where.filename).name}:{where.lineno})"
            results[name] = {"problems": [crash]}
        results[name]["scenario_s"] = round(time.monotonic() - started, 1)
        print(f"   {name}: {len(_problems(results[name]))} problems, {results[name]['scenario_s']} s", flush=True)

    if "load" in only:
        def load():
            config = service_config(root / "load" / "model-config.yaml", plan.load_queue_size)
            with running(root / "load", config, weights_dir) as server:
                return {"queue_size": plan.load_queue_size, "workers": 1,
                        **run_load(server, plan.load_clients, plan.load_requests_per_client, plan.seed,
                                   plan.load_max_rss_growth_mib, plan.load_phases, plan.load_max_late_growth_mib)}
        timed("load", load)
    if "faults" in only:
        def faults():
            config = service_config(root / "faults" / "model-config.yaml")
            with running(root / "faults", config, weights_dir) as server:
                out: dict[str, Any] = {"kill_streamed": [], "kill_plain": [], "oom": []}
                for i in range(plan.ooms):
                    out["oom"].append(run_oom(server, retry_big=(plan.oom_retry_big and i == 0)))
                for _ in range(plan.kills):
                    out["kill_streamed"].append(run_kill_streamed(server))
                    out["kill_plain"].append(run_kill_plain(server))
                return out
        timed("faults", faults)
    if "deadline" in only:
        def deadline():
            config = deadline_config(root / "deadline" / "model-config.yaml")
            with running(root / "deadline", config, weights_dir) as server:
                runs = [run_deadline(server, stream=bool(i % 2)) for i in range(plan.deadlines)]
                control = run_timeout_control(server) if plan.timeout_control else None
                return {"runs": runs, "timeout_control": control}
        timed("deadline", deadline)
    if "images" in only:
        def images():
            config = service_config(root / "images" / "model-config.yaml")
            with running(root / "images", config, weights_dir) as server:
                return run_images(server)
        timed("images", images)
    if "fuzz" in only:
        def fuzz():
            config = fuzz_config(root / "fuzz" / "model-config.yaml")
            (root / "fuzz").mkdir(parents=True, exist_ok=True)
            with moto_s3(root / "fuzz" / "moto.log") as env, running(root / "fuzz", config, weights_dir, env) as server:
                return {"seed": plan.seed, "s3": True,
                        **run_fuzz(server, plan.fuzz_bodies, plan.seed, Oracle(config))}
        timed("fuzz", fuzz)
    if "properties" in only:
        timed("properties", lambda: run_pytest(["tests/test_request_fuzz.py"],
                                               {"WAN_FUZZ_EXAMPLES": str(plan.hypothesis_examples)}))
    if "s3" in only:
        timed("s3", lambda: run_pytest(S3_FAULT_TESTS))
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
            "command": shlex.join(["python", "-m", "scripts.campaign", *(argv if argv is not None else sys.argv[1:])]),
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
