"""The scheduler: the waiting queue, the slots, and what each step runs in one target batch.

A scheduled step gives every busy slot its rows in ONE target batch: its pending tokens (a
prefill chunk, or the last sampled token) followed by its drafts, within n_batch rows and
n_outputs_max logits rows. Decoding slots come first (latency), then prefill chunks. A slot
whose pending tokens all fit gets output rows: the last pending token's and one per draft
(row i verifies draft i+1; the last row gives the bonus token). A slot scoring its prompt
(prompt_logprobs) also gets a row for every fed prompt token that has a next prompt token, so
its prefill chunks are cut to the output rows left: prompts are scored in chunks of the
planned n_outputs_max (a Load with a larger n_outputs_max scores in fewer passes).

Not thread-safe by itself: the engine calls it with its lock held (enqueue, admit, idle) or
from its worker thread only (schedule).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, replace
from typing import Mapping, Sequence

from compute.llama import Batch
from service.common.errors import ResourceExhausted
from service.config.settings import DEFAULT_QUEUE_MAX
from service.engine.slot import Slot
from service.engine.stream import Stream


@dataclass(frozen=True)
class SlotStart:
    """A queued request that starts now in a free slot (and, for n > 1 completions, n - 1 more)."""

    slot: Slot
    stream: Stream
    siblings: tuple[Slot, ...] = ()  # the slots of completions 1..n-1


@dataclass(frozen=True)
class Admission:
    """What `admit` decided: requests that start now, and cancelled ones dropped from the queue."""

    started: tuple[SlotStart, ...]
    dropped: tuple[Stream, ...]


@dataclass(frozen=True)
class SlotWork:
    """One slot's rows in a step's target batch."""

    slot: Slot
    n_fed: int  # pending tokens fed: tokens[n_past : n_past + n_fed]
    drafts: tuple[int, ...]  # draft tokens fed after them, to verify
    complete: bool  # every pending token is fed: the slot gets logits rows and samples from them
    first_logit: int = 0  # its first row of the step's logits (when complete)
    n_scored: int = 0  # prompt scoring: the first n_scored fed tokens' rows come back (before the rows above)
    first_score: int = 0  # the first of those rows in the step's logits

    @property
    def score_rows(self) -> range:
        """Rows of the step's logits that score the prompt tokens after the first n_scored fed ones."""
        return range(self.first_score, self.first_score + self.n_scored)

    @property
    def logit_rows(self) -> range:
        """Rows of the step's logits for this slot: the last fed token's, then one per draft."""
        return range(self.first_logit, self.first_logit + 1 + len(self.drafts)) if self.complete else range(0)


@dataclass(frozen=True)
class ScheduledStep:
    """One step: every scheduled slot's work and the target batch that does it."""

    work: tuple[SlotWork, ...]
    batch: Batch | None  # None: nothing to run


class Scheduler:
    """Queue, slots and scheduled steps for n_slots sequences over a context of n_batch rows and
    n_outputs_max logits rows, whose backend pays for rows in tiles of row_multiple."""

    def __init__(self, n_slots: int, n_batch: int, n_outputs_max: int, row_multiple: int = 1,
                 queue_max: int = DEFAULT_QUEUE_MAX):
        self.slots = [Slot(i) for i in range(n_slots)]
        self.waiting: deque[Stream] = deque()
        self.n_batch, self.n_outputs_max = n_batch, n_outputs_max
        self.row_multiple, self.queue_max = row_multiple, queue_max

    # ---- admission ----
    def enqueue(self, stream: Stream) -> None:
        """Queue a request; ResourceExhausted when queue_max are already waiting."""
        if len(self.waiting) >= self.queue_max:
            raise ResourceExhausted(
                f"all {len(self.slots)} slots are busy and the queue is full ({self.queue_max} waiting)")
        self.waiting.append(stream)

    def admit(self) -> Admission:
        """Drop cancelled requests from the queue, then give the oldest waiting requests free slots, in queue
        order, n slots to a request of n completions (no request overtakes one still waiting for its n slots).
        Completion 0 gets the free slot whose cached tokens share the longest prefix with its prompt
        (service/engine/prompt_cache.py), on a tie the least recently freed, then the lowest index; its siblings
        the lowest free indices. The caller assigns each started request."""
        dropped = tuple(st for st in self.waiting if st.cancelled.is_set())
        for st in dropped:
            self.waiting.remove(st)
        free = [s for s in self.slots if not s.busy]
        started = []
        while self.waiting and len(free) >= self.waiting[0].request.n:  # in order: a request of n completions
            st = self.waiting.popleft()                                    # waits for n free slots, and the
            req = st.request                                               # requests behind it wait with it
            s = max(free, key=lambda s: (s.reusable(req.prompt, req.may_reuse_prefix), -s.released, -s.idx))
            free.remove(s)
            take, free = free[:req.n - 1], free[req.n - 1:]
            started.append(SlotStart(s, st, tuple(take)))
        return Admission(tuple(started), dropped)

    def busy(self) -> list[Slot]:
        """The slots generating a request, by index."""
        return [s for s in self.slots if s.busy]

    def idle(self) -> bool:
        """Nothing waiting and nothing generating."""
        return not self.waiting and not any(s.busy for s in self.slots)

    # ---- a step ----
    def schedule(self, drafts: Mapping[int, Sequence[int]]) -> ScheduledStep:
        """The step's batch for the busy slots; drafts: slot index -> its proposed draft tokens."""
        work = self._trim_to_tiles(self._choose(drafts))
        tokens, positions, slots, outputs = [], [], [], []  # per batch row; outputs: rows whose logits return
        out = []
        for w in work:
            s, n = w.slot, w.n_fed + len(w.drafts)
            base = len(tokens)  # batch row of this slot's first token
            out.append(replace(w, first_score=len(outputs), first_logit=len(outputs) + w.n_scored))
            tokens += s.tokens[s.n_past:s.n_past + w.n_fed] + list(w.drafts)
            positions += range(s.n_past, s.n_past + n)
            slots += [s.idx] * n
            outputs += range(base, base + w.n_scored)  # prompt scoring
            if w.complete:  # the last fed token's row, then one per draft
                outputs += range(base + w.n_fed - 1, base + n)
        batch = Batch.make(tokens, positions, slots, outputs) if tokens else None
        return ScheduledStep(tuple(out), batch)

    def _choose(self, drafts: Mapping[int, Sequence[int]]) -> list[SlotWork]:
        """Each busy slot's fed tokens and drafts within n_batch rows and n_outputs_max outputs."""
        rows_left, outs_left = self.n_batch, self.n_outputs_max
        work = []
        for s in sorted(self.busy(), key=lambda s: s.n_pending):  # decoding slots first
            if s.follows is not None:
                continue  # waits for the prompt KV of its request's completion 0
            m = min(s.n_pending, rows_left, outs_left if s.n_scored(s.n_pending) else rows_left)
            complete, n_scored = m == s.n_pending, s.n_scored(m)
            if m == 0 or (complete and outs_left - n_scored == 0):
                continue
            dt = tuple(drafts.get(s.idx, ()) if complete else ())[:max(0, min(rows_left - m,
                                                                               outs_left - n_scored - 1))]
            rows_left -= m + len(dt)
            outs_left -= n_scored + ((1 + len(dt)) if complete else 0)
            work.append(SlotWork(s, m, dt, complete, n_scored=n_scored))
        return work

    def _trim_to_tiles(self, work: list[SlotWork]) -> list[SlotWork]:
        """A backend that computes rows in tiles of T pays for whole tiles: drop the drafts that would
        spill into a mostly empty extra tile (the last drafts are the least likely to be accepted)."""
        t = self.row_multiple
        total = sum(w.n_fed + len(w.drafts) for w in work)
        excess = total % t if t > 1 and total > t else 0
        if excess == 0 or sum(len(w.drafts) for w in work) < excess:
            return work
        out = []
        for w in reversed(work):  # cut from the last slots' last drafts
            cut = min(excess, len(w.drafts))
            excess -= cut
            out.append(replace(w, drafts=w.drafts[:len(w.drafts) - cut]))
        return out[::-1]
