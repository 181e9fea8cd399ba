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

Bounds (one client's grammar must never cost the others): a format's text is at most
MAX_GRAMMAR_BYTES (refused before it is parsed, so refusing a huge grammar is quick); llguidance
compiles and matches under LIMITS (lexer fuel and states bound the time and memory a lazily
exploding regex or a recursive rule can take). A grammar that passes the submit-time check and
fails later (a limit met at a token) leaves its matcher in an error state: `Matcher.check` and
`advance` raise GrammarFailed (RESOURCE_EXHAUSTED) for that request alone, and `forget` drops its
compiled template from the cache so what it built is released. The cache is bounded by an
estimate of its bytes as well as by entries. Library messages reach the client only through
`library_message` (no panic, no backtrace, no parser state dump).
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass

import llguidance as llg
import numpy as np
from llguidance.gbnf_to_lark import gbnf_to_lark

from service.common.errors import InvalidArgument, ResourceExhausted
from service.common.memory import release as release_freed_memory  # a failed grammar's lexer: tens of MB
from service.engine.request import ResponseFormat

CACHE_MAX = 64  # compiled grammars kept per pair (least recently used dropped first)
CACHE_BYTES = 64 << 20  # ... and at most about this many bytes of them (entry_bytes estimates each)
# A format's text (schema, regex or grammar): 128 KiB compiles in ~0.2 s on one core; llguidance's time
# grows faster than the text (a 1 MB GBNF of 100k alternatives took 9-18 s to be refused).
MAX_GRAMMAR_BYTES = 128 << 10
# llguidance's parser limits. Lexer fuel (~50k/ms) and lexer states (~1-2 kB each) bound what one
# grammar may build: `^(a{1000}){1000}$` took ~150 MB under the defaults (1M fuel, 250k states) and
# takes ~15-45 MB under these; every grammar of the tests and the benchmark compiles within them.
LIMITS = dict(initial_lexer_fuel=200_000, step_lexer_fuel=100_000, step_max_items=50_000,
              max_lexer_states=20_000, max_grammar_size=200_000, verbose_errors=False)
BYTES_PER_GRAMMAR_BYTE = 128  # entry_bytes: a compiled grammar's size per byte of its llguidance text
ENTRY_BASE_BYTES = 32 << 10  # ... plus its lexer's start (the token trie is shared, not counted)
JSON_OBJECT_SCHEMA = '{"type": "object"}'  # OpenAI's json_object: any JSON object
# JSON is written compactly (`,` and `:` with no whitespace between tokens): a bounded schema then
# has a bounded output, and a small model cannot spend its tokens on blank lines. A schema may ask
# for other layout with llguidance's "x-guidance" key, e.g. {"whitespace_flexible": true}.
JSON_OPTIONS = {"whitespace_flexible": False}


class GrammarFailed(ResourceExhausted):
    """A grammar that compiled but met a limit (or another error) while matching generated tokens."""


_CUT = re.compile(r"\n?\s*(<backtrace>|<state>|<non-verbose/>|stack backtrace:)")
MESSAGE_MAX = 300


def library_message(text: str) -> str:
    """llguidance's message as a client may see it: no Rust panic or backtrace, no parser state, one line."""
    m = _CUT.search(text)
    text = (text[:m.start()] if m else text).strip()
    if text.startswith("panic:") or "panicked at" in text:
        text = "the grammar library could not handle this grammar (" + text.split(":", 1)[-1].strip() + ")"
    text = " ".join(text.split())
    return text if len(text) <= MESSAGE_MAX else text[:MESSAGE_MAX - 3] + "..."


def check_size(fmt: ResponseFormat) -> None:
    """InvalidArgument for a format text over MAX_GRAMMAR_BYTES, before anything parses it."""
    n = len(fmt.value.encode("utf-8")) if len(fmt.value) <= MAX_GRAMMAR_BYTES else len(fmt.value)
    if n > MAX_GRAMMAR_BYTES:
        raise InvalidArgument(f"response_format.{fmt.kind} is {n} bytes, this server takes at most "
                              f"{MAX_GRAMMAR_BYTES}: send a smaller schema, regex or grammar")


def grammar_text(fmt: ResponseFormat) -> str:
    """llguidance's grammar for a format; InvalidArgument when the text is not even parseable or too large."""
    check_size(fmt)
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
        raise InvalidArgument(f"response_format.{fmt.kind}: {library_message(str(e))}") from e


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
    fmt: ResponseFormat | None = None  # what it was compiled from (forgotten by the cache when it fails)

    def check(self) -> None:
        """GrammarFailed when the matcher met a limit or an error (it never leaves that state)."""
        if self.m.is_error():
            self.fail()

    def fail(self) -> None:
        """Raise GrammarFailed with the library's reason; the template it was copied from is dropped."""
        reason = library_message(self.m.get_error()) or "the grammar matcher failed"
        if self.fmt is not None:
            self.grammars.forget(self.fmt)
        raise GrammarFailed(f"response_format.{self.fmt.kind if self.fmt else 'grammar'}: the grammar went past "
                            f"this server's limits while generating ({reason}); simplify the schema, regex or grammar")

    def valid_prefix(self, tokens) -> int:
        """How many of `tokens` the grammar allows in a row from here (state unchanged)."""
        return self.m.validate_tokens(list(tokens)) if tokens else 0

    def advance(self, token: int) -> bool:
        """Consume a generated token; True when the grammar is complete (nothing but EOS may follow)."""
        if not self.m.consume_token(int(token)):
            self.fail()
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

    def __init__(self, tokenizer, n_vocab: int, cache_max: int = CACHE_MAX, cache_bytes: int = CACHE_BYTES):
        self.n_vocab = n_vocab
        self.eos = frozenset(tokenizer.eog_ids)  # the grammar's EOS: every end-of-generation token
        self.tok = llg.LLTokenizer(llg.TokenizerWrapper(_Vocab(tokenizer)), n_vocab=n_vocab,
                                   eos_token=sorted(self.eos))
        self.n_words = (n_vocab + 31) // 32  # mask: one bit per token, 32 to an int32
        self._cache: OrderedDict[tuple[str, str], tuple[llg.LLMatcher, int]] = OrderedDict()  # -> (template, bytes)
        self._cache_max, self._cache_bytes_max = cache_max, cache_bytes
        self.cache_bytes = 0  # the estimate of what the cache holds (entry_bytes of each entry)
        self._limits = llg.LLParserLimits(**LIMITS)
        self._lock = threading.Lock()  # submit threads compile while the engine thread copies
        self._executor = llg.LLExecutor()

    def compile(self, fmt: ResponseFormat) -> llg.LLMatcher:
        """The grammar of `fmt` in its start state (a template: copy it); InvalidArgument with
        llguidance's message when the schema, regex or grammar is invalid."""
        key = (fmt.kind, fmt.value)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key][0]
        text = grammar_text(fmt)
        m = llg.LLMatcher(self.tok, text, log_level=0, limits=self._limits)  # compiles without the GIL
        if m.is_error():
            error = m.get_error()
            del m
            release_freed_memory()
            raise InvalidArgument(f"response_format.{fmt.kind}: {library_message(error)}")
        size = entry_bytes(text)
        with self._lock:
            if key not in self._cache:
                self.cache_bytes += size
            self._cache[key] = (m, size)
            while len(self._cache) > self._cache_max or (self.cache_bytes > self._cache_bytes_max
                                                          and len(self._cache) > 1):
                self.cache_bytes -= self._cache.popitem(last=False)[1][1]
        return m

    def forget(self, fmt: ResponseFormat) -> None:
        """Drop `fmt`'s compiled template (a grammar that failed while matching): what it built is freed
        once the slots holding its copies are released."""
        with self._lock:
            entry = self._cache.pop((fmt.kind, fmt.value), None)
            if entry is not None:
                self.cache_bytes -= entry[1]
        del entry
        release_freed_memory()

    def matcher(self, fmt: ResponseFormat) -> Matcher:
        """A fresh matcher of `fmt` for one slot."""
        return Matcher(self.compile(fmt).deep_copy(), self, fmt)

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


def entry_bytes(text: str) -> int:
    """The estimated bytes of one compiled grammar: its llguidance text's size times a measured factor
    (SmolLM2's vocabulary: 75 B/B for 150 kB GBNFs, 128 B/B for 6 kB JSON Schemas, ~30 kB for a short
    regex), plus its lexer's start. What the lexer builds lazily while matching is not counted: the
    LIMITS bound it (max_lexer_states), and a grammar that meets them is forgotten."""
    return ENTRY_BASE_BYTES + BYTES_PER_GRAMMAR_BYTE * len(text)


def constrain(logits: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Logits with the tokens the grammar forbids at -inf (a copy); shapes (..., n_vocab)."""
    return np.where(allowed, logits, np.float32(-np.inf)).astype(logits.dtype, copy=False)


def constrain_verify_rows(grammars: "Grammars | None", work, logits: np.ndarray, fail) -> np.ndarray:
    """The target's logits with what each row's grammar forbids at -inf: row i of a slot's verify rows
    follows its drafts d_1..d_i, so its mask is the grammar's state after them. work: the step's SlotWork
    (service/engine/scheduler.py); grammars: the engine's, None while no request asked for a format;
    fail(slot, error): ends one slot's request (its grammar failed), the others' rows are still constrained.
    The masks are computed together; when that raises, one slot at a time, to find whose grammar it was."""
    ws = [w for w in work if w.complete and w.slot.grammar is not None]
    if not ws:
        return logits
    try:
        allowed = grammars.masks([(w.slot.grammar, w.drafts) for w in ws])
    except Exception:  # noqa: BLE001 - find whose grammar it was: each slot's masks alone
        return _constrain_each(grammars, ws, logits, fail)
    out, row = logits.copy(), 0
    for w in ws:
        n = len(w.drafts) + 1
        if _grammar_ok(w.slot, fail):
            rows = np.asarray(w.logit_rows)
            out[rows] = constrain(out[rows], allowed[row:row + n])
        row += n
    return out


def _constrain_each(grammars: Grammars, ws: list, logits: np.ndarray, fail) -> np.ndarray:
    """constrain_verify_rows one slot at a time (the batched call raised): a slot whose masks fail is ended."""
    out = logits.copy()
    for w in ws:
        try:
            allowed = grammars.masks([(w.slot.grammar, w.drafts)])
        except Exception as e:  # noqa: BLE001 - this request's grammar, this request's failure
            fail(w.slot, e)
            continue
        if _grammar_ok(w.slot, fail):
            rows = np.asarray(w.logit_rows)
            out[rows] = constrain(out[rows], allowed)
    return out


def _grammar_ok(slot, fail) -> bool:
    """False (and the slot's request ended with GrammarFailed) when its matcher met a limit."""
    try:
        slot.grammar.check()
    except GrammarFailed as e:
        fail(slot, e)
        return False
    return True
