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
  [{"name", "datatype": "BYTES", "shape": [1], "data": [answer]}]}``;
- anything else: the request itself, answered as it is.

The answer, error or not, goes in the same wrapping with its own HTTP status, as TorchServe's
envelopes did. Both carry exactly one request: each is a video of minutes, and several in one
HTTP exchange would share one status (a failure would lose the finished ones).
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from typing import Any

from handler.config import RequestLimits
from handler.errors import InvalidRequest, WanError
from handler.request import GenerationRequest, OutputKind, decode_body, show_value


class Protocol(enum.Enum):
    PLAIN = "plain"
    KSERVE_V1 = "v1"
    KSERVE_V2 = "v2"


@dataclass(frozen=True)
class Envelope:
    """How one request arrived, so that its answer leaves the same way."""

    protocol: Protocol
    request_id: str | None = None  # v2's optional "id", echoed in the answer
    input_name: str = "request"  # v2's input name, echoed as the output's name

    @property
    def wrapped(self) -> bool:
        return self.protocol is not Protocol.PLAIN

    def check_output(self, request: GenerationRequest) -> None:
        """An envelope wraps every answer in a JSON document (and KServe's path does not pass
        streams through): only JSON outputs can travel in one."""
        if self.wrapped and (request.stream or request.output is OutputKind.MP4):
            raise InvalidRequest("through the KServe envelope, use output 'inline' or 'url' without stream", "output")

    def wrap(self, answer: Any, model_name: str, model_version: str, request_id: str) -> Any:
        """The answer (a JSON-able body, or bytes for a plain MP4) in this protocol's response."""
        if self.protocol is Protocol.KSERVE_V1:
            return {"predictions": [answer]}
        if self.protocol is Protocol.KSERVE_V2:
            return {
                "id": self.request_id or request_id,
                "model_name": model_name,
                "model_version": model_version,
                "outputs": [{"name": self.input_name, "datatype": "BYTES", "shape": [1], "data": [answer]}],
            }
        return answer


PLAIN = Envelope(Protocol.PLAIN)


def unwrap(raw: Any, limits: RequestLimits) -> tuple[Envelope, Any]:
    """The request in a body as TorchServe hands it over (bytes, text or decoded JSON), and the
    envelope its answer leaves in. A refusal (a malformed body or envelope) comes back in place of
    the request, as the WanError to answer, wrapped as the envelope was detected."""
    envelope = PLAIN
    try:
        body = decode_body(raw, limits)
        envelope = detect(body)  # known before opening it: its errors leave wrapped the same way
        return open_envelope(envelope, body)
    except WanError as error:
        return envelope, error


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


def open_envelope(envelope: Envelope, body: Any) -> tuple[Envelope, Any]:
    """The request inside ``body`` (and the envelope, with v2's input name once known).

    Raises InvalidRequest naming what is wrong with the envelope; the request itself is the
    request parser's to check."""
    if envelope.protocol is Protocol.KSERVE_V1:
        _no_other_keys(body, {"instances"}, "a KServe v1 request")
        return envelope, _only(body["instances"], "instances", '{"instances": [request]}')
    if envelope.protocol is Protocol.KSERVE_V2:
        # No "parameters" or requested "outputs": nothing here would honour them.
        _no_other_keys(body, {"id", "inputs"}, "an Open Inference Protocol request")
        if body.get("id") is not None and not isinstance(body["id"], str):  # null: not given
            raise InvalidRequest("id must be a string", "id")
        item = _only(body["inputs"], "inputs", '{"inputs": [{"name": ..., "datatype": "BYTES", "shape": [1], '
                                               '"data": [request as JSON text]}]}')
        if not isinstance(item, dict):
            raise InvalidRequest("inputs[0] must be an object with name, datatype, shape and data", "inputs")
        name = item.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidRequest("inputs[0].name must be a non-empty string", "inputs")
        if item.get("datatype") != "BYTES":
            raise InvalidRequest(f'inputs[0].datatype must be "BYTES" (the request as JSON text), '
                                 f"got {show_value(item.get('datatype'))}", "inputs")
        if item.get("shape") != [1]:
            raise InvalidRequest(f"inputs[0].shape must be [1] (one request), got {show_value(item.get('shape'))}",
                                 "inputs")
        data = item.get("data")
        # BYTES data is a list of elements; a bare element is accepted as that list of one.
        request = _only(data, "inputs", "inputs[0].data: [request as JSON text]") if isinstance(data, list) else data
        if isinstance(request, str):
            request = request.encode("utf-8")  # the request parser reads it as a body (size limit first)
        return Envelope(Protocol.KSERVE_V2, envelope.request_id, name), request
    return envelope, body


def _no_other_keys(body: dict, allowed: set[str], what: str) -> None:
    extra = sorted(set(body) - allowed, key=str)
    if extra:
        shown = ", ".join(str(key)[:40] for key in extra[:5])
        raise InvalidRequest(f"unknown field(s) in {what}: {shown}; accepted: {', '.join(sorted(allowed))}", extra[0])


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
