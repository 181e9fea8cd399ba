"""The draft runner with a fake draft context (no backend): what it feeds, what it proposes,
and the draft KV valid length it alone owns (catch-up, drafting, rollback, too few proposals)."""

from __future__ import annotations

import numpy as np

from service.engine.request import GenRequest, SamplingParams
from service.engine.slot import Slot
from service.engine.spec.drafter import DraftAsk, DraftRunner
from service.engine.stream import Stream, TextOutput
from service.fit.params import SpeculativeConfig

V = 50
GREEDY = SamplingParams(temperature=0.0)


class FakeDraftContext:
    """Logits whose argmax is the fed token + 1 (mod V); `flat` makes every distribution uniform."""

    def __init__(self, n_batch: int = 16, flat: bool = False):
        self.n_batch, self.flat, self.batches = n_batch, flat, []

    def decode(self, batch):
        self.batches.append(batch)
        logits = np.zeros((len(batch.outputs), V), np.float32)
        if not self.flat:
            logits[np.arange(len(batch.outputs)), (batch.tokens[batch.outputs] + 1) % V] = 10.0
        return logits


def slot(idx: int, tokens, sampling=GREEDY) -> Slot:
    s = Slot(idx)
    s.assign(Stream(GenRequest(tuple(tokens), sampling=sampling)), TextOutput(None, ()))
    return s


def test_catch_up_then_one_draft_per_pass_and_rollback_to_the_accepted_drafts():
    ctx = FakeDraftContext()
    runner = DraftRunner(ctx, n_slots=2)
    s = slot(1, [3, 4, 5, 6, 7])
    (d,) = runner.propose([DraftAsk(s, 3, SpeculativeConfig("draft", n_max=3, p_min=0.0))]).values()
    assert d.tokens == (8, 9, 10) and len(d.probs) == 3 and d.base == 5
    fed = [(b.tokens.tolist(), b.positions.tolist(), b.outputs.tolist()) for b in ctx.batches]
    assert fed == [([3, 4, 5, 6, 7], [0, 1, 2, 3, 4], [4]), ([8], [5], [0]), ([9], [6], [0])]  # d3 never fed
    assert d.fed == 2 and runner.valid[1] == 7
    runner.accept(1, d, 1)  # d1 accepted, d2 rejected: the draft KV keeps the prompt and d1
    assert runner.valid[1] == 6
    runner.accept(1, d, 3)  # accepting more than was fed never grows it
    assert runner.valid[1] == 6
    runner.reset(1)
    assert runner.valid[1] == 0


def test_slots_draft_together_after_catching_up_in_passes_of_n_batch_rows():
    """8 pending tokens in passes of 6 rows: a first pass without logits holds back each slot's last
    token, then both slots draft, as they would had everything fitted (or been cached) at once."""
    ctx = FakeDraftContext(n_batch=6)
    runner = DraftRunner(ctx, n_slots=2)
    a, b = slot(0, [1, 2, 3]), slot(1, [20, 21, 22, 23, 24])
    cfg = SpeculativeConfig("draft", n_max=2, p_min=0.0)
    out = runner.propose([DraftAsk(a, 2, cfg), DraftAsk(b, 2, cfg)])
    assert out[0].tokens == (4, 5) and out[1].tokens == (25, 26)
    first, second = ctx.batches[0], ctx.batches[1]
    assert first.tokens.tolist() == [1, 2, 20, 21, 22, 23] and first.outputs.tolist() == []
    assert second.tokens.tolist() == [3, 24] and second.positions.tolist() == [2, 4]
    assert second.outputs.tolist() == [0, 1]
    assert runner.valid == [4, 6]
    runner.accept(0, out[0], 2)
    a.tokens += [4, 5, 6]
    out = runner.propose([DraftAsk(a, 2, cfg)])
    assert out[0].tokens == (7, 8)  # a fed [5, 6] (4 was kept)


def test_a_slot_starting_with_cached_draft_cells_drafts_what_a_cold_one_does():
    cold, warm = FakeDraftContext(n_batch=4), FakeDraftContext(n_batch=4)
    cfg = SpeculativeConfig("draft", n_max=3, p_min=0.0)
    prompt = [7, 8, 9, 10, 11, 12, 13]
    (d_cold,) = DraftRunner(cold, n_slots=1).propose([DraftAsk(slot(0, prompt), 3, cfg)]).values()
    runner = DraftRunner(warm, n_slots=1)
    runner.reset(0, keep=5)  # the draft KV holds the first 5 prompt tokens already
    (d_warm,) = runner.propose([DraftAsk(slot(0, prompt), 3, cfg)]).values()
    assert d_warm.tokens == d_cold.tokens == (14, 15, 16)
    assert warm.batches[0].tokens.tolist() == [12, 13] and warm.batches[0].positions.tolist() == [5, 6]


def test_too_few_confident_proposals_give_no_draft_and_forget_the_fed_ones():
    runner = DraftRunner(FakeDraftContext(flat=True), n_slots=1)
    s = slot(0, [3, 4, 5], SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=1))  # q uniform
    assert runner.propose([DraftAsk(s, 4, SpeculativeConfig("draft", n_max=4, p_min=0.5))]) == {}
    assert runner.valid[0] == 3  # the prompt stays; nothing past it


def test_ngram_drafts_need_no_model_and_leave_the_draft_kv_alone():
    runner = DraftRunner(None, n_slots=1)
    s = slot(0, [1, 2, 3, 9, 1, 2, 3])
    (d,) = runner.propose([DraftAsk(s, 2, SpeculativeConfig("ngram", n_max=2))]).values()
    assert d.tokens == (9, 1) and d.probs is None and runner.valid == [0]
    runner.accept(0, d, 2)
    assert runner.valid == [0]
    assert runner.propose([DraftAsk(s, 2, SpeculativeConfig("ngram", n_max=4, n_min=3))]) == {}  # k=2: fewer than n_min
