"""GGUF model files: hyperparameters and tensor descriptions, read with llama.cpp's `gguf` package.

Everything the rest of specserve knows about a model file comes from `ModelFile`:
`hparams` (the one place metadata becomes model parameters), `tensors` (name, type,
shape, byte size: no tensor data is read) and `reader` (for the tokenizer and for
loading weights, which stay memory-mapped until a backend copies them).
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass
from typing import Mapping

import gguf
import numpy as np

from compute.quants import SUPPORTED_TYPES, tensor_nbytes

SUPPORTED_ARCHS = ("llama", "qwen2")


class ModelFileError(ValueError):
    """A model file that cannot be served: unreadable, wrong architecture, unsupported tensor type."""


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
    rope_scale: float  # linear position scaling (positions are divided by it)
    tied_output: bool  # no output.weight: the head reuses token_embd
    qkv_bias: bool  # qwen2: biases on q, k, v

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

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


def _field(fields: Mapping, key: str, default=None):
    f = fields.get(key)
    if f is None:
        return default
    return f.contents()


def hparams_from_fields(fields: Mapping, tensor_names: frozenset[str], token_count: int | None) -> HParams:
    """Map GGUF metadata to HParams: the only place that reads model metadata keys."""
    arch = _field(fields, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ModelFileError(
            f"unsupported architecture {arch!r}: specserve serves {', '.join(SUPPORTED_ARCHS)} models"
        )

    def req(key: str):
        v = _field(fields, f"{arch}.{key}")
        if v is None:
            raise ModelFileError(f"GGUF metadata key {arch}.{key} is missing")
        return v

    n_embd = int(req("embedding_length"))
    n_head = int(req("attention.head_count"))
    n_vocab = _field(fields, f"{arch}.vocab_size") or token_count
    if not n_vocab:
        raise ModelFileError("cannot tell the vocabulary size: no vocab_size and no tokenizer.ggml.tokens")
    scaling_type = _field(fields, f"{arch}.rope.scaling.type", "none")
    scale = float(_field(fields, f"{arch}.rope.scaling.factor", 1.0) or 1.0)
    return HParams(
        arch=arch,
        n_vocab=int(n_vocab),
        n_embd=n_embd,
        n_layer=int(req("block_count")),
        n_head=n_head,
        n_head_kv=int(_field(fields, f"{arch}.attention.head_count_kv", n_head)),
        n_ff=int(req("feed_forward_length")),
        n_ctx_train=int(req("context_length")),
        rms_eps=float(_field(fields, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_base=float(_field(fields, f"{arch}.rope.freq_base", 10000.0)),
        rope_dim=int(_field(fields, f"{arch}.rope.dimension_count", n_embd // n_head)),
        rope_neox=arch == "qwen2",
        rope_scale=scale if scaling_type == "linear" else 1.0,
        tied_output="output.weight" not in tensor_names,
        qkv_bias="blk.0.attn_q.bias" in tensor_names,
    )


def expected_tensors(hp: HParams) -> list[str]:
    """Names of the tensors the llama graph reads, in file order convention."""
    names = ["token_embd.weight", "output_norm.weight"]
    if not hp.tied_output:
        names.append("output.weight")
    for i in range(hp.n_layer):
        p = f"blk.{i}."
        names += [p + n for n in ("attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight",
                                  "attn_output.weight", "ffn_norm.weight", "ffn_gate.weight",
                                  "ffn_up.weight", "ffn_down.weight")]
        if hp.qkv_bias:
            names += [p + "attn_q.bias", p + "attn_k.bias", p + "attn_v.bias"]
    return names


class ModelFile:
    """An opened GGUF model: metadata parsed once, tensor data left memory-mapped."""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        try:
            self.reader = gguf.GGUFReader(self.path, "r")
        except FileNotFoundError:
            raise
        except Exception as e:  # gguf raises ValueError/struct.error/etc. on malformed files
            raise ModelFileError(f"{self.path}: not a readable GGUF file ({e})") from e
        fields = self.reader.fields
        by_name = {t.name: t for t in self.reader.tensors}
        tokens = fields.get("tokenizer.ggml.tokens")
        self.hparams = hparams_from_fields(fields, frozenset(by_name), len(tokens.data) if tokens else None)
        self.tensors: dict[str, TensorInfo] = {}
        for name in expected_tensors(self.hparams):
            t = by_name.get(name)
            if t is None:
                raise ModelFileError(f"{self.path}: tensor {name} is missing")
            gtype = gguf.GGMLQuantizationType(int(t.tensor_type))
            if gtype not in SUPPORTED_TYPES:
                raise ModelFileError(f"{self.path}: tensor {name} has unsupported type {gtype.name}")
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            self.tensors[name] = TensorInfo(name, gtype, shape, tensor_nbytes(gtype, shape))
        self._raw = by_name

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as stored (memory-mapped uint8 or float view), read on access."""
        return self._raw[name].data

    @property
    def n_params(self) -> int:
        return sum(math.prod(t.shape) for t in self.tensors.values())


_cache: dict[tuple, ModelFile] = {}
_cache_lock = threading.Lock()


def open_model(path: str) -> ModelFile:
    """Open (or reuse) a parsed model file; the cache key includes size and mtime, so edits are seen."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    with _cache_lock:
        mf = _cache.get(key)
    if mf is None:
        mf = ModelFile(path)
        with _cache_lock:
            _cache[key] = mf
    return mf
