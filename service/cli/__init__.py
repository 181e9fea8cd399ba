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

One module per group of subcommands: serve.py (the server), pairs.py (fit, load, unload, list, spec),
generate.py (generate, tokenize, detokenize, health), run.py (no server); flags.py holds the flag
groups they share, client.py the gRPC channel.
"""

from __future__ import annotations

import argparse
import logging
import sys

from service.cli import generate, pairs, run, serve
from service.cli.client import add_client_flags
from service.common.errors import InvalidArgument

log = logging.getLogger("specserve.cli")


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
            add_client_flags(p)
        return p

    for register in (serve.register, pairs.register, generate.register, run.register, generate.register_tools):
        register(command)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Run one `specserve` command; its exit status."""
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
