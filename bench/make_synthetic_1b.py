"""A random-weight model with TinyLlama-1.1B's shapes, for benchmarks at a realistic size.

    python bench/make_synthetic_1b.py [--types q4_k_m,q4_0] [--dir ~/.cache/specserve/bench] [--threads 2]

Shapes: n_embd 2048, 22 layers, 32 heads, 4 KV heads (head_dim 64), n_ff 5632, the output
matrix tied to the token embeddings (llama.cpp's Q4_K_M makes that one Q6_K), and the
packaged SmolLM2's vocabulary (49152 tokens) and tokenizer metadata, so the same tokenizer
and chat template apply. Weights are random normals (std 0.02; norms 1), written as Q8_0
with `gguf.GGUFWriter` + `gguf.quants.quantize`, then requantized with llama.cpp's own
quantizer (`llama_cpp.llama_model_quantize`, `allow_requantize`) to each of --types
(Q4_K_M: 629 MiB). The files go to a cache directory, never into the repository; an
existing file is kept. Prints the path of each file.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # run as a script from a clone: the repository root

import numpy as np  # noqa: E402

CACHE = Path(os.path.expanduser("~/.cache/specserve/bench"))
SHAPES = dict(n_embd=2048, n_layer=22, n_head=32, n_head_kv=4, n_ff=5632, n_ctx=2048, rope_base=10000.0,
              rms_eps=1e-5)
# --types name -> llama.cpp's LLAMA_FTYPE_MOSTLY_* value
FTYPES = {"q4_k_m": 15, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q4_k_s": 14}


def path_of(kind: str, cache: Path = CACHE) -> Path:
    return cache / f"synthetic-tinyllama-1.1b-{kind}.gguf"


def _copy_tokenizer(writer, reader) -> None:
    """Every tokenizer.* key of the reader's file, with its value types."""
    import gguf

    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)


def write_q8_0(out: Path, seed: int = 0) -> None:
    """The Q8_0 model (the source of every requantized type)."""
    import gguf

    from service.common.packaged_model import packaged_model_path

    s = SHAPES
    reader = gguf.GGUFReader(packaged_model_path())
    n_vocab = int(reader.fields["llama.vocab_size"].contents())
    head_dim = s["n_embd"] // s["n_head"]
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name("synthetic TinyLlama-1.1B shapes, random weights")
    w.add_context_length(s["n_ctx"])
    w.add_embedding_length(s["n_embd"])
    w.add_block_count(s["n_layer"])
    w.add_feed_forward_length(s["n_ff"])
    w.add_head_count(s["n_head"])
    w.add_head_count_kv(s["n_head_kv"])
    w.add_rope_freq_base(s["rope_base"])
    w.add_layer_norm_rms_eps(s["rms_eps"])
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(n_vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    _copy_tokenizer(w, reader)
    rng = np.random.default_rng(seed)

    def q8(name: str, rows: int, cols: int) -> None:
        parts = []
        for r0 in range(0, rows, 4096):  # bounded memory: 4096 rows of float32 at a time
            x = (rng.standard_normal((min(4096, rows - r0), cols), dtype=np.float32) * 0.02)
            parts.append(gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0))
        w.add_tensor(name, np.concatenate(parts), raw_dtype=gguf.GGMLQuantizationType.Q8_0)

    def ones(name: str, n: int) -> None:
        w.add_tensor(name, np.ones(n, np.float32))

    E, kv, ff = s["n_embd"], s["n_head_kv"] * head_dim, s["n_ff"]
    q8("token_embd.weight", n_vocab, E)
    for i in range(s["n_layer"]):
        p = f"blk.{i}."
        ones(p + "attn_norm.weight", E)
        q8(p + "attn_q.weight", E, E)
        q8(p + "attn_k.weight", kv, E)
        q8(p + "attn_v.weight", kv, E)
        q8(p + "attn_output.weight", E, E)
        ones(p + "ffn_norm.weight", E)
        q8(p + "ffn_gate.weight", ff, E)
        q8(p + "ffn_up.weight", ff, E)
        q8(p + "ffn_down.weight", E, ff)
    ones("output_norm.weight", E)  # the output matrix is token_embd (tied, as SmolLM2's)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def requantize(src: Path, dst: Path, kind: str, threads: int) -> None:
    """llama.cpp's quantizer: src (Q8_0) -> dst of `kind` (allow_requantize)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[kind]
    params.nthread = threads
    params.allow_requantize = True
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize {src} -> {dst} ({kind}) returned {rc}")


def make(kind: str, cache: Path = CACHE, threads: int = 0) -> Path:
    """The path of the synthetic model of `kind` (a key of FTYPES), written first if missing."""
    out = path_of(kind, cache)
    if out.exists():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    src = path_of("q8_0", cache)
    if not src.exists():
        tmp = src.with_suffix(".tmp")
        write_q8_0(tmp)
        tmp.rename(src)
    if kind != "q8_0":
        tmp = out.with_suffix(".tmp")
        requantize(src, tmp, kind, threads or os.cpu_count() or 1)
        tmp.rename(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", default="q4_k_m,q4_0", help=f"comma separated, of {','.join(FTYPES)}")
    ap.add_argument("--dir", default=str(CACHE))
    ap.add_argument("--threads", type=int, default=0, help="llama.cpp quantizer threads (0: all cores)")
    args = ap.parse_args()
    for kind in args.types.split(","):
        p = make(kind.strip(), Path(os.path.expanduser(args.dir)), args.threads)
        print(f"{p}  {p.stat().st_size / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
