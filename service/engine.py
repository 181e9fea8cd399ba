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
"""

from __future__ import annotations

import logging
import threading
import time

from compute.llama import LlamaContext
from service import draft_policy as policy
from service.draft_runner import Draft, DraftAsk, DraftRunner
from service.errors import InvalidArgument, Unavailable, Unimplemented
from service.ngram_index import NgramIndex
from service.output import Stream, TextOutput
from service.params import SpeculativeConfig, check_draft_model
from service.prompt_cache import PrefixCache
from service.requests import GenRequest, TokenDelta
from service.sampling import logits_to_probs, penalty_history
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
    unbuilt = [name for name, asked in (("logprobs", req.logprobs is not None),
                                        ("prompt_logprobs", req.prompt_logprobs is not None),
                                        ("response_format", req.response_format is not None),
                                        ("n > 1", req.n != 1)) if asked]
    if unbuilt:  # in the proto already; the engine serves them as each lands (issue 16)
        raise Unimplemented(f"not served yet: {', '.join(unbuilt)}")


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
        if req.speculative is not None:
            self.check_speculative(req.speculative)
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
            reuse = self.prefix.admit(a.slot, self.drafter.valid[a.slot.idx], req.prompt, req.cache_prompt)
            a.slot.assign(a.stream, TextOutput(self.tok.incremental_decoder(prompt_ids=req.prompt), req.stop),
                          reuse.n_target)
            self.drafter.reset(a.slot.idx, reuse.n_draft)
            if self.metrics is not None:
                self.metrics.on_prompt_cache(reuse.n_target if req.cache_prompt else None, reuse.evicted)
            if req.max_tokens == 0:
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
        logits = self.target.decode(plan.batch)  # (len(plan.batch.outputs), n_vocab)
        n_drafts = n_draft_tokens = n_accepted = 0
        for w in plan.work:
            s, d = w.slot, drafts.get(w.slot.idx)
            if not w.complete:
                s.n_past += w.n_fed  # a prefill chunk without output
                continue
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
                n_drafts, n_draft_tokens, n_accepted = n_drafts + 1, n_draft_tokens + len(w.drafts), n_accepted + j
                s.drafted, s.accepted = s.drafted + len(w.drafts), s.accepted + j
            self._append(s, new)
        if self.metrics is not None:
            self.metrics.on_step(n_drafts, n_draft_tokens, n_accepted)

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
            if s.n_pending != 1 or len(s.tokens) == s.n_prompt:
                continue  # still prefilling (a cached prompt too: the first token is never drafted)
            cfg = self._spec_of(s)
            s.stats = policy.tick(s.stats)
            choice = policy.choose(s.stats, self._k_max(s, cfg) if cfg.enabled else 0, row_cost,
                                   may_explore=cfg.type == "ngram" and cfg.n_min <= 1)
            s.exploring = choice.exploring
            if choice.k > 0:
                asks.append(DraftAsk(s, choice.k, cfg))
        drafts = self.drafter.propose(asks)
        for a in asks:
            if a.cfg.type == "ngram" and a.slot.idx in drafts:
                a.slot.stats = policy.drafted(a.slot.stats)
        return drafts

    @staticmethod
    def _learn(s: Slot, w: SlotWork, j: int) -> None:
        """Update the slot's draft policy state: j of its verified drafts accepted."""
        s.stats = policy.learn(s.stats, len(w.drafts), j)
        if w.drafts and s.exploring:
            s.stats = policy.back_off(s.stats, accepted=j > 0)

    # ---- output ----
    def _append(self, s: Slot, new: list[int]) -> None:
        """Append verified tokens one by one, stopping at EOG, max_tokens, a stop string or a full context."""
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
        if appended or text:
            s.stream._emit(TokenDelta(tuple(appended), text))
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
            if rest:
                st._emit(TokenDelta((), rest))
            result = s.result(reason or "stop")
        self._n_released += 1
        s.released, s.cacheable = self._n_released, s.cacheable and error is None  # a failed step: cells unknown
        if s.cacheable:
            self.drafter.record(s)
        with self._cv:  # the slot is free before the client learns the result
            s.stream = None
            self._cv.notify_all()
        st._finish(result, error)


__all__ = ["Engine", "Slot", "Stream"]
