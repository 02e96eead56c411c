"""The Open Inference Protocol (KServe v2) as its real clients speak it, against both data planes.

tritonclient.http (the reference client: binary tensors by default, ``binary_data_output`` asked
for) and KServe's own Python client, unchanged and with their default parameters, against the
TorchServe handler (``/v2/models/wan/infer``) and Triton (``wan``): good requests give the JSON
answer (or the MP4's bytes), bad ones a 400 whose message, the handler's, the client can read.
tritonclient.grpc against Triton is in tests/test_triton.py (TorchServe's OIP gRPC is not served).
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from handler.video import probe_mp4
from scripts.triton_serve import TRITON_VENV
from tests.harness.payloads import SMALL

BODY = {"prompt": "a paper boat on a river", **SMALL}
BAD = ({"prompt": "x", "num_frames": 10}, "num_frames")


@dataclass(frozen=True)
class Plane:
    name: str
    base_url: str  # http://127.0.0.1:<port>
    model: str = "wan"
    token: dict[str, str] = field(default_factory=dict)  # TorchServe's inference token

    @property
    def headers(self) -> dict[str, str]:
        # A new dict per call: tritonclient writes Inference-Header-Content-Length into the one it
        # is given, and a stale one would split the next (JSON) body.
        return dict(self.token)

    @property
    def host(self) -> str:
        return self.base_url.removeprefix("http://")


@pytest.fixture(scope="module", params=["torchserve", "triton"])
def plane(request) -> Plane:
    server = request.getfixturevalue(request.param)
    if request.param == "torchserve":
        return Plane("torchserve", server.layout.inference_url, server.layout.model_name, server.headers())
    return Plane("triton", server.http_url)


@pytest.fixture(scope="module")
def client(plane):
    client = httpclient.InferenceServerClient(plane.host, network_timeout=120, connection_timeout=10)
    yield client
    client.close()


def _input(document, binary: bool):
    tensor = httpclient.InferInput("request", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([json.dumps(document).encode("utf-8")], dtype=np.object_), binary_data=binary)
    return tensor


def _handler_message(document) -> str:
    """What the handler says about a bad request: the same text on both data planes, with no
    wrapping around it (tests/test_triton.py compares the whole corpus with TorchServe's)."""
    from handler.config import RequestLimits
    from handler.errors import InvalidRequest
    from handler.request import parse_request
    from handler.variants import TI2V_5B

    with pytest.raises(InvalidRequest) as refused:
        parse_request(document, TI2V_5B, TI2V_5B.defaults, RequestLimits(), False)
    return refused.value.message


@pytest.mark.parametrize("binary", [True, False], ids=["binary-tensors", "json-tensors"])
def test_tritonclient_with_its_defaults_gets_the_json_answer(plane, client, binary):
    # No outputs named: tritonclient asks for binary_data_output, the answer comes back binary.
    result = client.infer(plane.model, [_input(dict(BODY, seed=7), binary)], request_id="oip-1",
                          headers=plane.headers)
    assert result.get_response()["id"] == "oip-1"
    answer = json.loads(result.as_numpy("response")[0])
    assert answer["seed"] == 7 and answer["variant"] == "ti2v-5b"
    info = probe_mp4(base64.b64decode(answer["video"]["base64"]))
    assert (info.width, info.height, info.num_frames) == (SMALL["width"], SMALL["height"], SMALL["num_frames"])


def test_tritonclient_json_output_and_mp4_bytes(plane, client):
    as_json = client.infer(plane.model, [_input(dict(BODY, seed=2), False)], headers=plane.headers,
                           outputs=[httpclient.InferRequestedOutput("response", binary_data=False)])
    assert json.loads(as_json.as_numpy("response")[0])["seed"] == 2
    mp4 = client.infer(plane.model, [_input(dict(BODY, output="mp4"), True)], headers=plane.headers)
    assert probe_mp4(mp4.as_numpy("response")[0]).num_frames == SMALL["num_frames"]


@pytest.mark.parametrize("binary", [True, False], ids=["binary-tensors", "json-tensors"])
def test_tritonclient_reads_the_handlers_400(plane, client, binary):
    document, name = BAD
    with pytest.raises(InferenceServerException) as refused:
        client.infer(plane.model, [_input(document, binary)], headers=plane.headers)
    assert refused.value.status() == "400"
    assert refused.value.message() == _handler_message(document) and name in refused.value.message()


def _kserve(plane: Plane, document, binary: bool) -> dict:
    """One call of KServe's client, in the Triton venv (where kserve is installed)."""
    python = Path(TRITON_VENV) / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY")}
    job = {"base_url": plane.base_url, "model": plane.model, "request": document, "binary": binary,
           "headers": plane.headers}
    done = subprocess.run([str(python), str(Path(__file__).with_name("kserve_v2_client.py"))], input=json.dumps(job),
                          capture_output=True, text=True, timeout=180, env=env, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.mark.parametrize("binary", [True, False], ids=["binary-tensors", "json-tensors"])
def test_kserve_client_good_and_bad_requests(plane, binary):
    good = _kserve(plane, dict(BODY, seed=5), binary)
    assert good["status"] == 200 and good["output"] == "response" and good["answer"]["seed"] == 5
    bad = _kserve(plane, BAD[0], binary)
    assert bad["status"] == 400 and json.loads(bad["body"]) == {"error": _handler_message(BAD[0])}
    if plane.name == "torchserve":
        # KServe's client puts the message in its exception only for "application/json"; Triton
        # answers its errors as text/plain (the same JSON): there it is read from error.response.
        assert bad["content_type"] == "application/json" and _handler_message(BAD[0]) in bad["error"]
