"""Regenerates tests/data/tokenizer_reference.json: llama.cpp's token ids for a few strings.

    python bench/make_tokenizer_reference.py                  # ids from llama.cpp (llama-cpp-python)
    python bench/make_tokenizer_reference.py --from-specserve # ids from service.common.tokenizer (no llama.cpp)

The test ``tests/test_tokenizer.py::test_ids_match_reference`` compares
``Tokenizer.encode(text, add_special=False)`` with these ids. The file records
which tokenizer produced it in ``"generator"``: only ``llama.cpp`` makes the
test a check against llama.cpp; ``specserve`` makes it a regression test only.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from a clone: the repository root

from service.common.packaged_model import packaged_model_path  # noqa: E402

OUTPUT = REPO / "tests" / "data" / "tokenizer_reference.json"

CASES = (
    "Hello world",
    "12345 and 3.14159",
    "a    b",
    "x\t\ty\n\n\nz",
    "café naïve résumé",
    "你好，世界",
    "👋🏽 hello 🚀",
    "def add(a, b):\n    return a + b  # sum\n",
    "I'm sure you'll see they've gone, haven't they?",
    "   leading and trailing   ",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "$1,000,000.00 != 1e-9",
    "",
)


def llama_cpp_ids(model: pathlib.Path) -> list[list[int]]:
    """Token ids from llama.cpp: no BOS, control tokens parsed."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(model), vocab_only=True, verbose=False)
    return [llm.tokenize(text.encode(), add_bos=False, special=True) for text in CASES]


def specserve_ids(model: pathlib.Path) -> list[list[int]]:
    """Token ids from service.common.tokenizer, with the same settings."""
    import gguf

    from service.common.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_gguf(gguf.GGUFReader(model))
    return [tokenizer.encode(text, add_special=False, parse_special=True) for text in CASES]


def main() -> None:
    """Writes the reference file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from-specserve", action="store_true", help="use specserve's tokenizer instead of llama.cpp")
    parser.add_argument("--model", type=pathlib.Path, default=None, help="GGUF file (default: packaged SmolLM2)")
    args = parser.parse_args()
    model = args.model or pathlib.Path(packaged_model_path())
    if args.from_specserve:
        generator, ids = "specserve (NOT checked against llama.cpp)", specserve_ids(model)
    else:
        import llama_cpp

        generator, ids = f"llama.cpp via llama-cpp-python {llama_cpp.__version__}", llama_cpp_ids(model)
    reference = {
        "model": model.name,
        "generator": generator,
        "settings": "add_special=False (no BOS), parse_special=True",
        "cases": [{"text": text, "ids": case_ids} for text, case_ids in zip(CASES, ids)],
    }
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(json.dumps(reference, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {len(CASES)} cases from {generator} to {OUTPUT}")


if __name__ == "__main__":
    main()
