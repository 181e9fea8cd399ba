"""llama.cpp (llama-cpp-python) as the reference the tests compare with, and the tolerances they share.

scripts/setup.sh builds llama-cpp-python for this CPU, so a missing one fails the tests that need
it (saying how to install it); it never skips them. llama.cpp runs in a child process (Llama).

Tolerances between our float32 graph and llama.cpp (tests/test_reference.py measured them on
SmolLM2 with the NumPy backend; its docstring says why they are what they are: llama.cpp rounds
activations to 8 bits before every quantised dot product, we do not):
"""

from __future__ import annotations

import importlib.util
import multiprocessing

import numpy as np
import pytest

TOL_TOP32 = 2.0  # max |logit difference| over llama.cpp's 32 largest logits (measured max 1.68)
TOL_FULL = 2.5  # max |logit difference| over the whole vocabulary (measured max 2.32)
TOL_MARGIN = 0.6  # |our top-1 margin - llama.cpp's| (measured max 0.56)
MIN_CORR = 0.995  # correlation of the logits rows (measured min 0.9965)
NEAR_TIE = TOL_MARGIN  # a greedy step whose llama.cpp top-1 margin is below this can flip


class Llama:
    """llama.cpp (llama-cpp-python) on one GGUF file, in a child process of its own.

    Never in the test process: ggml-python (our ggml backend) and llama-cpp-python each load their own
    libggml with RTLD_GLOBAL, so in one process the one loaded second calls the first one's ggml, a
    different version (a segfault, or worse, plausible numbers). Keyword arguments go to
    ``llama_cpp.Llama`` (``vocab_only=True`` for tokenizing only)."""

    def __init__(self, path, **kwargs) -> None:
        if importlib.util.find_spec("llama_cpp") is None:
            pytest.fail("llama-cpp-python is not installed: scripts/setup.sh (make setup) builds it", pytrace=False)
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, str(path), kwargs), daemon=True)
        self._proc.start()
        child.close()
        self._call("ready")

    def _call(self, method: str, *args):
        self._conn.send((method, args))
        try:
            ok, value = self._conn.recv()
        except EOFError:
            raise RuntimeError(f"llama.cpp's process died (exit code {self._proc.join(5) or self._proc.exitcode})")
        if not ok:
            raise RuntimeError(f"llama.cpp: {value}")
        return value

    def tokenize(self, text: str, add_bos: bool, special: bool) -> list[int]:
        """``llama_tokenize``: add_bos is its add_special, special its parse_special."""
        return self._call("tokenize", text, add_bos, special)

    def logits(self, ids: list[int]) -> np.ndarray:
        """The logits row after ``ids``, evaluated from an empty cache in one call."""
        return self._call("logits", ids)

    def greedy(self, prompt: list[int], n: int) -> tuple[list[int], list[float], list[np.ndarray]]:
        """Greedy tokens: the prompt in one call, then one token per call; argmax of each row.
        Returns (tokens, top-1 margin at each step, the logits row of each step)."""
        return self._call("greedy", prompt, n)

    def close(self) -> None:
        if self._proc.is_alive():
            self._conn.send(("close", ()))
            self._proc.join(10)
        self._conn.close()


def load(path, n_ctx: int = 256, n_threads: int = 1, **kwargs) -> Llama:
    """llama.cpp on one GGUF file with every row's logits kept (Llama.eval + Llama.scores). Its rows are split
    between threads whole, so the thread count does not change a logit."""
    return Llama(path, n_ctx=n_ctx, n_threads=n_threads, logits_all=True, **kwargs)


def _serve(conn, path: str, kwargs: dict) -> None:
    """The child process: answers (method, args) with (ok, value) until "close"."""
    try:
        import llama_cpp

        llm = llama_cpp.Llama(model_path=path, verbose=False, **kwargs)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which fails the test with it
        conn.recv()
        conn.send((False, f"cannot load {path}: {exc!r}"))
        return
    methods = {"ready": lambda: True, "tokenize": lambda text, add_bos, special: llm.tokenize(
        text.encode(), add_bos=add_bos, special=special), "logits": lambda ids: _logits(llm, ids),
        "greedy": lambda prompt, n: _greedy(llm, prompt, n)}
    while True:
        method, args = conn.recv()
        if method == "close":
            return
        try:
            conn.send((True, methods[method](*args)))
        except Exception as exc:  # noqa: BLE001 - as above
            conn.send((False, repr(exc)))


def _logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[len(ids) - 1], dtype=np.float32)


def _greedy(llm, prompt: list[int], n: int):
    row = _logits(llm, prompt)
    ids, margins, rows = [], [], []
    for i in range(n):
        ids.append(int(np.argmax(row)))
        margins.append(margin(row))
        rows.append(row)
        if i + 1 < n:
            llm.eval([ids[-1]])
            row = np.array(llm.scores[len(prompt) + i], dtype=np.float32)
    return ids, margins, rows


def margin(row: np.ndarray) -> float:
    """Top-1 minus top-2 logit."""
    a, b = np.partition(row, -2)[-2:]
    return float(b - a)
