"""Generation requests and results as plain dataclasses (the servicer converts proto <-> these)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from service.common.choices import FinishReason
from service.common.errors import InvalidArgument
from service.config.settings import DEFAULT_MAX_TOKENS, MAX_N, MAX_TOP_LOGPROBS, SpeculativeConfig

DEFAULT_TEMPERATURE = 0.8  # as llama.cpp: unset temperature means 0.8; 0 means greedy
U32 = 1 << 32  # the integer fields are uint32 on the wire (gRPC): every door takes the same range
FormatKind = Literal["json_object", "json_schema", "regex", "lark", "gbnf"]
FORMAT_KINDS: tuple[FormatKind, ...] = ("json_object", "json_schema", "regex", "lark", "gbnf")


# (field, test, what the message says): the rules of the float fields of SamplingParams
SAMPLING_RULES = (
    ("temperature", lambda v: v >= 0, "must be >= 0 (0 = greedy)"),
    ("top_p", lambda v: 0 < v <= 1, "must be within (0, 1] (1 = off)"),
    ("min_p", lambda v: 0 <= v <= 1, "must be within [0, 1] (0 = off)"),
    ("repeat_penalty", lambda v: v > 0, "must be > 0 (1 = off)"),
)
# ... and of its integer fields (HTTP could send what gRPC's uint32 cannot express)
SAMPLING_INT_RULES = (
    ("top_k", lambda v: 0 <= v < U32, f"must be within [0, {U32 - 1}] (0 = off)"),
    ("repeat_last_n", lambda v: -1 <= v < U32, f"must be within [-1, {U32 - 1}] (-1 = the whole context)"),
)


@dataclass(frozen=True)
class SamplingParams:
    """Sampling knobs; neutral values disable each filter."""

    temperature: float = DEFAULT_TEMPERATURE  # 0: greedy
    top_k: int = 40  # 0: off
    top_p: float = 0.95  # 1: off
    min_p: float = 0.05  # 0: off
    repeat_penalty: float = 1.0  # 1: off
    repeat_last_n: int = 64  # tokens the repetition penalty looks back over
    seed: int | None = None  # None: a random seed; a seed makes sampling reproducible

    def __post_init__(self):
        """Refuse values no sampler can use, with InvalidArgument naming the field (every door: gRPC, CLI)."""
        for name, ok, rule in SAMPLING_RULES:
            v = getattr(self, name)
            if not math.isfinite(v):
                raise InvalidArgument(f"sampling.{name} must be a finite number")
            if not ok(v):
                raise InvalidArgument(f"sampling.{name} {v}: {rule}")
        for name, ok, rule in SAMPLING_INT_RULES:
            if not ok(getattr(self, name)):
                raise InvalidArgument(f"sampling.{name} {getattr(self, name)}: {rule}")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass(frozen=True)
class ResponseFormat:
    """A constraint on the generated text: `kind` and its text (schema, regex or grammar; "" for json_object)."""

    kind: FormatKind
    value: str = ""

    def __post_init__(self):
        if self.kind not in FORMAT_KINDS:
            raise InvalidArgument(f"response_format: unknown kind {self.kind!r} (use one of {', '.join(FORMAT_KINDS)})")
        if self.kind != "json_object" and not self.value.strip():
            raise InvalidArgument(f"response_format.{self.kind} is empty")


@dataclass(frozen=True)
class GenRequest:
    """One generation: prompt token ids in, up to max_tokens out (for each of n completions)."""

    prompt: tuple[int, ...]
    max_tokens: int = DEFAULT_MAX_TOKENS
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()  # stop strings (not included in the output)
    speculative: SpeculativeConfig | None = None  # per-request override of the pair's live config
    request_id: str = ""
    logprobs: int | None = None  # None: none; k: each generated token's logprob and its k top alternatives
    prompt_logprobs: int | None = None  # None: no prompt scoring; k: each prompt token's logprob and k alternatives
    response_format: ResponseFormat | None = None  # None: free text
    n: int = 1  # completions of the prompt
    cache_prompt: bool = True  # reuse (and keep) the KV of the prompt's prefix

    def __post_init__(self):
        """Refuse what no pair could serve (checks that depend on the pair are the engine's)."""
        if self.max_tokens < 0:
            raise InvalidArgument("max_tokens must be >= 0")
        if self.max_tokens >= U32:
            raise InvalidArgument(f"max_tokens {self.max_tokens}: must be <= {U32 - 1}")
        if any(not s for s in self.stop):
            raise InvalidArgument("stop: a stop string is empty")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and not 0 <= k <= MAX_TOP_LOGPROBS:
                raise InvalidArgument(f"{name}: top alternatives must be within [0, {MAX_TOP_LOGPROBS}], got {k}")
        if not 1 <= self.n <= MAX_N:
            raise InvalidArgument(f"n must be within [1, {MAX_N}], got {self.n}")

    @property
    def may_reuse_prefix(self) -> bool:
        """Whether cached KV of a prompt prefix may stand in for prefilling it: not when the prompt is
        scored (every prompt row's logits are needed), nor when the client asked for no cache."""
        return self.cache_prompt and self.prompt_logprobs is None


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability and the most likely tokens at its position (service/engine/logprobs.py says
    which distribution); text and bytes are the tokenizer's, added at the edge."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token, logprob), most likely first


@dataclass(frozen=True)
class TokenDelta:
    """Tokens produced by one engine step for one completion (`index`) of a request, and the text they
    completed. The last delta of a completion carries its summary in `end`."""

    tokens: tuple[int, ...]
    text: str
    index: int = 0  # which of the request's n completions
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token, when the request asked for logprobs
    prompt_logprobs: tuple[TokenLogprob, ...] = ()  # once, before any token, when it asked for prompt_logprobs
    end: GenResult | None = None  # the completion's summary: it ended with this delta


@dataclass(frozen=True)
class GenResult:
    """The summary of a finished generation."""

    text: str
    tokens: tuple[int, ...]
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    drafted: int  # draft tokens proposed for this request
    accepted: int  # draft tokens accepted by verification
    queue_seconds: float
    prefill_seconds: float
    decode_seconds: float
    cached_prompt_tokens: int = 0  # prompt tokens whose KV came from the prompt cache, not a prefill
    index: int = 0  # which completion (of a request's n)
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token of `tokens` when asked for
    prompt_logprobs: tuple[TokenLogprob, ...] = ()  # one per prompt token when asked for (the request's)
    choices: tuple[GenResult, ...] = ()  # a request's result: every completion by index; the fields above
    # are choice 0's except completion_tokens (summed over all) and decode_seconds (the longest)
