"""The one error shape of the public API and the exceptions that produce it.

    {"error": {"type", "code", "message", "param", "request_id"}}
"""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    status: int = 400
    type: str = "invalid_request_error"

    def __init__(
        self,
        code: str,
        message: str,
        *,
        param: str | None = None,
        status: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        if status is not None:
            self.status = status
        if self.status >= 500:
            self.type = "api_error"
        self.headers = headers or {}

    def body(self, request_id: str | None) -> dict[str, Any]:
        return {
            "error": {
                "type": self.type,
                "code": self.code,
                "message": self.message,
                "param": self.param,
                "request_id": request_id,
            }
        }


class InvalidRequest(ApiError):
    status = 400


class Unauthorized(ApiError):
    status = 401
    type = "authentication_error"


class Forbidden(ApiError):
    status = 403
    type = "permission_error"


class NotFound(ApiError):
    status = 404

    def __init__(self, resource: str, ident: str, param: str | None = None) -> None:
        super().__init__("resource_missing", f"No such {resource}: '{ident}'", param=param)


class Conflict(ApiError):
    status = 409


class Unprocessable(ApiError):
    status = 422


class RateLimited(ApiError):
    status = 429
    type = "rate_limit_error"

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(
            "rate_limited", message, headers={"Retry-After": str(max(1, retry_after_s))}
        )


class ServiceUnavailable(ApiError):
    status = 503
    type = "api_error"

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(
            "service_unavailable", message, headers={"Retry-After": str(max(1, retry_after_s))}
        )


#: SQLSTATEs of text PostgreSQL cannot store: a NUL character in text (22021) or as `\u0000`
#: in jsonb (22P05; also text the database's encoding lacks, which Billstream's UTF-8
#: databases never meet). They come from the request's data, not from a fault: 400, not 500.
_UNSTORABLE_TEXT = frozenset({"22021", "22P05"})


def unexpected(exc: BaseException) -> ApiError:
    """The answer to an exception no endpoint handled: 400 `parameter_invalid` for text the
    database cannot store (the transaction that tried rolled back; nothing was applied), else
    500 `internal_error`."""
    if getattr(exc, "sqlstate", None) in _UNSTORABLE_TEXT:
        return InvalidRequest(
            "parameter_invalid",
            "The request holds text that cannot be stored (such as a NUL character, "
            "\\u0000)")
    return ApiError("internal_error", "An internal error occurred; it has been logged",
                    status=500)
