"""A slot: one concurrent sequence being generated, and the summary of it when it ends.

Bookkeeping: `tokens` is prompt + generated; `n_past` tokens are in the target's KV cache;
tokens[n_past:] are pending (fed next step). While prefilling, several tokens are pending (a
prompt fed in chunks of n_batch); in decode exactly one is: the last sampled token. The draft
model's KV length is the draft runner's, not the slot's (service/engine/spec/drafter.py).

A free slot keeps `tokens` and `n_past` of the request that ran in it: its KV cells still hold
tokens[:n_past], which the next request reuses as far as its prompt agrees (service/engine/prompt_cache.py).

A request with n > 1 completions holds n slots: completion 0's slot prefills the prompt (and
scores it), the others wait (`follows` it) until its prompt is in the KV cache, then copy those
cells (service/engine/engine.py `_fork`) and sample on their own, each with its own seed stream.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from service.common.choices import FinishReason
from service.engine.grammar import Matcher
from service.engine.prompt_cache import common_prefix
from service.engine.request import GenResult, TokenDelta, TokenLogprob
from service.engine.spec.policy import DraftStats
from service.engine.stream import Stream, TextOutput
from service.fit.params import SpeculativeConfig


@dataclass
class Slot:
    """One sequence being generated (a free slot has no stream)."""

    idx: int
    stream: Stream | None = None
    tokens: list[int] = field(default_factory=list)  # prompt + generated
    n_prompt: int = 0
    n_past: int = 0  # tokens in the target KV cache
    spec: SpeculativeConfig | None = None  # the request's override of the engine's config
    rng: np.random.Generator | None = None
    out: TextOutput | None = None
    stats: DraftStats = field(default_factory=DraftStats)  # the draft policy's state
    exploring: bool = False  # this step's draft is an exploration (draft_policy)
    drafted: int = 0  # draft tokens proposed for this request ...
    accepted: int = 0  # ... and accepted
    t_admit: float = 0.0
    t_first: float = 0.0  # when the first tokens were appended
    n_cached: int = 0  # prompt tokens whose KV cells were reused, not prefilled
    cacheable: bool = True  # the cells may serve a later request (the request's cache_prompt, no failed step)
    released: int = 0  # when the slot was last freed (a counter): admission prefers the least recent
    index: int = 0  # which of the request's n completions
    follows: Slot | None = None  # completion 0's slot, until its prompt KV is copied here
    siblings: tuple[Slot, ...] = ()  # completion 0: the slots waiting for its prompt KV
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of the generated tokens, when asked for
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # of the prompt tokens scored so far
    grammar: Matcher | None = None  # the request's response_format, where it stands (service/engine/grammar.py)

    def assign(self, stream: Stream, out: TextOutput, n_cached: int = 0, index: int = 0,
               follows: Slot | None = None) -> None:
        """Start generating completion `index` of `stream`'s request in this slot (every field reset); the
        KV cells of the first `n_cached` prompt tokens are in place already."""
        req = stream.request
        assert 0 <= n_cached < len(req.prompt) or n_cached == 0
        self.stream, self.tokens, self.n_prompt = stream, list(req.prompt), len(req.prompt)
        self.n_past, self.n_cached, self.cacheable = n_cached, n_cached, req.cache_prompt
        self.spec, self.rng, self.out = req.speculative, seed_stream(req.sampling.seed, index), out
        self.index, self.follows, self.siblings, self.logprobs, self.prompt_logprobs = index, follows, (), [], []
        self.stats, self.exploring, self.drafted, self.accepted = DraftStats(), False, 0, 0
        self.t_admit, self.t_first = time.perf_counter(), 0.0
        self.grammar = None  # the engine sets the request's matcher

    def append(self, new: list[int], logprobs, eog: frozenset[int], n_ctx_slot: int) -> tuple[int, FinishReason | None]:
        """Append verified tokens one by one, stopping at an end-of-generation token, max_tokens, a stop
        string, a complete response format or a full context, and send the client the delta; logprobs: one
        per token of new, when the request asked for them. Returns (tokens appended, why it ended or None)."""
        req = self.stream.request
        if not self.t_first:
            self.t_first = time.perf_counter()
        appended: list[int] = []
        reason = None
        for t in new:
            if t in eog:
                reason = "stop"
                break
            self.tokens.append(t)
            appended.append(t)
            if self.out.push(t):
                reason = "stop"  # a stop string
                break
            if self.grammar is not None and self.grammar.advance(t):
                reason = "stop"  # the response format is complete
                break
            if len(self.generated) >= req.max_tokens:
                reason = "length"
                break
        if reason is None and len(self.tokens) >= n_ctx_slot:
            reason = "length"  # the next token would have no KV cell
        if reason is not None:
            self.out.close()
        text = self.out.take(final=reason is not None)
        lps = tuple(logprobs[:len(appended)]) if logprobs else ()
        self.logprobs += lps
        if appended or text:
            self.stream._emit(TokenDelta(tuple(appended), text, self.index, lps))
        return len(appended), reason

    def cached_tokens(self) -> list[int]:
        """The tokens whose KV cells this slot holds for a later request (none if not cacheable)."""
        return self.tokens[:self.n_past] if self.cacheable else []

    def reusable(self, prompt, cache_prompt: bool = True) -> int:
        """Cells a request with `prompt` would keep here: the common prefix, less the last prompt token."""
        if not cache_prompt:
            return 0
        return min(common_prefix(self.cached_tokens(), prompt), len(prompt) - 1)

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.n_prompt:]

    @property
    def busy(self) -> bool:
        return self.stream is not None

    @property
    def n_pending(self) -> int:
        """Tokens not yet in the target KV cache (1 in decode)."""
        return len(self.tokens) - self.n_past

    @property
    def scoring(self) -> bool:
        """Whether this slot scores its prompt (the request's prompt_logprobs; completion 0 only)."""
        return self.index == 0 and self.stream is not None and self.stream.request.prompt_logprobs is not None

    def n_scored(self, n_fed: int) -> int:
        """Of n_fed prompt tokens fed from n_past, how many rows score a next prompt token."""
        return max(0, min(n_fed, self.n_prompt - 1 - self.n_past)) if self.scoring else 0

    def end(self, reason: FinishReason) -> GenResult:
        """Send the client the text held back and this completion's result; returns the result."""
        rest = self.out.take(final=True)
        result = self.result(reason)
        self.stream._emit(TokenDelta((), rest, self.index, end=result))
        return result

    def result(self, reason: FinishReason) -> GenResult:
        """The summary of this slot's generation, ending now for `reason`."""
        now = time.perf_counter()
        first = self.t_first or now
        return GenResult(self.out.text, tuple(self.generated), reason, self.n_prompt, len(self.generated),
                         self.drafted, self.accepted, self.t_admit - self.stream.submitted_at,
                         first - self.t_admit, now - first, self.n_cached, index=self.index,
                         logprobs=tuple(self.logprobs), prompt_logprobs=tuple(self.prompt_logprobs))


def seed_stream(seed: int | None, index: int) -> np.random.Generator:
    """Completion `index`'s random stream: completion 0 draws from the request's seed exactly as a request
    with n = 1 does; completion i > 0 from (seed, i). No seed: fresh entropy for each."""
    if seed is None or index == 0:
        return np.random.default_rng(seed)
    return np.random.default_rng([seed, index])


def unstarted_result(stream: Stream, reason: FinishReason) -> GenResult:
    """The summary of a request that ended before it reached a slot (cancelled while queued)."""
    waited = time.perf_counter() - stream.submitted_at
    return GenResult("", (), reason, len(stream.request.prompt), 0, 0, 0, waited, 0.0, 0.0)
