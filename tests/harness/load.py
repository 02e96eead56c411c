"""Load: many concurrent clients against a small queue. Every accepted request must come back with
a valid video, the overflow must get TorchServe's 503 fast, nothing may hang, and the worker's
memory must stay flat."""

from __future__ import annotations

import math
import random
import statistics
import threading
import time
from collections import Counter
from typing import Any

import requests

from scripts.serve import local_session
from tests.harness.payloads import SMALL, video_problem
from tests.harness.servers import REQUEST_TIMEOUT_S, Server, proc_kib

# A 503 is TorchServe refusing at the door: it must not wait for the queue to move (absolute bound
# generous for a busy CI machine; run_load also compares it with the accepted requests' latency).
MAX_503_S = 2.0


def stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    ordered = sorted(values)
    return {"n": len(ordered), "p50": round(statistics.median(ordered), 4),
            "p95": round(ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)], 4),
            "max": round(ordered[-1], 4)}



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
        "latency_s": {"accepted": stats([o["seconds"] for o in ok]), "503": stats([o["seconds"] for o in rejected])},
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


