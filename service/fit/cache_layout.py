"""Sizes and layouts of the pair's caches, the buffers of the plan that the engine's caches live in.

The prompt store (service/engine/prompt_cache.py) keeps prompt KV states beyond the slots in
fixed blocks of BLOCK_TOKENS cells; the n-gram index (service/engine/spec/ngram_index.py) is a
ring of token ids. The planner takes their sizes from here and the engine carves its caches out
of the allocations the plan laid out, so what Fit counts is what the caches use.
"""

from __future__ import annotations

from compute.backend import DTYPES, KvType
from compute.gguf_model import HParams
from compute.llama import Layout

BLOCK_TOKENS = 128  # cells of one store block: a 1,500-token prompt is 12 blocks, 64 cells wasted on average


def kv_token_bytes(hp: HParams, kv_type: KvType) -> int:
    """Bytes of one token's K and V cells over every layer of a model."""
    return 2 * hp.n_layer * hp.n_embd_kv * DTYPES[kv_type].itemsize


def store_blocks(prompt_cache_bytes: int, token_bytes: int) -> int:
    """Whole blocks of BLOCK_TOKENS tokens (target + draft cells: `token_bytes` a token) in the store's bytes."""
    return prompt_cache_bytes // (BLOCK_TOKENS * token_bytes) if token_bytes else 0


def store_layout(hp: HParams, n_blocks: int, kv_type: KvType) -> Layout:
    """One model's part of the store: K and V blocks (n_blocks, n_global, BLOCK_TOKENS, n_embd_kv) of the
    global layers and, for a model with sliding-window layers, k_swa and v_swa of its local layers (the
    store keeps every position of a block: it is restored to any slot, whose ring puts them in place)."""
    n_local = sum(hp.is_swa(i) for i in range(hp.n_layer))
    shape = (n_blocks, hp.n_layer - n_local, BLOCK_TOKENS, hp.n_embd_kv)
    lay: Layout = {"k": (shape, kv_type), "v": (shape, kv_type)}
    if n_local:
        local = (n_blocks, n_local, BLOCK_TOKENS, hp.n_embd_kv)
        lay |= {"k_swa": (local, kv_type), "v_swa": (local, kv_type)}
    return lay


def ngram_layout(n_tokens: int) -> Layout:
    """The ring: (n_tokens,) int32 token ids."""
    return {"tokens": ((n_tokens,), "i32")}
