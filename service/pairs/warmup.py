"""Warm-up: a new pair runs the exact path requests take before it is SERVING.

"Ready" must mean "able to generate": a backend can pass its probe and still fail on one
of the kernels a model needs (a weight type, a head size, a batch-size tile). So before a
pair is marked ready, `warm_up`:

1. decodes, on every context of the pair (target and draft), one batch of each row count
   the scheduler sends (1 row: a decode step; 2, 4, 8 and the verify size 1 + n_max: the
   matrix kernel's tile builds; n_batch: a prefill chunk), so every kernel is built and run,
   and checks the logits are finite;
2. times decode calls of 1, 2, ... 1 + n_max rows on the target (the fastest of ROW_COST_REPS each)
   and gives the engine that measured row-cost curve for its draft-length policy, so the
   draft length adapts to the machine it runs on (service/engine/spec/policy.py: MeasuredRowCost);
3. generates two tokens through the engine (queue, scheduler, drafting, verification,
   sampling, detokenising), as a request would.

Any failure becomes one line: the pair is not served (Load gets FAILED_PRECONDITION).
"""

from __future__ import annotations

import logging
import time

import numpy as np

from compute.llama import Batch, LlamaContext
from service.engine.request import GenRequest, SamplingParams
from service.engine.spec.policy import MeasuredRowCost

log = logging.getLogger("specserve.warmup")

WARMUP_TIMEOUT = 600.0  # seconds for the engine request (cold kernel builds on a slow CPU)
ROW_COST_REPS = 3  # timed calls per row count; the fastest is kept (noise only adds time)


class WarmupError(RuntimeError):
    """The pair could not run the path requests take; the message is the first line of the cause."""


def batch_sizes(ctx: LlamaContext, verify_rows: int) -> list[int]:
    """Row counts of the decode calls the scheduler makes on this context, within its limits."""
    limit = min(ctx.n_batch, ctx.n_ctx_slot)
    return sorted({n for n in (1, 2, 4, 8, verify_rows, ctx.n_batch) if 1 <= n <= limit})


def _batch(ctx: LlamaContext, n: int) -> Batch:
    """n rows of slot 0 from position 0, logits for the last min(n, n_outputs_max) rows."""
    n_out = min(n, ctx.n_outputs_max)
    return Batch.make(np.arange(n) % ctx.hp.n_vocab, np.arange(n), np.zeros(n), np.arange(n - n_out, n))


def measure_row_cost(ctx: LlamaContext, max_rows: int, reps: int = ROW_COST_REPS) -> MeasuredRowCost:
    """The fastest of `reps` timed decode calls of 1..max_rows rows each (kernels already built). The
    reps go round the row counts (1, 2, ..., max_rows, then again), so a disturbance that lasts a moment
    (another thread starting, the CPU's clock settling after the warm-up's big batch) lands on a few
    calls of different sizes, never on every call of one size. The one-row time matters most: every cost
    is relative to it, and a high one makes drafting look cheaper than it is."""
    limit = max(min(max_rows, ctx.n_batch, ctx.n_ctx_slot, ctx.n_outputs_max), 1)
    seconds = [float("inf")] * limit
    for _ in range(reps):
        for n in range(1, limit + 1):
            t0 = time.perf_counter()
            ctx.decode(_batch(ctx, n))
            seconds[n - 1] = min(seconds[n - 1], time.perf_counter() - t0)
    return MeasuredRowCost(tuple(seconds))


def warm_context(ctx: LlamaContext, verify_rows: int) -> None:
    """Decode one batch of each size in slot 0 from position 0 (the cells are overwritten later:
    a request's own positions start at 0 and attention reads only up to its position)."""
    for n in batch_sizes(ctx, verify_rows):
        n_out = min(n, ctx.n_outputs_max)
        logits = ctx.decode(_batch(ctx, n))
        if logits.shape != (n_out, ctx.hp.n_vocab) or not np.isfinite(logits).all():
            raise WarmupError(f"a decode of {n} rows gave {'non-finite' if logits.size else 'no'} logits")


def warm_up(pair, engine, tokenizer) -> float:
    """Run the pair's kernels, measure its row costs (set on `engine`) and run one request through
    `engine`; returns the seconds it took."""
    t0 = time.monotonic()
    verify_rows = 1 + engine.max_n_max
    try:
        warm_context(pair.target.context, verify_rows)
        if pair.draft is not None:
            warm_context(pair.draft.context, verify_rows)
        if verify_rows > 1:
            engine.row_cost = measure_row_cost(pair.target.context, verify_rows)
        prompt = tuple(tokenizer.encode("Hello, world. Hello, world.", add_special=True))
        stream = engine.submit(GenRequest(prompt, max_tokens=2, sampling=SamplingParams(temperature=0.0),
                                          cache_prompt=False))  # leaves nothing in the prompt cache
        result = stream.result(timeout=WARMUP_TIMEOUT)
        if result.completion_tokens < 1:
            raise WarmupError(f"the warm-up request generated nothing (finish reason {result.finish_reason})")
    except WarmupError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure means: not able to serve
        line = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
        raise WarmupError(f"{type(e).__name__}: {line}"[:400]) from e
    return time.monotonic() - t0
