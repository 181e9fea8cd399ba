"""gRPC servicers of specserve.v1: thin adapters from protobuf to the registry and the engines.

Errors are raised as service.errors.SpecserveError subclasses; the server's interceptor turns
them into status codes (and anything unexpected into INTERNAL). Cancellation: every generation
registers `stream.cancel` as an RPC-termination callback, so a client that cancels, or a
deadline that expires, frees the slot at once.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from service.common.errors import Unavailable
from service.common.logging_setup import request_id_var
from service.edge.headers import check_request_id, trailers
from service.pairs.registry import PairRegistry, ServedPair
from service.pb.specserve.v1 import specserve_pb2 as pb
from service.pb.specserve.v1 import specserve_pb2_grpc as pb_grpc
from service.rpc import convert

if TYPE_CHECKING:  # server.py imports this module
    from service.config.settings import ServerConfig

log = logging.getLogger("specserve.rpc")


def _pair_info(sp: ServedPair) -> pb.PairInfo:
    info = pb.PairInfo(name=sp.name, state=convert.STATE_TO_PB[sp.state], target_path=sp.request.target_path,
                       draft_path=sp.request.draft_path)
    if sp.pair is not None:
        info.plan.CopyFrom(convert.plan_to_pb(sp.pair.plan))
        info.allocated.extend(convert.buffer_to_pb(s) for s in sp.pair.allocated())
        info.target_path = sp.pair.target.file.path if sp.pair.target is not None else sp.request.target_path
        if sp.pair.draft is not None:
            info.draft_path = sp.pair.draft.file.path
    if sp.engine is not None:
        info.speculative.CopyFrom(convert.speculative_to_pb(sp.engine.speculative))
        stats = sp.engine.stats()
        info.active_slots, info.queued = stats.get("active_slots", 0), stats.get("queued", 0)
        prefix = getattr(sp.engine, "prefix", None)
        if prefix is not None:
            info.prompt_cache.CopyFrom(convert.prompt_cache_to_pb(prefix.stats()))
    return info


class ModelServicer(pb_grpc.ModelServiceServicer):
    """Fit, Load, Unload, ListPairs and the live speculative config."""

    def __init__(self, registry: PairRegistry, config: ServerConfig):
        self.registry, self.config = registry, config  # the config says what empty request fields mean

    def _pair_request(self, spec: pb.PairSpec):
        c = self.config
        return convert.pair_request_from_pb(spec, c.params, c.speculative, c.default_target)

    def Fit(self, request, context):
        return convert.fit_to_pb(self.registry.fit(self._pair_request(request.pair)))

    def Load(self, request, context):
        sp = self.registry.load(self._pair_request(request.pair))
        return pb.LoadResponse(name=sp.name, plan=convert.plan_to_pb(sp.pair.plan),
                               allocated=[convert.buffer_to_pb(s) for s in sp.pair.allocated()],
                               adjustments=list(sp.pair.fit.adjustments), load_seconds=sp.load_seconds)

    def Unload(self, request, context):
        name = convert.pair_name(request.name)
        timeout = request.drain_timeout_seconds if request.drain_timeout_seconds > 0 else self.config.drain_timeout
        released = self.registry.unload(name, timeout)
        return pb.UnloadResponse(name=name, released_bytes=released)

    def ListPairs(self, request, context):
        return pb.ListPairsResponse(pairs=[_pair_info(sp) for sp in self.registry.list()])

    def GetSpeculativeConfig(self, request, context):
        sp = self.registry.get(convert.pair_name(request.pair))
        return pb.GetSpeculativeConfigResponse(pair=sp.name, config=convert.speculative_to_pb(sp.engine.speculative))

    def UpdateSpeculativeConfig(self, request, context):
        sp = self.registry.get(convert.pair_name(request.pair))
        cfg = convert.speculative_from_pb(request.config, sp.engine.speculative)
        live = self.registry.update_speculative(sp.name, cfg)
        log.info("speculative config updated", extra={"kv": {"pair": sp.name, "config": str(live)}})
        return pb.UpdateSpeculativeConfigResponse(pair=sp.name, config=convert.speculative_to_pb(live))


class _Generation:
    """One admitted generation: the engine stream, tied to the RPC's lifetime."""

    def __init__(self, servicer: "GenerationServicer", request, context):
        self.t0 = time.monotonic()
        self.servicer, self.context = servicer, context
        if request.request_id:  # the body's id wins over the header's (and a generated one)
            request_id_var.set(check_request_id(request.request_id, "request_id"))
            context.set_trailing_metadata(trailers(request.request_id))
        self.request_id = request_id_var.get()
        convert.check_prompt_bytes(request, servicer.config.max_prompt_bytes)
        self.sp = servicer.registry.get(convert.pair_name(request.pair))
        req = convert.gen_request_from_pb(request, self.sp.tokenizer, self.sp.engine.speculative,
                                          servicer.config.max_tokens, self.request_id)
        self.req = req
        self.ttft = 0.0
        self._finished = threading.Event()
        self.stream = self.sp.engine.submit(req)
        if not context.add_callback(self._on_rpc_done):  # the RPC already ended (cancelled, deadline)
            self.stream.cancel()
        pm = servicer.metrics.for_pair(self.sp.name) if servicer.metrics is not None else None
        if pm is not None:
            pm.on_prompt(len(req.prompt))
        log.info("generation admitted", extra={"kv": {"pair": self.sp.name, "prompt_tokens": len(req.prompt),
                                                      "max_tokens": req.max_tokens}})

    def _on_rpc_done(self) -> None:
        if not self._finished.is_set():  # cancelled by the client, a deadline, or server shutdown
            self.stream.cancel()

    def deltas(self):
        """The engine's TokenDeltas; records time to first token."""
        for delta in self.stream:
            if not self.ttft and delta.tokens:
                self.ttft = time.monotonic() - self.t0
                if self.servicer.metrics is not None:
                    self.servicer.metrics.on_first_token(self.sp.name, self.ttft)
            yield delta

    def result(self):
        """The engine's GenResult; UNAVAILABLE if the server cancelled it while the client still waits."""
        result = self.stream.result()
        self._finished.set()
        if result.finish_reason == "cancelled" and self.context.is_active():
            raise Unavailable("the generation was cancelled by the server (shutting down or unloading)")
        log.info("generation done", extra={"kv": {
            "pair": self.sp.name, "finish": result.finish_reason, "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens, "drafted": result.drafted, "accepted": result.accepted,
            "ms": round((time.monotonic() - self.t0) * 1000, 1)}})
        return result

    def close(self) -> None:
        """Whatever happened (including an exception or a client gone mid-stream), free the slot."""
        if not self._finished.is_set():
            self._finished.set()
            self.stream.cancel()


class GenerationServicer(pb_grpc.GenerationServiceServicer):
    """Generate, GenerateStream, Tokenize, Detokenize."""

    def __init__(self, registry: PairRegistry, config: ServerConfig, metrics=None):
        self.registry, self.config, self.metrics = registry, config, metrics

    def Generate(self, request, context):
        gen = _Generation(self, request, context)
        try:
            for _ in gen.deltas():
                pass
            result = gen.result()
        finally:
            gen.close()
        return convert.result_to_pb(result, gen.request_id, gen.ttft, gen.sp.tokenizer)

    def GenerateStream(self, request, context):
        """Deltas of every completion (by index); with n = 1 one final summary after them, with n > 1
        each completion's own final message as it ends."""
        gen = _Generation(self, request, context)
        sent: dict[int, list[str]] = {i: [] for i in range(gen.req.n)}  # text sent, per completion
        try:
            for delta in gen.deltas():
                if not context.is_active():
                    break
                if delta.tokens or delta.text or delta.prompt_logprobs:
                    sent[delta.index].append(delta.text)
                    yield convert.delta_to_pb(delta, gen.request_id, gen.sp.tokenizer)
                if delta.end is not None and gen.req.n > 1:
                    yield convert.final_stream_to_pb(delta.end, "".join(sent[delta.index]), gen.request_id,
                                                     gen.ttft)
            if context.is_active():
                result = gen.result()
                if gen.req.n == 1:
                    yield convert.final_stream_to_pb(result, "".join(sent[0]), gen.request_id, gen.ttft)
        finally:
            gen.close()

    def Tokenize(self, request, context):
        convert.check_text_bytes(request.text, "text", self.config.max_prompt_bytes)
        sp = self.registry.get(convert.pair_name(request.pair))
        ids = sp.tokenizer.encode(request.text, add_special=request.add_special,
                                  parse_special=request.parse_special if request.HasField("parse_special") else True)
        return pb.TokenizeResponse(tokens=ids)

    def Detokenize(self, request, context):
        sp = self.registry.get(convert.pair_name(request.pair))
        ids = convert.check_token_ids(request.tokens, sp.tokenizer.vocab_size, "tokens")
        return pb.DetokenizeResponse(text=sp.tokenizer.decode(ids, skip_special=request.skip_special))
