"""TorchServe entry point: adapts TorchServe's calling convention to ``WanService``.

The installed ``handler`` package is the one copy of the code: a model store's entry file
(model_store/archive.py writes it) only subclasses ``WanVideoHandler`` from here. TorchServe
requires exactly one class in the entry file. ``handle`` is overridden as a whole
(rather than preprocess / inference / postprocess) because per-request error mapping and
streaming span all three stages.
"""

from __future__ import annotations

import os
import uuid
from http import HTTPStatus
from typing import Any

from ts.handler_utils.utils import send_intermediate_predict_response
from ts.metrics.metric_type_enum import MetricTypes
from ts.torch_handler.base_handler import BaseHandler

from handler.cancel import JOB_ID_HEADER, CancelCheckConfig
from handler.envelopes import BINARY_HEADER, PLAIN, Envelope, unwrap
from handler.errors import InvalidRequest, WanError
from handler.metrics import Emit, GenerationMetrics
from handler.service import NDJSON_CONTENT_TYPE, BatchItem, Reply, WanService

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
        # The job service's cancellation check (handler/cancel.py); None: jobs run to their end.
        self.cancel_check = CancelCheckConfig.from_env(os.environ)
        self.context = context
        self.initialized = True

    def handle(self, data, context):
        self.context = context
        if not isinstance(data, list) or not data:
            data = [{}]  # nothing kept: answered as a missing body
        # Several rows when the model config's batchSize > 1: WanService.handle_batch denoises
        # those it can together and answers each on its own.
        envelopes: list[Envelope] = []
        replies: list[Reply | None] = []
        items: list[tuple[int, BatchItem]] = []
        request_ids = []
        for index, row in enumerate(data):
            # TorchServe always gives one; an in-process caller may not. It names the stored video,
            # so it must be unique ("req-0" twice a day would overwrite a video).
            request_id = context.get_request_id(index) or uuid.uuid4().hex
            request_ids.append(request_id)
            envelope, admitted = self._admit(row, request_id, context, index)
            envelopes.append(envelope)
            replies.append(admitted if isinstance(admitted, Reply) else None)
            if isinstance(admitted, BatchItem):
                items.append((index, admitted))
        for (index, _), reply in zip(items, self.service.handle_batch([item for _, item in items]), strict=True):
            replies[index] = reply
        answers = []
        for index, (envelope, reply, request_id) in enumerate(zip(envelopes, replies, request_ids, strict=True)):
            wrapped = envelope.wrap(reply.body, reply.status, self.service.model.get("name", ""),
                                    self.service.model.get("version", ""), request_id)
            context.set_response_status(reply.status, _phrase(reply.status), index)
            context.set_response_content_type(index, wrapped.content_type or reply.content_type)
            for name, value in {**reply.headers, **wrapped.headers}.items():
                context.set_response_header(index, name, value)
            answers.append(wrapped.body)
        return answers

    def _admit(self, row: Any, request_id: str, context, index: int) -> tuple[Envelope, Reply | BatchItem]:
        """A row's request for the service, or the reply refusing it."""
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
                                self.service.config.limits, _header(context, index, BINARY_HEADER))
        if isinstance(body, WanError):
            return envelope, self.service.error_reply(body)
        try:
            cancelled = self._cancel_hook(context, index)
        except WanError as error:
            return envelope, self.service.error_reply(error)
        return envelope, BatchItem(body, request_id, self._emitter(context, index), envelope, cancelled)

    def _cancel_hook(self, context, index: int):
        """Asks the job service, when one sent this request (its header) and a check is configured."""
        if self.cancel_check is None:
            return None
        return self.cancel_check.check_for(_header(context, index, JOB_ID_HEADER))

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


def _phrase(status: int) -> str:
    """The reason phrase; 499 (a cancelled request, nginx's name) is not in HTTPStatus."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Client Closed Request" if status == 499 else "Unknown"


def _header(context, index: int, name: str) -> str | None:
    """A request header by name, whatever its case (HTTP names are case-insensitive)."""
    properties = context.request_processor[index].get_request_properties() if context.request_processor else {}
    wanted = name.lower()
    return next((str(value) for key, value in (properties or {}).items() if key.lower() == wanted), None)
