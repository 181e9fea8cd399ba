"""Tiny llama-family GGUF files for tests, written with gguf.GGUFWriter (llama.cpp's own writer).

`write_tiny_llama(path, ...)` makes a random model with a byte-level BPE vocabulary (256 byte
tokens, a few merges, ChatML control tokens) small enough that a forward pass takes
milliseconds. `write_truncated_copy` writes a copy of a real GGUF keeping only its first
layers: a draft that shares the vocabulary and disagrees often (a fixture for rejections).
"""

from __future__ import annotations

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def byte_alphabet() -> list[str]:
    """GPT-2's byte -> printable unicode map, as a list indexed by byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, (chr(c) for c in cs)))
    return [table[b] for b in range(256)]


def tiny_vocab() -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of a small byte-level BPE vocabulary."""
    alpha = byte_alphabet()
    sp, t, h, e = alpha[ord(" ")], alpha[ord("t")], alpha[ord("h")], alpha[ord("e")]
    merges = [f"{sp} {t}", f"{t} {h}", f"{sp}{t} {h}", f"{h} {e}", f"{sp}{t}{h} {e}"]
    tokens = SPECIALS + alpha + [m.replace(" ", "") for m in merges]
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))
    return tokens, types, merges


def _quantize(w: np.ndarray, qtype: T) -> np.ndarray:
    if qtype == T.F32:
        return w.astype(np.float32)
    if qtype == T.F16:
        return w.astype(np.float16)
    if qtype in (T.Q4_K, T.Q5_K, T.Q6_K, T.Q2_K, T.Q3_K):  # gguf.quants cannot quantise these: valid random blocks
        from tests.test_opencl_kernels import random_raw

        return random_raw(np.random.default_rng(abs(int(w.sum() * 1e6)) % (1 << 32)), qtype, w.shape)
    return gguf.quants.quantize(w.astype(np.float32), qtype)


def llama3_rope_factors(rope_dim: int, base: float, original_context: int, factor: float = 8.0,
                        low_freq_factor: float = 1.0, high_freq_factor: float = 4.0) -> np.ndarray:
    """Llama 3's per-pair RoPE frequency factors (rope_freqs.weight), as llama.cpp's convert_hf_to_gguf.py
    computes them from rope_scaling {"rope_type": "llama3", ...}: 1 for wavelengths shorter than
    original_context / high_freq_factor, `factor` for those longer than original_context / low_freq_factor,
    a smooth blend between."""
    freqs = 1.0 / base ** (np.arange(0, rope_dim, 2) / rope_dim)
    out = []
    for wavelen in 2 * np.pi / freqs:
        if wavelen < original_context / high_freq_factor:
            out.append(1.0)
        elif wavelen > original_context / low_freq_factor:
            out.append(factor)
        else:
            smooth = (original_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def write_tiny_llama(path, *, n_embd: int = 64, n_head: int = 4, n_head_kv: int = 2, n_ff: int = 128,
                     n_layer: int = 2, n_ctx_train: int = 256, seed: int = 0, matrix_type: T = T.Q8_0,
                     tied: bool = True, arch: str = "llama", vocab: tuple | None = None,
                     extra_tokens: int = 0, scale: float = 0.5, head_dim: int | None = None,
                     sliding_window: int = 0, swa_pattern: int | None = None, embd_type: T | None = None,
                     rope_freqs: np.ndarray | None = None) -> str:
    """Write a random GGUF of `arch` and return its path: llama, qwen2 (q/k/v biases), qwen3 (per-head
    q/k norms), gemma3 (q/k norms, post-norms; `sliding_window` > 0: local layers with that window,
    every `swa_pattern`-th layer global, llama.cpp's default 6 when None). `head_dim` (attention.key_length)
    defaults to n_embd / n_head. The token embedding is Q8_0 (F32/F16 with such matrices) unless
    `embd_type`. `rope_freqs`: a rope_freqs.weight tensor (Llama 3 RoPE scaling; llama3_rope_factors)."""
    rng = np.random.default_rng(seed)
    tokens, types, merges = vocab or tiny_vocab()
    tokens = list(tokens) + [f"<extra_{i}>" for i in range(extra_tokens)]
    types = list(types) + [1] * extra_tokens
    n_vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(n_layer)
    w.add_context_length(n_ctx_train)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)
    hd = head_dim or n_embd // n_head
    w.add_rope_dimension_count(hd)
    if head_dim:
        w.add_key_length(hd)
        w.add_value_length(hd)
    if sliding_window:
        w.add_sliding_window(sliding_window)
        if swa_pattern is not None:
            w.add_uint32(f"{arch}.attention.sliding_window_pattern", swa_pattern)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)

    def mat(name, rows, cols, qtype=matrix_type):
        x = (rng.standard_normal((rows, cols)) * scale / np.sqrt(cols)).astype(np.float32)
        w.add_tensor(name, _quantize(x, qtype), raw_dtype=qtype)

    def vec(name, n, center=1.0):
        w.add_tensor(name, (center + 0.1 * rng.standard_normal(n)).astype(np.float32))

    if embd_type is None:
        embd_type = T.Q8_0 if matrix_type not in (T.F32, T.F16) else matrix_type
    mat("token_embd.weight", n_vocab, n_embd, embd_type)
    vec("output_norm.weight", n_embd)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, dtype=np.float32))
    if not tied:
        mat("output.weight", n_vocab, n_embd)
    for i in range(n_layer):
        p = f"blk.{i}."
        vec(p + "attn_norm.weight", n_embd)
        mat(p + "attn_q.weight", n_head * hd, n_embd)
        mat(p + "attn_k.weight", n_head_kv * hd, n_embd)
        mat(p + "attn_v.weight", n_head_kv * hd, n_embd)
        mat(p + "attn_output.weight", n_embd, n_head * hd)
        if arch == "qwen2":
            vec(p + "attn_q.bias", n_head * hd, 0.0)
            vec(p + "attn_k.bias", n_head_kv * hd, 0.0)
            vec(p + "attn_v.bias", n_head_kv * hd, 0.0)
        if arch in ("qwen3", "gemma3"):
            vec(p + "attn_q_norm.weight", hd)
            vec(p + "attn_k_norm.weight", hd)
        if arch == "gemma3":
            vec(p + "post_attention_norm.weight", n_embd)
            vec(p + "post_ffw_norm.weight", n_embd)
        vec(p + "ffn_norm.weight", n_embd)
        mat(p + "ffn_gate.weight", n_ff, n_embd)
        mat(p + "ffn_up.weight", n_ff, n_embd)
        mat(p + "ffn_down.weight", n_embd, n_ff)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def write_truncated_copy(src: str, dst, n_layer: int) -> str:
    """Copy a GGUF keeping its metadata and only blocks 0..n_layer-1 (a weak draft with the same vocabulary)."""
    r = gguf.GGUFReader(src)
    arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(str(dst), arch)
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        val = f.contents()
        if key == f"{arch}.block_count":
            val = n_layer
        vtype = f.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, val, vtype, sub_type=f.types[-1])
        else:
            w.add_key_value(key, val, vtype)
    for t in r.tensors:
        if t.name.startswith("blk.") and int(t.name.split(".")[1]) >= n_layer:
            continue
        w.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(dst)


def kv_value_offset(path, key: str) -> int:
    """Byte offset of a metadata key's value in a GGUF file (an array's: its item type u32, then the
    count u64; a string's: its length u64): where a test patches a header field to craft a bad file."""
    field = gguf.GGUFReader(str(path)).fields[key]
    return field.offset + 8 + len(key.encode()) + 4


def patch_bytes(path, offset: int, data: bytes) -> None:
    """Overwrite `data` at `offset` of a file in place."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
