"""Sampling: logits -> a filtered probability distribution -> a token.

    logits_to_probs(logits, params, history) -> probs      (temperature, penalties, top-k/p, min-p)
    sample(probs, rng) -> token

Speculative verification needs the *distribution* the target samples from, not just a
token, so the filters produce probabilities and the sampler draws from them. At temperature
0 the distribution is a point mass on the argmax (ties: the lowest id, as np.argmax).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from service.engine.request import SamplingParams


def apply_repeat_penalty(logits: np.ndarray, history: Sequence[int], penalty: float, last_n: int) -> np.ndarray:
    """llama.cpp's repetition penalty: logits of recently seen tokens are divided (if > 0) or multiplied by it."""
    if penalty == 1.0 or not len(history) or last_n == 0:
        return logits
    recent = np.unique(np.asarray(history[-last_n:] if last_n > 0 else history, dtype=np.int64))
    out = logits.copy()
    v = out[recent]
    out[recent] = np.where(v > 0, v / penalty, v * penalty)
    return out


def penalty_history(tokens: Sequence[int], drafts: Sequence[int], params: SamplingParams) -> list[int]:
    """The tokens a repetition penalty looks back over for the token after tokens + drafts: only its
    window of the last repeat_last_n (all when -1); none when the penalty is off."""
    if params.repeat_penalty == 1.0 or params.repeat_last_n == 0:
        return []
    n = params.repeat_last_n if params.repeat_last_n > 0 else len(tokens) + len(drafts)
    return (list(tokens[-n:]) + list(drafts))[-n:]


def logits_to_probs(logits: np.ndarray, params: SamplingParams, history: Sequence[int] = ()) -> np.ndarray:
    """The distribution a token is drawn from. logits: (n_vocab,) float32 -> probs (n_vocab,) float64."""
    logits = apply_repeat_penalty(logits, history, params.repeat_penalty, params.repeat_last_n)
    n = logits.shape[0]
    if params.greedy:
        p = np.zeros(n, np.float64)
        p[int(np.argmax(logits))] = 1.0
        return p
    z = logits.astype(np.float64) / params.temperature
    if 0 < params.top_k < n:  # candidates: the top_k logits (ties at the boundary: all kept)
        kth = np.partition(z, n - params.top_k)[n - params.top_k]
        cand = np.flatnonzero(z >= kth)
    else:
        cand = np.arange(n)
    zc = z[cand]
    pc = np.exp(zc - zc.max())
    pc /= pc.sum()
    if params.top_p < 1.0:
        order = np.argsort(-pc, kind="stable")
        cum = np.cumsum(pc[order])
        cut = int(np.searchsorted(cum, params.top_p)) + 1  # smallest prefix with mass >= top_p
        pc[order[cut:]] = 0.0
    if params.min_p > 0.0:
        pc[pc < params.min_p * pc.max()] = 0.0
    p = np.zeros(n, np.float64)
    p[cand] = pc / pc.sum()
    return p


def sample(probs: np.ndarray, rng: np.random.Generator) -> int:
    """Draw one token from a distribution (argmax when it is a point mass)."""
    top = int(np.argmax(probs))
    if probs[top] >= 1.0:
        return top
    cdf = np.cumsum(probs)
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), len(probs) - 1))
