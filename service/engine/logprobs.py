"""Log-probabilities of generated and prompt tokens, and their top alternatives.

Which distribution (the same choice as vLLM's `logprobs_mode="processed_logprobs"`):
- generated tokens (`GenRequest.logprobs`): the log-softmax, over the whole vocabulary, of the
  target's logits after the request's repetition penalty and temperature (temperature 0, greedy,
  counts as 1), BEFORE the truncating filters top-k, top-p and min-p. A sampled token is always
  inside the truncated set, so its logprob is finite; the alternatives are the k most likely
  tokens of this distribution. (llama-server's `n_probs` instead reports the probabilities after
  every filter, which at temperature 0 is a point mass: 0 for the argmax, -inf for the rest.)
- prompt tokens (`GenRequest.prompt_logprobs`): the log-softmax of the raw logits (no penalty, no
  temperature: the prompt was not sampled), as perplexity and lm-eval-harness `loglikelihood` want.

Row i of a verify batch is the target's distribution after d_1..d_i, so with speculation the
values come from the verify pass and equal a one-token-per-step run's wherever the backend is
batch invariant (bit for bit at temperature 0; tests/test_gen_controls.py checks it).
Everything is float64 on the host; alternatives are ordered by logprob, ties by token id.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from service.engine.request import SamplingParams, TokenLogprob
from service.engine.sampling import apply_repeat_penalty, penalty_history


def log_softmax(z: np.ndarray) -> np.ndarray:
    """log(softmax(z)) in float64. z: (n_vocab,)."""
    z = np.asarray(z, dtype=np.float64)
    m = z.max()
    return z - (m + np.log(np.exp(z - m).sum()))


def processed_logprobs(logits: np.ndarray, params: SamplingParams, history: Sequence[int] = ()) -> np.ndarray:
    """The generated-token distribution (see the module docstring). logits: (n_vocab,) -> (n_vocab,) float64."""
    z = apply_repeat_penalty(logits, history, params.repeat_penalty, params.repeat_last_n).astype(np.float64)
    if not params.greedy:
        z = z / params.temperature
    return log_softmax(z)


def top_k(lp: np.ndarray, k: int) -> tuple[tuple[int, float], ...]:
    """The k most likely (token, logprob) of lp (n_vocab,), most likely first, ties by lower token id."""
    if k <= 0:
        return ()
    k = min(k, lp.shape[0])
    kth = np.partition(lp, lp.shape[0] - k)[lp.shape[0] - k]
    cand = np.flatnonzero(lp >= kth)  # every tie at the boundary, then a deterministic order
    order = np.lexsort((cand, -lp[cand]))[:k]
    return tuple((int(cand[i]), float(lp[cand[i]])) for i in order)


def entry(lp: np.ndarray, token: int, k: int) -> TokenLogprob:
    """The TokenLogprob of `token` under lp (n_vocab,) with k alternatives."""
    return TokenLogprob(int(token), float(lp[token]), top_k(lp, k))


def generated(logits: np.ndarray, rows: Sequence[int], tokens: Sequence[int], prior: Sequence[int],
              params: SamplingParams, k: int) -> list[TokenLogprob]:
    """Logprobs of tokens[i] under logits[rows[i]], the row verification drew it from; prior: the
    sequence before tokens[0] (the repetition penalty of row i also sees tokens[:i])."""
    return [entry(processed_logprobs(logits[r], params, penalty_history(prior, tokens[:i], params)), t, k)
            for i, (r, t) in enumerate(zip(rows, tokens))]


def prompt(logits: np.ndarray, rows: Sequence[int], tokens: Sequence[int], k: int) -> list[TokenLogprob]:
    """Logprobs of prompt tokens[i] under the raw logits[rows[i]] (the row of the token before it)."""
    return [entry(log_softmax(logits[r]), t, k) for r, t in zip(rows, tokens)]


def first_prompt_token(token: int) -> TokenLogprob:
    """The prompt's first token has no context: logprob 0 and no alternatives (as the proto says)."""
    return TokenLogprob(int(token), 0.0, ())


# ---- a slot's rows of one step (the engine's calls) ----

def of_scored_prompt(s, w, logits: np.ndarray) -> list[TokenLogprob]:
    """Logprobs of the prompt tokens that follow the first w.n_scored fed ones (one per scoring row).
    s: the Slot; w: its SlotWork of this step."""
    nxt = s.tokens[s.n_past + 1:s.n_past + 1 + w.n_scored]
    return prompt(logits, w.score_rows, nxt, s.stream.request.prompt_logprobs)


def of_appended(s, w, logits: np.ndarray, new: list[int]) -> list[TokenLogprob] | None:
    """Logprobs of the tokens about to be appended to slot s (row i drew new[i]); None unless asked for.
    w: the slot's SlotWork (its logit rows), or None when `logits` holds exactly those rows."""
    k = s.stream.request.logprobs
    if k is None:
        return None
    rows = w.logit_rows[:len(new)] if w is not None else range(len(new))
    return generated(logits, rows, new, s.tokens, s.stream.request.sampling, k)
