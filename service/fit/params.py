"""Parameters: frozen dataclasses, and the one pure derivation of target and draft context params.

Nothing writes into a params object after it is made. `derive_pair_params` is the only place
where the draft's parameters come from (llama.cpp #25056: a draft fit with one
`n_outputs_max` and loaded with another). Fit and Load both reach it through the factory.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from service.common.choices import DRAFTER_TYPES, KV_TYPES, DrafterType, KvType
from service.common.errors import FailedPrecondition, InvalidArgument

DEFAULT_N_CTX = 4096
DEFAULT_N_BATCH = 256
# The prompt store (service/prompt_cache.py) when neither the request nor the server (--cache-ram) sets
# one. llama-server's --cache-ram defaults to 8 GiB, allocated as it fills; specserve's store is a
# buffer of the plan, allocated whole at Load and counted by Fit, so its default is one that any host
# holding a model can spare: 256 MiB holds ~11,000 tokens of SmolLM2-135M's f16 KV (23 KiB a token),
# seven 1,500-token conversations, or ~2,000 tokens of a 7B GQA model (128 KiB a token).
DEFAULT_PROMPT_CACHE_BYTES = 256 << 20
# The cross-request n-gram index (service/ngram_index.py): 65,536 tokens of recent outputs, 256 KiB of
# int32; one lookup scans it for the last token (~0.1 ms a drafting slot a step on a CPU core).
DEFAULT_NGRAM_CACHE_TOKENS = 1 << 16
# Upper bounds of request fields: far above any real use, low enough that no size computed
# from them overflows a backend's index types or makes Fit search for long.
MAX_N_PARALLEL = 1024  # slots
MAX_N_CTX = 1 << 24  # KV cells in total (16M)
MAX_N_BATCH = 1 << 16  # tokens per forward pass, and logits rows (n_outputs_max)
MAX_PROMPT_CACHE_BYTES = 1 << 40  # 1 TiB
MAX_NGRAM_CACHE_TOKENS = 1 << 24  # 16M tokens (64 MiB)
MAX_VALUES = {"n_parallel": MAX_N_PARALLEL, "n_ctx": MAX_N_CTX, "n_ctx_min": MAX_N_CTX,
              "n_batch": MAX_N_BATCH, "n_outputs_max": MAX_N_BATCH,
              "prompt_cache_bytes": MAX_PROMPT_CACHE_BYTES, "ngram_cache_tokens": MAX_NGRAM_CACHE_TOKENS}


@dataclass(frozen=True)
class ContextParams:
    """One context's parameters. In a request, 0 means "server default"; derived params have no zeros."""

    n_ctx: int = 0  # KV cells in total, shared equally by the slots (each gets n_ctx // n_parallel)
    n_parallel: int = 1  # slots: sequences decoded together
    n_batch: int = 0  # most tokens in one forward pass (prefill chunk, verify batch, all slots)
    n_outputs_max: int = 0  # most logits rows one forward pass returns; 0 = derive
    kv_type: KvType = "f16"
    n_gpu_layers: int = -1  # layers whose weights live in device memory; -1 = all
    n_ctx_min: int = 0  # Fit never shrinks n_ctx below this (0: one cell per slot... see fit)
    # The pair's caches (the target's params carry them; the draft's are 0). Unlike the fields above,
    # 0 means "none"; None means "server default" (DEFAULT_PROMPT_CACHE_BYTES, DEFAULT_NGRAM_CACHE_TOKENS).
    prompt_cache_bytes: int | None = None  # host store of prompt KV states beyond the slots
    ngram_cache_tokens: int | None = None  # recent outputs of all requests the n-gram drafter may draft from

    @property
    def n_ctx_slot(self) -> int:
        return self.n_ctx // self.n_parallel


@dataclass(frozen=True)
class SpeculativeConfig:
    """How a pair drafts. `type` "none" turns speculation off."""

    type: DrafterType = "ngram"
    n_max: int = 8  # most tokens drafted per step
    n_min: int = 1  # fewer proposals than this: decode normally this step
    p_min: float = 0.5  # draft model: stop drafting when its top probability is below this
    ngram_min: int = 2  # shortest suffix the n-gram drafter matches (1 proposes often and is mostly rejected)
    ngram_max: int = 4  # longest suffix the n-gram drafter matches

    def __post_init__(self):
        """Refuse a malformed config with InvalidArgument, whoever builds it (gRPC, the CLI, a test).
        Limits that depend on a pair (its plan's rows, its draft model) are checked against the pair."""
        if self.type not in DRAFTER_TYPES:
            raise InvalidArgument(f"speculative type {self.type!r}: use one of {', '.join(DRAFTER_TYPES)}")
        if self.n_max < 0 or self.n_min < 0:
            raise InvalidArgument("speculative n_max and n_min must be >= 0")
        if self.n_min > self.n_max:
            raise InvalidArgument(f"speculative n_min ({self.n_min}) must be <= n_max ({self.n_max})")
        if not 0.0 <= self.p_min <= 1.0:  # NaN fails this too
            raise InvalidArgument(f"speculative p_min ({self.p_min}) must be within [0, 1]")
        if self.ngram_min < 1 or self.ngram_max < self.ngram_min:
            raise InvalidArgument(
                f"speculative ngram sizes need 1 <= ngram_min <= ngram_max (got {self.ngram_min}, {self.ngram_max})")

    @property
    def enabled(self) -> bool:
        return self.type != "none" and self.n_max > 0


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
    draft part is sized from the target's prompt_cache_bytes, service/prompt_cache.py).
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
