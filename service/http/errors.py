"""Errors of the HTTP door in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

The HTTP status is the gRPC code's (HTTP_STATUS, google.rpc.Code's mapping); `code` is the gRPC
code's name in lower case (`model_not_found` for an unknown model); `param` is the request field
to blame when one is (translate.param sets it).
"""

from __future__ import annotations

from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from service.common.errors import InvalidArgument, NotFound, SpecserveError
from service.http import schema as s

# gRPC code -> (HTTP status, OpenAI error type); the statuses are google.rpc.Code's HTTP mapping
HTTP_STATUS = {
    "INVALID_ARGUMENT": (400, "invalid_request_error"),
    "FAILED_PRECONDITION": (400, "invalid_request_error"),
    "OUT_OF_RANGE": (400, "invalid_request_error"),
    "UNAUTHENTICATED": (401, "authentication_error"),
    "PERMISSION_DENIED": (403, "permission_error"),
    "NOT_FOUND": (404, "not_found_error"),
    "ALREADY_EXISTS": (409, "conflict_error"),
    "ABORTED": (409, "conflict_error"),
    "RESOURCE_EXHAUSTED": (429, "rate_limit_error"),
    "CANCELLED": (499, "cancelled_error"),
    "INTERNAL": (500, "server_error"),
    "UNIMPLEMENTED": (501, "not_implemented_error"),
    "UNAVAILABLE": (503, "service_unavailable_error"),
    "DEADLINE_EXCEEDED": (504, "timeout_error"),
}


class PayloadTooLarge(SpecserveError):
    """A body over --max-message-size (HTTP 413; gRPC says RESOURCE_EXHAUSTED for a message over its limit)."""

    code = "RESOURCE_EXHAUSTED"
    status = 413


def error_body(exc: BaseException, request_id: str) -> tuple[int, s.ErrorBody]:
    """The HTTP status and OpenAI-shaped body of an error; anything unexpected is a 500 naming the request id."""
    if not isinstance(exc, SpecserveError):
        return 500, s.ErrorBody(error=s.ErrorDetail(
            message=f"internal error (request id {request_id}); see server log", type="server_error",
            code="internal"))
    status, kind = HTTP_STATUS.get(exc.code, (500, "server_error"))
    status = getattr(exc, "status", status)
    p = getattr(exc, "param", None)
    code = "model_not_found" if isinstance(exc, NotFound) and p == "model" else exc.code.lower()
    return status, s.ErrorBody(error=s.ErrorDetail(message=str(exc), type=kind, param=p, code=code))


def validation_error(e: ValidationError) -> InvalidArgument:
    """pydantic's first complaint as an InvalidArgument naming the field."""
    first = e.errors(include_url=False)[0]
    where = ".".join(str(x) for x in first.get("loc", ()))
    err = InvalidArgument(f"{where + ': ' if where else ''}{first.get('msg', 'invalid request body')}")
    err.param = where or None
    return err


class ClientGone(SpecserveError):
    """The client closed the connection before its answer was ready (nobody reads this status)."""

    code = "CANCELLED"


async def routing_error(request: Request, exc: HTTPException) -> JSONResponse:
    """No such path (404) or method (405), in OpenAI's error shape."""
    kind = {404: "not_found_error", 405: "invalid_request_error"}.get(exc.status_code, "invalid_request_error")
    body = s.ErrorBody(error=s.ErrorDetail(message=f"{request.method} {request.url.path}: {exc.detail}", type=kind,
                                           code="not_found" if exc.status_code == 404 else "invalid_argument"))
    return JSONResponse(body.model_dump(), status_code=exc.status_code, headers=exc.headers)
