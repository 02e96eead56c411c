"""In-process runs of the whole request path on each tiny layout (no TorchServe)."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import torch

from handler.envelopes import Envelope, Protocol
from handler.request import GenerationRequest, OutputKind
from handler.service import WanService
from handler.video import probe_mp4
from tests.harness.payloads import SMALL, png_base64

LAYOUT_REQUESTS = {
    "ti2v-5b": [{"prompt": "a cat surfing"}, {"prompt": "the cat jumps", "image": png_base64()}],
    "t2v-a14b": [{"prompt": "a dog running on the beach"}],
    "i2v-a14b": [{"prompt": "the scene comes alive", "image": png_base64(data_url=True)}],
}


def _cases() -> list:
    return [
        pytest.param(layout, body, id=f"{layout}-{'image' if 'image' in body else 'text'}")
        for layout, bodies in LAYOUT_REQUESTS.items()
        for body in bodies
    ]


@pytest.mark.parametrize("layout,body", _cases())
def test_generates_a_valid_mp4_on_each_layout(services, layout, body):
    service = services[layout]
    reply = service.handle(dict(body, seed=7), "req-1")
    assert reply.status == 200, reply.body
    result = reply.body
    assert result["variant"] == layout
    assert result["seed"] == 7
    assert result["request_id"] == "req-1"
    assert result["video"]["content_type"] == "video/mp4"
    info = probe_mp4(base64.b64decode(result["video"]["base64"]))
    assert (info.codec, info.pix_fmt) == ("h264", "yuv420p")
    assert (info.width, info.height, info.num_frames) == (result["width"], result["height"], result["num_frames"])
    assert info.fps == result["fps"]
    assert result["duration_s"] == pytest.approx(result["num_frames"] / result["fps"])
    for stage in ("text_encode_s", "denoise_s", "vae_decode_s", "video_encode_s", "total_s"):
        assert result["timings"][stage] >= 0
    assert result["warnings"] == []


def test_image_request_takes_the_aspect_of_the_image(services):
    # 96x64 image, default area 128x128: 3:2 aspect, floored to TI2V-5B's 32-pixel step.
    reply = services["ti2v-5b"].handle({"prompt": "x", "image": png_base64(96, 64)}, "r")
    assert (reply.body["width"], reply.body["height"]) == (128, 96)


@pytest.mark.parametrize("layout", ["ti2v-5b", "t2v-a14b", "i2v-a14b"])
def test_same_seed_gives_identical_frames(services, layout):
    # Generation itself is exact; the MP4 bytes (x264's part) are checked in test_determinism.
    service = services[layout]
    body = {"prompt": "a lighthouse at night", "seed": 1234, **SMALL,
            **({"image": png_base64()} if layout == "i2v-a14b" else {})}
    first = service.pipeline.generate(service.parse(dict(body))).frames
    second = service.pipeline.generate(service.parse(dict(body))).frames
    other = service.pipeline.generate(service.parse(dict(body, seed=99))).frames
    assert np.array_equal(first, second)
    assert not np.array_equal(first, other)


def test_flow_shift_and_boundary_are_set_explicitly(services):
    # The tiny checkpoints store flow_shift 3.0; the loader must set the variant's own values.
    expected = {"ti2v-5b": (5.0, None), "t2v-a14b": (12.0, 0.875), "i2v-a14b": (5.0, 0.900)}
    for layout, (shift, boundary) in expected.items():
        pipeline = services[layout].pipeline
        for pipe in filter(None, (pipeline.text_pipe, pipeline.image_pipe)):
            assert pipe.scheduler.config.flow_shift == shift
            assert pipe.config.boundary_ratio == boundary


def test_ti2v_image_pipeline_shares_modules_with_text_pipeline(services):
    pipeline = services["ti2v-5b"].pipeline
    assert pipeline.image_pipe is not pipeline.text_pipe
    assert pipeline.image_pipe.transformer is pipeline.text_pipe.transformer
    assert pipeline.image_pipe.vae is pipeline.text_pipe.vae


def test_mp4_output_returns_bytes_with_seed_header(services):
    reply = services["ti2v-5b"].handle({"prompt": "x", "output": "mp4", "seed": 5}, "r")
    assert reply.status == 200
    assert reply.content_type == "video/mp4"
    assert reply.headers["x-wan-seed"] == "5"
    assert probe_mp4(reply.body).num_frames == 9


def test_streaming_emits_one_progress_line_per_step_then_result(services):
    lines: list[str] = []
    reply = services["ti2v-5b"].handle({"prompt": "x", "stream": True, "num_inference_steps": 3}, "r", lines.append)
    events = [json.loads(line) for line in lines]
    assert [e["step"] for e in events] == [1, 2, 3]
    assert all(e["event"] == "progress" and e["total"] == 3 for e in events)
    assert reply.content_type == "application/x-ndjson"
    final = json.loads(reply.body)
    assert final["event"] == "result" and final["num_frames"] == 9


def test_prompt_over_the_token_limit_is_refused(services):
    reply = services["ti2v-5b"].handle({"prompt": "cat " * 600}, "r")
    assert reply.status == 400
    assert reply.body["error"]["field"] == "prompt"
    assert "512" in reply.body["error"]["message"]


def test_validation_error_in_a_stream_is_a_plain_4xx(services):
    lines: list[str] = []
    reply = services["ti2v-5b"].handle({"prompt": "x", "stream": True, "width": 33, "height": 64}, "r", lines.append)
    assert lines == []
    assert reply.status == 400 and reply.body["error"]["field"] == "width"


def test_enveloped_requests_refuse_mp4_and_stream(services):
    for extra in ({"output": "mp4"}, {"stream": True}):
        reply = services["ti2v-5b"].handle({"prompt": "x", **extra}, "r", envelope=Envelope(Protocol.KSERVE_V1))
        assert reply.status == 400, extra


def _fail_with(service, monkeypatch, exc):
    def broken(request: GenerationRequest, on_step=None, on_frames=None):
        raise exc

    monkeypatch.setattr(service.pipeline, "generate", broken)


def test_out_of_memory_is_507_and_the_next_request_works(services, monkeypatch):
    service = services["ti2v-5b"]
    _fail_with(service, monkeypatch, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80 GiB"))
    reply = service.handle({"prompt": "x"}, "r-oom")
    assert reply.status == 507
    assert reply.body["error"]["type"] == "out_of_memory"
    monkeypatch.undo()
    assert service.handle({"prompt": "x"}, "r-next").status == 200


def test_unexpected_error_is_500_naming_the_request_id(services, monkeypatch, caplog):
    service = services["ti2v-5b"]
    _fail_with(service, monkeypatch, RuntimeError("boom"))
    reply = service.handle({"prompt": "x"}, "req-bug-42")
    assert reply.status == 500
    assert "req-bug-42" in reply.body["error"]["message"]
    assert "boom" not in reply.body["error"]["message"]  # internals stay in the log
    assert any("req-bug-42" in record.getMessage() for record in caplog.records)


def test_error_after_progress_is_the_last_stream_line(services, monkeypatch):
    service = services["ti2v-5b"]

    def fail_midway(request, on_step=None, on_frames=None):
        on_step(1, request.num_inference_steps, 0.01)
        raise torch.OutOfMemoryError("out of memory")

    monkeypatch.setattr(service.pipeline, "generate", fail_midway)
    lines: list[str] = []
    reply = service.handle({"prompt": "x", "stream": True}, "r", lines.append)
    assert len(lines) == 1
    final = json.loads(reply.body)
    assert final["event"] == "error" and final["error"]["type"] == "out_of_memory"


def test_default_output_is_inline_without_storage(services):
    request = services["ti2v-5b"].parse({"prompt": "x"})
    assert request.output is OutputKind.INLINE


def test_generation_past_its_deadline_stops_itself_with_504(services):
    import dataclasses

    base = services["ti2v-5b"]
    hurried = WanService(dataclasses.replace(base.config, deadline_s=0.0001), base.pipeline)
    lines: list[str] = []
    reply = hurried.handle({"prompt": "x", "num_inference_steps": 5}, "r-slow")
    assert reply.status == 504 and reply.body["error"]["type"] == "deadline_exceeded"
    assert "step 1 of 5" in reply.body["error"]["message"]
    # Nothing streamed yet: a plain 504, not a 200 stream with an error line.
    streamed = hurried.handle({"prompt": "x", "num_inference_steps": 5, "stream": True}, "r-slow-2", lines.append)
    assert streamed.status == 504 and streamed.body["error"]["type"] == "deadline_exceeded" and lines == []
    assert base.handle({"prompt": "x"}, "r-next").status == 200


def test_deadline_defaults_to_response_timeout_less_a_margin():
    from handler.config import load_handler_config

    assert load_handler_config({"responseTimeout": 900, "handler": {"model_path": "/m"}}, "/").deadline_s == 810
    assert load_handler_config({"responseTimeout": 60, "handler": {"model_path": "/m"}}, "/").deadline_s == 50
    assert load_handler_config({"handler": {"model_path": "/m"}}, "/").deadline_s == 108


@pytest.mark.parametrize("layout", ["ti2v-5b", "t2v-a14b"])  # the Wan2.2 VAE (patchified) and the Wan2.1 one
def test_frames_reach_the_encoder_during_the_decode_exactly(services, layout):
    service = services[layout]
    request = service.parse({"prompt": "streamed", "seed": 4})
    chunks = []
    generated = service.pipeline.generate(request, on_frames=chunks.append)
    assert generated.streamed
    assert len(chunks) > 1  # one chunk per latent frame, not the whole video at the end
    assert np.array_equal(np.concatenate(chunks), generated.frames)
