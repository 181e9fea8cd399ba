"""The OpenAI-compatible endpoints as a Starlette app over the server's registry and engines.

    POST /v1/chat/completions   chat (messages through the pair's chat template); unary or SSE stream
    POST /v1/completions        text completion (a prompt, or token ids); unary or SSE stream
    GET  /v1/models             the loaded pairs ("model" = pair name)
    GET  /v1/models/{model}     one of them
    GET  /health                200 while the gRPC health service says SERVING, else 503 (no token needed)

Every /v1 request, like every gRPC call: a request id (the `x-request-id` header, else a new one,
sent back as a header), the bearer token and its role (service.auth: the generation endpoints are
Generate's, /v1/models is ListPairs'), a bound on concurrent requests (--max-workers: more get 429
as gRPC's RESOURCE_EXHAUSTED), the in-flight count the drain waits for, a log line and the
`specserve_requests_total` metric (method "POST /v1/chat/completions", the gRPC code name).
Errors are OpenAI's shape `{"error": {"message", "type", "param", "code"}}` with the HTTP status of
the gRPC code (HTTP_STATUS) and `code` the gRPC code's name in lower case.

A generation is submitted to the pair's engine from a worker thread (tokenizing a long prompt
never blocks the event loop); a pump thread moves the engine's deltas into an asyncio queue. A
client that disconnects (mid-stream, or while a unary request waits) cancels the generation at
once: its slot is freed at the engine's next step, as gRPC cancellation does.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
import threading
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service import convert
from service.auth import AUTH_HEADER, GENERATE_METHODS, AuthInterceptor, allowed
from service.errors import InvalidArgument, NotFound, PermissionDenied, ResourceExhausted, SpecserveError, Unavailable
from service.http import schema as s
from service.http.translate import gen_request_from_openai, name_engine_error, param
from service.logging_setup import new_request_id, request_id_var
from service.metadata import REPLICA_HEADER, REPLICA_ID, REQUEST_ID_HEADER, check_request_id, valid_request_id
from service.registry import PairRegistry, ServedPair
from service.requests import GenRequest, GenResult

log = logging.getLogger("specserve.http")

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
# the gRPC method whose role rule (service.auth.allowed) each endpoint follows
GENERATE_METHOD = "/specserve.v1.GenerationService/Generate"
LIST_METHOD = "/specserve.v1.ModelService/ListPairs"
assert {GENERATE_METHOD, LIST_METHOD} <= GENERATE_METHODS


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


# ---- one generation, seen from asyncio ----

_END = object()


class Generation:
    """An engine stream tied to an HTTP request: deltas arrive through an asyncio queue that a pump thread
    fills; `cancel()` frees the slot at the engine's next step (a client gone, an error)."""

    def __init__(self, sp: ServedPair, req: GenRequest, metrics, t0: float, loop: asyncio.AbstractEventLoop):
        self.sp, self.req, self.metrics, self.t0 = sp, req, metrics, t0
        self.stream = sp.engine.submit(req)
        self.ttft = 0.0
        self.finished = False
        self.client_gone = False
        self.error_code = ""  # set when a stream ended with an error event
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()
        if metrics is not None:
            metrics.for_pair(sp.name).on_prompt(len(req.prompt))
        log.info("generation admitted", extra={"kv": {"pair": sp.name, "prompt_tokens": len(req.prompt),
                                                      "max_tokens": req.max_tokens, "door": "http"}})

    def pump(self) -> None:
        """(A worker thread) move the engine's deltas into the event loop's queue, then the end mark."""
        put = self._loop.call_soon_threadsafe
        try:
            for delta in self.stream:
                put(self._queue.put_nowait, delta)
            put(self._queue.put_nowait, _END)
        except RuntimeError:  # the event loop is closed: the server stopped under us
            self.stream.cancel()

    async def deltas(self) -> AsyncIterator:
        """The engine's TokenDeltas; records time to first token."""
        while (delta := await self._queue.get()) is not _END:
            if not self.ttft and delta.tokens:
                self.ttft = time.monotonic() - self.t0
                if self.metrics is not None:
                    self.metrics.on_first_token(self.sp.name, self.ttft)
            yield delta

    def result(self) -> GenResult:
        """The GenResult once deltas() ended; UNAVAILABLE when the server cancelled it under a waiting client."""
        result = self.stream.result(timeout=0)
        self.finished = True
        if result.finish_reason == "cancelled" and not self.client_gone:
            raise Unavailable("the generation was cancelled by the server (shutting down or unloading)")
        log.info("generation done", extra={"kv": {
            "pair": self.sp.name, "finish": result.finish_reason, "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens, "drafted": result.drafted, "accepted": result.accepted,
            "ms": round((time.monotonic() - self.t0) * 1000, 1), "door": "http"}})
        return result

    def cancel(self, client_gone: bool = False) -> None:
        self.client_gone = self.client_gone or client_gone
        if not self.finished:
            self.finished = True
            self.stream.cancel()

    async def collect(self) -> tuple[GenResult, dict[int, list]]:
        """Run to the end (unary); returns the result and each completion's logprobs by index."""
        logprobs: dict[int, list] = {}
        async for delta in self.deltas():
            logprobs.setdefault(getattr(delta, "index", 0), []).extend(getattr(delta, "logprobs", None) or ())
        return self.result(), logprobs


# ---- what the engine returns, read in one place ----

@dataclass
class Done:
    """One finished completion: index, text, why it ended, its tokens' logprobs (engine objects)."""

    index: int
    text: str
    finish_reason: str
    logprobs: list = field(default_factory=list)


def completions_of(result: GenResult, streamed_logprobs: dict[int, list]) -> list[Done]:
    """Every completion of a result in index order: GenResult.choices when the engine gives them (n > 1,
    issue 16), else the result itself; logprobs from the result when it carries them, else as streamed."""
    choices = getattr(result, "choices", None) or [result]
    return [Done(getattr(c, "index", i), c.text, c.finish_reason,
                 list(getattr(c, "logprobs", None) or streamed_logprobs.get(getattr(c, "index", i), [])))
            for i, c in enumerate(choices)]


def usage_of(result: GenResult) -> s.Usage:
    cached = getattr(result, "cached_prompt_tokens", 0) or 0  # the prefix cache (issue 15), when it exists
    return s.Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                   total_tokens=result.prompt_tokens + result.completion_tokens,
                   prompt_tokens_details=s.PromptTokensDetails(cached_tokens=cached))


def stats_of(result: GenResult, request_id: str, ttft: float) -> s.SpecserveStats:
    tps = result.completion_tokens / result.decode_seconds if result.decode_seconds > 0 else 0.0
    return s.SpecserveStats(
        request_id=request_id, drafted=result.drafted, accepted=result.accepted,
        acceptance_rate=result.accepted / result.drafted if result.drafted else 0.0,
        timings=s.Timings(queue_seconds=result.queue_seconds, prefill_seconds=result.prefill_seconds,
                          decode_seconds=result.decode_seconds, tokens_per_second=tps,
                          time_to_first_token_seconds=ttft))


def _bytes(x) -> list[int]:
    raw = getattr(x, "bytes", None)
    return list(raw) if raw is not None else list(x.text.encode("utf-8"))


def chat_logprobs(items: list) -> s.ChatLogprobs:
    """Engine token logprobs (token, text, logprob, bytes, top) in the chat API's shape."""
    return s.ChatLogprobs(content=[
        s.TokenLogprobOut(token=x.text, logprob=x.logprob, bytes=_bytes(x),
                          top_logprobs=[s.TopLogprobOut(token=t.text, logprob=t.logprob, bytes=_bytes(t))
                                        for t in getattr(x, "top", ())])
        for x in items])


def completion_logprobs(items: list, offset: int = 0) -> s.CompletionLogprobs:
    """Engine token logprobs in the legacy completions shape; text offsets count from `offset`."""
    offsets = list(itertools.accumulate((len(x.text) for x in items), initial=offset))[:-1]
    return s.CompletionLogprobs(tokens=[x.text for x in items], token_logprobs=[x.logprob for x in items],
                                top_logprobs=[{t.text: t.logprob for t in getattr(x, "top", ())} for x in items],
                                text_offset=offsets)


# ---- the two APIs' shapes ----

@dataclass(frozen=True)
class Reply:
    """What every response and chunk of one request repeats."""

    id: str
    created: int
    model: str


class ChatShape:
    """/v1/chat/completions: `message` / `delta` with role and content."""

    id_prefix = "chatcmpl"
    request = s.ChatCompletionRequest

    @staticmethod
    def unary(r: Reply, done: list[Done], usage: s.Usage, stats: s.SpecserveStats, with_logprobs: bool):
        return s.ChatCompletion(id=r.id, created=r.created, model=r.model, usage=usage, specserve=stats, choices=[
            s.ChatChoice(index=d.index, message=s.AssistantMessage(content=d.text), finish_reason=d.finish_reason,
                         logprobs=chat_logprobs(d.logprobs) if with_logprobs else None) for d in done])

    @staticmethod
    def chunk(r: Reply, index: int, text: str | None = None, logprobs: list | None = None, role: bool = False,
              finish_reason: str | None = None, stats: s.SpecserveStats | None = None, offset: int = 0):
        choice = s.ChatChunkChoice(index=index, delta=s.Delta(role="assistant" if role else None, content=text),
                                   logprobs=chat_logprobs(logprobs) if logprobs else None,
                                   finish_reason=finish_reason)
        return s.ChatCompletionChunk(id=r.id, created=r.created, model=r.model, choices=[choice], specserve=stats)

    @staticmethod
    def usage_chunk(r: Reply, usage: s.Usage):
        return s.ChatCompletionChunk(id=r.id, created=r.created, model=r.model, choices=[], usage=usage)


class CompletionShape:
    """/v1/completions: `text` in every choice and chunk."""

    id_prefix = "cmpl"
    request = s.CompletionRequest

    @staticmethod
    def unary(r: Reply, done: list[Done], usage: s.Usage, stats: s.SpecserveStats, with_logprobs: bool):
        return s.Completion(id=r.id, created=r.created, model=r.model, usage=usage, specserve=stats, choices=[
            s.CompletionChoice(index=d.index, text=d.text, finish_reason=d.finish_reason,
                               logprobs=completion_logprobs(d.logprobs) if with_logprobs else None) for d in done])

    @staticmethod
    def chunk(r: Reply, index: int, text: str | None = None, logprobs: list | None = None, role: bool = False,
              finish_reason: str | None = None, stats: s.SpecserveStats | None = None, offset: int = 0):
        choice = s.CompletionChoice(index=index, text=text or "", finish_reason=finish_reason,
                                    logprobs=completion_logprobs(logprobs, offset) if logprobs else None)
        return s.Completion(id=r.id, created=r.created, model=r.model, choices=[choice], specserve=stats)

    @staticmethod
    def usage_chunk(r: Reply, usage: s.Usage):
        return s.Completion(id=r.id, created=r.created, model=r.model, choices=[], usage=usage)


# ---- server-sent events ----

class EventStream:
    """A `text/event-stream` response: `data: <payload>` per item of `events`. When the client goes away,
    `on_disconnect()` runs at once (it cancels the generation) and the stream ends; `on_close(code)` runs
    last, with the gRPC code name of how it ended."""

    def __init__(self, events: AsyncIterator[str], on_disconnect: Callable[[], None],
                 on_close: Callable[[str], None], headers: dict[str, str]):
        self.events, self.on_disconnect, self.on_close, self.headers = events, on_disconnect, on_close, headers
        self.gone = False

    async def __call__(self, scope, receive, send) -> None:
        headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                   (b"x-accel-buffering", b"no")]  # proxies (nginx) must not buffer the stream
        headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in self.headers.items()]
        watcher = asyncio.ensure_future(self._watch(receive))
        code = "OK"
        try:
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            async for data in self.events:
                if self.gone:
                    break
                await send({"type": "http.response.body", "body": f"data: {data}\n\n".encode(), "more_body": True})
            if not self.gone:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # servers of ASGI spec 2.4 tell of a client gone by failing send
            self._disconnected()
        except BaseException:
            code = "INTERNAL"
            raise
        finally:
            watcher.cancel()
            await self.events.aclose()
            self.on_close("CANCELLED" if self.gone else code)

    async def _watch(self, receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self._disconnected()

    def _disconnected(self) -> None:
        if not self.gone:
            self.gone = True
            self.on_disconnect()


# ---- the app ----

class OpenAIDoor:
    """The endpoints over one server's registry; `app` is the ASGI application uvicorn serves."""

    def __init__(self, registry: PairRegistry, config, metrics, in_flight, serving: Callable[[], bool],
                 executor: Executor, tokens: dict[str, str] | None = None):
        """config: the ServerConfig (max_tokens, max_prompt_bytes, max_workers, max_message_bytes);
        in_flight: the InFlight the drain waits on; serving(): the gRPC health status is SERVING;
        tokens: {token: role} of --auth-token-file (None: no authentication)."""
        self.registry, self.config, self.metrics, self.in_flight = registry, config, metrics, in_flight
        self.serving, self.executor = serving, executor
        self.auth = AuthInterceptor(tokens) if tokens else None
        self.active = 0  # /v1 requests running (at most config.max_workers)
        self._lock = threading.Lock()
        self.app = Starlette(routes=[
            self._route("POST", "/v1/chat/completions", GENERATE_METHOD, self.chat),
            self._route("POST", "/v1/completions", GENERATE_METHOD, self.completions),
            self._route("GET", "/v1/models", LIST_METHOD, self.models),
            self._route("GET", "/v1/models/{model}", LIST_METHOD, self.model),
            Route("/health", self.health, methods=["GET"]),
        ], exception_handlers={HTTPException: _routing_error})

    # ---- what every /v1 request goes through ----
    def _route(self, method: str, path: str, grpc_method: str, handler) -> Route:
        """A /v1 route: `handler(request, request_id, headers, finish)` inside the bookkeeping every request gets."""
        label = f"{method} {path}"

        async def endpoint(request: Request):
            header_id = request.headers.get(REQUEST_ID_HEADER, "")
            rid = header_id if valid_request_id(header_id) else new_request_id()
            request_id_var.set(rid)  # this request's task (and the threads it starts with its context)
            headers = {REQUEST_ID_HEADER: rid, REPLICA_HEADER: REPLICA_ID}
            t0 = time.monotonic()
            finish = _Finish(self, label, t0)
            try:
                if header_id:
                    check_request_id(header_id, f"the {REQUEST_ID_HEADER} header")
                self._check_role(request, grpc_method)
                finish.admit()
                response = await handler(request, rid, headers, finish)
            except Exception as exc:  # noqa: BLE001 - every failure becomes an OpenAI-shaped error
                code = exc.code if isinstance(exc, SpecserveError) else "INTERNAL"
                if code == "INTERNAL":
                    log.error("unexpected error in %s", label, exc_info=exc, extra={"kv": {"method": label}})
                status, body = error_body(exc, rid)
                finish(code)
                return JSONResponse(body.model_dump(), status_code=status, headers=headers)
            if not isinstance(response, EventStream):
                finish("OK")
            return response
        return Route(path, endpoint, methods=[method])

    def _check_role(self, request: Request, grpc_method: str) -> None:
        """Unauthenticated / PermissionDenied as the gRPC interceptor decides for `grpc_method`."""
        if self.auth is None:
            return
        header = request.headers.get(AUTH_HEADER)
        role = self.auth.role_of([(AUTH_HEADER, header)] if header is not None else [])
        if not allowed(role, grpc_method):
            raise PermissionDenied(f"the {role} role may not call {request.url.path}")

    async def _body(self, request: Request, model):
        """The body, read up to --max-message-size, as `model` (InvalidArgument naming the field)."""
        limit = self.config.max_message_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(f"the request body is {declared} bytes, this server takes at most {limit} "
                                  "(--max-message-size)")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"the request body is over {limit} bytes (--max-message-size)")
            chunks.append(chunk)
        try:
            return model.model_validate_json(b"".join(chunks))
        except ValidationError as e:
            raise validation_error(e) from None

    def _pair(self, model: str) -> ServedPair:
        """The ready pair `model` names ("" = "default", as an empty gRPC `pair`); 404 for any other name."""
        with param("model"):
            name = convert.pair_name(model) if convert.PAIR_NAME.fullmatch(model or "default") else None
            if name is None:
                raise NotFound(f"model {model[:80]!r} is not loaded (loaded: "
                               f"{', '.join(sp.name for sp in self.registry.list()) or 'none'})")
            return self.registry.get(name)

    async def _in_worker(self, fn, *args):
        """fn(*args) on a worker thread, with this request's context (its request id in log lines)."""
        ctx = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(self.executor, lambda: ctx.run(fn, *args))

    # ---- generation ----
    async def chat(self, request, rid, headers, finish):
        return await self._generate(request, rid, headers, finish, ChatShape)

    async def completions(self, request, rid, headers, finish):
        return await self._generate(request, rid, headers, finish, CompletionShape)

    async def _generate(self, request: Request, rid: str, headers: dict, finish: "_Finish", shape):
        body = await self._body(request, shape.request)
        sp = self._pair(body.model)
        c, loop = self.config, asyncio.get_running_loop()

        def submit() -> Generation:  # a worker thread: tokenizing a long prompt must not block the loop
            req = gen_request_from_openai(body, sp.tokenizer, sp.engine.speculative, c.max_tokens,
                                          c.max_prompt_bytes, rid)
            try:
                return Generation(sp, req, self.metrics, finish.t0, loop)
            except InvalidArgument as e:
                name_engine_error(e, chat=shape is ChatShape)
                raise

        gen = await self._in_worker(submit)
        self.executor.submit(contextvars.copy_context().run, gen.pump)
        reply = Reply(id=f"{shape.id_prefix}-{rid}", created=int(time.time()), model=sp.name)
        with_logprobs = gen.req.logprobs is not None
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            events = self._events(gen, shape, reply, rid, include_usage, with_logprobs)
            return EventStream(events, on_disconnect=lambda: gen.cancel(client_gone=True),
                               on_close=lambda code: finish(gen.error_code or code), headers=headers)
        watcher = asyncio.ensure_future(_cancel_on_disconnect(request, gen))
        try:
            result, logprobs = await gen.collect()
        finally:
            watcher.cancel()
            gen.cancel()  # a no-op once finished; frees the slot if anything above failed
        if gen.client_gone:
            raise ClientGone("the client closed the connection")
        out = shape.unary(reply, completions_of(result, logprobs), usage_of(result), stats_of(result, rid, gen.ttft),
                          with_logprobs)
        return Response(out.model_dump_json(), media_type="application/json", headers=headers)

    async def _events(self, gen: Generation, shape, reply: Reply, rid: str, include_usage: bool,
                      with_logprobs: bool) -> AsyncIterator[str]:
        """The stream's payloads: (chat) the role, the deltas, any text held back to the end, each completion's
        finish_reason (the last with the specserve stats), the usage if asked, [DONE]. An error after the
        response began is an event `{"error": ...}` (the openai client raises it), with no [DONE]."""
        try:
            if shape is ChatShape:
                for i in range(gen.req.n):
                    yield shape.chunk(reply, i, text="", role=True).model_dump_json()
            sent: dict[int, str] = {}
            async for delta in gen.deltas():
                index = getattr(delta, "index", 0)
                lps = (getattr(delta, "logprobs", None) or None) if with_logprobs else None
                if delta.text or lps:
                    so_far = sent.get(index, "")
                    sent[index] = so_far + delta.text
                    yield shape.chunk(reply, index, text=delta.text, logprobs=lps, offset=len(so_far)).model_dump_json()
            result = gen.result()
            done = completions_of(result, {})
            stats = stats_of(result, rid, gen.ttft)
            for k, d in enumerate(done):
                so_far = sent.get(d.index, "")
                rest = d.text[len(so_far):] if d.text.startswith(so_far) else ""
                if rest:
                    yield shape.chunk(reply, d.index, text=rest, offset=len(so_far)).model_dump_json()
                yield shape.chunk(reply, d.index, finish_reason=d.finish_reason,
                                  stats=stats if k == len(done) - 1 else None).model_dump_json()
            if include_usage:
                yield shape.usage_chunk(reply, usage_of(result)).model_dump_json()
            yield "[DONE]"
        except SpecserveError as e:
            gen.error_code = e.code
            yield error_body(e, rid)[1].model_dump_json()
        finally:
            gen.cancel()  # a no-op once finished; frees the slot when the stream ends early

    # ---- models and health ----
    async def models(self, request, rid, headers, finish):
        cards = [_card(sp) for sp in self.registry.list()]
        return Response(s.ModelList(data=cards).model_dump_json(), media_type="application/json", headers=headers)

    async def model(self, request, rid, headers, finish):
        name = request.path_params["model"]
        for sp in self.registry.list():
            if sp.name == name:
                return Response(_card(sp).model_dump_json(), media_type="application/json", headers=headers)
        with param("model"):
            raise NotFound(f"model {name[:80]!r} is not loaded")

    async def health(self, request: Request):
        """200 SERVING / 503 NOT_SERVING: the gRPC health status of service "" (no token needed)."""
        ok = self.serving()
        return JSONResponse({"status": "SERVING" if ok else "NOT_SERVING"}, status_code=200 if ok else 503)


async def _routing_error(request: Request, exc: HTTPException) -> JSONResponse:
    """No such path (404) or method (405), in OpenAI's error shape."""
    kind = {404: "not_found_error", 405: "invalid_request_error"}.get(exc.status_code, "invalid_request_error")
    body = s.ErrorBody(error=s.ErrorDetail(message=f"{request.method} {request.url.path}: {exc.detail}", type=kind,
                                           code="not_found" if exc.status_code == 404 else "invalid_argument"))
    return JSONResponse(body.model_dump(), status_code=exc.status_code, headers=exc.headers)


def _card(sp: ServedPair) -> s.ModelCard:
    return s.ModelCard(id=sp.name, created=int(sp.loaded_at), state=sp.state)


class ClientGone(SpecserveError):
    """The client closed the connection before its answer was ready (nobody reads this status)."""

    code = "CANCELLED"


async def _cancel_on_disconnect(request: Request, gen: Generation) -> None:
    """Wait for the client to go away (the body is read already), then cancel its generation."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    gen.cancel(client_gone=True)


class _Finish:
    """One /v1 request's bookkeeping: `admit()` takes a place (at most --max-workers; the drain waits for
    it), calling it with a gRPC code name ends the request once: the place back, the metric, the log line."""

    def __init__(self, door: OpenAIDoor, label: str, t0: float):
        self.door, self.label, self.t0 = door, label, t0
        self.admitted = self.done = False

    def admit(self) -> None:
        d = self.door
        with d._lock:
            if d.active >= d.config.max_workers:
                raise ResourceExhausted(f"the server is serving its most concurrent requests ({d.config.max_workers}, "
                                        "--max-workers): retry shortly")
            d.active += 1
        d.in_flight.__enter__()
        self.admitted = True

    def __call__(self, code: str) -> None:
        if self.done:
            return
        self.done = True
        d = self.door
        if self.admitted:
            with d._lock:
                d.active -= 1
            d.in_flight.__exit__(None, None, None)
        seconds = time.monotonic() - self.t0
        if d.metrics is not None:
            d.metrics.on_request(self.label, code, seconds)
        level = logging.INFO if code in ("OK", "CANCELLED") else logging.WARNING
        log.log(level, "http", extra={"kv": {"method": self.label, "code": code, "ms": round(seconds * 1000, 1)}})
