"""The request rules both doors share, protocol-neutral: the gRPC door (service/rpc/convert.py) and
the OpenAI HTTP door (service/http/translate.py) turn their own messages into these calls, so a prompt,
a pair name, stop strings or a speculative override is judged the same whichever door it came through.

Each rule raises errors.InvalidArgument naming the field as the caller spells it.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace

from service.common.errors import InvalidArgument
from service.config.settings import MAX_MESSAGES, MAX_STOP_STRINGS, SpeculativeConfig

DEFAULT_PAIR = "default"
PAIR_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


def pair_name(name: str) -> str:
    """A request's pair name: empty -> "default"; anything but [A-Za-z0-9._-]{1,64} is refused."""
    name = name or DEFAULT_PAIR
    if not PAIR_NAME.fullmatch(name):
        raise InvalidArgument(f"pair name {name!r}: use 1 to 64 letters, digits, '.', '_' or '-'")
    return name


def speculative_with(base: SpeculativeConfig, changes: dict) -> SpeculativeConfig:
    """`base` with `changes` (SpeculativeConfig field -> value; every door's override goes through here).
    Setting only n_max lowers n_min to fit under it."""
    if "p_min" in changes and not math.isfinite(changes["p_min"]):
        raise InvalidArgument("speculative.p_min must be a number within [0, 1]")
    if "n_max" in changes and "n_min" not in changes:
        changes = {**changes, "n_min": min(base.n_min, changes["n_max"])}
    return replace(base, **changes)  # SpeculativeConfig validates itself


def check_text_bytes(text: str, field: str, max_bytes: int) -> None:
    """Refuse a text longer than `max_bytes` as UTF-8 before anything (the tokenizer) reads it."""
    if len(text) > max_bytes or len(text.encode("utf-8")) > max_bytes:
        raise InvalidArgument(f"{field} is {len(text.encode('utf-8'))} bytes, this server takes at most "
                              f"{max_bytes} (--max-prompt-bytes)")


def prompt_ids_from_text(text: str, tokenizer) -> list[int]:
    """A text prompt's ids: the model's special tokens (BOS) added, control tokens parsed."""
    return tokenizer.encode(text, add_special=True, parse_special=True)


def prompt_ids_from_messages(messages: list[tuple[str, str]], tokenizer, field: str) -> list[int]:
    """A conversation's ids: (role, content) pairs through the model's chat template (which holds BOS
    if any); `field` names the messages in errors."""
    if not messages:
        raise InvalidArgument(f"{field} is empty: give at least one message")
    if len(messages) > MAX_MESSAGES:
        raise InvalidArgument(f"{field}: at most {MAX_MESSAGES} messages (got {len(messages)})")
    for i, (role, _) in enumerate(messages):
        if not role:
            raise InvalidArgument(f"{field}[{i}].role is empty (use system, user or assistant)")
    text = tokenizer.apply_chat_template([{"role": role, "content": content} for role, content in messages])
    return tokenizer.encode(text, add_special=False, parse_special=True)


def check_token_ids(ids, vocab_size: int, field: str) -> list[int]:
    """Token ids, each below the vocabulary size."""
    ids = list(ids)
    bad = [i for i in ids if i >= vocab_size]
    if bad:
        raise InvalidArgument(f"{field}: id {bad[0]} is not below the vocabulary size {vocab_size}")
    return ids


def check_stop(stop) -> tuple[str, ...]:
    """Stop strings, at most MAX_STOP_STRINGS (GenRequest refuses empty ones)."""
    stop = tuple(stop)
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidArgument(f"stop: at most {MAX_STOP_STRINGS} stop strings (got {len(stop)})")
    return stop
