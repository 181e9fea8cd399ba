"""Structured output: a request's ResponseFormat enforced token by token with llguidance.

    Grammars(tokenizer).compile(fmt)      -> check it at submit time (InvalidArgument: the library's message)
    Grammars(tokenizer).matcher(fmt)      -> a Matcher: one slot's position in the grammar
    Grammars.constrain(rows)              -> the target's logits with forbidden tokens at -inf

llguidance (guidance-ai, MIT; Rust with Python bindings, no other dependency) was chosen over
xgrammar by measuring both on the SmolLM2 vocabulary (bench/bench_grammar.py): it compiles a
nested JSON Schema ~5x faster (~2 ms vs ~9 ms), its per-token mask (tens of microseconds) is far
below a decode step, it reads all five kinds the proto has (xgrammar has no Lark), it rolls
back consumed tokens and computes the masks of a draft in one call, and it installs without
torch, transformers and triton (xgrammar requires all three, ~1.5 GB).

Speculation: row i of a slot's verify batch follows d_1..d_i, so its mask is the grammar's
state after d_1..d_i (`masks_along`: consume the drafts, read each mask, roll back). Drafts are
checked before verification (`valid_prefix`): a token the grammar forbids ends the draft. The
matcher advances only by the tokens the slot keeps (`advance`), so a rejected draft never
touches its state.

EOS: the tokenizer's end-of-generation ids are the grammar's EOS, allowed exactly where the
grammar accepts; once the grammar is complete (`advance` returns True) the request stops.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass

import llguidance as llg
import numpy as np
from llguidance.gbnf_to_lark import gbnf_to_lark

from service.common.errors import InvalidArgument
from service.engine.request import ResponseFormat

CACHE_MAX = 64  # compiled grammars kept per pair (least recently used dropped first)
JSON_OBJECT_SCHEMA = '{"type": "object"}'  # OpenAI's json_object: any JSON object
# JSON is written compactly (`,` and `:` with no whitespace between tokens): a bounded schema then
# has a bounded output, and a small model cannot spend its tokens on blank lines. A schema may ask
# for other layout with llguidance's "x-guidance" key, e.g. {"whitespace_flexible": true}.
JSON_OPTIONS = {"whitespace_flexible": False}


def grammar_text(fmt: ResponseFormat) -> str:
    """llguidance's grammar for a format; InvalidArgument when the text is not even parseable."""
    try:
        if fmt.kind == "json_object":
            return llg.LLMatcher.grammar_from_json_schema(JSON_OBJECT_SCHEMA, defaults=JSON_OPTIONS)
        if fmt.kind == "json_schema":
            schema = json.loads(fmt.value)
            if not isinstance(schema, (dict, bool)):
                raise InvalidArgument("response_format.json_schema: a JSON Schema is an object or a boolean")
            return llg.LLMatcher.grammar_from_json_schema(fmt.value, defaults=JSON_OPTIONS)
        if fmt.kind == "regex":
            return llg.LLMatcher.grammar_from_regex(fmt.value)
        if fmt.kind == "lark":
            return llg.LLMatcher.grammar_from_lark(fmt.value)
        return llg.LLMatcher.grammar_from_lark(gbnf_to_lark(fmt.value))  # gbnf
    except InvalidArgument:
        raise
    except Exception as e:  # json.JSONDecodeError, the GBNF converter's errors, ValueError
        raise InvalidArgument(f"response_format.{fmt.kind}: {e}") from e


class _Vocab:
    """What llguidance's TokenizerWrapper reads: each token's bytes, EOS, and the text -> ids function."""

    def __init__(self, tok):
        control = tok.control_ids
        self.eos_token_id = tok.eos_id if tok.eos_id is not None else min(tok.eog_ids)
        self.bos_token_id = tok.bos_id
        # control tokens carry llguidance's 0xff mark: they never match grammar text
        self.tokens = [b"\xff" + p if i in control else p for i, p in enumerate(tok.token_pieces)]
        self.special_token_ids = sorted(control)
        self._tok = tok

    def __call__(self, text: bytes | str) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tok.encode(text, add_special=False, parse_special=False)


@dataclass
class Matcher:
    """One slot's position in its grammar; consumed tokens are exactly the slot's generated ones."""

    m: llg.LLMatcher
    grammars: "Grammars"

    def valid_prefix(self, tokens) -> int:
        """How many of `tokens` the grammar allows in a row from here (state unchanged)."""
        return self.m.validate_tokens(list(tokens)) if tokens else 0

    def advance(self, token: int) -> bool:
        """Consume a generated token; True when the grammar is complete (nothing but EOS may follow)."""
        if not self.m.consume_token(int(token)):
            raise RuntimeError(f"grammar matcher refused token {token}: {self.m.get_error()}")
        return self.m.is_stopped()

    def mask_after(self, prefix) -> np.ndarray | None:
        """Allowed tokens (n_vocab,) bool after the (valid) tokens `prefix`, None past the grammar's end
        (after EOS); the state is unchanged."""
        if not self.grammars.eos.isdisjoint(prefix):
            return None
        allowed = self.grammars.masks([(self, tuple(prefix))], fill_end=False)[-1]
        return allowed if allowed.any() else None


class Grammars:
    """Compiles response formats for one pair's tokenizer (cached, bounded) and masks logits."""

    def __init__(self, tokenizer, n_vocab: int, cache_max: int = CACHE_MAX):
        self.n_vocab = n_vocab
        self.eos = frozenset(tokenizer.eog_ids)  # the grammar's EOS: every end-of-generation token
        self.tok = llg.LLTokenizer(llg.TokenizerWrapper(_Vocab(tokenizer)), n_vocab=n_vocab,
                                   eos_token=sorted(self.eos))
        self.n_words = (n_vocab + 31) // 32  # mask: one bit per token, 32 to an int32
        self._cache: OrderedDict[tuple[str, str], llg.LLMatcher] = OrderedDict()
        self._cache_max = cache_max
        self._lock = threading.Lock()  # submit threads compile while the engine thread copies
        self._executor = llg.LLExecutor()

    def compile(self, fmt: ResponseFormat) -> llg.LLMatcher:
        """The grammar of `fmt` in its start state (a template: copy it); InvalidArgument with
        llguidance's message when the schema, regex or grammar is invalid."""
        key = (fmt.kind, fmt.value)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        m = llg.LLMatcher(self.tok, grammar_text(fmt), log_level=0)  # compiles without the GIL
        if m.is_error():
            raise InvalidArgument(f"response_format.{fmt.kind}: {m.get_error()}")
        with self._lock:
            self._cache[key] = m
            while len(self._cache) > self._cache_max:
                self._cache.popitem(last=False)
        return m

    def matcher(self, fmt: ResponseFormat) -> Matcher:
        """A fresh matcher of `fmt` for one slot."""
        return Matcher(self.compile(fmt).deep_copy(), self)

    def masks(self, asks: list[tuple[Matcher, tuple[int, ...]]], fill_end: bool = True) -> np.ndarray:
        """Allowed tokens (n_rows, n_vocab) bool: for each (matcher, drafts d_1..d_k), k + 1 rows, row i
        the grammar's state after d_1..d_i (the drafts must be a valid prefix). One parallel call.
        fill_end: a row past the grammar's end (a draft was EOS) allows EOS, so every row is a distribution
        (what is sampled there is dropped: the output ends at that EOS)."""
        n_rows = sum(len(d) + 1 for _, d in asks)
        bits = np.zeros((n_rows, self.n_words), np.int32)
        plain, drafted, row = [], [], 0
        for mt, drafts in asks:
            if drafts:
                drafted.append((mt.m, row, list(drafts)))
            else:
                plain.append((mt.m, row))
            row += len(drafts) + 1
        ptr, one = bits.ctypes.data, self.n_words * 4
        if plain:
            self._executor.unsafe_compute_mask_ptr(plain, ptr, one, n_rows)
        if drafted:  # llguidance consumes each slot's drafts, writes the masks along them, rolls back
            self._executor.unsafe_compute_mask_ptr_with_draft_token(drafted, ptr, one, n_rows)
        allowed = np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little")[:, :self.n_vocab]
        allowed = allowed.astype(bool)
        if fill_end:
            allowed[np.ix_(~allowed.any(axis=1), sorted(self.eos))] = True
        return allowed


def constrain(logits: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Logits with the tokens the grammar forbids at -inf (a copy); shapes (..., n_vocab)."""
    return np.where(allowed, logits, np.float32(-np.inf)).astype(logits.dtype, copy=False)


def constrain_verify_rows(grammars: "Grammars | None", work, logits: np.ndarray) -> np.ndarray:
    """The target's logits with what each row's grammar forbids at -inf: row i of a slot's verify rows
    follows its drafts d_1..d_i, so its mask is the grammar's state after them. work: the step's SlotWork
    (service/engine/scheduler.py); grammars: the engine's, None while no request asked for a format."""
    ws = [w for w in work if w.complete and w.slot.grammar is not None]
    if not ws:
        return logits
    allowed = grammars.masks([(w.slot.grammar, w.drafts) for w in ws])
    rows = np.concatenate([np.asarray(w.logit_rows) for w in ws])
    out = logits.copy()
    out[rows] = constrain(out[rows], allowed)
    return out
