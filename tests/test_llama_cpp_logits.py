"""Our graph against llama.cpp's on random-weight GGUF files: one file, both engines, the same 64 tokens.

Each case writes a random model with tests/tiny_gguf.py (gguf.GGUFWriter), evaluates a 64-token prompt
in one call on every backend of ours and on llama.cpp (llama-cpp-python, which scripts/setup.sh builds),
and compares the next-token logits rows. MODELS lists the architectures and variants; adding an
architecture is adding one entry there (and teaching write_tiny_llama its tensors). `llama3-rope` is a
llama file with Llama 3's RoPE scaling (a rope_freqs.weight tensor of per-pair frequency factors, made
with an original context of 32 so that they bite within the 64-token prompt). Random weights reach
parts of the graph a real model hides: every head, every layer and every weight counts about as much
as any other.

Two kinds of weights:

- F32 weights, f32 KV cache on both sides: no rounding of activations anywhere, so the rows agree
  to float32 summation order (measured: at most 9.5e-7 of the row's largest |logit|, every backend).
  TOL_F32_REL leaves 10x headroom over that measurement: the graphs themselves must be the same.
- Q8_0 weights, f16 KV cache: llama.cpp rounds the activations to 8 bits before every quantised dot
  product and q to f16 in attention (tests/test_reference.py's docstring); NumPy and OpenCL do
  neither, our ggml graph does the first. Measured: at most 2.3% of the largest |logit| (numpy,
  ggml and opencl alike), correlation >= 0.9997; tests/llama_cpp_ref.py's shared MIN_CORR and
  TOL_MARGIN apply too.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from compute.llama import Batch
from compute.numpy_backend import NumpyBackend
from service.fit.factory import PairFactory, PairRequest
from service.fit.params import ContextParams, SpeculativeConfig
from tests import llama_cpp_ref
from tests.ggml_backend import make_ggml
from tests.llama_cpp_ref import MIN_CORR, TOL_MARGIN, margin
from tests.tiny_gguf import llama3_rope_factors, write_tiny_llama

# name -> write_tiny_llama's arguments; add an architecture here
MODELS = {
    "llama": {"arch": "llama"},
    "qwen2": {"arch": "qwen2"},
    "llama3-rope": {"arch": "llama", "rope_freqs": llama3_rope_factors(32, 10000.0, original_context=32)},
    "qwen3": {"arch": "qwen3", "head_dim": 64},  # n_head * head_dim (256) != n_embd (128)
    # window 8 over the 64-token prompt, layers 0 and 1 local (their own RoPE base), layer 2 global
    "gemma3": {"arch": "gemma3", "head_dim": 64, "sliding_window": 8, "swa_pattern": 3},
}
N_PROMPT = 64
TOL_F32_REL = 1e-5  # F32 weights: max |diff| / max |logit| (measured max 9.5e-7)
# gemma3's GELU: llama.cpp's CPU GELU reads a table indexed by the f16-rounded input (GGML_GELU_FP16), ours
# computes tanh (NumPy, OpenCL: measured 2.2e-4; ggml's own GELU, in another summation order: 1.8e-5)
TOL_F32_REL_GELU = 5e-4
TOL_Q8_REL = 0.05  # Q8_0 weights: the same ratio (measured max 0.023)
GGML_TYPE_F32 = 0  # llama.cpp's type_k / type_v for an f32 KV cache

BACKENDS = {"numpy": lambda: NumpyBackend(n_threads=1), "ggml": make_ggml}
try:  # the OpenCL backend joins when PyOpenCL finds a working device (tests/test_runtime.py requires one)
    from compute.opencl.backend import OpenCLBackend
    from tests.opencl_runtimes import usable_device

    OPENCL_DEVICE = usable_device()
    if OPENCL_DEVICE is not None:
        BACKENDS["opencl"] = lambda: OpenCLBackend(device=OPENCL_DEVICE)
except ImportError:
    pass

WEIGHTS = {"f32": (T.F32, "f32"), "q8_0": (T.Q8_0, "f16")}  # matrix type, KV cache type (ours and llama.cpp's)


@pytest.fixture(scope="module", params=[(m, w) for m in MODELS for w in WEIGHTS], ids=lambda p: f"{p[0]}-{p[1]}")
def case(request, tmp_path_factory):
    """(path, prompt, llama.cpp's logits row) for one model and weight type."""
    name, weights = request.param
    qtype, kv = WEIGHTS[weights]
    path = write_tiny_llama(tmp_path_factory.mktemp(name) / f"{name}-{weights}.gguf", seed=7, matrix_type=qtype,
                            n_embd=128, n_head=4, n_head_kv=2, n_ff=256, n_layer=3, tied=False, scale=1.0,
                            **MODELS[name])
    rng = np.random.default_rng(11)
    prompt = [int(t) for t in rng.integers(3, 264, N_PROMPT)]  # byte and merged tokens of tiny_vocab
    kv_args = {"type_k": GGML_TYPE_F32, "type_v": GGML_TYPE_F32} if kv == "f32" else {}
    llama = llama_cpp_ref.load(path, n_ctx=128, **kv_args)
    theirs = llama.logits(prompt)
    llama.close()
    tol = TOL_F32_REL_GELU if MODELS[name]["arch"] == "gemma3" else TOL_F32_REL
    return weights, kv, path, prompt, theirs, tol


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_next_token_logits_match_llama_cpp(case, backend):
    weights, kv, path, prompt, theirs, tol_f32 = case
    pair = PairFactory(BACKENDS[backend]()).load(PairRequest(
        name="vs-llama-cpp", target_path=path, params=ContextParams(n_ctx=128, n_batch=N_PROMPT, kv_type=kv),
        speculative=SpeculativeConfig(type="none")))
    try:
        ours = pair.target.context.decode(Batch.make(prompt, range(N_PROMPT), [0] * N_PROMPT, [N_PROMPT - 1]))[0]
    finally:
        pair.release()
    diff = float(np.abs(ours - theirs).max())
    scale = float(np.abs(theirs).max())
    corr = float(np.corrcoef(ours, theirs)[0, 1])
    dm = abs(margin(ours) - margin(theirs))
    msg = (f"{backend}: max |diff| {diff:.3g} (relative {diff / scale:.2g}; logits up to {scale:.3g}), "
           f"correlation {corr:.6f}, margin diff {dm:.3g}, argmax ours {int(np.argmax(ours))} "
           f"llama.cpp {int(np.argmax(theirs))}")
    print(msg)
    assert np.isfinite(ours).all(), msg
    if weights == "f32":
        assert diff <= tol_f32 * scale, msg
    else:
        assert diff <= TOL_Q8_REL * scale, msg
        assert corr >= MIN_CORR, msg
        assert dm <= TOL_MARGIN, msg
