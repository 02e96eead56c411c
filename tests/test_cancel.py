"""The TorchServe handler's cancellation check (handler/cancel.py) against a stand-in of the job
service's ``/internal/v1/videos/{id}/wanted`` route on 127.0.0.1; the real job service and a real
TorchServe are in tests/test_jobs.py (test_cancel_stops_torchserve_within_a_step)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from ts.context import Context, RequestProcessor

from handler.cancel import JOB_ID_HEADER, CancelCheckConfig, StillWantedCheck
from handler.errors import ConfigError, InvalidRequest
from handler.wan_handler import WanVideoHandler
from tests.harness.payloads import SMALL

TOKEN = "dp-token"


class StandIn:
    """Answers ``{"id", "wanted"}`` from ``wanted`` to the right bearer token; ``status`` other than
    200 answers that instead; ``hold`` (an Event) keeps each answer back until it is set."""

    def __init__(self):
        self.wanted: dict[str, bool] = {}
        self.status = 200
        self.hold: threading.Event | None = None
        self.asked: list[str] = []
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                job_id = self.path.split("/")[-2]
                stand_in.asked.append(job_id)
                if stand_in.hold is not None:
                    stand_in.hold.wait(10)
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    status, body = 401, {"error": "token"}
                elif stand_in.status != 200:
                    status, body = stand_in.status, {"error": "down"}
                else:
                    status, body = 200, {"id": job_id, "wanted": stand_in.wanted.get(job_id, False)}
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/internal/v1/videos/{{job_id}}/wanted"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        if self.hold is not None:
            self.hold.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stand_in():
    server = StandIn()
    yield server
    server.close()


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def _ask(check: StillWantedCheck) -> bool:
    """One question, waited for, then the answer as a step would see it."""
    check()
    check.wait_idle(10)
    return check()


def test_config_from_the_environment(tmp_path):
    assert CancelCheckConfig.from_env({}) is None
    with pytest.raises(ConfigError, match="WAN_CANCEL_URL"):
        CancelCheckConfig.from_env({"WAN_CANCEL_URL": "http://127.0.0.1:8000/internal/v1/videos/wanted"})
    with pytest.raises(ConfigError, match="WAN_CANCEL_URL"):
        CancelCheckConfig.from_env({"WAN_CANCEL_URL": "127.0.0.1:8000/{job_id}"})
    # The file is read when a question is asked: it may be written after the server starts.
    token_file = tmp_path / "data_plane_token"
    config = CancelCheckConfig.from_env({"WAN_CANCEL_URL": "http://127.0.0.1:1/{job_id}",
                                         "WAN_CANCEL_TOKEN_FILE": str(token_file)})
    assert config.read_token() is None
    token_file.write_text("later\n")
    assert config.read_token() == "later"
    both = CancelCheckConfig.from_env({"WAN_CANCEL_URL": "http://h/{job_id}", "WAN_CANCEL_TOKEN": "direct",
                                       "WAN_CANCEL_TOKEN_FILE": str(token_file)})
    assert both.read_token() == "direct"


def test_no_header_no_check_and_a_bad_header_is_a_400():
    config = CancelCheckConfig("http://127.0.0.1:1/{job_id}", token=TOKEN)
    assert config.check_for(None) is None
    for bad in ("../admin", "a/b", "", "x" * 129, "video 1"):
        with pytest.raises(InvalidRequest) as caught:
            config.check_for(bad)
        assert caught.value.field == JOB_ID_HEADER
    assert config.check_for(" video_00ab ").url == "http://127.0.0.1:1/video_00ab"


def test_wanted_runs_on_and_unwanted_cancels(stand_in):
    config = CancelCheckConfig(stand_in.url, token=TOKEN, interval_s=0)
    stand_in.wanted = {"video_a": True}
    assert _ask(config.check_for("video_a")) is False
    unwanted = config.check_for("video_b")
    assert _ask(unwanted) is True
    assert unwanted() is True  # and stays so, without asking again
    assert stand_in.asked.count("video_b") == 1


def test_asks_at_most_once_per_interval(stand_in):
    clock = Clock()
    stand_in.wanted = {"video_a": True}
    check = StillWantedCheck(CancelCheckConfig(stand_in.url, token=TOKEN), "video_a", clock=clock)
    for _ in range(50):  # many steps within one second
        _ask(check)
        clock.now += 0.01
    assert check.questions == 1
    clock.now += 1.0
    _ask(check)
    assert check.questions == 2 and stand_in.asked == ["video_a", "video_a"]


def test_a_step_never_waits_for_the_question(stand_in):
    """The job service holds its answer: every call returns at once, one question stays in flight."""
    stand_in.hold = threading.Event()
    check = StillWantedCheck(CancelCheckConfig(stand_in.url, token=TOKEN, interval_s=0), "video_a")
    assert [check() for _ in range(20)] == [False] * 20
    assert check.questions == 1  # none piled up behind the slow one
    stand_in.hold.set()
    check.wait_idle(10)
    assert check() is True


@pytest.mark.parametrize("failure", ["status_500", "bad_token", "no_token_yet", "nobody_listens", "timeout"])
def test_a_failed_question_never_cancels(stand_in, tmp_path, failure):
    url, token, token_file, timeout_s = stand_in.url, TOKEN, None, 2.0
    if failure == "status_500":
        stand_in.status = 500
    elif failure == "bad_token":
        token = "wrong"
    elif failure == "no_token_yet":
        token, token_file = None, tmp_path / "absent"
    elif failure == "nobody_listens":
        stand_in.close()
    elif failure == "timeout":
        stand_in.hold, timeout_s = threading.Event(), 0.2
    # One question (the interval is long): its failure is counted once, and nothing cancels.
    config = CancelCheckConfig(url, token=token, token_file=token_file, interval_s=60, timeout_s=timeout_s)
    check = config.check_for("video_gone")  # the stand-in would say wanted: false
    assert _ask(check) is False
    assert check.failures == 1


# -- the TorchServe adapter: the header becomes the hook -------------------------------------------


@pytest.fixture(scope="module")
def handler(tiny_checkpoints):
    path = tiny_checkpoints["ti2v-5b"]
    config = yaml.safe_load(Path("config/models/tiny-ti2v.yaml").read_text())
    config["handler"].update(model_path=str(path), defaults=dict(SMALL))
    context = Context("wan", str(path.parent), {"model": {"modelName": "wan"}}, 1, None, "0.12.0",
                      model_yaml_config=config)
    handler = WanVideoHandler()
    handler.initialize(context)
    return handler, context


def _call(handler, context, headers, body):
    context.request_ids = {0: "req-cancel"}
    context.request_processor = [RequestProcessor(headers)]
    [reply] = handler.handle([{"body": body}], context)
    return context.get_response_status(0)[0], reply


def test_handler_stops_a_job_the_job_service_no_longer_wants(handler, stand_in, monkeypatch):
    handler, context = handler
    monkeypatch.setattr(handler, "cancel_check", CancelCheckConfig(stand_in.url, token=TOKEN, interval_s=0))
    body = {"prompt": "a cat", "num_inference_steps": 20}
    stand_in.wanted = {"video_kept": True}
    status, reply = _call(handler, context, {"x-wan-job-id": "video_kept"}, body)
    assert status == 200 and reply["seed"] is not None
    status, reply = _call(handler, context, {"X-Wan-Job-Id": "video_dropped"}, body)
    assert status == 499 and reply["error"]["type"] == "cancelled", reply
    assert "video_dropped" in stand_in.asked
    status, reply = _call(handler, context, {"X-Wan-Job-Id": "../x"}, body)
    assert status == 400 and reply["error"]["field"] == JOB_ID_HEADER


def test_handler_without_a_job_header_or_a_config_never_asks(handler, stand_in, monkeypatch):
    handler, context = handler
    monkeypatch.setattr(handler, "cancel_check", CancelCheckConfig(stand_in.url, token=TOKEN, interval_s=0))
    assert _call(handler, context, {}, {"prompt": "a cat"})[0] == 200
    monkeypatch.setattr(handler, "cancel_check", None)
    assert _call(handler, context, {"X-Wan-Job-Id": "video_dropped"}, {"prompt": "a cat"})[0] == 200
    assert stand_in.asked == []
