"""Prompt reuse: which KV cells a new request keeps, and the prompt store beyond the slots.

Chat clients resend the whole conversation every turn; agents resend one long system prompt.
A slot's KV cells outlive its request: `tokens[:n_past]` of the request that last ran there.

1. Slot reuse. Admission (service/engine/scheduler.py) gives a request the free slot whose cached
   tokens share the longest prefix with its prompt; the cells of that common prefix are kept,
   at most len(prompt) - 1 of them (the last prompt token is always fed: its logits give the
   first token), and only the rest is prefilled. The draft model's cells likewise (the draft
   runner's valid length, service/engine/spec/drafter.py).
2. The store. Before a slot's cells are overwritten by a request that does not extend them,
   they are copied into the store: fixed blocks of BLOCK_TOKENS cells of every layer, of the
   target and of the draft, in a buffer of the plan (service/fit/plan.py; its size is
   ContextParams.prompt_cache_bytes;
   its sizes and layout are service/fit/cache_layout.py's). A request whose prompt shares a longer prefix with an
   entry than with its slot has the missing cells copied back. Entries are evicted least
   recently used first; blocks come from a fixed free list, so nothing is allocated while serving.

Lossless: a cell's K and V are a function of the tokens up to it and its position only (the
backends are batch invariant: docs/batch-invariance.md), so reused or copied cells hold the
bits a cold prefill would write, and the output is the cold run's, token for token.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np

from compute.backend import Allocation
from compute.llama import LlamaContext
from service.fit.cache_layout import BLOCK_TOKENS

log = logging.getLogger("specserve.prompt_cache")

MIN_SAVE_TOKENS = 16  # shorter prefixes are not worth a copy into the store

ReuseSource = Literal["none", "slot", "store"]


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n], dtype=np.int64) != np.asarray(b[:n], dtype=np.int64))
    return int(diff[0]) if len(diff) else n


# ---- the store ----

@dataclass(eq=False)
class _Entry:
    """A prompt state in the store: the cells of tokens[:len(tokens)] (target) and [:n_draft] (draft)."""

    tokens: np.ndarray  # (n,) int64
    n_draft: int
    blocks: list[int]  # block i holds cells [i * BLOCK_TOKENS, (i + 1) * BLOCK_TOKENS)
    used: int  # LRU clock of its last save or hit
    swa_lo: tuple[int, int] = (0, 0)  # (target, draft): local layers' cells are saved from this position on


@dataclass
class _Part:
    """One model's cache and its blocks of the store (local layers' in k_swa, v_swa: see `_ring_runs`)."""

    ctx: LlamaContext
    k: object  # (n_blocks, n_global, BLOCK_TOKENS, n_embd_kv) backend array
    v: object
    k_swa: object = None  # (n_blocks, n_local, BLOCK_TOKENS, n_embd_kv); None: no local layers
    v_swa: object = None

    @staticmethod
    def of(ctx: LlamaContext, store: Allocation) -> "_Part":
        a = store.array
        return _Part(ctx, a["k"], a["v"], a.get("k_swa"), a.get("v_swa"))

    def saved_from(self, slot: int, n: int) -> int:
        """The first of the positions [lo, n) whose local-layer cells the slot's ring still holds (0: all)."""
        ring = self.ctx.ring
        if ring is None:
            return 0
        pos = np.arange(n)
        lost = np.flatnonzero(ring[slot, pos % ring.shape[1]] != pos)
        return int(lost[-1]) + 1 if len(lost) else 0

    def usable(self, e_lo: int, kept: int, n: int) -> bool:
        """Whether restoring positions [kept, n) from an entry whose local cells start at e_lo leaves every
        local layer the window before n (the slot itself holds positions before `kept`)."""
        return self.ctx.ring is None or max(kept, n - self.ctx.hp.n_swa + 1) >= e_lo or n <= kept

    def save(self, slot: int, blocks: list[int], n: int, swa_lo: int = 0) -> None:
        be = self.ctx.backend
        for i, b in enumerate(blocks):
            m = min(BLOCK_TOKENS, n - i * BLOCK_TOKENS)
            if m <= 0:
                break
            if self.k.shape[1]:
                be.kv_to_store(self.ctx.k, slot, i * BLOCK_TOKENS, self.k, b, 0, m)
                be.kv_to_store(self.ctx.v, slot, i * BLOCK_TOKENS, self.v, b, 0, m)
        for cell, b, off, m in self._ring_runs(blocks, swa_lo, n):
            be.kv_to_store(self.ctx.k_swa, slot, cell, self.k_swa, b, off, m)
            be.kv_to_store(self.ctx.v_swa, slot, cell, self.v_swa, b, off, m)

    def load(self, slot: int, blocks: list[int], lo: int, hi: int, swa_lo: int = 0) -> None:
        """Copy cells [lo, hi) of an entry back into the slot (local layers: those the ring can hold)."""
        be = self.ctx.backend
        pos = lo
        while pos < hi and self.k.shape[1]:
            b, off = blocks[pos // BLOCK_TOKENS], pos % BLOCK_TOKENS
            m = min(BLOCK_TOKENS - off, hi - pos)
            be.kv_from_store(self.ctx.k, slot, pos, self.k, b, off, m)
            be.kv_from_store(self.ctx.v, slot, pos, self.v, b, off, m)
            pos += m
        if self.ctx.ring is None:
            return
        first = max(lo, swa_lo, hi - self.ctx.ring.shape[1])
        for cell, b, off, m in self._ring_runs(blocks, first, hi):
            be.kv_from_store(self.ctx.k_swa, slot, cell, self.k_swa, b, off, m)
            be.kv_from_store(self.ctx.v_swa, slot, cell, self.v_swa, b, off, m)
        pos = np.arange(first, hi)
        self.ctx.ring[slot, pos % self.ctx.ring.shape[1]] = pos

    def _ring_runs(self, blocks: list[int], lo: int, hi: int):
        """(ring cell, block, offset, count) runs of positions [lo, hi) that are contiguous in both the
        slot's ring (cell = position % cells) and the store's blocks; none without local layers. Only the
        last `cells` positions are ever asked for, so no two positions of a call share a cell."""
        if self.ctx.ring is None:
            return
        R = self.ctx.ring.shape[1]
        pos = max(lo, 0)
        while pos < hi:
            off = pos % BLOCK_TOKENS
            m = min(BLOCK_TOKENS - off, hi - pos, R - pos % R)
            yield pos % R, blocks[pos // BLOCK_TOKENS], off, m
            pos += m


class PromptStore:
    """Prompt states in the planned store blocks; LRU eviction from a fixed free list (never allocates)."""

    def __init__(self, target: LlamaContext, target_store: Allocation, draft: LlamaContext | None = None,
                 draft_store: Allocation | None = None):
        self.target = _Part.of(target, target_store)
        self.draft = _Part.of(draft, draft_store) if draft_store is not None else None
        self.n_blocks = int(self.target.k.shape[0])
        self.capacity_bytes = target_store.spec.nbytes + (draft_store.spec.nbytes if draft_store else 0)
        self.block_bytes = self.capacity_bytes // self.n_blocks
        self._free = list(range(self.n_blocks - 1, -1, -1))  # a stack of free block indices
        self.entries: list[_Entry] = []
        self._clock = 0
        self.evictions = 0

    @property
    def used_bytes(self) -> int:
        return (self.n_blocks - len(self._free)) * self.block_bytes

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def lookup(self, prompt: Sequence[int]) -> tuple[_Entry | None, int]:
        """The entry sharing the longest prefix with `prompt` (the most recent on a tie) and that length."""
        best, best_n = None, 0
        for e in self.entries:
            n = common_prefix(e.tokens, prompt)
            if n > best_n or (n == best_n and n > 0 and e.used > best.used):
                best, best_n = e, n
        return best, best_n

    def save(self, slot: int, tokens: Sequence[int], n_target: int, n_draft: int, keep: _Entry | None = None) -> int:
        """Copy a slot's cells of tokens[:n_target] (draft: [:n_draft]) into the store, as much as fits
        without evicting `keep`; returns the entries evicted for it. A state the store holds already (an
        entry extending it) is only touched; entries it extends are dropped (it serves all they did)."""
        others = sum(len(e.blocks) for e in self.entries if e is not keep)
        n = min(n_target, (len(self._free) + others) * BLOCK_TOKENS)
        n_draft = min(n_draft, n) if self.draft is not None else 0
        if n < MIN_SAVE_TOKENS:
            return 0
        toks = np.asarray(tokens[:n], dtype=np.int64)
        for e in self.entries:
            if len(e.tokens) >= n and e.n_draft >= n_draft and common_prefix(e.tokens, toks) == n:
                e.used = self._tick()
                return 0
        for e in [e for e in self.entries if e is not keep and len(e.tokens) <= n and e.n_draft <= n_draft
                  and common_prefix(e.tokens, toks) == len(e.tokens)]:
            self._drop(e)
        need = -(-n // BLOCK_TOKENS)
        evicted = 0
        while len(self._free) < need:
            self._drop(min((e for e in self.entries if e is not keep), key=lambda e: e.used))
            evicted += 1
        self.evictions += evicted
        blocks = [self._free.pop() for _ in range(need)]
        lo_t = self.target.saved_from(slot, n)
        self.target.save(slot, blocks, n, lo_t)
        lo_d = self.draft.saved_from(slot, n_draft) if self.draft is not None else 0
        if self.draft is not None and n_draft:
            self.draft.save(slot, blocks, n_draft, lo_d)
        self.entries.append(_Entry(toks, n_draft, blocks, self._tick(), (lo_t, lo_d)))
        return evicted

    def restore(self, e: _Entry, slot: int, target: tuple[int, int], draft: tuple[int, int]) -> None:
        """Copy an entry's target cells [lo, hi) and draft cells [lo, hi) into a slot."""
        e.used = self._tick()
        self.target.load(slot, e.blocks, *target, e.swa_lo[0])
        if self.draft is not None:
            self.draft.load(slot, e.blocks, *draft, e.swa_lo[1])

    def usable(self, e: _Entry, target: tuple[int, int], draft: tuple[int, int]) -> bool:
        """Whether restoring target cells [kept, n) and draft cells [kept, n) of `e` leaves each model's
        local layers their window (always, for a model without sliding-window layers)."""
        ok = self.target.usable(e.swa_lo[0], *target)
        return ok and (self.draft is None or self.draft.usable(e.swa_lo[1], *draft))

    def _drop(self, e: _Entry) -> None:
        self.entries.remove(e)
        self._free.extend(reversed(e.blocks))


# ---- the engine's part: admission and release ----

@dataclass(frozen=True)
class Reuse:
    """What a starting request keeps: prompt[:n_target] in the target's cells, [:n_draft] in the draft's."""

    n_target: int = 0
    n_draft: int = 0
    source: ReuseSource = "none"
    evicted: int = 0  # store entries evicted to save the slot's previous state


@dataclass
class CacheCounters:
    """Requests that reused a prefix (hits) or not (misses), and the prompt tokens reused."""

    hits: int = 0
    misses: int = 0
    cached_tokens: int = 0


@dataclass
class PrefixCache:
    """Prompt reuse over one pair's slots; `store` None: no store (prompt_cache_bytes 0)."""

    store: PromptStore | None = None
    counters: CacheCounters = field(default_factory=CacheCounters)
    contexts: tuple = ()  # (target, draft or None) LlamaContexts: a kept prefix must hold their windows

    @staticmethod
    def for_pair(pair) -> "PrefixCache":
        """Prompt reuse over a loaded pair, with a store over its planned blocks when it has them."""
        t = pair.target.caches.get("prompt_cache")
        contexts = (pair.target.context, pair.draft.context if pair.draft is not None else None)
        if t is None:
            return PrefixCache(contexts=contexts)
        d = pair.draft.caches.get("prompt_cache") if pair.draft is not None else None
        return PrefixCache(PromptStore(pair.target.context, t, pair.draft.context if d else None, d),
                           contexts=contexts)

    def admit(self, slot, draft_valid: int, prompt: Sequence[int], cache_prompt: bool) -> Reuse:
        """The cells `prompt` keeps in `slot` (lock held, worker thread: no decode runs). The slot's
        previous state goes to the store first when the new prompt does not extend it; then, when an
        entry shares a longer prefix than the slot, its missing cells are copied in. A failure here
        (a backend copy) costs the request its reuse, never the engine its thread."""
        try:
            return self._admit(slot, draft_valid, prompt, cache_prompt)
        except Exception:
            log.exception("prompt cache: reuse failed; the prompt is prefilled from the start")
            self.counters.misses += cache_prompt
            return Reuse()

    def _admit(self, slot, draft_valid: int, prompt: Sequence[int], cache_prompt: bool) -> Reuse:
        old = slot.cached_tokens()
        cap = len(prompt) - 1  # the last prompt token is fed: its logits give the first token
        keep_t = min(common_prefix(old, prompt), cap) if cache_prompt else 0
        keep_d = min(keep_t, draft_valid)
        if self.contexts and not self.contexts[0].window_intact(slot.idx, keep_t):
            keep_t = keep_d = 0  # a local layer's ring moved past the window the kept prefix needs
        if self.contexts and self.contexts[1] is not None and not self.contexts[1].window_intact(slot.idx, keep_d):
            keep_d = 0
        e, n = self.store.lookup(prompt) if self.store is not None and cache_prompt else (None, 0)
        n = min(n, cap)
        evicted = 0
        if self.store is not None and keep_t < len(old):  # before the restore overwrites the slot's cells
            evicted = self.store.save(slot.idx, old, len(old), min(draft_valid, len(old)),
                                      keep=e if n > keep_t else None)
        source: ReuseSource = "slot" if keep_t else "none"
        if e is not None and n > keep_t and not self.store.usable(e, (keep_t, n), (keep_d, min(n, e.n_draft))):
            e, n = None, 0  # the entry's local cells begin after the window its end needs
        if e is not None and n > keep_t:
            d_hi = min(n, e.n_draft)
            self.store.restore(e, slot.idx, (keep_t, n), (keep_d, d_hi) if d_hi > keep_d else (0, 0))
            keep_t, keep_d, source = n, max(keep_d, d_hi), "store"
        if cache_prompt:  # a request that opted out looked for nothing: neither a hit nor a miss
            self.counters.hits += keep_t > 0
            self.counters.misses += keep_t == 0
            self.counters.cached_tokens += keep_t
        return Reuse(keep_t, keep_d, source, evicted)

    def stats(self) -> dict:
        """Counters and the store's occupancy (for ListPairs and the metrics gauges)."""
        s = self.store
        return {"capacity_bytes": s.capacity_bytes if s else 0, "used_bytes": s.used_bytes if s else 0,
                "blocks": s.n_blocks if s else 0, "block_tokens": BLOCK_TOKENS,
                "entries": len(s.entries) if s else 0, "evictions": s.evictions if s else 0,
                "hits": self.counters.hits, "misses": self.counters.misses,
                "cached_tokens": self.counters.cached_tokens}

    def clear_counters(self) -> None:
        """Forget the hits and misses so far (the warm-up request's)."""
        self.counters = CacheCounters()
        if self.store is not None:
            self.store.evictions = 0
