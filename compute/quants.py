"""Tensor types: byte sizes from gguf's one (block size, type size) table, dequantisation by gguf.quants."""

from __future__ import annotations

import math

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T

SUPPORTED_TYPES = frozenset({
    T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1,
    T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K,
})


def tensor_nbytes(ggml_type: T, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of `shape` (numpy order, last dim = GGUF ne0) stored as `ggml_type`."""
    block, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
    row = shape[-1]
    if row % block:
        raise ValueError(f"row length {row} is not a multiple of the {ggml_type.name} block size {block}")
    return math.prod(shape[:-1]) * (row // block) * type_size


def dequantize(raw: np.ndarray, ggml_type: T, shape: tuple[int, ...]) -> np.ndarray:
    """Return the tensor as float32 of `shape` (numpy order)."""
    if ggml_type == T.F32:
        return np.asarray(raw, dtype=np.float32).reshape(shape)
    if ggml_type == T.F16:
        return np.asarray(raw).view(np.float16).astype(np.float32).reshape(shape)
    out = gguf.quants.dequantize(np.asarray(raw).view(np.uint8), ggml_type)
    return np.asarray(out, dtype=np.float32).reshape(shape)
