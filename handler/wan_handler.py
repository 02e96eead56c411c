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

from handler.service import NDJSON_CONTENT_TYPE, WanService


def _unwrap(row):
    """Return (body, enveloped). TorchServe rows are {"body"|"data": ...}; under a KServe
    envelope, the handler receives the decoded instances themselves."""
    if isinstance(row, dict) and set(row) <= {"body", "data"}:
        # An empty row is what TorchServe passes when the body was not JSON it could keep
        # (a form-encoded post, say): report it as a missing body, not as a bad instance.
        return row.get("body") if row.get("body") is not None else row.get("data"), False
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
    def _emitter(context, index):
        def emit(line: str) -> None:
            # The first chunk fixes the HTTP content type of the whole chunked response.
            context.set_response_content_type(index, NDJSON_CONTENT_TYPE)
            send_intermediate_predict_response(
                [line], {index: context.request_ids[index]}, "Intermediate response", 200, context
            )

        return emit
