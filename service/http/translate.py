"""An OpenAI request body -> GenRequest, as service/rpc/convert.py turns a GenerateRequest into one.

Both doors go through the same rules (service/edge/rules.py: prompt_ids_from_text / prompt_ids_from_messages,
check_text_bytes, check_token_ids, check_stop, speculative_with; SamplingParams and GenRequest
validate themselves), so a request is refused for the same reason whichever door it came by.
An InvalidArgument raised while a field is read carries that field's name as `param` (OpenAI's
error field); a field this server cannot honour is Unimplemented (HTTP 501), never dropped.
"""

from __future__ import annotations

import json
from contextlib import contextmanager

from service.common.errors import InvalidArgument, SpecserveError, Unimplemented
from service.edge import rules
from service.engine.request import GenRequest, ResponseFormat, SamplingParams
from service.fit.params import SpeculativeConfig
from service.http.schema import ChatCompletionRequest, CompletionRequest, GenerationBody

SAMPLING_FIELDS = ("temperature", "top_p", "seed", "top_k", "min_p", "repeat_penalty", "repeat_last_n")
ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name of the system role


@contextmanager
def param(name: str):
    """Errors raised inside name the request field `name` (the `param` of OpenAI's error shape)."""
    try:
        yield
    except SpecserveError as e:
        if getattr(e, "param", None) is None:
            e.param = name
        raise


def gen_request_from_openai(body: ChatCompletionRequest | CompletionRequest, tokenizer,
                            live_spec: SpeculativeConfig, default_max_tokens: int, max_prompt_bytes: int,
                            request_id: str) -> GenRequest:
    """A chat or text completion request as a GenRequest (the pair's tokenizer and live config given)."""
    refuse_unserved(body)
    chat = isinstance(body, ChatCompletionRequest)
    prompt = chat_prompt(body, tokenizer, max_prompt_bytes) if chat else text_prompt(body, tokenizer, max_prompt_bytes)
    max_tokens = body.max_completion_tokens if chat and body.max_completion_tokens is not None else body.max_tokens
    with param("stop"):
        stop = rules.check_stop([body.stop] if isinstance(body.stop, str) else body.stop or ())
    fields = dict(sampling=sampling(body), speculative=speculative(body, live_spec), logprobs=top_logprobs(body),
                  response_format=response_format(body))
    try:
        return GenRequest(prompt=tuple(prompt), max_tokens=default_max_tokens if max_tokens is None else max_tokens,
                          stop=stop, request_id=request_id, n=1 if body.n is None else body.n,
                          cache_prompt=True if body.cache_prompt is None else body.cache_prompt, **fields)
    except InvalidArgument as e:  # GenRequest's messages begin with the field's name
        e.param = named_field(e, ("max_tokens", "stop", "n", "logprobs"))
        if e.param == "logprobs" and chat:
            e.param = "top_logprobs"
        raise


def name_engine_error(e: InvalidArgument, chat: bool) -> None:
    """Set the `param` of an error the engine raised at submit (the prompt does not fit, a speculative
    override the pair's plan has no room for)."""
    e.param = named_field(e, ("prompt", "speculative"))
    if e.param == "prompt" and chat:
        e.param = "messages"


def named_field(e: InvalidArgument, names) -> str | None:
    """The field of `names` a message begins with ("stop: ...", "sampling.top_p 0: ..."), if any."""
    head = str(e).removeprefix("sampling.").split(":")[0].split(" ")[0]
    return head if head in names else None


def refuse_unserved(body: GenerationBody) -> None:
    """Unimplemented for a field set to something this server cannot honour."""
    unserved = [("frequency_penalty", body.frequency_penalty not in (None, 0)),
                ("presence_penalty", body.presence_penalty not in (None, 0)),
                ("logit_bias", bool(body.logit_bias))]
    if isinstance(body, ChatCompletionRequest):
        unserved.append(("tools", bool(body.tools)))
    else:
        unserved += [("echo", bool(body.echo)), ("suffix", bool(body.suffix)),
                     ("best_of", body.best_of not in (None, 1, body.n))]
    for name, asked in unserved:
        if asked:
            with param(name):
                raise Unimplemented(f"{name} is not served by this server: leave it unset")


def chat_prompt(body: ChatCompletionRequest, tokenizer, max_prompt_bytes: int) -> list[int]:
    """The messages through the chat template; content parts must be text."""
    messages = []
    for i, m in enumerate(body.messages):
        if isinstance(m.content, list):
            for j, part in enumerate(m.content):
                if part.type != "text" or part.text is None:
                    with param(f"messages.{i}.content.{j}"):
                        raise InvalidArgument(f"messages[{i}].content[{j}] is a {part.type!r} part: "
                                              "only text parts are served")
            content = "".join(p.text for p in m.content)
        else:
            content = m.content or ""
        messages.append((ROLE_ALIASES.get(m.role, m.role), content))
    with param("messages"):
        rules.check_text_bytes("".join(r + c for r, c in messages), "messages", max_prompt_bytes)
        ids = rules.prompt_ids_from_messages(messages, tokenizer, "messages")
        if not ids:
            raise InvalidArgument("the prompt (messages) has no tokens")
    return ids


def text_prompt(body: CompletionRequest, tokenizer, max_prompt_bytes: int) -> list[int]:
    """A text prompt (BOS added) or token ids; one prompt per request."""
    prompt = body.prompt
    with param("prompt"):
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise InvalidArgument(f"prompt holds {len(prompt)} prompts: send one prompt per request")
            prompt = prompt[0]
        if isinstance(prompt, str):
            rules.check_text_bytes(prompt, "prompt", max_prompt_bytes)
            ids = rules.prompt_ids_from_text(prompt, tokenizer)
        else:
            ids = rules.check_token_ids(prompt, tokenizer.vocab_size, "prompt")
        if not ids:
            raise InvalidArgument("the prompt has no tokens")
    return ids


def sampling(body: GenerationBody) -> SamplingParams:
    """The sampling fields the body sets; unset ones keep SamplingParams' defaults, as over gRPC."""
    fields = {name: getattr(body, name) for name in SAMPLING_FIELDS if getattr(body, name) is not None}
    try:
        return SamplingParams(**fields)
    except InvalidArgument as e:  # "sampling.<field> ...": the body's field has the same name
        e.param = named_field(e, fields)
        raise


def speculative(body: GenerationBody, live: SpeculativeConfig) -> SpeculativeConfig | None:
    """The vendor `speculative` object (and llama-server's `speculative.n_max` spellings) over the live config;
    None when the body sets none of them."""
    changes = body.speculative.model_dump(exclude_none=True) if body.speculative is not None else {}
    for name in ("n_max", "n_min", "p_min"):
        value = getattr(body, f"speculative_{name}")
        if value is not None:
            changes.setdefault(name, value)
    if not changes:
        return None
    with param("speculative"):
        return rules.speculative_with(live, changes)


def top_logprobs(body: ChatCompletionRequest | CompletionRequest) -> int | None:
    """GenRequest.logprobs: None (none), or how many alternatives each generated token's logprob comes with."""
    if isinstance(body, CompletionRequest):
        return body.logprobs
    if body.top_logprobs is not None and not body.logprobs:
        with param("top_logprobs"):
            raise InvalidArgument("top_logprobs needs logprobs: true")
    return (body.top_logprobs or 0) if body.logprobs else None


def response_format(body: GenerationBody) -> ResponseFormat | None:
    """text -> None; json_object -> any JSON object (or, with llama-server's `schema`, that schema);
    json_schema -> its `json_schema.schema`."""
    rf = body.response_format
    if rf is None or rf.type == "text":
        return None
    with param("response_format"):
        if rf.type == "json_object":
            return ResponseFormat("json_schema", json.dumps(rf.schema_)) if rf.schema_ else \
                ResponseFormat("json_object")
        if rf.json_schema is None or rf.json_schema.schema_ is None:
            raise InvalidArgument("response_format json_schema needs json_schema.schema (a JSON Schema)")
        return ResponseFormat("json_schema", json.dumps(rf.json_schema.schema_))
