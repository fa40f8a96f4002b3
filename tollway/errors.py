"""One exception tree, one wire shape.

Every error a client sees is ``{"error": {"message", "type", "param", "code"}}``. Each class carries
its HTTP status and its OpenAI ``type`` and ``code``::

    TollwayError                      500 api_error / internal_error
    ├── InvalidRequest                400 invalid_request_error (param names the field)
    │   ├── InvalidJSON               400 invalid_json
    │   └── PayloadTooLarge           413 payload_too_large
    ├── AuthenticationFailed          401 invalid_api_key
    ├── PermissionDenied              403 model_not_allowed / permission_denied
    ├── NotFound                      404 model_not_found
    ├── Conflict                      409 conflict (it exists already)
    ├── QuotaExceeded                 429 insufficient_quota (a budget would be exceeded; names it)
    ├── RateLimited                   429 rate_limit_exceeded / retry_storm / spend_velocity_exceeded
    ├── ServiceUnavailable            503 service_unavailable / quota_unavailable
    └── UpstreamError                 502 upstream_error
        ├── UpstreamBadResponse       502 upstream_bad_response
        ├── UpstreamUnavailable       503 upstream_unavailable (connect refused, 429/503 from upstream)
        ├── UpstreamTimeout           504 upstream_timeout
        └── UpstreamRejected          400 upstream_rejected_request (the upstream called the body invalid)

Foreign errors (HTTP client, provider SDK, database) are mapped to these in one place per part:
``tollway.routing.upstream.map_upstream_errors`` for upstream calls.
"""

from __future__ import annotations

from typing import Any, ClassVar


class TollwayError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "api_error"
    code: ClassVar[str] = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code  # type: ignore[misc]
        self.headers: dict[str, str] = {} if retry_after is None else {"retry-after": str(retry_after)}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class InvalidRequest(TollwayError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class InvalidJSON(InvalidRequest):
    code = "invalid_json"


class ContentBlocked(InvalidRequest):
    """An input guard refused the request (``param`` names the validator): nothing was sent upstream and
    nothing is charged."""

    code = "content_policy_violation"


class PayloadTooLarge(InvalidRequest):
    status = 413
    code = "payload_too_large"


class AuthenticationFailed(TollwayError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDenied(TollwayError):
    status = 403
    type = "permission_error"
    code = "permission_denied"


class NotFound(TollwayError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


def model_not_found(name: str) -> NotFound:
    """The 404 for a model the gateway does not serve or the caller may not see (the two are not told apart)."""
    return NotFound(f"The model '{name}' does not exist or you do not have access to it.", param="model")


class Conflict(TollwayError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"


class QuotaExceeded(TollwayError):
    status = 429
    type = "insufficient_quota"
    code = "insufficient_quota"


class RateLimited(TollwayError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class ServiceUnavailable(TollwayError):
    status = 503
    type = "api_error"
    code = "service_unavailable"


class UpstreamError(TollwayError):
    status = 502
    type = "api_error"
    code = "upstream_error"


class UpstreamBadResponse(UpstreamError):
    code = "upstream_bad_response"


class UpstreamUnavailable(UpstreamError):
    status = 503
    code = "upstream_unavailable"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


class UpstreamRejected(UpstreamError):
    status = 400
    type = "invalid_request_error"
    code = "upstream_rejected_request"
