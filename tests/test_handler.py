"""The TorchServe handler class in-process, with TorchServe's own Context and a real socket."""

from __future__ import annotations

import base64
import json
import socket
import struct
from pathlib import Path

import pytest
import yaml
from ts.context import Context, RequestProcessor

from handler.video import probe_mp4
from handler.wan_handler import WanVideoHandler
from tests.harness.payloads import SMALL


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


def test_kserve_v1_body_is_answered_as_predictions(handler_and_context):
    handler, context = handler_and_context
    _prepare(context)
    [reply] = handler.handle([{"body": {"instances": [{"prompt": "a cat", "seed": 8}]}}], context)
    assert context.get_response_status(0) == (200, "OK")
    [prediction] = reply["predictions"]
    assert prediction["seed"] == 8 and probe_mp4(base64.b64decode(prediction["video"]["base64"])).num_frames > 0


def test_kserve_v1_error_keeps_its_status_inside_predictions(handler_and_context):
    handler, context = handler_and_context
    _prepare(context)
    [reply] = handler.handle([{"body": {"instances": [{"prompt": "a cat", "output": "mp4"}]}}], context)
    assert context.get_response_status(0)[0] == 400
    assert reply["predictions"][0]["error"]["field"] == "output"  # mp4 cannot travel in a JSON envelope


def _v2(request, **extra):
    item = {"name": "wan-request", "shape": [1], "datatype": "BYTES", "data": [json.dumps(request)]}
    return {"id": "call-7", "inputs": [dict(item, **extra)]}


def test_kserve_v2_body_is_answered_in_the_open_inference_protocol(handler_and_context):
    handler, context = handler_and_context
    _prepare(context)
    [reply] = handler.handle([{"data": json.dumps(_v2({"prompt": "a cat", "seed": 4})).encode()}], context)
    assert context.get_response_status(0)[0] == 200
    assert (reply["id"], reply["model_name"]) == ("call-7", "wan")
    [output] = reply["outputs"]
    assert (output["name"], output["datatype"], output["shape"]) == ("wan-request", "BYTES", [1])
    assert output["data"][0]["seed"] == 4


@pytest.mark.parametrize(("body", "field", "words"), [
    ({"instances": "a cat"}, "instances", "must be a list"),
    ({"instances": []}, "instances", "got 0"),
    ({"instances": [{"prompt": "a"}, {"prompt": "b"}]}, "instances", "one request per call (got 2"),
    ({"instances": [{"prompt": "a"}], "signature_name": "x"}, "signature_name", "unknown field"),
    ({"inputs": "x"}, "inputs", "must be a list"),
    ({"inputs": [1]}, "inputs", "must be an object"),
    (_v2({"prompt": "a"}, datatype="FP32"), "inputs", 'must be "BYTES"'),
    (_v2({"prompt": "a"}, shape=[2]), "inputs", "shape must be [1]"),
    (_v2({"prompt": "a"}, name=""), "inputs", "name"),
    (_v2({"prompt": "a"}, data=["{}", "{}"]), "inputs", "got 2"),
    (dict(_v2({"prompt": "a"}), id=5), "id", "string"),
    (dict(_v2({"prompt": "a"}), parameters={"x": 1}), "parameters", "unknown field"),
    (_v2({"prompt": "a"}, data=["not json"]), None, "not valid JSON"),
    (_v2({"prompt": "a", "num_frames": 10}), "num_frames", "num_frames"),
])
def test_malformed_kserve_bodies_are_400s_naming_the_problem(handler_and_context, monkeypatch, body, field, words):
    """TorchServe's own envelope answered these with 503 "Prediction failed"."""
    handler, context = handler_and_context
    _prepare(context)
    if field != "num_frames":  # refused before anything is generated
        monkeypatch.setattr(handler.service.pipeline, "generate", lambda *a, **k: pytest.fail("must not generate"))
    [reply] = handler.handle([{"body": body}], context)
    assert context.get_response_status(0)[0] == 400
    error = reply["predictions"][0]["error"] if "instances" in body else reply["outputs"][0]["data"][0]["error"]
    assert error["field"] == field and words in error["message"]


@pytest.mark.parametrize("row", [
    {"prompt": "a cat"},  # a form post's fields, or a row TS_SERVICE_ENVELOPE=kserve unwrapped
    {"prompt": b"a cat", "num_frames": b"9"},  # multipart fields arrive as bytes
])
def test_rows_other_than_a_body_are_a_400_naming_json_and_the_envelope(handler_and_context, row):
    handler, context = handler_and_context
    _prepare(context)
    [reply] = handler.handle([row], context)
    assert context.get_response_status(0)[0] == 400
    assert "application/json" in reply["error"]["message"] and "envelope" in reply["error"]["message"]


def test_explain_is_refused(handler_and_context):
    handler, context = handler_and_context
    _prepare(context)
    context.request_processor = [RequestProcessor({"explain": "True"})]
    [reply] = handler.handle([{"body": {"prompt": "a cat"}}], context)
    assert context.get_response_status(0)[0] == 400 and "explanations" in reply["error"]["message"]


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
