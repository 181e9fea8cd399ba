"""The engine: the loop and lifecycle of generation over one loaded pair, and the speculative step.

One thread per pair runs `step()` in a loop. The parts, each with one reason to change:
  scheduler.py        the queue, the slots, and what each step runs in ONE target batch
  slot.py             a slot's state, and appending verified tokens to it
  stream.py           the client's Stream; detokenising and stop strings
  spec/proposer.py    each step's drafts and the live speculative config
  spec/policy.py      how many drafts a slot proposes (pure: acceptance rate vs row cost)
  spec/drafter.py     the drafters (n-gram, draft model); owns the draft KV valid length
  spec/verify.py      verification (rejection sampling)
  prompt_cache.py     prompt reuse: the cells a new request keeps, the prompt store
  grammar.py          structured output: a request's grammar and the logits it allows
(all under service/engine/). Each step: admit queued requests into free slots, propose drafts,
verify them in one target batch, append accepted + bonus tokens and roll the KV caches back by
setting each slot's valid length (cells past it are overwritten later).

Generation controls: logprobs of each appended token come from the verify row it was drawn from
(logprobs.py); a slot scoring its prompt gets logits rows for its prefill chunks (scheduler.py)
and emits the prompt's logprobs once its prompt is in the KV cache; a request of n completions
holds n slots, prefills in the first, and when its prompt is in the KV cache copies those cells
to the others (`_fork`), which then sample on their own. The client reads one Stream either way.
"""

from __future__ import annotations

import logging
import threading

from compute.llama import LlamaContext
from service.common.errors import InvalidArgument, SpecserveError, Unavailable
from service.config.settings import DEFAULT_QUEUE_MAX
from service.engine import logprobs as lp
from service.engine.grammar import Grammars, constrain_verify_rows
from service.engine.prompt_cache import PrefixCache
from service.engine.request import GenRequest, TokenDelta
from service.engine.sampling import logits_to_probs, penalty_history, sample
from service.engine.scheduler import Scheduler, SlotWork
from service.engine.slot import Slot, unstarted_result
from service.engine.spec.drafter import Draft, DraftRunner
from service.engine.spec.ngram_index import NgramIndex
from service.engine.spec.policy import RowCost
from service.engine.spec.proposer import Proposer
from service.engine.spec.verify import verify
from service.engine.stream import Stream, TextOutput
from service.fit.params import SpeculativeConfig

log = logging.getLogger("specserve.engine")
STOP_GRACE = 5.0  # seconds stop() waits for cancelled requests to leave their slots


def check_request(req: GenRequest, n_ctx_slot: int, n_vocab: int, n_slots: int) -> None:
    """InvalidArgument unless the prompt is non-empty, fits a slot and holds valid token ids, and the pair has
    a slot for each completion (GenRequest checks what does not depend on the pair)."""
    n = len(req.prompt)
    if n == 0:
        raise InvalidArgument("the prompt is empty")
    if n >= n_ctx_slot:
        raise InvalidArgument(
            f"prompt of {n} tokens does not fit the context: each slot holds {n_ctx_slot} tokens, "
            f"so a prompt may have at most {n_ctx_slot - 1}")
    if max(req.prompt) >= n_vocab or min(req.prompt) < 0:
        raise InvalidArgument(f"prompt token ids must be in [0, {n_vocab})")
    if req.n > n_slots:
        raise InvalidArgument(f"n = {req.n} completions need as many slots; this pair has {n_slots} "
                              "(Load it with a larger n_parallel)")


def _verify(s: Slot, w: SlotWork, d: Draft | None, logits) -> tuple[int, list[int]]:
    """Verify a slot's drafts against the target's rows: (j, new), d_1..d_j accepted, then a recovered or
    bonus token. Row i's distribution follows d_1..d_i (the penalty sees those drafts too)."""
    sp = s.stream.request.sampling
    p = [logits_to_probs(logits[r], sp, penalty_history(s.tokens, w.drafts[:i], sp))
         for i, r in enumerate(w.logit_rows)]
    q = d.probs[:len(w.drafts)] if d is not None and d.probs is not None else None
    return verify(w.drafts, p, q, s.rng)


def _fork(s: Slot, row, target: LlamaContext, drafter: DraftRunner | None, append) -> None:
    """Copy completion 0's prompt KV (target, and draft when `drafter` drafts with the model) into the
    sibling slots; each samples its first token from the same last-prompt row with its own rng and
    `append`s it (the engine's _append)."""
    n = s.n_prompt
    s.siblings = tuple(sib for sib in s.siblings if sib.stream is s.stream)  # none released meanwhile
    for sib in s.siblings:
        target.copy_cells(s.idx, sib.idx, n)
    if drafter is not None:
        drafter.fork(s, s.siblings, n)
    for sib in s.siblings:
        sib.n_past, sib.follows = n, None
        sp = sib.stream.request.sampling
        tok = sample(logits_to_probs(row, sp, penalty_history(sib.tokens, (), sp)), sib.rng)
        append(sib, [tok], lp.of_appended(sib, None, row[None, :], [tok]))
    s.siblings = ()


def _alive(t: threading.Thread | None) -> bool:
    """Whether a worker thread exists to act on cancellations (other than the caller)."""
    return t is not None and t.is_alive() and t is not threading.current_thread()


class Engine:
    """Generation over one loaded pair: a bounded queue, n_parallel slots, one worker thread."""

    def __init__(self, pair, tokenizer, speculative: SpeculativeConfig, queue_max: int = DEFAULT_QUEUE_MAX,
                 metrics=None):
        self.pair = pair
        self.tok = tokenizer
        self.target: LlamaContext = pair.target.context
        self.draft: LlamaContext | None = pair.draft.context if pair.draft is not None else None
        tp = pair.params.target
        self.n_slots, self.n_ctx_slot = tp.n_parallel, tp.n_ctx_slot
        self.n_batch, self.n_outputs_max = tp.n_batch, tp.n_outputs_max
        self.eog = frozenset(tokenizer.eog_ids)
        self.metrics = metrics
        self.row_cost: RowCost | None = None  # measured at warm-up; None: the backend's model
        self.queue_max = queue_max
        self.scheduler = Scheduler(self.n_slots, self.n_batch, self.n_outputs_max,
                                   self.target.backend.scratch_row_multiple(), queue_max)
        self.prefix = PrefixCache.for_pair(pair)
        self.drafter = DraftRunner(self.draft, self.n_slots, NgramIndex.of_pair(pair))
        self.proposer = Proposer(self.drafter, self.draft is not None, self.n_slots, self.n_ctx_slot,
                                 self.n_outputs_max, speculative)
        self._n_released = 0
        self._cv = threading.Condition()  # guards the queue, slot ownership and the flags below
        self._running = False
        self._draining = False
        self._thread: threading.Thread | None = None
        self._grammars: Grammars | None = None  # built at the first response_format (service/engine/grammar.py)

    # ---- config ----
    @property
    def speculative(self) -> SpeculativeConfig:
        """The live default config (the proposer's); a request may override it."""
        return self.proposer.speculative

    @property
    def max_n_max(self) -> int:
        """Drafts per slot the plan has room for."""
        return self.proposer.max_n_max

    def set_speculative(self, cfg: SpeculativeConfig) -> SpeculativeConfig:
        """Change the live default config; requests in flight switch at their next step."""
        self.proposer.speculative = self.proposer.check(cfg)
        return self.proposer.speculative

    # ---- lifecycle ----
    def start(self) -> "Engine":
        """Start the worker thread; returns self."""
        self._running = True
        self._thread = threading.Thread(target=self._loop, name=f"engine-{self.pair.request.name}", daemon=True)
        self._thread.start()
        return self

    def stop(self, drain_timeout: float = 0.0) -> None:
        """Refuse new requests, let in-flight ones finish (up to drain_timeout s), cancel the rest, stop."""
        with self._cv:
            self._draining = True
            self._cv.wait_for(self.scheduler.idle, timeout=drain_timeout)
            for st in self.scheduler.waiting:
                st.cancel()
            for s in self.scheduler.busy():
                s.stream.cancel()
            self._cv.notify_all()
            self._cv.wait_for(lambda: self.scheduler.idle() or not _alive(self._thread), timeout=STOP_GRACE)
            self._running = False
            self._cv.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    def stats(self) -> dict:
        """Busy slots, queued requests, slot count, and the target KV cells the busy slots hold out of
        every slot's cells, read under the lock."""
        with self._cv:
            busy = self.scheduler.busy()
            return {"active_slots": len(busy), "queued": len(self.scheduler.waiting), "n_slots": self.n_slots,
                    "kv_cells_used": sum(s.n_past for s in busy), "kv_cells": self.n_slots * self.n_ctx_slot}

    # ---- requests ----
    def submit(self, req: GenRequest) -> Stream:
        """Queue a request; errors: InvalidArgument (bad prompt/config), ResourceExhausted (queue full),
        Unavailable (draining)."""
        check_request(req, self.n_ctx_slot, self.target.hp.n_vocab, self.n_slots)
        if req.speculative is not None:
            self.proposer.check(req.speculative)
        if req.response_format is not None:
            self.grammars.compile(req.response_format)  # InvalidArgument before a slot is taken; cached
        st = Stream(req)
        with self._cv:
            if self._draining or not self._running:
                raise Unavailable("the pair is draining or stopped; retry on another replica")
            self.scheduler.enqueue(st)
            self._cv.notify_all()
        return st

    # ---- the loop ----
    def _loop(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: not self._running or not self.scheduler.idle())
                if not self._running:
                    break
                self._admit()
            try:
                self.step()
            except Exception as e:  # a failed step fails its requests, never the server
                log.exception("engine step failed")
                for s in self.scheduler.busy():
                    self._release(s, None, e)

    def _admit(self) -> None:
        """Finish requests cancelled while queued; start queued ones in free slots (lock held)."""
        adm = self.scheduler.admit()
        for st in adm.dropped:
            st._finish(unstarted_result(st, "cancelled"))
        for a in adm.started:
            req = a.stream.request
            reuse = self.prefix.admit(a.slot, self.drafter.valid[a.slot.idx], req.prompt, req.may_reuse_prefix)
            a.slot.assign(a.stream, TextOutput(self.tok.incremental_decoder(prompt_ids=req.prompt), req.stop),
                          reuse.n_target)
            self.drafter.reset(a.slot.idx, reuse.n_draft)
            a.slot.grammar = self.grammars.matcher(req.response_format) if req.response_format else None
            if self.metrics is not None:
                self.metrics.on_prompt_cache(reuse.n_target if req.cache_prompt else None, reuse.evicted)
            for i, s in enumerate(a.siblings, 1):  # their cells are overwritten by completion 0's prompt (_fork)
                s.assign(a.stream, TextOutput(self.tok.incremental_decoder(prompt_ids=req.prompt), req.stop),
                         index=i, follows=a.slot)
                self.drafter.reset(s.idx)
                s.grammar = self.grammars.matcher(req.response_format) if req.response_format else None
            a.slot.siblings = a.siblings if req.max_tokens else ()
            if a.slot.scoring:
                a.slot.prompt_logprobs.append(lp.first_prompt_token(req.prompt[0]))
            if req.max_tokens == 0:  # nothing to generate; prefill only to score the prompt
                for s in a.siblings:
                    self._release(s, "length")
                if not a.slot.scoring:
                    self._release(a.slot, "length")
        if adm.dropped:
            self._cv.notify_all()

    # ---- the speculative step ----
    def step(self) -> None:
        """One step over every busy slot: propose drafts -> verify them in one target batch ->
        accept a prefix plus one token -> roll both KV caches back to what was accepted."""
        for s in self.scheduler.busy():
            if s.stream.cancelled.is_set():
                self._release(s, "cancelled")
        busy = self.scheduler.busy()
        if not busy:
            return
        drafts = self.proposer.propose(busy, self.row_cost or self.target.backend.row_cost)
        step = self.scheduler.schedule({i: d.tokens for i, d in drafts.items()})
        if step.batch is None:
            return
        logits = self.target.decode(step.batch)  # (len(step.batch.outputs), n_vocab)
        logits = constrain_verify_rows(self._grammars, step.work, logits, self._fail_one)
        n_drafts = n_draft_tokens = n_accepted = 0
        for w in step.work:
            if w.slot.stream is None:
                continue  # released by a failure of its own earlier in this step (its grammar)
            try:
                j = self._finish_work(w, drafts.get(w.slot.idx), logits)
            except Exception as e:  # noqa: BLE001 - one request's failure (grammar, sampling) is its own
                self._fail_one(w.slot, e)
                continue
            if w.drafts and j is not None:
                n_drafts, n_draft_tokens, n_accepted = n_drafts + 1, n_draft_tokens + len(w.drafts), n_accepted + j
        if self.metrics is not None:
            self.metrics.on_step(n_drafts, n_draft_tokens, n_accepted)

    def _finish_work(self, w: SlotWork, d: Draft | None, logits) -> int | None:
        """One slot's share of the step after the target pass: score, verify, append; the number of
        drafts accepted (None when the slot only prefilled or scored)."""
        s = w.slot
        if w.n_scored:
            s.prompt_logprobs += lp.of_scored_prompt(s, w, logits)
        if not w.complete:
            s.n_past += w.n_fed  # a prefill chunk without output
            return None
        if s.n_past + w.n_fed == s.n_prompt and self._prompt_done(s, w, logits):
            return None  # the request only scored its prompt
        j, new = _verify(s, w, d, logits)  # accept d_1..d_j, then a recovered or bonus token
        s.n_past += w.n_fed + j  # roll back: target KV cells past n_past are overwritten later
        if d is not None:
            self.drafter.accept(s.idx, d, j)  # ... and the draft model's
        self.proposer.learn(s, w, j)
        if w.drafts:
            s.drafted, s.accepted = s.drafted + len(w.drafts), s.accepted + j
        self._append(s, new, lp.of_appended(s, w, logits, new))
        return j

    def _fail_one(self, s: Slot, e: BaseException) -> None:
        """End one slot's request with its own error; the other slots of the step go on. A SpecserveError
        (a grammar past its limits) is the client's; anything else is logged as ours."""
        if not isinstance(e, SpecserveError):
            log.error("a request failed in the engine step", exc_info=e)
        if s.stream is not None:
            s.stream.cancel()  # its sibling completions (n > 1) are released at the next step
        self._release(s, None, e)

    # ---- generation controls: prompt scoring, n completions ----
    def _prompt_done(self, s: Slot, w: SlotWork, logits) -> bool:
        """The prompt is in the KV cache after this step: send its logprobs, start the sibling
        completions; True when the request ends here (max_tokens 0: scoring only)."""
        if s.scoring:
            s.stream._emit(TokenDelta((), "", s.index, prompt_logprobs=tuple(s.prompt_logprobs)))
        if s.siblings:
            drafter = self.drafter if self.proposer.spec_of(s).type == "draft" else None
            _fork(s, logits[w.logit_rows[0]], self.target, drafter, self._append)
        if s.stream.request.max_tokens == 0:
            s.n_past += w.n_fed
            self._release(s, "length")
            return True
        return False

    # ---- structured output (service/engine/grammar.py) ----
    @property
    def grammars(self) -> Grammars:
        """The pair's grammar compiler and cache, built on first use (llguidance reads the whole vocabulary)."""
        with self._cv:
            if self._grammars is None:
                self._grammars = Grammars(self.tok, self.target.hp.n_vocab)
            return self._grammars

    # ---- output ----
    def _append(self, s: Slot, new: list[int], logprobs=None) -> None:
        """Append verified tokens to the slot (service/engine/slot.py: Slot.append) and free it when its
        request is done; logprobs: one per token of new, when the request asked for them."""
        n, reason = s.append(new, logprobs, self.eog, self.n_ctx_slot)
        if self.metrics is not None and n:
            self.metrics.on_tokens(n)
        if reason is not None:
            self._release(s, reason)

    def _release(self, s: Slot, reason: str | None, error: BaseException | None = None) -> None:
        """Free a slot at once and finish its stream."""
        st = s.stream
        if st is None:
            return
        result = s.end(reason or "stop") if error is None else None
        self._n_released += 1
        s.released, s.cacheable = self._n_released, s.cacheable and error is None  # a failed step: cells unknown
        if s.cacheable:
            self.drafter.record(s)
        with self._cv:  # the slot is free before the client learns the result
            s.stream, s.follows, s.siblings = None, None, ()
            self._cv.notify_all()
        if error is None:
            st._finish_choice(result)
        else:
            st._finish(None, error)


__all__ = ["Engine", "Slot", "Stream"]
