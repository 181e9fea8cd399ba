"""Perplexity of the packaged SmolLM2 on a fixed text, three ways, on the same token ids:

  specserve  through the API: a real server on port 0, GenerateRequest(tokens=..., max_tokens=0,
             prompt_logprobs=0) over gRPC, once per KV type (f16, f32)
  llama.cpp  llama-cpp-python (logits_all=True) on the same GGUF, log-softmax of its logits
  float64    a float64 forward of the same dequantised weights (reference/float64_forward.py)

and the mean and max |logprob difference| of each against the float64 one, per token.

    python bench/bench_perplexity.py [--tokens 200] [--backends ggml,opencl,numpy]

Perplexity = exp(-mean logprob of tokens 1..n-1 given the ones before). Prints; asserts nothing
(tests/test_gen_controls_real.py holds the bounds).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # run as a script from a clone: the repository root

import numpy as np  # noqa: E402

from bench.common import capture_fd2, have_llama_cpp, machine_line, model_path  # noqa: E402

# An original paragraph (no repetition, so the model cannot copy itself), ~280 tokens of SmolLM2.
TEXT = (
    "Early in the spring of that year the river rose higher than anyone in the valley could remember. "
    "It came over the low meadows first, quietly, so that the cows stood knee-deep in brown water before "
    "the farmers noticed, and then it crept up the lane toward the mill. The miller, a careful man who "
    "kept a ledger of every sack of flour he had ground since his apprenticeship, carried the ledgers "
    "upstairs one armful at a time and stacked them on his bed. His daughter tied the boat to the "
    "apple tree and rowed the neighbours' children to the church on the hill, where the vicar had lit "
    "both stoves and laid out blankets on the pews. By evening the bridge was gone. Nobody was hurt, "
    "but for three weeks the village was an island, and people who had lived side by side for decades "
    "without speaking found themselves sharing bread, candles and stories. When the water finally went "
    "down it left a line of silt on every wall, a hand's width below the windowsills, and many families "
    "never painted over it. Years later, children would ask what the mark meant, and the answer was "
    "always a long one, told slowly, with the best parts saved for the end.")


def text_ids(model: str, n: int) -> list[int]:
    """The first n token ids of TEXT (BOS first when the model adds one), with the model's vocabulary."""
    import gguf

    from service.common.tokenizer import Tokenizer

    ids = Tokenizer.from_gguf(gguf.GGUFReader(model)).encode(TEXT, add_special=True)
    if len(ids) < n:
        sys.exit(f"the text has {len(ids)} tokens, fewer than --tokens {n}")
    return ids[:n]


def api_logprobs(model: str, ids: list[int], kv_type: str, backend: str) -> np.ndarray:
    """Logprobs of ids[1:] through a real server's GenerateRequest(prompt_logprobs=0, max_tokens=0)."""
    import grpc

    from service.fit.factory import PairRequest
    from service.fit.params import ContextParams, SpeculativeConfig
    from service.pb.specserve.v1 import specserve_pb2 as pb
    from service.pb.specserve.v1 import specserve_pb2_grpc as pb_grpc
    from service.server import ServerConfig, SpecServer

    params = ContextParams(n_ctx=512, n_parallel=1, n_batch=64, kv_type=kv_type)
    spec = SpeculativeConfig("ngram", n_max=8)  # 9 output rows: the prompt is scored 9 rows a pass
    server = SpecServer(ServerConfig(
        host="127.0.0.1", port=0, params=params, backend=backend, threads=1, speculative=spec,
        default_target=model, models_dir=os.path.dirname(model),
        startup=PairRequest(name="default", target_path=model, params=params, speculative=spec)))
    port = server.start()
    try:
        server.wait_ready(300)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            r = pb_grpc.GenerationServiceStub(ch).Generate(
                pb.GenerateRequest(tokens=pb.TokenIds(ids=ids), max_tokens=0, prompt_logprobs=0), timeout=600)
    finally:
        server.stop()
    assert [e.token for e in r.prompt_logprobs] == ids
    return np.array([e.logprob for e in r.prompt_logprobs[1:]], np.float64)


def llama_cpp_logprobs(model: str, ids: list[int]) -> np.ndarray | None:
    """Logprobs of ids[1:] from llama-cpp-python's logits of every row (logits_all=True)."""
    if not have_llama_cpp():
        return None
    import llama_cpp

    with capture_fd2():
        llm = llama_cpp.Llama(model_path=model, n_ctx=512, n_batch=512, n_threads=1, logits_all=True, verbose=False)
        llm.eval(ids)
    logits = np.array(llm.scores[:len(ids)], np.float64)  # (n, n_vocab)
    return _logprobs_of(logits, ids)


def float64_logprobs(model: str, ids: list[int]) -> np.ndarray:
    """Logprobs of ids[1:] from a float64 forward of the dequantised weights."""
    from compute.gguf_model import ModelFile
    from reference.float64_forward import naive_forward

    return _logprobs_of(naive_forward(ModelFile(model), ids), ids)


def _logprobs_of(logits: np.ndarray, ids: list[int]) -> np.ndarray:
    """log softmax of row i at token ids[i+1], for i < n-1."""
    z = logits[:-1]
    m = z.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(z - m).sum(-1, keepdims=True)))[:, 0]
    return z[np.arange(len(ids) - 1), ids[1:]] - lse


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--backends", default="ggml,opencl,numpy",
                    help="comma-separated specserve backends to measure (ggml: 8-bit activations; opencl, numpy: "
                         "float32)")
    args = ap.parse_args()
    model = model_path()
    ids = text_ids(model, args.tokens)
    print(machine_line())
    print(f"model {os.path.basename(model)}, {len(ids)} tokens of a fixed text, backends {args.backends}")
    ref = float64_logprobs(model, ids)
    rows = [("float64 forward", ref)]
    for backend in args.backends.split(","):
        for kv in ("f16", "f32"):
            rows.append((f"specserve {backend}, {kv} KV", api_logprobs(model, ids, kv, backend)))
    cpp = llama_cpp_logprobs(model, ids)
    rows.append(("llama.cpp (llama-cpp-python)", cpp))
    print(f"{'':32} {'perplexity':>10} {'mean |d| vs f64':>16} {'max |d| vs f64':>15}")
    for name, v in rows:
        if v is None:
            print(f"{name:32} {'(llama-cpp-python not installed)':>43}")
            continue
        d = np.abs(v - ref)
        print(f"{name:32} {math.exp(-v.mean()):10.4f} {d.mean():16.2e} {d.max():15.2e}")


if __name__ == "__main__":
    main()
