"""The generation commands of the client: generate, tokenize, detokenize, health (GenerationService, health)."""

from __future__ import annotations

import json
import math
import sys

from service.cli.client import open_channel, pb_module, spec_pb, stubs, to_json
from service.cli.flags import add_prompt_flags, add_speculative_flags, response_format, sampling_changes


def _request_fields(args, pb) -> dict:
    """The GenerateRequest fields the flags set (the server applies its own rules to the prompt)."""
    prompt = sys.stdin.read() if args.prompt in (None, "-") else args.prompt
    fields = dict(pair=args.pair, stop=args.stop, sampling=pb.SamplingParams(**sampling_changes(args)),
                  request_id=args.request_id)
    if args.max_tokens is not None:  # unset: the server's default applies; 0: only score the prompt
        fields["max_tokens"] = args.max_tokens
    if args.chat or args.system:
        msgs = ([pb.ChatMessage(role="system", content=args.system)] if args.system else [])
        msgs.append(pb.ChatMessage(role="user", content=prompt))
        fields["messages"] = pb.ChatMessages(messages=msgs)
    else:
        fields["prompt"] = prompt
    spec = spec_pb(args)
    if spec.ListFields():
        fields["speculative"] = spec
    if args.logprobs is not None:
        fields.update(logprobs=True, top_logprobs=args.logprobs)
    if args.prompt_logprobs is not None:
        fields["prompt_logprobs"] = args.prompt_logprobs
    if args.n_samples > 1:
        fields["n"] = args.n_samples
    fmt = response_format(args)
    if fmt is not None:
        fields["response_format"] = pb.ResponseFormat(**{fmt.kind: fmt.value or True})
    return fields


def cmd_generate(args) -> int:
    _, gen = stubs(args)
    pb = pb_module()
    fields = _request_fields(args, pb)
    if args.no_stream:
        final = _generate_unary(args, gen, pb.GenerateRequest(**fields))
    else:
        final = _generate_stream(args, gen, pb.GenerateStreamRequest(**fields))
    if args.stats and final is not None:
        u, s, t = final.usage, final.speculative_stats, final.timings
        print(f"[{pb.FinishReason.Name(final.finish_reason).removeprefix('FINISH_REASON_').lower()}] "
              f"prompt {u.prompt_tokens} tok, completion {u.completion_tokens} tok, "
              f"{t.tokens_per_second:.1f} tok/s, ttft {t.time_to_first_token_seconds * 1000:.0f} ms, "
              f"drafted {s.drafted}, accepted {s.accepted} ({s.acceptance_rate:.0%})", file=sys.stderr)
    return 0


def _generate_unary(args, gen, request):
    """Generate: print the whole response; it is the final message (usage, stats)."""
    resp = gen.Generate(request, timeout=args.timeout)
    if args.json:
        print(to_json(resp))
    else:
        _print_choices({c.index: c.text for c in resp.choices} or {0: resp.text}, args.n_samples > 1)
        _print_logprobs(resp.prompt_logprobs, {c.index: c.logprobs for c in resp.choices})
    return resp


def _generate_stream(args, gen, request):
    """GenerateStream: one completion printed as it comes, several each when it ends; the last final message."""
    final = None
    texts: dict[int, str] = {}
    lps: dict[int, list] = {}
    prompt_lps: list = []
    for msg in gen.GenerateStream(request, timeout=args.timeout):
        if not args.json and args.n_samples <= 1:
            sys.stdout.write(msg.text)
            sys.stdout.flush()
        texts[msg.index] = texts.get(msg.index, "") + msg.text
        lps.setdefault(msg.index, []).extend(msg.logprobs)
        prompt_lps.extend(msg.prompt_logprobs)
        if msg.finish_reason:
            final = msg
            if not args.json and args.n_samples > 1:
                _print_choices({msg.index: texts[msg.index]}, numbered=True)
    if args.json and final is not None:
        print(to_json(final))
    elif not args.json:
        if args.n_samples <= 1:
            sys.stdout.write("\n")
        _print_logprobs(prompt_lps, lps)
    return final


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


def cmd_tokenize(args) -> int:
    _, gen = stubs(args)
    msg = pb_module().TokenizeRequest(pair=args.pair, text=args.text, add_special=args.add_special,
                                      parse_special=not args.no_parse_special)
    resp = gen.Tokenize(msg, timeout=args.timeout)
    print(json.dumps(list(resp.tokens)))
    return 0


def cmd_detokenize(args) -> int:
    _, gen = stubs(args)
    msg = pb_module().DetokenizeRequest(pair=args.pair, tokens=args.ids, skip_special=args.skip_special)
    resp = gen.Detokenize(msg, timeout=args.timeout)
    print(resp.text)
    return 0


def cmd_health(args) -> int:
    """Exit 0 when the health service reports SERVING, 1 otherwise (unreachable included)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        resp = health_pb2_grpc.HealthStub(open_channel(args)).Check(
            health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout or 5)
    except grpc.RpcError as e:
        print(f"{args.address}: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    print(name)
    return 0 if resp.status == health_pb2.HealthCheckResponse.SERVING else 1


def register(command) -> None:
    """generate."""
    p = command("generate", "generate text, streamed as it comes", cmd_generate)
    add_prompt_flags(p, "most tokens generated (default: the server's -n; 0 with --prompt-logprobs: "
                        "score the prompt only)")
    p.add_argument("--pair", default="", help="pair name (default: default)")
    add_speculative_flags(p, "per-request drafter (default: the pair's)", "unset: the pair's")
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


def register_tools(command) -> None:
    """tokenize, detokenize, health."""
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
