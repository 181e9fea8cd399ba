"""A slot: one concurrent sequence being generated, and the summary of it when it ends.

Bookkeeping: `tokens` is prompt + generated; `n_past` tokens are in the target's KV cache;
tokens[n_past:] are pending (fed next step). While prefilling, several tokens are pending (a
prompt fed in chunks of n_batch); in decode exactly one is: the last sampled token. The draft
model's KV length is the draft runner's, not the slot's (service/draft_runner.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from service.draft_policy import DraftStats
from service.grammar import Matcher
from service.output import Stream, TextOutput
from service.params import SpeculativeConfig
from service.requests import GenResult
from service.vocab import FinishReason


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
    grammar: Matcher | None = None  # the request's response_format, where it stands (service/grammar.py)

    def assign(self, stream: Stream, out: TextOutput) -> None:
        """Start generating `stream`'s request in this slot (every field reset)."""
        req = stream.request
        self.stream, self.tokens, self.n_prompt, self.n_past = stream, list(req.prompt), len(req.prompt), 0
        self.spec, self.rng, self.out = req.speculative, np.random.default_rng(req.sampling.seed), out
        self.stats, self.exploring, self.drafted, self.accepted = DraftStats(), False, 0, 0
        self.t_admit, self.t_first = time.perf_counter(), 0.0
        self.grammar = None  # the engine sets the request's matcher

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

    def result(self, reason: FinishReason) -> GenResult:
        """The summary of this slot's generation, ending now for `reason`."""
        now = time.perf_counter()
        first = self.t_first or now
        return GenResult(self.out.text, tuple(self.generated), reason, self.n_prompt, len(self.generated),
                         self.drafted, self.accepted, self.t_admit - self.stream.submitted_at,
                         first - self.t_admit, now - first)


def unstarted_result(stream: Stream, reason: FinishReason) -> GenResult:
    """The summary of a request that ended before it reached a slot (cancelled while queued)."""
    waited = time.perf_counter() - stream.submitted_at
    return GenResult("", (), reason, len(stream.request.prompt), 0, 0, 0, waited, 0.0, 0.0)
