"""Load, faults and hostile input against real TorchServe processes (the fast part of the
reliability campaign: tests/harness/campaign.py with its QUICK plan; RELIABILITY.md has the long one).

Each server here is a real TorchServe on free 127.0.0.1 ports with one worker and the tiny model.
The scenarios live in tests/harness/ (load, faults, fuzz); these tests run them and hold them to
the contract. Linux only, as the campaign: worker memory comes from /proc.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from pathlib import Path

import pytest
import requests

from scripts.serve import reaches_outside
from tests.harness import campaign, faults, fuzz, load, payloads, servers
from tests.harness.campaign import QUICK

# Nothing listens on the discard port: whatever goes there fails.
NOWHERE = "http://127.0.0.1:9"
# A caller's shell that would send a server's storage and traffic elsewhere, were they inherited.
CALLERS_ENV = {"HTTP_PROXY": NOWHERE, "https_proxy": NOWHERE, "ALL_PROXY": NOWHERE, "AWS_ENDPOINT_URL_S3": NOWHERE,
               "AWS_PROFILE": "not-a-profile", "WAN_S3_BUCKET": "not-a-bucket", "WAN_S3_INPUT_BUCKETS": "not-a-bucket"}


@contextlib.contextmanager
def started_from(env: dict[str, str]):
    """Servers started in here are started from a caller's environment holding ``env``."""
    with pytest.MonkeyPatch.context() as patch:
        for name in ("NO_PROXY", "no_proxy"):
            patch.delenv(name, raising=False)
        for name, value in env.items():
            patch.setenv(name, value)
        yield


@contextlib.contextmanager
def running_from_callers_env(root, config, weights, extra_env=None):
    """servers.running, started from CALLERS_ENV (which is only set while it starts)."""
    with contextlib.ExitStack() as stack:
        with started_from(CALLERS_ENV):
            server = stack.enter_context(servers.running(root, config, weights, extra_env))
        yield server


@pytest.fixture(autouse=True)
def _proxy_that_goes_nowhere():
    """Every test here runs with a proxy that goes nowhere in its environment: the campaign's
    clients must go to 127.0.0.1 directly (or fail). Module servers are started before this."""
    with started_from({name: NOWHERE for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy",
                                                   "https_proxy", "all_proxy")}):
        yield


@pytest.fixture(scope="module")
def service_server(tmp_path_factory, server_weights):
    """The shipped tiny model (limits, timeouts) on one worker with a queue of QUICK.load_queue_size."""
    root = tmp_path_factory.mktemp("reliability-service")
    config = servers.service_config(root / "model-config.yaml", QUICK.load_queue_size)
    with running_from_callers_env(root, config, server_weights) as server:
        yield server


@pytest.fixture(scope="module")
def deadline_server(tmp_path_factory, server_weights):
    """responseTimeout 10 s, deadline 2 s, limits that allow a request of ~20 s."""
    root = tmp_path_factory.mktemp("reliability-deadline")
    config = servers.deadline_config(root / "model-config.yaml")
    with servers.running(root, config, server_weights) as server:
        yield server


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory, server_weights, moto):
    """Small limits (every accepted body is cheap) and results in S3 (moto), so storage is fuzzed too."""
    root = tmp_path_factory.mktemp("reliability-fuzz")
    bucket = f"wan-fuzz-{uuid.uuid4().hex[:8]}"
    moto.client().create_bucket(Bucket=bucket)
    config = servers.fuzz_config(root / "model-config.yaml")
    # From CALLERS_ENV: its AWS_ENDPOINT_URL_S3 would win over moto's AWS_ENDPOINT_URL if inherited.
    with running_from_callers_env(root, config, server_weights, moto.env(bucket)) as server:
        server.config_path = config
        server.bucket = bucket
        yield server


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode("utf-8", "replace").split("\0") if "=" in item)


# -- network isolation -------------------------------------------------------------------------------


def test_servers_get_no_storage_or_proxy_settings_from_the_callers_environment(service_server, fuzz_server, moto):
    for server in (service_server, fuzz_server):
        pids = {"frontend": server.frontend_pid(), "worker": server.ready_pid()}
        assert None not in pids.values(), pids
        for process, pid in pids.items():
            env = _environ(pid)
            outside = {name: value for name, value in env.items() if reaches_outside(name)}
            if server is service_server:
                assert outside == {}, (process, outside)
            else:  # exactly what moto_env sets: the caller's AWS_ENDPOINT_URL_S3 and profile are gone
                assert outside == moto.env(fuzz_server.bucket), (process, outside)


def test_a_video_url_off_127_0_0_1_is_a_problem_and_is_not_fetched(monkeypatch):
    def no_fetch(*args, **kwargs):
        raise AssertionError("video_problem fetched a URL it should refuse")

    monkeypatch.setattr(requests.Session, "get", no_fetch)
    for url in ("http://169.254.169.254/latest/meta-data/", "https://bucket.s3.amazonaws.com/v.mp4",
                "http://localhost:9000/v.mp4", "http://127.0.0.1.example.com/v.mp4"):
        response = requests.Response()
        response.status_code = 200
        response.headers["Content-Type"] = "application/json"
        response._content = json.dumps({"video": {"url": url}}).encode()
        problem = payloads.video_problem(response, payloads.SMALL)
        assert problem is not None and "not 127.0.0.1" in problem, (url, problem)


# -- load ----------------------------------------------------------------------------------------


def test_load_overflow_is_a_fast_503_and_every_accepted_request_completes(service_server):
    result = load.run_load(service_server, QUICK.load_clients, QUICK.load_requests_per_client, QUICK.seed,
                               QUICK.load_max_rss_growth_mib, QUICK.load_phases, QUICK.load_max_late_growth_mib)
    assert result["problems"] == []
    assert result["sent"] == QUICK.load_clients * QUICK.load_requests_per_client
    assert result["lost"] == 0 and result["hung_clients"] == 0 and result["not_sent_time_limit"] == 0
    assert result["client_crashes"] == 0
    assert result["completed_valid"] == result["accepted"] > 0
    assert result["rejected_503"] > 0  # the queue really overflowed
    assert result["accepted"] + result["rejected_503"] == result["sent"]
    assert result["latency_s"]["503"]["max"] < load.MAX_503_S
    # Memory: with the C heap trimmed after each request, RSS stays put (tests/harness/heap_trim.py:
    # +0.1 MiB over 240 small requests with the trim, +122.2 MiB without, glibc keeping freed
    # pages). ~100-160 accepted requests may not grow it by more than 16 MiB: leaking any
    # request-sized buffer (the float32 video is 1.7 MiB at this size) breaks that many times over.
    # The long campaign (make campaign) checks the same over several phases, and also that the
    # second half of them adds at most load_max_late_growth_mib: a leak keeps climbing.
    assert result["worker_rss_mib"]["growth"] <= QUICK.load_max_rss_growth_mib
    assert result["worker_pid_unchanged"]


# -- faults ----------------------------------------------------------------------------------------


def test_out_of_memory_is_507_the_worker_stays_and_gives_the_memory_back(service_server):
    result = faults.run_oom(service_server)
    assert result["problems"] == []
    assert result["client_saw"]["status"] == 507
    assert result["client_saw"]["error"]["type"] == "out_of_memory"
    assert result["worker_pid_unchanged"]
    memory = result["worker_rss_mib"]
    # The request really took memory before it failed (the peak is read through /proc: Linux) ...
    assert memory["peak_during"] is not None and memory["peak_during"] - memory["before"] > 16, memory
    assert memory["left_over"] < 64  # ... and gave it back (it kept ~100-200 MiB before the fix)
    assert result["next_request"] == {"status": 200, "valid_video": True}


def test_worker_killed_mid_stream_the_client_says_so_and_a_new_worker_serves(service_server):
    result = faults.run_kill_streamed(service_server)
    assert result["problems"] == []
    assert result["progress_lines_before_kill"] >= 1
    saw = result["client_saw"]
    # TorchServe resets a stream it had started (status 200); the client turns that into its error.
    assert saw["raised"] == "ServerError" and "stream broke off" in saw["message"]
    assert result["new_pid"] not in (None, result["old_pid"])
    assert result["next_request"] == {"status": 200, "valid_video": True}


def test_worker_killed_mid_generation_gets_torchserve_error_and_a_new_worker_serves(service_server):
    result = faults.run_kill_plain(service_server)
    assert result["problems"] == []
    assert result["client_saw"]["status"] in (500, 507) and "Worker died" in result["client_saw"]["body"]
    assert result["seconds_kill_to_client_error"] < 10
    assert result["new_pid"] not in (None, result["old_pid"])
    assert result["next_request"] == {"status": 200, "valid_video": True}


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_a_generation_past_its_deadline_stops_itself_before_torchserve_kills_the_worker(deadline_server, stream):
    result = faults.run_deadline(deadline_server, stream=stream)
    assert result["problems"] == []
    assert "stopped after step" in result["message"] and "deadline" in result["message"]
    assert result["seconds"] < servers.DEADLINE_RESPONSE_TIMEOUT_S
    assert result["worker_pid_unchanged"]
    assert result["next_request"] == {"status": 200, "valid_video": True}


# -- hostile input ------------------------------------------------------------------------------------


def test_fuzzed_bodies_never_get_a_5xx_nor_restart_the_worker(fuzz_server):
    oracle = fuzz.Oracle(fuzz_server.config_path)
    result = fuzz.run_fuzz(fuzz_server, QUICK.fuzz_bodies, QUICK.seed, oracle)
    assert result["problems"] == []
    assert result["bodies"] == QUICK.fuzz_bodies
    assert result["five_xx"] == 0 and result["worker_restarts"] == 0
    assert result["oracle_mismatches"] == 0 and result["not_json_errors"] == 0 and result["bad_videos"] == 0
    # Both ends were reached: refusals, and generations (videos checked, uploaded to S3).
    assert result["by_status"].get("400", 0) > 0 and result["by_status"].get("200", 0) > 0


def test_campaign_cli_hostile_images_on_a_fresh_server(tmp_path, server_weights):
    out = tmp_path / "record.json"
    code = campaign.main(["--quick", "--only", "images", "--weights", str(server_weights),
                          "--work-dir", str(tmp_path / "work"), "--out", str(out)])
    record = json.loads(out.read_text())
    assert code == 0, record["results"]
    assert set(record) >= {"command", "date", "git_commit", "machine", "plan", "totals", "results"}
    images = record["results"]["images"]
    assert images["problems"] == [] and images["worker_pid_unchanged"]
    assert record["totals"]["bad_inputs_tried"] == images["tried"] == len(payloads.hostile_images())
    assert record["totals"]["bad_input_5xx"] == 0 and record["totals"]["worker_deaths_from_bad_input"] == 0
    refused_by_frontend = [case for case in images["cases"] if case["refused_by"] == payloads.FRONTEND]
    assert [case["name"] for case in refused_by_frontend] == ["26 MiB of base64 (over max_request_size)"]
    for case in images["cases"]:
        assert case["status"] in (400, 413), case
        # Our JSON error naming the field, except where TorchServe's frontend answers for itself
        # (over max_request_size: the worker never saw the body).
        assert case["field"] == ("image" if case["refused_by"] == payloads.HANDLER else None), case
        assert case["seconds"] < fuzz.MAX_REFUSAL_S, case
        # Bombs and huge headers are refused from the header: no decoded pixels in the worker.
        if not case["big_body"]:  # (a big body's own bytes would count: its bound is the frontend's)
            assert case["worker_peak_growth_mib"] is not None and case["worker_peak_growth_mib"] < 32, case
