"""Each step's drafts: how many each decoding slot proposes (the draft policy), the tokens (the drafter),
cut to what the slot's grammar allows; the live speculative config they follow; and what a verification
teaches the policy.

The engine asks `propose(busy, row_cost)` once a step and `learn(slot, work, j)` once a slot's drafts
were verified; the policy itself is pure (service/engine/spec/policy.py).
"""

from __future__ import annotations

from dataclasses import replace

from service.common.errors import InvalidArgument
from service.config.settings import SpeculativeConfig
from service.engine.scheduler import SlotWork
from service.engine.slot import Slot
from service.engine.spec import policy
from service.engine.spec.drafter import Draft, DraftAsk, DraftRunner
from service.fit.params import check_draft_model


class Proposer:
    """The drafting side of a step over one pair's slots."""

    def __init__(self, drafter: DraftRunner, has_draft_model: bool, n_slots: int, n_ctx_slot: int,
                 n_outputs_max: int, speculative: SpeculativeConfig):
        self.drafter = drafter
        self.has_draft_model = has_draft_model
        self.n_slots, self.n_ctx_slot, self.n_outputs_max = n_slots, n_ctx_slot, n_outputs_max
        self.max_n_max = max(0, n_outputs_max // n_slots - 1)  # drafts per slot the plan has room for
        self.speculative = self.check(speculative)  # the live default; a request may override it

    def check(self, cfg: SpeculativeConfig) -> SpeculativeConfig:
        """Validate a config against this pair: its plan's output rows and whether it has a draft model."""
        check_draft_model(cfg, self.has_draft_model, pair_loaded=True)
        if cfg.enabled and cfg.n_max > self.max_n_max:
            raise InvalidArgument(
                f"speculative n_max {cfg.n_max} exceeds {self.max_n_max}, what the plan sized the outputs for "
                f"(n_outputs_max {self.n_outputs_max} over {self.n_slots} slots); "
                "Fit and Load again with a larger n_max")
        return cfg

    def spec_of(self, s: Slot) -> SpeculativeConfig:
        """The config a slot drafts by: its request's override, else the live one."""
        return s.spec if s.spec is not None else self.speculative

    def k_max(self, s: Slot, cfg: SpeculativeConfig) -> int:
        """Most drafts this slot may verify now: config, plan, max_tokens and context room."""
        left = s.stream.request.max_tokens - len(s.generated)
        return max(0, min(cfg.n_max, self.max_n_max, left - 1, self.n_ctx_slot - 1 - s.n_past - 1))

    def propose(self, busy: list[Slot], row_cost) -> dict[int, Draft]:
        """Each decoding slot's drafts: their number from the draft policy, the tokens from the runner."""
        asks = []
        for s in busy:
            if s.n_pending != 1 or len(s.tokens) == s.n_prompt or s.follows is not None:
                continue  # still prefilling (a cached prompt too: the first token is never drafted), or waiting
                # for its prompt's KV (a sibling completion)
            cfg = self.spec_of(s)
            s.stats = policy.tick(s.stats)
            choice = policy.choose(s.stats, self.k_max(s, cfg) if cfg.enabled else 0, row_cost,
                                   may_explore=cfg.type == "ngram" and cfg.n_min <= 1)
            s.exploring = choice.exploring
            if choice.k > 0:
                asks.append(DraftAsk(s, choice.k, cfg))
        drafts = self._grammar_checked(busy, self.drafter.propose(asks))
        for a in asks:
            if a.cfg.type == "ngram" and a.slot.idx in drafts:
                a.slot.stats = policy.drafted(a.slot.stats)
        return drafts

    def _grammar_checked(self, busy: list[Slot], drafts: dict[int, Draft]) -> dict[int, Draft]:
        """Drafts cut before the first token their slot's grammar forbids (none left: no draft)."""
        for s in busy:
            d = drafts.get(s.idx)
            if d is None or s.grammar is None:
                continue
            m = s.grammar.valid_prefix(d.tokens)
            if m == 0:
                del drafts[s.idx]
                self.drafter.accept(s.idx, d, 0)
            elif m < len(d.tokens):
                drafts[s.idx] = replace(d, tokens=d.tokens[:m], probs=None if d.probs is None else d.probs[:m])
        return drafts

    @staticmethod
    def learn(s: Slot, w: SlotWork, j: int) -> None:
        """Update the slot's draft policy state: j of its verified drafts accepted."""
        s.stats = policy.learn(s.stats, len(w.drafts), j)
        if w.drafts and s.exploring:
            s.stats = policy.back_off(s.stats, accepted=j > 0)
