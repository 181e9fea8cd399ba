"""Parameters: frozen dataclasses, and the one pure derivation of target and draft context params.

Nothing writes into a params object after it is made. `derive_pair_params` is the only place
where the draft's parameters come from (llama.cpp #25056: a draft fit with one
`n_outputs_max` and loaded with another). Fit and Load both reach it through the factory.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from service.common.choices import KV_TYPES
from service.common.errors import FailedPrecondition, InvalidArgument
from service.config.settings import (
    DEFAULT_N_BATCH,
    DEFAULT_N_CTX,
    DEFAULT_NGRAM_CACHE_TOKENS,
    DEFAULT_PROMPT_CACHE_BYTES,
    MAX_VALUES,
    ContextParams,
    SpeculativeConfig,
)


def check_draft_model(spec: SpeculativeConfig, has_draft_model: bool, pair_loaded: bool) -> None:
    """THE rule "type draft needs a draft model", for a pair being made and for a loaded one.

    The status code says whose move it is (gRPC's guide: INVALID_ARGUMENT is wrong whatever the
    server's state; FAILED_PRECONDITION depends on it). A Fit/Load PairSpec or `serve`/`run`
    flags that ask for type draft and name no draft model contradict themselves: no server
    state could make them work, so INVALID_ARGUMENT. A Generate or UpdateSpeculativeConfig for
    a pair already loaded without a draft model is well formed; it fails because of how that
    pair was loaded (Load it again with a draft model), so FAILED_PRECONDITION.
    """
    if spec.type != "draft" or has_draft_model:
        return
    if pair_loaded:
        raise FailedPrecondition("speculative type 'draft' needs a pair loaded with a draft model")
    raise InvalidArgument("speculative type 'draft' needs a draft model (draft_path)")


@dataclass(frozen=True)
class PairParams:
    """Everything derived for a pair: the target's and the draft's context params (draft None without one)."""

    target: ContextParams
    draft: ContextParams | None
    speculative: SpeculativeConfig


def fill_defaults(base: ContextParams, n_ctx_train: int) -> ContextParams:
    """Replace request zeros with server defaults and validate (the one place ContextParams are range
    checked, bounded above by MAX_VALUES); the result has no zeros."""
    if base.n_parallel < 1:
        raise InvalidArgument(f"n_parallel must be >= 1 (got {base.n_parallel})")
    if base.kv_type not in KV_TYPES:
        raise InvalidArgument(f"kv_type {base.kv_type!r}: use one of {', '.join(KV_TYPES)}")
    for name in ("n_ctx", "n_batch", "n_outputs_max", "n_ctx_min"):
        if getattr(base, name) < 0:
            raise InvalidArgument(f"{name} must be >= 0 (0 = server default)")
    base = replace(base, prompt_cache_bytes=or_default(base.prompt_cache_bytes, DEFAULT_PROMPT_CACHE_BYTES),
                   ngram_cache_tokens=or_default(base.ngram_cache_tokens, DEFAULT_NGRAM_CACHE_TOKENS))
    for name in ("prompt_cache_bytes", "ngram_cache_tokens"):
        if getattr(base, name) < 0:
            raise InvalidArgument(f"{name} must be >= 0 (0 = none)")
    for name, most in MAX_VALUES.items():
        if getattr(base, name) > most:
            raise InvalidArgument(f"{name} {getattr(base, name)} is too large: at most {most}")
    n_ctx = base.n_ctx or min(DEFAULT_N_CTX * base.n_parallel, max(n_ctx_train, 1) * base.n_parallel)
    n_ctx_slot = n_ctx // base.n_parallel
    if n_ctx_slot < 1:
        raise InvalidArgument(f"n_ctx {n_ctx} gives no cell to each of {base.n_parallel} slots")
    n_batch = base.n_batch or DEFAULT_N_BATCH
    return replace(base, n_ctx=n_ctx_slot * base.n_parallel, n_batch=n_batch)


def or_default(value: int | None, default: int) -> int:
    """`value`, or `default` where it is None (the cache sizes: 0 means none, None the default)."""
    return default if value is None else value


def derive_pair_params(base: ContextParams, spec: SpeculativeConfig, has_draft_model: bool) -> PairParams:
    """THE derivation of both contexts' params from the base params and the speculative config.

    target n_outputs_max = n_parallel * (n_max + 1) when speculation is on (a verify batch
    returns logits for [last, d1..dk] of every slot), else n_parallel. The draft decodes one
    token per slot per step: n_outputs_max = n_parallel. Both are capped by n_batch. The
    draft shares n_ctx, n_parallel, n_batch and kv_type with the target (it holds the same
    sequences). An explicit base n_outputs_max raises the target's (never the draft's). The pair's
    caches (prompt store, n-gram index) are the target's params'; the draft's are 0 (the store's
    draft part is sized from the target's prompt_cache_bytes, service/engine/prompt_cache.py).
    """
    check_draft_model(spec, has_draft_model, pair_loaded=False)
    n_out = base.n_parallel * (spec.n_max + 1) if spec.enabled else base.n_parallel
    n_out = max(n_out, base.n_outputs_max)
    target = replace(base, n_outputs_max=min(n_out, base.n_batch))
    draft = None
    if has_draft_model:
        draft = replace(base, n_outputs_max=min(base.n_parallel, base.n_batch), prompt_cache_bytes=0,
                        ngram_cache_tokens=0)
    return PairParams(target=target, draft=draft, speculative=spec)
