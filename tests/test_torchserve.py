"""Against real TorchServe processes started by the tests (127.0.0.1, free ports)."""

from __future__ import annotations

import base64
import json

import pytest
import requests

from handler.video import probe_mp4
from scripts.client import ServerError, WanClient
from scripts.serve import start
from tests.harness.payloads import SMALL, png_base64

SMALL_BODY = {"prompt": "a paper boat on a river", **SMALL}


def test_ping_needs_the_token(torchserve):
    url = f"{torchserve.layout.inference_url}/ping"
    assert requests.get(url, headers=torchserve.headers(), timeout=10).json()["status"] == "Healthy"
    assert requests.get(url, timeout=10).status_code in (400, 401)
    assert requests.get(url, headers={"Authorization": "Bearer wrong"}, timeout=10).status_code in (400, 401)
    assert requests.post(torchserve.predictions_url, json=SMALL_BODY, timeout=10).status_code in (400, 401)


def test_second_start_is_harmless(torchserve):
    pids = torchserve.worker_pids()
    assert start(torchserve.layout) == 0.0
    assert torchserve.worker_pids() == pids


def test_inline_output_decodes_to_the_requested_video(torchserve):
    response = torchserve.predict(dict(SMALL_BODY, width=160, height=96, num_frames=13, fps=12, seed=11))
    assert response.status_code == 200, response.text
    result = response.json()
    info = probe_mp4(base64.b64decode(result["video"]["base64"]))
    assert (info.width, info.height, info.num_frames, info.codec, info.pix_fmt) == (160, 96, 13, "h264", "yuv420p")
    assert result["seed"] == 11 and result["fps"] == 12 and result["variant"] == "ti2v-5b"
    assert set(result) >= {"request_id", "video", "width", "height", "num_frames", "fps", "duration_s",
                           "seed", "variant", "timings", "warnings"}


def test_mp4_output_is_the_video_itself(torchserve):
    response = torchserve.predict(dict(SMALL_BODY, output="mp4", seed=5))
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "video/mp4"
    assert response.headers["x-wan-seed"] == "5"
    info = probe_mp4(response.content)
    assert (info.width, info.height, info.num_frames) == (SMALL["width"], SMALL["height"], SMALL["num_frames"])


def test_image_request_through_torchserve(torchserve):
    response = torchserve.predict(dict(SMALL_BODY, image=png_base64(160, 96, data_url=True), width=None, height=None))
    assert response.status_code == 200, response.text
    # No size given: the model default area (256x256) with the image's 5:3 aspect, 32-px steps.
    assert (response.json()["width"], response.json()["height"]) == (320, 192)


def test_bare_prompt_uses_the_model_config_defaults(torchserve):
    # config/models/tiny-ti2v.yaml: 256x256, 33 frames; fps from the TI2V-5B table (24).
    result = torchserve.predict({"prompt": "a bare prompt"}).json()
    assert (result["width"], result["height"], result["num_frames"], result["fps"]) == (256, 256, 33, 24)


def test_streaming_gives_one_progress_line_per_step_then_result(torchserve):
    body = dict(SMALL_BODY, stream=True, num_inference_steps=5)
    with torchserve.predict(body, stream=True) as response:
        assert response.status_code == 200
        assert response.headers["Content-Type"].startswith("application/x-ndjson")
        events = [json.loads(line) for line in response.iter_lines() if line]
    assert [e["event"] for e in events] == ["progress"] * 5 + ["result"]
    assert [e["step"] for e in events[:-1]] == [1, 2, 3, 4, 5]
    assert all(e["total"] == 5 and e["elapsed_s"] >= 0 for e in events[:-1])
    assert probe_mp4(base64.b64decode(events[-1]["video"]["base64"])).num_frames == SMALL["num_frames"]


BAD_REQUESTS = [
    ({}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": 42}, "prompt"),
    ({"prompt": "x" * 5000}, "prompt"),
    ({"prompt": "cat " * 600}, "prompt"),
    ({"prompt": "x", "promt": "typo"}, "promt"),
    ({"prompt": "x", "width": 100, "height": 64}, "width"),
    ({"prompt": "x", "width": 64}, "height"),
    ({"prompt": "x", "width": "64", "height": 64}, "width"),
    ({"prompt": "x", "width": 64000, "height": 64}, "width"),
    ({"prompt": "x", "num_frames": 10}, "num_frames"),
    ({"prompt": "x", "num_frames": -3}, "num_frames"),
    ({"prompt": "x", "num_frames": 10**12}, "num_frames"),
    ({"prompt": "x", "num_inference_steps": 0}, "num_inference_steps"),
    ({"prompt": "x", "num_inference_steps": 1.5}, "num_inference_steps"),
    ({"prompt": "x", "fps": True}, "fps"),
    ({"prompt": "x", "guidance_scale": -1}, "guidance_scale"),
    ({"prompt": "x", "guidance_scale": 1e308}, "guidance_scale"),
    ({"prompt": "x", "guidance_scale_2": 3.0}, "guidance_scale_2"),
    ({"prompt": "x", "seed": -1}, "seed"),
    ({"prompt": "x", "seed": "abc"}, "seed"),
    ({"prompt": "x", "output": "gif"}, "output"),
    ({"prompt": "x", "output": "url"}, "output"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": "x", "stream": True, "output": "mp4"}, "output"),
    ({"prompt": "x", "image": "not base64!!"}, "image"),
    ({"prompt": "x", "image": base64.b64encode(b"just some text, not an image").decode()}, "image"),
    ({"prompt": "x", "image": "https://example.com/cat.png"}, "image"),
    ({"prompt": "x", "image": "data:text/plain;base64,aGVsbG8="}, "image"),
    ({"prompt": "x", "image": 7}, "image"),
]
RAW_BAD_BODIES = [b"not json", b"[1, 2, 3]", b'{"prompt": "x", "guidance_scale": NaN}', b"\xff\xfe", b'"just a string"']


def test_bad_requests_get_4xx_json_and_the_worker_survives(torchserve):
    pids_before = torchserve.worker_pids()
    for body, field in BAD_REQUESTS:
        response = torchserve.predict(body)
        assert response.status_code == 400, (body, response.text)
        error = response.json()["error"]
        assert error["field"] == field, (body, error)
        assert error["type"] == "invalid_request" and error["message"]
    for raw in RAW_BAD_BODIES:
        response = torchserve.predict(raw)
        assert response.status_code == 400, (raw, response.text)
        assert response.json()["error"]["message"]
    assert torchserve.worker_pids() == pids_before
    assert torchserve.predict(SMALL_BODY).status_code == 200


def test_oversized_image_is_413_from_the_handler(torchserve):
    # Over the handler's 16 MiB image limit, under TorchServe's 24 MiB request limit.
    huge = base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(17 * 1024 * 1024)).decode()
    response = torchserve.predict(dict(SMALL_BODY, image=huge))
    assert response.status_code == 413
    assert response.json()["error"]["field"] == "image"


def test_body_over_the_request_limit_is_413_from_torchserve(torchserve):
    response = torchserve.predict(json.dumps({"prompt": "x" * (26 * 1024 * 1024)}))
    assert response.status_code == 413


def test_scale_to_two_workers_and_back(torchserve):
    url = f"{torchserve.layout.management_url}/models/{torchserve.layout.model_name}"
    headers = torchserve.headers("management")
    response = requests.put(f"{url}?min_worker=2&synchronous=true", headers=headers, timeout=120)
    assert response.status_code == 200, response.text
    assert len(torchserve.describe()["workers"]) == 2
    assert torchserve.predict(SMALL_BODY).status_code == 200
    response = requests.put(f"{url}?min_worker=1&max_worker=1&synchronous=true", headers=headers, timeout=120)
    assert response.status_code == 200, response.text
    assert len(torchserve.describe()["workers"]) == 1
    assert torchserve.predict(SMALL_BODY).status_code == 200


def test_model_registration_over_the_api_is_off(torchserve):
    """enable_model_api=false: register and delete are refused as methods (405), with the
    management key, before any URL is looked at; with the API on, a bad URL would be a 400/404."""
    management, headers = torchserve.layout.management_url, torchserve.headers("management")
    for method, path in (("POST", "/models?url=wan.mar"), ("POST", "/models?url=https://example.com/wan.mar"),
                         ("POST", "/models?url=file:///etc/passwd"), ("DELETE", "/models/wan"),
                         ("DELETE", "/models/wan/1.0")):
        response = requests.request(method, f"{management}{path}", headers=headers, timeout=10)
        assert (response.status_code, response.json()["type"]) == (405, "MethodNotAllowedException"), \
            (method, path, response.text)
    assert [w["status"] for w in torchserve.describe()["workers"]] == ["READY"]


def test_client_streams_progress_and_saves_the_video(torchserve, tmp_path):
    client = WanClient(torchserve.layout.inference_url, key=torchserve.key())
    events = []
    result = client.generate(dict(SMALL_BODY, seed=21), events.append)
    assert [e["step"] for e in events] == list(range(1, SMALL["num_inference_steps"] + 1))
    assert result.response["seed"] == 21
    assert probe_mp4(result.mp4).num_frames == SMALL["num_frames"]
    with pytest.raises(ServerError) as raised:
        client.generate(dict(SMALL_BODY, num_frames=8))
    assert raised.value.status == 400
