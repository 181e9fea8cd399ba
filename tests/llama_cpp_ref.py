"""llama.cpp (llama-cpp-python) as the reference the tests compare with, and the tolerances they share.

scripts/setup.sh builds llama-cpp-python for this CPU, so a missing one fails the tests that need
it (saying how to install it); it never skips them.

Tolerances between our float32 graph and llama.cpp (tests/test_reference.py measured them on
SmolLM2 with the NumPy backend; its docstring says why they are what they are: llama.cpp rounds
activations to 8 bits before every quantised dot product, we do not):
"""

from __future__ import annotations

import numpy as np
import pytest

TOL_TOP32 = 2.0  # max |logit difference| over llama.cpp's 32 largest logits (measured max 1.68)
TOL_FULL = 2.5  # max |logit difference| over the whole vocabulary (measured max 2.32)
TOL_MARGIN = 0.6  # |our top-1 margin - llama.cpp's| (measured max 0.56)
MIN_CORR = 0.995  # correlation of the logits rows (measured min 0.9965)
NEAR_TIE = TOL_MARGIN  # a greedy step whose llama.cpp top-1 margin is below this can flip


def llama_cpp():
    """The llama_cpp module; a test that needs it fails, naming the fix, when it is missing."""
    try:
        import llama_cpp as module
    except ImportError as exc:
        pytest.fail(f"llama-cpp-python is not installed ({exc}): scripts/setup.sh (make setup) builds it",
                    pytrace=False)
    return module


def load(path, n_ctx: int = 256, n_threads: int = 1, **kwargs):
    """llama.cpp on one GGUF file, every row's logits kept (Llama.eval + Llama.scores). Its rows are split
    between threads whole, so the thread count does not change a logit."""
    return llama_cpp().Llama(model_path=str(path), n_ctx=n_ctx, n_threads=n_threads, logits_all=True,
                             verbose=False, **kwargs)


def logits(llama, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits row after ``ids`` (evaluated from an empty cache in one call)."""
    llama.reset()
    llama.eval(ids)
    return np.array(llama.scores[len(ids) - 1], dtype=np.float32)


def greedy(llama, prompt: list[int], n: int) -> tuple[list[int], list[float], list[np.ndarray]]:
    """llama.cpp's greedy tokens: the prompt in one call, then one token per call; argmax of each row.
    Returns (tokens, top-1 margin at each step, the logits row of each step)."""
    llama.reset()
    llama.eval(prompt)
    row = np.array(llama.scores[len(prompt) - 1], dtype=np.float32)
    ids, margins, rows = [], [], []
    for i in range(n):
        ids.append(int(np.argmax(row)))
        margins.append(margin(row))
        rows.append(row)
        if i + 1 < n:
            llama.eval([ids[-1]])
            row = np.array(llama.scores[len(prompt) + i], dtype=np.float32)
    return ids, margins, rows


def margin(row: np.ndarray) -> float:
    """Top-1 minus top-2 logit."""
    a, b = np.partition(row, -2)[-2:]
    return float(b - a)
