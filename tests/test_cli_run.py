"""`specserve run`: in-process generation from the command line (issue: engine core, CLI)."""

from __future__ import annotations

import subprocess
import sys

from compute.numpy_backend import NumpyBackend
from service.engine import Engine
from service.factory import PairFactory, PairRequest
from service.params import ContextParams, SpeculativeConfig
from service.requests import GenRequest, SamplingParams
from service.tokenizer import Tokenizer
from tests.tiny_gguf import write_tiny_llama


def test_run_prints_the_greedy_continuation(tmp_path):
    model = write_tiny_llama(tmp_path / "m.gguf", n_layer=2, seed=9, scale=3.0, n_ctx_train=512)
    out = subprocess.run([sys.executable, "-m", "service.cli", "run", "-m", model, "--temp", "0", "-n", "12",
                          "-c", "256", "--stats", "the theme"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    pair = PairFactory(NumpyBackend(n_threads=1), device_memory_bytes=1 << 34).load(
        PairRequest(target_path=model, params=ContextParams(n_ctx=256), speculative=SpeculativeConfig("ngram")))
    tok = Tokenizer.from_gguf(pair.target.file.reader)
    eng = Engine(pair, tok, SpeculativeConfig("ngram")).start()
    try:
        res = eng.submit(GenRequest(tuple(tok.encode("the theme")), max_tokens=12,
                                    sampling=SamplingParams(temperature=0.0))).result(timeout=60)
    finally:
        eng.stop()
        pair.release()
    assert out.stdout == res.text + "\n"
    assert f"completion {res.completion_tokens} tok" in out.stderr

