"""Tokenizer and chat template, built from a GGUF file's ``tokenizer.ggml.*`` metadata.

Token ids must equal llama.cpp's for the same GGUF (prompts are tokenized here
and fed to our own graph; a draft model must share the target's vocabulary),
so every rule below follows llama.cpp's ``src/llama-vocab.cpp``:

- ``gpt2`` models: byte-level BPE over ``tokenizer.ggml.merges``, after the
  regex pre-tokenizer that llama.cpp ties to ``tokenizer.ggml.pre``.
- ``llama`` models (SentencePiece): the adjacent pair whose joined text is the
  best-scoring token merges first; spaces are escaped as U+2581; a space is
  prefixed to every text fragment when ``add_space_prefix``; characters with
  no token are spelt as ``<0xXX>`` byte tokens.
- Control and unknown tokens are matched in the text only when
  ``parse_special``; user-defined tokens are always matched.

Decoding does not go through the ``tokenizers`` library: each token's raw bytes
(its *piece*) are precomputed, so decoding is a byte join and streaming is
O(1) per token.

Glossary:
    piece:     the bytes one token stands for when decoded.
    fragment:  a run of plain text before, between or after special tokens;
               SentencePiece encoding prefixes a space to each one and
               decoding drops it again (``add_space_prefix``).
    EOG:       end of generation; a token that ends a completion.
"""

from __future__ import annotations

import codecs
import dataclasses
import datetime
import functools
import json
import types
from collections.abc import Iterable, Mapping, Sequence

import gguf
import jinja2
import jinja2.sandbox
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from service.common.errors import InvalidArgument


class TokenizerError(InvalidArgument, ValueError):
    """A tokenizer, pre-tokenizer or chat template that cannot be used, or bad input to it."""


_SPM_SPACE = "\u2581"  # "▁": SentencePiece's escaped space

# GPT-2's split; HF's ByteLevel(use_regex=True) uses exactly this pattern.
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = _LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")


@dataclasses.dataclass(frozen=True)
class _PreTokenizerSpec:
    """How llama.cpp splits text before byte-level BPE, for one ``tokenizer.ggml.pre``."""

    regexes: tuple[str, ...]  # applied in order; each splits every piece, keeping matches and gaps
    ignore_merges: bool = False  # a piece that is already a whole token is not merged (llama-3)
    add_bos: bool = False  # llama.cpp's add_bos default when the GGUF does not say


_SMOLLM = _PreTokenizerSpec((r"\p{N}", _GPT2_REGEX))  # = Digits(individual) + ByteLevel regex
_GPT2 = _PreTokenizerSpec((_GPT2_REGEX,))
_LLAMA3 = _PreTokenizerSpec((_LLAMA3_REGEX,), ignore_merges=True, add_bos=True)
_QWEN2 = _PreTokenizerSpec((_QWEN2_REGEX,))
_DEFAULT = _PreTokenizerSpec((r"[\p{P}\$\+<=>\^~\|]+", _GPT2_REGEX, r"\p{N}+", r"[0-9][0-9][0-9]"))

# tokenizer.ggml.pre -> split rules; names and groups as in llama.cpp (a subset).
_PRE_TOKENIZERS: Mapping[str, _PreTokenizerSpec] = types.MappingProxyType(
    {
        "default": _DEFAULT,
        **dict.fromkeys(("gpt2", "gpt-2", "phi-2", "mpt", "olmo"), _GPT2),
        **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell"), _SMOLLM),
        **dict.fromkeys(("llama-bpe", "llama3", "llama-v3", "falcon3"), _LLAMA3),
        **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"), _QWEN2),
    }
)

_SUPPORTED_MODELS = ("gpt2", "llama")

# llama.cpp's EOT guess when tokenizer.ggml.eot_token_id is absent (first found wins).
_EOT_TEXTS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")
# Token texts llama.cpp treats as end of generation (and forces to CONTROL).
_EOG_TEXTS = frozenset(
    {
        *_EOT_TEXTS,
        "<|endoftext|>",
        "<|eom_id|>",
        "<|end_of_text|>",
        "<EOT>",
        "_<EOT>",
        "<end_of_utterance>",
    }
)

_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# llama.cpp's built-in Gemma format, for a GGUF without a template whose vocabulary has Gemma's turn tokens:
# the assistant is "model", system messages are merged into the next user turn; BOS first, as Gemma's own
# template writes it (a chat prompt is encoded without adding special tokens).
_GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{%- set ns = namespace(system='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{%- set ns.system = ns.system + (message['content'] | trim) -%}"
    "{%- else -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' }}"
    "{%- if ns.system and role != 'model' -%}{{ ns.system + '\\n\\n' }}{%- set ns.system = '' -%}{%- endif -%}"
    "{{ (message['content'] | trim) + '<end_of_turn>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)
_GEMMA_TURN_TOKENS = ("<start_of_turn>", "<end_of_turn>")


@dataclasses.dataclass(frozen=True)
class _GgufVocab:
    """The ``tokenizer.ggml.*`` metadata of one GGUF file, with llama.cpp's defaults applied."""

    model: str  # "gpt2" or "llama"
    pre: str  # tokenizer.ggml.pre ("default" when absent)
    texts: tuple[str, ...]  # (n_vocab,)
    types: tuple[int, ...]  # (n_vocab,) gguf.TokenType values
    scores: tuple[float, ...]  # (n_vocab,) SentencePiece scores, zeros when absent
    merges: tuple[str, ...]  # "left right", best first (gpt2 only)
    bos_id: int | None
    eos_id: int | None
    eot_id: int | None  # tokenizer.ggml.eot_token_id only; see _find_eot
    eom_id: int | None
    unk_id: int | None
    add_bos: bool | None  # None: not in the file
    add_eos: bool | None
    add_space_prefix: bool | None
    chat_template: str | None


def _field(reader: gguf.GGUFReader, key: str, default=None):
    """One metadata value (list for arrays), or ``default`` when the key is absent."""
    field = reader.fields.get(key)
    if field is None:
        return default
    try:
        return field.contents()
    except Exception as e:  # noqa: BLE001 - a token text that is not UTF-8, an odd nested array
        raise TokenizerError(f"GGUF metadata key {key} cannot be read ({type(e).__name__}: {str(e)[:80]})") from e


def _checked_id(reader: gguf.GGUFReader, key: str, n_vocab: int, default: int | None) -> int | None:
    """A token id from the metadata, checked against the vocabulary size."""
    value = _field(reader, key, default)
    if value is not None and not 0 <= int(value) < n_vocab:
        raise TokenizerError(f"{key} = {value} is outside the vocabulary of {n_vocab} tokens")
    return None if value is None else int(value)


def _read_vocab(reader: gguf.GGUFReader) -> _GgufVocab:
    """Reads and checks every tokenizer field that specserve uses."""
    model = _field(reader, "tokenizer.ggml.model")
    if model not in _SUPPORTED_MODELS:
        raise TokenizerError(
            f"unsupported tokenizer model {model!r} (tokenizer.ggml.model); "
            "specserve supports 'gpt2' (byte-level BPE) and 'llama' (SentencePiece)"
        )
    texts = tuple(_field(reader, "tokenizer.ggml.tokens", []))
    n_vocab = len(texts)
    if n_vocab == 0:
        raise TokenizerError("the GGUF file has no tokenizer.ggml.tokens")
    if len(set(texts)) != n_vocab:
        raise TokenizerError("tokenizer.ggml.tokens has duplicate token texts")
    token_types = tuple(_field(reader, "tokenizer.ggml.token_type", [gguf.TokenType.NORMAL] * n_vocab))
    scores = tuple(_field(reader, "tokenizer.ggml.scores", [0.0] * n_vocab))
    if len(token_types) != n_vocab or len(scores) != n_vocab:
        raise TokenizerError("tokenizer.ggml.token_type / scores do not match tokenizer.ggml.tokens in length")
    spm = model == "llama"
    return _GgufVocab(
        model=model,
        pre=_field(reader, "tokenizer.ggml.pre", "default"),
        texts=texts,
        types=_forced_control(texts, token_types),
        scores=scores,
        merges=tuple(_field(reader, "tokenizer.ggml.merges", [])),
        bos_id=_checked_id(reader, "tokenizer.ggml.bos_token_id", n_vocab, 1 if spm else None),
        eos_id=_checked_id(reader, "tokenizer.ggml.eos_token_id", n_vocab, 2 if spm else None),
        eot_id=_checked_id(reader, "tokenizer.ggml.eot_token_id", n_vocab, None),
        eom_id=_checked_id(reader, "tokenizer.ggml.eom_token_id", n_vocab, None),
        unk_id=_checked_id(reader, "tokenizer.ggml.unknown_token_id", n_vocab, 0 if spm else None),
        add_bos=_field(reader, "tokenizer.ggml.add_bos_token"),
        add_eos=_field(reader, "tokenizer.ggml.add_eos_token"),
        add_space_prefix=_field(reader, "tokenizer.ggml.add_space_prefix"),
        chat_template=_field(reader, "tokenizer.chat_template"),
    )


def _forced_control(texts: Sequence[str], token_types: Sequence[int]) -> tuple[int, ...]:
    """Token types with llama.cpp's override: EOG-looking tokens are CONTROL."""
    return tuple(
        int(gguf.TokenType.CONTROL) if text in _EOG_TEXTS else int(token_type)
        for text, token_type in zip(texts, token_types)
    )


def _pre_tokenizer_spec(vocab: _GgufVocab) -> _PreTokenizerSpec:
    """The split rules for a gpt2 vocabulary's pre-tokenizer name."""
    spec = _PRE_TOKENIZERS.get(vocab.pre)
    if spec is None:
        raise TokenizerError(
            f"unsupported pre-tokenizer {vocab.pre!r} (tokenizer.ggml.pre); "
            f"specserve supports: {', '.join(sorted(_PRE_TOKENIZERS))}"
        )
    return spec


# ---------------------------------------------------------------------------
# building the `tokenizers` encoder


def _byte_to_char() -> dict[int, str]:
    """GPT-2's reversible map from each byte to a printable character."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in printable}
    unprintable = (b for b in range(256) if b not in table)
    table.update({b: chr(256 + n) for n, b in enumerate(unprintable)})
    return table


def _gpt2_merges(vocab: _GgufVocab, token_ids: Mapping[str, int]) -> list[tuple[str, str]]:
    """``tokenizer.ggml.merges`` as pairs, split like llama.cpp, skipping merges into non-tokens."""
    pairs = []
    for merge in vocab.merges:
        cut = merge.find(" ", 1)
        left, right = merge[:cut], merge[cut + 1 :]
        if cut > 0 and left in token_ids and right in token_ids and left + right in token_ids:
            pairs.append((left, right))
    return pairs


def _spm_merges(vocab: _GgufVocab, token_ids: Mapping[str, int]) -> list[tuple[str, str]]:
    """BPE merges equivalent to llama.cpp's SPM loop: the best-scoring joined token merges first."""
    ranked = []
    for token_id, text in enumerate(vocab.texts):
        for cut in range(1, len(text)):
            left, right = text[:cut], text[cut:]
            if left in token_ids and right in token_ids:
                ranked.append((-vocab.scores[token_id], token_id, cut, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _byte_level_model(vocab: _GgufVocab) -> tokenizers.Tokenizer:
    """GPT-2 style byte-level BPE with the pre-tokenizer llama.cpp uses for ``vocab.pre``."""
    spec = _pre_tokenizer_spec(vocab)
    token_ids = {text: i for i, text in enumerate(vocab.texts)}
    model = models.BPE(
        vocab=token_ids, merges=_gpt2_merges(vocab, token_ids), ignore_merges=spec.ignore_merges
    )
    fast = tokenizers.Tokenizer(model)
    splits = [pre_tokenizers.Split(Regex(regex), behavior="isolated") for regex in spec.regexes]
    fast.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    fast.decoder = decoders.ByteLevel()
    return fast


def _sentencepiece_model(vocab: _GgufVocab) -> tokenizers.Tokenizer:
    """SentencePiece (llama) BPE: merges from scores, spaces as "▁", byte fallback."""
    token_ids = {text: i for i, text in enumerate(vocab.texts)}
    unk = None if vocab.unk_id is None else vocab.texts[vocab.unk_id]
    model = models.BPE(
        vocab=token_ids, merges=_spm_merges(vocab, token_ids), unk_token=unk, byte_fallback=True
    )
    fast = tokenizers.Tokenizer(model)
    escape = normalizers.Replace(" ", _SPM_SPACE)
    # Normalizers run on each fragment between added tokens, as llama.cpp's prefix does.
    fast.normalizer = (
        normalizers.Sequence([normalizers.Prepend(_SPM_SPACE), escape])
        if _add_space_prefix(vocab)
        else escape
    )
    fast.decoder = decoders.Sequence(
        [decoders.Replace(_SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    return fast


def _add_space_prefix(vocab: _GgufVocab) -> bool:
    """Whether SentencePiece encoding prefixes a space to each fragment (llama.cpp default: yes)."""
    return vocab.model == "llama" and vocab.add_space_prefix is not False


def _encoder(vocab: _GgufVocab, parse_special: bool) -> tokenizers.Tokenizer:
    """A ``tokenizers`` encoder; control tokens are matched in text only when ``parse_special``."""
    fast = _byte_level_model(vocab) if vocab.model == "gpt2" else _sentencepiece_model(vocab)
    matched = {gguf.TokenType.USER_DEFINED}
    if parse_special:
        matched |= {gguf.TokenType.CONTROL, gguf.TokenType.UNKNOWN}
    fast.add_special_tokens(
        [
            AddedToken(text, special=True, normalized=False)
            for text, token_type in zip(vocab.texts, vocab.types)
            if token_type in matched
        ]
    )
    return fast


# ---------------------------------------------------------------------------
# decoding


def _byte_token_value(text: str) -> int | None:
    """The byte of a ``<0xXX>`` token, or None when ``text`` is not one."""
    if len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
        try:
            return int(text[3:5], 16)
        except ValueError:
            return None
    return None


def _token_pieces(vocab: _GgufVocab) -> tuple[bytes, ...]:
    """The bytes each token decodes to, as llama.cpp's ``token_to_piece(special=true)``."""
    char_to_byte = {char: byte for byte, char in _byte_to_char().items()}

    def normal_piece(text: str) -> bytes:
        if vocab.model == "llama":
            return text.replace(_SPM_SPACE, " ").encode()
        return b"".join(
            bytes((char_to_byte[c],)) if c in char_to_byte else c.encode() for c in text
        )

    def piece(text: str, token_type: int) -> bytes:
        if token_type == gguf.TokenType.NORMAL:
            return normal_piece(text)
        if token_type == gguf.TokenType.BYTE:
            value = _byte_token_value(text)
            return text.encode() if value is None else bytes((value,))
        if token_type in (gguf.TokenType.CONTROL, gguf.TokenType.UNKNOWN, gguf.TokenType.USER_DEFINED):
            return text.encode()
        return b""  # unused / undefined tokens render as nothing, as in llama.cpp

    return tuple(piece(text, token_type) for text, token_type in zip(vocab.texts, vocab.types))


@dataclasses.dataclass(frozen=True)
class _Pieces:
    """What each token decodes to, and the rule that joins pieces into text."""

    pieces: tuple[bytes, ...]  # (n_vocab,) raw bytes of each token
    control_ids: frozenset[int]  # control and unknown tokens: dropped when skip_special
    fragment_breaks: frozenset[int]  # tokens that end a text fragment (all matched specials)
    strip_space_prefix: bool  # SentencePiece add_space_prefix: drop the space it inserted

    @classmethod
    def from_vocab(cls, vocab: _GgufVocab) -> _Pieces:
        """Precomputes the pieces and token classes of a vocabulary."""
        control = {gguf.TokenType.CONTROL, gguf.TokenType.UNKNOWN}
        breaks = control | {gguf.TokenType.USER_DEFINED}
        return cls(
            pieces=_token_pieces(vocab),
            control_ids=frozenset(i for i, t in enumerate(vocab.types) if t in control),
            fragment_breaks=frozenset(i for i, t in enumerate(vocab.types) if t in breaks),
            strip_space_prefix=_add_space_prefix(vocab),
        )

    def piece(self, token_id: int, fragment_start: bool, skip_special: bool) -> bytes:
        """The bytes of ``token_id``; ``fragment_start``: it follows the start or a special token."""
        if not 0 <= token_id < len(self.pieces):
            raise TokenizerError(f"token id {token_id} is outside the vocabulary of {len(self.pieces)} tokens")
        if skip_special and token_id in self.control_ids:
            return b""
        piece = self.pieces[token_id]
        strip = fragment_start and self.strip_space_prefix and token_id not in self.fragment_breaks
        if strip and piece[:1] == b" ":
            return piece[1:]
        return piece


class IncrementalDecoder:
    """Streams text from token ids, one token at a time, never splitting a UTF-8 character.

    Bytes of an incomplete character are held back until a later token
    completes them; ``flush`` ends the stream. The pieces pushed after
    ``prompt_ids`` join to exactly the text those tokens add to the decoded prompt.
    """

    def __init__(self, pieces: _Pieces, prompt_ids: Iterable[int] = (), skip_special: bool = False) -> None:
        """Prefer :meth:`Tokenizer.incremental_decoder`."""
        self._pieces = pieces
        self._skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._fragment_start = True
        for token_id in prompt_ids:  # the prompt's text is not emitted, only its state kept
            self._utf8.decode(self._advance(token_id))

    def _advance(self, token_id: int) -> bytes:
        """The next token's bytes; updates the fragment state."""
        piece = self._pieces.piece(token_id, self._fragment_start, self._skip_special)
        self._fragment_start = token_id in self._pieces.fragment_breaks
        return piece

    def push(self, token_id: int) -> str:
        """Adds one token; returns the text it completes (possibly empty)."""
        return self._utf8.decode(self._advance(token_id))

    def flush(self) -> str:
        """Ends the stream; bytes of a character that never completed become U+FFFD."""
        return self._utf8.decode(b"", final=True)


# ---------------------------------------------------------------------------
# chat templates


def _raise_template_exception(message: str) -> None:
    """``raise_exception`` for chat templates (as in Hugging Face transformers)."""
    raise jinja2.TemplateError(message)


def _tojson(value: object, indent: int | None = None, separators=None, sort_keys: bool = False) -> str:
    """Hugging Face's ``tojson`` filter: JSON without ASCII escaping or HTML-safe quoting."""
    return json.dumps(value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(date_format: str) -> str:
    """``strftime_now`` for chat templates that print today's date."""
    return datetime.datetime.now().strftime(date_format)


def _template_environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    """A sandboxed Jinja environment configured like Hugging Face's ``apply_chat_template``."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_template_exception
    env.globals["strftime_now"] = _strftime_now
    return env


# ---------------------------------------------------------------------------
# the tokenizer


def _find_eot(vocab: _GgufVocab) -> int | None:
    """tokenizer.ggml.eot_token_id, else the first control token named like an end of turn."""
    if vocab.eot_id is not None:
        return vocab.eot_id
    control = {
        text: i for i, (text, t) in enumerate(zip(vocab.texts, vocab.types)) if t == gguf.TokenType.CONTROL
    }
    return next((control[text] for text in _EOT_TEXTS if text in control), None)


def _find_eog(vocab: _GgufVocab, eot_id: int | None) -> frozenset[int]:
    """All end-of-generation ids: eos, eot, eom and the tokens llama.cpp recognises by text."""
    named = (i for i, text in enumerate(vocab.texts) if text in _EOG_TEXTS)
    return frozenset(i for i in (vocab.eos_id, eot_id, vocab.eom_id, *named) if i is not None)


def _resolve_add_bos(vocab: _GgufVocab) -> bool:
    """tokenizer.ggml.add_bos_token, else llama.cpp's default (SentencePiece and llama-3: yes)."""
    if vocab.add_bos is not None:
        add_bos = bool(vocab.add_bos)
    else:
        add_bos = vocab.model == "llama" or _pre_tokenizer_spec(vocab).add_bos
    if add_bos and vocab.bos_id is None:
        raise TokenizerError("tokenizer.ggml.add_bos_token is true but tokenizer.ggml.bos_token_id is not set")
    return add_bos


def _resolve_add_eos(vocab: _GgufVocab) -> bool:
    """tokenizer.ggml.add_eos_token (default: no)."""
    if vocab.add_eos and vocab.eos_id is None:
        raise TokenizerError("tokenizer.ggml.add_eos_token is true but tokenizer.ggml.eos_token_id is not set")
    return bool(vocab.add_eos)


class Tokenizer:
    """Text <-> token ids for one GGUF model, with its chat template. Thread-safe."""

    def __init__(self, vocab: _GgufVocab) -> None:
        """Builds from already-read metadata; use :meth:`from_gguf`."""
        self._vocab = vocab
        self._with_special = _encoder(vocab, parse_special=True)  # raises on an unknown pre-tokenizer
        self._without_special = _encoder(vocab, parse_special=False)
        self._pieces = _Pieces.from_vocab(vocab)
        self._add_bos = _resolve_add_bos(vocab)
        self._add_eos = _resolve_add_eos(vocab)
        self._eot_id = _find_eot(vocab)
        self._eog_ids = _find_eog(vocab, self._eot_id)
        self._template_env = _template_environment()
        self._default_template = (_GEMMA_TEMPLATE if set(_GEMMA_TURN_TOKENS) <= set(vocab.texts)
                                  else _CHATML_TEMPLATE)

    @classmethod
    def from_gguf(cls, reader: gguf.GGUFReader) -> Tokenizer:
        """Builds the tokenizer of a GGUF file; raises TokenizerError if it is unsupported."""
        return cls(_read_vocab(reader))

    # -- vocabulary ---------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of tokens (the model's n_vocab)."""
        return len(self._vocab.texts)

    @property
    def bos_id(self) -> int | None:
        """Beginning-of-sequence token id."""
        return self._vocab.bos_id

    @property
    def eos_id(self) -> int | None:
        """End-of-sequence token id."""
        return self._vocab.eos_id

    @property
    def eot_id(self) -> int | None:
        """End-of-turn token id (tokenizer.ggml.eot_token_id, or found by name), if any."""
        return self._eot_id

    @property
    def eog_ids(self) -> frozenset[int]:
        """Token ids that end a generation."""
        return self._eog_ids

    @property
    def add_bos(self) -> bool:
        """Whether ``encode(add_special=True)`` prepends BOS."""
        return self._add_bos

    @property
    def token_texts(self) -> tuple[str, ...]:
        """Every token's text as stored in the GGUF; equal tuples mean equal vocabularies."""
        return self._vocab.texts

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one token, as llama.cpp's ``token_to_piece(special=true)`` (logprobs' alternatives)."""
        return self._pieces.piece(token_id, fragment_start=False, skip_special=False)

    @property
    def token_pieces(self) -> tuple[bytes, ...]:
        """Every token's bytes as decoded (control tokens: their text); grammar masks read them."""
        return self._pieces.pieces

    @property
    def control_ids(self) -> frozenset[int]:
        """Control and unknown tokens (never part of plain text)."""
        return self._pieces.control_ids

    @property
    def chat_template(self) -> str:
        """The Jinja chat template source; when the GGUF has none, Gemma's turn format for a vocabulary
        with Gemma's turn tokens (as llama.cpp), else ChatML."""
        return self._vocab.chat_template or self._default_template

    # -- encode / decode ----------------------------------------------------

    def encode(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids of ``text``, as llama.cpp's ``llama_tokenize``.

        add_special: prepend BOS (and append EOS) when the model asks for it.
        parse_special: match control tokens such as ``<|im_start|>`` in the
        text; when False they are tokenized as plain text.
        """
        encoder = self._with_special if parse_special else self._without_special
        try:
            ids = encoder.encode(text, add_special_tokens=False).ids
        except TypeError as exc:  # not a str, or a str with lone surrogates
            raise TokenizerError(f"text must be valid Unicode text: {exc}") from exc
        if add_special and self._add_bos:
            ids.insert(0, self._vocab.bos_id)
        if add_special and self._add_eos:
            ids.append(self._vocab.eos_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of ``ids``; ``skip_special`` drops control tokens. Invalid UTF-8 becomes U+FFFD."""
        decoder = self.incremental_decoder(skip_special=skip_special)
        return "".join(map(decoder.push, ids)) + decoder.flush()

    def incremental_decoder(
        self, prompt_ids: Iterable[int] = (), *, skip_special: bool = False
    ) -> IncrementalDecoder:
        """A streaming decoder for the tokens that follow ``prompt_ids``."""
        return IncrementalDecoder(self._pieces, prompt_ids, skip_special)

    # -- chat ---------------------------------------------------------------

    @functools.cached_property
    def _template(self) -> jinja2.Template:
        """The compiled chat template (compiled on first use)."""
        try:
            return self._template_env.from_string(self.chat_template)
        except jinja2.TemplateError as exc:
            raise TokenizerError(f"the model's chat template does not compile: {exc}") from exc

    def _token_text(self, token_id: int | None) -> str:
        """A token's text, or "" for None."""
        return "" if token_id is None else self._vocab.texts[token_id]

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, object]], add_generation_prompt: bool = True
    ) -> str:
        """Renders ``messages`` ([{"role": ..., "content": ...}, ...]) with the model's chat template."""
        try:
            return self._template.render(
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                bos_token=self._token_text(self.bos_id),
                eos_token=self._token_text(self.eos_id),
            )
        except (jinja2.TemplateError, ArithmeticError, LookupError, TypeError, ValueError) as exc:
            raise TokenizerError(f"the chat template failed on these messages: {exc}") from exc
