"""Every server-wide setting, its default and its limit, defined once.

"What is the default of X?" has one answer, here: the module constants below (sizes, limits,
timeouts), `ContextParams` and `SpeculativeConfig` (a pair's settings), `PairRequest` (what a Fit
or Load asks for) and `ServerConfig` (everything `specserve serve` configures). The CLI maps its
flags onto these dataclasses by field name and reads every flag default from them
(tests/test_config.py holds it to that); the engine, scheduler and registry import the constants.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from service.common.choices import DRAFTER_TYPES, DrafterType, KvType
from service.common.errors import InvalidArgument

MiB = 1 << 20

# ---- a pair's context ----

DEFAULT_N_CTX = 4096
DEFAULT_N_BATCH = 256
# The prompt store (service/engine/prompt_cache.py) when neither the request nor the server (--cache-ram) sets
# one. llama-server's --cache-ram defaults to 8 GiB, allocated as it fills; specserve's store is a
# buffer of the plan, allocated whole at Load and counted by Fit, so its default is one that any host
# holding a model can spare: 256 MiB holds ~11,000 tokens of SmolLM2-135M's f16 KV (23 KiB a token),
# seven 1,500-token conversations, or ~2,000 tokens of a 7B GQA model (128 KiB a token).
DEFAULT_PROMPT_CACHE_BYTES = 256 << 20
# The cross-request n-gram index (service/engine/spec/ngram_index.py): 65,536 tokens of recent outputs, 256 KiB of
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


@dataclass(frozen=True)
class PairRequest:
    """What a Fit or Load asks for (the proto PairSpec, converted at the servicer edge)."""

    name: str = "default"
    target_path: str = ""
    draft_path: str = ""
    params: ContextParams = field(default_factory=ContextParams)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)
    budget_bytes: int = 0  # 0: the server's budget (--device-memory, else free memory); may lower it, never raise it


# ---- the server ----

DEFAULT_SLOTS = 4  # slots of a pair a server loads without -np (a bare ContextParams, as `run` uses, has 1)
DEFAULT_QUEUE_MAX = 64  # requests waiting for a slot, per pair (more get RESOURCE_EXHAUSTED)
DEFAULT_MAX_TOKENS = 128  # a request that sets none (a server's -n / --n-predict overrides it)
# Largest prompt a server takes (--max-prompt-bytes), counted before tokenizing: text as UTF-8,
# messages and token ids as encoded on the wire. A flat 1 MiB holds ~250k tokens of English
# (~4 bytes a token) and 32k tokens even at 32 bytes a token: more than the largest contexts
# served, while the tokenizer's time on one request stays bounded.
DEFAULT_MAX_PROMPT_BYTES = 1 << 20
DEFAULT_DRAIN_TIMEOUT = 30.0  # SIGTERM / Unload: seconds in-flight requests may finish
DEFAULT_LOAD_TIMEOUT = 300.0  # seconds a Fit or Load may take before its client gets DEADLINE_EXCEEDED

# ---- a request (the sampling defaults are SamplingParams', service/engine/request.py) ----

MAX_N = 16  # completions of one prompt
MAX_TOP_LOGPROBS = 20  # alternatives per position (OpenAI's top_logprobs limit)
MAX_STOP_STRINGS = 16  # stop strings of one request
# Messages of one conversation: each costs the chat template and the tokenizer far more than its bytes
# (100k empty messages, 0.4 MB of text, took 13 s and left ~150 MB behind); the longest served context
# holds a few thousand turns at most.
MAX_MESSAGES = 4096


@dataclass(frozen=True)
class ServerConfig:
    """Everything `specserve serve` configures."""

    host: str = "127.0.0.1"
    port: int = 50051  # 0: any free port (tests)
    backend: str = "auto"  # compute.select.BACKENDS; auto: the best backend whose probe passes
    device: str = ""  # OpenCL device selector ("" = the first GPU, else the first device)
    device_memory_bytes: int = 0  # 0: the device's free memory
    threads: int = 0  # CPU threads of the backend (compute.select.make_backend); 0: its default
    row_tile: int = -1  # NumPy matmul rows per BLAS call; -1 = the backend's default
    models_dir: str = ""  # Load and Fit accept only files inside it
    startup: PairRequest | None = None  # loaded at start (None: start empty, pairs come by Load)
    params: ContextParams = field(default_factory=lambda: ContextParams(n_parallel=DEFAULT_SLOTS))  # request zeros
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)
    default_target: str = ""  # the model a PairSpec without target_path means
    max_tokens: int = DEFAULT_MAX_TOKENS
    max_prompt_bytes: int = DEFAULT_MAX_PROMPT_BYTES  # larger prompts are INVALID_ARGUMENT before tokenizing
    queue_max: int = DEFAULT_QUEUE_MAX  # requests waiting for a slot, per pair
    max_workers: int = 64  # gRPC handler threads; also the most concurrent RPCs (more get RESOURCE_EXHAUSTED)
    max_message_bytes: int = 16 * MiB
    keepalive_time_ms: int = 60_000  # server pings an idle connection this often
    keepalive_timeout_ms: int = 20_000  # and closes it when a ping is not answered in this time
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT  # SIGTERM / Unload: seconds in-flight requests may finish
    metrics_port: int = -1  # -1: no metrics endpoint; 0: any free port
    auth_token_file: str = ""  # "role:token" lines (service/edge/auth.py); "": no authentication
    tls_cert: str = ""  # PEM certificate (chain) of the server; "": plaintext (service/rpc/tls.py)
    tls_key: str = ""  # PEM private key of tls_cert
    tls_client_ca: str = ""  # PEM CA: require client certificates it signed (mutual TLS); "": none asked
    load_timeout: float = DEFAULT_LOAD_TIMEOUT  # Fit / Load answer DEADLINE_EXCEEDED after this many seconds
    http_port: int = -1  # the OpenAI-compatible HTTP door (service/http) on host:http_port; -1: off; 0: any free port
    http_body_timeout_s: float = 10.0  # an HTTP request body must arrive within this (service/http/bodies.py)
    log_level: str = "info"  # debug | info | warning | error
    log_format: str = "text"  # text: logfmt lines; json: JSON lines
