from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DrafterType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DRAFTER_TYPE_UNSPECIFIED: _ClassVar[DrafterType]
    DRAFTER_TYPE_NONE: _ClassVar[DrafterType]
    DRAFTER_TYPE_DRAFT_MODEL: _ClassVar[DrafterType]
    DRAFTER_TYPE_NGRAM: _ClassVar[DrafterType]

class KvType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KV_TYPE_UNSPECIFIED: _ClassVar[KvType]
    KV_TYPE_F32: _ClassVar[KvType]
    KV_TYPE_F16: _ClassVar[KvType]

class PairState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PAIR_STATE_UNSPECIFIED: _ClassVar[PairState]
    PAIR_STATE_LOADING: _ClassVar[PairState]
    PAIR_STATE_READY: _ClassVar[PairState]
    PAIR_STATE_DRAINING: _ClassVar[PairState]

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_CANCELLED: _ClassVar[FinishReason]
DRAFTER_TYPE_UNSPECIFIED: DrafterType
DRAFTER_TYPE_NONE: DrafterType
DRAFTER_TYPE_DRAFT_MODEL: DrafterType
DRAFTER_TYPE_NGRAM: DrafterType
KV_TYPE_UNSPECIFIED: KvType
KV_TYPE_F32: KvType
KV_TYPE_F16: KvType
PAIR_STATE_UNSPECIFIED: PairState
PAIR_STATE_LOADING: PairState
PAIR_STATE_READY: PairState
PAIR_STATE_DRAINING: PairState
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_CANCELLED: FinishReason

class SpeculativeConfig(_message.Message):
    __slots__ = ("type", "n_max", "n_min", "p_min", "ngram_min", "ngram_max")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    N_MAX_FIELD_NUMBER: _ClassVar[int]
    N_MIN_FIELD_NUMBER: _ClassVar[int]
    P_MIN_FIELD_NUMBER: _ClassVar[int]
    NGRAM_MIN_FIELD_NUMBER: _ClassVar[int]
    NGRAM_MAX_FIELD_NUMBER: _ClassVar[int]
    type: DrafterType
    n_max: int
    n_min: int
    p_min: float
    ngram_min: int
    ngram_max: int
    def __init__(self, type: _Optional[_Union[DrafterType, str]] = ..., n_max: _Optional[int] = ..., n_min: _Optional[int] = ..., p_min: _Optional[float] = ..., ngram_min: _Optional[int] = ..., ngram_max: _Optional[int] = ...) -> None: ...

class ContextParams(_message.Message):
    __slots__ = ("n_ctx", "n_parallel", "n_batch", "n_outputs_max", "kv_type", "n_gpu_layers", "n_ctx_min", "prompt_cache_bytes", "ngram_cache_tokens")
    N_CTX_FIELD_NUMBER: _ClassVar[int]
    N_PARALLEL_FIELD_NUMBER: _ClassVar[int]
    N_BATCH_FIELD_NUMBER: _ClassVar[int]
    N_OUTPUTS_MAX_FIELD_NUMBER: _ClassVar[int]
    KV_TYPE_FIELD_NUMBER: _ClassVar[int]
    N_GPU_LAYERS_FIELD_NUMBER: _ClassVar[int]
    N_CTX_MIN_FIELD_NUMBER: _ClassVar[int]
    PROMPT_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    NGRAM_CACHE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    n_ctx: int
    n_parallel: int
    n_batch: int
    n_outputs_max: int
    kv_type: KvType
    n_gpu_layers: int
    n_ctx_min: int
    prompt_cache_bytes: int
    ngram_cache_tokens: int
    def __init__(self, n_ctx: _Optional[int] = ..., n_parallel: _Optional[int] = ..., n_batch: _Optional[int] = ..., n_outputs_max: _Optional[int] = ..., kv_type: _Optional[_Union[KvType, str]] = ..., n_gpu_layers: _Optional[int] = ..., n_ctx_min: _Optional[int] = ..., prompt_cache_bytes: _Optional[int] = ..., ngram_cache_tokens: _Optional[int] = ...) -> None: ...

class PairSpec(_message.Message):
    __slots__ = ("name", "target_path", "draft_path", "params", "speculative", "memory_budget_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TARGET_PATH_FIELD_NUMBER: _ClassVar[int]
    DRAFT_PATH_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    SPECULATIVE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    target_path: str
    draft_path: str
    params: ContextParams
    speculative: SpeculativeConfig
    memory_budget_bytes: int
    def __init__(self, name: _Optional[str] = ..., target_path: _Optional[str] = ..., draft_path: _Optional[str] = ..., params: _Optional[_Union[ContextParams, _Mapping]] = ..., speculative: _Optional[_Union[SpeculativeConfig, _Mapping]] = ..., memory_budget_bytes: _Optional[int] = ...) -> None: ...

class Buffer(_message.Message):
    __slots__ = ("owner", "kind", "device", "bytes", "tag")
    OWNER_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    owner: str
    kind: str
    device: str
    bytes: int
    tag: str
    def __init__(self, owner: _Optional[str] = ..., kind: _Optional[str] = ..., device: _Optional[str] = ..., bytes: _Optional[int] = ..., tag: _Optional[str] = ...) -> None: ...

class Plan(_message.Message):
    __slots__ = ("buffers", "total_bytes", "budget_bytes", "target", "draft", "device_bytes", "host_bytes", "speculative")
    BUFFERS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    DRAFT_FIELD_NUMBER: _ClassVar[int]
    DEVICE_BYTES_FIELD_NUMBER: _ClassVar[int]
    HOST_BYTES_FIELD_NUMBER: _ClassVar[int]
    SPECULATIVE_FIELD_NUMBER: _ClassVar[int]
    buffers: _containers.RepeatedCompositeFieldContainer[Buffer]
    total_bytes: int
    budget_bytes: int
    target: ContextParams
    draft: ContextParams
    device_bytes: int
    host_bytes: int
    speculative: SpeculativeConfig
    def __init__(self, buffers: _Optional[_Iterable[_Union[Buffer, _Mapping]]] = ..., total_bytes: _Optional[int] = ..., budget_bytes: _Optional[int] = ..., target: _Optional[_Union[ContextParams, _Mapping]] = ..., draft: _Optional[_Union[ContextParams, _Mapping]] = ..., device_bytes: _Optional[int] = ..., host_bytes: _Optional[int] = ..., speculative: _Optional[_Union[SpeculativeConfig, _Mapping]] = ...) -> None: ...

class FitRequest(_message.Message):
    __slots__ = ("pair",)
    PAIR_FIELD_NUMBER: _ClassVar[int]
    pair: PairSpec
    def __init__(self, pair: _Optional[_Union[PairSpec, _Mapping]] = ...) -> None: ...

class FitResponse(_message.Message):
    __slots__ = ("fits", "plan", "adjustments", "available_bytes", "deficit_bytes", "max_n_ctx")
    FITS_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    ADJUSTMENTS_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEFICIT_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_N_CTX_FIELD_NUMBER: _ClassVar[int]
    fits: bool
    plan: Plan
    adjustments: _containers.RepeatedScalarFieldContainer[str]
    available_bytes: int
    deficit_bytes: int
    max_n_ctx: int
    def __init__(self, fits: _Optional[bool] = ..., plan: _Optional[_Union[Plan, _Mapping]] = ..., adjustments: _Optional[_Iterable[str]] = ..., available_bytes: _Optional[int] = ..., deficit_bytes: _Optional[int] = ..., max_n_ctx: _Optional[int] = ...) -> None: ...

class LoadRequest(_message.Message):
    __slots__ = ("pair",)
    PAIR_FIELD_NUMBER: _ClassVar[int]
    pair: PairSpec
    def __init__(self, pair: _Optional[_Union[PairSpec, _Mapping]] = ...) -> None: ...

class LoadResponse(_message.Message):
    __slots__ = ("name", "plan", "allocated", "adjustments", "load_seconds")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    ALLOCATED_FIELD_NUMBER: _ClassVar[int]
    ADJUSTMENTS_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    plan: Plan
    allocated: _containers.RepeatedCompositeFieldContainer[Buffer]
    adjustments: _containers.RepeatedScalarFieldContainer[str]
    load_seconds: float
    def __init__(self, name: _Optional[str] = ..., plan: _Optional[_Union[Plan, _Mapping]] = ..., allocated: _Optional[_Iterable[_Union[Buffer, _Mapping]]] = ..., adjustments: _Optional[_Iterable[str]] = ..., load_seconds: _Optional[float] = ...) -> None: ...

class UnloadRequest(_message.Message):
    __slots__ = ("name", "drain_timeout_seconds")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DRAIN_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    drain_timeout_seconds: float
    def __init__(self, name: _Optional[str] = ..., drain_timeout_seconds: _Optional[float] = ...) -> None: ...

class UnloadResponse(_message.Message):
    __slots__ = ("name", "released_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    RELEASED_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    released_bytes: int
    def __init__(self, name: _Optional[str] = ..., released_bytes: _Optional[int] = ...) -> None: ...

class ListPairsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PairInfo(_message.Message):
    __slots__ = ("name", "state", "target_path", "draft_path", "plan", "allocated", "speculative", "active_slots", "queued", "prompt_cache", "backend", "device")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    TARGET_PATH_FIELD_NUMBER: _ClassVar[int]
    DRAFT_PATH_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    ALLOCATED_FIELD_NUMBER: _ClassVar[int]
    SPECULATIVE_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_SLOTS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    PROMPT_CACHE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    name: str
    state: PairState
    target_path: str
    draft_path: str
    plan: Plan
    allocated: _containers.RepeatedCompositeFieldContainer[Buffer]
    speculative: SpeculativeConfig
    active_slots: int
    queued: int
    prompt_cache: PromptCacheStats
    backend: str
    device: str
    def __init__(self, name: _Optional[str] = ..., state: _Optional[_Union[PairState, str]] = ..., target_path: _Optional[str] = ..., draft_path: _Optional[str] = ..., plan: _Optional[_Union[Plan, _Mapping]] = ..., allocated: _Optional[_Iterable[_Union[Buffer, _Mapping]]] = ..., speculative: _Optional[_Union[SpeculativeConfig, _Mapping]] = ..., active_slots: _Optional[int] = ..., queued: _Optional[int] = ..., prompt_cache: _Optional[_Union[PromptCacheStats, _Mapping]] = ..., backend: _Optional[str] = ..., device: _Optional[str] = ...) -> None: ...

class PromptCacheStats(_message.Message):
    __slots__ = ("capacity_bytes", "used_bytes", "entries", "hits", "misses", "evictions", "cached_tokens")
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    capacity_bytes: int
    used_bytes: int
    entries: int
    hits: int
    misses: int
    evictions: int
    cached_tokens: int
    def __init__(self, capacity_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ..., entries: _Optional[int] = ..., hits: _Optional[int] = ..., misses: _Optional[int] = ..., evictions: _Optional[int] = ..., cached_tokens: _Optional[int] = ...) -> None: ...

class ListPairsResponse(_message.Message):
    __slots__ = ("pairs",)
    PAIRS_FIELD_NUMBER: _ClassVar[int]
    pairs: _containers.RepeatedCompositeFieldContainer[PairInfo]
    def __init__(self, pairs: _Optional[_Iterable[_Union[PairInfo, _Mapping]]] = ...) -> None: ...

class GetSpeculativeConfigRequest(_message.Message):
    __slots__ = ("pair",)
    PAIR_FIELD_NUMBER: _ClassVar[int]
    pair: str
    def __init__(self, pair: _Optional[str] = ...) -> None: ...

class GetSpeculativeConfigResponse(_message.Message):
    __slots__ = ("pair", "config")
    PAIR_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    pair: str
    config: SpeculativeConfig
    def __init__(self, pair: _Optional[str] = ..., config: _Optional[_Union[SpeculativeConfig, _Mapping]] = ...) -> None: ...

class UpdateSpeculativeConfigRequest(_message.Message):
    __slots__ = ("pair", "config")
    PAIR_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    pair: str
    config: SpeculativeConfig
    def __init__(self, pair: _Optional[str] = ..., config: _Optional[_Union[SpeculativeConfig, _Mapping]] = ...) -> None: ...

class UpdateSpeculativeConfigResponse(_message.Message):
    __slots__ = ("pair", "config")
    PAIR_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    pair: str
    config: SpeculativeConfig
    def __init__(self, pair: _Optional[str] = ..., config: _Optional[_Union[SpeculativeConfig, _Mapping]] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class ChatMessages(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n", "seed")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    REPEAT_PENALTY_FIELD_NUMBER: _ClassVar[int]
    REPEAT_LAST_N_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repeat_penalty: float
    repeat_last_n: int
    seed: int
    def __init__(self, temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., min_p: _Optional[float] = ..., repeat_penalty: _Optional[float] = ..., repeat_last_n: _Optional[int] = ..., seed: _Optional[int] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("pair", "prompt", "messages", "tokens", "max_tokens", "stop", "sampling", "speculative", "request_id", "logprobs", "top_logprobs", "prompt_logprobs", "response_format", "n", "cache_prompt")
    PAIR_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    SPECULATIVE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FORMAT_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    CACHE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    pair: str
    prompt: str
    messages: ChatMessages
    tokens: TokenIds
    max_tokens: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    sampling: SamplingParams
    speculative: SpeculativeConfig
    request_id: str
    logprobs: bool
    top_logprobs: int
    prompt_logprobs: int
    response_format: ResponseFormat
    n: int
    cache_prompt: bool
    def __init__(self, pair: _Optional[str] = ..., prompt: _Optional[str] = ..., messages: _Optional[_Union[ChatMessages, _Mapping]] = ..., tokens: _Optional[_Union[TokenIds, _Mapping]] = ..., max_tokens: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., speculative: _Optional[_Union[SpeculativeConfig, _Mapping]] = ..., request_id: _Optional[str] = ..., logprobs: _Optional[bool] = ..., top_logprobs: _Optional[int] = ..., prompt_logprobs: _Optional[int] = ..., response_format: _Optional[_Union[ResponseFormat, _Mapping]] = ..., n: _Optional[int] = ..., cache_prompt: _Optional[bool] = ...) -> None: ...

class GenerateStreamRequest(_message.Message):
    __slots__ = ("pair", "prompt", "messages", "tokens", "max_tokens", "stop", "sampling", "speculative", "request_id", "logprobs", "top_logprobs", "prompt_logprobs", "response_format", "n", "cache_prompt")
    PAIR_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    SPECULATIVE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FORMAT_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    CACHE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    pair: str
    prompt: str
    messages: ChatMessages
    tokens: TokenIds
    max_tokens: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    sampling: SamplingParams
    speculative: SpeculativeConfig
    request_id: str
    logprobs: bool
    top_logprobs: int
    prompt_logprobs: int
    response_format: ResponseFormat
    n: int
    cache_prompt: bool
    def __init__(self, pair: _Optional[str] = ..., prompt: _Optional[str] = ..., messages: _Optional[_Union[ChatMessages, _Mapping]] = ..., tokens: _Optional[_Union[TokenIds, _Mapping]] = ..., max_tokens: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., speculative: _Optional[_Union[SpeculativeConfig, _Mapping]] = ..., request_id: _Optional[str] = ..., logprobs: _Optional[bool] = ..., top_logprobs: _Optional[int] = ..., prompt_logprobs: _Optional[int] = ..., response_format: _Optional[_Union[ResponseFormat, _Mapping]] = ..., n: _Optional[int] = ..., cache_prompt: _Optional[bool] = ...) -> None: ...

class ResponseFormat(_message.Message):
    __slots__ = ("json_object", "json_schema", "regex", "lark", "gbnf")
    JSON_OBJECT_FIELD_NUMBER: _ClassVar[int]
    JSON_SCHEMA_FIELD_NUMBER: _ClassVar[int]
    REGEX_FIELD_NUMBER: _ClassVar[int]
    LARK_FIELD_NUMBER: _ClassVar[int]
    GBNF_FIELD_NUMBER: _ClassVar[int]
    json_object: bool
    json_schema: str
    regex: str
    lark: str
    gbnf: str
    def __init__(self, json_object: _Optional[bool] = ..., json_schema: _Optional[str] = ..., regex: _Optional[str] = ..., lark: _Optional[str] = ..., gbnf: _Optional[str] = ...) -> None: ...

class TopLogprob(_message.Message):
    __slots__ = ("token", "text", "logprob", "bytes")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    token: int
    text: str
    logprob: float
    bytes: bytes
    def __init__(self, token: _Optional[int] = ..., text: _Optional[str] = ..., logprob: _Optional[float] = ..., bytes: _Optional[bytes] = ...) -> None: ...

class TokenLogprob(_message.Message):
    __slots__ = ("token", "text", "logprob", "bytes", "top")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    token: int
    text: str
    logprob: float
    bytes: bytes
    top: _containers.RepeatedCompositeFieldContainer[TopLogprob]
    def __init__(self, token: _Optional[int] = ..., text: _Optional[str] = ..., logprob: _Optional[float] = ..., bytes: _Optional[bytes] = ..., top: _Optional[_Iterable[_Union[TopLogprob, _Mapping]]] = ...) -> None: ...

class Choice(_message.Message):
    __slots__ = ("index", "text", "tokens", "finish_reason", "logprobs", "speculative_stats")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    SPECULATIVE_STATS_FIELD_NUMBER: _ClassVar[int]
    index: int
    text: str
    tokens: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: FinishReason
    logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    speculative_stats: SpeculativeStats
    def __init__(self, index: _Optional[int] = ..., text: _Optional[str] = ..., tokens: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., logprobs: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ..., speculative_stats: _Optional[_Union[SpeculativeStats, _Mapping]] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens", "cached_prompt_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., cached_prompt_tokens: _Optional[int] = ...) -> None: ...

class SpeculativeStats(_message.Message):
    __slots__ = ("drafted", "accepted", "acceptance_rate")
    DRAFTED_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    ACCEPTANCE_RATE_FIELD_NUMBER: _ClassVar[int]
    drafted: int
    accepted: int
    acceptance_rate: float
    def __init__(self, drafted: _Optional[int] = ..., accepted: _Optional[int] = ..., acceptance_rate: _Optional[float] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("queue_seconds", "prefill_seconds", "decode_seconds", "tokens_per_second", "time_to_first_token_seconds")
    QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DECODE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_TOKEN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    queue_seconds: float
    prefill_seconds: float
    decode_seconds: float
    tokens_per_second: float
    time_to_first_token_seconds: float
    def __init__(self, queue_seconds: _Optional[float] = ..., prefill_seconds: _Optional[float] = ..., decode_seconds: _Optional[float] = ..., tokens_per_second: _Optional[float] = ..., time_to_first_token_seconds: _Optional[float] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("text", "tokens", "finish_reason", "usage", "speculative_stats", "timings", "request_id", "logprobs", "prompt_logprobs", "choices")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    SPECULATIVE_STATS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    CHOICES_FIELD_NUMBER: _ClassVar[int]
    text: str
    tokens: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: FinishReason
    usage: Usage
    speculative_stats: SpeculativeStats
    timings: Timings
    request_id: str
    logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    prompt_logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    choices: _containers.RepeatedCompositeFieldContainer[Choice]
    def __init__(self, text: _Optional[str] = ..., tokens: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., speculative_stats: _Optional[_Union[SpeculativeStats, _Mapping]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., request_id: _Optional[str] = ..., logprobs: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ..., prompt_logprobs: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ..., choices: _Optional[_Iterable[_Union[Choice, _Mapping]]] = ...) -> None: ...

class GenerateStreamResponse(_message.Message):
    __slots__ = ("text", "tokens", "finish_reason", "usage", "speculative_stats", "timings", "request_id", "logprobs", "prompt_logprobs", "index")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    SPECULATIVE_STATS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    text: str
    tokens: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: FinishReason
    usage: Usage
    speculative_stats: SpeculativeStats
    timings: Timings
    request_id: str
    logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    prompt_logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    index: int
    def __init__(self, text: _Optional[str] = ..., tokens: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., speculative_stats: _Optional[_Union[SpeculativeStats, _Mapping]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., request_id: _Optional[str] = ..., logprobs: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ..., prompt_logprobs: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ..., index: _Optional[int] = ...) -> None: ...

class TokenizeRequest(_message.Message):
    __slots__ = ("pair", "text", "add_special", "parse_special")
    PAIR_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    ADD_SPECIAL_FIELD_NUMBER: _ClassVar[int]
    PARSE_SPECIAL_FIELD_NUMBER: _ClassVar[int]
    pair: str
    text: str
    add_special: bool
    parse_special: bool
    def __init__(self, pair: _Optional[str] = ..., text: _Optional[str] = ..., add_special: _Optional[bool] = ..., parse_special: _Optional[bool] = ...) -> None: ...

class TokenizeResponse(_message.Message):
    __slots__ = ("tokens",)
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, tokens: _Optional[_Iterable[int]] = ...) -> None: ...

class DetokenizeRequest(_message.Message):
    __slots__ = ("pair", "tokens", "skip_special")
    PAIR_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    SKIP_SPECIAL_FIELD_NUMBER: _ClassVar[int]
    pair: str
    tokens: _containers.RepeatedScalarFieldContainer[int]
    skip_special: bool
    def __init__(self, pair: _Optional[str] = ..., tokens: _Optional[_Iterable[int]] = ..., skip_special: _Optional[bool] = ...) -> None: ...

class DetokenizeResponse(_message.Message):
    __slots__ = ("text",)
    TEXT_FIELD_NUMBER: _ClassVar[int]
    text: str
    def __init__(self, text: _Optional[str] = ...) -> None: ...
