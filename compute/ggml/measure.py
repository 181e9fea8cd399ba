"""Fit's measurement of the ggml backend's compute buffer: the worst-case pass of a model, recorded over
placeholders (no weight, cache or activation exists yet) and sized by ggml's own allocator.

The worst case is a prompt chunk of n_batch rows asking for min(n_outputs_max, n_batch) logits rows:
every activation of the graph grows with the rows, none with the contexts' cells (the KV caches and
the logits are planned buffers outside the graph). Load reserves exactly the bytes measured here
(compute/ggml/backend.py `GgmlScratch`), and every pass is later placed inside them.
"""

from __future__ import annotations

import ctypes

import numpy as np

from compute.backend import Allocation
from compute.ggml.graph import FAKE_PTR, Placeholder, Recorder, WeightHandle
from compute.llama import Batch, LlamaContext, LlamaWeights


def measure_pass(be, model, n_batch: int, n_outputs_max: int) -> tuple[int, int]:
    """(graph bytes, work bytes) of the worst-case pass of `model` (a ModelFile: hparams and tensor types)."""
    from compute.ggml.backend import GgmlScratch

    hp = model.hparams
    handles = {}
    for name, t in model.tensors.items():
        ne = tuple(reversed(t.shape))
        handles[name] = WeightHandle(None, int(t.ggml_type), ne, tiled=be.tiled(t.ggml_type, ne))
    f32 = np.dtype(np.float32)
    # a local layers' cache with other cells per slot than the global one: its own cells input, as in a real pass
    cache, vcache = ({name: Placeholder((n, 1, 1 + (name == "cache_swa"), hp.n_embd_kv), f32, (i + 1) * FAKE_PTR)
                      for name, (n, i) in _cache_layers(hp, base).items()} for base in (0, 3))
    logits = {"logits": Placeholder((n_outputs_max, hp.n_vocab), f32, 7 * FAKE_PTR)}
    held = lambda a: Allocation(None, 0, a)  # noqa: E731 - the context only reads .array
    ctx = LlamaContext(be, LlamaWeights(hp, handles), held(cache), held(vcache), held(logits),
                       held(GgmlScratch(be.libs, 0, None)), n_slots=1, n_ctx_slot=1, n_batch=n_batch,
                       n_outputs_max=n_outputs_max)
    zeros = np.zeros(n_batch, np.int32)
    batch = Batch.make(zeros, zeros, zeros, np.arange(min(n_outputs_max, n_batch)))
    g = be.libs.ggml
    r = Recorder(be.libs)
    try:
        with be.forward(ctx.s), be.recording(r):
            ctx._graph(batch, ctx._rope_tables(batch.positions))
        gf = r.build()
        galloc = g.ggml_gallocr_new(be.libs.cpu_buffer_type())
        try:
            sizes = (ctypes.c_size_t * 1)()
            g.ggml_gallocr_reserve_n_size(galloc, gf, None, None, sizes)
        finally:
            g.ggml_gallocr_free(galloc)
        cplan = g.ggml_graph_plan(gf, be.n_threads, be.threadpool)
        return int(sizes[0]), int(cplan.work_size)
    finally:
        r.close()


def _cache_layers(hp, base: int) -> dict[str, tuple[int, int]]:
    """The K (base 0) or V (base 3) cache arrays of compute/llama.py `kv_layout`: name -> (layers, index
    of its fake address), every placeholder at its own address."""
    n_local = sum(hp.is_swa(i) for i in range(hp.n_layer))
    out = {"cache": (hp.n_layer - n_local, base)}
    if n_local:
        out["cache_swa"] = (n_local, base + 1)
    return out
