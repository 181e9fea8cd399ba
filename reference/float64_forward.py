"""The llama-family forward pass (llama, qwen2, qwen3, gemma3) written plainly in float64 from the dequantised
weights: the maths every backend and the graph (compute/llama.py) are checked against, and the perplexity
benchmark's exact reference."""

from __future__ import annotations

import numpy as np

from compute.gguf_model import ModelFile
from compute.quants import dequantize


def naive_forward(mf: ModelFile, tokens: list[int]) -> np.ndarray:
    """Logits (n, vocab) of a causal sequence, written plainly in float64 (the reference maths)."""
    hp = mf.hparams
    W = {n: dequantize(mf.raw(n), t.ggml_type, t.shape).astype(np.float64) for n, t in mf.tensors.items()}
    n, hd = len(tokens), hp.head_dim

    def norm(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + hp.rms_eps) * w

    def rope(x, n_heads, base, scale):  # x (n, n_heads*hd)
        x = x.reshape(n, n_heads, hd).copy()
        half = hp.rope_dim // 2
        inv = base ** (-np.arange(0, hp.rope_dim, 2) / hp.rope_dim)
        ang = np.arange(n)[:, None] / np.asarray(scale, dtype=np.float64) * inv[None, :]  # scale: one, or per pair
        c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        if hp.rope_neox:
            a, b = x[..., :half].copy(), x[..., half:hp.rope_dim].copy()
            x[..., :half], x[..., half:hp.rope_dim] = a * c - b * s, a * s + b * c
        else:
            a, b = x[..., 0:hp.rope_dim:2].copy(), x[..., 1:hp.rope_dim:2].copy()
            x[..., 0:hp.rope_dim:2], x[..., 1:hp.rope_dim:2] = a * c - b * s, a * s + b * c
        return x

    def act(g):  # silu, or gemma's GELU (tanh approximation)
        if hp.ffn_act == "gelu":
            return 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g ** 3)))
        return g / (1 + np.exp(-g))

    x = W["token_embd.weight"][tokens]
    if hp.gemma:
        x = x * np.sqrt(hp.n_embd)
    pos = np.arange(n)
    for i in range(hp.n_layer):
        p = f"blk.{i}."
        h = norm(x, W[p + "attn_norm.weight"])
        q, k, v = h @ W[p + "attn_q.weight"].T, h @ W[p + "attn_k.weight"].T, h @ W[p + "attn_v.weight"].T
        if hp.qkv_bias:
            q, k, v = q + W[p + "attn_q.bias"], k + W[p + "attn_k.bias"], v + W[p + "attn_v.bias"]
        if hp.qk_norm:  # every head normalised on its own, one weight for all heads
            q = norm(q.reshape(n, hp.n_head, hd), W[p + "attn_q_norm.weight"]).reshape(n, -1)
            k = norm(k.reshape(n, hp.n_head_kv, hd), W[p + "attn_k_norm.weight"]).reshape(n, -1)
        base, scale = (hp.rope_base_swa, 1.0) if hp.is_swa(i) else (hp.rope_base, hp.rope_scale)
        q, k, v = rope(q, hp.n_head, base, scale), rope(k, hp.n_head_kv, base, scale), v.reshape(n, hp.n_head_kv, hd)
        masked = pos[None, :] > pos[:, None]  # (row, cell): causal
        if hp.is_swa(i):
            masked |= pos[:, None] - pos[None, :] >= hp.n_swa  # llama.cpp: p1 - p0 >= n_swa is masked
        g = hp.n_head // hp.n_head_kv
        out = np.zeros((n, hp.n_head, hd))
        for hh in range(hp.n_head):
            kv = hh // g
            sc = q[:, hh] @ k[:, kv].T * hp.attn_scale
            sc[masked] = -np.inf
            pr = np.exp(sc - sc.max(-1, keepdims=True))
            pr /= pr.sum(-1, keepdims=True)
            out[:, hh] = pr @ v[:, kv]
        o = out.reshape(n, -1) @ W[p + "attn_output.weight"].T
        x = x + (norm(o, W[p + "post_attention_norm.weight"]) if hp.gemma else o)
        h = norm(x, W[p + "ffn_norm.weight"])
        gate, up = h @ W[p + "ffn_gate.weight"].T, h @ W[p + "ffn_up.weight"].T
        o = (act(gate) * up) @ W[p + "ffn_down.weight"].T
        x = x + (norm(o, W[p + "post_ffw_norm.weight"]) if hp.gemma else o)
    head = W["token_embd.weight"] if hp.tied_output else W["output.weight"]
    return norm(x, W["output_norm.weight"]) @ head.T
