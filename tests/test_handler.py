"""The TorchServe handler class in-process, with TorchServe's own Context and a real socket."""

from __future__ import annotations

import json
import socket
import struct
from pathlib import Path

import pytest
import yaml
from ts.context import Context, RequestProcessor

from handler.video import probe_mp4
from handler.wan_handler import WanVideoHandler
from tests.conftest import SMALL


def _context(model_dir, model_yaml):
    context = Context("wan", str(model_dir), {"model": {"modelName": "wan"}}, 1, None, "0.12.0",
                      model_yaml_config=model_yaml)
    return context


def _prepare(context, request_id="req-1"):
    context.request_ids = {0: request_id}
    context.request_processor = [RequestProcessor({})]


@pytest.fixture(scope="module")
def handler_and_context(tiny_checkpoints):
    path = tiny_checkpoints["ti2v-5b"]
    config = yaml.safe_load(Path("config/models/tiny-ti2v.yaml").read_text())
    config["handler"]["model_path"] = str(path)
    config["handler"]["defaults"] = dict(SMALL)
    context = _context(path.parent, config)
    handler = WanVideoHandler()
    handler.initialize(context)
    return handler, context


def test_json_request_gives_inline_video(handler_and_context):
    handler, context = handler_and_context
    _prepare(context)
    [reply] = handler.handle([{"body": {"prompt": "a cat", "seed": 3}}], context)
    assert context.get_response_status(0) == (200, "OK")
    assert context.get_response_content_type(0) == "application/json"
    assert reply["seed"] == 3 and reply["request_id"] == "req-1"


def test_bytes_body_and_mp4_output(handler_and_context):
    handler, context = handler_and_context
    _prepare(context)
    [reply] = handler.handle([{"data": json.dumps({"prompt": "a cat", "output": "mp4"}).encode()}], context)
    assert context.get_response_content_type(0) == "video/mp4"
    assert probe_mp4(reply).num_frames == SMALL["num_frames"]


def test_invalid_request_sets_400_with_json_error(handler_and_context):
    handler, context = handler_and_context
    _prepare(context)
    [reply] = handler.handle([{"body": {"prompt": "a cat", "num_frames": 10}}], context)
    assert context.get_response_status(0) == (400, "Bad Request")
    assert reply["error"]["field"] == "num_frames"


def test_missing_body_is_400(handler_and_context):
    handler, context = handler_and_context
    _prepare(context)
    [reply] = handler.handle([{}], context)
    assert context.get_response_status(0)[0] == 400
    assert "Content-Type: application/json" in reply["error"]["message"]


def test_kserve_instances_are_recognised_as_enveloped(handler_and_context):
    handler, context = handler_and_context
    _prepare(context)
    # Under the KServe envelope TorchServe passes the instances themselves, not {"body": ...}.
    [reply] = handler.handle([{"prompt": "a cat", "output": "mp4"}], context)
    assert context.get_response_status(0)[0] == 400
    assert "envelope" in reply["error"]["message"]


def _read_frames(sock) -> list[bytes]:
    """Read TorchServe's predict-response frames off the socket and return their bodies."""
    data = b""
    sock.settimeout(5)
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        pass
    bodies, offset = [], 0

    def read_int():
        nonlocal offset
        value = struct.unpack("!i", data[offset:offset + 4])[0]
        offset += 4
        return value

    def read_buf():
        nonlocal offset
        length = read_int()
        value = data[offset:offset + length]
        offset += length
        return value

    while offset < len(data):
        read_int()  # code
        read_buf()  # message
        read_buf()  # request id
        read_buf()  # content type
        read_int()  # status
        read_buf()  # phrase
        for _ in range(read_int()):  # headers
            read_buf()
            read_buf()
        bodies.append(read_buf())
        offset += 4  # the -1 end-of-list marker
    return bodies


def test_streaming_goes_out_as_intermediate_responses(handler_and_context):
    handler, context = handler_and_context
    _prepare(context)
    ours, theirs = socket.socketpair()
    context.cl_socket = ours
    try:
        [final] = handler.handle([{"body": {"prompt": "a cat", "stream": True, "num_inference_steps": 3}}], context)
        ours.shutdown(socket.SHUT_WR)
        chunks = _read_frames(theirs)
    finally:
        ours.close()
        theirs.close()
    events = [json.loads(chunk) for chunk in chunks]
    assert [e["step"] for e in events] == [1, 2, 3]
    assert context.get_response_content_type(0) == "application/x-ndjson"
    assert json.loads(final)["event"] == "result"


def test_kserve_v2_input_row_carries_the_request_as_json_text(handler_and_context):
    handler, context = handler_and_context
    _prepare(context)
    row = {"name": "request", "shape": [1], "datatype": "BYTES", "data": json.dumps({"prompt": "a cat", "seed": 4})}
    [reply] = handler.handle([row], context)
    assert context.get_response_status(0)[0] == 200 and reply["seed"] == 4


def test_several_instances_are_refused_before_any_generation(handler_and_context, monkeypatch):
    handler, context = handler_and_context
    _prepare(context)
    monkeypatch.setattr(handler.service, "handle", lambda *a, **k: pytest.fail("must not generate"))
    replies = handler.handle([{"prompt": "a"}, {"prompt": "b"}], context)
    assert context.get_response_status(0)[0] == 400
    assert len(replies) == 2 and replies[0]["error"]["field"] == "instances"
