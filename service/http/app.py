"""The OpenAI-compatible endpoints as a Starlette app over the server's registry and engines.

    POST /v1/chat/completions   chat (messages through the pair's chat template); unary or SSE stream
    POST /v1/completions        text completion (a prompt, or token ids); unary or SSE stream
    GET  /v1/models             the loaded pairs ("model" = pair name)
    GET  /v1/models/{model}     one of them
    GET  /health                200 while the gRPC health service says SERVING, else 503 (no token needed)
    GET  /metrics               Prometheus: specserve's series and the model-server protocol an inference
                                gateway's endpoint picker reads (model_server_metrics.py; no token needed)

Every /v1 request, like every gRPC call: a request id (the `x-request-id` header, else a new one,
sent back as a header), the bearer token and its role (service/edge/auth.py: the generation endpoints are
Generate's, /v1/models is ListPairs'), a bound on concurrent requests (--max-workers: more get 429
as gRPC's RESOURCE_EXHAUSTED), the in-flight count the drain waits for, a log line and the
`specserve_requests_total` metric (method "POST /v1/chat/completions", the gRPC code name).
Errors are OpenAI's shape with the HTTP status of the gRPC code (errors.py).

A generation (generation.py) is submitted from a worker thread and its deltas come back through
an asyncio queue; the response bodies are built by shapes.py, streams sent by sse.py. A client
that disconnects (mid-stream, or while a unary request waits) cancels the generation at once:
its slot is freed at the engine's next step, as gRPC cancellation does.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
import time
from concurrent.futures import Executor
from typing import AsyncIterator, Callable

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service.common.errors import (
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    SpecserveError,
    Unavailable,
)
from service.common.logging_setup import request_id_var
from service.edge import rules
from service.edge.auth import AUTH_HEADER, GENERATE_OPERATIONS, Tokens, allowed
from service.edge.calls import check_header_id, record_call, request_id_for
from service.edge.headers import REPLICA_HEADER, REPLICA_ID, REQUEST_ID_HEADER
from service.http import schema as s
from service.http.bodies import READING_PER_WORKER, BodyReader, check_objects, client_gone_or
from service.http.errors import ClientGone, error_body, routing_error, validation_error
from service.http.generation import Generation
from service.http.model_server_metrics import ModelServerCollector, metrics_endpoint
from service.http.shapes import ChatShape, CompletionShape, Reply, completions_of, stats_of, token_views, usage_of
from service.http.sse import EventStream
from service.http.translate import gen_request_from_openai, name_engine_error, param
from service.pairs.registry import PairRegistry, ServedPair

log = logging.getLogger("specserve.http")

# the operation whose role rule (service/edge/auth.py: allowed) each endpoint follows
GENERATE_OPERATION = "GenerationService/Generate"
LIST_OPERATION = "ModelService/ListPairs"
assert {GENERATE_OPERATION, LIST_OPERATION} <= GENERATE_OPERATIONS


class OpenAIDoor:
    """The endpoints over one server's registry; `app` is the ASGI application uvicorn serves."""

    def __init__(self, registry: PairRegistry, config, metrics, in_flight, serving: Callable[[], bool],
                 executor: Executor, tokens: dict[str, str] | None = None):
        """config: the ServerConfig (max_tokens, max_prompt_bytes, max_workers, max_message_bytes);
        in_flight: the InFlight the drain waits on; serving(): the gRPC health status is SERVING;
        tokens: {token: role} of --auth-token-file (None: no authentication)."""
        self.registry, self.config, self.metrics, self.in_flight = registry, config, metrics, in_flight
        self.serving, self.executor = serving, executor
        self.auth = Tokens(tokens) if tokens else None
        self.active = 0  # /v1 requests running (at most config.max_workers), counted once their body is in
        self.bodies = BodyReader(config.max_message_bytes, config.http_body_timeout_s,
                                 READING_PER_WORKER * config.max_workers)
        self._lock = threading.Lock()
        self.app = Starlette(routes=[
            self._route("POST", "/v1/chat/completions", GENERATE_OPERATION, self.chat, reads_body=True),
            self._route("POST", "/v1/completions", GENERATE_OPERATION, self.completions, reads_body=True),
            self._route("GET", "/v1/models", LIST_OPERATION, self.models),
            self._route("GET", "/v1/models/{model}", LIST_OPERATION, self.model),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", metrics_endpoint(metrics.registry), methods=["GET"]),
        ], exception_handlers={HTTPException: routing_error})
        metrics.registry.register(ModelServerCollector(registry))

    # ---- what every /v1 request goes through ----
    def _route(self, method: str, path: str, operation: str, handler, reads_body: bool = False) -> Route:
        """A /v1 route: `handler(request, request_id, headers, finish)` inside the bookkeeping every request gets;
        a handler that reads a body takes its --max-workers place (finish.admit) once the body is in."""
        label = f"{method} {path}"

        async def endpoint(request: Request):
            header_id = request.headers.get(REQUEST_ID_HEADER, "")
            rid = request_id_for(header_id)
            request_id_var.set(rid)  # this request's task (and the threads it starts with its context)
            headers = {REQUEST_ID_HEADER: rid, REPLICA_HEADER: REPLICA_ID}
            t0 = time.monotonic()
            finish = _Finish(self, label, t0)
            try:
                check_header_id(header_id)
                self._check_role(request, operation)
                if not reads_body:
                    finish.admit()
                response = await handler(request, rid, headers, finish)
            except Exception as exc:  # noqa: BLE001 - every failure becomes an OpenAI-shaped error
                exc = client_gone_or(exc)
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

    def _check_role(self, request: Request, operation: str) -> None:
        """Unauthenticated / PermissionDenied as the gRPC interceptor decides for `operation`."""
        if self.auth is None:
            return
        header = request.headers.get(AUTH_HEADER)
        role = self.auth.role_of([(AUTH_HEADER, header)] if header is not None else [])
        if not allowed(role, operation):
            raise PermissionDenied(f"the {role} role may not call {request.url.path}")

    async def _body(self, request: Request, model):
        """The body (bodies.py: size, time and in-flight bounds) as `model` (InvalidArgument naming the field)."""
        raw = await self.bodies.read(request)
        check_objects(raw)
        try:
            return model.model_validate_json(raw)
        except ValidationError as e:
            raise validation_error(e) from None

    def _pair(self, model: str) -> ServedPair:
        """The ready pair `model` names ("" = "default", as an empty gRPC `pair`); 404 for any other name."""
        with param("model"):
            name = rules.pair_name(model) if rules.PAIR_NAME.fullmatch(model or "default") else None
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
        finish.admit()  # a --max-workers place only now: a slow body holds none (bodies.py)
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
        try:
            self.executor.submit(contextvars.copy_context().run, gen.pump)
        except RuntimeError:  # the pool is shut down: the server is stopping
            gen.cancel()
            raise Unavailable("the server is shutting down") from None
        reply = Reply(id=f"{shape.id_prefix}-{rid}", created=int(time.time()), model=sp.name)
        with_logprobs = gen.req.logprobs is not None
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            events = self._events(gen, shape, reply, rid, include_usage, with_logprobs, sp.tokenizer)

            def closed(code: str) -> None:
                gen.cancel()  # a no-op once finished; frees the slot however the response ended
                finish(gen.error_code or code)
            return EventStream(events, on_disconnect=lambda: gen.cancel(client_gone=True), on_close=closed,
                               headers=headers)
        watcher = asyncio.ensure_future(_cancel_on_disconnect(request, gen))
        try:
            result = await gen.collect()
        finally:
            watcher.cancel()
            gen.cancel()  # a no-op once finished; frees the slot if anything above failed
        if gen.client_gone:
            raise ClientGone("the client closed the connection")
        out = shape.unary(reply, completions_of(result, sp.tokenizer), usage_of(result),
                          stats_of(result, rid, gen.ttft), with_logprobs)
        return Response(out.model_dump_json(), media_type="application/json", headers=headers)

    async def _events(self, gen: Generation, shape, reply: Reply, rid: str, include_usage: bool,
                      with_logprobs: bool, tokenizer) -> AsyncIterator[str]:
        """The stream's payloads: (chat) the role, the deltas, any text held back to the end, each completion's
        finish_reason (the last with the specserve stats), the usage if asked, [DONE]. An error after the
        response began is an event `{"error": ...}` (the openai client raises it), with no [DONE]."""
        try:
            if shape is ChatShape:
                for i in range(gen.req.n):
                    yield shape.chunk(reply, i, text="", role=True).model_dump_json()
            sent: dict[int, str] = {}
            async for delta in gen.deltas():
                index = delta.index
                lps = token_views(delta.logprobs, tokenizer) if with_logprobs and delta.logprobs else None
                if delta.text or lps:
                    so_far = sent.get(index, "")
                    sent[index] = so_far + delta.text
                    yield shape.chunk(reply, index, text=delta.text, logprobs=lps, offset=len(so_far)).model_dump_json()
            result = gen.result()
            done = completions_of(result, tokenizer)
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
        except Exception as e:  # noqa: BLE001 - the status line is sent: an error event is what is left
            gen.error_code = e.code if isinstance(e, SpecserveError) else "INTERNAL"
            if gen.error_code == "INTERNAL":
                log.error("generation failed mid-stream", exc_info=e)
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


def _card(sp: ServedPair) -> s.ModelCard:
    return s.ModelCard(id=sp.name, created=int(sp.loaded_at), state=sp.state)


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
        record_call(d.metrics, "http", self.label, code, time.monotonic() - self.t0)
