"""TorchServe entry point: adapts TorchServe's calling convention to ``WanService``.

The installed ``handler`` package is the one copy of the code: a model store's entry file
(model_store/archive.py writes it) only subclasses ``WanVideoHandler`` from here. TorchServe
requires exactly one class in the entry file. ``handle`` is overridden as a whole
(rather than preprocess / inference / postprocess) because per-request error mapping and
streaming span all three stages.
"""

from __future__ import annotations

import uuid
from http import HTTPStatus
from typing import Any

from ts.handler_utils.utils import send_intermediate_predict_response
from ts.metrics.metric_type_enum import MetricTypes
from ts.torch_handler.base_handler import BaseHandler

from handler.envelopes import PLAIN, Envelope, unwrap
from handler.errors import InvalidRequest, WanError
from handler.metrics import Emit, GenerationMetrics
from handler.service import NDJSON_CONTENT_TYPE, Reply, WanService

# TorchServe hands each request over as {"body": <JSON it decoded>} or {"data": <bytes>}; {}
# when it kept nothing. A form post (urlencoded or multipart) arrives as its fields instead, and
# so do rows that TorchServe's own KServe envelope unwrapped (it must be off: handler/envelopes.py).
_ROW_KEYS = {"body", "data"}


class WanVideoHandler(BaseHandler):
    def initialize(self, context):
        properties = context.system_properties
        manifest_model = (context.manifest or {}).get("model", {})
        self.service = WanService.from_model_config(
            context.model_yaml_config, properties.get("model_dir"), properties.get("gpu_id"),
            model={"name": context.model_name, "version": manifest_model.get("modelVersion", "")},
            metrics=GenerationMetrics(_torchserve_emit(context), context.model_name),
        )
        self.context = context
        self.initialized = True

    def handle(self, data, context):
        self.context = context
        if not isinstance(data, list) or not data:
            data = [{}]  # nothing kept: answered as a missing body
        replies = []
        for index, row in enumerate(data):
            # TorchServe always gives one; an in-process caller may not. It names the stored video,
            # so it must be unique ("req-0" twice a day would overwrite a video).
            request_id = context.get_request_id(index) or uuid.uuid4().hex
            envelope, reply = self._answer(row, request_id, context, index)
            context.set_response_status(reply.status, HTTPStatus(reply.status).phrase, index)
            context.set_response_content_type(index, reply.content_type)
            for name, value in reply.headers.items():
                context.set_response_header(index, name, value)
            replies.append(envelope.wrap(reply.body, self.service.model.get("name", ""),
                                         self.service.model.get("version", ""), request_id))
        return replies

    def _answer(self, row: Any, request_id: str, context, index: int) -> tuple[Envelope, Reply]:
        # Refusals here are decided alike on every rank of a multi-GPU worker (the same rows).
        if not isinstance(row, dict) or not set(row) <= _ROW_KEYS:
            return PLAIN, self.service.error_reply(InvalidRequest(
                "expected one JSON request sent with Content-Type: application/json; got form fields (or rows "
                "TorchServe's own KServe envelope unwrapped: that must be off, this handler reads KServe v1 and "
                "v2 bodies itself)"))
        if context.get_request_header(index, "explain") == "True":
            return PLAIN, self.service.error_reply(InvalidRequest(
                "explanations are not served for video generation: use :predict or /predictions"))
        envelope, body = unwrap(row.get("body") if row.get("body") is not None else row.get("data"),
                                self.service.config.limits)
        if isinstance(body, WanError):
            return envelope, self.service.error_reply(body)
        return envelope, self.service.handle(body, request_id, self._emitter(context, index), envelope)

    @staticmethod
    def _emitter(context, index):
        def emit(line: str) -> None:
            # The first chunk fixes the HTTP content type of the whole chunked response.
            context.set_response_content_type(index, NDJSON_CONTENT_TYPE)
            send_intermediate_predict_response(
                [line], {index: context.request_ids[index]}, "Intermediate response", 200, context
            )

        return emit


def _torchserve_emit(context) -> Emit | None:
    """Metrics through TorchServe's metrics API: each is declared in config/metrics.yaml (the
    worker's metrics cache is built from it), and TorchServe exports it on :8082/metrics. None
    where the context has no metrics cache (a Context built by hand)."""
    cache = context.metrics
    if cache is None:
        return None

    def emit(metric, value, labels) -> None:
        found = cache.get_metric(metric.name, MetricTypes[metric.kind.upper()])
        found.add_or_update(value, [labels[name] for name in metric.labels])

    return emit
