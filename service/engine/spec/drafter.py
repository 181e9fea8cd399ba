"""The draft runner: proposes each slot's drafts, and alone owns the draft model's KV valid length.

Two drafters:
- n-gram (prompt lookup, service.engine.spec.verify.ngram_match): deterministic, no model, no KV; it
  also looks in the pair's cross-request index of recent outputs (service/engine/spec/ngram_index.py) and
  takes its proposal when it matched a longer suffix than the slot's own tokens did;
- the draft model: it first catches up on the tokens its KV cache lacks (the whole prompt at
  first, in passes of n_batch rows: how much it lacked never changes what it drafts), then
  decodes autoregressively, all drafting slots batched in each forward pass, and stops a slot
  at k drafts or when its top probability falls below p_min.

Draft KV bookkeeping: `valid[slot]` cells of the draft model's cache hold tokens[:valid]. After
drafting, the cache holds the slot's tokens at drafting time (`Draft.base` of them) plus the
first `Draft.fed` drafts. `accept` rolls it back to what verification kept: base + min(j, fed).
A new request starts with the cells of the prompt prefix it shares with what the slot held
(service/engine/prompt_cache.py): `reset(slot, keep)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from compute.llama import Batch, LlamaContext
from service.engine.grammar import constrain
from service.engine.sampling import logits_to_probs, penalty_history, sample
from service.engine.slot import Slot
from service.engine.spec.ngram_index import RECORD_PROMPT_TAIL, NgramIndex
from service.engine.spec.verify import ngram_match
from service.fit.params import SpeculativeConfig


@dataclass(frozen=True)
class DraftAsk:
    """Propose up to k drafts for a decoding slot with the drafter of `cfg`."""

    slot: Slot
    k: int
    cfg: SpeculativeConfig


@dataclass(frozen=True)
class Draft:
    """One slot's proposals in one step."""

    tokens: tuple[int, ...]  # d_1..d_k
    probs: tuple[np.ndarray, ...] | None  # (n_vocab,) each: what d_i was drawn from; None: deterministic
    base: int  # the slot's token count when drafted
    fed: int = 0  # drafts fed into the draft model's KV (the last one is sampled, never fed)


@dataclass
class _Drafting:
    """A slot's draft-model drafting within one step."""

    ask: DraftAsk
    base: int
    tokens: list[int] = field(default_factory=list)
    probs: list[np.ndarray] = field(default_factory=list)
    fed: int = 0
    active: bool = True  # still drafting: its last fed row's logits are wanted


@dataclass(frozen=True)
class _Feed:
    """Tokens of one slot fed to the draft model in one forward pass."""

    d: _Drafting
    tokens: list[int]


class DraftRunner:
    """Drafts for n_slots slots; `ctx` is the draft model's context (None: n-gram drafting only);
    `index`: the pair's cross-request n-gram index (None: drafts come from each request alone)."""

    def __init__(self, ctx: LlamaContext | None, n_slots: int, index: NgramIndex | None = None):
        self.ctx = ctx
        self.index = index
        self.valid = [0] * n_slots  # draft KV cells of each slot that hold its tokens[:valid]

    def reset(self, slot: int, keep: int = 0) -> None:
        """A new request in the slot whose draft KV already holds the cells of its first `keep` tokens."""
        self.valid[slot] = keep

    def record(self, s: Slot) -> None:
        """A request finished: its prompt's last tokens and its output go into the cross-request index."""
        if self.index is not None and len(s.tokens) > s.n_prompt:
            self.index.add(s.tokens[max(0, s.n_prompt - RECORD_PROMPT_TAIL):])

    def fork(self, src: Slot, dsts: tuple[Slot, ...], n: int) -> None:
        """n > 1 completions: bring src's draft KV up to its first n tokens (the prompt; forward passes
        without logits, n_batch rows each) and copy those cells to each of dsts, so the draft model too
        reads the prompt once."""
        if self.ctx is None:
            return
        while self.valid[src.idx] < n:
            v = self.valid[src.idx]
            m = min(n - v, self.ctx.n_batch)
            self.ctx.decode(Batch.make(src.tokens[v:v + m], range(v, v + m), [src.idx] * m, []))
            self.valid[src.idx] = v + m
        for d in dsts:
            self.ctx.copy_cells(src.idx, d.idx, n)
            self.valid[d.idx] = n

    def accept(self, slot: int, draft: Draft, j: int) -> None:
        """Verification kept j of the drafts: roll the draft KV back to base + min(j, fed)."""
        if draft.probs is not None:
            self.valid[slot] = min(self.valid[slot], draft.base + min(j, draft.fed))

    def propose(self, asks: list[DraftAsk]) -> dict[int, Draft]:
        """Each slot's drafts by slot index; a slot with fewer than max(n_min, 1) gets none."""
        out: dict[int, Draft] = {}
        model = []
        for a in asks:
            s = a.slot
            if a.cfg.type == "ngram":
                prop = self._ngram(s, a.k, a.cfg)
                if len(prop) >= max(a.cfg.n_min, 1):
                    out[s.idx] = Draft(tuple(prop), None, len(s.tokens))
            elif a.cfg.type == "draft" and self.ctx is not None:
                model.append(_Drafting(a, len(s.tokens)))
        if model:
            self._run_model(model)
        for d in model:
            s = d.ask.slot
            if len(d.tokens) >= max(d.ask.cfg.n_min, 1):
                out[s.idx] = Draft(tuple(d.tokens), tuple(d.probs), d.base, d.fed)
            else:  # too few proposals: decode normally, and forget the fed drafts
                self.valid[s.idx] = min(self.valid[s.idx], len(s.tokens))
        return out

    def _ngram(self, s: Slot, k: int, cfg: SpeculativeConfig) -> list[int]:
        """The slot's own prompt lookup, or the cross-request index's proposal when it matched a longer
        suffix. A sampled request with a seed drafts from its own tokens only: which drafts verification
        tests decides how its random stream is used, so its output must not depend on other requests."""
        n, prop = ngram_match(s.tokens, k, cfg.ngram_min, cfg.ngram_max)
        sp = s.stream.request.sampling
        if self.index is not None and (sp.greedy or sp.seed is None):
            m, other = self.index.match(s.tokens, k, cfg.ngram_min)
            if m > n:
                return other
        return prop

    def _run_model(self, work: list[_Drafting]) -> None:
        """Catch up, then one draft token per active slot per forward pass until none is active."""
        feed = self._catch_up(work)
        while feed:
            active = [f.d for f in feed if f.d.active]
            logits = self._decode(feed)  # (len(active), n_vocab)
            feed = [_Feed(d, [d.tokens[-1]]) for d, row in zip(active, logits) if self._extend(d, row)]

    def _catch_up(self, work: list[_Drafting]) -> list[_Feed]:
        """Feed what each slot's draft KV lacks: while it does not all fit in one pass of n_batch rows,
        passes without logits that hold back each slot's last token; then return the feeds of the rest,
        whose pass starts the drafting. So whether and what a slot drafts never depends on what its
        draft KV held before (a cached prefix, a prompt longer than n_batch): drafts draw from its
        random stream, and a seeded request's output must not depend on the cache."""
        rest = [[d, d.ask.slot.tokens[self.valid[d.ask.slot.idx]:]] for d in work]
        while sum(len(p) for _, p in rest) > self.ctx.n_batch and any(len(p) > 1 for _, p in rest):
            rows_left, feed = self.ctx.n_batch, []
            for r in rest:
                m = min(len(r[1]) - 1, rows_left)
                if m > 0:
                    feed.append(_Feed(r[0], r[1][:m]))
                    r[1], rows_left = r[1][m:], rows_left - m
            self._decode(feed, want=False)
        rows_left, feed = self.ctx.n_batch, []
        for d, pend in rest:
            if not pend or len(pend) > rows_left:
                d.active = False  # nothing to feed (the last token is always pending) or more slots than rows
                continue
            feed.append(_Feed(d, pend))
            rows_left -= len(pend)
        return feed

    def _decode(self, feed: list[_Feed], want: bool = True) -> np.ndarray:
        """One draft forward pass over the feeds; logits of each active slot's last fed row (`want` False:
        none, a catch-up pass)."""
        tokens, positions, slots, outputs = [], [], [], []
        for f in feed:
            s, n = f.d.ask.slot, len(f.tokens)
            tokens += f.tokens
            positions += range(self.valid[s.idx], self.valid[s.idx] + n)
            slots += [s.idx] * n
            if want and f.d.active:
                outputs.append(len(tokens) - 1)
        logits = self.ctx.decode(Batch.make(tokens, positions, slots, outputs))
        for f in feed:
            self.valid[f.d.ask.slot.idx] += len(f.tokens)
            if f.d.tokens:  # drafts (not catch-up tokens) are in the draft KV now
                f.d.fed += len(f.tokens)
        return logits

    def _extend(self, d: _Drafting, logits: np.ndarray) -> bool:
        """Sample the next draft from its distribution q; True when the slot drafts on."""
        s, cfg = d.ask.slot, d.ask.cfg
        sp = s.stream.request.sampling
        if s.grammar is not None:  # q is the constrained draft's distribution: it never draws a forbidden token
            allowed = s.grammar.mask_after(d.tokens)
            if allowed is None:  # past the grammar's end
                d.active = False
                return False
            logits = constrain(logits, allowed)
        q = logits_to_probs(logits, sp, penalty_history(s.tokens, d.tokens, sp))
        tok = sample(q, s.rng)
        if q.max() < cfg.p_min:  # the draft model is unsure: stop before this token
            d.active = False
            return False
        d.tokens.append(tok)
        d.probs.append(q)
        d.active = len(d.tokens) < d.ask.k
        return d.active
