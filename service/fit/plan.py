"""The memory plan: a pure function of GGUF metadata, derived params and the backend's sizes.

`plan_pair` lists every buffer the pair will own (weights tensor by tensor, K and V caches,
logits outputs, compute scratch, and the pair's caches: the prompt store and the n-gram index)
with the layout the loader will carve it into. The loader
allocates exactly these items; it never computes a size of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

from compute.backend import Backend, BufferSpec, Owner
from compute.gguf_model import ModelFile
from compute.llama import Layout, kv_layout, layout_nbytes, outputs_layout
from service.fit.cache_layout import kv_token_bytes, ngram_layout, store_blocks, store_layout
from service.fit.params import ContextParams, PairParams


@dataclass(frozen=True)
class PlannedBuffer:
    """A buffer to allocate: its spec (what the ledger will record) and its array layout."""

    spec: BufferSpec
    layout: tuple | None  # ((name, (shape, dtype)), ...) for kv/outputs/compute; None for weights

    def layout_dict(self) -> Layout | None:
        return dict(self.layout) if self.layout is not None else None


@dataclass(frozen=True)
class Plan:
    """A pair's itemised memory plan and the params it was made from."""

    buffers: tuple[PlannedBuffer, ...]
    params: PairParams
    budget_bytes: int  # device bytes available to this pair when it was planned (0: unknown)

    @property
    def total_bytes(self) -> int:
        return sum(b.spec.nbytes for b in self.buffers)

    def device_bytes(self, device: str = "device") -> int:
        return sum(b.spec.nbytes for b in self.buffers if b.spec.device == device)

    def specs(self, owner: Owner | None = None) -> list[BufferSpec]:
        return [b.spec for b in self.buffers if owner is None or b.spec.owner == owner]

    def summary(self) -> dict[tuple[str, str], int]:
        """Bytes by (owner, kind)."""
        out: dict[tuple[str, str], int] = {}
        for b in self.buffers:
            key = (b.spec.owner, b.spec.kind)
            out[key] = out.get(key, 0) + b.spec.nbytes
        return out


def _layer_of(name: str) -> int | None:
    return int(name.split(".")[1]) if name.startswith("blk.") else None


def _context_buffers(owner: Owner, mf: ModelFile, cp: ContextParams, backend: Backend) -> list[PlannedBuffer]:
    hp = mf.hparams
    out: list[PlannedBuffer] = []
    n_dev = hp.n_layer if cp.n_gpu_layers < 0 else min(cp.n_gpu_layers, hp.n_layer)
    for name, t in mf.tensors.items():
        layer = _layer_of(name)
        device = "host" if layer is not None and layer >= n_dev else "device"
        nbytes = backend.weight_nbytes(t.ggml_type, t.shape)
        out.append(PlannedBuffer(BufferSpec(owner, "weights", name, device, nbytes), None))
    kv_dev = "device" if n_dev == hp.n_layer else "host"
    for tag in ("k", "v"):
        lay = kv_layout(hp, cp.n_parallel, cp.n_ctx_slot, cp.kv_type, cp.n_batch)
        out.append(PlannedBuffer(BufferSpec(owner, "kv_cache", tag, kv_dev, layout_nbytes(lay)), tuple(lay.items())))
    lay = outputs_layout(hp, cp.n_outputs_max)
    out.append(PlannedBuffer(BufferSpec(owner, "outputs", "logits", "device", layout_nbytes(lay)), tuple(lay.items())))
    lay = backend.compute_layout(mf, cp.n_batch, cp.n_outputs_max)
    out.append(PlannedBuffer(BufferSpec(owner, "compute", "scratch", "device", layout_nbytes(lay)), tuple(lay.items())))
    return out


def _cache_buffers(target: ModelFile, draft: ModelFile | None, params: PairParams,
                   backend: Backend) -> list[PlannedBuffer]:
    """The pair's caches, sized by the target's params: the prompt store (whole blocks of target and
    draft cells within prompt_cache_bytes; none if not one block fits) and the n-gram index. Where the
    backend's device has a separate host memory they live there, else in the device's (Fit counts them)."""
    tp, out = params.target, []
    models = [("target", target.hparams)]
    if draft is not None and params.draft is not None:
        models.append(("draft", draft.hparams))
    place = backend.cache_placement()
    n_blocks = store_blocks(tp.prompt_cache_bytes, sum(kv_token_bytes(hp, tp.kv_type) for _, hp in models))
    if n_blocks:
        for owner, hp in models:
            lay = store_layout(hp, n_blocks, tp.kv_type)
            out.append(PlannedBuffer(BufferSpec(owner, "prompt_cache", "store", place, layout_nbytes(lay)),
                                     tuple(lay.items())))
    if tp.ngram_cache_tokens:
        lay = ngram_layout(tp.ngram_cache_tokens)
        out.append(PlannedBuffer(BufferSpec("target", "ngram_cache", "ring", place, layout_nbytes(lay)),
                                 tuple(lay.items())))
    return out


def plan_pair(target: ModelFile, draft: ModelFile | None, params: PairParams, backend: Backend,
              budget_bytes: int = 0) -> Plan:
    """Every buffer of a pair, target first, then draft, each model's part of the pair's caches after its
    context (the order Load allocates them in). Pure: reads metadata only."""
    caches = _cache_buffers(target, draft, params, backend)
    buffers = _context_buffers("target", target, params.target, backend)
    buffers += [b for b in caches if b.spec.owner == "target"]
    if draft is not None and params.draft is not None:
        buffers += _context_buffers("draft", draft, params.draft, backend)
        buffers += [b for b in caches if b.spec.owner == "draft"]
    return Plan(tuple(buffers), params, budget_bytes)
