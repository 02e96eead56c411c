"""TorchServe entry point: adapts TorchServe's calling convention to ``WanService``.

This file is the archive's ``--handler``; the ``handler`` package ships next to it in the
archive. TorchServe requires exactly one class here. ``handle`` is overridden as a whole
(rather than preprocess / inference / postprocess) because per-request error mapping and
streaming span all three stages.
"""

from __future__ import annotations

from http import HTTPStatus

from ts.handler_utils.utils import send_intermediate_predict_response
from ts.torch_handler.base_handler import BaseHandler

from handler.errors import InvalidRequest
from handler.service import NDJSON_CONTENT_TYPE, WanService

# Keys of an Open Inference Protocol (KServe v2) input, as the kservev2 envelope hands it over.
_V2_INPUT_KEYS = {"name", "datatype", "data"}


def _unwrap(row):
    """Return (body, enveloped).

    Plain TorchServe rows are ``{"body"|"data": ...}``. Under the KServe v1 envelope the
    handler receives each ``instances`` item itself; under v2, each input
    ``{"name", "shape", "datatype": "BYTES", "data": <the request as JSON text>}``.
    """
    if isinstance(row, dict) and set(row) <= {"body", "data"}:
        # An empty row is what TorchServe passes when the body was not JSON it could keep
        # (a form-encoded post, say): report it as a missing body, not as a bad instance.
        return row.get("body") if row.get("body") is not None else row.get("data"), False
    if isinstance(row, dict) and _V2_INPUT_KEYS <= set(row):
        return row["data"], True
    return row, True


class WanVideoHandler(BaseHandler):
    def initialize(self, context):
        properties = context.system_properties
        manifest_model = (context.manifest or {}).get("model", {})
        self.service = WanService.from_model_config(
            context.model_yaml_config, properties.get("model_dir"), properties.get("gpu_id"),
            model={"name": context.model_name, "version": manifest_model.get("modelVersion", "")},
        )
        self.context = context
        self.initialized = True

    def handle(self, data, context):
        self.context = context
        if not isinstance(data, list) or not data:
            # The KServe v1 envelope hands over None when "instances" is missing.
            return self._refuse(context, 1, InvalidRequest(
                'expected {"instances": [request]} (KServe v1) or one JSON request', "instances"))
        if len(data) > 1 and _unwrap(data[0])[1]:
            # Several instances in one KServe request share one HTTP status; each is a video
            # of minutes. Refuse up front rather than finish some and lose them on one error.
            return self._refuse(context, len(data), InvalidRequest(
                f"send one instance per request (got {len(data)}): each is a video that takes minutes",
                "instances"))
        replies = []
        for index, row in enumerate(data):
            body, enveloped = _unwrap(row)
            request_id = context.get_request_id(index) or f"req-{index}"
            reply = self.service.handle(body, request_id, self._emitter(context, index), enveloped)
            context.set_response_status(reply.status, HTTPStatus(reply.status).phrase, index)
            context.set_response_content_type(index, reply.content_type)
            for name, value in reply.headers.items():
                context.set_response_header(index, name, value)
            replies.append(reply.body)
        return replies

    @staticmethod
    def _refuse(context, count: int, error: InvalidRequest) -> list:
        context.set_response_status(error.http_status, HTTPStatus(error.http_status).phrase, 0)
        context.set_response_content_type(0, "application/json")
        return [error.to_body()] * count

    @staticmethod
    def _emitter(context, index):
        def emit(line: str) -> None:
            # The first chunk fixes the HTTP content type of the whole chunked response.
            context.set_response_content_type(index, NDJSON_CONTENT_TYPE)
            send_intermediate_predict_response(
                [line], {index: context.request_ids[index]}, "Intermediate response", 200, context
            )

        return emit
