"""Faults: SIGKILL of the worker mid-generation (streamed and plain), out of memory for real (the
worker's address space lowered with prlimit), a generation past its deadline."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import threading
import time
from typing import Any

import requests

from scripts.serve import read_key
from tests.harness.payloads import BIG, LONG, MIB, SMALL, video_problem
from tests.harness.servers import (
    DEADLINE_RESPONSE_TIMEOUT_S,
    DEADLINE_S,
    REQUEST_TIMEOUT_S,
    Server,
    proc_kib,
    reset_peak_rss,
    wait_busy,
)


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
    after = next_request(server, problems)
    if new_pid is None:
        problems.append("no new worker within 120 s")
    return {"mode": "streamed", "old_pid": pid, "new_pid": new_pid, "progress_lines_before_kill": len(progress),
            "client_saw": outcome, "seconds_kill_to_client_error": round(seen_s, 3) if seen_s is not None else None,
            "recovery_s": round(recovery_s, 2), "next_request": after, "problems": problems}


def run_kill_plain(server: Server, busy_cpu_s: float = 0.5) -> dict[str, Any]:
    """Kill the worker once it is working on a ~10 s non-streamed generation (it has used
    ``busy_cpu_s`` of CPU since the request left: a fixed sleep could kill it before the request
    arrives on a loaded machine, and the queued request would then be served by the new worker);
    record TorchServe's answer."""
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
    busy_after_s = wait_busy(pid, busy_cpu_s, timeout_s=60)
    if busy_after_s is None:
        problems.append(f"the worker did not start working within 60 s (used < {busy_cpu_s} s of CPU)")
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    thread.join(90)
    seen_s = time.monotonic() - killed
    if thread.is_alive():
        problems.append("the client got no answer within 90 s of the kill")
    elif answer.get("status") is None or answer["status"] < 500 or "Worker died" not in answer.get("body", ""):
        problems.append(f"unclear answer to a killed request: {answer}")
    new_pid, recovery_s = server.wait_ready(120.0, not_pid=pid)
    after = next_request(server, problems)
    if new_pid is None:
        problems.append("no new worker within 120 s")
    return {"mode": "plain", "old_pid": pid, "new_pid": new_pid, "killed_after_s": round(busy_after_s, 3) if busy_after_s is not None else None,
            "client_saw": {k: (round(v, 3) if isinstance(v, float) else v) for k, v in answer.items()},
            "seconds_kill_to_client_error": round(seen_s, 3), "recovery_s": round(recovery_s, 2),
            "next_request": after, "problems": problems}


def next_request(server: Server, problems: list[str], **fields: Any) -> dict[str, Any]:
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
    after = next_request(server, problems)
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
    after = next_request(server, problems, num_inference_steps=1)
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
    threads[0].start()
    if wait_busy(pid) is None:  # the first one in the worker, then the second one queued behind it
        problems.append("the worker did not start on the first request within 60 s")
    threads[1].start()
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
    after = next_request(server, problems, num_inference_steps=1)
    return {"response_timeout_s": timeout_s, "answers": got, "old_pid": pid, "new_pid": new_pid,
            "worker_killed_by_torchserve": new_pid is not None and len(cut) == len(threads),
            "next_request": after, "problems": problems}


