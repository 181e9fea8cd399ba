"""The llama-family forward pass, written once against the Backend interface.

A context holds a KV cache of `n_slots` sequences (slots) of `n_ctx_slot` cells each, an
outputs buffer of `n_outputs_max` logits rows and a compute scratch sized for `n_batch`
rows. `LlamaContext.decode(batch)` runs one forward pass over a batch of tokens from any
slots and returns the logits of the rows the batch asked for. The sizes of all three come
from the layout functions below, which the planner uses too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from compute.backend import DTYPES, KV_TYPES, Allocation, Backend, DType, KvType, Proj
from compute.gguf_model import HParams

Layout = dict[str, tuple[tuple[int, ...], DType]]  # name -> (shape, dtype name)
REPLAY_MAX_PASSES = 32  # recorded shapes kept per context (each holds ~10 kernel objects per layer)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def layout_nbytes(layout: Layout) -> int:
    """Bytes of a layout: each array's element count times its element size."""
    return sum(int(np.prod(shape)) * DTYPES[dt].itemsize for shape, dt in layout.values())


def swa_cells(hp: HParams, n_ctx_slot: int, n_batch: int) -> int:
    """Cells per slot of a sliding-window layer: a ring of window + n_batch cells (at most n_ctx_slot).

    A pass writes all its rows' cells before any row attends, and a slot's rows of one pass (at most
    n_batch, a prefill chunk or a verify batch of k) sit at positions s..s+k-1; cell p % R then holds
    position p. Row s still needs positions from s - window + 1, which the batch's own writes overwrite
    only if R < window + k - 1; and after a rejected draft is rolled back to length a >= s, every later
    row needs positions >= a - window + 1, past the ones the drafts overwrote (s + k - 1 - R)."""
    return min(n_ctx_slot, hp.n_swa + n_batch) if hp.n_swa else n_ctx_slot


def kv_layout(hp: HParams, n_slots: int, n_ctx_slot: int, kv_type: KvType, n_batch: int) -> Layout:
    """One of the K or V caches: the global layers' "cache" (n_global, n_slots, n_ctx_slot, n_embd_kv) and,
    for a model with sliding-window layers, their "cache_swa" (n_local, n_slots, swa_cells, n_embd_kv)."""
    assert kv_type in KV_TYPES
    n_local = sum(hp.is_swa(i) for i in range(hp.n_layer))
    lay: Layout = {"cache": ((hp.n_layer - n_local, n_slots, n_ctx_slot, hp.n_embd_kv), kv_type)}
    if n_local:
        lay["cache_swa"] = ((n_local, n_slots, swa_cells(hp, n_ctx_slot, n_batch), hp.n_embd_kv), kv_type)
    return lay


def outputs_layout(hp: HParams, n_outputs_max: int) -> Layout:
    """The logits rows a decode call can return: (n_outputs_max, n_vocab) f32."""
    return {"logits": ((n_outputs_max, hp.n_vocab), "f32")}


def scratch_layout(hp: HParams, n_batch: int, n_outputs_max: int, row_multiple: int,
                   params: Layout | None = None) -> Layout:
    """Activations of one forward pass over up to n_batch tokens (rows rounded up to row_multiple).

    `params`: the backend's device copies of the per-call host parameters
    (`Backend.param_layout`); they come first, at the start of the buffer."""
    r = _round_up(n_batch, row_multiple)
    ro = _round_up(n_outputs_max, row_multiple)
    acts: Layout = {
        "x": ((r, hp.n_embd), "f32"),  # residual stream
        "xn": ((r, hp.n_embd), "f32"),  # normalised input of attention / ffn
        "q": ((r, hp.n_embd_q), "f32"),
        "k": ((r, hp.n_embd_kv), "f32"),
        "v": ((r, hp.n_embd_kv), "f32"),
        "attn": ((r, hp.n_embd_q), "f32"),  # attention output before attn_output
        "o": ((r, hp.n_embd), "f32"),  # attn_output / ffn_down result
        "gate": ((r, hp.n_ff), "f32"),
        "up": ((r, hp.n_ff), "f32"),
        "sel": ((ro, hp.n_embd), "f32"),  # rows whose logits are wanted
        "seln": ((ro, hp.n_embd), "f32"),
    }
    if row_multiple > 1:  # the tile a padded matmul computes when a batch is not a multiple
        acts["pad_in"] = ((row_multiple, max(hp.n_embd, hp.n_ff, hp.n_embd_q)), "f32")
        acts["pad_out"] = ((row_multiple, max(hp.n_ff, hp.n_vocab, hp.n_embd_q)), "f32")
    params = dict(params or {})
    assert not params.keys() & acts.keys(), f"param arrays named like activations: {params.keys() & acts.keys()}"
    return params | acts


@dataclass(frozen=True)
class Batch:
    """Tokens of one forward pass. All arrays have one entry per row except `outputs`."""

    tokens: np.ndarray  # (n,) int32 token ids
    positions: np.ndarray  # (n,) int32 position of each token in its slot
    slots: np.ndarray  # (n,) int32 slot (sequence) of each token
    outputs: np.ndarray  # (n_out,) int32 rows whose logits are returned, in this order

    @staticmethod
    def make(tokens, positions, slots, outputs) -> "Batch":
        as32 = lambda a: np.ascontiguousarray(np.asarray(a, dtype=np.int32).reshape(-1))  # noqa: E731
        return Batch(as32(tokens), as32(positions), as32(slots), as32(outputs))

    def __len__(self) -> int:
        return len(self.tokens)


class LlamaWeights:
    """Backend weight handles by GGUF tensor name (attribute names are the GGUF names)."""

    def __init__(self, hp: HParams, handles: dict):
        self.hp = hp
        self.t = handles

    def head(self):
        return self.t["token_embd.weight"] if self.hp.tied_output else self.t["output.weight"]


class LlamaContext:
    """A model's per-context state (KV cache, outputs, scratch) and the forward pass over it."""

    def __init__(self, backend: Backend, weights: LlamaWeights, k: Allocation, v: Allocation,
                 outputs: Allocation, scratch: Allocation, n_slots: int, n_ctx_slot: int, n_batch: int,
                 n_outputs_max: int):
        self.backend = backend
        self.w = weights
        self.hp = weights.hp
        self.k, self.v = k.array["cache"], v.array["cache"]
        self.k_swa, self.v_swa = k.array.get("cache_swa"), v.array.get("cache_swa")  # None: no local layers
        self.layers = self._layer_caches()  # per layer: (K cache, V cache, the layer's index in them)
        # the position each ring cell of a local layer holds, per slot (-1: none yet); the same for every local layer
        self.ring = None if self.k_swa is None else np.full((n_slots, self.k_swa.shape[2]), -1, np.int64)
        self.logits = outputs.array["logits"]
        self.s = scratch.array
        self.pad = (self.s["pad_in"], self.s["pad_out"]) if "pad_in" in self.s else None
        self.n_slots, self.n_ctx_slot = n_slots, n_ctx_slot
        self.n_batch, self.n_outputs_max = n_batch, n_outputs_max
        self._passes: dict[tuple[int, int], object] = {}  # (rows, outputs) -> the backend's recorded pass

    def _layer_caches(self) -> list[tuple[object, object, int]]:
        """Layer i's K and V caches and its index there: local layers in cache_swa, the others in cache,
        each in layer order. A cache's cell for position p is p % its cells per slot (identity for cache)."""
        out, n_glob, n_loc = [], 0, 0
        for i in range(self.hp.n_layer):
            if self.hp.is_swa(i):
                out.append((self.k_swa, self.v_swa, n_loc))
                n_loc += 1
            else:
                out.append((self.k, self.v, n_glob))
                n_glob += 1
        return out

    def window_intact(self, slot: int, n: int) -> bool:
        """Whether a slot's first n positions can be continued: every local layer's ring still holds the
        positions a row at position >= n reads (the last window - 1 before n; a later pass writes the rest)."""
        if self.ring is None or n == 0:
            return True
        R = self.ring.shape[1]
        want = np.arange(max(0, n - self.hp.n_swa + 1), n)
        return bool(np.all(self.ring[slot, want % R] == want))

    def check(self, batch: Batch) -> None:
        """Internal invariants of a batch; the scheduler never builds one that fails these."""
        n = len(batch)
        assert 0 < n <= self.n_batch, f"batch of {n} rows, n_batch {self.n_batch}"
        assert len(batch.outputs) <= self.n_outputs_max, f"{len(batch.outputs)} outputs > {self.n_outputs_max}"
        assert batch.slots.min() >= 0 and batch.slots.max() < self.n_slots
        assert batch.positions.min() >= 0 and batch.positions.max() < self.n_ctx_slot

    def decode(self, batch: Batch) -> np.ndarray:
        """Run the model over the batch; return logits (n_out, n_vocab) of `batch.outputs` rows."""
        self.check(batch)
        if self.ring is not None:  # the rows' cells are written first thing in the pass
            self.ring[batch.slots, batch.positions % self.ring.shape[1]] = batch.positions
        with self.backend.forward(self.s):  # the per-call parameters go to this scratch
            return self._decode(batch)

    def _decode(self, batch: Batch) -> np.ndarray:
        """The pass over a batch: replayed when a batch of this shape was recorded before
        (Backend.record_pass; up to `replay_max_rows` rows: the decode and verify steps), else run op by op."""
        be, hp = self.backend, self.hp
        n, n_out = len(batch), len(batch.outputs)
        rope = self._rope_tables(batch.positions)
        graph = self._passes.get((n, n_out))
        if graph is not None:
            be.replay_pass(graph, {"tokens": batch.tokens, "positions": batch.positions, "slots": batch.slots,
                                   "outputs": batch.outputs, **rope})
        elif n <= be.replay_max_rows:
            with be.record_pass() as rec:
                self._graph(batch, rope)
            if rec.graph is not None:
                if len(self._passes) >= REPLAY_MAX_PASSES:  # bounded: drop the oldest recording
                    del self._passes[next(iter(self._passes))]
                self._passes[(n, n_out)] = rec.graph
        else:
            self._graph(batch, rope)
        if n_out == 0:
            return np.zeros((0, hp.n_vocab), np.float32)
        return be.to_host(self.logits[:n_out], n_out)

    def _rope_tables(self, positions: np.ndarray) -> dict[str, np.ndarray]:
        """cos, sin (n, rope_dim/2) of the global layers' base and scale; with a sliding window also
        cos_swa, sin_swa of the local layers' base (unscaled, as llama.cpp's rope_freq_scale_train_swa)."""
        be, hp = self.backend, self.hp
        cos, sin = be.rope_tables(positions, hp.rope_dim, hp.rope_base, hp.rope_scale)
        tables = {"cos": cos, "sin": sin}
        if hp.n_swa:
            tables["cos_swa"], tables["sin_swa"] = be.rope_tables(positions, hp.rope_dim, hp.rope_base_swa, 1.0)
        return tables

    def _graph(self, batch: Batch, rope: dict[str, np.ndarray]) -> None:
        """Enqueue the forward pass op by op; the logits of `batch.outputs` land in self.logits."""
        be, hp, t, s = self.backend, self.hp, self.w.t, self.s
        n, eps = len(batch), hp.rms_eps
        x, xn, q, k, v = s["x"][:n], s["xn"][:n], s["q"][:n], s["k"][:n], s["v"][:n]  # (n, n_embd), (n, n_embd_q|kv)
        attn, o, gate, up = s["attn"][:n], s["o"][:n], s["gate"][:n], s["up"][:n]  # (n, n_embd_q|n_embd|n_ff)
        be.embed(t["token_embd.weight"], batch.tokens, x)
        if hp.gemma:
            be.scale(x, float(np.float32(np.sqrt(hp.n_embd))), x)  # gemma: embeddings * sqrt(n_embd)
        be.rms_norm(x, t["blk.0.attn_norm.weight"], eps, xn)  # later layers: fused with the residual add
        for i in range(hp.n_layer):
            p, swa = f"blk.{i}.", hp.is_swa(i)
            tab = "_swa" if swa else ""
            # attention: xn -> q, k, v [-> per-head norms] -> RoPE -> KV cache -> attn -> o [-> norm]; x += o
            be.matmuls(xn, [Proj(t[p + "attn_q.weight"], q, t.get(p + "attn_q.bias")),
                            Proj(t[p + "attn_k.weight"], k, t.get(p + "attn_k.bias")),
                            Proj(t[p + "attn_v.weight"], v, t.get(p + "attn_v.bias"))], pad=self.pad)
            if hp.qk_norm:
                be.head_rms_norm(q, t[p + "attn_q_norm.weight"], hp.n_head, hp.head_dim, eps, q)
                be.head_rms_norm(k, t[p + "attn_k_norm.weight"], hp.n_head_kv, hp.head_dim, eps, k)
            kc, vc, j = self.layers[i]
            be.rope_kv_store(q, k, v, rope["cos" + tab], rope["sin" + tab], hp.n_head, hp.n_head_kv, hp.head_dim,
                             hp.rope_dim, hp.rope_neox, kc, vc, j, batch.slots, batch.positions, tables=tab)
            be.attention(kc, vc, j, q, batch.slots, batch.positions, hp.n_head, hp.n_head_kv,
                         hp.head_dim, attn, scale=hp.attn_scale, window=hp.n_swa if swa else 0)
            be.matmul(attn, t[p + "attn_output.weight"], o, pad=self.pad)
            if hp.gemma:
                be.rms_norm(o, t[p + "post_attention_norm.weight"], eps, o)
            be.add_rms_norm(x, o, x, t[p + "ffn_norm.weight"], eps, xn)
            # feed-forward: xn -> gate, up -> act(gate) * up -> o [-> norm]; x += o (and the next layer's norm)
            be.matmuls(xn, [Proj(t[p + "ffn_gate.weight"], gate), Proj(t[p + "ffn_up.weight"], up)], pad=self.pad)
            (be.geglu if hp.ffn_act == "gelu" else be.swiglu)(gate, up, gate)
            be.matmul(gate, t[p + "ffn_down.weight"], o, pad=self.pad)
            if hp.gemma:
                be.rms_norm(o, t[p + "post_ffw_norm.weight"], eps, o)
            if i + 1 < hp.n_layer:
                be.add_rms_norm(x, o, x, t[f"blk.{i + 1}.attn_norm.weight"], eps, xn)
            else:
                be.add(x, o, x)
        n_out = len(batch.outputs)
        if n_out == 0:
            return
        sel, seln = s["sel"][:n_out], s["seln"][:n_out]  # (n_out, n_embd)
        be.gather_rows(x, batch.outputs, sel)
        be.rms_norm(sel, t["output_norm.weight"], eps, seln)
        be.matmul(seln, self.w.head(), self.logits[:n_out], pad=self.pad)  # (n_out, n_vocab)

    def copy_cells(self, src_slot: int, dst_slot: int, n: int) -> None:
        """Copy the KV cells of one slot's first n positions into another (every layer, K and V); a local
        layer's ring is copied whole, and the source must still hold its window (window_intact)."""
        assert 0 <= src_slot < self.n_slots and 0 <= dst_slot < self.n_slots and 0 <= n <= self.n_ctx_slot
        if self.k.shape[0]:
            self.backend.kv_copy(self.k, self.v, src_slot, dst_slot, n)
        if self.ring is not None:
            assert self.window_intact(src_slot, n), f"slot {src_slot} no longer holds the window before {n}"
            self.backend.kv_copy(self.k_swa, self.v_swa, src_slot, dst_slot, min(n, self.ring.shape[1]))
            self.ring[dst_slot] = np.where(self.ring[src_slot] < n, self.ring[src_slot], -1)

    def read_kv(self, layer: int, slot: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """K, V float32 of a slot's first n positions: (n, n_embd_kv); for a local layer only the positions
        its ring holds of those, the last min(n, cells) in position order."""
        kc, vc, j = self.layers[layer]
        if kc is self.k:
            return self.backend.kv_read(kc, vc, j, slot, n)
        R = kc.shape[2]
        k, v = self.backend.kv_read(kc, vc, j, slot, min(n, R))
        order = np.arange(max(0, n - R), n) % R
        return k[order], v[order]
