"""Against a real tritonserver (the nvidia-pytriton wheel's) serving the tiny model: the Triton data plane.

``wan`` (plain /infer over HTTP and gRPC) and ``wan_stream`` (decoupled: progress, cancellation),
one session server on free 127.0.0.1 ports (tests/conftest.py ``triton``).
"""

from __future__ import annotations

import base64
import json
import queue
import re
import time

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from handler.video import probe_mp4
from tests.harness.payloads import BAD_REQUESTS, RAW_BAD_BODIES, SMALL

BODY = {"prompt": "a paper boat on a river", **SMALL}


def _input(module, document: dict, binary: bool = True):
    tensor = module.InferInput("request", [1], "BYTES")
    data = np.array([json.dumps(document).encode("utf-8")], dtype=np.object_)
    if module is httpclient:
        tensor.set_data_from_numpy(data, binary_data=binary)
    else:
        tensor.set_data_from_numpy(data)
    return tensor


def _session() -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    return session


@pytest.fixture(scope="module")
def http(triton):
    client = httpclient.InferenceServerClient(f"127.0.0.1:{triton.http_port}", network_timeout=120)
    yield client
    client.close()


@pytest.fixture(scope="module")
def grpc(triton):
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    yield client
    client.close()


def test_both_models_are_ready_and_the_plain_one_has_no_weights(triton, http):
    assert http.is_model_ready("wan") and http.is_model_ready("wan_stream")
    config = http.get_model_config("wan_stream")
    assert config["model_transaction_policy"]["decoupled"] is True and config["max_batch_size"] == 0
    assert [(t["name"], t["data_type"], t["dims"]) for t in config["input"] + config["output"]] == [
        ("request", "TYPE_STRING", [1]), ("response", "TYPE_STRING", [1])]
    assert http.get_model_config("wan")["parameters"]["forward_to"]["string_value"] == "wan_stream"


@pytest.mark.parametrize("binary", [True, False], ids=["binary-tensors", "json-tensors"])
def test_http_infer_answers_the_json_result(http, binary):
    outputs = [httpclient.InferRequestedOutput("response", binary_data=binary)]
    result = http.infer("wan", [_input(httpclient, dict(BODY, seed=7), binary)], outputs=outputs, request_id="r-1")
    answer = json.loads(result.as_numpy("response")[0])
    assert answer["seed"] == 7 and answer["request_id"] == "r-1" and answer["variant"] == "ti2v-5b"
    info = probe_mp4(base64.b64decode(answer["video"]["base64"]))
    assert (info.width, info.height, info.num_frames, info.codec) == (128, 128, 9, "h264")


def test_mp4_output_is_the_video_bytes_over_http_and_grpc(http, grpc):
    over_http = http.infer("wan", [_input(httpclient, dict(BODY, output="mp4"))]).as_numpy("response")[0]
    over_grpc = grpc.infer("wan", [_input(grpcclient, dict(BODY, output="mp4"))]).as_numpy("response")[0]
    for mp4 in (over_http, over_grpc):
        info = probe_mp4(mp4)
        assert (info.width, info.height, info.num_frames, info.pix_fmt) == (128, 128, 9, "yuv420p")


def test_grpc_infer_answers_the_json_result(grpc):
    answer = json.loads(grpc.infer("wan", [_input(grpcclient, dict(BODY, seed=3))]).as_numpy("response")[0])
    assert answer["seed"] == 3 and answer["num_frames"] == SMALL["num_frames"]


def test_bad_requests_are_refused_as_torchserve_refuses_them(http, grpc, torchserve):
    """The corpus of test_torchserve: on Triton a 400 (gRPC INVALID_ARGUMENT) whose message is the
    handler's, the same as TorchServe's, and the stub survives them all."""
    for body, _field in BAD_REQUESTS:
        expected = torchserve.predict(body)
        assert expected.status_code == 400, expected.text
        message = expected.json()["error"]["message"]
        with pytest.raises(InferenceServerException) as over_http:
            http.infer("wan", [_input(httpclient, body)])
        assert (over_http.value.status(), over_http.value.message()) == ("400", message), body
        with pytest.raises(InferenceServerException) as over_grpc:
            grpc.infer("wan", [_input(grpcclient, body)])
        assert (over_grpc.value.status(), over_grpc.value.message()) == ("StatusCode.INVALID_ARGUMENT", message)
    for raw in RAW_BAD_BODIES:  # a valid v2 body whose request text is not a JSON object
        tensor = httpclient.InferInput("request", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([raw], dtype=np.object_))
        with pytest.raises(InferenceServerException) as refused:
            http.infer("wan", [tensor])
        assert refused.value.status() == "400", raw
    assert json.loads(http.infer("wan", [_input(httpclient, BODY)]).as_numpy("response")[0])["seed"] >= 0


def test_a_body_that_is_not_json_is_tritons_own_500(triton):
    """Triton's frontend answers before the model (upstream triton-inference-server/server#8762)."""
    response = _session().post(f"{triton.http_url}/v2/models/wan/infer", data=b"not json", timeout=30)
    assert response.status_code == 500 and "failed to parse the request JSON" in response.json()["error"]


def _stream(grpc, document: dict, request_id: str = "", until=None) -> list:
    """Events of one gRPC stream to wan_stream; ``until(event)`` True stops (and cancels) it."""
    answers: queue.Queue = queue.Queue()
    grpc.start_stream(callback=lambda result, error: answers.put((result, error)))
    events = []
    try:
        grpc.async_stream_infer("wan_stream", [_input(grpcclient, document)], request_id=request_id)
        while True:
            result, error = answers.get(timeout=120)
            if error is not None:
                events.append(error)
                break
            events.append(json.loads(result.as_numpy("response")[0]))
            if until is not None and until(events[-1]):
                break
            if events[-1].get("event") != "progress":
                break
    finally:
        grpc.stop_stream(cancel_requests=True)
    return events


def test_grpc_stream_sends_one_progress_response_per_step_then_the_result(grpc):
    events = _stream(grpc, dict(BODY, stream=True, num_inference_steps=4, seed=9), request_id="s-1")
    assert [e["event"] for e in events] == ["progress"] * 4 + ["result"]
    assert [e["step"] for e in events[:-1]] == [1, 2, 3, 4] and all(e["total"] == 4 for e in events[:-1])
    assert events[-1]["seed"] == 9 and events[-1]["request_id"] == "s-1"


def test_grpc_stream_refuses_a_bad_request_with_the_handlers_message(grpc):
    [error] = _stream(grpc, {"prompt": "x", "num_frames": 10, "stream": True})
    assert isinstance(error, InferenceServerException) and "num_frames" in error.message()


def test_http_generate_stream_sends_progress_then_the_result(triton):
    """The job service's path: Server-Sent Events whose ``response`` is each event's JSON."""
    url = f"{triton.http_url}/v2/models/wan_stream/generate_stream"
    document = json.dumps(dict(BODY, stream=True, num_inference_steps=3, seed=4))
    with _session().post(url, json={"request": document}, stream=True, timeout=120) as response:
        assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/event-stream")
        events = [json.loads(json.loads(line[len(b"data: "):])["response"])
                  for line in response.iter_lines() if line.startswith(b"data: ")]
    assert [e["event"] for e in events] == ["progress"] * 3 + ["result"]
    assert events[-1]["seed"] == 4 and probe_mp4(base64.b64decode(events[-1]["video"]["base64"])).num_frames == 9
    bad = _session().post(url, json={"request": json.dumps({"prompt": ""})}, timeout=60)
    assert bad.status_code == 400 and json.loads(bad.text[len("data: "):])["error"] == "prompt must not be empty"


def _cancelled_at(log_file, request_id: str) -> tuple[int, int]:
    deadline = time.monotonic() + 30
    pattern = re.compile(rf"request {request_id}: cancelled by the client after step (\d+) of (\d+)")
    while time.monotonic() < deadline:
        match = pattern.search(log_file.read_text(errors="replace"))
        if match:
            return int(match.group(1)), int(match.group(2))
        time.sleep(0.2)
    raise AssertionError(f"no cancellation of {request_id} in {log_file}")


LONG = dict(BODY, width=256, height=256, num_frames=33, num_inference_steps=20, stream=True)
# How the server logs a cancelled LONG request (the step it stopped at).
_CANCELLED = re.compile(r"cancelled by the client after step (\d+) of 20")


def _cancellations(log_file) -> list[str]:
    return _CANCELLED.findall(log_file.read_text(errors="replace"))


def _next_cancellation(log_file, before: int) -> list[str]:
    """The log's cancellations once there is one more than ``before`` (30 s at most)."""
    deadline = time.monotonic() + 30
    steps = _cancellations(log_file)
    while time.monotonic() < deadline and len(steps) <= before:
        time.sleep(0.2)
        steps = _cancellations(log_file)
    return steps


def test_a_cancelled_grpc_stream_stops_the_generation_within_a_step(triton, grpc):
    events = _stream(grpc, LONG, request_id="cancel-grpc", until=lambda event: event.get("step") == 2)
    assert [e["step"] for e in events] == [1, 2]
    step, total = _cancelled_at(triton.log_file, "cancel-grpc")
    # Stopped at the step after the one the client saw, or the next (the cancel crossed a step end).
    assert total == 20 and 2 <= step <= 4
    answer = grpc.infer("wan", [_input(grpcclient, dict(BODY, seed=1))]).as_numpy("response")[0]
    assert json.loads(answer)["seed"] == 1  # the model is free again, the stub alive


def test_a_closed_generate_stream_stops_the_generation_within_a_step(triton):
    url = f"{triton.http_url}/v2/models/wan_stream/generate_stream"
    before = len(_cancellations(triton.log_file))
    with _session().post(url, json={"request": json.dumps(LONG)}, stream=True, timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith(b"data: ") and json.loads(json.loads(line[6:])["response"])["step"] == 2:
                break  # closing the connection cancels the request
    steps = _next_cancellation(triton.log_file, before)
    assert len(steps) == before + 1 and 2 <= int(steps[-1]) <= 4


def _job(triton, request: dict, on_progress):
    """One job as the job service's worker sends it (jobs/dataplane.py) to this Triton."""
    import asyncio

    import httpx
    import yaml

    from jobs.config import load_settings
    from jobs.dataplane import run

    # The endpoint as config/jobs.yaml names it: kind triton, no model (the decoupled one by default).
    config = triton.run_dir / "jobs.yaml"
    config.write_text(yaml.safe_dump({"models": [{
        "name": "wan", "variant": "ti2v-5b", "model_config": str(triton.model_config),
        "endpoints": [{"name": "triton", "kind": "triton", "url": triton.http_url, "timeout_s": 120}]}]}))
    [endpoint] = load_settings(config, triton.run_dir / "jobs-run", environ={}).models[0].endpoints
    assert endpoint.model == "wan_stream"

    async def go():
        async with httpx.AsyncClient(trust_env=False) as client:
            return await run(endpoint, request, on_progress, client)

    return asyncio.run(go())


def test_the_job_services_client_follows_a_triton_generation(triton):
    steps = []

    async def on_progress(step, total, elapsed_s):
        steps.append((step, total))
        return True

    outcome = _job(triton, dict(BODY, num_inference_steps=3, seed=6), on_progress)
    assert steps == [(1, 3), (2, 3), (3, 3)]
    assert outcome.result["seed"] == 6 and probe_mp4(base64.b64decode(outcome.result["video"]["base64"])).num_frames == 9


def test_the_job_services_client_reads_tritons_400(triton):
    from jobs.dataplane import Refused

    async def on_progress(step, total, elapsed_s):
        return True

    with pytest.raises(Refused) as refused:
        _job(triton, {"prompt": "x", "num_frames": 10}, on_progress)
    assert refused.value.status == 400 and refused.value.error["message"].startswith("num_frames must be 4k+1")


def test_the_job_services_cancel_stops_the_triton_generation_within_a_step(triton):
    from jobs.dataplane import Stopped

    before = len(_cancellations(triton.log_file))

    async def on_progress(step, total, elapsed_s):
        return step < 2  # the job was cancelled while its second step ran

    with pytest.raises(Stopped):
        _job(triton, LONG, on_progress)
    steps = _next_cancellation(triton.log_file, before)
    assert len(steps) == before + 1 and 2 <= int(steps[-1]) <= 4


def _stub_pid(server_pid: int, model: str) -> int:
    from pathlib import Path

    from handler.triton_health import STUB, _parent

    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _parent(entry) == server_pid:
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv[0].endswith(STUB.encode()) and f"{model}_0_0".encode() in argv:
                return int(entry.name)
    raise AssertionError(f"no stub of {model} under tritonserver {server_pid}")


def test_a_killed_stub_is_seen_by_the_health_check_and_a_restart_serves_again(tmp_path, server_weights):
    """Triton 2.51 never restarts a dead stub and its /v2/health/ready stays 200
    (../shared/notes/triton.md): handler.triton_health, the pod's probe, must see it."""
    import os
    import signal

    from handler.triton_health import check
    from scripts.triton_serve import running_pid, start, stop
    from tests.harness.servers import start_triton

    layout = start_triton(tmp_path, server_weights)
    try:
        pid = running_pid(layout)
        assert check(layout.http_url, server_pid=pid) is None
        os.kill(_stub_pid(pid, "wan_stream"), signal.SIGKILL)
        deadline = time.monotonic() + 30
        while check(layout.http_url, server_pid=pid) is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "wan_stream has 0 of its 1 backend stub(s) alive" in check(layout.http_url, server_pid=pid)
        assert _session().get(f"{layout.http_url}/v2/health/ready", timeout=10).status_code == 200
        client = httpclient.InferenceServerClient(f"127.0.0.1:{layout.http_port}", network_timeout=120)
        with pytest.raises(InferenceServerException) as refused:  # refused, clearly: never a hang
            client.infer("wan", [_input(httpclient, BODY)])
        assert "not healthy" in refused.value.message()
        stop(layout)
        start(layout, timeout_s=240)
        assert check(layout.http_url, server_pid=running_pid(layout)) is None
        assert json.loads(client.infer("wan", [_input(httpclient, dict(BODY, seed=8))]).as_numpy("response")[0])["seed"] == 8
        client.close()
    finally:
        stop(layout)
