"""The scheduler's scheduled steps for given slot states, with no backend and no model: admission,
prefill chunking to n_batch, output rows within n_outputs_max, decode before prefill, tile trimming."""

from __future__ import annotations

import pytest

from service.common.errors import ResourceExhausted
from service.engine.request import GenRequest
from service.engine.scheduler import Scheduler
from service.engine.stream import Stream, TextOutput


def stream(prompt=(5, 6, 7)) -> Stream:
    return Stream(GenRequest(tuple(prompt)))


def occupy(sched: Scheduler, idx: int, n_tokens: int, n_past: int):
    """Slot idx busy with n_tokens tokens, n_past of them in the KV cache."""
    s = sched.slots[idx]
    s.assign(stream(range(100, 100 + n_tokens)), TextOutput(None, ()))
    s.n_past = n_past
    return s


def check_batch(sched: Scheduler, step) -> None:
    """Invariants every step keeps: rows, outputs, positions and tokens of each slot's work."""
    b = step.batch
    assert len(b) <= sched.n_batch and len(b.outputs) <= sched.n_outputs_max
    row = 0
    for w in step.work:
        s, n = w.slot, w.n_fed + len(w.drafts)
        assert b.tokens[row:row + n].tolist() == s.tokens[s.n_past:s.n_past + w.n_fed] + list(w.drafts)
        assert b.positions[row:row + n].tolist() == list(range(s.n_past, s.n_past + n))
        assert set(b.slots[row:row + n].tolist()) == {s.idx}
        # logits row i of the slot comes from batch row: the last fed token's, then each draft's
        assert [int(b.outputs[r]) for r in w.logit_rows] == list(range(row + w.n_fed - 1, row + n)) if w.complete \
            else not w.logit_rows
        row += n
    assert row == len(b)


def test_admission_drops_cancelled_and_fills_free_slots_in_order():
    sched = Scheduler(n_slots=3, n_batch=16, n_outputs_max=12)
    occupy(sched, 1, 4, 4)
    a, b, c, d = stream(), stream(), stream(), stream()
    for st in (a, b, c, d):
        sched.enqueue(st)
    b.cancel()
    adm = sched.admit()
    assert adm.dropped == (b,)
    assert [(x.slot.idx, x.stream) for x in adm.started] == [(0, a), (2, c)]
    assert list(sched.waiting) == [d] and not sched.idle()
    for x in adm.started:  # the engine assigns; a second admit finds no free slot
        x.slot.assign(x.stream, TextOutput(None, ()))
    assert sched.admit().started == () and list(sched.waiting) == [d]


def test_admission_picks_the_slot_sharing_the_longest_prefix_then_the_least_recently_freed():
    sched = Scheduler(n_slots=4, n_batch=16, n_outputs_max=12)
    held = {0: [1, 2, 3, 4, 5, 6], 1: [1, 2, 9, 9], 2: [7, 7, 7], 3: [1, 2, 3, 8]}
    for idx, toks in held.items():  # free slots whose KV holds these tokens, freed in the order 2, 0, 3, 1
        s = sched.slots[idx]
        s.tokens, s.n_past, s.released = list(toks), len(toks), {2: 1, 0: 2, 3: 3, 1: 4}[idx]
    a, b, c = stream((1, 2, 3, 8, 5)), stream((1, 2, 3, 4, 5, 6, 7)), stream((4, 4))
    off = Stream(GenRequest((1, 2, 3, 4, 5, 6, 7), cache_prompt=False))
    for st in (a, b, off, c):
        sched.enqueue(st)
    adm = sched.admit()
    # a: slot 3 shares 4 tokens; b: slot 0 shares all 6; off and c reuse nothing: least recently freed first
    assert [(x.stream, x.slot.idx) for x in adm.started] == [(a, 3), (b, 0), (off, 2), (c, 1)]
    assert sched.slots[0].reusable(b.request.prompt) == 6 and sched.slots[0].reusable((1, 2, 3)) == 2


def test_the_queue_is_bounded():
    sched = Scheduler(n_slots=1, n_batch=8, n_outputs_max=4, queue_max=2)
    sched.enqueue(stream())
    sched.enqueue(stream())
    with pytest.raises(ResourceExhausted, match=r"queue is full \(2 waiting\)"):
        sched.enqueue(stream())
    assert sched.idle() is False and Scheduler(2, 8, 4).idle() is True


def test_a_long_prompt_is_prefilled_in_chunks_of_n_batch():
    sched = Scheduler(n_slots=1, n_batch=4, n_outputs_max=2)
    s = occupy(sched, 0, 10, 0)
    fed = []
    while True:
        step = sched.schedule({})
        check_batch(sched, step)
        (w,) = step.work
        fed.append(w.n_fed)
        if w.complete:
            break
        s.n_past += w.n_fed  # what the engine does for a chunk without output
    assert fed == [4, 4, 2]
    assert step.batch.outputs.tolist() == [1]  # the prompt's last token: its logits give the first token


def test_decoding_slots_come_first_and_prefill_takes_the_rows_left():
    sched = Scheduler(n_slots=2, n_batch=8, n_outputs_max=10)
    pre = occupy(sched, 0, 20, 0)
    dec = occupy(sched, 1, 12, 11)
    step = sched.schedule({1: (7, 8, 9), 0: (1, 2)})  # a prefilling slot's drafts are ignored
    check_batch(sched, step)
    w_dec, w_pre = step.work
    assert (w_dec.slot, w_dec.n_fed, w_dec.drafts, w_dec.complete) == (dec, 1, (7, 8, 9), True)
    assert (w_pre.slot, w_pre.n_fed, w_pre.drafts, w_pre.complete) == (pre, 4, (), False)
    assert list(w_dec.logit_rows) == [0, 1, 2, 3]


def test_output_rows_stay_within_n_outputs_max():
    sched = Scheduler(n_slots=3, n_batch=64, n_outputs_max=6)
    for i in range(3):
        occupy(sched, i, 8, 7)
    step = sched.schedule({i: (1, 2, 3, 4) for i in range(3)})
    check_batch(sched, step)
    assert [(w.slot.idx, len(w.drafts)) for w in step.work] == [(0, 4), (1, 0)]  # slot 2 waits a step
    assert len(step.batch.outputs) == 6
    assert [list(w.logit_rows) for w in step.work] == [[0, 1, 2, 3, 4], [5]]


def test_drafts_are_cut_to_the_rows_left():
    sched = Scheduler(n_slots=2, n_batch=6, n_outputs_max=10)
    occupy(sched, 0, 8, 7)
    occupy(sched, 1, 8, 7)
    step = sched.schedule({0: (1, 2, 3), 1: (9, 10, 11)})
    check_batch(sched, step)
    assert [len(w.drafts) for w in step.work] == [3, 1]  # 1 + 3 rows, then 1 + 1 fill the 6
    step = sched.schedule({0: (1, 2, 3, 4, 5, 6), 1: (9,)})
    check_batch(sched, step)
    assert [(w.slot.idx, len(w.drafts)) for w in step.work] == [(0, 5)]  # no row left: slot 1 waits a step


@pytest.mark.parametrize("drafts,tile,want", [
    ({0: (1, 2, 3, 4), 1: (5, 6, 7, 8)}, 8, [4, 2]),  # 10 rows: the 2 spilling drafts go, last slot's last first
    ({0: (1, 2, 3, 4), 1: (5,)}, 8, [4, 1]),  # 7 rows: within one tile, nothing to cut
    ({0: (1, 2, 3, 4, 5, 6, 7), 1: (8,)}, 8, [6, 0]),  # 10 rows: slot 1's draft, then slot 0's last
    ({0: (1, 2, 3, 4, 5, 6, 7, 8, 9), 1: ()}, 8, [6, 0]),  # 11 rows: 3 spill, all from slot 0
    ({0: (1, 2, 3, 4), 1: (5, 6, 7, 8)}, 1, [4, 4]),  # a backend without tiles: nothing cut
])
def test_tile_trimming_drops_drafts_that_spill_into_a_new_tile(drafts, tile, want):
    sched = Scheduler(n_slots=2, n_batch=64, n_outputs_max=22, row_multiple=tile)
    occupy(sched, 0, 8, 7)
    occupy(sched, 1, 8, 7)
    step = sched.schedule(drafts)
    check_batch(sched, step)
    assert [len(w.drafts) for w in step.work] == want
    assert len(step.batch) % tile == 0 or len(step.batch) < tile or sum(want) == 0


def test_trimming_keeps_the_drafts_when_too_few_to_reach_a_tile_boundary():
    sched = Scheduler(n_slots=3, n_batch=64, n_outputs_max=30, row_multiple=8)
    for i in range(3):
        occupy(sched, i, 20, 20 - (1 if i < 2 else 5))  # two decoding, one with 5 pending prompt tokens
    step = sched.schedule({0: (1,), 1: ()})
    check_batch(sched, step)
    assert len(step.batch) == 1 + 1 + 1 + 5  # 8 rows: one tile exactly, nothing cut
    assert [len(w.drafts) for w in step.work] == [1, 0, 0]
    sched.slots[2].n_past = 16  # 4 pending: 7 rows in all, under a tile
    assert [len(w.drafts) for w in sched.schedule({0: (1,), 1: ()}).work] == [1, 0, 0]


def test_nothing_to_plan_without_busy_slots():
    step = Scheduler(n_slots=2, n_batch=8, n_outputs_max=4).schedule({})
    assert step.work == () and step.batch is None
