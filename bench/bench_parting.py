"""How often greedy tokens part between speculation on and off, per backend mode.

    python bench/bench_parting.py [--tokens 64] [--modes numpy:0,numpy:8,opencl]

For each mode, every prompt is generated greedily with speculation off and with the n-gram
drafter (n_max 8, drafting as much as it can: the backend's cost model is set flat so that the
engine never holds drafts back); the script prints where the two token lists first differ (or "same").
A batch-invariant mode (NumPy row_tile >= 1, OpenCL) must print "same" everywhere; NumPy's
row_tile 0 runs verify batches through gemm and single tokens through gemv, which round
differently, so a near-tie between the top two logits can flip.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # run as a script from a clone: the repository root

from bench.bench_speculative import COPY, OPEN, encode  # noqa: E402
from service.common.packaged_model import packaged_model_path  # noqa: E402
from service.common.tokenizer import Tokenizer  # noqa: E402
from service.engine.engine import Engine  # noqa: E402
from service.engine.request import GenRequest, SamplingParams  # noqa: E402
from service.fit.factory import PairFactory, PairRequest  # noqa: E402
from service.fit.params import ContextParams, SpeculativeConfig  # noqa: E402

EXTRA = {
    "haiku": "Write a haiku about autumn leaves.",
    "list": "List five fruits and one fact about each.",
    "math": "What is 17 times 23? Explain step by step.",
    "email": "Write a short email asking a colleague to review my code.",
}


def backend_for(mode: str):
    if mode == "opencl":
        from compute.opencl.backend import OpenCLBackend

        return OpenCLBackend()
    from compute.numpy_backend import NumpyBackend

    return NumpyBackend(n_threads=1, row_tile=int(mode.split(":")[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--modes", default="numpy:0,numpy:8,opencl")
    args = ap.parse_args()
    prompts = {**COPY, **OPEN, **EXTRA}
    greedy = SamplingParams(temperature=0.0)
    for mode in args.modes.split(","):
        pair = PairFactory(backend_for(mode), device_memory_bytes=1 << 34).load(PairRequest(
            target_path=packaged_model_path(), params=ContextParams(n_ctx=1024, n_batch=64),
            speculative=SpeculativeConfig("ngram", n_max=8)))
        tok = Tokenizer.from_gguf(pair.target.file.reader)
        pair.target.context.backend.row_cost = lambda rows: 1.0  # always draft the most: the worst case
        eng = Engine(pair, tok, SpeculativeConfig("none")).start()
        parted = 0
        for name, text in prompts.items():
            p = encode(tok, text)
            runs = [eng.submit(GenRequest(p, max_tokens=args.tokens, sampling=greedy, speculative=s)).result()
                    for s in (SpeculativeConfig("none"), SpeculativeConfig("ngram", n_max=8))]
            a, b = runs[0].tokens, runs[1].tokens
            at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
            if at is None and len(a) != len(b):
                at = min(len(a), len(b))
            parted += at is not None
            print(f"{mode:9s} {name:18s} {'same' if at is None else f'parts at token {at}'} "
                  f"({len(a)} tokens; drafted {runs[1].drafted}, accepted {runs[1].accepted})")
        print(f"{mode:9s} {parted} of {len(prompts)} prompts parted")
        eng.stop()
        pair.release()


if __name__ == "__main__":
    main()
