"""Shared helpers of the benchmarks: model path, loaders, llama.cpp access, timing, BLAS info.

Every benchmark here measures the things it compares in one process and interleaves their
repetitions (A B C A B C ...), so a machine shared with other jobs slows all of them alike;
it reports medians and ratios of medians.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent  # the scripts put it on sys.path before importing this module

import numpy as np  # noqa: E402

from compute.llama import Batch  # noqa: E402
from service.common.packaged_model import PackagedModelMissing, packaged_model_path  # noqa: E402
from service.fit.factory import PairFactory, PairRequest  # noqa: E402
from service.fit.params import ContextParams, SpeculativeConfig  # noqa: E402

# A plain-English paragraph; prompt_ids(n) tokenizes it (repeated as needed) and keeps n ids.
PROMPT_TEXT = (
    "The lighthouse keeper climbed the narrow stairs every evening at dusk, carrying a lamp, a "
    "notebook and a flask of tea. From the gallery he could see the whole bay: the fishing boats "
    "coming home, the gulls circling the harbour, and the long line of cliffs fading into the mist. "
    "He wrote down the wind, the tide and the colour of the sky, as his father had done before him. ")


def model_path() -> str:
    """The packaged SmolLM2-135M-Instruct GGUF (service/common/packaged_model.py); exit with how to install it."""
    try:
        return packaged_model_path()
    except PackagedModelMissing as e:
        sys.exit(f"no model (pass --model): {e}")


def prompt_ids(model: str, n: int) -> list[int]:
    """n token ids of PROMPT_TEXT (repeated), tokenized with the model's own vocabulary."""
    import gguf

    from service.common.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(gguf.GGUFReader(model))
    ids: list[int] = []
    while len(ids) < n:
        ids += tok.encode(PROMPT_TEXT, add_special=False)
    return ids[:n]


def load_numpy(model: str, row_tile: int, threads: int, n_ctx: int = 256, n_batch: int = 64,
               n_outputs_max: int = 0, name: str = ""):
    """A loaded pair (speculation off) on its own NumpyBackend(row_tile); returns (pair, context)."""
    from compute.numpy_backend import NumpyBackend

    be = NumpyBackend(n_threads=threads, row_tile=row_tile)
    req = PairRequest(name=name or f"numpy-tile{row_tile}", target_path=model,
                      params=ContextParams(n_ctx=n_ctx, n_batch=n_batch, n_outputs_max=n_outputs_max),
                      speculative=SpeculativeConfig(type="none"))
    pair = PairFactory(be).load(req)
    return pair, pair.target.context


def have_llama_cpp() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def load_llama(model: str, threads: int, n_ctx: int = 256, verbose: bool = False, **kw):
    """llama_cpp.Llama on the same GGUF, n_threads = n_threads_batch = threads."""
    import llama_cpp

    return llama_cpp.Llama(model_path=model, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                           logits_all=False, verbose=verbose, **kw)


def llama_last_logits(llm) -> np.ndarray:
    """A view of the logits row of the last token of the last llama eval (logits_all=False)."""
    import llama_cpp

    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(llm.n_vocab(),))


def numpy_prefill(ctx, prompt: list[int]) -> np.ndarray:
    p = len(prompt)
    return ctx.decode(Batch.make(prompt, range(p), [0] * p, [p - 1]))[0]


def numpy_decode_one(ctx, tok: int, pos: int) -> np.ndarray:
    return ctx.decode(Batch.make([tok], [pos], [0], [0]))[0]


def blas_info() -> list[str]:
    """One line per BLAS/OpenMP library loaded in this process (threadpoolctl)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return ["threadpoolctl not installed"]
    out = []
    for i in threadpool_info():
        out.append(f"{i.get('internal_api', '?')} {i.get('version', '?')} ({i.get('user_api')}, "
                   f"{i.get('architecture', '-')}, {i.get('threading_layer', '-')}): num_threads={i.get('num_threads')}"
                   f"  {os.path.basename(i.get('filepath', ''))}")
    return out or ["no BLAS library loaded"]


def machine_line() -> str:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            info = dict(ln.split(":", 1) for ln in f.read().split("\n\n")[0].splitlines() if ":" in ln)
        info = {k.strip(): v.strip() for k, v in info.items()}
        cpu = f"{info.get('model name', '?')} (family {info.get('cpu family', '?')} model {info.get('model', '?')})"
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    return f"{cpu}, {os.cpu_count()} logical CPUs, load average {' '.join(f'{x:.2f}' for x in load)}"


def median(xs) -> float:
    return float(statistics.median(xs))


def now() -> float:
    return time.perf_counter()


@contextlib.contextmanager
def capture_fd2():
    """Redirect file descriptor 2 (C-level stderr, where llama.cpp logs) to a temp file.

    Yields a list that holds the captured text once the block exits."""
    out: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield out
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            out.append(tmp.read().decode("utf-8", "replace"))
