"""Op by op, bit for bit: reference/ggml_cpu.py against llama.cpp's own intermediate tensors.

The only bench script that imports tests/: the emulation it checks lives there (see the import).

    python bench/ggml_ops_check.py [--layers 0,15,29] [--prompt chat_capital_of_france]

Needs llama-cpp-python (not installed by CI: building it takes over 10 minutes) and the
packaged model. llama.cpp evaluates one reference prompt (tests/data/llama_reference.json) in
one call, with an eval callback that copies out every f32 tensor of the graph (embd, norm,
attn_norm-L, Qcur-L, kq-L, kq_soft_max-L, kqv-L, ...). Each op of the emulation is then fed
llama.cpp's own inputs to that op and its output compared with llama.cpp's output: the
printed "mismatches" count float32 values that differ in any bit. Every op is 0 on this
machine; a non-zero line names the op whose rounding the emulation gets wrong.

The many-row attention kernels (tinyBLAS) are what a prompt evaluation uses; the one-row ones
(ggml_vec_dot_f16) are printed too, as a contrast: their order differs, and so do their bits.
The one-row path is checked end to end by tests/test_reference.py (48 one-token calls).
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import json
import os
import pathlib
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from a clone: the repository root

# The one bench script that imports tests/: what it checks IS the test emulation of ggml's CPU
# rounding (reference/ggml_cpu.py, used by tests/test_reference.py), against llama.cpp's own tensors.
# The emulation is test code, not product, so it stays in tests/ and this script reaches into it.
from reference import ggml_cpu as G  # noqa: E402
from service.common.packaged_model import packaged_model_path  # noqa: E402

REF = json.loads((REPO / "tests" / "data" / "llama_reference.json").read_text())
GGML_TYPE_F32 = 0


def llama_with_dump(model: str):
    """A llama_cpp.Llama whose graph evaluation copies every contiguous f32 tensor into DUMP[name]."""
    import llama_cpp
    from llama_cpp import llama_cpp as lc

    lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))
    for fn, res in (("ggml_get_name", ctypes.c_char_p), ("ggml_nelements", ctypes.c_int64),
                    ("ggml_get_data", ctypes.c_void_p), ("ggml_is_contiguous", ctypes.c_bool)):
        getattr(lib, fn).restype = res
        getattr(lib, fn).argtypes = [ctypes.c_void_p]
    dump = collections.defaultdict(list)

    def cb(t, ask, _ud):
        if ask:
            return True
        # struct ggml_tensor: enum ggml_type type (int32) at 0, int64_t ne[4] at 16
        typ = ctypes.c_int32.from_address(t).value
        ne = (ctypes.c_int64 * 4).from_address(t + 16)
        if typ == GGML_TYPE_F32 and lib.ggml_is_contiguous(t) and lib.ggml_get_data(t):
            n = lib.ggml_nelements(t)
            a = np.ctypeslib.as_array(ctypes.cast(lib.ggml_get_data(t), ctypes.POINTER(ctypes.c_float)), shape=(n,))
            dump[lib.ggml_get_name(t).decode()].append(a.copy().reshape([ne[i] for i in range(4)][::-1]).squeeze())
        return True

    callback = lc.ggml_backend_sched_eval_callback(cb)
    original = lc.llama_context_default_params

    def with_callback():
        p = original()
        p.cb_eval, p.cb_eval_user_data = callback, None
        return p

    lc.llama_context_default_params = with_callback
    try:
        llm = llama_cpp.Llama(model_path=model, n_ctx=512, n_threads=1, logits_all=True, verbose=False)
    finally:
        lc.llama_context_default_params = original
    llm._specserve_keep = callback  # the C side holds a pointer to it
    return llm, dump


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="0,15,29")
    ap.add_argument("--prompt", default=REF["cases"][0]["name"], choices=[c["name"] for c in REF["cases"]])
    args = ap.parse_args()

    import gguf

    model = packaged_model_path()
    llm, dump = llama_with_dump(model)
    case = next(c for c in REF["cases"] if c["name"] == args.prompt)
    prompt = case["prompt_ids"]
    llm.eval(prompt)
    n = len(prompt)
    reader = gguf.GGUFReader(model)
    tensors = {t.name: t for t in reader.tensors}
    be = G.GgmlCpuBackend(n_threads=1)
    hd, n_head, n_head_kv = 64, 9, 3
    total = 0

    def weight(name):
        t = tensors[name]
        return G._QuantWeight(t.tensor_type, tuple(int(x) for x in reversed(t.shape)), t.data)

    def norm_w(name):
        return np.array(tensors[name].data, np.float32)

    def got(name, i=-1):
        a = dump[name][i]
        return a.reshape(n, -1) if a.ndim < 3 else a

    def check(label, ours, ref):
        nonlocal total
        ours = np.asarray(ours, np.float32).reshape(ref.shape)
        bad = int((ours.view(np.int32) != ref.astype(np.float32).view(np.int32)).sum())
        d = float(np.abs(ours.astype(np.float64) - ref).max())
        total += bad if not label.startswith("(") else 0
        print(f"{label:34s} {str(ref.shape):16s} mismatches {bad:6d}/{ref.size:<7d} max|diff| {d:.2e}")

    print(f"{args.prompt}: {n} prompt tokens in one llama_decode; llama-cpp-python, 1 thread")
    pos = np.arange(n)
    cos, sin = be.rope_tables(pos, hd, 100000.0, 1.0)
    for L in (int(v) for v in args.layers.split(",")):
        s = f"-{L}"
        x = got("embd") if L == 0 else got(f"l_out-{L - 1}")
        out = np.empty_like(x)
        be.rms_norm(x, norm_w(f"blk.{L}.attn_norm.weight"), 1e-5, out)
        check("rms_norm * w -> attn_norm" + s, out, got("attn_norm" + s))
        xn = got("attn_norm" + s)
        check("Q4_1 matmul -> Qcur" + s, G.quant_matmul(xn, weight(f"blk.{L}.attn_q.weight")), got("Qcur" + s, 0))
        check("Q4_1 matmul -> Kcur" + s, G.quant_matmul(xn, weight(f"blk.{L}.attn_k.weight")), got("Kcur" + s, 0))
        check("Q4_1 matmul -> Vcur" + s, G.quant_matmul(xn, weight(f"blk.{L}.attn_v.weight")), got("Vcur" + s, 0))
        q = got("Qcur" + s, 0).copy()
        be.rope(q, cos, sin, n_head, hd, hd, False)
        check("rope -> Qcur" + s, q, got("Qcur" + s, -1))
        kq, sm = got("kq" + s), got("kq_soft_max" + s)  # (n_head, n, n_kv)
        n_kv = kq.shape[-1]
        q4 = got("Qcur" + s, -1).reshape(n, n_head_kv, n_head // n_head_kv, hd)
        qh = G.f16(q4).transpose(1, 2, 0, 3)[..., None, :]
        K = np.zeros((n_kv, n_head_kv, hd), np.float32)
        K[:n] = G.f16(got("Kcur" + s, -1).reshape(n, n_head_kv, hd))
        Kt = K.transpose(1, 0, 2)[:, None, None]
        check("f16 kq (tinyBLAS) -> kq" + s, G.dot_f16_tiny(qh, Kt).reshape(n_head, n, n_kv)[..., :n], kq[..., :n])
        check("(one-row f16 kq, for contrast)", G.dot_f16_vec(qh, Kt).reshape(n_head, n, n_kv)[..., :n], kq[..., :n])
        masked = np.where(np.arange(n_kv)[None, :] <= pos[:, None], kq * np.float32(0.125), -np.inf).astype(np.float32)
        check("softmax -> kq_soft_max" + s, G.softmax_row(masked, 1.0), sm)
        V = np.zeros((n_kv, n_head_kv, hd), np.float32)
        V[:n] = G.f16(got("Vcur" + s, -1).reshape(n, n_head_kv, hd))
        P = G.f16(sm).reshape(n_head_kv, n_head // n_head_kv, n, 1, n_kv)
        Vt = V.transpose(1, 2, 0)[:, None, None]
        check("f16 kqv (tinyBLAS) -> kqv" + s, G.dot_f16_tiny(P, Vt).reshape(n_head, n, hd), got("kqv" + s))
        check("(one-row f16 kqv, for contrast)", G.dot_f16_vec(P, Vt).reshape(n_head, n, hd), got("kqv" + s))
        check("Q4_1 matmul -> attn_out" + s, G.quant_matmul(got("kqv_out" + s), weight(f"blk.{L}.attn_output.weight")),
              got("attn_out" + s))
        check("add -> ffn_inp" + s, x + got("attn_out" + s), got("ffn_inp" + s))
        be.rms_norm(got("ffn_inp" + s), norm_w(f"blk.{L}.ffn_norm.weight"), 1e-5, out)
        check("rms_norm * w -> ffn_norm" + s, out, got("ffn_norm" + s))
        fn = got("ffn_norm" + s)
        check("Q4_1 matmul -> ffn_gate" + s, G.quant_matmul(fn, weight(f"blk.{L}.ffn_gate.weight")),
              got("ffn_gate" + s))
        check("Q4_1 matmul -> ffn_up" + s, G.quant_matmul(fn, weight(f"blk.{L}.ffn_up.weight")), got("ffn_up" + s))
        sw = np.empty_like(got("ffn_gate" + s))
        be.swiglu(got("ffn_gate" + s), got("ffn_up" + s), sw)
        check("swiglu -> ffn_swiglu" + s, sw, got("ffn_swiglu" + s))
        check("Q4_1 matmul -> ffn_out" + s, G.quant_matmul(got("ffn_swiglu" + s), weight(f"blk.{L}.ffn_down.weight")),
              got("ffn_out" + s))
    # logits_all: the head ran over every row (tinyBLAS_Q0_AVX, whose order per value is
    # ggml_vec_dot_q8_0_q8_0's); the reference keeps only the last row, through the one-row path
    check("Q8_0 head -> result_output", G.quant_matmul(got("result_norm"), weight("token_embd.weight")),
          got("result_output"))
    print(f"total mismatching values (contrast lines excluded): {total}")


if __name__ == "__main__":
    main()
