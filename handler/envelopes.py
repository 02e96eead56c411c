"""KServe's request and response bodies (protocol v1 and v2), read and written by the handler.

TorchServe can unwrap these itself (its ``service_envelope`` / ``TS_SERVICE_ENVELOPE``), but it
does so before the handler runs: a malformed body (not JSON, a list, ``{"inputs": "x"}``) raises
inside TorchServe and the client gets 503 "Prediction failed", which reads as "retry", for
what is its own mistake. So TorchServe's envelope stays off and the body's shape says which
protocol a request speaks, on every inference path (``/v1/models/wan:predict``,
``/v2/models/wan/infer``, ``/predictions/wan``):

- ``{"instances": [request]}``: v1, answered ``{"predictions": [answer]}``;
- ``{"inputs": [{"name", "datatype": "BYTES", "shape", "data": [request]}], "id"?}``: the Open
  Inference Protocol (v2), answered ``{"id", "model_name", "model_version", "outputs":
  [{"name": "response", "datatype": "BYTES", "shape": [1], "data": ["<answer as JSON text>"]}]}``;
- anything else: the request itself, answered as it is.

v2 is read as its real clients speak it (tritonclient, KServe's own client): the binary tensor
extension (the header ``Inference-Header-Content-Length`` gives the JSON part's length, the
request follows as a length-prefixed BYTES element), ``binary_data_output`` / ``binary_data``
parameters (answered in the same binary form, which also carries ``output: "mp4"``), and errors
as the protocol's ``{"error": "<message>"}`` with the error's status. v1 answers an error inside
``predictions`` with its status, as TorchServe's envelope did.

Both carry exactly one request: each is a video of minutes, and several in one HTTP exchange
would share one status (a failure would lose the finished ones).
"""

from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass, field
from typing import Any

from handler.config import RequestLimits
from handler.errors import InvalidRequest, PayloadTooLarge, WanError
from handler.request import GenerationRequest, OutputKind, decode_body, show_value

# The binary tensor extension: the length of the JSON part of a body that carries tensors after it.
BINARY_HEADER = "Inference-Header-Content-Length"
BINARY_CONTENT_TYPE = "application/octet-stream"
OUTPUT_NAME = "response"  # the one v2 output, as on Triton (DESIGN.md, "Triton data plane")


class Protocol(enum.Enum):
    PLAIN = "plain"
    KSERVE_V1 = "v1"
    KSERVE_V2 = "v2"


@dataclass(frozen=True)
class Envelope:
    """How one request arrived, so that its answer leaves the same way."""

    protocol: Protocol
    request_id: str | None = None  # v2's optional "id", echoed in the answer
    binary_output: bool = False  # v2: the answer in the binary tensor extension

    @property
    def wrapped(self) -> bool:
        return self.protocol is not Protocol.PLAIN

    def check_output(self, request: GenerationRequest) -> None:
        """An envelope wraps every answer in one document (and KServe's path does not pass
        streams through): no stream, and MP4 bytes only in a binary v2 answer."""
        if not self.wrapped:
            return
        if request.stream:
            raise InvalidRequest("stream is not served through the KServe envelope: send it to /predictions, "
                                 "or use Triton's generate_stream", "stream")
        if request.output is OutputKind.MP4 and not self.binary_output:
            raise InvalidRequest("output 'mp4' needs binary tensor data (v2 with binary_data_output); "
                                 "in a JSON envelope use output 'inline' or 'url'", "output")

    def wrap(self, answer: Any, status: int, model_name: str, model_version: str, request_id: str) -> Wrapped:
        """The answer (a JSON-able body, or bytes for an MP4) with its status, in this protocol's
        response."""
        if self.protocol is Protocol.KSERVE_V1:
            return Wrapped({"predictions": [answer]})
        if self.protocol is not Protocol.KSERVE_V2:
            return Wrapped(answer)
        if status >= 400:
            return Wrapped({"error": error_message(answer)})
        element = answer_element(answer)
        output: dict[str, Any] = {"name": OUTPUT_NAME, "datatype": "BYTES", "shape": [1]}
        head = {"id": self.request_id or request_id, "model_name": model_name, "model_version": model_version,
                "outputs": [output]}
        if not self.binary_output:
            output["data"] = [element.decode("utf-8")]
            return Wrapped(head)
        data = struct.pack("<I", len(element)) + element
        output["parameters"] = {"binary_data_size": len(data)}
        header = json.dumps(head, separators=(",", ":")).encode("utf-8")
        return Wrapped(header + data, BINARY_CONTENT_TYPE, {BINARY_HEADER: str(len(header))})


@dataclass(frozen=True)
class Wrapped:
    """A wrapped answer: its body, and the content type and headers it needs (None: the reply's)."""

    body: Any
    content_type: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


PLAIN = Envelope(Protocol.PLAIN)


def unwrap(raw: Any, limits: RequestLimits, binary_header: str | None = None) -> tuple[Envelope, Any]:
    """The request in a body as TorchServe hands it over (bytes, text or decoded JSON), and the
    envelope its answer leaves in. ``binary_header``: the request's Inference-Header-Content-Length
    (the binary tensor extension). A refusal (a malformed body or envelope) comes back in place of
    the request, as the WanError to answer, wrapped as the envelope was detected."""
    envelope = PLAIN
    try:
        tensors = b""
        if binary_header is not None:
            raw, tensors = _split_binary(raw, binary_header, limits)
            envelope = Envelope(Protocol.KSERVE_V2)  # only v2 has the extension
        body = decode_body(raw, limits)
        envelope = detect(body)  # known before opening it: its errors leave wrapped the same way
        return open_envelope(envelope, body, tensors)
    except WanError as error:
        return envelope, error


def _split_binary(raw: Any, binary_header: str, limits: RequestLimits) -> tuple[bytes, bytes]:
    """The JSON part and the tensor data of a body in the binary tensor extension."""
    if not isinstance(raw, (bytes, bytearray)):
        raw = json.dumps(raw).encode("utf-8") if not isinstance(raw, str) else raw.encode("utf-8")
    if len(raw) > limits.max_body_bytes:
        raise PayloadTooLarge(f"request body is {len(raw)} bytes, over the {limits.max_body_bytes} byte limit")
    if not binary_header.strip().isdigit() or int(binary_header) > len(raw):
        raise InvalidRequest(f"{BINARY_HEADER} must be the length of the body's JSON part (at most "
                             f"{len(raw)}), got {show_value(binary_header)}", BINARY_HEADER)
    length = int(binary_header)
    return bytes(raw[:length]), bytes(raw[length:])


def detect(body: Any) -> Envelope:
    """The protocol a decoded body speaks, from its keys alone (never raises): neither
    ``instances`` nor ``inputs`` is a field of a request, so the shapes cannot be confused."""
    if isinstance(body, dict):
        if "instances" in body:
            return Envelope(Protocol.KSERVE_V1)
        if "inputs" in body:
            request_id = body.get("id")
            return Envelope(Protocol.KSERVE_V2, request_id=request_id if isinstance(request_id, str) else None)
    return Envelope(Protocol.PLAIN)


def open_envelope(envelope: Envelope, body: Any, tensors: bytes = b"") -> tuple[Envelope, Any]:
    """The request inside ``body`` (and the envelope, with v2's output form once known);
    ``tensors``: the binary part of a body in the binary tensor extension.

    Raises InvalidRequest naming what is wrong with the envelope; the request itself is the
    request parser's to check."""
    if envelope.protocol is Protocol.KSERVE_V1:
        _no_other_keys(body, {"instances"}, "a KServe v1 request")
        return envelope, _only(body["instances"], "instances", '{"instances": [request]}')
    if envelope.protocol is Protocol.KSERVE_V2:
        # model_name / model_version: KServe's own client sends them in the body (the URL has
        # already chosen the model; they are only checked to be text, as Triton ignores them).
        _no_other_keys(body, {"id", "model_name", "model_version", "inputs", "outputs", "parameters"},
                       "an Open Inference Protocol request")
        for key in ("id", "model_name", "model_version"):
            if body.get(key) is not None and not isinstance(body[key], str):  # null: not given
                raise InvalidRequest(f"{key} must be a string", key)
        # Only the answer's form can be asked for; anything else (priority, timeout, ...) would
        # not be honoured here, so it is refused rather than ignored.
        binary_output = _parameters(body.get("parameters"), {"binary_data_output"}, "parameters").get(
            "binary_data_output", False)
        outputs = body.get("outputs")
        if outputs is not None:
            requested = _only(outputs, "outputs", f'[{{"name": "{OUTPUT_NAME}"}}]')
            if not isinstance(requested, dict) or requested.get("name") != OUTPUT_NAME:
                raise InvalidRequest(f'the one output is "{OUTPUT_NAME}"; outputs asked for '
                                     f"{show_value(requested.get('name') if isinstance(requested, dict) else requested)}",
                                     "outputs")
            _no_other_keys(requested, {"name", "parameters"}, "outputs[0]", "outputs")
            binary_output = _parameters(requested.get("parameters"), {"binary_data"}, "outputs[0].parameters").get(
                "binary_data", binary_output)
        item = _only(body["inputs"], "inputs", '{"inputs": [{"name": ..., "datatype": "BYTES", "shape": [1], '
                                               '"data": [request as JSON text]}]}')
        if not isinstance(item, dict):
            raise InvalidRequest("inputs[0] must be an object with name, datatype, shape and data", "inputs")
        _no_other_keys(item, {"name", "datatype", "shape", "data", "parameters"}, "inputs[0]", "inputs")
        size = _parameters(item.get("parameters"), {"binary_data_size"}, "inputs[0].parameters").get(
            "binary_data_size")
        name = item.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidRequest("inputs[0].name must be a non-empty string", "inputs")
        if item.get("datatype") != "BYTES":
            raise InvalidRequest(f'inputs[0].datatype must be "BYTES" (the request as JSON text), '
                                 f"got {show_value(item.get('datatype'))}", "inputs")
        if item.get("shape") != [1]:
            raise InvalidRequest(f"inputs[0].shape must be [1] (one request), got {show_value(item.get('shape'))}",
                                 "inputs")
        opened = Envelope(Protocol.KSERVE_V2, envelope.request_id, binary_output is True)
        if size is not None or tensors:
            return opened, _binary_element(tensors, size)
        data = item.get("data")
        # BYTES data is a list of elements; a bare element is accepted as that list of one.
        request = _only(data, "inputs", "inputs[0].data: [request as JSON text]") if isinstance(data, list) else data
        if isinstance(request, str):
            request = request.encode("utf-8")  # the request parser reads it as a body (size limit first)
        return opened, request
    return envelope, body


def _parameters(parameters: Any, known: set[str], where: str) -> dict[str, Any]:
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise InvalidRequest(f"{where} must be an object", where.split(".")[0])
    _no_other_keys(parameters, known, where, where.split(".")[0])
    for name, value in parameters.items():
        expected = int if name == "binary_data_size" else bool
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise InvalidRequest(f"{where}.{name} must be {'an integer' if expected is int else 'true or false'}, "
                                 f"got {show_value(value)}", where.split(".")[0])
    return parameters


def _binary_element(tensors: bytes, size: Any) -> bytes:
    """The one BYTES element of a request sent as binary tensor data: a 4-byte little-endian
    length, then that many bytes."""
    if size is None or size != len(tensors):
        raise InvalidRequest(f"inputs[0].parameters.binary_data_size must be the length of the binary data "
                             f"after the JSON part ({len(tensors)} bytes), got {show_value(size)}", "inputs")
    if len(tensors) < 4 or struct.unpack("<I", tensors[:4])[0] != len(tensors) - 4:
        raise InvalidRequest("inputs[0]'s binary data must be one BYTES element: a 4-byte little-endian length, "
                             "then the request as JSON text", "inputs")
    return tensors[4:]


def _no_other_keys(body: dict, allowed: set[str], what: str, field: str | None = None) -> None:
    """``field``: the top-level key a nested object sits under (an error names a field of the body
    the client sent); None: the unknown key itself, at the top level."""
    extra = sorted(set(body) - allowed, key=str)
    if extra:
        shown = ", ".join(str(key)[:40] for key in extra[:5])
        raise InvalidRequest(f"unknown field(s) in {what}: {shown}; accepted: {', '.join(sorted(allowed))}",
                             field or extra[0])


def _only(items: Any, field: str, shape: str) -> Any:
    if not isinstance(items, list):
        raise InvalidRequest(f"{field} must be a list holding one request: {shape}", field)
    if len(items) != 1:
        raise InvalidRequest(f"send one request per call (got {len(items)} in {field}): each is a video "
                             "that takes minutes, and several would share one status", field)
    return items[0]


def answer_element(body: Any) -> bytes:
    """An answer as one BYTES element of the Open Inference Protocol: the MP4's bytes, or the
    text of the JSON answer (an NDJSON line without its newline)."""
    if isinstance(body, (bytes, bytearray)):
        return bytes(body)
    if isinstance(body, str):
        return body.strip().encode("utf-8")
    return json.dumps(body, separators=(",", ":")).encode("utf-8")


def error_message(body: Any) -> str:
    """The message of an error answer (``{"error": {"message": ...}}``, decoded or as JSON
    text), as the protocol's ``{"error": "<message>"}`` carries it."""
    if isinstance(body, (bytes, bytearray, str)):
        try:
            body = json.loads(body)
        except ValueError:
            return str(body)[:1000]
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return error["message"]
    return json.dumps(body)[:1000]
