"""The one error hierarchy of the handler.

Every error a client can see is a ``WanError`` carrying its HTTP status, a stable ``type``
string and, for request problems, the offending ``field``. The TorchServe adapter maps these to
responses in exactly one place (``wan_handler``); anything that is not a ``WanError`` is a bug
and becomes a 500 with the request id in the log.
"""

from __future__ import annotations

from typing import Any


class WanError(Exception):
    """Base class: an error with an HTTP status and a JSON body."""

    http_status = 500
    error_type = "internal_error"

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field

    def to_body(self) -> dict[str, Any]:
        return {"error": {"type": self.error_type, "message": self.message, "field": self.field}}


class InvalidRequest(WanError):
    """The request breaks a rule of the contract (wrong type, out of bounds, unknown field)."""

    http_status = 400
    error_type = "invalid_request"


class PayloadTooLarge(WanError):
    """A field is larger than the server accepts (an image, a prompt's bytes)."""

    http_status = 413
    error_type = "payload_too_large"


class OutOfMemory(WanError):
    """The device ran out of memory for this request; the worker stays up and frees it."""

    http_status = 507
    error_type = "out_of_memory"


class ModelLoadError(WanError):
    """The checkpoint folder is missing, incomplete, or not a Wan2.2 layout we serve."""

    http_status = 500
    error_type = "model_load_error"


class ConfigError(WanError):
    """model-config.yaml's ``handler:`` section is invalid (unknown key, wrong type)."""

    http_status = 500
    error_type = "config_error"


class DeadlineExceeded(WanError):
    """The generation ran past the per-request deadline and stopped itself, before
    TorchServe's responseTimeout would kill (and restart) the worker."""

    http_status = 504
    error_type = "deadline_exceeded"


class Cancelled(WanError):
    """The client withdrew the request (a closed stream, a cancelled call): the generation stops
    at the next denoising step. Not a failure: never logged as one, and nobody is left to read
    the answer (499 is the status proxies use for a client that closed the request)."""

    http_status = 499
    error_type = "cancelled"


class StorageReadError(WanError):
    """Object storage failed while reading a request's input (not the client's fault)."""

    http_status = 502
    error_type = "storage_error"


class InternalError(WanError):
    """An unexpected failure; the message names the request id to look up in the log."""

    http_status = 500
    error_type = "internal_error"
