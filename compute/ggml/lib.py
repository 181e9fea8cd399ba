"""The two native libraries the ggml backend runs on, loaded once per process.

* `ggml`: ggml itself through its maintained Python binding (ggml-python, ctypes; scripts/setup.sh
  builds it from source with the flags docs/ggml-backend.md gives: no llamafile sgemm, ggml's own
  threadpool).
* `ops`: specserve's custom ops for ggml graphs (compute/ggml/csrc/: ops.c, and tiles.c for the K-quant
  weights repacked into tiles of 16 rows), built at install as the
  extension module `compute.ggml._ops` and loaded with ctypes (it is plain C: no Python API).

`load()` raises `GgmlUnavailable` with the reason and the fix when either is missing.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
from dataclasses import dataclass
from types import ModuleType


class GgmlUnavailable(RuntimeError):
    """ggml or specserve's ops for it cannot be loaded here; the message says why and what to install."""


class AttentionArgs(ctypes.Structure):
    """compute/ggml/csrc/ops.c `attention_args`: one attention node's pointers and sizes."""

    _fields_ = [
        ("q", ctypes.c_void_p), ("k", ctypes.c_void_p), ("v", ctypes.c_void_p),
        ("slots", ctypes.c_void_p), ("pos", ctypes.c_void_p), ("out", ctypes.c_void_p),
        ("q_row", ctypes.c_int64), ("kv_row", ctypes.c_int64),
        ("n_rows", ctypes.c_int32), ("n_head", ctypes.c_int32), ("n_head_kv", ctypes.c_int32),
        ("head_dim", ctypes.c_int32), ("n_ctx_slot", ctypes.c_int32), ("kv_f16", ctypes.c_int32),
        ("scale", ctypes.c_float), ("window", ctypes.c_int32),
    ]


class RopeArgs(ctypes.Structure):
    """compute/ggml/csrc/ops.c `rope_args`: one RoPE node's pointers and sizes."""

    _fields_ = [
        ("x", ctypes.c_void_p), ("cos", ctypes.c_void_p), ("sin", ctypes.c_void_p), ("out", ctypes.c_void_p),
        ("n_rows", ctypes.c_int32), ("n_heads", ctypes.c_int32), ("head_dim", ctypes.c_int32),
        ("rope_dim", ctypes.c_int32), ("neox", ctypes.c_int32),
    ]


class QuantizeArgs(ctypes.Structure):
    """compute/ggml/csrc/ops.c `quantize_args`: activations to q8_K blocks."""

    _fields_ = [("x", ctypes.c_void_p), ("out", ctypes.c_void_p), ("k", ctypes.c_int64), ("n_rows", ctypes.c_int32)]


class MulMatArgs(ctypes.Structure):
    """compute/ggml/csrc/ops.c `mul_mat_args`: a K-quant matrix times q8_K activation rows."""

    _fields_ = [("w", ctypes.c_void_p), ("xq", ctypes.c_void_p), ("out", ctypes.c_void_p), ("n", ctypes.c_int64),
                ("k", ctypes.c_int64), ("n_rows", ctypes.c_int32), ("type", ctypes.c_int32), ("tiled", ctypes.c_int32)]


class GetRowsArgs(ctypes.Structure):
    """compute/ggml/csrc/tiles.c `get_rows_args`: the embedding lookup of a tiled table."""

    _fields_ = [("w", ctypes.c_void_p), ("ids", ctypes.c_void_p), ("out", ctypes.c_void_p), ("k", ctypes.c_int64),
                ("n_rows", ctypes.c_int32), ("type", ctypes.c_int32)]


@dataclass(frozen=True)
class Libs:
    """ggml's binding module, the ops library, and the ops as ggml_custom_op_t function pointers."""

    ggml: ModuleType
    ops: ctypes.CDLL
    attention: object  # ggml.ggml_custom_op_t
    rope: object  # ggml.ggml_custom_op_t
    quantize_q8_k: object  # ggml.ggml_custom_op_t
    mul_mat_k: object  # ggml.ggml_custom_op_t
    get_rows_tiled: object  # ggml.ggml_custom_op_t
    max_head_dim: int
    max_group: int
    q8_k_block_bytes: int
    vnni: bool  # the K-quant mat-mul runs its AVX-512 VNNI path on this CPU (and K-quant weights are tiled)

    def cpu_buffer_type(self) -> int:
        """ggml_backend_cpu_buffer_type(), called with its real return type (the binding declares a
        C int, which truncates the pointer)."""
        f = self.ggml.lib.ggml_backend_cpu_buffer_type
        f.argtypes, f.restype = [], ctypes.c_void_p
        return f()


@functools.lru_cache(maxsize=1)
def load() -> Libs:
    """Load ggml and specserve's ops for it (once); raises GgmlUnavailable."""
    try:
        import ggml
    except Exception as e:  # ImportError, or the binding's RuntimeError when libggml will not load
        raise GgmlUnavailable(f"ggml cannot be loaded ({e}); install it with scripts/setup.sh "
                              "(ggml-python built from source)") from e
    spec = importlib.util.find_spec("compute.ggml._ops")
    if spec is None or not spec.origin:
        raise GgmlUnavailable("specserve's ggml ops (compute.ggml._ops) are not built; "
                              "reinstall specserve (pip install -e .) to build them")
    try:
        ops = ctypes.CDLL(spec.origin)
    except OSError as e:
        raise GgmlUnavailable(f"specserve's ggml ops cannot be loaded ({e})") from e
    op = functools.partial(ctypes.cast, typ=ggml.ggml_custom_op_t)
    return Libs(ggml, ops, op(ops.specserve_attention), op(ops.specserve_rope), op(ops.specserve_quantize_q8_k),
                op(ops.specserve_mul_mat_k), op(ops.specserve_get_rows_tiled), ops.specserve_attention_max_head_dim(),
                ops.specserve_attention_max_group(), ops.specserve_q8_k_block_bytes(),
                bool(ops.specserve_mul_mat_k_vnni()))
