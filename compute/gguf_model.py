"""GGUF model files: hyperparameters and tensor descriptions, read with llama.cpp's `gguf` package.

Everything the rest of specserve knows about a model file comes from `ModelFile`:
`hparams` (the one place metadata becomes model parameters), `tensors` (name, type,
shape, byte size: no tensor data is read) and `reader` (for the tokenizer and for
loading weights, which stay memory-mapped until a backend copies them).
"""

from __future__ import annotations

import math
import os
import re
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Mapping

import gguf
import numpy as np

from compute.gguf_layout import LayoutError, check_layout
from compute.quants import SUPPORTED_TYPES, tensor_nbytes

SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3", "gemma3")
NEOX_ARCHS = ("qwen2", "qwen3", "gemma3")  # llama.cpp's LLAMA_ROPE_TYPE_NEOX among them
GEMMA3_SWA_PATTERN = 6  # llama.cpp: every 6th layer of gemma3 is global, the others sliding-window
GEMMA3_ROPE_BASE_SWA = 10000.0  # llama.cpp's rope_freq_base_train_swa default (the local layers' base)


class ModelFileError(ValueError):
    """A model file that cannot be served: unreadable, malformed, wrong architecture, unsupported tensor type.

    Messages do not name the file: the caller does, in the terms its user knows it by."""


@dataclass(frozen=True)
class HParams:
    """Model hyperparameters; derived values are properties computed here and nowhere else."""

    arch: str
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_ctx_train: int
    rms_eps: float
    rope_base: float
    rope_dim: int
    rope_neox: bool  # True: rotate halves (GPT-NeoX); False: rotate adjacent pairs (llama.cpp "normal")
    # positions are divided by it: the linear scaling factor, times (Llama 3's rope_freqs.weight) a frequency
    # factor per rotated pair, then a tuple (rope_dim/2,)
    rope_scale: float | tuple[float, ...]
    tied_output: bool  # no output.weight: the head reuses token_embd
    qkv_bias: bool  # qwen2: biases on q, k, v
    head_dim: int = 0  # attention.key_length (0: n_embd / n_head)
    qk_norm: bool = False  # qwen3, gemma3: per-head RMS norm of q and k (attn_q_norm, attn_k_norm) before RoPE
    gemma: bool = False  # gemma3: embeddings * sqrt(n_embd), post-norms, GELU(tanh)-gated FFN
    attn_scale: float = 0.0  # the scale of q.k (0: 1/sqrt(head_dim))
    n_swa: int = 0  # sliding window (cells a local layer's row sees, itself included); 0: none
    swa_layers: tuple[bool, ...] = ()  # per layer: True where the layer is local (sliding-window)
    rope_base_swa: float = GEMMA3_ROPE_BASE_SWA  # the local layers' RoPE base

    def __post_init__(self):
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.n_embd // self.n_head)
        if not self.attn_scale:
            object.__setattr__(self, "attn_scale", 1.0 / math.sqrt(self.head_dim))
        if not self.swa_layers:
            object.__setattr__(self, "swa_layers", (False,) * self.n_layer)

    def is_swa(self, layer: int) -> bool:
        """Whether `layer` attends over a sliding window of n_swa cells."""
        return self.n_swa > 0 and self.swa_layers[layer]

    @property
    def ffn_act(self) -> str:
        """The gated FFN's activation: "gelu" (tanh approximation) for gemma3, else "silu"."""
        return "gelu" if self.gemma else "silu"

    @property
    def n_embd_kv(self) -> int:
        return self.n_head_kv * self.head_dim

    @property
    def n_embd_q(self) -> int:
        return self.n_head * self.head_dim


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the file: `shape` is numpy order (rows, cols) = GGUF (ne1, ne0)."""

    name: str
    ggml_type: gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    nbytes: int


def _value(fields: Mapping, key: str):
    """A metadata value (a list for arrays), None when the key is absent."""
    f = fields.get(key)
    if f is None:
        return None
    try:
        return f.contents()
    except Exception as e:  # noqa: BLE001 - a string that is not UTF-8, an odd nested array
        raise ModelFileError(f"GGUF metadata key {key} cannot be read ({e})") from e


def _int(fields: Mapping, key: str, default: int | None = None) -> int:
    """An integer metadata value; absent: `default`, or an error naming the key when there is none."""
    v = _value(fields, key)
    if v is None:
        if default is None:
            raise ModelFileError(f"GGUF metadata key {key} is missing")
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise ModelFileError(f"GGUF metadata key {key} must be an integer, it holds {str(v)[:40]!r}")
    return v


def _float(fields: Mapping, key: str, default: float, zero_is_unset: bool = False) -> float:
    """A positive, finite number from the metadata (absent, or 0 where llama.cpp reads 0 as unset: `default`)."""
    v = _value(fields, key)
    if v is None or (zero_is_unset and v == 0):
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ModelFileError(f"GGUF metadata key {key} must be a positive number, it holds {str(v)[:40]!r}")
    return float(v)


MAX_LAYERS = 4096  # blocks; the largest llama-family models have ~130
BLOCK_TENSOR = re.compile(r"blk\.(\d+)\.")


def hparams_from_fields(fields: Mapping, tensor_shapes: Mapping[str, tuple[int, ...]],
                        token_count: int | None, rope_freqs: np.ndarray | None = None) -> HParams:
    """Map GGUF metadata to HParams: the only place that reads model metadata keys. Every value is
    checked (positive, divisible where the graph divides, consistent with `tensor_shapes`, numpy order).
    `rope_freqs`: the rope_freqs.weight tensor's values, where the file has one (Llama 3 RoPE scaling)."""
    arch = _value(fields, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ModelFileError(
            f"unsupported architecture {arch!r}: specserve serves {', '.join(SUPPORTED_ARCHS)} models"
        )

    def req(key: str) -> int:
        v = _int(fields, f"{arch}.{key}")
        if v < 1:
            raise ModelFileError(f"{arch}.{key} is {v}: it must be at least 1")
        return v

    n_embd, n_head, n_layer = req("embedding_length"), req("attention.head_count"), req("block_count")
    n_head_kv = _int(fields, f"{arch}.attention.head_count_kv", n_head)
    if n_layer > MAX_LAYERS:
        raise ModelFileError(f"{arch}.block_count is {n_layer}: specserve serves models of at most {MAX_LAYERS} blocks")
    blocks = {int(m.group(1)) for name in tensor_shapes if (m := BLOCK_TENSOR.match(name))}
    if blocks and max(blocks) >= n_layer:
        raise ModelFileError(f"{arch}.block_count is {n_layer}, but the file holds tensors of block {max(blocks)}")
    if not 1 <= n_head_kv <= n_head or n_head % n_head_kv:
        raise ModelFileError(f"{arch}.attention.head_count_kv is {n_head_kv}: it must divide "
                             f"{arch}.attention.head_count ({n_head})")
    head_dim = _head_dim(fields, arch, n_embd, n_head)
    rope_dim = _int(fields, f"{arch}.rope.dimension_count", head_dim)
    if not 2 <= rope_dim <= head_dim or rope_dim % 2:
        raise ModelFileError(f"{arch}.rope.dimension_count is {rope_dim}: it must be even and within "
                             f"[2, {head_dim}] (the head size)")
    n_vocab = _n_vocab(fields, arch, n_embd, tensor_shapes, token_count)
    scaling_type = _value(fields, f"{arch}.rope.scaling.type") or "none"
    scale = _float(fields, f"{arch}.rope.scaling.factor", 1.0, zero_is_unset=True)
    gemma = arch == "gemma3"
    n_swa, swa_layers = _sliding_window(fields, arch, n_layer) if gemma else (0, ())
    if gemma and _value(fields, f"{arch}.final_logit_softcapping"):
        raise ModelFileError(f"{arch}.final_logit_softcapping is set: specserve does not cap logits")
    return HParams(
        arch=arch,
        n_vocab=n_vocab,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        n_head_kv=n_head_kv,
        n_ff=req("feed_forward_length"),
        n_ctx_train=req("context_length"),
        rms_eps=_float(fields, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5),
        rope_base=_float(fields, f"{arch}.rope.freq_base", 10000.0),
        rope_dim=rope_dim,
        rope_neox=arch in NEOX_ARCHS,
        rope_scale=_rope_scale(scale if scaling_type == "linear" else 1.0, rope_freqs, rope_dim),
        tied_output="output.weight" not in tensor_shapes,
        qkv_bias="blk.0.attn_q.bias" in tensor_shapes,
        head_dim=head_dim,
        qk_norm=arch in ("qwen3", "gemma3"),
        gemma=gemma,
        # llama.cpp (gemma_pytorch's config): the 27B model (62 layers) scales by its n_embd / n_head
        attn_scale=1.0 / math.sqrt(n_embd / n_head if gemma and n_layer == 62 else head_dim),
        n_swa=n_swa,
        swa_layers=swa_layers,
        rope_base_swa=_float(fields, f"{arch}.rope.freq_base_swa", GEMMA3_ROPE_BASE_SWA),
    )


def _head_dim(fields: Mapping, arch: str, n_embd: int, n_head: int) -> int:
    """attention.key_length (equal to value_length), else n_embd / n_head."""
    k = _int(fields, f"{arch}.attention.key_length", 0)
    if k:
        v = _int(fields, f"{arch}.attention.value_length", k)
        if k != v or k < 2 or k % 2:
            raise ModelFileError(f"{arch}.attention.key_length {k} and value_length {v}: specserve needs them "
                                 "equal and even")
        return k
    if n_embd % n_head:
        raise ModelFileError(f"{arch}.embedding_length {n_embd} is not a multiple of "
                             f"{arch}.attention.head_count {n_head}")
    return n_embd // n_head


def _sliding_window(fields: Mapping, arch: str, n_layer: int) -> tuple[int, tuple[bool, ...]]:
    """(window, which layers are local) as llama.cpp reads them: attention.sliding_window (0 or absent:
    every layer global); attention.sliding_window_pattern, an array of per-layer flags or a period n
    (layer i is local unless i % n == n - 1; default GEMMA3_SWA_PATTERN)."""
    n_swa = _int(fields, f"{arch}.attention.sliding_window", 0)
    if n_swa <= 0:
        return 0, ()
    pattern = _value(fields, f"{arch}.attention.sliding_window_pattern")
    if isinstance(pattern, list):
        if len(pattern) != n_layer:
            raise ModelFileError(f"{arch}.attention.sliding_window_pattern has {len(pattern)} flags for "
                                 f"{n_layer} layers")
        return n_swa, tuple(bool(f) for f in pattern)
    n = GEMMA3_SWA_PATTERN if pattern is None else _int(fields, f"{arch}.attention.sliding_window_pattern")
    return n_swa, tuple(n == 0 or i % n < n - 1 for i in range(n_layer))

def _rope_scale(linear: float, rope_freqs: np.ndarray | None, rope_dim: int) -> float | tuple[float, ...]:
    """Each rotated pair's position divisor: llama.cpp divides pair i's angle by rope_freqs[i] (ggml_rope_ext's
    freq_factors) and multiplies it by 1/linear."""
    if rope_freqs is None:
        return linear
    factors = np.asarray(rope_freqs, dtype=np.float64).reshape(-1)
    if factors.size != rope_dim // 2 or not np.isfinite(factors).all() or (factors <= 0).any():
        raise ModelFileError(f"tensor rope_freqs.weight must hold {rope_dim // 2} positive numbers "
                             f"(one per rotated pair of the {rope_dim} rope dimensions)")
    return tuple(float(linear * f) for f in factors)


def _n_vocab(fields: Mapping, arch: str, n_embd: int, tensor_shapes: Mapping[str, tuple[int, ...]],
             token_count: int | None) -> int:
    """The vocabulary size: vocab_size, else the tokenizer's token count; both agree, and so does token_embd."""
    n_vocab = _int(fields, f"{arch}.vocab_size", token_count or 0)
    if n_vocab < 1:
        raise ModelFileError("cannot tell the vocabulary size: no vocab_size and no tokenizer.ggml.tokens")
    if token_count is not None and token_count != n_vocab:
        raise ModelFileError(f"tokenizer.ggml.tokens holds {token_count} tokens, {arch}.vocab_size says {n_vocab}")
    embd = tensor_shapes.get("token_embd.weight")
    if embd is not None and embd != (n_vocab, n_embd):
        raise ModelFileError(f"token_embd.weight has shape {embd}, the metadata says {n_vocab} tokens of "
                             f"{n_embd} (vocabulary x embedding_length)")
    return n_vocab


def expected_tensors(hp: HParams) -> dict[str, tuple[int, ...]]:
    """The tensors the llama graph reads and their shapes (numpy order), in file order convention."""
    e, kv, ff = hp.n_embd, hp.n_embd_kv, hp.n_ff
    shapes = {"token_embd.weight": (hp.n_vocab, e), "output_norm.weight": (e,)}
    if not hp.tied_output:
        shapes["output.weight"] = (hp.n_vocab, e)
    for i in range(hp.n_layer):
        p = f"blk.{i}."
        shapes.update({p + "attn_norm.weight": (e,), p + "attn_q.weight": (hp.n_embd_q, e),
                       p + "attn_k.weight": (kv, e), p + "attn_v.weight": (kv, e),
                       p + "attn_output.weight": (e, hp.n_embd_q), p + "ffn_norm.weight": (e,),
                       p + "ffn_gate.weight": (ff, e), p + "ffn_up.weight": (ff, e), p + "ffn_down.weight": (e, ff)})
        if hp.qkv_bias:
            shapes.update({p + "attn_q.bias": (hp.n_embd_q,), p + "attn_k.bias": (kv,), p + "attn_v.bias": (kv,)})
        if hp.qk_norm:
            shapes.update({p + "attn_q_norm.weight": (hp.head_dim,), p + "attn_k_norm.weight": (hp.head_dim,)})
        if hp.gemma:
            shapes.update({p + "post_attention_norm.weight": (e,), p + "post_ffw_norm.weight": (e,)})
    return shapes


def _rope_freqs(t) -> np.ndarray | None:
    """The values of the rope_freqs.weight tensor (F32, read from the file), or None when there is none."""
    if t is None:
        return None
    if int(t.tensor_type) != gguf.GGMLQuantizationType.F32 or t.data.size > 1 << 16:
        raise ModelFileError("tensor rope_freqs.weight must be a short F32 vector (one factor per rotated pair)")
    return np.array(t.data, dtype=np.float32)


class ModelFile:
    """An opened GGUF model: metadata parsed once, tensor data left memory-mapped."""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        try:
            check_layout(self.path)  # every count and offset bounded before the reader trusts them
            self.reader = gguf.GGUFReader(self.path, "r")
        except (FileNotFoundError, IsADirectoryError):
            raise
        except LayoutError as e:
            raise ModelFileError(f"not a readable GGUF file: {e}") from e
        except OSError as e:
            raise ModelFileError(f"cannot read the file ({e.strerror or e})") from e
        except Exception as e:  # gguf raises ValueError/struct.error/etc. on malformed files
            raise ModelFileError(f"not a readable GGUF file ({e})") from e
        fields = self.reader.fields
        by_name = {t.name: t for t in self.reader.tensors}
        shapes = {name: tuple(int(d) for d in reversed(t.shape.tolist())) for name, t in by_name.items()}
        tokens = fields.get("tokenizer.ggml.tokens")
        self.hparams = hparams_from_fields(fields, shapes, len(tokens.data) if tokens else None,
                                           _rope_freqs(by_name.get("rope_freqs.weight")))
        self.tensors: dict[str, TensorInfo] = {}
        for name, shape in expected_tensors(self.hparams).items():
            t = by_name.get(name)
            if t is None:
                raise ModelFileError(f"tensor {name} is missing")
            gtype = gguf.GGMLQuantizationType(int(t.tensor_type))
            if gtype not in SUPPORTED_TYPES:
                raise ModelFileError(f"tensor {name} has unsupported type {gtype.name}")
            if shapes[name] != shape:
                raise ModelFileError(f"tensor {name} has shape {shapes[name]}, the hyperparameters need {shape}")
            self.tensors[name] = TensorInfo(name, gtype, shape, tensor_nbytes(gtype, shape))
        self._raw = by_name

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as stored (memory-mapped uint8 or float view), read on access."""
        return self._raw[name].data

    @property
    def n_params(self) -> int:
        return sum(math.prod(t.shape) for t in self.tensors.values())


MODEL_CACHE_ENTRIES = 2  # parsed files kept after their last user is gone (~156 MB each for a 135M model)
_live: "weakref.WeakValueDictionary[tuple, ModelFile]" = weakref.WeakValueDictionary()  # every file in use
_recent: "OrderedDict[tuple, ModelFile]" = OrderedDict()  # the last MODEL_CACHE_ENTRIES opened, kept alive
_cache_lock = threading.Lock()


def open_model(path: str) -> ModelFile:
    """Open (or reuse) a parsed model file; the cache key includes size and mtime, so edits are seen.

    A file stays cached while anything holds it (a loaded pair) and, beyond that, while it is one
    of the MODEL_CACHE_ENTRIES most recently opened: Fitting many files does not keep them all."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    with _cache_lock:
        mf = _live.get(key)
    if mf is None:
        mf = ModelFile(path)
    with _cache_lock:
        mf = _live.setdefault(key, mf)  # two threads that parsed the same file share the first
        _recent[key] = mf
        _recent.move_to_end(key)
        while len(_recent) > MODEL_CACHE_ENTRIES:
            _recent.popitem(last=False)
    return mf


def cached_model_paths() -> list[str]:
    """The paths of the parsed model files the process holds (in use or recent), for tests and logs."""
    with _cache_lock:
        return [key[0] for key in _live.keys()]
