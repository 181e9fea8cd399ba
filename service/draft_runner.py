"""The draft runner: proposes each slot's drafts, and alone owns the draft model's KV valid length.

Two drafters:
- n-gram (prompt lookup, service.speculative.ngram_propose): deterministic, no model, no KV;
- the draft model: it first catches up on the tokens its KV cache lacks (the whole prompt at
  first; within its n_batch rows, a slot still catching up drafts nothing this step), then
  decodes autoregressively, all drafting slots batched in each forward pass, and stops a slot
  at k drafts or when its top probability falls below p_min.

Draft KV bookkeeping: `valid[slot]` cells of the draft model's cache hold tokens[:valid]. After
drafting, the cache holds the slot's tokens at drafting time (`Draft.base` of them) plus the
first `Draft.fed` drafts. `accept` rolls it back to what verification kept: base + min(j, fed).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from compute.llama import Batch, LlamaContext
from service.grammar import constrain
from service.params import SpeculativeConfig
from service.sampling import logits_to_probs, penalty_history, sample
from service.sequence import Slot
from service.speculative import ngram_propose


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
    """Drafts for n_slots slots; `ctx` is the draft model's context (None: n-gram drafting only)."""

    def __init__(self, ctx: LlamaContext | None, n_slots: int):
        self.ctx = ctx
        self.valid = [0] * n_slots  # draft KV cells of each slot that hold its tokens[:valid]

    def reset(self, slot: int) -> None:
        """A new request in the slot: its draft KV holds nothing of it."""
        self.valid[slot] = 0

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
                prop = ngram_propose(s.tokens, a.k, a.cfg.ngram_min, a.cfg.ngram_max)
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

    def _run_model(self, work: list[_Drafting]) -> None:
        """Catch up, then one draft token per active slot per forward pass until none is active."""
        feed = self._catch_up(work)
        while feed:
            active = [f.d for f in feed if f.d.active]
            logits = self._decode(feed)  # (len(active), n_vocab)
            feed = [_Feed(d, [d.tokens[-1]]) for d, row in zip(active, logits) if self._extend(d, row)]

    def _catch_up(self, work: list[_Drafting]) -> list[_Feed]:
        """What each slot's draft KV lacks, within the draft context's n_batch rows."""
        rows_left, feed = self.ctx.n_batch, []
        for d in work:
            pend = d.ask.slot.tokens[self.valid[d.ask.slot.idx]:]
            m = min(len(pend), rows_left)
            rows_left -= m
            if m < len(pend) or not pend:
                d.active = False  # still catching up: no draft this step
            if m:
                feed.append(_Feed(d, pend[:m]))
        return feed

    def _decode(self, feed: list[_Feed]) -> np.ndarray:
        """One draft forward pass over the feeds; logits of each active slot's last fed row."""
        tokens, positions, slots, outputs = [], [], [], []
        for f in feed:
            s, n = f.d.ask.slot, len(f.tokens)
            tokens += f.tokens
            positions += range(self.valid[s.idx], self.valid[s.idx] + n)
            slots += [s.idx] * n
            if f.d.active:
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
