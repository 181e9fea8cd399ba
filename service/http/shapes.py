"""Engine results -> OpenAI's response bodies: the chat and the text completion shapes, usage, logprobs.

What the engine returns is read in one place (completions_of, usage_of, token_views): GenResult.choices
(every completion when n > 1), GenResult.cached_prompt_tokens, and the engine's TokenLogprob entries,
given their text and bytes by the pair's tokenizer as the gRPC door does (service/rpc/convert.py).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from service.engine.request import GenResult
from service.http import schema as s


@dataclass(frozen=True)
class TokenView:
    """A token's logprob with its text and bytes (the tokenizer's), and its alternatives likewise."""

    token: int
    text: str
    bytes: bytes
    logprob: float
    top: tuple[TokenView, ...] = ()


def token_views(entries, tokenizer) -> list[TokenView]:
    """Engine TokenLogprobs (token, logprob, top as (token, logprob) pairs) with text and bytes."""
    def view(token: int, logprob: float, top=()) -> TokenView:
        b = tokenizer.token_bytes(token)
        return TokenView(token, b.decode("utf-8", errors="replace"), b, logprob, tuple(view(t, v) for t, v in top))

    return [view(e.token, e.logprob, e.top) for e in entries]


@dataclass
class Done:
    """One finished completion: index, text, why it ended, its tokens' logprobs (engine objects)."""

    index: int
    text: str
    finish_reason: str
    logprobs: list = field(default_factory=list)


def completions_of(result: GenResult, tokenizer) -> list[Done]:
    """Every completion of a result in index order (GenResult.choices; a bare result is completion 0)."""
    return [Done(c.index, c.text, c.finish_reason, token_views(c.logprobs, tokenizer))
            for c in (result.choices or (result,))]


def usage_of(result: GenResult) -> s.Usage:
    return s.Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                   total_tokens=result.prompt_tokens + result.completion_tokens,
                   prompt_tokens_details=s.PromptTokensDetails(cached_tokens=result.cached_prompt_tokens))


def stats_of(result: GenResult, request_id: str, ttft: float) -> s.SpecserveStats:
    tps = result.completion_tokens / result.decode_seconds if result.decode_seconds > 0 else 0.0
    return s.SpecserveStats(
        request_id=request_id, drafted=result.drafted, accepted=result.accepted,
        acceptance_rate=result.accepted / result.drafted if result.drafted else 0.0,
        timings=s.Timings(queue_seconds=result.queue_seconds, prefill_seconds=result.prefill_seconds,
                          decode_seconds=result.decode_seconds, tokens_per_second=tps,
                          time_to_first_token_seconds=ttft))


def _bytes(x: TokenView) -> list[int]:
    return list(x.bytes)


def chat_logprobs(items: list) -> s.ChatLogprobs:
    """Engine token logprobs (token, text, logprob, bytes, top) in the chat API's shape."""
    return s.ChatLogprobs(content=[
        s.TokenLogprobOut(token=x.text, logprob=x.logprob, bytes=_bytes(x),
                          top_logprobs=[s.TopLogprobOut(token=t.text, logprob=t.logprob, bytes=_bytes(t))
                                        for t in x.top])
        for x in items])


def completion_logprobs(items: list, offset: int = 0) -> s.CompletionLogprobs:
    """Engine token logprobs in the legacy completions shape; text offsets count from `offset`."""
    offsets = list(itertools.accumulate((len(x.text) for x in items), initial=offset))[:-1]
    return s.CompletionLogprobs(tokens=[x.text for x in items], token_logprobs=[x.logprob for x in items],
                                top_logprobs=[{t.text: t.logprob for t in x.top} for x in items],
                                text_offset=offsets)


# ---- the two APIs' shapes ----

@dataclass(frozen=True)
class Reply:
    """What every response and chunk of one request repeats."""

    id: str
    created: int
    model: str


class ChatShape:
    """/v1/chat/completions: `message` / `delta` with role and content."""

    id_prefix = "chatcmpl"
    request = s.ChatCompletionRequest

    @staticmethod
    def unary(r: Reply, done: list[Done], usage: s.Usage, stats: s.SpecserveStats, with_logprobs: bool):
        return s.ChatCompletion(id=r.id, created=r.created, model=r.model, usage=usage, specserve=stats, choices=[
            s.ChatChoice(index=d.index, message=s.AssistantMessage(content=d.text), finish_reason=d.finish_reason,
                         logprobs=chat_logprobs(d.logprobs) if with_logprobs else None) for d in done])

    @staticmethod
    def chunk(r: Reply, index: int, text: str | None = None, logprobs: list | None = None, role: bool = False,
              finish_reason: str | None = None, stats: s.SpecserveStats | None = None, offset: int = 0):
        choice = s.ChatChunkChoice(index=index, delta=s.Delta(role="assistant" if role else None, content=text),
                                   logprobs=chat_logprobs(logprobs) if logprobs else None,
                                   finish_reason=finish_reason)
        return s.ChatCompletionChunk(id=r.id, created=r.created, model=r.model, choices=[choice], specserve=stats)

    @staticmethod
    def usage_chunk(r: Reply, usage: s.Usage):
        return s.ChatCompletionChunk(id=r.id, created=r.created, model=r.model, choices=[], usage=usage)


class CompletionShape:
    """/v1/completions: `text` in every choice and chunk."""

    id_prefix = "cmpl"
    request = s.CompletionRequest

    @staticmethod
    def unary(r: Reply, done: list[Done], usage: s.Usage, stats: s.SpecserveStats, with_logprobs: bool):
        return s.Completion(id=r.id, created=r.created, model=r.model, usage=usage, specserve=stats, choices=[
            s.CompletionChoice(index=d.index, text=d.text, finish_reason=d.finish_reason,
                               logprobs=completion_logprobs(d.logprobs) if with_logprobs else None) for d in done])

    @staticmethod
    def chunk(r: Reply, index: int, text: str | None = None, logprobs: list | None = None, role: bool = False,
              finish_reason: str | None = None, stats: s.SpecserveStats | None = None, offset: int = 0):
        choice = s.CompletionChoice(index=index, text=text or "", finish_reason=finish_reason,
                                    logprobs=completion_logprobs(logprobs, offset) if logprobs else None)
        return s.Completion(id=r.id, created=r.created, model=r.model, choices=[choice], specserve=stats)

    @staticmethod
    def usage_chunk(r: Reply, usage: s.Usage):
        return s.Completion(id=r.id, created=r.created, model=r.model, choices=[], usage=usage)
