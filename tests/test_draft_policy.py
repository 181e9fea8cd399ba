"""The draft policy as pure functions: no engine, no backend, only cost curves and acceptance counts."""

from __future__ import annotations

import pytest

from service.engine.spec import policy
from service.engine.spec.policy import (
    ALPHA_MAX,
    EXPLORE_EVERY,
    EXPLORE_MAX,
    PRIOR,
    DraftStats,
    acceptance,
    back_off,
    best_k,
    choose,
    drafted,
    learn,
    tick,
)

TILES_8 = lambda r: float(-(-r // 8))  # noqa: E731 - a backend paying for whole 8-row tiles
PER_ROW = lambda r: float(r)  # noqa: E731 - every row costs a decode (NumPy, one gemv per row)
GPU = lambda r: 1.0 + 0.02 * (r - 1)  # noqa: E731 - the Backend default: rows nearly free


def expected_tokens(a: float, k: int) -> float:
    """1 + a + ... + a^k: the accepted prefix plus the bonus token."""
    return sum(a ** i for i in range(k + 1))


@pytest.mark.parametrize("a", [0.0, 0.2, 0.5, 0.8, 0.95])
@pytest.mark.parametrize("cost", [TILES_8, PER_ROW, GPU], ids=["tiles8", "per-row", "gpu"])
def test_best_k_maximises_expected_tokens_per_cost(a, cost):
    k = best_k(a, 12, cost)
    value = [expected_tokens(a, i) / cost(1 + i) for i in range(13)]
    assert value[k] >= max(value) / 1.0001  # the best (up to the tie margin) ...
    assert all(v <= value[k] * 1.0001 for v in value[:k])  # ... and the smallest such k


def test_best_k_on_known_curves():
    assert best_k(PRIOR, 8, TILES_8) == 7  # 7 drafts are free in an 8-row tile; the 8th costs a tile
    assert best_k(0.98, 16, TILES_8) == 7  # a second tile (2x cost) for less than 2x the tokens: no
    assert best_k(0.9, 8, PER_ROW) == 0  # a row costs a decode: no draft ever pays
    assert best_k(0.9, 8, GPU) == 8  # rows nearly free: as many as allowed
    assert best_k(0.0, 8, GPU) == 0  # nothing is ever accepted: no draft pays for its row
    assert best_k(0.9, 0, GPU) == 0  # no room


def test_acceptance_starts_at_the_prior_and_follows_counts():
    s = DraftStats()
    assert acceptance(s) == PRIOR
    for _ in range(50):
        s = learn(s, 4, 4)
    assert acceptance(s) > 0.95  # (20 + 1) / (20 + 2): the prior weighs 2 drafts against ~20 (decayed) accepted
    assert acceptance(DraftStats(tries=1e6, hits=1e6)) == ALPHA_MAX  # capped: never certain
    for _ in range(50):
        s = learn(s, 4, 0)
    assert acceptance(s) < 0.15  # (0 + 1) / (5 + 2): each step tests one draft (rejected) of 4


def test_learn_counts_tested_drafts_up_to_the_first_rejection():
    s = learn(DraftStats(), 5, 2)  # d1, d2 accepted, d3 rejected, d4 d5 never tested
    assert (s.tries, s.hits) == (3.0, 2.0)
    s2 = learn(s, 5, 5)  # all accepted: 5 tested, decayed history
    assert s2.tries == pytest.approx(3.0 * 0.8 + 5) and s2.hits == pytest.approx(2.0 * 0.8 + 5)
    idle = learn(s, 0, 0)  # no draft: the counts decay slowly toward the prior
    assert idle.tries == pytest.approx(3.0 * 0.97) and idle.hits == pytest.approx(2.0 * 0.97)


def test_choose_drafts_by_cost_and_explores_only_after_the_gap():
    s = DraftStats()
    assert choose(s, 8, TILES_8, may_explore=True) == choose(s, 8, TILES_8, may_explore=False)
    assert choose(s, 8, TILES_8, may_explore=False).k == 7
    for _ in range(EXPLORE_EVERY):
        s = tick(s)
    c = choose(s, 8, PER_ROW, may_explore=True)
    assert (c.k, c.exploring) == (0, False)  # idle == gap: not yet
    s = tick(s)
    c = choose(s, 8, PER_ROW, may_explore=True)
    assert (c.k, c.exploring) == (1, True)  # idle > gap: one draft, to learn
    assert choose(s, 8, PER_ROW, may_explore=False).k == 0  # a draft model (or n_min > 1) never explores
    assert choose(s, 0, PER_ROW, may_explore=True).k == 0  # no room: no exploration either
    assert drafted(s).idle == 0 and tick(drafted(s)).idle == 1


def test_back_off_doubles_on_rejection_up_to_the_cap_and_resets_on_acceptance():
    s, gaps = DraftStats(), []
    for _ in range(6):
        s = back_off(s, accepted=False)
        gaps.append(s.gap)
    assert gaps == [16, 32, 64, 128, 128, 128] and EXPLORE_MAX == 128
    assert back_off(s, accepted=True).gap == EXPLORE_EVERY


def test_policy_state_is_never_mutated():
    s = DraftStats()
    learn(s, 4, 1), tick(s), back_off(s, False), drafted(s)
    assert s == DraftStats()
    with pytest.raises(AttributeError):
        s.tries = 1.0  # frozen


# ---- the row-cost curve measured at warm-up ----
def test_measured_row_cost_is_relative_to_one_row_and_never_decreases():
    m = policy.MeasuredRowCost((0.010, 0.013, 0.011, 0.015, 0.020))
    assert m.table() == pytest.approx((1.0, 1.1, 1.1, 1.5, 2.0))  # 2 rows timed slower than 3: a stall
    assert m(1) == 1.0 and m(2) == pytest.approx(1.1) and m(5) == pytest.approx(2.0)
    assert m(10) == pytest.approx(4.0)  # beyond the table: in proportion to the rows
    assert m.describe() == "1:1.00 2:1.10 3:1.10 4:1.50 5:2.00"


def test_measured_row_cost_drives_the_choice_like_any_cost_curve():
    cheap = policy.MeasuredRowCost((0.01,) * 9)  # a batch of 9 costs what one row costs
    dear = policy.MeasuredRowCost(tuple(0.01 * r for r in range(1, 10)))  # each row costs a full step
    assert policy.best_k(0.9, 8, cheap) == 8
    assert policy.best_k(0.9, 8, dear) == 0


@pytest.mark.parametrize("bad", [(), (0.0, 1.0), (0.01, -1.0)])
def test_measured_row_cost_refuses_non_positive_timings(bad):
    with pytest.raises(ValueError):
        policy.MeasuredRowCost(bad)
