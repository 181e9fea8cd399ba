"""GGUF reading: every supported tensor type reads back; wrong files are refused with named errors."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from compute.gguf_model import ModelFile, ModelFileError
from compute.quants import SUPPORTED_TYPES, dequantize, tensor_nbytes
from tests.tiny_gguf import write_tiny_llama

ROWS, COLS = 4, 512  # COLS a multiple of every block size (QK_K = 256)

# max abs error of a round trip for N(0,1) data, per quantisable type (about a quantisation step)
TOLERANCE = {T.F32: 0.0, T.F16: 2e-3, T.BF16: 2e-2, T.Q8_0: 0.03, T.Q5_0: 0.15, T.Q5_1: 0.12,
             T.Q4_0: 0.3, T.Q4_1: 0.25}


def _random_k_blocks(qtype: T, n_blocks: int, rng) -> np.ndarray:
    """Valid K-quant blocks: random quant bits and scale bytes, finite f16 super-block scales.

    gguf-py cannot quantise K types, so these tests write blocks directly and check that what
    the file holds reads back exactly as gguf's reference dequantiser decodes it."""
    _, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    d = np.float16(0.01 + rng.random(n_blocks) * 0.02).view(np.uint8).reshape(n_blocks, 2)
    if qtype in (T.Q2_K, T.Q4_K, T.Q5_K):  # d and dmin are the first 4 (Q4_K/Q5_K) or last 4 (Q2_K) bytes
        where = slice(size - 4, size) if qtype == T.Q2_K else slice(0, 4)
        raw[:, where] = np.concatenate([d, d], axis=1)
    else:  # Q3_K, Q6_K: d is the last 2 bytes
        raw[:, size - 2:] = d
    return raw


def _write(path, name, data, qtype):
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("qtype", sorted(SUPPORTED_TYPES, key=lambda t: t.name), ids=lambda t: t.name)
def test_every_supported_type_reads_back(tmp_path, qtype):
    rng = np.random.default_rng(int(qtype))
    values = rng.standard_normal((ROWS, COLS)).astype(np.float32)
    if qtype in TOLERANCE:
        data = values if qtype == T.F32 else (values.astype(np.float16) if qtype == T.F16
                                              else gguf.quants.quantize(values, qtype))
        expected, tol = values, TOLERANCE[qtype]
    else:
        block, _ = gguf.GGML_QUANT_SIZES[qtype]
        data = _random_k_blocks(qtype, ROWS * COLS // block, rng).reshape(ROWS, -1)
        expected, tol = gguf.quants.dequantize(data, qtype).reshape(ROWS, COLS), 0.0
        assert np.isfinite(expected).all()
    path = tmp_path / f"{qtype.name}.gguf"
    _write(path, "t", data, qtype)
    r = gguf.GGUFReader(str(path))
    (t,) = r.tensors
    assert T(int(t.tensor_type)) == qtype
    shape = tuple(int(x) for x in reversed(t.shape.tolist()))
    assert shape == (ROWS, COLS)
    assert tensor_nbytes(qtype, shape) == t.n_bytes
    got = dequantize(t.data, qtype, shape)
    assert got.shape == (ROWS, COLS) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=tol, rtol=0)


def test_hparams_of_the_real_model(real_model):
    hp = ModelFile(real_model).hparams
    assert (hp.arch, hp.n_layer, hp.n_embd, hp.n_head, hp.n_head_kv, hp.n_vocab) == ("llama", 30, 576, 9, 3, 49152)
    assert (hp.head_dim, hp.n_ff, hp.rope_base, hp.tied_output, hp.rope_neox) == (64, 1536, 100000.0, True, False)


def test_unsupported_architecture_is_refused_by_name(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "mamba")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelFileError, match="unsupported architecture 'mamba'") as e:
        ModelFile(str(tmp_path / "m.gguf"))
    assert str(e.value).endswith("specserve serves llama, qwen2, qwen3, gemma3 models")


@pytest.mark.parametrize("arch", ["qwen3", "gemma3"])
def test_qwen3_and_gemma3_hparams_follow_llama_cpp(tmp_path, arch):
    path = write_tiny_llama(tmp_path / "m.gguf", arch=arch, head_dim=32, n_layer=7, sliding_window=8)
    hp = ModelFile(path).hparams
    assert (hp.head_dim, hp.n_embd_q, hp.qk_norm, hp.rope_neox, hp.qkv_bias) == (32, 128, True, True, False)
    assert hp.attn_scale == pytest.approx(32 ** -0.5)
    if arch == "gemma3":  # every 6th layer global (llama.cpp's default pattern), the rest local
        assert (hp.gemma, hp.ffn_act, hp.n_swa, hp.rope_base_swa) == (True, "gelu", 8, 10000.0)
        assert [hp.is_swa(i) for i in range(7)] == [True] * 5 + [False, True]
    else:  # llama.cpp's qwen3 reads no sliding-window key: every layer global
        assert (hp.gemma, hp.ffn_act, hp.n_swa, hp.is_swa(0)) == (False, "silu", 0, False)


def test_unsupported_tensor_type_is_refused_naming_tensor_and_type(tmp_path, monkeypatch):
    path = write_tiny_llama(tmp_path / "m.gguf", matrix_type=T.Q5_1)
    import compute.gguf_model as gm

    monkeypatch.setattr(gm, "SUPPORTED_TYPES", frozenset(SUPPORTED_TYPES - {T.Q5_1}))
    with pytest.raises(ModelFileError, match=r"tensor blk\.0\.attn_q\.weight has unsupported type Q5_1"):
        ModelFile(path)


def test_not_a_gguf_file(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"not a model at all" * 10)
    with pytest.raises(ModelFileError, match="not a readable GGUF"):
        ModelFile(str(p))


def test_missing_tensor_is_named(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    for k, v in dict(block_count=1, context_length=8, embedding_length=32, feed_forward_length=32).items():
        getattr(w, f"add_{k}")(v)
    w.add_head_count(2)
    w.add_vocab_size(4)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelFileError, match="tensor output_norm.weight is missing"):
        ModelFile(str(tmp_path / "m.gguf"))


@pytest.mark.parametrize("factors", [np.ones(3, np.float32), np.array([1.0] * 7 + [-2.0], np.float32)],
                         ids=["wrong-size", "negative"])
def test_rope_freqs_that_cannot_be_factors_are_refused(tmp_path, factors):
    """rope_freqs.weight (Llama 3 RoPE scaling) holds one positive factor per rotated pair (head 16: 8 pairs)."""
    path = write_tiny_llama(tmp_path / "m.gguf", rope_freqs=factors)
    with pytest.raises(ModelFileError, match=r"rope_freqs\.weight must hold 8 positive numbers"):
        ModelFile(path)


def test_rope_freqs_become_per_pair_position_divisors(tmp_path):
    factors = np.linspace(1.0, 8.0, 8, dtype=np.float32)
    hp = ModelFile(write_tiny_llama(tmp_path / "m.gguf", rope_freqs=factors)).hparams
    assert hp.rope_scale == tuple(float(f) for f in factors)
    assert ModelFile(write_tiny_llama(tmp_path / "plain.gguf")).hparams.rope_scale == 1.0
