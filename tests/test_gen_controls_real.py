"""Generation controls on the packaged SmolLM2: the acceptance checks.

- greedy top-5 logprobs of 64 generated tokens with speculation on (n-gram, draft model) equal those with
  it off, bit for bit, on NumPy and on every OpenCL device;
- n = 4 at temperature 0.8 with a seed: four different completions, the same on a second run, and the
  prompt fed through the model once (every row the target is fed is counted);
- prompt logprobs of 200 tokens against a float64 forward of the same dequantised weights, f16 and f32 KV
  (bench/bench_perplexity.py prints the same figures through the API, and llama.cpp's).
"""

from __future__ import annotations

import numpy as np
import pytest

from bench.bench_perplexity import TEXT
from compute.gguf_model import ModelFile
from compute.numpy_backend import NumpyBackend
from reference.float64_forward import naive_forward
from service.common.tokenizer import Tokenizer
from service.engine import logprobs as lp
from service.engine.engine import Engine
from service.engine.request import GenRequest, SamplingParams
from service.fit.factory import PairFactory, PairRequest
from service.fit.params import ContextParams, SpeculativeConfig
from tests.ggml_backend import ggml_param
from tests.models import packaged_model_path
from tests.opencl_runtimes import device_params

pytestmark = pytest.mark.slow
GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def model():
    return packaged_model_path()


@pytest.fixture(scope="module")
def draft(model):
    return model  # the model drafting for itself: every draft accepted (the n-gram drafter has rejections)


def _engine(backend, model, draft="", n_parallel=1, kv_type="f16"):
    spec = SpeculativeConfig("draft" if draft else "ngram", n_max=8, p_min=0.0)
    pair = PairFactory(backend, device_memory_bytes=1 << 34).load(PairRequest(
        name="real", target_path=model, draft_path=draft, speculative=spec,
        params=ContextParams(n_ctx=n_parallel * 512, n_parallel=n_parallel, n_batch=64, kv_type=kv_type)))
    tok = Tokenizer.from_gguf(pair.target.file.reader)
    return Engine(pair, tok, spec).start(), pair, tok


def _chat(tok, text):
    return tuple(tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]), add_special=False))


def _opencl(device):
    from compute.opencl.backend import OpenCLBackend

    return OpenCLBackend(device=device)


BACKENDS = [pytest.param(lambda: NumpyBackend(n_threads=1, row_tile=8), id="numpy"), ggml_param()] + [
    pytest.param(lambda d=p.values[0]: _opencl(d), id=f"opencl-{p.id}", marks=(*p.marks, pytest.mark.opencl))
    for p in device_params()]


@pytest.mark.parametrize("make_backend", BACKENDS)
def test_greedy_top5_logprobs_of_64_tokens_equal_with_and_without_speculation(model, draft, make_backend):
    eng, pair, tok = _engine(make_backend(), model, draft)
    try:
        prompt = tuple(tok.encode("Tick, tock, goes the clock. The quick brown fox jumps over the lazy dog. "
                                  "The quick brown fox jumps over the lazy dog. The quick"))  # long, and repetitive
        runs = {name: eng.submit(GenRequest(prompt, max_tokens=64, sampling=GREEDY, logprobs=5, speculative=spec,
                                            stop=())).result(600)
                for name, spec in [("off", SpeculativeConfig("none")),
                                   ("ngram", SpeculativeConfig("ngram", n_max=8)),
                                   ("draft", SpeculativeConfig("draft", n_max=8, p_min=0.0))]}
    finally:
        eng.stop()
        pair.release()
    off = runs.pop("off")
    assert len(off.tokens) == 64 and len(off.logprobs) == 64
    assert all(len(e.top) == 5 and e.top[0] == (e.token, e.logprob) for e in off.logprobs)
    for name, r in runs.items():
        assert r.drafted > 0 and r.accepted > 0, name
        assert r.tokens == off.tokens, name
        assert r.logprobs == off.logprobs, name  # every float equal
        print(f"{name}: {r.accepted}/{r.drafted} drafts accepted, logprobs of 64 tokens identical")


def test_n4_at_temperature_08_four_completions_reproducible_prompt_prefilled_once(model):
    eng, pair, tok = _engine(NumpyBackend(n_threads=1, row_tile=8), model, n_parallel=4)
    fed: list[tuple[int, int]] = []  # (slot, position) of every row the target is fed
    decode = pair.target.context.decode

    def counting(batch):
        fed.extend(zip(batch.slots.tolist(), batch.positions.tolist()))
        return decode(batch)
    pair.target.context.decode = counting
    prompt = _chat(tok, "Write one sentence about a cat.")
    try:
        runs = []
        for _ in range(2):
            fed.clear()
            runs.append(eng.submit(GenRequest(prompt, max_tokens=24, n=4,
                                              sampling=SamplingParams(temperature=0.8, seed=42))).result(600))
            prompt_rows = [f for f in fed if f[1] < len(prompt)]
            # the prompt is fed once, in one slot: all of it cold; the second time only what the prompt
            # cache did not hold (the slot kept the first run's cells), and the output is the same
            cached = runs[-1].cached_prompt_tokens
            assert cached == (0 if len(runs) == 1 else len(prompt) - 1)
            assert len(prompt_rows) == len(prompt) - cached and len({s for s, _ in prompt_rows}) == 1
            print(f"prompt {len(prompt)} tokens ({cached} cached), target rows fed at prompt positions: "
                  f"{len(prompt_rows)} (slot {prompt_rows[0][0]}); prefill {runs[-1].prefill_seconds:.3f} s")
    finally:
        eng.stop()
        pair.release()
    texts = [c.text for c in runs[0].choices]
    print("\n".join(f"{i}: {t!r}" for i, t in enumerate(texts)))
    assert len(set(texts)) == 4
    assert [c.tokens for c in runs[1].choices] == [c.tokens for c in runs[0].choices]


@pytest.fixture(scope="module")
def text_ids(model):
    tok = Tokenizer.from_gguf(ModelFile(model).reader)
    return tuple(tok.encode(TEXT, add_special=True)[:200])


@pytest.fixture(scope="module")
def float64_logprobs(model, text_ids):
    logits = naive_forward(ModelFile(model), list(text_ids))
    return np.array([lp.log_softmax(logits[i])[text_ids[i + 1]] for i in range(len(text_ids) - 1)])


# measured on this model (Zen 4, NumPy): f16 mean 6.1e-4 max 3.7e-3; f32 mean 2.4e-6 max 1.7e-5. f16 keeps
# 11 significant bits of every K and V (relative 2^-11 = 4.9e-4), f32 24 bits (6e-8) and the activations'
# float32 rounding: the bounds are ~5x the measured figures.
BOUNDS = {"f16": (3e-3, 2e-2), "f32": (2e-5, 1e-4)}


@pytest.mark.parametrize("kv_type", ["f16", "f32"])
def test_prompt_logprobs_of_200_tokens_match_a_float64_forward(model, text_ids, float64_logprobs, kv_type):
    eng, pair, tok = _engine(NumpyBackend(n_threads=1, row_tile=1), model, kv_type=kv_type)
    try:
        r = eng.submit(GenRequest(text_ids, max_tokens=0, prompt_logprobs=5)).result(600)
    finally:
        eng.stop()
        pair.release()
    assert [e.token for e in r.prompt_logprobs] == list(text_ids) and r.tokens == ()
    got = np.array([e.logprob for e in r.prompt_logprobs[1:]])
    d = np.abs(got - float64_logprobs)
    print(f"{kv_type} KV, {len(text_ids)} tokens: mean |d| {d.mean():.2e}, max |d| {d.max():.2e}, "
          f"perplexity {np.exp(-got.mean()):.4f} (float64 {np.exp(-float64_logprobs.mean()):.4f})")
    mean_bound, max_bound = BOUNDS[kv_type]
    assert d.mean() < mean_bound and d.max() < max_bound
