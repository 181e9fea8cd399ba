"""Invariant 4 on the real model: greedy tokens are identical with speculation off, with the n-gram
drafter, with the model as its own draft, and with a truncated draft that is often rejected."""

from __future__ import annotations

import pytest

from compute.numpy_backend import NumpyBackend
from service.common.tokenizer import Tokenizer
from service.fit.factory import PairFactory, PairRequest
from service.fit.params import ContextParams, SpeculativeConfig
from tests.ggml_backend import make_ggml
from tests.greedy import greedy_results
from tests.models import packaged_model_path
from tests.tiny_gguf import write_truncated_copy

N_TOKENS = 24
MESSAGES = [
    "Repeat this sentence twice: the cat sat on the mat.",
    "Write a Python function that adds two numbers.",
    "What is the capital of France?",
    "List three colours.",
]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=["numpy", "ggml"])
def setup(tmp_path_factory, request):
    model = packaged_model_path()
    trunc = write_truncated_copy(model, tmp_path_factory.mktemp("draft") / "smollm2-4layers.gguf", n_layer=4)
    # both batch invariant, and drafts are cheap enough that the engine drafts
    be = NumpyBackend(n_threads=1, row_tile=8) if request.param == "numpy" else make_ggml()
    f = PairFactory(be, device_memory_bytes=1 << 34)
    pairs = {}
    for name, draft, npar in [("same4", model, 4), ("trunc4", trunc, 4), ("trunc1", trunc, 1)]:
        pairs[name] = f.load(PairRequest(name=name, target_path=model, draft_path=draft,
                                         params=ContextParams(n_ctx=npar * 256, n_parallel=npar, n_batch=64),
                                         speculative=SpeculativeConfig("draft", n_max=8)))
    tok = Tokenizer.from_gguf(pairs["same4"].target.file.reader)
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": m}]), add_special=False)
               for m in MESSAGES]
    yield pairs, tok, prompts
    for p in pairs.values():
        p.release()


def run(pair, tok, prompts, spec):
    return greedy_results(pair, tok, prompts, spec, N_TOKENS)


@pytest.fixture(scope="module")
def reference(setup):
    pairs, tok, prompts = setup
    return {name: [r.tokens for r in run(p, tok, prompts, SpeculativeConfig("none"))] for name, p in pairs.items()}


CASES = [("same4", SpeculativeConfig("ngram", n_max=n)) for n in (1, 4, 8)] + \
        [(pair, SpeculativeConfig("draft", n_max=n, p_min=0.0)) for pair in ("same4", "trunc4") for n in (1, 4, 8)] + \
        [("trunc1", SpeculativeConfig("draft", n_max=4, p_min=0.0)), ("trunc1", SpeculativeConfig("ngram", n_max=8))]


@pytest.mark.parametrize("pair_name,spec", CASES, ids=[f"{p}-{s.type}-{s.n_max}" for p, s in CASES])
def test_greedy_tokens_identical_with_speculation(setup, reference, pair_name, spec):
    pairs, tok, prompts = setup
    got = run(pairs[pair_name], tok, prompts, spec)
    for i, (r, g) in enumerate(zip(reference[pair_name], got)):
        parts = next((k for k, (a, b) in enumerate(zip(r, g.tokens)) if a != b), None)
        assert g.tokens == r, f"prompt {i} parts at token {parts}"
    drafted, accepted = sum(g.drafted for g in got), sum(g.accepted for g in got)
    if spec.type == "draft":
        assert drafted > 0
        if pair_name == "same4":
            assert accepted == drafted  # the model drafting for itself is always right
        else:
            assert accepted < drafted  # the truncated draft is rejected sometimes


def test_reference_is_the_same_across_slot_counts(reference):
    """Decoding with 4 concurrent slots gives the tokens of one slot alone (batch invariance)."""
    assert reference["trunc4"] == reference["trunc1"] == reference["same4"]
