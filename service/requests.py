"""Generation requests and results as plain dataclasses (the servicer converts proto <-> these)."""

from __future__ import annotations

from dataclasses import dataclass, field

from service.params import SpeculativeConfig
from service.vocab import FinishReason

DEFAULT_TEMPERATURE = 0.8  # as llama.cpp: unset temperature means 0.8; 0 means greedy
# Largest prompt a server takes (--max-prompt-bytes), counted before tokenizing: text as UTF-8,
# messages and token ids as encoded on the wire. A flat 1 MiB holds ~250k tokens of English
# (~4 bytes a token) and 32k tokens even at 32 bytes a token: more than the largest contexts
# served, while the tokenizer's time on one request stays bounded.
DEFAULT_MAX_PROMPT_BYTES = 1 << 20


@dataclass(frozen=True)
class SamplingParams:
    """Sampling knobs; neutral values disable each filter."""

    temperature: float = DEFAULT_TEMPERATURE  # 0: greedy
    top_k: int = 40  # 0: off
    top_p: float = 0.95  # 1: off
    min_p: float = 0.05  # 0: off
    repeat_penalty: float = 1.0  # 1: off
    repeat_last_n: int = 64  # tokens the repetition penalty looks back over
    seed: int | None = None  # None: a random seed; a seed makes sampling reproducible

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass(frozen=True)
class GenRequest:
    """One generation: prompt token ids in, up to max_tokens out."""

    prompt: tuple[int, ...]
    max_tokens: int = 128
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()  # stop strings (not included in the output)
    speculative: SpeculativeConfig | None = None  # per-request override of the pair's live config
    request_id: str = ""


@dataclass(frozen=True)
class TokenDelta:
    """Tokens produced by one engine step for one request, and the text they completed."""

    tokens: tuple[int, ...]
    text: str


@dataclass(frozen=True)
class GenResult:
    """The summary of a finished generation."""

    text: str
    tokens: tuple[int, ...]
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    drafted: int  # draft tokens proposed for this request
    accepted: int  # draft tokens accepted by verification
    queue_seconds: float
    prefill_seconds: float
    decode_seconds: float
