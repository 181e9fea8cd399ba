"""`specserve run`: in-process generation from the command line, through the pair assembly a Load takes."""

from __future__ import annotations

import subprocess
import sys

from compute.numpy_backend import NumpyBackend
from service.common.tokenizer import Tokenizer
from service.engine.engine import Engine
from service.engine.request import GenRequest, SamplingParams
from service.fit.factory import PairFactory, PairRequest
from service.fit.params import ContextParams, SpeculativeConfig
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



def _run(*argv):
    return subprocess.run([sys.executable, "-m", "service.cli", "run", *argv], capture_output=True, text=True,
                          timeout=120)


def test_run_refuses_bad_flag_values_before_reading_the_model(tmp_path):
    """The params dataclasses check `run`'s flags as they check gRPC fields: exit status 2 (a usage error,
    as argparse's own) with the rule in one line, before the model file is opened (it does not exist)."""
    missing = str(tmp_path / "missing.gguf")
    for flags, message in [(["--top-p", "0"], "sampling.top_p 0.0: must be within (0, 1] (1 = off)"),
                           (["--temp", "-1"], "sampling.temperature -1.0: must be >= 0 (0 = greedy)"),
                           (["--draft-max", "2", "--draft-min", "5"], "speculative n_min (5) must be <= n_max (2)")]:
        out = _run("-m", missing, *flags, "the theme")
        assert out.returncode == 2, out.stderr
        assert out.stderr.strip() == f"specserve run: error: {message}", out.stderr
        assert out.stdout == ""


def test_run_takes_no_slot_count():
    """`run` decodes one prompt in one slot: -np is refused, not silently ignored."""
    for flag in ("-np", "--parallel"):
        out = _run(flag, "4", "the theme")
        assert out.returncode == 2 and f"{flag}: run decodes one prompt in one slot" in out.stderr, out.stderr
