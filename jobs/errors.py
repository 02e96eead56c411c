"""The Jobs API's one error hierarchy. Each error carries its HTTP status and renders as
OpenAI's error shape, ``{"error": {"message", "type", "param", "code"}}``; one exception
handler in the app turns them into responses."""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    status = 500
    error_type = "server_error"
    code: str | None = None

    def __init__(self, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.code
        self.headers = headers or {}

    def to_body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}


class InvalidRequest(ApiError):
    status = 400
    error_type = "invalid_request_error"


class Unauthorized(ApiError):
    status = 401
    error_type = "invalid_request_error"
    code = "invalid_api_key"


class NotFound(ApiError):
    status = 404
    error_type = "invalid_request_error"
    code = "not_found"


class Conflict(ApiError):
    status = 409
    error_type = "invalid_request_error"
    code = "conflict"


class PayloadTooLarge(ApiError):
    status = 413
    error_type = "invalid_request_error"
    code = "payload_too_large"


class TooManyActiveJobs(ApiError):
    status = 429
    error_type = "rate_limit_error"
    code = "too_many_active_jobs"

    def __init__(self, message: str, retry_after_s: int):
        # At least 1 s: "Retry-After: 0" makes clients spin.
        super().__init__(message, headers={"Retry-After": str(max(1, int(retry_after_s)))})


class Unavailable(ApiError):
    """The database is unreachable (a restart): retry shortly. Nothing was queued."""

    status = 503
    error_type = "server_error"
    code = "unavailable"

    def __init__(self, message: str):
        super().__init__(message, headers={"Retry-After": "2"})
