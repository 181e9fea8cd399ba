"""`specserve run`: generation in this process, no server, through the pair assembly a Load takes."""

from __future__ import annotations

import os
import sys
from dataclasses import replace

from service.cli.flags import (
    add_compute_flags,
    add_model_flags,
    add_prompt_flags,
    add_speculative_flags,
    backend_of,
    context_params,
    find_packaged_model,
    list_devices,
    response_format,
    sampling_changes,
    speculative_config,
)
from service.config.settings import DEFAULT_MAX_TOKENS
from service.engine.request import SamplingParams


def cmd_run(args) -> int:
    """Generate in this process, without a server: assemble the pair as a Load does (warm-up included),
    stream the text, print stats."""
    from service.config.settings import PairRequest
    from service.engine.request import GenRequest
    from service.fit.factory import PairFactory
    from service.pairs.assemble import assemble

    if args.list_devices:
        return list_devices(args.threads)
    # Every flag is checked (by the dataclasses) before the model is read.
    sampling = SamplingParams(**sampling_changes(args))
    fmt = response_format(args)
    spec = speculative_config(args)
    params = context_params(args, n_parallel=1)  # one prompt: one slot, and no cache unless asked for
    params = replace(params, prompt_cache_bytes=params.prompt_cache_bytes or 0,
                     ngram_cache_tokens=params.ngram_cache_tokens or 0)
    model = os.path.abspath(args.model or find_packaged_model())
    made = assemble(PairFactory(backend_of(args), device_memory_bytes=args.device_memory_bytes),
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


def register(command) -> None:
    """run."""
    p = command("run", "generate in this process with a local model (no server)", cmd_run, client=False)
    add_model_flags(p, slots_default=None)
    add_speculative_flags(p, "drafter (default: draft with -md, else ngram)")
    add_prompt_flags(p, f"most tokens generated (default and 0: {DEFAULT_MAX_TOKENS})")
    add_compute_flags(p)
