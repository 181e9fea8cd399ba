"""Drafters and verification for speculative decoding.

Glossary (as vLLM's rejection sampler):
- drafted tokens: d_1..d_k proposed by the drafter for one slot in one step;
- accepted tokens: the longest prefix d_1..d_j that verification keeps;
- recovered token: on the first rejection, a token resampled from max(0, p - q) normalised;
- bonus token: when all k are accepted, one more token sampled from the target's row k.

Every step emits j accepted tokens plus exactly one recovered-or-bonus token, so the output
distribution is the target's (Leviathan et al. 2023; Chen et al. 2023). At temperature 0 the
target distribution is a point mass on the argmax and this reduces to "accept while the
target's argmax equals the draft, then the target's argmax".
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from service.engine.sampling import sample


def ngram_propose(tokens: Sequence[int], n_max: int, ngram_min: int, ngram_max: int) -> list[int]:
    """Prompt lookup: find the most recent earlier occurrence of the last n tokens (n from ngram_max
    down to ngram_min) in the prompt + history and propose up to n_max tokens that followed it."""
    return ngram_match(tokens, n_max, ngram_min, ngram_max)[1]


def ngram_match(tokens: Sequence[int], n_max: int, ngram_min: int, ngram_max: int) -> tuple[int, list[int]]:
    """`ngram_propose` and the length n of the suffix it matched (0: no match).

    One pass, run every decoding step: the earlier places where the last token occurs (each with a token
    after it) are the candidates, and each one's match grows backwards, all candidates at once, while
    it agrees with the suffix (up to ngram_max tokens). The longest match wins, the most recent among equals."""
    if n_max <= 0 or len(tokens) < 2:
        return 0, []
    arr = np.asarray(tokens, dtype=np.int64)
    L = len(arr)
    ends = np.flatnonzero(arr[:L - 1] == arr[L - 1])  # where an earlier occurrence of the suffix would end
    if len(ends) == 0:
        return 0, []
    length = match_lengths(arr, ends, arr[L - min(ngram_max, L - 1):], ring=False)
    best = int(length.max())
    if best < ngram_min:
        return 0, []
    start = int(ends[length == best].max()) + 1
    return best, arr[start:start + n_max].tolist()


def match_lengths(seq: np.ndarray, ends: np.ndarray, suffix: np.ndarray, ring: bool) -> np.ndarray:
    """For each place e in `ends` (seq[e] == suffix[-1]), how many of `suffix`'s last tokens end at e in
    `seq` (1..len(suffix)), grown backwards for all places at once. ring: `seq` wraps around (its indices
    are taken modulo its length); else a match stops at its start."""
    length = np.ones(len(ends), dtype=np.int64)
    alive = np.ones(len(ends), dtype=bool)
    for j in range(1, len(suffix)):
        prev = ends - j
        if ring:
            prev %= len(seq)
        else:
            alive &= prev >= 0
        alive[alive] &= seq[prev[alive]] == suffix[-1 - j]
        if not alive.any():
            break
        length += alive
    return length


def verify(drafts: Sequence[int], target_probs: Sequence[np.ndarray], draft_probs: Sequence[np.ndarray] | None,
           rng: np.random.Generator) -> tuple[int, list[int]]:
    """Rejection-sample the drafts against the target.

    drafts: d_1..d_k; target_probs: k+1 rows, row i the target's distribution for the token after
    d_i (row 0: after the last accepted token); draft_probs: k rows, row i the distribution d_{i+1}
    was drawn from, or None for a deterministic drafter (n-gram: a point mass).
    Returns (j accepted, the tokens to append: d_1..d_j then one recovered or bonus token).
    """
    out: list[int] = []
    for i, d in enumerate(drafts):
        p = target_probs[i]
        q_d = 1.0 if draft_probs is None else float(draft_probs[i][d])
        if p[d] >= q_d or rng.random() < p[d] / q_d:  # q <= p: always accept; else with prob p/q
            out.append(int(d))
            continue
        if draft_probs is None:
            resid = p.copy()
            resid[d] = 0.0  # max(0, p - onehot(d)) since p[d] < 1
        else:
            resid = np.maximum(p - draft_probs[i], 0.0)
        s = resid.sum()
        out.append(sample(resid / s, rng) if s > 0 else sample(p, rng))
        return i, out
    out.append(sample(target_probs[len(drafts)], rng))
    return len(drafts), out
