"""Draft length: how many drafts a slot should propose this step. Pure functions, no engine, no backend.

Per drafted token the slot's acceptance rate is a; k drafts then yield
    E[tokens | k] = 1 + a + a^2 + ... + a^k
tokens in expectation (the accepted prefix plus the bonus token), for a forward pass of 1 + k
rows whose cost the backend knows (`row_cost`). The policy drafts the k that gives the most
tokens per unit of cost, 0 when no draft pays off:
    k* = argmax_k E[tokens | k] / row_cost(1 + k)     (k = 0: 1 / row_cost(1))

The acceptance estimate is a decayed count of tested and accepted drafts with a prior:
    a = min((hits + PRIOR * PRIOR_WEIGHT) / (tries + PRIOR_WEIGHT), ALPHA_MAX)
It decays toward PRIOR while a slot does not draft (IDLE_DECAY), so drafting is tried again.

Exploration: where a verify row is dear (NumPy's one gemv per row), PRIOR alone never pays for
a draft, and an n-gram slot would never learn that its matches are good. So an n-gram slot that
has not drafted for `gap` steps (EXPLORE_EVERY at first) drafts one token when it has a match;
each rejected exploration doubles the gap (up to EXPLORE_MAX), an accepted one resets it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

PRIOR, PRIOR_WEIGHT = 0.5, 2.0  # the acceptance a slot starts from, worth 2 tested drafts
DECAY, IDLE_DECAY = 0.8, 0.97  # per step that tested drafts / that drafted nothing
ALPHA_MAX = 0.98  # never assume certain acceptance: k stays bounded by cost, not by a = 1
EXPLORE_EVERY, EXPLORE_MAX = 8, 128  # n-gram exploration gap: initial and largest

RowCost = Callable[[int], float]  # rows of a forward pass -> its cost (1.0 = one row)


@dataclass(frozen=True)
class DraftStats:
    """What a slot has learned about its drafts; the policy's state, replaced (never mutated) each step."""

    tries: float = 0.0  # decayed count of draft tokens verification tested ...
    hits: float = 0.0  # ... and of those accepted: the slot's acceptance estimate
    idle: int = 0  # steps since the slot last drafted (n-gram exploration) ...
    gap: int = EXPLORE_EVERY  # ... and how many it waits before exploring again


@dataclass(frozen=True)
class DraftChoice:
    """This step's decision for one slot: propose up to k drafts; `exploring`: k = 1 to learn."""

    k: int
    exploring: bool


def acceptance(st: DraftStats) -> float:
    """The slot's estimated per-token acceptance rate a (the prior when nothing was tested)."""
    return min((st.hits + PRIOR * PRIOR_WEIGHT) / (st.tries + PRIOR_WEIGHT), ALPHA_MAX)


def best_k(a: float, k_max: int, row_cost: RowCost) -> int:
    """argmax over k in 0..k_max of (1 + a + ... + a^k) / row_cost(1 + k); ties keep the smaller k."""
    p, expect = 1.0, 1.0
    k_best, best = 0, 1.0 / row_cost(1)
    for k in range(1, k_max + 1):
        p *= a
        expect += p
        if expect / row_cost(1 + k) > best * 1.0001:
            k_best, best = k, expect / row_cost(1 + k)
    return k_best


def choose(st: DraftStats, k_max: int, row_cost: RowCost, may_explore: bool) -> DraftChoice:
    """The draft length for a slot with room for k_max drafts; `st` is after this step's `tick`.
    may_explore: the drafter is n-gram and accepts single-token drafts (n_min <= 1)."""
    k = best_k(acceptance(st), k_max, row_cost) if k_max > 0 else 0
    if k <= 0 and may_explore and k_max > 0 and st.idle > st.gap:
        return DraftChoice(1, True)
    return DraftChoice(k, False)


def tick(st: DraftStats) -> DraftStats:
    """One more step since the slot last drafted."""
    return replace(st, idle=st.idle + 1)


def drafted(st: DraftStats) -> DraftStats:
    """The slot proposed drafts this step (the exploration clock restarts)."""
    return replace(st, idle=0)


def learn(st: DraftStats, k: int, j: int) -> DraftStats:
    """Verification tested k drafts and accepted j (j < k: the (j+1)-th was rejected; k = 0: none tested).
    tries counts the tested ones (all up to the first rejection), hits the accepted ones."""
    d = DECAY if k else IDLE_DECAY
    return replace(st, tries=st.tries * d + min(j + 1, k), hits=st.hits * d + j)


def back_off(st: DraftStats, accepted: bool) -> DraftStats:
    """After an exploration: an accepted one resets the gap, a rejected one doubles it (up to EXPLORE_MAX)."""
    return replace(st, gap=EXPLORE_EVERY if accepted else min(2 * st.gap, EXPLORE_MAX))


@dataclass(frozen=True)
class MeasuredRowCost:
    """A row-cost curve measured on the device (service/pairs/warmup.py times decode calls of 1..n rows).

    `seconds[r - 1]` is the fastest of a few timed r-row calls. Timing noise only ever adds
    time, so the curve is made non-decreasing from the right: r rows cost no more than any
    larger call measured (a stall during the 2-row call must not make every batch look dear).
    Costs are relative to one row; beyond the largest measured row count they grow in
    proportion to the rows."""

    seconds: tuple[float, ...]

    def __post_init__(self):
        if not self.seconds or min(self.seconds) <= 0:
            raise ValueError(f"row timings must be positive, got {self.seconds}")

    def __call__(self, rows: int) -> float:
        costs = self.table()
        if rows <= len(costs):
            return costs[max(rows, 1) - 1]
        return costs[-1] * rows / len(costs)

    def table(self) -> tuple[float, ...]:
        """Cost of 1, 2, ... rows relative to one row, non-decreasing."""
        out, low = [], float("inf")
        for s in reversed(self.seconds):
            low = min(low, s)
            out.append(low)
        out.reverse()
        return tuple(c / out[0] for c in out)

    def describe(self) -> str:
        """"1:1.00 2:1.05 ..." for logs and --stats."""
        return " ".join(f"{r}:{c:.2f}" for r, c in enumerate(self.table(), 1))
