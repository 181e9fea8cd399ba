"""The engine: slots, continuous batching and speculative decoding over one loaded pair.

One thread per pair runs `step()` in a loop. Each step:
  1. admits queued requests into free slots and drops cancelled ones;
  2. drafts: the n-gram drafter looks up each decoding slot's history; the draft model decodes
     autoregressively, all drafting slots batched together in each draft forward pass;
  3. builds ONE target batch: for every slot its pending tokens (a prefill chunk, or the last
     sampled token) plus its drafts, within n_batch rows and n_outputs_max logits rows;
  4. verifies drafts (speculative.verify), appends accepted + bonus tokens, and rolls the KV
     caches back by setting each slot's valid length (cells past it are overwritten later).

Slot bookkeeping: `tokens` is prompt + generated; `n_past` tokens are in the target's KV cache;
tokens[n_past:] are pending (fed next step). In decode, exactly one token is pending.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from compute.llama import Batch, LlamaContext
from service.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, Unavailable
from service.params import SpeculativeConfig, validate_speculative
from service.requests import GenRequest, GenResult, TokenDelta
from service.sampling import logits_to_probs, sample
from service.speculative import ngram_propose, verify

log = logging.getLogger("specserve.engine")
_END = object()


def _history(tokens: list[int], drafts: list[int], sp) -> list[int]:
    """The tokens a repetition penalty looks back over (only its window; none when it is off)."""
    if sp.repeat_penalty == 1.0 or sp.repeat_last_n == 0:
        return []
    n = sp.repeat_last_n if sp.repeat_last_n > 0 else len(tokens) + len(drafts)
    return (tokens[-n:] + drafts)[-n:]


class Stream:
    """A request's output: iterate for TokenDelta items, then `result()`; `cancel()` frees its slot."""

    def __init__(self, req: GenRequest):
        self.request = req
        self._q: queue.Queue = queue.Queue()
        self._done = threading.Event()
        self._result: GenResult | None = None
        self._error: BaseException | None = None
        self.cancelled = threading.Event()
        self.submitted_at = time.perf_counter()

    def __iter__(self) -> Iterator[TokenDelta]:
        while True:
            item = self._q.get()
            if item is _END:
                return
            yield item

    def result(self, timeout: float | None = None) -> GenResult:
        """Block until the generation ends; raises what ended it abnormally."""
        if not self._done.wait(timeout):
            raise TimeoutError("generation still running")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def cancel(self) -> None:
        self.cancelled.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    # engine side
    def _emit(self, delta: TokenDelta) -> None:
        self._q.put(delta)

    def _finish(self, result: GenResult | None, error: BaseException | None = None) -> None:
        self._result, self._error = result, error
        self._done.set()
        self._q.put(_END)


@dataclass
class Slot:
    """One sequence being generated."""

    idx: int
    stream: Stream | None = None
    tokens: list[int] = field(default_factory=list)
    n_prompt: int = 0
    n_past: int = 0  # tokens in the target KV cache
    d_past: int = 0  # tokens in the draft KV cache
    spec: SpeculativeConfig | None = None
    rng: np.random.Generator | None = None
    decoder: object = None
    text: str = ""  # text of the generated tokens so far
    emitted: int = 0  # characters of `text` already sent
    drafted: int = 0
    accepted: int = 0
    tries: float = 0.0  # decayed count of draft tokens verification tested ...
    hits: float = 0.0  # ... and of those accepted: the slot's acceptance estimate
    idle: int = 0  # steps since the slot last drafted (n-gram exploration) ...
    explore_gap: int = 0  # ... and how many it waits before exploring again
    exploring: bool = False  # this step's draft is an exploration
    t_admit: float = 0.0
    t_first: float = 0.0

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.n_prompt:]

    @property
    def busy(self) -> bool:
        return self.stream is not None


@dataclass
class _Draft:
    """Drafting state of one slot within a step."""

    tokens: list[int] = field(default_factory=list)
    probs: list[np.ndarray] | None = None  # None: deterministic drafter
    fed: int = 0  # drafts fed into the draft model's KV
    k_max: int = 0
    active: bool = True


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
        self.eog = frozenset(getattr(tokenizer, "eog_ids", ()) or ())
        self.metrics = metrics
        self.queue_max = queue_max
        self._speculative = self.check_speculative(speculative)
        self._slots = [Slot(i) for i in range(self.n_slots)]
        self._queue: deque[Stream] = deque()
        self._cv = threading.Condition()
        self._running = False
        self._draining = False
        self._thread: threading.Thread | None = None

    # ---- config ----
    @property
    def speculative(self) -> SpeculativeConfig:
        return self._speculative

    def check_speculative(self, cfg: SpeculativeConfig) -> SpeculativeConfig:
        """Validate a config against this pair: its plan's output rows and whether it has a draft model."""
        validate_speculative(cfg)
        if cfg.type == "draft" and self.draft is None:
            raise FailedPrecondition("speculative type 'draft' needs a pair loaded with a draft model")
        if cfg.enabled and cfg.n_max > self.max_n_max:
            raise InvalidArgument(
                f"speculative n_max {cfg.n_max} exceeds {self.max_n_max}, what the plan sized the outputs for "
                f"(n_outputs_max {self.n_outputs_max} over {self.n_slots} slots); Fit and Load again with a larger n_max")
        return cfg

    def set_speculative(self, cfg: SpeculativeConfig) -> SpeculativeConfig:
        """Change the live default config; requests in flight switch at their next step."""
        self._speculative = self.check_speculative(cfg)
        return self._speculative

    # ---- lifecycle ----
    def start(self) -> "Engine":
        self._running = True
        self._thread = threading.Thread(target=self._loop, name=f"engine-{self.pair.request.name}", daemon=True)
        self._thread.start()
        return self

    def stop(self, drain_timeout: float = 0.0) -> None:
        """Refuse new requests, let in-flight ones finish (up to drain_timeout s), cancel the rest, stop."""
        with self._cv:
            self._draining = True
        deadline = time.monotonic() + drain_timeout
        while time.monotonic() < deadline and (self._queue or any(s.busy for s in self._slots)):
            time.sleep(0.01)
        with self._cv:
            for st in list(self._queue):
                st.cancel()
            for s in self._slots:
                if s.stream is not None:
                    s.stream.cancel()
            self._cv.notify_all()
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and (self._queue or any(s.busy for s in self._slots)):
            time.sleep(0.01)
        with self._cv:
            self._running = False
            self._cv.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    def stats(self) -> dict:
        with self._cv:
            return {"active_slots": sum(s.busy for s in self._slots), "queued": len(self._queue),
                    "n_slots": self.n_slots}

    # ---- requests ----
    def submit(self, req: GenRequest) -> Stream:
        """Queue a request; errors: InvalidArgument (bad prompt/config), ResourceExhausted (queue full),
        Unavailable (draining)."""
        n = len(req.prompt)
        if n == 0:
            raise InvalidArgument("the prompt is empty")
        if n >= self.n_ctx_slot:
            raise InvalidArgument(
                f"prompt of {n} tokens does not fit the context: each slot holds {self.n_ctx_slot} tokens, "
                f"so a prompt may have at most {self.n_ctx_slot - 1}")
        vocab = self.target.hp.n_vocab
        if max(req.prompt) >= vocab or min(req.prompt) < 0:
            raise InvalidArgument(f"prompt token ids must be in [0, {vocab})")
        if req.max_tokens < 0:
            raise InvalidArgument("max_tokens must be >= 0")
        if req.speculative is not None:
            self.check_speculative(req.speculative)
        st = Stream(req)
        with self._cv:
            if self._draining or not self._running:
                raise Unavailable("the pair is draining or stopped; retry on another replica")
            if len(self._queue) >= self.queue_max:
                raise ResourceExhausted(
                    f"all {self.n_slots} slots are busy and the queue is full ({self.queue_max} waiting)")
            self._queue.append(st)
            self._cv.notify_all()
        return st

    # ---- the loop ----
    def _loop(self) -> None:
        while True:
            with self._cv:
                while self._running and not self._queue and not any(s.busy for s in self._slots):
                    self._cv.wait()
                if not self._running:
                    break
                self._admit()
            try:
                self.step()
            except Exception as e:  # a failed step fails its requests, never the server
                log.exception("engine step failed")
                for s in self._slots:
                    if s.stream is not None:
                        self._release(s, None, e)

    def _admit(self) -> None:
        for st in list(self._queue):
            if st.cancelled.is_set():
                self._queue.remove(st)
                st._finish(self._result_of(None, st, "cancelled"))
        for s in self._slots:
            if s.stream is None and self._queue:
                self._start(s, self._queue.popleft())

    def _start(self, s: Slot, st: Stream) -> None:
        req = st.request
        s.stream, s.tokens, s.n_prompt = st, list(req.prompt), len(req.prompt)
        s.n_past = s.d_past = 0
        s.spec = req.speculative
        s.rng = np.random.default_rng(req.sampling.seed)
        s.decoder = self.tok.incremental_decoder(prompt_ids=req.prompt) if self.tok is not None else None
        s.text, s.emitted, s.drafted, s.accepted = "", 0, 0, 0
        s.tries = s.hits = 0.0
        s.idle, s.explore_gap, s.exploring = 0, self.EXPLORE_EVERY, False
        s.t_admit, s.t_first = time.perf_counter(), 0.0
        if req.max_tokens == 0:
            self._release(s, "length")

    def step(self) -> None:
        """One engine step over every busy slot (see the module docstring)."""
        for s in self._slots:
            if s.stream is not None and s.stream.cancelled.is_set():
                self._release(s, "cancelled")
        busy = [s for s in self._slots if s.busy]
        if not busy:
            return
        drafts = self._draft(busy)
        work = self._choose_work(busy, drafts)
        tokens, positions, slots, outputs = [], [], [], []
        plan: list[tuple[Slot, int, list[int], list[int]]] = []  # slot, n fed pending, drafts, output rows
        for s, m, complete, dt in work:
            base = len(tokens)
            tokens += s.tokens[s.n_past:s.n_past + m] + dt
            positions += list(range(s.n_past, s.n_past + m + len(dt)))
            slots += [s.idx] * (m + len(dt))
            rows = list(range(base + m - 1, base + m + len(dt))) if complete else []
            outputs += rows
            plan.append((s, m, dt, rows))
        if not tokens:
            return
        logits = self.target.decode(Batch.make(tokens, positions, slots, outputs))
        out_index = {r: i for i, r in enumerate(outputs)}
        n_drafts = n_draft_tokens = n_accepted = 0
        for s, m, dt, rows in plan:
            if not rows:
                s.n_past += m  # a prefill chunk without output
                continue
            d = drafts.get(s.idx)
            sp = s.stream.request.sampling
            tprobs = [logits_to_probs(logits[out_index[r]], sp, _history(s.tokens, dt[:i], sp))
                      for i, r in enumerate(rows)]
            dprobs = d.probs[:len(dt)] if (d is not None and d.probs is not None) else None
            j, new = verify(dt, tprobs, dprobs, s.rng)
            l_old = len(s.tokens)
            s.n_past += m + j
            if d is not None and self.draft is not None and d.probs is not None:
                s.d_past = min(s.d_past, l_old + min(j, d.fed))
            self._learn(s, len(dt), j)
            if dt and s.exploring:
                s.explore_gap = self.EXPLORE_EVERY if j else min(2 * s.explore_gap, self.EXPLORE_MAX)
            if dt:
                n_drafts += 1
                n_draft_tokens += len(dt)
                n_accepted += j
                s.drafted += len(dt)
                s.accepted += j
            self._append(s, new)
        if self.metrics is not None:
            self.metrics.on_step(n_drafts, n_draft_tokens, n_accepted)

    def _choose_work(self, busy: list[Slot], drafts: dict) -> list[tuple[Slot, int, bool, list[int]]]:
        """Each slot's rows this step: (slot, pending tokens fed, whether that completes them, drafts),
        within n_batch rows and n_outputs_max outputs; decoding slots first (latency), then prefill."""
        rows_left, outs_left = self.n_batch, self.n_outputs_max
        work = []
        for s in sorted(busy, key=lambda s: len(s.tokens) - s.n_past):
            pending = len(s.tokens) - s.n_past
            m = min(pending, rows_left)
            complete = m == pending
            if m == 0 or (complete and outs_left == 0):
                continue
            d = drafts.get(s.idx)
            dt = (d.tokens if (d and complete) else [])[:max(0, min(rows_left - m, outs_left - 1))]
            rows_left -= m + len(dt)
            outs_left -= (1 + len(dt)) if complete else 0
            work.append((s, m, complete, dt))
        return self._trim_to_tiles(work)

    def _trim_to_tiles(self, work):
        """A backend that computes rows in tiles of T pays for whole tiles: drop the drafts that would
        spill into a mostly empty extra tile (the last drafts are the least likely to be accepted)."""
        t = self.target.backend.scratch_row_multiple()
        total = sum(m + len(dt) for _, m, _, dt in work)
        excess = total % t if t > 1 and total > t else 0
        if excess == 0 or sum(len(dt) for *_, dt in work) < excess:
            return work
        out = []
        for s, m, complete, dt in reversed(work):
            cut = min(excess, len(dt))
            excess -= cut
            out.append((s, m, complete, dt[:len(dt) - cut]))
        return out[::-1]

    # ---- drafting ----
    def _spec_of(self, s: Slot) -> SpeculativeConfig:
        return s.spec if s.spec is not None else self._speculative

    # Draft length. Per drafted token the slot's acceptance rate is a; k drafts then yield
    # 1 + a + a^2 + ... + a^k tokens in expectation (the accepted prefix plus the bonus token),
    # for a forward pass of 1 + k rows whose cost the backend knows (row_cost). The engine
    # drafts the k that gives the most tokens per unit of cost, 0 when no draft pays off. The
    # estimate decays toward PRIOR while a slot does not draft, so drafting is tried again.
    # Where a verify row is dear (NumPy's one gemv per row), PRIOR alone never pays for a
    # draft, and a slot would never learn that its n-gram matches are good: an n-gram slot
    # that has not drafted for EXPLORE_EVERY steps drafts one token when it has a match; each
    # rejected exploration doubles the wait (up to EXPLORE_MAX), an accepted one resets it.
    EXPLORE_MAX = 128
    PRIOR, PRIOR_WEIGHT, DECAY, IDLE_DECAY, EXPLORE_EVERY = 0.5, 2.0, 0.8, 0.97, 8

    def _alpha(self, s: Slot) -> float:
        return min((s.hits + self.PRIOR * self.PRIOR_WEIGHT) / (s.tries + self.PRIOR_WEIGHT), 0.98)

    def _learn(self, s: Slot, k: int, j: int) -> None:
        """Update the acceptance estimate: j of the k drafts accepted (j < k: one was rejected)."""
        d = self.DECAY if k else self.IDLE_DECAY
        s.tries = s.tries * d + min(j + 1, k)
        s.hits = s.hits * d + j

    def _best_k(self, s: Slot, k_max: int) -> int:
        cost = self.target.backend.row_cost
        a, p, expect = self._alpha(s), 1.0, 1.0
        best_k, best = 0, 1.0 / cost(1)
        for k in range(1, k_max + 1):
            p *= a
            expect += p
            if expect / cost(1 + k) > best * 1.0001:
                best_k, best = k, expect / cost(1 + k)
        return best_k

    def _k_max(self, s: Slot, cfg: SpeculativeConfig) -> int:
        """Most drafts this slot may verify now: config, plan, max_tokens and context room."""
        left = s.stream.request.max_tokens - len(s.generated)
        return max(0, min(cfg.n_max, self.max_n_max, left - 1, self.n_ctx_slot - 1 - s.n_past - 1))

    def _draft(self, busy: list[Slot]) -> dict[int, _Draft]:
        out: dict[int, _Draft] = {}
        model_slots = []
        for s in busy:
            if len(s.tokens) - s.n_past != 1:
                continue  # still prefilling
            cfg = self._spec_of(s)
            k_max = self._k_max(s, cfg) if cfg.enabled else 0
            k = self._best_k(s, k_max) if k_max else 0
            s.idle += 1
            s.exploring = k <= 0 and cfg.type == "ngram" and k_max > 0 and cfg.n_min <= 1 and s.idle > s.explore_gap
            if s.exploring:
                k = 1
            if k <= 0:
                continue
            if cfg.type == "ngram":
                prop = ngram_propose(s.tokens, k, cfg.ngram_min, cfg.ngram_max)
                if len(prop) >= max(cfg.n_min, 1):
                    out[s.idx] = _Draft(prop, None, 0, k)
                    s.idle = 0
            elif cfg.type == "draft" and self.draft is not None:
                out[s.idx] = _Draft([], [], 0, k)
                model_slots.append(s)
        if model_slots:
            self._draft_model(model_slots, out)
            for s in model_slots:
                d = out[s.idx]
                if len(d.tokens) < max(self._spec_of(s).n_min, 1):
                    del out[s.idx]  # too few proposals: decode normally, and forget the fed drafts
                    s.d_past = min(s.d_past, len(s.tokens))
        return out

    def _draft_model(self, slots: list[Slot], out: dict[int, _Draft]) -> None:
        """Autoregressive drafting with the draft model, all slots batched in each forward pass."""
        ctx = self.draft
        assert ctx is not None
        # catch-up: feed what the draft has not seen (the whole prompt at first), output at the last row
        rows_left = ctx.n_batch
        feed: list[tuple[Slot, list[int]]] = []
        for s in slots:
            pend = s.tokens[s.d_past:]
            if not pend:  # cannot happen: the last token is never in the draft KV before drafting
                out[s.idx].active = False
                continue
            m = min(len(pend), rows_left)
            rows_left -= m
            feed.append((s, pend[:m]))
            if m < len(pend):
                out[s.idx].active = False  # still catching up: no draft this step
        step_feed = feed
        while True:
            tokens, positions, sl, outputs, who = [], [], [], [], []
            for s, toks in step_feed:
                base = len(tokens)
                tokens += toks
                positions += list(range(s.d_past, s.d_past + len(toks)))
                sl += [s.idx] * len(toks)
                if out[s.idx].active:
                    outputs.append(base + len(toks) - 1)
                    who.append(s)
            if not tokens:
                return
            logits = ctx.decode(Batch.make(tokens, positions, sl, outputs))
            for s, toks in step_feed:
                s.d_past += len(toks)
                d = out[s.idx]
                if d.tokens:
                    d.fed += len(toks)
            step_feed = []
            for i, s in enumerate(who):
                d = out[s.idx]
                cfg = self._spec_of(s)
                sp = s.stream.request.sampling
                q = logits_to_probs(logits[i], sp, _history(s.tokens, d.tokens, sp))
                tok = sample(q, s.rng)
                if q.max() < cfg.p_min:
                    d.active = False
                    continue
                d.tokens.append(tok)
                d.probs.append(q)
                if len(d.tokens) >= d.k_max:
                    d.active = False
                else:
                    step_feed.append((s, [tok]))
            if not step_feed:
                return

    # ---- output ----
    def _append(self, s: Slot, new: list[int]) -> None:
        """Append verified tokens one by one, stopping at EOG, max_tokens, a stop string or a full context."""
        req = s.stream.request
        if not s.t_first:
            s.t_first = time.perf_counter()
        emitted_tokens: list[int] = []
        reason, stopped_by_string = None, False
        for t in new:
            if t in self.eog:
                reason = "stop"
                break
            s.tokens.append(t)
            emitted_tokens.append(t)
            if s.decoder is not None:
                s.text += s.decoder.push(t)
            if req.stop and self._stop_hit(s, req.stop):
                reason, stopped_by_string = "stop", True
                break
            if len(s.generated) >= req.max_tokens:
                reason = "length"
                break
        if reason is None and len(s.tokens) >= self.n_ctx_slot:
            reason = "length"  # the next token would have no KV cell
        if self.metrics is not None and emitted_tokens:
            self.metrics.on_tokens(len(emitted_tokens))
        if reason is not None and s.decoder is not None and not stopped_by_string:
            s.text += s.decoder.flush()
            if req.stop:
                self._stop_hit(s, req.stop)
        self._send(s, emitted_tokens, final=reason is not None)
        if reason is not None:
            self._release(s, reason)

    @staticmethod
    def _stop_hit(s: Slot, stops: tuple[str, ...]) -> bool:
        """Truncate s.text at the first stop string, if one occurs."""
        hits = [i for i in (s.text.find(x) for x in stops if x) if i >= 0]
        if hits:
            s.text = s.text[:min(hits)]
            return True
        return False

    def _send(self, s: Slot, toks: list[int], final: bool) -> None:
        """Emit the new text, holding back a tail that may be the start of a stop string."""
        stops = s.stream.request.stop
        upto = len(s.text)
        if stops and not final:
            hold = 0
            for x in stops:
                for n in range(min(len(x) - 1, len(s.text)), 0, -1):
                    if s.text.endswith(x[:n]):
                        hold = max(hold, n)
                        break
            upto -= hold
        text = s.text[s.emitted:upto] if upto > s.emitted else ""
        s.emitted = max(s.emitted, upto)
        if toks or text:
            s.stream._emit(TokenDelta(tuple(toks), text))

    def _result_of(self, s: Slot | None, st: Stream, reason: str) -> GenResult:
        now = time.perf_counter()
        if s is None:
            return GenResult("", (), reason, len(st.request.prompt), 0, 0, 0, now - st.submitted_at, 0.0, 0.0)
        first = s.t_first or now
        return GenResult(s.text, tuple(s.generated), reason, s.n_prompt, len(s.generated), s.drafted, s.accepted,
                         s.t_admit - st.submitted_at, first - s.t_admit, now - first)

    def _release(self, s: Slot, reason: str | None, error: BaseException | None = None) -> None:
        """Free a slot at once and finish its stream."""
        st = s.stream
        if st is None:
            return
        s.stream = None
        if error is not None:
            st._finish(None, error)
        else:
            if s.emitted < len(s.text):
                st._emit(TokenDelta((), s.text[s.emitted:]))
                s.emitted = len(s.text)
            st._finish(self._result_of(s, st, reason or "stop"))
        with self._cv:
            self._cv.notify_all()


__all__ = ["Engine", "Stream"]
