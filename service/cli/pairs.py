"""The pair commands of the client: fit, load, unload, list, spec (ModelService)."""

from __future__ import annotations

import sys

from service.cli.client import fmt_bytes, pb_module, spec_pb, stubs, to_json
from service.cli.flags import add_model_flags, add_speculative_flags, cache_changes, parse_bytes


def _pair_spec(args):
    pb = pb_module()
    from service.rpc.convert import KV_TO_PB

    params = pb.ContextParams(n_ctx=args.ctx_size, n_parallel=args.parallel, n_batch=args.batch_size)
    if args.kv_type:
        params.kv_type = KV_TO_PB[args.kv_type]
    if args.n_gpu_layers is not None:
        params.n_gpu_layers = args.n_gpu_layers
    for name, value in cache_changes(args).items():
        setattr(params, name, value)
    return pb.PairSpec(name=args.name, target_path=args.model, draft_path=args.model_draft, params=params,
                       speculative=spec_pb(args), memory_budget_bytes=args.memory_budget)


def _print_plan(plan, out) -> None:
    sums: dict[tuple[str, str, str], int] = {}
    for b in plan.buffers:
        key = (b.owner, b.kind, b.device)
        sums[key] = sums.get(key, 0) + b.bytes
    for (owner, kind, device), n in sums.items():
        print(f"  {owner:<7} {kind:<9} {device:<7} {fmt_bytes(n):>12}", file=out)
    print(f"  total {fmt_bytes(plan.total_bytes)} (device {fmt_bytes(plan.device_bytes)}, "
          f"host {fmt_bytes(plan.host_bytes)}); budget {fmt_bytes(plan.budget_bytes)}", file=out)
    t = plan.target
    print(f"  target: n_ctx {t.n_ctx}, n_parallel {t.n_parallel}, n_batch {t.n_batch}, "
          f"n_outputs_max {t.n_outputs_max}", file=out)
    if plan.HasField("draft"):
        d = plan.draft
        print(f"  draft:  n_ctx {d.n_ctx}, n_parallel {d.n_parallel}, n_batch {d.n_batch}, "
              f"n_outputs_max {d.n_outputs_max}", file=out)


def cmd_fit(args) -> int:
    model, _ = stubs(args)
    resp = model.Fit(pb_module().FitRequest(pair=_pair_spec(args)), timeout=args.timeout)
    if args.json:
        print(to_json(resp))
        return 0 if resp.fits else 3
    print(f"fits: {'yes' if resp.fits else 'no'} ({fmt_bytes(resp.available_bytes)} available)")
    _print_plan(resp.plan, sys.stdout)
    for a in resp.adjustments:
        print(f"  adjusted: {a}")
    if not resp.fits:
        print(f"  deficit {fmt_bytes(resp.deficit_bytes)}; largest n_ctx that fits: {resp.max_n_ctx or 'none'}")
    return 0 if resp.fits else 3


def cmd_load(args) -> int:
    model, _ = stubs(args)
    resp = model.Load(pb_module().LoadRequest(pair=_pair_spec(args)), timeout=args.timeout)
    if args.json:
        print(to_json(resp))
        return 0
    print(f"loaded pair {resp.name!r} in {resp.load_seconds:.1f} s: {len(resp.allocated)} buffers")
    _print_plan(resp.plan, sys.stdout)
    for a in resp.adjustments:
        print(f"  adjusted: {a}")
    return 0


def cmd_unload(args) -> int:
    model, _ = stubs(args)
    resp = model.Unload(pb_module().UnloadRequest(name=args.name, drain_timeout_seconds=args.drain_timeout),
                        timeout=args.timeout)
    print(f"unloaded pair {resp.name!r}: {fmt_bytes(resp.released_bytes)} released")
    return 0


def cmd_list(args) -> int:
    model, _ = stubs(args)
    resp = model.ListPairs(pb_module().ListPairsRequest(), timeout=args.timeout)
    if args.json:
        print(to_json(resp))
        return 0
    pb = pb_module()
    for p in resp.pairs:
        spec = p.speculative
        print(f"{p.name}: {pb.PairState.Name(p.state).removeprefix('PAIR_STATE_').lower()}, "
              f"{fmt_bytes(p.plan.total_bytes)}, slots {p.active_slots}/{p.plan.target.n_parallel} busy, "
              f"{p.queued} queued; spec {pb.DrafterType.Name(spec.type).removeprefix('DRAFTER_TYPE_').lower()} "
              f"n_max {spec.n_max}")
        print(f"  target {p.target_path}" + (f"\n  draft  {p.draft_path}" if p.draft_path else ""))
    if not resp.pairs:
        print("no pairs loaded")
    return 0


def cmd_spec(args) -> int:
    model, _ = stubs(args)
    pb = pb_module()
    if args.action == "get":
        resp = model.GetSpeculativeConfig(pb.GetSpeculativeConfigRequest(pair=args.pair), timeout=args.timeout)
    else:
        resp = model.UpdateSpeculativeConfig(
            pb.UpdateSpeculativeConfigRequest(pair=args.pair, config=spec_pb(args)), timeout=args.timeout)
    print(to_json(resp))
    return 0


def register(command) -> None:
    """fit, load, unload, list, spec."""
    for name, help_, func in (("fit", "plan a pair: memory per buffer and what makes it fit", cmd_fit),
                              ("load", "load a pair", cmd_load)):
        p = command(name, help_, func)
        add_model_flags(p, slots_default=0)
        add_speculative_flags(p, "drafter (default: draft with -md, else the server's)", "unset: the server's")
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
    add_speculative_flags(p, "drafter (default: unchanged)", "unset: unchanged")
