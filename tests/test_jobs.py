"""The Jobs API against a live job service: real PostgreSQL (pgserver), real TorchServe on the tiny
model, the API and worker as real processes, real HTTP clients (the official openai SDK, httpx)."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import av
import httpx
import openai
import pytest
from PIL import Image
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from jobs.rules import HANDLER_FIELDS
from tests.harness.cancel import LONG_JOB, Rig, cancelled_generations
from tests.harness.jobs import SLOW_JOB, TINY_JOB, jobs_config, own_job_service, sse_events, wait_for


def png_bytes(width=96, height=64, color=(20, 160, 60)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, "PNG")
    return buffer.getvalue()


def frames_of(mp4: bytes) -> list:
    with av.open(io.BytesIO(mp4)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


@pytest.fixture(scope="module")
def alice(jobs_service):
    return jobs_service.new_key(f"alice-{uuid.uuid4().hex[:6]}")


@pytest.fixture()
def user(jobs_service):
    """A fresh user per test: their own active-job count and history."""
    return jobs_service.new_key(f"user-{uuid.uuid4().hex[:8]}")


def test_openai_sdk_round_trip(jobs_service, alice, tmp_path):
    client = openai.OpenAI(api_key=alice["key"], base_url=f"{jobs_service.url}/v1", max_retries=0,
                           http_client=openai.DefaultHttpxClient(trust_env=False))
    video = client.videos.create(model="wan", prompt="a red fox running through fresh snow", size="64x64",
                                 extra_body={"num_frames": 9, "num_inference_steps": 2, "seed": 11})
    assert video.status == "queued" and video.id.startswith("video_") and video.size == "64x64"
    deadline = time.monotonic() + 120
    while video.status in ("queued", "in_progress") and time.monotonic() < deadline:
        time.sleep(0.2)
        video = client.videos.retrieve(video.id)
    assert video.status == "completed", video
    assert video.progress == 100 and video.seconds == f"{8 / 24:g}"
    content = client.videos.download_content(video.id)
    content.write_to_file(tmp_path / "fox.mp4")
    frames = frames_of((tmp_path / "fox.mp4").read_bytes())
    assert len(frames) == 9 and frames[0].shape == (64, 64, 3)
    poster = client.videos.download_content(video.id, variant="thumbnail").read()
    assert Image.open(io.BytesIO(poster)).format == "JPEG"
    listed = client.videos.list(limit=5)
    assert video.id in [v.id for v in listed.data]
    deleted = client.videos.delete(video.id)
    assert deleted.deleted and deleted.id == video.id
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(video.id)


def test_openai_sdk_input_reference_file(jobs_service, alice, tmp_path):
    client = openai.OpenAI(api_key=alice["key"], base_url=f"{jobs_service.url}/v1", max_retries=0,
                           http_client=openai.DefaultHttpxClient(trust_env=False))
    image = tmp_path / "start.png"
    image.write_bytes(png_bytes())
    video = client.videos.create(model="wan", prompt="the meadow starts to move", input_reference=image,
                                 size="64x64", seconds="0.5", extra_body={"fps": 8, "num_inference_steps": 2})
    done = jobs_service.wait_done(jobs_service.client(alice), video.id)
    assert done["status"] == "completed", done
    assert done["parameters"]["has_image"] is True and done["parameters"]["num_frames"] == 5
    assert done["seconds"] == "0.5"


def test_every_wan_field_over_plain_http(jobs_service, alice):
    body = {
        "model": "wan", "prompt": "waves at sunset", "negative_prompt": "blurry", "width": 96, "height": 64,
        "num_frames": 5, "fps": 12, "num_inference_steps": 3, "guidance_scale": 3.5, "seed": 1234,
        "image": "data:image/png;base64," + base64.b64encode(png_bytes(96, 64)).decode(),
        "metadata": {"campaign": "spring", "ticket": "T-1"},
    }
    with jobs_service.client(alice) as client:
        created = client.post("/v1/videos", json=body)
        assert created.status_code == 200, created.text
        video = jobs_service.wait_done(client, created.json()["id"])
        assert video["status"] == "completed", video
        params = video["parameters"]
        for name in set(body) & set(HANDLER_FIELDS) - {"image"}:  # the image comes back as has_image
            assert params[name] == body[name], name
        assert video["seed"] == 1234 and video["metadata"] == body["metadata"]
        assert video["size"] == "96x64" and video["seconds"] == f"{4 / 12:g}"
        assert [a["outcome"] for a in video["attempts"]] == ["completed"]
        mp4 = client.get(f"/v1/videos/{video['id']}/content")
        assert mp4.status_code == 200 and mp4.headers["content-type"] == "video/mp4"
        assert len(frames_of(mp4.content)) == 5


BAD_BODIES = [
    ({"prompt": "x", "width": 100, "height": 64}, "width"),
    ({"prompt": "x", "num_frames": 10}, "num_frames"),
    ({"prompt": "x", "seconds": 3}, "seconds"),  # 3 s x 24 fps + 1 = 73 frames: 4k+1, but over the tiny limit
    ({"prompt": "x", "seconds": "0.3"}, "seconds"),  # 8.2 frames: not whole
    ({"prompt": "x", "fps": 24, "seconds": 0.125}, "seconds"),  # 4 frames: not 4k+1
    ({"prompt": "x", "colour": "red"}, "colour"),
    ({"prompt": ""}, "prompt"),
    ({}, "prompt"),
    ({"prompt": "x", "image": "not base64 at all!"}, "image"),
    ({"prompt": "x", "size": "big"}, "size"),
    ({"prompt": "x", "size": "64x64", "width": 64}, "size"),
    ({"prompt": "x", "guidance_scale": -1}, "guidance_scale"),
    ({"prompt": "x", "guidance_scale_2": 2.0}, "guidance_scale_2"),
    ({"prompt": "x", "model": "sora-2"}, "model"),
    ({"prompt": "x", "metadata": {"a": 1}}, "metadata"),
    ({"prompt": "x", "seed": -5}, "seed"),
    ({"prompt": "x", "output": "mp4"}, "output"),
    ({"prompt": "x", "webhook_url": "http://169.254.169.254/latest"}, "webhook_url"),
    ({"prompt": "x", "webhook_url": "ftp://example.com/x"}, "webhook_url"),
    # Fast modes (issue 14): the handler's own profile and allow-list rules, at submission.
    ({"prompt": "x", "profile": "turbo"}, "profile"),
    ({"prompt": "x", "lora": [{"name": "nope"}]}, "lora"),
    ({"prompt": "x", "lora": [{"name": "tiny-lora", "scale": 9}]}, "lora"),
    ({"prompt": "x", "profile": "lightning", "guidance_scale": 3.0}, "guidance_scale"),
]


@pytest.mark.parametrize("body,param", BAD_BODIES, ids=[p for _, p in BAD_BODIES])
def test_bad_job_is_a_400_naming_the_field_and_nothing_is_queued(jobs_service, user, body, param):
    with jobs_service.client(user) as client:
        answer = client.post("/v1/videos", json=body)
        assert answer.status_code == 400, answer.text
        error = answer.json()["error"]
        assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]
        assert client.get("/v1/videos").json()["data"] == []


def test_bad_multipart_and_bodies(jobs_service, user):
    with jobs_service.client(user) as client:
        answer = client.post("/v1/videos", data={"prompt": "x", "width": "wide", "height": "64"})
        assert answer.status_code == 400 and answer.json()["error"]["param"] == "width"
        answer = client.post("/v1/videos", files={"input_reference": ("x.png", b"not an image", "image/png")},
                             data={"prompt": "x"})
        assert answer.status_code == 400 and answer.json()["error"]["param"] == "input_reference"
        for raw in (b"[1, 2]", b"{not json", b""):
            answer = client.post("/v1/videos", content=raw, headers={"Content-Type": "application/json"})
            assert answer.status_code == 400 and "body" in answer.json()["error"]["message"]
        huge = client.post("/v1/videos", content=b"x" * (25 * 1024 * 1024), headers={"Content-Type": "application/json"})
        assert huge.status_code == 413
        assert client.get("/v1/videos").json()["data"] == []


def test_multipart_fields_read_by_type(jobs_service, user):
    with jobs_service.client(user) as client:
        answer = client.post("/v1/videos", data={"prompt": "x", "width": "64", "height": "64", "num_frames": "5",
                                                 "num_inference_steps": "2", "guidance_scale": "4.5",
                                                 "metadata[team]": "video"})
        assert answer.status_code == 200, answer.text
        video = answer.json()
        assert video["parameters"]["width"] == 64 and video["parameters"]["guidance_scale"] == 4.5
        assert video["metadata"] == {"team": "video"}
        jobs_service.wait_done(client, video["id"])


def test_auth_and_isolation(jobs_service, alice, user):
    with jobs_service.client(alice) as a, jobs_service.client(user) as b:
        video = a.post("/v1/videos", json={"prompt": "mine", **TINY_JOB}).json()
        for method, path in (("GET", ""), ("POST", "/cancel"), ("DELETE", ""), ("GET", "/content"),
                             ("GET", "/events")):
            answer = b.request(method, f"/v1/videos/{video['id']}{path}")
            assert answer.status_code == 404, (method, path, answer.status_code)
        assert video["id"] not in [v["id"] for v in b.get("/v1/videos").json()["data"]]
        admin = jobs_service.new_key(f"admin-{uuid.uuid4().hex[:6]}", admin=True)
        with jobs_service.client(admin) as c:
            assert c.get(f"/v1/videos/{video['id']}").status_code == 200
        jobs_service.wait_done(a, video["id"])
    for headers in ({}, {"Authorization": "Bearer wan_nope"}, {"Authorization": "Basic abc"}):
        answer = httpx.get(f"{jobs_service.url}/v1/videos", headers=headers, trust_env=False)
        assert answer.status_code == 401 and answer.json()["error"]["code"] == "invalid_api_key"


def test_idempotency_key(jobs_service, user):
    body = {"prompt": "once", **TINY_JOB, "seed": 5}
    with jobs_service.client(user) as client:
        first = client.post("/v1/videos", json=body, headers={"Idempotency-Key": "k1"}).json()
        again = client.post("/v1/videos", json=body, headers={"Idempotency-Key": "k1"}).json()
        assert again["id"] == first["id"]
        # The same fields as multipart are the same body.
        form = {"prompt": "once", "size": "64x64", "num_frames": "5", "num_inference_steps": "2", "seed": "5"}
        as_form = client.post("/v1/videos", data=form, headers={"Idempotency-Key": "k1"})
        assert as_form.status_code == 200 and as_form.json()["id"] == first["id"]
        other = client.post("/v1/videos", json={**body, "prompt": "twice"}, headers={"Idempotency-Key": "k1"})
        assert other.status_code == 409 and other.json()["error"]["param"] == "Idempotency-Key"
        assert len(client.get("/v1/videos").json()["data"]) == 1
        jobs_service.wait_done(client, first["id"])


def test_active_job_limit_is_a_429_with_retry_after(jobs_service, user):
    with jobs_service.client(user) as client:
        ids = [client.post("/v1/videos", json={"prompt": f"{i}", **SLOW_JOB}).json()["id"] for i in range(3)]
        refused = client.post("/v1/videos", json={"prompt": "one too many", **TINY_JOB})
        assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
        assert refused.json()["error"]["type"] == "rate_limit_error"
        for video_id in ids:
            client.post(f"/v1/videos/{video_id}/cancel")
        assert client.post("/v1/videos", json={"prompt": "room again", **TINY_JOB}).status_code == 200


def test_cancel_queued_and_running(jobs_service, user):
    with jobs_service.client(user) as client:
        running = client.post("/v1/videos", json={"prompt": "long", **SLOW_JOB}).json()
        queued = client.post("/v1/videos", json={"prompt": "waiting", **TINY_JOB}).json()
        wait_for(lambda: client.get(f"/v1/videos/{running['id']}").json()["status"] == "in_progress", 60,
                 "the long job to start")
        assert client.get(f"/v1/videos/{queued['id']}").json()["queue_position"] >= 1
        cancelled = client.post(f"/v1/videos/{queued['id']}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        wait_for(lambda: (client.get(f"/v1/videos/{running['id']}").json()["step"] or 0) >= 1, 60, "a step")
        stopped = client.post(f"/v1/videos/{running['id']}/cancel").json()
        assert stopped["status"] == "cancelled"
        assert client.post(f"/v1/videos/{running['id']}/cancel").status_code == 409
        assert client.get(f"/v1/videos/{running['id']}/content").status_code == 409
        # The queued job never reached a data plane; the running one's attempt says it was cancelled.
        time.sleep(1.0)
        assert client.get(f"/v1/videos/{queued['id']}").json()["attempts"] == []
        attempts = client.get(f"/v1/videos/{running['id']}").json()["attempts"]
        wait_for(lambda: client.get(f"/v1/videos/{running['id']}").json()["attempts"][-1]["outcome"] == "cancelled",
                 30, "the running attempt to close")
        assert len(attempts) == 1
        # Cancelled stays cancelled after the data plane finished (or dropped) the generation.
        after = client.post("/v1/videos", json={"prompt": "next", **TINY_JOB}).json()
        jobs_service.wait_done(client, after["id"])
        assert client.get(f"/v1/videos/{running['id']}").json()["status"] == "cancelled"


def test_events_from_queued_to_completed(jobs_service, user):
    with jobs_service.client(user) as client:
        blocker = client.post("/v1/videos", json={"prompt": "ahead", **SLOW_JOB}).json()
        video = client.post("/v1/videos", json={"prompt": "watch me", "size": "64x64", "num_frames": 5,
                                                "num_inference_steps": 4}).json()
        events = []
        with client.stream("GET", f"/v1/videos/{video['id']}/events", timeout=120) as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            for name, data in sse_events(stream):
                events.append((name, data))
                if name in ("completed", "failed", "cancelled"):
                    break
        client.post(f"/v1/videos/{blocker['id']}/cancel")
    names = [name for name, _ in events]
    assert names[0] == "queued" and events[0][1]["queue_position"] >= 1
    assert names[-1] == "completed" and events[-1][1]["status"] == "completed" and events[-1][1]["progress"] == 100
    steps = [data["step"] for name, data in events if name == "progress" and data["step"]]
    assert steps == [1, 2, 3, 4], events
    progress = [data for name, data in events if name == "progress" and data["step"]]
    assert all(d["total_steps"] == 4 and d["eta_s"] is not None and d["progress"] <= 99 for d in progress)
    # A finished job's stream sends its final event at once.
    with jobs_service.client(user) as client, client.stream("GET", f"/v1/videos/{video['id']}/events") as stream:
        assert next(sse_events(stream))[0] == "completed"


class _Receiver(BaseHTTPRequestHandler):
    received: ClassVar[list] = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["content-length"]))
        self.received.append((dict(self.headers), body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture()
def webhook_receiver():
    _Receiver.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


def test_signed_webhooks_to_allowed_hosts(tmp_path, jobs_torchserve, webhook_receiver):
    port = webhook_receiver.server_address[1]
    with own_job_service(tmp_path, jobs_config(jobs_torchserve),
                         env={"JOBS_WEBHOOK_ALLOWED_HOSTS": f"127.0.0.1:{port},hooks.example.com"}) as service:
        key = service.new_key("hooked")
        with service.client(key) as client:
            url = f"http://127.0.0.1:{port}/hooks"
            done = client.post("/v1/videos", json={"prompt": "ping me", **TINY_JOB, "webhook_url": url}).json()
            service.wait_done(client, done["id"])
            cancelled = client.post("/v1/videos", json={"prompt": "stop me", **SLOW_JOB, "webhook_url": url}).json()
            client.post(f"/v1/videos/{cancelled['id']}/cancel")
            for bad in (f"http://127.0.0.1:{port + 1}/x", "http://10.0.0.8/x", "http://localhost/x"):
                answer = client.post("/v1/videos", json={"prompt": "x", **TINY_JOB, "webhook_url": bad})
                assert answer.status_code == 400 and answer.json()["error"]["param"] == "webhook_url", bad
        wait_for(lambda: len(_Receiver.received) >= 2, 60, "two webhooks")
        verifier = Webhook(key["webhook_secret"])
        events = {}
        for headers, body in _Receiver.received:
            lowered = {k.lower(): v for k, v in headers.items()}
            event = verifier.verify(body, lowered)
            assert lowered["webhook-id"] == event["id"] and event["object"] == "event"
            events[event["data"]["id"]] = event["type"]
        assert events == {done["id"]: "video.completed", cancelled["id"]: "video.cancelled"}
        with pytest.raises(WebhookVerificationError):
            Webhook(service.new_key("other")["webhook_secret"]).verify(*reversed(
                [{k.lower(): v for k, v in _Receiver.received[0][0].items()}, _Receiver.received[0][1]]))


class _Flaky(BaseHTTPRequestHandler):
    """A data plane whose queue is always full: TorchServe's 503."""

    hits = 0

    def do_POST(self):
        type(self).hits += 1
        self.rfile.read(int(self.headers.get("content-length", 0)))
        body = json.dumps({"code": 503, "type": "ServiceUnavailableException",
                           "message": "Model \"wan\" has no worker to serve inference request."}).encode()
        self.send_response(503)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_endpoints_private_first_failures_retried_4xx_not(tmp_path, jobs_torchserve):
    flaky = ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    threading.Thread(target=flaky.serve_forever, daemon=True).start()
    _Flaky.hits = 0
    flaky_url = f"http://127.0.0.1:{flaky.server_address[1]}"
    config = jobs_config(
        jobs_torchserve,
        # Queue full on the private endpoint: it cools down, and the retry (same seed) goes to the
        # public one.
        burst=[{"name": "private", "url": flaky_url, "priority": 0, "key_file": None, "cooldown_s": 60},
               {"name": "public", "priority": 1}],
        # Nothing listens: connection refused, every attempt recorded, then failed with the reason.
        down=[{"name": "gone", "url": "http://127.0.0.1:9", "key_file": None}],
    )
    # A model whose rules allow more than its data plane does: the data plane's 400 fails the job.
    config["models"].append(dict(config["models"][0], name="strict",
                                 model_config=str(tmp_path / "loose.yaml")))
    (tmp_path / "loose.yaml").write_text("handler:\n  limits:\n    max_side_px: 1280\n    max_pixels: 921600\n")
    try:
        with own_job_service(tmp_path, config, env={"JOBS_MAX_ATTEMPTS": "3"}) as service:
            key = service.new_key("ops")
            with service.client(key) as client:
                burst = client.post("/v1/videos", json={"model": "burst", "prompt": "x", **TINY_JOB, "seed": 3}).json()
                down = client.post("/v1/videos", json={"model": "down", "prompt": "x", **TINY_JOB}).json()
                strict = client.post("/v1/videos", json={"model": "strict", "prompt": "x", "size": "1024x512",
                                                         "num_frames": 5, "num_inference_steps": 1}).json()
                burst = service.wait_done(client, burst["id"], 90)
                down = service.wait_done(client, down["id"], 90)
                strict = service.wait_done(client, strict["id"], 90)
        assert burst["status"] == "completed" and burst["seed"] == 3, json.dumps(burst)
        assert [(a["endpoint"], a["outcome"]) for a in burst["attempts"]] == [("private", "retry"),
                                                                              ("public", "completed")]
        assert _Flaky.hits == 1
        assert down["status"] == "failed" and down["error"]["code"] == "data_plane_unavailable"
        assert [a["outcome"] for a in down["attempts"]] == ["retry", "retry", "retry"]
        assert "gave up after 3 attempts" in down["error"]["message"]
        assert strict["status"] == "failed" and len(strict["attempts"]) == 1
        assert strict["error"]["param"] == "width" and "640" in strict["error"]["message"]
    finally:
        flaky.shutdown()


def test_models_health_and_metrics(jobs_service, alice):
    with jobs_service.client(alice) as client:
        models = client.get("/v1/models").json()["data"]
        wan = next(m for m in models if m["id"] == "wan")
        assert wan["image_input"] == "optional" and wan["defaults"]["width"] == 256 and wan["size_multiple"] == 32
        assert wan["limits"]["max_side_px"] == 640
        # What the model offers by name, from its model-config.yaml (handler.config's loader).
        assert wan["profiles"]["lightning"]["lora"] == [{"name": "tiny-lora", "scale": 1.0}]
        assert {a["name"] for a in wan["lora"]} == {"tiny-lora", "tiny-lora-b"}
        # A job with a profile and an adapter goes through to the data plane, which applies them.
        job = client.post("/v1/videos", json={"prompt": "fast", "profile": "lightning", "size": "64x64",
                                              "num_frames": 5, "lora": [{"name": "tiny-lora-b", "scale": 0.5}]})
        assert job.status_code == 200, job.text
        done = jobs_service.wait_done(client, job.json()["id"])
        assert done["status"] == "completed", done
        assert done["parameters"]["profile"] == "lightning" and done["result"]["lossy"] == []
        # A lossy profile is said on the job's record, never silently taken.
        cached = client.post("/v1/videos", json={"prompt": "cached", "profile": "cached", "size": "64x64",
                                                 "num_frames": 5, "num_inference_steps": 2}).json()
        cached = jobs_service.wait_done(client, cached["id"])
        assert cached["status"] == "completed" and cached["result"]["lossy"] == ["step_cache"], cached
        assert cached["result"]["code_version"]["package"]
    assert httpx.get(f"{jobs_service.url}/healthz", trust_env=False).status_code == 200
    assert httpx.get(f"{jobs_service.url}/readyz", trust_env=False).json()["status"] == "ready"
    text = httpx.get(f"{jobs_service.url}/metrics", trust_env=False).text
    for name in ("wan_jobs{", "wan_jobs_queue_depth{", "wan_jobs_wait_seconds_bucket", "wan_jobs_run_seconds_bucket",
                 "wan_jobs_submitted_total"):
        assert name in text, name
    assert 'wan_jobs{model="wan",status="completed"}' in text


def test_data_plane_asks_whether_a_job_is_still_wanted(tmp_path, jobs_torchserve):
    """The route the TorchServe handler's cancellation check calls: its own token, not a user's."""
    with own_job_service(tmp_path, jobs_config(jobs_torchserve), env={"JOBS_DATA_PLANE_TOKEN": "dp-secret"}) as service:
        key = service.new_key("someone")
        with service.client(key) as client:
            running = client.post("/v1/videos", json={"prompt": "long", **SLOW_JOB}).json()
            route = f"/internal/v1/videos/{running['id']}/wanted"
            # A user's key is not the data plane's: 401, and nothing about the job is told.
            assert client.get(route).status_code == 401
            with service.client("dp-secret") as plane:
                assert plane.get(route).json() == {"id": running["id"], "wanted": True}
                client.post(f"/v1/videos/{running['id']}/cancel")
                assert plane.get(route).json()["wanted"] is False
                assert plane.get("/internal/v1/videos/video_0000/wanted").json()["wanted"] is False



def test_cancel_stops_torchserve_within_a_step(tmp_path, server_weights):
    """With the handler's cancellation check on (WAN_CANCEL_URL, the data-plane token), a running
    job cancelled through the Jobs API stops in TorchServe (the handler counts it cancelled) and the
    next job runs. How soon, with and without the check: tests/harness/cancel.py, BENCHMARKS."""
    with Rig(tmp_path, server_weights, check=True) as rig:
        figures = rig.cancel_once(LONG_JOB)
        assert cancelled_generations(rig.server) == 1, figures
        # A job nobody cancels still completes with the check asking all along.
        with rig.service.client(rig.key) as client:
            kept = client.post("/v1/videos", json={"prompt": "kept", **TINY_JOB, "num_inference_steps": 4}).json()
            assert rig.service.wait_done(client, kept["id"])["status"] == "completed"
        assert cancelled_generations(rig.server) == 1
