#!/usr/bin/env python3
"""specserve and llama-server side by side on the same GGUF, through the same OpenAI-API streaming client.

    python bench/bench_vs_llama_server.py                          # the 1.5B Qwen2.5-Coder (scripts/pull_model.py)
    python bench/bench_vs_llama_server.py --model smollm2 --only decode
    python bench/bench_vs_llama_server.py --reps 3 --threads 2 --backend ggml

llama-server is built by bench/build_llama_server.sh from the llama.cpp that llama-cpp-python vendors.
Both servers run with one slot, a 4096-cell context and the same threads; requests go to one server at
a time, repetitions interleaved (specserve, llama-server, llama-server with ngram-mod, specserve, ...),
so a machine shared with other jobs slows all of them alike. Every workload prints its medians and the
ratio of medians, with the CPU model:

  decode    an open-ended answer (greedy, 128 tokens), no speculation: tokens/s after the first token
  prefill   a ~1,300-token prompt, 1 token out, no prompt reuse: time to first token
  edit      a copy-heavy code edit (rename a variable in a 45-line function; each repetition a function
            neither server has seen): whole-request time, with specserve's n-gram drafting and with
            llama-server's best of plain and --spec-type ngram-mod
  specgain  specserve alone: open-ended answers to OPEN_ENDED's ten prompts (the decode workload's story
            first) with its n-gram drafting on vs off: tokens/s over all ten, no prompt reuse (nothing
            one answer wrote is drafted from in another). One prompt says little: the first 128 tokens
            of the story hold about eight n-gram matches, and drafting only the ones that verify would
            make it 1.3% faster at most, so one lucky or unlucky match moves that prompt's ratio as
            much as the policy does.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
WORKLOADS = ("decode", "prefill", "edit", "specgain")
STORY = "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle."
OPEN_ENDED = (STORY,
              "Explain how a hash table works, with its trade-offs, to a new programmer.",
              "Write an essay on the history of the printing press and its effects on Europe.",
              "Describe a week-long travel itinerary for Japan in spring, day by day.",
              "What are the differences between TCP and UDP? Explain in detail with examples.",
              "Write a letter to a friend describing your new job at a bakery.",
              "Give me ten tips to improve my sleep, each explained in a paragraph.",
              "Explain the causes of the French Revolution.",
              "Write a Python tutorial on list comprehensions with several examples.",
              "Summarise the plot of a mystery novel you invent, chapter by chapter.")
NAMES = ["total", "acc", "count_sum", "value_total", "agg", "subtotal", "sum_value", "tally", "result_sum"]


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} CPUs)"
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_path(name: str) -> str:
    if name == "smollm2":
        sys.path.insert(0, str(REPO))
        from service.common.packaged_model import packaged_model_path

        return packaged_model_path()
    if os.path.isfile(name):
        return name
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "pull_model.py"), name], check=True,
                         capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


@contextmanager
def server(cmd: list[str], port: int, log: Path, timeout: float = 600):
    """A server process; yields once GET /health answers 200, stops it (SIGTERM, then SIGKILL) after."""
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if p.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited with {p.returncode}; see {log}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{cmd[0]} not ready in {timeout:.0f} s; see {log}")
            time.sleep(0.5)
        yield p
    finally:
        os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def stream(port: int, messages: list[dict], max_tokens: int, extra: dict | None = None) -> dict:
    """One streamed chat completion: first-token time, end time, completion tokens, the text."""
    body = {"model": "default", "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, **(extra or {})}
    t0 = time.perf_counter()
    first, text, usage, chunks = None, [], None, 0
    with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=1800) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if ev.get("usage"):
                usage = ev["usage"]
            for ch in ev.get("choices") or []:
                piece = (ch.get("delta") or {}).get("content") or ""
                if piece:
                    first = first or time.perf_counter()
                    text.append(piece)
                    chunks += 1
    end = time.perf_counter()
    n = (usage or {}).get("completion_tokens") or chunks
    return {"ttft": (first or end) - t0, "decode_s": end - (first or end), "total": end - t0, "tokens": n,
            "text": "".join(text)}


def tok_s(r: dict) -> float:
    return (r["tokens"] - 1) / r["decode_s"] if r["decode_s"] > 0 else float("nan")


def long_prompt(rep: int) -> list[dict]:
    para = ("The lighthouse keeper climbed the narrow stairs every evening at dusk, carrying a lamp, a notebook "
            "and a flask of tea. From the gallery he could see the whole bay: the fishing boats coming home, the "
            "gulls circling the harbour, and the long line of cliffs fading into the mist. ")
    return [{"role": "user", "content": f"Document {rep}.\n" + para * 23 + "\nSummarise the document in one line."}]


def edit_prompt(rep: int) -> list[dict]:
    old, new = NAMES[rep % len(NAMES)], f"running_{NAMES[rep % len(NAMES)]}_{rep}"
    lines = [f"def summarize_orders_{rep}(orders, tax_rate={0.05 + rep / 100:.2f}):",
             '    """Sum the order amounts, apply tax and discounts, and report per customer."""',
             f"    {old} = 0", "    per_customer = {}", "    skipped = []"]
    for i in range(10):
        lines += [f"    for order in orders[{i}::{10}]:",
                  f"        if order.get('status') != 'paid_{i}':", "            skipped.append(order['id'])",
                  "            continue", f"        {old} += order['amount'] * (1 + tax_rate)"]
    lines += [f"    per_customer['all'] = {old}", f"    return {old}, per_customer, skipped"]
    code = "\n".join(lines)
    return [{"role": "user", "content": f"Rename the variable `{old}` to `{new}` in this Python function. "
                                        f"Reply with the whole function and nothing else.\n\n```python\n{code}\n```"}]


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-1.5b", help="smollm2, a scripts/pull_model.py name, or a path")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--backend", default="ggml")
    ap.add_argument("--only", default=",".join(WORKLOADS), help=f"comma-separated subset of {','.join(WORKLOADS)}")
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--edit-tokens", type=int, default=600)
    ap.add_argument("--out", default=str(REPO / "bench" / "out"))
    args = ap.parse_args()
    only = set(args.only.split(","))
    model = model_path(args.model)
    llama = subprocess.run([str(REPO / "bench" / "build_llama_server.sh")], check=True, capture_output=True,
                           text=True).stdout.strip().splitlines()[-1]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"CPU: {cpu_model()}; model {Path(model).name}; {args.threads} threads; {args.reps} reps; "
          f"specserve --backend {args.backend}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)

    sp_port, ll_port = free_port(), free_port()
    ss_cmd = [str(REPO / ".venv" / "bin" / "specserve"), "serve", "-m", model, "--backend", args.backend,
              "--threads", str(args.threads), "-np", "1", "-c", "4096", "--port", str(free_port()),
              "--http-port", str(sp_port), "--spec-type", "ngram", "--draft-max", "16"]
    ll_base = [llama, "-m", model, "-np", "1", "-c", "4096", "-t", str(args.threads), "--port", str(ll_port),
               "--no-warmup"]
    res: dict[str, list] = {}

    def add(key, v):
        res.setdefault(key, []).append(v)

    off = {"speculative": {"n_max": 0}, "cache_prompt": False}
    with server(ss_cmd, sp_port, out / "specserve.log"):
        for rep in range(args.reps):
            if "decode" in only:
                add("ss_decode", tok_s(stream(sp_port, [{"role": "user", "content": STORY}], args.decode_tokens, off)))
            if "specgain" in only:
                tokens, seconds = {"off": 0, "on": 0}, {"off": 0.0, "on": 0.0}
                for text in OPEN_ENDED:
                    for mode, extra in (("off", off), ("on", {"cache_prompt": False})):
                        r = stream(sp_port, [{"role": "user", "content": text}], args.decode_tokens, extra)
                        tokens[mode] += r["tokens"] - 1
                        seconds[mode] += r["decode_s"]
                add("ss_open_off", tokens["off"] / seconds["off"])
                add("ss_open_on", tokens["on"] / seconds["on"])
            if "prefill" in only:
                add("ss_prefill", stream(sp_port, long_prompt(rep), 1, off)["ttft"])
            if "edit" in only:
                r = stream(sp_port, edit_prompt(rep), args.edit_tokens)
                add("ss_edit", r["total"])
                add("ss_edit_tokens", r["tokens"])
    for label, extra_flags in (("ll", []), ("llmod", ["--spec-type", "ngram-mod"])):
        if label == "llmod" and "edit" not in only:
            continue
        with server(ll_base + extra_flags, ll_port, out / f"{label}.log"):
            for rep in range(args.reps):
                if label == "ll" and ("decode" in only):
                    add("ll_decode", tok_s(stream(ll_port, [{"role": "user", "content": STORY}], args.decode_tokens,
                                                  {"cache_prompt": False})))
                if label == "ll" and "prefill" in only:
                    add("ll_prefill", stream(ll_port, long_prompt(rep), 1, {"cache_prompt": False})["ttft"])
                if "edit" in only:
                    r = stream(ll_port, edit_prompt(rep), args.edit_tokens)
                    add(f"{label}_edit", r["total"])
                    add(f"{label}_edit_tokens", r["tokens"])

    print(json.dumps({k: [round(x, 3) for x in v] for k, v in res.items()}))
    rows = []
    if "decode" in only:
        rows.append(("decode tok/s (no speculation)", median(res["ss_decode"]), median(res["ll_decode"]),
                     median(res["ss_decode"]) / median(res["ll_decode"])))
    if "prefill" in only:
        rows.append(("prefill ~1,300 tokens, TTFT s", median(res["ss_prefill"]), median(res["ll_prefill"]),
                     median(res["ll_prefill"]) / median(res["ss_prefill"])))
    if "edit" in only:
        best = min(median(res["ll_edit"]), median(res.get("llmod_edit", [float("inf")])))
        rows.append(("code edit, whole request s (vs llama-server's best)", median(res["ss_edit"]), best,
                     best / median(res["ss_edit"])))
        rows.append(("  llama-server plain / ngram-mod s", median(res["ll_edit"]),
                     median(res.get("llmod_edit", [float("nan")])), float("nan")))
    if "specgain" in only:
        rows.append((f"specserve {len(OPEN_ENDED)} open-ended answers, drafting on / off tok/s",
                     median(res["ss_open_on"]), median(res["ss_open_off"]),
                     median(res["ss_open_on"]) / median(res["ss_open_off"])))
    print(f"{'workload':54} {'specserve':>10} {'llama-srv':>10} {'ratio':>7}")
    for name, a, b, ratio in rows:
        print(f"{name:54} {a:10.2f} {b:10.2f} {ratio:7.2f}x")
    print("ratio: specserve's speed over llama-server's (>1: specserve faster); specgain: on over off")
    return 0


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through server(): the servers it started are stopped too


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    sys.exit(main())
