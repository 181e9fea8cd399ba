"""The cross-request n-gram index: recent outputs of every request on a pair, for the n-gram drafter.

A second request that repeats much of an earlier answer (a retry, an agent re-running a step,
templated output) drafts well from it: llama.cpp's ngram-cache and suffix decoding do the same.
The index is a ring of `ngram_cache_tokens` int32 token ids, a buffer of the plan (service/fit/plan.py,
its layout service/fit/cache_layout.py's)
that serving never grows: each finished request appends the last RECORD_PROMPT_TAIL tokens of its
prompt (the keys its first tokens follow) and its output, then a separator (-1), overwriting the
oldest tokens. A lookup finds the most recent place where the longest suffix of a slot's tokens
(at least ngram_min, compared up to MATCH_MAX) occurs and proposes what followed it.

Verification decides what is kept, so output is unchanged (greedy: token for token); the draft
policy's per-slot acceptance decides how far the index is trusted (service/engine/spec/policy.py).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from service.engine.spec.verify import match_lengths

RECORD_PROMPT_TAIL = 32  # prompt tokens recorded before an output
MATCH_MAX = 32  # longest suffix compared: more tells a real repeat from a chance n-gram
SEP = -1  # between records (and in never written cells): no match runs across it


class NgramIndex:
    """Recent outputs in a planned ring of token ids (host numpy, `ring` from the plan's allocation)."""

    def __init__(self, ring: np.ndarray):
        self.ring = ring
        self.ring.fill(SEP)
        self.n = len(ring)
        self.head = 0  # the next cell written; ring[head - 1] is always a separator

    @staticmethod
    def of_pair(pair) -> "NgramIndex | None":
        """The index over a loaded pair's planned ring (None when its plan has none)."""
        a = pair.target.caches.get("ngram_cache")
        return NgramIndex(a.array["tokens"]) if a is not None else None

    def add(self, tokens: Sequence[int]) -> None:
        """Append one record (at most n - 1 tokens, its last ones) and a separator."""
        t = np.asarray(tokens, dtype=np.int32)[-(self.n - 1):] if self.n > 1 else np.zeros(0, np.int32)
        if len(t) == 0:
            return
        idx = (self.head + np.arange(len(t) + 1)) % self.n
        self.ring[idx[:-1]] = t
        self.ring[idx[-1]] = SEP
        self.head = int(idx[-1] + 1) % self.n

    def match(self, tokens: Sequence[int], k: int, ngram_min: int) -> tuple[int, list[int]]:
        """(n, up to k tokens that followed the most recent occurrence of the longest suffix of `tokens`,
        n >= ngram_min tokens long); (0, []) when none."""
        if k <= 0 or len(tokens) == 0:
            return 0, []
        ring, N = self.ring, self.n
        tail = np.asarray(tokens[-MATCH_MAX:], dtype=np.int64)
        cand = np.flatnonzero(ring == tail[-1])
        cand = cand[ring[(cand + 1) % N] != SEP]  # something follows
        if len(cand) == 0:
            return 0, []
        length = match_lengths(ring, cand, tail, ring=True)
        best = int(length.max())
        if best < ngram_min:
            return 0, []
        among = cand[length == best]
        c = int(among[np.argmax((among - self.head) % N)])  # the most recent: furthest from the oldest cell
        out = []
        for i in range(1, k + 1):
            t = int(ring[(c + i) % N])
            if t == SEP:
                break
            out.append(t)
        return best, out
