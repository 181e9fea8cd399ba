"""The outermost gRPC interceptor: request ids, status codes, INTERNAL for the unexpected, metrics and logs.

Every RPC gets a request id (from the `x-request-id` header, else a new one; sent back as trailing
metadata; a header that breaks service/edge/headers.py's rule is INVALID_ARGUMENT before the
handler runs); service.common.errors map to status codes; anything unexpected becomes INTERNAL with
a log line (no traceback to the client); the call is recorded as the HTTP door records its own
(service/edge/calls.py).
"""

from __future__ import annotations

import contextlib
import logging
import time

import grpc

from service.common.errors import InvalidArgument, ResourceExhausted, SpecserveError
from service.common.logging_setup import request_id_var
from service.edge.calls import InFlight, check_header_id, record_call, request_id_for
from service.edge.headers import DEFICIT_HEADER, REQUEST_ID_HEADER, trailers
from service.edge.metrics import Metrics

log = logging.getLogger("specserve.server")


class ErrorInterceptor(grpc.ServerInterceptor):
    """Request ids, status codes from service.common.errors, INTERNAL for the unexpected, request metrics and logs."""

    def __init__(self, metrics: Metrics | None, in_flight: InFlight | None = None):
        self.metrics = metrics
        self.in_flight = in_flight or InFlight()

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method
        header_id = dict(details.invocation_metadata or ()).get(REQUEST_ID_HEADER, "")
        quiet = not method.startswith("/specserve.")  # health checks and reflection: debug level
        # The request is decoded inside the wrapper (grpc gets no deserializer): bytes that are not the
        # method's message are INVALID_ARGUMENT with a request id, not grpc's own INTERNAL.
        decode = _decoder(handler.request_deserializer, method)
        if handler.unary_unary:
            behavior = handler.unary_unary
            return grpc.unary_unary_rpc_method_handler(
                self._unary(lambda raw, context: behavior(decode(raw), context), method, header_id, quiet),
                response_serializer=handler.response_serializer)
        if handler.unary_stream:
            stream = handler.unary_stream

            def decoded_stream(raw, context):
                result = stream(decode(raw), context)
                if result is not None:  # None: health Watch answered through a callback
                    yield from result
            return grpc.unary_stream_rpc_method_handler(
                self._stream(decoded_stream, method, header_id, quiet),
                response_serializer=handler.response_serializer)
        return handler  # no client-streaming RPCs here

    def _begin(self, context, header_id: str):
        rid = request_id_for(header_id)
        token = request_id_var.set(rid)
        context.set_trailing_metadata(trailers(rid))
        return token

    def _fail(self, exc: BaseException, context, method: str):
        """Abort the RPC with the status `exc` stands for (context.abort raises)."""
        if isinstance(exc, SpecserveError):
            code = getattr(grpc.StatusCode, exc.code, grpc.StatusCode.INTERNAL)
            if isinstance(exc, ResourceExhausted) and exc.deficit_bytes:
                context.set_trailing_metadata(trailers(request_id_var.get(), (DEFICIT_HEADER, str(exc.deficit_bytes))))
            context.abort(code, _bounded_details(str(exc)))
        if _aborted(context):  # the handler aborted itself: keep its status
            raise exc
        log.error("unexpected error in %s", method, exc_info=exc, extra={"kv": {"method": method}})
        context.abort(grpc.StatusCode.INTERNAL, f"internal error (request id {request_id_var.get()}); see server log")

    def _done(self, method: str, context, t0: float, quiet: bool, code: str | None = None) -> None:
        record_call(self.metrics, "rpc", method, code or _final_code(context), time.monotonic() - t0, quiet)

    def _unary(self, behavior, method, header_id, quiet):
        counted = self.in_flight if not quiet else contextlib.nullcontext()

        def wrapper(request, context):
            t0, token = time.monotonic(), self._begin(context, header_id)
            code = None
            try:
                check_header_id(header_id)
                with counted:
                    return behavior(request, context)
            except BaseException as exc:  # noqa: BLE001 - every failure becomes a status
                code = _code_of(exc, context)
                self._fail(exc, context, method)
            finally:
                self._done(method, context, t0, quiet, code)
                request_id_var.reset(token)
        return wrapper

    def _stream(self, behavior, method, header_id, quiet):
        counted = self.in_flight if not quiet else contextlib.nullcontext()

        def wrapper(request, context):
            t0, token = time.monotonic(), self._begin(context, header_id)
            code = None
            try:
                check_header_id(header_id)
                with counted:
                    yield from behavior(request, context)
            except GeneratorExit:  # the client went away mid-stream
                code = "CANCELLED"
                raise
            except BaseException as exc:  # noqa: BLE001
                code = _code_of(exc, context)
                self._fail(exc, context, method)
            finally:
                self._done(method, context, t0, quiet, code)
                try:
                    request_id_var.reset(token)
                except ValueError:  # the generator was closed from another context
                    pass
        return wrapper


MAX_DETAILS_CHARS = 1024  # a message quoting a client's 30 kB field must still fit grpc's 16 KiB metadata limit


def _bounded_details(message: str) -> str:
    """Status details short enough for the grpc-message trailer (percent-encoded: up to 12 bytes a char).
    The middle goes: a message starts with what it is about and ends with why."""
    if len(message) <= MAX_DETAILS_CHARS:
        return message
    half = MAX_DETAILS_CHARS // 2
    return f"{message[:half]} ...({len(message) - 2 * half} characters left out)... {message[-half:]}"


def _decoder(deserialize, method: str):
    """raw bytes -> the method's request message; InvalidArgument when they are not one."""
    if deserialize is None:
        return lambda raw: raw

    def decode(raw: bytes):
        try:
            return deserialize(raw)
        except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and whatever a parser raises
            raise InvalidArgument(f"the request is not a valid {method.rsplit('/', 1)[-1]} request message "
                                  f"({type(e).__name__}): send the message the method's .proto declares") from None
    return decode


def _aborted(context) -> bool:
    code = context.code() if hasattr(context, "code") else None
    return code is not None and code != grpc.StatusCode.OK


def _code_of(exc: BaseException, context) -> str:
    if isinstance(exc, SpecserveError):
        return exc.code
    if _aborted(context):
        return context.code().name
    return "INTERNAL"


def _final_code(context) -> str:
    if context.is_active():
        return "OK"
    remaining = context.time_remaining()
    return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
