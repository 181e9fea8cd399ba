"""OpenAI's request and response bodies as pydantic models, and specserve's vendor extensions.

Requests ignore fields they do not know (OpenAI's API does; clients send `user`, `store`, ...).
Fields a client may set but this server cannot honour (penalties, tools, logit_bias, ...) are typed
here and refused in translate.py with a 501 naming them, never silently dropped.
Vendor extensions (as llama-server's extra fields): `top_k`, `min_p`, `repeat_penalty`,
`repeat_last_n`, `cache_prompt`, and the per-request speculative config `speculative` (or
llama-server's spellings `speculative.n_max`, `speculative.n_min`, `speculative.p_min`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

U64 = 1 << 64


class Body(BaseModel):
    """A request body: unknown fields ignored."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)


# ---- requests ----

class ContentPart(Body):
    """One part of a message's content; only {"type": "text"} parts are served (the models read text)."""

    type: str
    text: str | None = None


class ChatMessage(Body):
    role: str
    content: str | list[ContentPart] | None = None  # None: an assistant turn that only called tools


class SpeculativeOverride(Body):
    """Vendor extension: this request's speculative config; unset fields keep the pair's live values."""

    type: Literal["none", "draft", "ngram"] | None = None
    n_max: int | None = Field(None, ge=0)
    n_min: int | None = Field(None, ge=0)
    p_min: float | None = None
    ngram_min: int | None = Field(None, ge=0)
    ngram_max: int | None = Field(None, ge=0)


class JsonSchemaFormat(Body):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormatIn(Body):
    """`{"type": "text" | "json_object" | "json_schema", "json_schema": {"name", "schema", "strict"}}`;
    llama-server's `{"type": "json_object", "schema": {...}}` is a JSON Schema too."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")


class StreamOptions(Body):
    include_usage: bool = False  # one more chunk before [DONE]: empty choices and the request's usage


class GenerationBody(Body):
    """The fields /v1/chat/completions and /v1/completions share."""

    model: str = ""  # a loaded pair's name; "" = "default", as an empty `pair` over gRPC
    max_tokens: int | None = Field(None, ge=0)  # None: the server's -n
    temperature: float | None = None  # None: the server's default (SamplingParams: 0.8), as over gRPC
    top_p: float | None = None
    seed: int | None = Field(None, ge=0, lt=U64)
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormatIn | None = None
    # typed so that a request relying on them is refused (501), not served without them
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # vendor extensions (llama-server's names)
    top_k: int | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    repeat_last_n: int | None = None
    cache_prompt: bool | None = None
    speculative: SpeculativeOverride | None = None
    speculative_n_max: int | None = Field(None, alias="speculative.n_max", ge=0)
    speculative_n_min: int | None = Field(None, alias="speculative.n_min", ge=0)
    speculative_p_min: float | None = Field(None, alias="speculative.p_min")


class ChatCompletionRequest(GenerationBody):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(None, ge=0)  # OpenAI's newer name of max_tokens; wins over it
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None


class CompletionRequest(GenerationBody):
    """POST /v1/completions (the legacy text API)."""

    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None  # top alternatives per token (OpenAI allows 0 to 5; this server 0 to 20)
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None


# ---- responses ----

class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class Timings(BaseModel):
    queue_seconds: float
    prefill_seconds: float
    decode_seconds: float
    tokens_per_second: float
    time_to_first_token_seconds: float


class SpecserveStats(BaseModel):
    """Vendor extension on a response (and a stream's last chunk): what speculation did, where time went."""

    request_id: str
    drafted: int
    accepted: int
    acceptance_rate: float
    timings: Timings


class TopLogprobOut(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobOut(TopLogprobOut):
    top_logprobs: list[TopLogprobOut]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprobOut]


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    specserve: SpecserveStats


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    specserve: SpecserveStats | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class Completion(BaseModel):
    """A /v1/completions response, and (object "text_completion" too, as OpenAI's) each stream chunk."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    specserve: SpecserveStats | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "specserve"
    state: str  # vendor extension: loading, ready or draining (only ready pairs serve)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail
