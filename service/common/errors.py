"""Errors a user can cause, each carrying the gRPC status it maps to (converted at the servicer edge)."""

from __future__ import annotations


class SpecserveError(Exception):
    """Base class: `code` is a grpc.StatusCode name; the message says what to do."""

    code = "INTERNAL"


class InvalidArgument(SpecserveError):
    code = "INVALID_ARGUMENT"


class NotFound(SpecserveError):
    code = "NOT_FOUND"


class FailedPrecondition(SpecserveError):
    code = "FAILED_PRECONDITION"


class ResourceExhausted(SpecserveError):
    code = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, deficit_bytes: int = 0):
        super().__init__(message)
        self.deficit_bytes = deficit_bytes


class Unavailable(SpecserveError):
    code = "UNAVAILABLE"


class PermissionDenied(SpecserveError):
    code = "PERMISSION_DENIED"


class Unauthenticated(SpecserveError):
    """No bearer token, or one the server does not know (service.edge.auth)."""

    code = "UNAUTHENTICATED"


class Unimplemented(SpecserveError):
    """A request field this server version does not serve yet."""

    code = "UNIMPLEMENTED"


class AlreadyExists(SpecserveError):
    """A pair of that name is loaded or loading."""

    code = "ALREADY_EXISTS"


class DeadlineExceeded(SpecserveError):
    """A Fit or Load that ran past the server's --load-timeout."""

    code = "DEADLINE_EXCEEDED"
