"""Protobuf <-> service dataclasses, at the edge: the only module besides the servicers that sees `pb`.

The rules both doors share (prompt ids from text or messages, stop strings, a speculative override)
are functions here that the OpenAI HTTP door (service/http/translate.py) calls too.

`*_from_pb` functions validate what a client sent and raise errors.InvalidArgument naming the
field; `*_to_pb` functions build responses. Request zeros and unset fields take the base values
the caller passes (the server's flags, or a pair's live config).
"""

from __future__ import annotations

import math
import re
from dataclasses import replace

from compute.backend import BufferSpec
from service.errors import InvalidArgument
from service.factory import FitResult, PairRequest
from service.params import (
    DEFAULT_NGRAM_CACHE_TOKENS,
    DEFAULT_PROMPT_CACHE_BYTES,
    ContextParams,
    SpeculativeConfig,
    or_default,
)
from service.pb.specserve.v1 import specserve_pb2 as pb
from service.plan import Plan
from service.requests import GenRequest, GenResult, ResponseFormat, SamplingParams, TokenDelta, TokenLogprob
from service.vocab import DRAFTER_TYPES, FINISH_REASONS, KV_TYPES, PAIR_STATES

DEFAULT_PAIR = "default"
PAIR_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
MAX_STOP_STRINGS = 16
# Messages of one conversation: each costs the chat template and the tokenizer far more than its bytes
# (100k empty messages, 0.4 MB of text, took 13 s and left ~150 MB behind); the longest served context
# holds a few thousand turns at most.
MAX_MESSAGES = 4096

DRAFTER_FROM_PB = {pb.DRAFTER_TYPE_NONE: "none", pb.DRAFTER_TYPE_DRAFT_MODEL: "draft",
                   pb.DRAFTER_TYPE_NGRAM: "ngram"}
DRAFTER_TO_PB = {v: k for k, v in DRAFTER_FROM_PB.items()}
KV_FROM_PB = {pb.KV_TYPE_F32: "f32", pb.KV_TYPE_F16: "f16"}
KV_TO_PB = {v: k for k, v in KV_FROM_PB.items()}
FINISH_TO_PB = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH,
                "cancelled": pb.FINISH_REASON_CANCELLED}
STATE_TO_PB = {"loading": pb.PAIR_STATE_LOADING, "ready": pb.PAIR_STATE_READY, "draining": pb.PAIR_STATE_DRAINING}
# every value of each vocabulary (service/vocab.py) has its proto twin
assert (set(DRAFTER_TO_PB), set(KV_TO_PB), set(FINISH_TO_PB), set(STATE_TO_PB)) == \
    (set(DRAFTER_TYPES), set(KV_TYPES), set(FINISH_REASONS), set(PAIR_STATES))


# ---- names ----

def pair_name(name: str) -> str:
    """A request's pair name: empty -> "default"; anything but [A-Za-z0-9._-]{1,64} is refused."""
    name = name or DEFAULT_PAIR
    if not PAIR_NAME.fullmatch(name):
        raise InvalidArgument(f"pair name {name!r}: use 1 to 64 letters, digits, '.', '_' or '-'")
    return name


# ---- speculative config ----

def speculative_from_pb(msg: pb.SpeculativeConfig, base: SpeculativeConfig) -> SpeculativeConfig:
    """`base` with the fields `msg` sets replaced (validated by SpeculativeConfig). Setting only n_max
    lowers n_min to fit under it."""
    changes: dict = {}
    if msg.type != pb.DRAFTER_TYPE_UNSPECIFIED:
        if msg.type not in DRAFTER_FROM_PB:
            raise InvalidArgument(f"speculative.type {msg.type} is not a DrafterType")
        changes["type"] = DRAFTER_FROM_PB[msg.type]
    for name in ("n_max", "n_min", "ngram_min", "ngram_max"):
        if msg.HasField(name):
            changes[name] = getattr(msg, name)
    if msg.HasField("p_min"):
        changes["p_min"] = round(msg.p_min, 6)  # float32 on the wire: 0.3 arrives as 0.30000001
    return speculative_with(base, changes)


def speculative_with(base: SpeculativeConfig, changes: dict) -> SpeculativeConfig:
    """`base` with `changes` (SpeculativeConfig field -> value; every door's override goes through here).
    Setting only n_max lowers n_min to fit under it."""
    if "p_min" in changes and not math.isfinite(changes["p_min"]):
        raise InvalidArgument("speculative.p_min must be a number within [0, 1]")
    if "n_max" in changes and "n_min" not in changes:
        changes = {**changes, "n_min": min(base.n_min, changes["n_max"])}
    return replace(base, **changes)  # SpeculativeConfig validates itself


def speculative_to_pb(cfg: SpeculativeConfig) -> pb.SpeculativeConfig:
    return pb.SpeculativeConfig(type=DRAFTER_TO_PB[cfg.type], n_max=cfg.n_max, n_min=cfg.n_min, p_min=cfg.p_min,
                                ngram_min=cfg.ngram_min, ngram_max=cfg.ngram_max)


# ---- pairs, params, plans ----

def context_params_from_pb(msg: pb.ContextParams, base: ContextParams) -> ContextParams:
    """`base` with every non-zero (or set) field of `msg`; range checks happen in params.fill_defaults."""
    changes: dict = {}
    for name in ("n_ctx", "n_parallel", "n_batch", "n_outputs_max", "n_ctx_min"):
        if getattr(msg, name):
            changes[name] = getattr(msg, name)
    if msg.kv_type != pb.KV_TYPE_UNSPECIFIED:
        if msg.kv_type not in KV_FROM_PB:
            raise InvalidArgument(f"params.kv_type {msg.kv_type} is not a KvType")
        changes["kv_type"] = KV_FROM_PB[msg.kv_type]
    if msg.HasField("n_gpu_layers"):
        if msg.n_gpu_layers < -1:
            raise InvalidArgument(f"params.n_gpu_layers must be >= -1 (-1 = all layers), got {msg.n_gpu_layers}")
        changes["n_gpu_layers"] = msg.n_gpu_layers
    for name, flag in (("prompt_cache_bytes", "--cache-ram"), ("ngram_cache_tokens", "--cache-ngram")):
        if msg.HasField(name):  # the operator's value is the most a client may ask for (invariant 9)
            most = or_default(getattr(base, name), {"prompt_cache_bytes": DEFAULT_PROMPT_CACHE_BYTES,
                                             "ngram_cache_tokens": DEFAULT_NGRAM_CACHE_TOKENS}[name])
            if getattr(msg, name) > most:
                raise InvalidArgument(f"params.{name} {getattr(msg, name)} exceeds this server's {most} ({flag})")
            changes[name] = getattr(msg, name)
    return replace(base, **changes)


def context_params_to_pb(cp: ContextParams) -> pb.ContextParams:
    return pb.ContextParams(n_ctx=cp.n_ctx, n_parallel=cp.n_parallel, n_batch=cp.n_batch,
                            n_outputs_max=cp.n_outputs_max, kv_type=KV_TO_PB[cp.kv_type],
                            n_gpu_layers=cp.n_gpu_layers, n_ctx_min=cp.n_ctx_min,
                            prompt_cache_bytes=cp.prompt_cache_bytes, ngram_cache_tokens=cp.ngram_cache_tokens)


def prompt_cache_to_pb(stats: dict) -> pb.PromptCacheStats:
    """A pair's prompt cache stats (service.prompt_cache.PrefixCache.stats)."""
    return pb.PromptCacheStats(**{k: stats[k] for k in ("capacity_bytes", "used_bytes", "entries", "hits", "misses",
                                                         "evictions", "cached_tokens")})


def pair_request_from_pb(spec: pb.PairSpec, base_params: ContextParams, base_spec: SpeculativeConfig,
                         default_target: str = "") -> PairRequest:
    """A Fit/Load PairSpec as a PairRequest; empty fields take the server's defaults."""
    base = base_spec
    if spec.draft_path and not spec.speculative.type:
        base = replace(base_spec, type="draft")
    elif base_spec.type == "draft" and not spec.draft_path:
        base = replace(base_spec, type="ngram")
    return PairRequest(
        name=pair_name(spec.name),
        target_path=spec.target_path or default_target,
        draft_path=spec.draft_path,
        params=context_params_from_pb(spec.params, base_params),
        speculative=speculative_from_pb(spec.speculative, base),
        budget_bytes=spec.memory_budget_bytes,
    )


def buffer_to_pb(spec: BufferSpec) -> pb.Buffer:
    return pb.Buffer(owner=spec.owner, kind=spec.kind, device=spec.device, bytes=spec.nbytes, tag=spec.tag)


def plan_to_pb(plan: Plan) -> pb.Plan:
    params = plan.params
    return pb.Plan(
        buffers=[buffer_to_pb(b.spec) for b in plan.buffers],
        total_bytes=plan.total_bytes,
        budget_bytes=max(plan.budget_bytes, 0),
        target=context_params_to_pb(params.target),
        draft=context_params_to_pb(params.draft) if params.draft is not None else None,
        device_bytes=plan.device_bytes("device"),
        host_bytes=plan.device_bytes("host"),
        speculative=speculative_to_pb(params.speculative),
    )


def fit_to_pb(result: FitResult) -> pb.FitResponse:
    return pb.FitResponse(fits=result.fits, plan=plan_to_pb(result.plan), adjustments=list(result.adjustments),
                          available_bytes=max(result.available_bytes, 0), deficit_bytes=max(result.deficit_bytes, 0),
                          max_n_ctx=result.max_n_ctx)


# ---- generation ----

def sampling_from_pb(msg: pb.SamplingParams) -> SamplingParams:
    """Sampling params: unset fields keep llama.cpp's defaults (temperature 0.8); 0 temperature = greedy.
    SamplingParams checks the ranges."""
    fields = {}
    for name in ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n", "seed"):
        if msg.HasField(name):
            v = getattr(msg, name)
            fields[name] = round(v, 6) if isinstance(v, float) else v  # float32 on the wire: 0.3 is 0.30000001
    return SamplingParams(**fields)


def check_text_bytes(text: str, field: str, max_bytes: int) -> None:
    """Refuse a text longer than `max_bytes` as UTF-8 before anything (the tokenizer) reads it."""
    if len(text) > max_bytes or len(text.encode("utf-8")) > max_bytes:
        raise InvalidArgument(f"{field} is {len(text.encode('utf-8'))} bytes, this server takes at most "
                              f"{max_bytes} (--max-prompt-bytes)")


def check_prompt_bytes(msg, max_bytes: int) -> None:
    """Refuse a prompt over `max_bytes` before tokenizing: text as UTF-8, messages and token ids as
    encoded on the wire."""
    which = msg.WhichOneof("input")
    if which == "prompt":
        check_text_bytes(msg.prompt, "prompt", max_bytes)
    elif which is not None:
        size = getattr(msg, which).ByteSize()
        if size > max_bytes:
            raise InvalidArgument(f"the prompt ({which}) is {size} bytes, this server takes at most {max_bytes} "
                                  "(--max-prompt-bytes)")


def prompt_ids_from_pb(msg, tokenizer) -> list[int]:
    """The prompt's token ids: text with BOS added, chat messages through the template, or ids as given."""
    which = msg.WhichOneof("input")
    if which is None:
        raise InvalidArgument("no prompt: set one of prompt, messages or tokens")
    if which == "prompt":
        ids = prompt_ids_from_text(msg.prompt, tokenizer)
    elif which == "messages":
        ids = prompt_ids_from_messages([(m.role, m.content) for m in msg.messages.messages], tokenizer,
                                       "messages.messages")
    else:
        ids = check_token_ids(msg.tokens.ids, tokenizer.vocab_size, "tokens.ids")
    if not ids:
        raise InvalidArgument(f"the prompt ({which}) has no tokens")
    return ids


def prompt_ids_from_text(text: str, tokenizer) -> list[int]:
    """A text prompt's ids: the model's special tokens (BOS) added, control tokens parsed."""
    return tokenizer.encode(text, add_special=True, parse_special=True)


def prompt_ids_from_messages(messages: list[tuple[str, str]], tokenizer, field: str) -> list[int]:
    """A conversation's ids: (role, content) pairs through the model's chat template (which holds BOS
    if any); `field` names the messages in errors."""
    if not messages:
        raise InvalidArgument(f"{field} is empty: give at least one message")
    if len(messages) > MAX_MESSAGES:
        raise InvalidArgument(f"{field}: at most {MAX_MESSAGES} messages (got {len(messages)})")
    for i, (role, _) in enumerate(messages):
        if not role:
            raise InvalidArgument(f"{field}[{i}].role is empty (use system, user or assistant)")
    text = tokenizer.apply_chat_template([{"role": role, "content": content} for role, content in messages])
    return tokenizer.encode(text, add_special=False, parse_special=True)


def check_token_ids(ids, vocab_size: int, field: str) -> list[int]:
    """Token ids, each below the vocabulary size."""
    ids = list(ids)
    bad = [i for i in ids if i >= vocab_size]
    if bad:
        raise InvalidArgument(f"{field}: id {bad[0]} is not below the vocabulary size {vocab_size}")
    return ids


def check_stop(stop) -> tuple[str, ...]:
    """Stop strings, at most MAX_STOP_STRINGS (GenRequest refuses empty ones)."""
    stop = tuple(stop)
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidArgument(f"stop: at most {MAX_STOP_STRINGS} stop strings (got {len(stop)})")
    return stop


def gen_request_from_pb(msg, tokenizer, live_spec: SpeculativeConfig, default_max_tokens: int,
                        request_id: str) -> GenRequest:
    """A GenerateRequest or GenerateStreamRequest (same fields) as a GenRequest."""
    prompt = prompt_ids_from_pb(msg, tokenizer)
    stop = check_stop(msg.stop)
    override = speculative_from_pb(msg.speculative, live_spec) if msg.HasField("speculative") else None
    return GenRequest(prompt=tuple(prompt),
                      max_tokens=msg.max_tokens if msg.HasField("max_tokens") else default_max_tokens,
                      sampling=sampling_from_pb(msg.sampling), stop=stop, speculative=override,
                      request_id=request_id,
                      logprobs=msg.top_logprobs if msg.logprobs or msg.top_logprobs else None,
                      prompt_logprobs=msg.prompt_logprobs if msg.HasField("prompt_logprobs") else None,
                      response_format=response_format_from_pb(msg.response_format)
                      if msg.HasField("response_format") else None,
                      n=msg.n or 1, cache_prompt=msg.cache_prompt if msg.HasField("cache_prompt") else True)


def response_format_from_pb(msg: pb.ResponseFormat) -> ResponseFormat | None:
    """The format's kind and text; an unset oneof is free text (None)."""
    kind = msg.WhichOneof("format")
    if kind is None:
        return None
    if kind == "json_object":
        return ResponseFormat("json_object") if msg.json_object else None
    return ResponseFormat(kind, getattr(msg, kind))


def token_logprobs_to_pb(entries: tuple[TokenLogprob, ...], tokenizer) -> list[pb.TokenLogprob]:
    """TokenLogprobs with each token's (and alternative's) text and bytes from the tokenizer."""
    def text_bytes(token: int) -> dict:
        b = tokenizer.token_bytes(token)
        return dict(text=b.decode("utf-8", errors="replace"), bytes=b)

    return [pb.TokenLogprob(token=e.token, logprob=e.logprob, **text_bytes(e.token),
                            top=[pb.TopLogprob(token=t, logprob=v, **text_bytes(t)) for t, v in e.top])
            for e in entries]


def _stats(result: GenResult) -> pb.SpeculativeStats:
    rate = result.accepted / result.drafted if result.drafted else 0.0
    return pb.SpeculativeStats(drafted=result.drafted, accepted=result.accepted, acceptance_rate=rate)


def _summary(result: GenResult, ttft: float) -> dict:
    tps = result.completion_tokens / result.decode_seconds if result.decode_seconds > 0 else 0.0
    return dict(
        finish_reason=FINISH_TO_PB.get(result.finish_reason, pb.FINISH_REASON_UNSPECIFIED),
        usage=pb.Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                       cached_prompt_tokens=result.cached_prompt_tokens),
        speculative_stats=_stats(result),
        timings=pb.Timings(queue_seconds=result.queue_seconds, prefill_seconds=result.prefill_seconds,
                           decode_seconds=result.decode_seconds, tokens_per_second=tps,
                           time_to_first_token_seconds=ttft),
    )


def choice_to_pb(c: GenResult, tokenizer) -> pb.Choice:
    return pb.Choice(index=c.index, text=c.text, tokens=list(c.tokens),
                     finish_reason=FINISH_TO_PB.get(c.finish_reason, pb.FINISH_REASON_UNSPECIFIED),
                     logprobs=token_logprobs_to_pb(c.logprobs, tokenizer), speculative_stats=_stats(c))


def result_to_pb(result: GenResult, request_id: str, ttft: float, tokenizer) -> pb.GenerateResponse:
    """The whole request: completion 0's fields on top (usage and timings of all), every completion in choices."""
    return pb.GenerateResponse(text=result.text, tokens=list(result.tokens), request_id=request_id,
                               logprobs=token_logprobs_to_pb(result.logprobs, tokenizer),
                               prompt_logprobs=token_logprobs_to_pb(result.prompt_logprobs, tokenizer),
                               choices=[choice_to_pb(c, tokenizer) for c in result.choices or (result,)],
                               **_summary(result, ttft))


def delta_to_pb(delta: TokenDelta, request_id: str, tokenizer) -> pb.GenerateStreamResponse:
    """A stream message of one completion's new tokens (and, once, the prompt's logprobs)."""
    return pb.GenerateStreamResponse(text=delta.text, tokens=list(delta.tokens), request_id=request_id,
                                     index=delta.index, logprobs=token_logprobs_to_pb(delta.logprobs, tokenizer),
                                     prompt_logprobs=token_logprobs_to_pb(delta.prompt_logprobs, tokenizer))


def final_stream_to_pb(result: GenResult, sent_text: str, request_id: str, ttft: float) -> pb.GenerateStreamResponse:
    """A completion's last stream message: any text not yet sent (held back by the engine), then the
    summary (with n > 1, of that completion: its own usage and timings)."""
    rest = result.text[len(sent_text):] if result.text.startswith(sent_text) else ""
    return pb.GenerateStreamResponse(text=rest, request_id=request_id, index=result.index, **_summary(result, ttft))
