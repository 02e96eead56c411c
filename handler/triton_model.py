"""Triton entry points: adapt the Python backend's calling convention to ``WanService``.

A Triton model repository (built by model_store/triton_repo.py) holds two models over one service:

- ``wan_stream``, decoupled: holds the service (the weights are loaded once, here). Each request
  gets one response per denoising step when it asks for ``stream: true`` (the event's JSON), then
  its final one; ``request.is_cancelled()`` is asked at every step, streamed or not.
- ``wan``, plain: Triton serves a decoupled model only through streaming calls (HTTP
  ``generate_stream``, gRPC streams), while KServe's v2 REST and most clients call ``/infer``. It
  forwards each request to ``wan_stream`` (BLS) and hands back the final answer.

Each model's ``1/model.py`` is one import of a class from here (as wan_handler.py is for
TorchServe). Nothing here decides about a request: the rules, the generation, the storage and
the error mapping are the service's; this module moves bytes and statuses between Triton and it.
"""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils
import yaml

from handler.envelopes import answer_element, error_message
from handler.service import BatchItem, WanService

log = logging.getLogger(__name__)

# The tensors of the contract (DESIGN.md, "Triton data plane"): one JSON request document in,
# one answer out (the JSON answer, an event, or the MP4's bytes).
INPUT_NAME = "request"
OUTPUT_NAME = "response"
MODEL_CONFIG_FILE = "model-config.yaml"
# Request parameter set by ``wan`` on what it forwards. A BLS call turns any error code into
# INTERNAL (and 2.51 has no response parameters): for a forwarded request, ``wan_stream`` sends
# its error's message as JSON with the reply's status, {"wan_status": 400, "message": ...}, and
# ``wan`` raises the error with the right code on its side.
FORWARDED = "wan_forwarded"
FORWARDED_STATUS = "wan_status"
# The reply's HTTP status as Triton's error code; Triton's HTTP frontend turns INVALID_ARG into
# 400, UNAVAILABLE into 503, CANCELLED into 499? and INTERNAL into 500 (no 413, 504 or 507 there).
_CODES = {400: "INVALID_ARG", 413: "INVALID_ARG", 499: "CANCELLED", 502: "UNAVAILABLE", 504: "UNAVAILABLE",
          507: "UNAVAILABLE"}


def _error(status: int, message: str):
    code = getattr(pb_utils.TritonError, _CODES.get(status, "INTERNAL"))
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))


def _forwarded_error(message: str) -> tuple[int, str] | None:
    """The status and message ``wan_stream`` sent for a forwarded request; None for Triton's own
    errors (the target unloaded, its stub dead)."""
    try:
        error = json.loads(message)
        return int(error[FORWARDED_STATUS]), str(error["message"])
    except (ValueError, TypeError, KeyError):
        return None


def _request_bytes(request) -> bytes:
    """The one JSON request document of a Triton request (shape [1], or [1, 1] when batching)."""
    tensor = pb_utils.get_input_tensor_by_name(request, INPUT_NAME)
    values = tensor.as_numpy().reshape(-1)
    value = values[0] if len(values) == 1 else None
    return value if isinstance(value, bytes) else b""


def _response(data: bytes, shape: tuple[int, ...]):
    tensor = pb_utils.Tensor(OUTPUT_NAME, np.array([data], dtype=np.object_).reshape(shape))
    return pb_utils.InferenceResponse(output_tensors=[tensor])


class WanStreamModel:
    """``wan_stream``: the service, answering each request through its response sender."""

    def initialize(self, args: dict[str, str]) -> None:
        # The stub's stderr is the server's log: the handler's lines (a cancellation, a failure) go there.
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        model_dir = Path(args["model_repository"])
        model_yaml = yaml.safe_load((model_dir / MODEL_CONFIG_FILE).read_text()) or {}
        gpu_id = args.get("model_instance_device_id") if args.get("model_instance_kind") == "GPU" else None
        self.service = WanService.from_model_config(
            model_yaml, model_dir, int(gpu_id) if gpu_id is not None else None,
            model={"name": args["model_name"], "version": args["model_version"]},
        )
        config = json.loads(args["model_config"])
        # With Triton's batching on, every tensor has the batch dimension first.
        self.output_shape = (1, 1) if config.get("max_batch_size", 0) > 0 else (1,)

    def execute(self, requests) -> None:
        # Decoupled: every answer leaves through the request's sender, nothing is returned. With
        # dynamic batching on, Triton hands over the requests it gathered: the service denoises
        # those of one shape together and answers each on its own.
        senders, forwarded, items = [], [], []
        for request in requests:
            sender = request.get_response_sender()
            senders.append(sender)
            forwarded.append(json.loads(request.parameters() or "{}").get(FORWARDED, False))
            items.append(BatchItem(_request_bytes(request), request.request_id() or uuid.uuid4().hex,
                                   self._emitter(sender), cancelled=request.is_cancelled))
        for sender, was_forwarded, reply in zip(senders, forwarded, self.service.handle_batch(items), strict=True):
            self._send(sender, was_forwarded, reply)

    def _emitter(self, sender):
        def emit(line: str) -> None:
            sender.send(_response(line.strip().encode("utf-8"), self.output_shape))

        return emit

    def _send(self, sender, forwarded: bool, reply) -> None:
        flag = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        if reply.status >= 400:
            message = error_message(reply.body)
            if forwarded:
                message = json.dumps({FORWARDED_STATUS: reply.status, "message": message})
            sender.send(_error(reply.status, message), flags=flag)
        else:
            sender.send(_response(answer_element(reply.body), self.output_shape), flags=flag)

    def finalize(self) -> None:
        log.info("wan_stream unloaded")


class WanModel:
    """``wan``: plain /infer, forwarded to ``wan_stream`` (which holds the weights)."""

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        self.target = parameters["forward_to"]
        # The target's shape: [1], or [1, 1] when Triton batches its requests.
        self.target_shape = (1, 1) if parameters.get("target_batching") == "true" else (1,)

    def execute(self, requests) -> list:
        return [self._forward(request) for request in requests]

    def _forward(self, request):
        document = np.array([_request_bytes(request)], dtype=np.object_).reshape(self.target_shape)
        forwarded = pb_utils.InferenceRequest(
            model_name=self.target, inputs=[pb_utils.Tensor(INPUT_NAME, document)],
            requested_output_names=[OUTPUT_NAME], request_id=request.request_id(),
            parameters={FORWARDED: True},
        )
        final = None
        for response in forwarded.exec(decoupled=True):
            if response.has_error():
                ours = _forwarded_error(response.error().message())
                return _error(*ours) if ours else pb_utils.InferenceResponse(error=response.error())
            if pb_utils.get_output_tensor_by_name(response, OUTPUT_NAME) is not None:
                final = response
        if final is None:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{self.target} sent no answer"))
        data = pb_utils.get_output_tensor_by_name(final, OUTPUT_NAME).as_numpy().reshape(-1)[0]
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(OUTPUT_NAME, np.array([data], np.object_))])
