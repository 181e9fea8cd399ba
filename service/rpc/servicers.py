"""gRPC servicers of specserve.v1: thin adapters from protobuf to the registry and the engines.

Errors are raised as service.common.errors.SpecserveError subclasses; the server's interceptor turns
them into status codes (and anything unexpected into INTERNAL). Cancellation: every generation
registers `stream.cancel` as an RPC-termination callback, so a client that cancels, or a
deadline that expires, frees the slot at once.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from service.common.logging_setup import request_id_var
from service.edge import rules
from service.edge.generation import Generation
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
        backend = sp.pair.backend
        info.backend, info.device = backend.name, backend.device_memory().name
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
        name = rules.pair_name(request.name)
        timeout = request.drain_timeout_seconds if request.drain_timeout_seconds > 0 else self.config.drain_timeout
        released = self.registry.unload(name, timeout)
        return pb.UnloadResponse(name=name, released_bytes=released)

    def ListPairs(self, request, context):
        return pb.ListPairsResponse(pairs=[_pair_info(sp) for sp in self.registry.list()])

    def GetSpeculativeConfig(self, request, context):
        sp = self.registry.get(rules.pair_name(request.pair))
        return pb.GetSpeculativeConfigResponse(pair=sp.name, config=convert.speculative_to_pb(sp.engine.speculative))

    def UpdateSpeculativeConfig(self, request, context):
        sp = self.registry.get(rules.pair_name(request.pair))
        cfg = convert.speculative_from_pb(request.config, sp.engine.speculative)
        live = self.registry.update_speculative(sp.name, cfg)
        log.info("speculative config updated", extra={"kv": {"pair": sp.name, "config": str(live)}})
        return pb.UpdateSpeculativeConfigResponse(pair=sp.name, config=convert.speculative_to_pb(live))


def _admit(servicer: "GenerationServicer", request, context) -> Generation:
    """The message as a GenRequest, admitted to its pair's engine; the RPC's end (the client cancels, a
    deadline expires, the server stops) cancels it at once."""
    t0 = time.monotonic()
    if request.request_id:  # the body's id wins over the header's (and a generated one)
        request_id_var.set(check_request_id(request.request_id, "request_id"))
        context.set_trailing_metadata(trailers(request.request_id))
    convert.check_prompt_bytes(request, servicer.config.max_prompt_bytes)
    sp = servicer.registry.get(rules.pair_name(request.pair))
    req = convert.gen_request_from_pb(request, sp.tokenizer, sp.engine.speculative, servicer.config.max_tokens,
                                      request_id_var.get())
    gen = Generation(sp, req, servicer.metrics, t0, "rpc")
    if not context.add_callback(gen.cancel):  # the RPC already ended (cancelled, deadline)
        gen.cancel()
    return gen


class GenerationServicer(pb_grpc.GenerationServiceServicer):
    """Generate, GenerateStream, Tokenize, Detokenize."""

    def __init__(self, registry: PairRegistry, config: ServerConfig, metrics=None):
        self.registry, self.config, self.metrics = registry, config, metrics

    def Generate(self, request, context):
        gen = _admit(self, request, context)
        try:
            for delta in gen.stream:
                gen.seen(delta)
            result = gen.finish(context.is_active)
        finally:
            gen.cancel()
        return convert.result_to_pb(result, gen.req.request_id, gen.ttft, gen.sp.tokenizer)

    def GenerateStream(self, request, context):
        """Deltas of every completion (by index); with n = 1 one final summary after them, with n > 1
        each completion's own final message as it ends."""
        gen = _admit(self, request, context)
        rid = gen.req.request_id
        sent: dict[int, list[str]] = {i: [] for i in range(gen.req.n)}  # text sent, per completion
        try:
            for delta in map(gen.seen, gen.stream):
                if not context.is_active():
                    break
                if delta.tokens or delta.text or delta.prompt_logprobs:
                    sent[delta.index].append(delta.text)
                    yield convert.delta_to_pb(delta, rid, gen.sp.tokenizer)
                if delta.end is not None and gen.req.n > 1:
                    yield convert.final_stream_to_pb(delta.end, "".join(sent[delta.index]), rid, gen.ttft)
            if context.is_active():
                result = gen.finish(context.is_active)
                if gen.req.n == 1:
                    yield convert.final_stream_to_pb(result, "".join(sent[0]), rid, gen.ttft)
        finally:
            gen.cancel()

    def Tokenize(self, request, context):
        rules.check_text_bytes(request.text, "text", self.config.max_prompt_bytes)
        sp = self.registry.get(rules.pair_name(request.pair))
        ids = sp.tokenizer.encode(request.text, add_special=request.add_special,
                                  parse_special=request.parse_special if request.HasField("parse_special") else True)
        return pb.TokenizeResponse(tokens=ids)

    def Detokenize(self, request, context):
        sp = self.registry.get(rules.pair_name(request.pair))
        ids = rules.check_token_ids(request.tokens, sp.tokenizer.vocab_size, "tokens")
        return pb.DetokenizeResponse(text=sp.tokenizer.decode(ids, skip_special=request.skip_special))
