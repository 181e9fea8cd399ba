"""The engine: the loop and lifecycle of generation over one loaded pair, and the speculative step.

One thread per pair runs `step()` in a loop. The parts, each with one reason to change:
  service/scheduler.py     the queue, the slots, and each step's plan of ONE target batch
  service/draft_policy.py  how many drafts a slot proposes (pure: acceptance rate vs row cost)
  service/draft_runner.py  the drafters (n-gram, draft model); owns the draft KV valid length
  service/speculative.py   verification (rejection sampling)
  service/output.py        the client's Stream; detokenising and stop strings
  service/sequence.py      a slot's state
  service/prompt_cache.py  prompt reuse: the cells a new request keeps, the prompt store
Each step: admit queued requests into free slots, propose drafts, verify them in one target
batch, append accepted + bonus tokens and roll the KV caches back by setting each slot's valid
length (cells past it are overwritten later).

Generation controls (issue 16): logprobs of each appended token come from the verify row it was
drawn from (service/logprobs.py); a slot scoring its prompt gets logits rows for its prefill
chunks (service/scheduler.py) and emits the prompt's logprobs once its prompt is in the KV
cache; a request of n completions holds n slots, prefills in the first, and when its prompt is
in the KV cache copies those cells to the others (`_fork`), which then sample on their own.
The client reads one Stream either way (service/output.py).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace

import numpy as np

from compute.llama import LlamaContext
from service import draft_policy as policy
from service import logprobs as lp
from service.draft_runner import Draft, DraftAsk, DraftRunner
from service.errors import InvalidArgument, SpecserveError, Unavailable
from service.grammar import GrammarFailed, Grammars, constrain
from service.ngram_index import NgramIndex
from service.output import Stream, TextOutput
from service.params import SpeculativeConfig, check_draft_model
from service.prompt_cache import PrefixCache
from service.requests import GenRequest, TokenDelta
from service.sampling import logits_to_probs, penalty_history, sample
from service.scheduler import Scheduler, SlotWork
from service.sequence import Slot, unstarted_result
from service.speculative import verify

log = logging.getLogger("specserve.engine")
STOP_GRACE = 5.0  # seconds stop() waits for cancelled requests to leave their slots


def check_request(req: GenRequest, n_ctx_slot: int, n_vocab: int) -> None:
    """InvalidArgument unless the prompt is non-empty, fits a slot and holds valid token ids (GenRequest
    checks what does not depend on the pair)."""
    n = len(req.prompt)
    if n == 0:
        raise InvalidArgument("the prompt is empty")
    if n >= n_ctx_slot:
        raise InvalidArgument(
            f"prompt of {n} tokens does not fit the context: each slot holds {n_ctx_slot} tokens, "
            f"so a prompt may have at most {n_ctx_slot - 1}")
    if max(req.prompt) >= n_vocab or min(req.prompt) < 0:
        raise InvalidArgument(f"prompt token ids must be in [0, {n_vocab})")


class Engine:
    """Generation over one loaded pair: a bounded queue, n_parallel slots, one worker thread."""

    def __init__(self, pair, tokenizer, speculative: SpeculativeConfig, queue_max: int = 64, metrics=None):
        self.pair = pair
        self.tok = tokenizer
        self.target: LlamaContext = pair.target.context
        self.draft: LlamaContext | None = pair.draft.context if pair.draft is not None else None
        tp = pair.params.target
        self.n_slots, self.n_ctx_slot = tp.n_parallel, tp.n_ctx_slot
        self.n_batch, self.n_outputs_max = tp.n_batch, tp.n_outputs_max
        self.max_n_max = max(0, self.n_outputs_max // self.n_slots - 1)  # drafts per slot the plan has room for
        self.eog = frozenset(tokenizer.eog_ids)
        self.metrics = metrics
        self.row_cost: policy.RowCost | None = None  # measured at warm-up; None: the backend's model
        self.queue_max = queue_max
        self._speculative = self.check_speculative(speculative)
        self.scheduler = Scheduler(self.n_slots, self.n_batch, self.n_outputs_max,
                                   self.target.backend.scratch_row_multiple(), queue_max)
        self.prefix = PrefixCache.for_pair(pair)
        self.drafter = DraftRunner(self.draft, self.n_slots, NgramIndex.of_pair(pair))
        self._n_released = 0
        self._cv = threading.Condition()  # guards the queue, slot ownership and the flags below
        self._running = False
        self._draining = False
        self._thread: threading.Thread | None = None
        self._grammars: Grammars | None = None  # built at the first response_format (service/grammar.py)

    # ---- config ----
    @property
    def speculative(self) -> SpeculativeConfig:
        return self._speculative

    def check_speculative(self, cfg: SpeculativeConfig) -> SpeculativeConfig:
        """Validate a config against this pair: its plan's output rows and whether it has a draft model."""
        check_draft_model(cfg, self.draft is not None, pair_loaded=True)
        if cfg.enabled and cfg.n_max > self.max_n_max:
            raise InvalidArgument(
                f"speculative n_max {cfg.n_max} exceeds {self.max_n_max}, what the plan sized the outputs for "
                f"(n_outputs_max {self.n_outputs_max} over {self.n_slots} slots); "
                "Fit and Load again with a larger n_max")
        return cfg

    def set_speculative(self, cfg: SpeculativeConfig) -> SpeculativeConfig:
        """Change the live default config; requests in flight switch at their next step."""
        self._speculative = self.check_speculative(cfg)
        return self._speculative

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
            self._cv.wait_for(lambda: self.scheduler.idle() or not self._alive(), timeout=STOP_GRACE)
            self._running = False
            self._cv.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    def _alive(self) -> bool:
        """Whether a worker thread exists to act on cancellations (other than the caller)."""
        t = self._thread
        return t is not None and t.is_alive() and t is not threading.current_thread()

    def stats(self) -> dict:
        """Busy slots, queued requests and slot count, read under the lock."""
        with self._cv:
            return {"active_slots": len(self.scheduler.busy()), "queued": len(self.scheduler.waiting),
                    "n_slots": self.n_slots}

    # ---- requests ----
    def submit(self, req: GenRequest) -> Stream:
        """Queue a request; errors: InvalidArgument (bad prompt/config), ResourceExhausted (queue full),
        Unavailable (draining)."""
        check_request(req, self.n_ctx_slot, self.target.hp.n_vocab)
        if req.n > self.n_slots:
            raise InvalidArgument(f"n = {req.n} completions need as many slots; this pair has {self.n_slots} "
                                  "(Load it with a larger n_parallel)")
        if req.speculative is not None:
            self.check_speculative(req.speculative)
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
        drafts = self._propose(busy)
        plan = self.scheduler.plan({i: d.tokens for i, d in drafts.items()})
        if plan.batch is None:
            return
        logits = self._constrain(plan.work, self.target.decode(plan.batch))  # (len(plan.batch.outputs), n_vocab)
        n_drafts = n_draft_tokens = n_accepted = 0
        for w in plan.work:
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
            self._score(s, w, logits)
        if not w.complete:
            s.n_past += w.n_fed  # a prefill chunk without output
            return None
        if s.n_past + w.n_fed == s.n_prompt and self._prompt_done(s, w, logits):
            return None  # the request only scored its prompt
        # target distributions: row i follows d_1..d_i (the penalty sees those drafts too)
        sp = s.stream.request.sampling
        p = [logits_to_probs(logits[r], sp, penalty_history(s.tokens, w.drafts[:i], sp))
             for i, r in enumerate(w.logit_rows)]
        q = d.probs[:len(w.drafts)] if d is not None and d.probs is not None else None
        j, new = verify(w.drafts, p, q, s.rng)  # accept d_1..d_j, then a recovered or bonus token
        s.n_past += w.n_fed + j  # roll back: target KV cells past n_past are overwritten later
        if d is not None:
            self.drafter.accept(s.idx, d, j)  # ... and the draft model's
        self._learn(s, w, j)
        if w.drafts:
            s.drafted, s.accepted = s.drafted + len(w.drafts), s.accepted + j
        self._append(s, new, self._logprobs(s, w, logits, new))
        return j

    def _fail_one(self, s: Slot, e: BaseException) -> None:
        """End one slot's request with its own error; the other slots of the step go on. A SpecserveError
        (a grammar past its limits) is the client's; anything else is logged as ours."""
        if not isinstance(e, SpecserveError):
            log.error("a request failed in the engine step", exc_info=e)
        if s.stream is not None:
            s.stream.cancel()  # its sibling completions (n > 1) are released at the next step
        self._release(s, None, e)

    # ---- generation controls (issue 16) ----
    @staticmethod
    def _score(s: Slot, w: SlotWork, logits) -> None:
        """Logprobs of the prompt tokens that follow the first w.n_scored fed ones (one per scoring row)."""
        nxt = s.tokens[s.n_past + 1:s.n_past + 1 + w.n_scored]
        s.prompt_logprobs += lp.prompt(logits, w.score_rows, nxt, s.stream.request.prompt_logprobs)

    def _prompt_done(self, s: Slot, w: SlotWork, logits) -> bool:
        """The prompt is in the KV cache after this step: send its logprobs, start the sibling
        completions; True when the request ends here (max_tokens 0: scoring only)."""
        if s.scoring:
            s.stream._emit(TokenDelta((), "", s.index, prompt_logprobs=tuple(s.prompt_logprobs)))
        if s.siblings:
            self._fork(s, logits[w.logit_rows[0]])
        if s.stream.request.max_tokens == 0:
            s.n_past += w.n_fed
            self._release(s, "length")
            return True
        return False

    def _fork(self, s: Slot, row) -> None:
        """Copy completion 0's prompt KV (target, and draft when it drafts with the model) into the
        sibling slots; each samples its first token from the same last-prompt row with its own rng."""
        n = s.n_prompt
        s.siblings = tuple(sib for sib in s.siblings if sib.stream is s.stream)  # none released meanwhile
        for sib in s.siblings:
            self.target.copy_cells(s.idx, sib.idx, n)
        if self._spec_of(s).type == "draft":
            self.drafter.fork(s, s.siblings, n)
        for sib in s.siblings:
            sib.n_past, sib.follows = n, None
            sp = sib.stream.request.sampling
            tok = sample(logits_to_probs(row, sp, penalty_history(sib.tokens, (), sp)), sib.rng)
            self._append(sib, [tok], self._logprobs(sib, None, row[None, :], [tok]))
        s.siblings = ()

    @staticmethod
    def _logprobs(s: Slot, w: SlotWork | None, logits, new: list[int]):
        """Logprobs of the tokens about to be appended (row i drew new[i]); None unless asked for."""
        k = s.stream.request.logprobs
        if k is None:
            return None
        rows = w.logit_rows[:len(new)] if w is not None else range(len(new))
        return lp.generated(logits, rows, new, s.tokens, s.stream.request.sampling, k)

    def _spec_of(self, s: Slot) -> SpeculativeConfig:
        return s.spec if s.spec is not None else self._speculative

    def _k_max(self, s: Slot, cfg: SpeculativeConfig) -> int:
        """Most drafts this slot may verify now: config, plan, max_tokens and context room."""
        left = s.stream.request.max_tokens - len(s.generated)
        return max(0, min(cfg.n_max, self.max_n_max, left - 1, self.n_ctx_slot - 1 - s.n_past - 1))

    def _propose(self, busy: list[Slot]) -> dict[int, Draft]:
        """Each decoding slot's drafts: their number from the draft policy, the tokens from the runner."""
        row_cost = self.row_cost or self.target.backend.row_cost
        asks = []
        for s in busy:
            if s.n_pending != 1 or len(s.tokens) == s.n_prompt or s.follows is not None:
                continue  # still prefilling (a cached prompt too: the first token is never drafted), or waiting
                # for its prompt's KV (a sibling completion)
            cfg = self._spec_of(s)
            s.stats = policy.tick(s.stats)
            choice = policy.choose(s.stats, self._k_max(s, cfg) if cfg.enabled else 0, row_cost,
                                   may_explore=cfg.type == "ngram" and cfg.n_min <= 1)
            s.exploring = choice.exploring
            if choice.k > 0:
                asks.append(DraftAsk(s, choice.k, cfg))
        drafts = self._grammar_checked(self.drafter.propose(asks))
        for a in asks:
            if a.cfg.type == "ngram" and a.slot.idx in drafts:
                a.slot.stats = policy.drafted(a.slot.stats)
        return drafts

    # ---- structured output (service/grammar.py) ----
    @property
    def grammars(self) -> Grammars:
        """The pair's grammar compiler and cache, built on first use (llguidance reads the whole vocabulary)."""
        with self._cv:
            if self._grammars is None:
                self._grammars = Grammars(self.tok, self.target.hp.n_vocab)
            return self._grammars

    def _grammar_checked(self, drafts: dict[int, Draft]) -> dict[int, Draft]:
        """Drafts cut before the first token their slot's grammar forbids (none left: no draft)."""
        for s in self.scheduler.busy():
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

    def _constrain(self, work: tuple[SlotWork, ...], logits: np.ndarray) -> np.ndarray:
        """The target's logits with what each row's grammar forbids at -inf: row i of a slot's verify rows
        follows its drafts d_1..d_i, so its mask is the grammar's state after them."""
        ws = [w for w in work if w.complete and w.slot.grammar is not None]
        if not ws:
            return logits
        try:
            allowed = self.grammars.masks([(w.slot.grammar, w.drafts) for w in ws])
        except Exception:  # noqa: BLE001 - find whose grammar it was: each slot's masks alone
            return self._constrain_each(ws, logits)
        out = logits.copy()
        row = 0
        for w in ws:
            n = len(w.drafts) + 1
            if self._grammar_ok(w.slot):
                rows = np.asarray(w.logit_rows)
                out[rows] = constrain(out[rows], allowed[row:row + n])
            row += n
        return out

    def _constrain_each(self, ws: list[SlotWork], logits: np.ndarray) -> np.ndarray:
        """_constrain one slot at a time (the batched call raised): a slot whose masks fail is released."""
        out = logits.copy()
        for w in ws:
            try:
                allowed = self.grammars.masks([(w.slot.grammar, w.drafts)])
            except Exception as e:  # noqa: BLE001 - this request's grammar, this request's failure
                self._fail_one(w.slot, e)
                continue
            if self._grammar_ok(w.slot):
                rows = np.asarray(w.logit_rows)
                out[rows] = constrain(out[rows], allowed)
        return out

    def _grammar_ok(self, s: Slot) -> bool:
        """False (and the slot's request ended with GrammarFailed) when its matcher met a limit."""
        try:
            s.grammar.check()
        except GrammarFailed as e:
            self._fail_one(s, e)
            return False
        return True

    @staticmethod
    def _learn(s: Slot, w: SlotWork, j: int) -> None:
        """Update the slot's draft policy state: j of its verified drafts accepted."""
        s.stats = policy.learn(s.stats, len(w.drafts), j)
        if w.drafts and s.exploring:
            s.stats = policy.back_off(s.stats, accepted=j > 0)

    # ---- output ----
    def _append(self, s: Slot, new: list[int], logprobs=None) -> None:
        """Append verified tokens one by one, stopping at EOG, max_tokens, a stop string or a full context;
        logprobs: one per token of new, when the request asked for them."""
        req = s.stream.request
        if not s.t_first:
            s.t_first = time.perf_counter()
        appended: list[int] = []
        reason = None
        for t in new:
            if t in self.eog:
                reason = "stop"
                break
            s.tokens.append(t)
            appended.append(t)
            if s.out.push(t):
                reason = "stop"  # a stop string
                break
            if s.grammar is not None and s.grammar.advance(t):
                reason = "stop"  # the response format is complete
                break
            if len(s.generated) >= req.max_tokens:
                reason = "length"
                break
        if reason is None and len(s.tokens) >= self.n_ctx_slot:
            reason = "length"  # the next token would have no KV cell
        if self.metrics is not None and appended:
            self.metrics.on_tokens(len(appended))
        if reason is not None:
            s.out.close()
        text = s.out.take(final=reason is not None)
        lps = tuple(logprobs[:len(appended)]) if logprobs else ()
        s.logprobs += lps
        if appended or text:
            s.stream._emit(TokenDelta(tuple(appended), text, s.index, lps))
        if reason is not None:
            self._release(s, reason)

    def _release(self, s: Slot, reason: str | None, error: BaseException | None = None) -> None:
        """Free a slot at once and finish its stream."""
        st = s.stream
        if st is None:
            return
        result = None
        if error is None:
            rest = s.out.take(final=True)
            result = s.result(reason or "stop")
            st._emit(TokenDelta((), rest, s.index, end=result))
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
