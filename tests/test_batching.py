"""Dynamic batching (issue #17), in-process on the tiny checkpoints: requests with the same size,
frames, steps and guidance are denoised together, each with its own prompt and seed, and get the
frames they get alone; other shapes are split off, a bad request is refused alone."""

from __future__ import annotations

import dataclasses
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import yaml

from handler.errors import Cancelled
from handler.request import parse_request
from handler.service import BatchItem
from handler.video import probe_mp4
from scripts.serve import local_session
from tests.harness.payloads import SMALL, png_base64
from tests.harness.servers import TINY_CONFIG, start_server, start_triton, stop_server


def _request(service, **body):
    return parse_request({"prompt": "x", **SMALL, **body}, service.spec, service.defaults, service.config.limits,
                         False)


@pytest.mark.parametrize("layout", ["ti2v-5b", "t2v-a14b"])
def test_a_batch_gives_each_request_its_own_frames(services, layout):
    service = services[layout]
    pipeline = service.pipeline
    reqs = [_request(service, prompt="a red fox", seed=3), _request(service, prompt="a boat", seed=9,
                                                                    negative_prompt="blurry")]
    assert pipeline.batch_key(reqs[0]) == pipeline.batch_key(reqs[1])
    steps: list[list[int]] = [[], []]
    batched = pipeline.generate_batch(reqs, [lambda s, t, e, i=i: steps[i].append(s) for i in range(2)], [None, None])
    for req, together, seen in zip(reqs, batched, steps, strict=True):
        alone = pipeline.generate(req).frames
        # Equal up to float rounding: a batched matmul sums in another order (~1e-6 on the
        # latents), which moves a pixel by one level at most after the decode.
        assert together.frames.shape == alone.shape
        assert int(np.abs(together.frames.astype(int) - alone.astype(int)).max()) <= 1
        assert float(np.mean(together.frames != alone)) < 0.01
        assert seen == list(range(1, SMALL["num_inference_steps"] + 1))
    assert int(np.abs(batched[0].frames.astype(int) - batched[1].frames.astype(int)).max()) > 1  # not one video twice


def test_other_shapes_and_images_are_never_batched(services):
    service = services["ti2v-5b"]
    key = service.pipeline.batch_key
    base = _request(service, seed=1)
    assert key(base) == key(_request(service, seed=2, prompt="other"))
    for change in ({"width": 96}, {"num_frames": 13}, {"num_inference_steps": 3}, {"guidance_scale": 2.0}):
        assert key(_request(service, **change)) != key(base), change
    assert key(_request(service, image=png_base64(128, 128))) is None
    # What a profile or the adapters set on the pipeline is one value for the whole batch.
    for change in ({"scheduler": "euler"}, {"flow_shift": 3.0}, {"lossy": ("step_cache",)}):
        assert key(dataclasses.replace(base, **change)) != key(base), change


def test_handle_batch_splits_mixed_shapes_and_refuses_a_bad_one_alone(services):
    service = services["ti2v-5b"]
    items = [
        BatchItem({"prompt": "one", "seed": 1, **SMALL}, "r1"),
        BatchItem({"prompt": "two", "seed": 2, **SMALL}, "r2"),
        BatchItem({"prompt": "bad", **SMALL, "num_frames": 10}, "r3"),
        BatchItem({"prompt": "wide", "seed": 4, **SMALL, "width": 192}, "r4"),
        BatchItem({"prompt": "mp4", "seed": 5, **SMALL, "output": "mp4"}, "r5"),
    ]
    replies = service.handle_batch(items)
    assert [r.status for r in replies] == [200, 200, 400, 200, 200]
    assert replies[2].body["error"]["field"] == "num_frames"
    assert [replies[i].body["seed"] for i in (0, 1, 3)] == [1, 2, 4]
    assert [replies[i].body["request_id"] for i in (0, 1, 3)] == ["r1", "r2", "r4"]
    assert replies[3].body["width"] == 192
    assert replies[4].headers["x-wan-seed"] == "5" and probe_mp4(replies[4].body).num_frames == SMALL["num_frames"]


def test_a_cancelled_request_leaves_its_batch_mates_running(services):
    service = services["ti2v-5b"]
    lines: list[str] = []
    body = {**SMALL, "num_inference_steps": 4}
    items = [
        BatchItem({"prompt": "stays", "seed": 1, **body, "stream": True}, "r1", emit=lines.append),
        BatchItem({"prompt": "goes", "seed": 2, **body}, "r2", cancelled=iter([False, False, True, True]).__next__),
    ]
    stays, goes = service.handle_batch(items)
    assert goes.status == Cancelled.http_status and "after step 2 of 4" in goes.body["error"]["message"]
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]
    assert json.loads(stays.body)["event"] == "result"


def test_a_batch_whose_requests_all_stop_ends_early(services):
    service = services["ti2v-5b"]
    items = [BatchItem({"prompt": p, **SMALL, "num_inference_steps": 4}, p, cancelled=iter([False, True]).__next__)
             for p in ("a", "b")]
    assert [r.status for r in service.handle_batch(items)] == [499, 499]


# -- the real servers: TorchServe's batchSize, Triton's dynamic batcher --------------------------

BLOCKER = {"prompt": "keeps the worker busy", "width": 256, "height": 256, "num_frames": 33,
           "num_inference_steps": 20}
# Queued behind the blocker, so the server hands them over together: two of one shape, one other.
TRIO = [dict(SMALL, prompt="one", seed=21), dict(SMALL, prompt="two", seed=22),
        dict(SMALL, prompt="wide", seed=23, width=192)]
BATCH_OF_TWO = re.compile(r"denoising 2 requests in one batch")


def _behind_a_blocker(send, bodies: list[dict]) -> list:
    """Send the blocker, then (once it runs) ``bodies`` at once; the answers to ``bodies``."""
    with ThreadPoolExecutor(max_workers=len(bodies) + 1) as pool:
        blocker = pool.submit(send, BLOCKER)
        time.sleep(1.5)  # the blocker has reached the worker (a few seconds of work)
        answers = list(pool.map(send, bodies))
        assert blocker.result()[0] == 200
    return answers


@pytest.fixture(scope="module")
def batching_torchserve(tmp_path_factory, server_weights):
    root = tmp_path_factory.mktemp("torchserve-batching")
    config = yaml.safe_load(TINY_CONFIG.read_text())
    config.update(batchSize=4, maxBatchDelay=500, minWorkers=1, maxWorkers=1)
    path = root / "tiny-ti2v-batching.yaml"
    path.write_text(yaml.safe_dump(config))
    server = start_server(root / "server", server_weights, model_config=path)
    yield server
    stop_server(server)


def test_torchserve_batch_size_denoises_one_shape_together(batching_torchserve):
    server = batching_torchserve
    log = server.layout.run_dir / "logs" / "model_log.log"

    def send(body):
        response = server.predict(body)
        return response.status_code, response.json()

    before = len(BATCH_OF_TWO.findall(log.read_text(errors="replace")))
    answers = _behind_a_blocker(send, [*TRIO, dict(SMALL, prompt="bad", num_frames=10)])
    assert [status for status, _ in answers] == [200, 200, 200, 400]
    assert [answer["seed"] for _, answer in answers[:3]] == [21, 22, 23]
    assert answers[2][1]["width"] == 192 and answers[3][1]["error"]["field"] == "num_frames"
    assert len(BATCH_OF_TWO.findall(log.read_text(errors="replace"))) == before + 1


@pytest.fixture(scope="module")
def batching_triton(tmp_path_factory, server_weights):
    from scripts.triton_serve import stop as stop_triton

    # Eight: the plain wan runs max_batch_size instances, each waiting on wan_stream for one
    # request; the blocker holds one and the four behind it need one each (with 4 the fourth
    # waited in wan's own queue and the batch was whichever three came first).
    layout = start_triton(tmp_path_factory.mktemp("triton-batching"), server_weights, max_batch_size=8)
    yield layout
    stop_triton(layout)


def test_triton_dynamic_batching_denoises_one_shape_together(batching_triton):
    triton = batching_triton

    def send(body):
        document = {"inputs": [{"name": "request", "shape": [1], "datatype": "BYTES", "data": [json.dumps(body)]}]}
        with local_session() as session:
            response = session.post(f"{triton.http_url}/v2/models/wan/infer", json=document, timeout=180)
        payload = response.json()
        return response.status_code, json.loads(payload["outputs"][0]["data"][0]) if response.ok else payload

    before = len(BATCH_OF_TWO.findall(triton.log_file.read_text(errors="replace")))
    answers = _behind_a_blocker(send, [*TRIO, dict(SMALL, prompt="bad", num_frames=10)])
    assert [status for status, _ in answers] == [200, 200, 200, 400]
    assert [answer["seed"] for _, answer in answers[:3]] == [21, 22, 23]
    assert answers[3][1]["error"].startswith("num_frames must be 4k+1")
    assert len(BATCH_OF_TWO.findall(triton.log_file.read_text(errors="replace"))) == before + 1
