"""Our graph against llama.cpp on the real model (SmolLM2-135M-Instruct Q4_1).

Reference: tests/data/llama_reference.json, made by ``python bench/make_llama_reference.py``
(llama-cpp-python 0.3.36, one thread; the prompt in one decode call, then one token per call,
argmax of the last logits). Our graph (compute/llama.py) runs twice here, both times the same
way (prompt in one call, then one token per call):

1. With llama.cpp's rounding (``reference/ggml_cpu.py``: every op rounded as ggml's x86 CPU backend
   rounds it: Q8_1/Q8_0 activations in the quantised dot products, f16 q and probabilities in
   attention, its exp polynomial, its sums' order). This must reproduce llama.cpp exactly: all
   48 greedy tokens of every prompt, and every recorded logit to the file's 5 decimals. It
   shows the graph is llama.cpp's graph; any difference below is rounding alone.

2. With the NumPy backend as it ships (float32 activations times the dequantised weights).
   Why its tokens can part from llama.cpp's at a near-tie: llama.cpp quantises the activations
   to 8 bits (Q8_1; Q8_0 for the Q8_0 output head) in blocks of 32 before every dot product with
   a quantised weight, and rounds q and the softmax probabilities to f16 in attention; we do
   not. Measured over 147 teacher-forced positions of the three prompts: logits differ from
   llama.cpp's by up to 2.3 (full vocabulary), 1.7 over llama.cpp's top 32, and top-1 margins
   by up to 0.56 (correlation >= 0.996). llama.cpp's own batched and one-token logits differ by
   up to 1.3 (its one-row matmuls take other kernels than its many-row ones, and 8-bit
   rounding turns last-bit differences into 1/127-sized ones). A greedy step whose top-2
   margin is below that can go either way, and two of the three prompts have such a near-tie
   at their first step (see KNOWN_PARTINGS).

Tolerances (TOL_*, in tests/llama_cpp_ref.py, which the other llama.cpp checks share) are those
measurements rounded up. They catch a wrong RoPE pair layout
(top-32 difference >= 4.7 at the first step) or a wrong attention scale (>= 4.1); they do
not catch an rms eps off by 100x (1.43); the exact run 1 catches all three.
"""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass

import numpy as np
import pytest

from compute.llama import Batch
from compute.numpy_backend import NumpyBackend
from reference.ggml_cpu import GgmlCpuBackend
from service.fit.factory import PairFactory, PairRequest
from service.fit.params import ContextParams, SpeculativeConfig
from tests import llama_cpp_ref
from tests.llama_cpp_ref import MIN_CORR, NEAR_TIE, TOL_FULL, TOL_MARGIN, TOL_TOP32

pytestmark = pytest.mark.slow

REF = json.loads((pathlib.Path(__file__).parent / "data" / "llama_reference.json").read_text())
CASES = {c["name"]: c for c in REF["cases"]}
N_MATCH = 16  # greedy tokens that must equal llama.cpp's
REF_ROUNDING = 5.5e-6  # the file keeps 5 decimals: an exact logit differs from it by at most 5e-6
N_TEACHER_MIN = 42  # of 48 teacher-forced steps whose argmax must equal llama.cpp's token (measured 44, 45, 48)

# Prompts whose greedy tokens part from llama.cpp's before N_MATCH, with what was measured at
# the parting step. Both are near-ties (margins far below TOL_MARGIN); the teacher-forced
# test below checks that every disagreement is one. Remove an entry to make its case fail.
KNOWN_PARTINGS = {
    "chat_capital_of_france": "step 0: llama.cpp picks 60 'L' over 504 'The' by 0.089; we pick 504 over 60 by 0.084",
    "code_fibonacci": "step 0: llama.cpp picks 3725 '```' over 198 '\\n' by 0.057; we pick 198 over 3725 by 0.093",
}


def _cases_marked():
    return [pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=f"near-tie: {KNOWN_PARTINGS[name]}"))
            if name in KNOWN_PARTINGS else name for name in CASES]


def _margin(row: np.ndarray) -> float:
    a, b = np.partition(row, -2)[-2:]
    return float(b - a)


@dataclass
class Run:
    ids: list[int]  # our free-running greedy tokens
    margins: list[float]  # our top-1 margin at each free-running step
    teacher: list[int]  # our argmax at each step given llama.cpp's tokens so far
    teacher_margins: list[float]
    first: np.ndarray  # our first-step logits (the prompt's last row)


def _decode_one(ctx, tok: int, pos: int) -> np.ndarray:
    return ctx.decode(Batch.make([tok], [pos], [0], [0]))[0]


def _run_case(ctx, case: dict) -> Run:
    """Teacher-forced with llama.cpp's tokens, then free-running from the first parting on.

    Both are one token per decode call. The free run equals the teacher-forced run up to the
    first parting; from there it rewrites the KV cells from that position on (attention reads
    only cells up to a row's position, so the old cells beyond are never seen)."""
    prompt, ref = case["prompt_ids"], case["llama_ids"]
    n, p0 = len(ref), len(prompt)
    row = ctx.decode(Batch.make(prompt, range(p0), [0] * p0, [p0 - 1]))[0]
    first = row.copy()
    teacher, tmarg, rows = [], [], [row]
    for i in range(n):
        teacher.append(int(np.argmax(row)))
        tmarg.append(_margin(row))
        if i + 1 < n:
            row = _decode_one(ctx, ref[i], p0 + i)
            rows.append(row)
    part = next((i for i in range(n) if teacher[i] != ref[i]), n)
    ids, margins = teacher[:part], tmarg[:part]
    if part < n:
        row = rows[part]
        for i in range(part, n):
            ids.append(int(np.argmax(row)))
            margins.append(_margin(row))
            if i + 1 < n:
                row = _decode_one(ctx, ids[-1], p0 + i)
    return Run(ids, margins, teacher, tmarg, first)


@pytest.fixture(scope="module")
def runs(real_model) -> dict[str, Run]:
    pair = PairFactory(NumpyBackend(n_threads=1)).load(PairRequest(
        name="reference", target_path=real_model, params=ContextParams(n_ctx=256),
        speculative=SpeculativeConfig(type="none")))
    try:
        return {name: _run_case(pair.target.context, case) for name, case in CASES.items()}
    finally:
        pair.release()


@dataclass
class ExactRun:
    ids: list[int]  # free-running greedy tokens
    top5_diff: list[float]  # per step, max |ours - llama.cpp's| over llama.cpp's recorded top 5
    first_diff: float  # first step, max |ours - llama.cpp's| over its recorded top 32


def _free_run(ctx, case: dict) -> ExactRun:
    prompt, n = case["prompt_ids"], len(case["llama_ids"])
    row = ctx.decode(Batch.make(prompt, range(len(prompt)), [0] * len(prompt), [len(prompt) - 1]))[0]
    first = max(abs(float(row[i]) - v) for i, v in case["first_step_top"])
    ids, diffs = [], []
    for i in range(n):
        ids.append(int(np.argmax(row)))
        diffs.append(max(abs(float(row[t]) - v) for t, v in case["llama_top5"][i]))
        if i + 1 < n:
            row = _decode_one(ctx, ids[-1], len(prompt) + i)
    return ExactRun(ids, diffs, first)


@pytest.fixture(scope="module")
def exact_runs(real_model) -> dict[str, ExactRun]:
    pair = PairFactory(GgmlCpuBackend(n_threads=1)).load(PairRequest(
        name="ggml-rounding", target_path=real_model, params=ContextParams(n_ctx=256, n_batch=64),
        speculative=SpeculativeConfig(type="none")))
    try:
        return {name: _free_run(pair.target.context, case) for name, case in CASES.items()}
    finally:
        pair.release()


@pytest.mark.parametrize("name", list(CASES))
def test_with_llama_cpp_rounding_every_token_and_logit_matches(exact_runs, name):
    """Run 1 of the module docstring: all 48 free-running greedy tokens equal llama.cpp's, and
    every logit the file records (top 32 of the first step, top 5 of each step) equals ours to
    the file's 5 decimals."""
    case, run = CASES[name], exact_runs[name]
    ref = case["llama_ids"]
    agree = next((i for i, (a, b) in enumerate(zip(run.ids, ref)) if a != b), len(ref))
    worst = max(range(len(ref)), key=lambda i: run.top5_diff[i])
    msg = (f"{name}: {agree}/{len(ref)} greedy tokens agree; first-step top-32 max |diff| {run.first_diff:.2e}; "
           f"per-step top-5 max |diff| {run.top5_diff[worst]:.2e} (step {worst})")
    print(msg)
    assert run.ids == ref, msg
    assert run.first_diff <= REF_ROUNDING, msg
    assert max(run.top5_diff) <= REF_ROUNDING, msg


def test_reference_file_is_for_this_model(real_model):
    assert REF["model"] == pathlib.Path(real_model).name
    assert all(len(c["llama_ids"]) == REF["n_gen"] == 48 for c in CASES.values())


@pytest.mark.parametrize("name", _cases_marked())
def test_float32_greedy_tokens_match_llama_cpp(runs, name):
    """Run 2: the first N_MATCH greedy tokens equal llama.cpp's, except the KNOWN_PARTINGS
    near-ties; the agreement count is in the message."""
    case, run = CASES[name], runs[name]
    ref = case["llama_ids"]
    agree = next((i for i, (a, b) in enumerate(zip(run.ids, ref)) if a != b), len(ref))
    same = sum(a == b for a, b in zip(run.ids, ref))
    msg = f"{name}: the first {agree}/{len(ref)} greedy tokens agree with llama.cpp ({same}/{len(ref)} positions equal)"
    if agree < len(ref):
        top = dict(map(tuple, case["llama_top5"][agree]))
        msg += (f"; they part at step {agree}: ours {run.ids[agree]} (our margin {run.margins[agree]:.4f}), "
                f"llama.cpp {ref[agree]} (its margin {case['llama_margins'][agree]:.4f}, its logit for our "
                f"token {top.get(run.ids[agree], 'not in its top 5')})")
    print(msg)
    assert agree >= N_MATCH, msg
    assert run.ids[:N_MATCH] == ref[:N_MATCH], msg


@pytest.mark.parametrize("name", list(CASES))
def test_teacher_forced_disagreements_are_near_ties(runs, name):
    """Given llama.cpp's tokens so far, our argmax equals llama.cpp's next token at nearly every
    step, and where it does not, both sides' top-1 margins are below NEAR_TIE and each side's
    choice is the other's runner-up or close to it."""
    case, run = CASES[name], runs[name]
    ref = case["llama_ids"]
    bad = []
    for i, (ours, theirs) in enumerate(zip(run.teacher, ref)):
        if ours == theirs:
            continue
        top = dict(map(tuple, case["llama_top5"][i]))
        gap = top[theirs] - top[ours] if ours in top else float("inf")
        bad.append((i, ours, theirs, round(case["llama_margins"][i], 4), round(run.teacher_margins[i], 4), gap))
    same = len(ref) - len(bad)
    msg = (f"{name}: {same}/{len(ref)} teacher-forced steps agree; "
           f"(step, ours, llama, llama margin, our margin, llama gap) {bad}")
    print(msg)
    assert same >= N_TEACHER_MIN, msg
    assert all(lm < NEAR_TIE and om < NEAR_TIE and gap < NEAR_TIE for _, _, _, lm, om, gap in bad), msg


@pytest.mark.parametrize("name", list(CASES))
def test_first_step_logits_close_to_reference(runs, name):
    """First-step logits vs llama.cpp's recorded top 32, and the top-1 margins."""
    case, run = CASES[name], runs[name]
    ids = np.array([i for i, _ in case["first_step_top"]])
    theirs = np.array([v for _, v in case["first_step_top"]], dtype=np.float32)
    diff = float(np.abs(run.first[ids] - theirs).max())
    dm = abs(_margin(run.first) - case["llama_margins"][0])
    msg = (f"{name}: max |diff| over llama.cpp's top 32 = {diff:.3f} (tol {TOL_TOP32}); "
           f"margin diff {dm:.3f} (tol {TOL_MARGIN})")
    print(msg)
    assert diff <= TOL_TOP32, msg
    assert dm <= TOL_MARGIN, msg


@pytest.fixture(scope="module")
def llama(real_model):
    llama = llama_cpp_ref.load(real_model, n_ctx=256)
    yield llama
    llama.close()


@pytest.mark.parametrize("name", list(CASES))
def test_first_step_logits_close_to_llama_cpp(runs, llama, name):
    """The whole first-step logits row vs llama.cpp's (Llama.eval + .scores)."""
    case, run = CASES[name], runs[name]
    prompt = case["prompt_ids"]
    theirs = llama.logits(prompt)
    recorded = dict(map(tuple, case["first_step_top"]))
    assert max(abs(theirs[i] - v) for i, v in recorded.items()) < 1e-3, "llama_reference.json is stale: regenerate it"
    diff = float(np.abs(run.first - theirs).max())
    corr = float(np.corrcoef(run.first, theirs)[0, 1])
    dm = abs(_margin(run.first) - _margin(theirs))
    msg = (f"{name}: max |diff| {diff:.3f} (tol {TOL_FULL}), correlation {corr:.5f} (min {MIN_CORR}), "
           f"margin ours {_margin(run.first):.4f} llama.cpp {_margin(theirs):.4f} (tol {TOL_MARGIN})")
    print(msg)
    assert diff <= TOL_FULL, msg
    assert corr >= MIN_CORR, msg
    assert dm <= TOL_MARGIN, msg
