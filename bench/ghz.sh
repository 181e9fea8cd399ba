#!/usr/bin/env bash
# Load-test a running specserve server with ghz, through server reflection (no .proto file needed).
#
#   bench/ghz.sh [HOST:PORT]          default: $SPECSERVE_ADDRESS or 127.0.0.1:50051
#
# Runs GenerationService/Generate (unary) and GenerateStream (server streaming), writes ghz's JSON
# reports to $GHZ_OUT_DIR, prints a one-line summary of each, and exits 1 if any call failed.
# Install ghz with `make setup` (GOBIN=.tools go install github.com/bojand/ghz/cmd/ghz@latest).
#
# Knobs (environment):
#   GHZ              ghz binary (default: .tools/ghz, else ghz on PATH)
#   GHZ_N            total calls per RPC (default 200)
#   GHZ_C            concurrent workers (default 8)
#   GHZ_MAX_TOKENS   max_tokens of each request (default 16)
#   GHZ_PROMPT       the prompt (default "Write one sentence about the sea.")
#   GHZ_PAIR         pair name (default: the server's "default")
#   GHZ_OUT_DIR      where the JSON reports go (default bench/out)
#   SPECSERVE_TOKEN  bearer token for a server started with --auth-token-file (sent as metadata)
#
# The same call by hand:
#   ghz --insecure --call specserve.v1.GenerationService/Generate \
#       -d '{"prompt": "Hello", "max_tokens": 16}' -n 200 -c 8 127.0.0.1:50051
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ADDRESS=${1:-${SPECSERVE_ADDRESS:-127.0.0.1:50051}}
GHZ=${GHZ:-}
if [ -z "$GHZ" ]; then
  if [ -x "$ROOT/.tools/ghz" ]; then GHZ="$ROOT/.tools/ghz"; else GHZ=$(command -v ghz || true); fi
fi
[ -n "$GHZ" ] || { echo "ghz not found: run make setup (or go install github.com/bojand/ghz/cmd/ghz@latest)" >&2; exit 2; }
N=${GHZ_N:-200}
C=${GHZ_C:-8}
MAX_TOKENS=${GHZ_MAX_TOKENS:-16}
PROMPT=${GHZ_PROMPT:-Write one sentence about the sea.}
PAIR=${GHZ_PAIR:-}
OUT_DIR=${GHZ_OUT_DIR:-$ROOT/bench/out}
PY=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=python3
mkdir -p "$OUT_DIR"

DATA=$("$PY" -c 'import json, sys; print(json.dumps({"pair": sys.argv[1], "prompt": sys.argv[2], "max_tokens": int(sys.argv[3])}))' \
  "$PAIR" "$PROMPT" "$MAX_TOKENS")

AUTH=()
if [ -n "${SPECSERVE_TOKEN:-}" ]; then
  AUTH=(--metadata "$("$PY" -c 'import json, sys; print(json.dumps({"authorization": "Bearer " + sys.argv[1]}))' \
    "$SPECSERVE_TOKEN")")
fi

status=0
for rpc in Generate GenerateStream; do
  report="$OUT_DIR/ghz-$rpc.json"
  "$GHZ" --insecure \
    --call "specserve.v1.GenerationService/$rpc" \
    -d "$DATA" \
    ${AUTH[@]+"${AUTH[@]}"} \
    -n "$N" -c "$C" \
    --connections 2 \
    --timeout 300s \
    --format json --output "$report" \
    "$ADDRESS"
  "$PY" - "$report" "$rpc" <<'PYEOF' || status=1
import json, sys
path, rpc = sys.argv[1], sys.argv[2]
r = json.load(open(path))
codes = r.get("statusCodeDistribution") or {}
errors = r.get("errorDistribution") or {}
ok = codes.get("OK", 0)
ns = 1e6  # ghz reports latencies in nanoseconds
print(f"ghz {rpc}: {r['count']} calls, {ok} OK, {r['rps']:.1f} rps, "
      f"avg {r['average'] / ns:.0f} ms, fastest {r['fastest'] / ns:.0f} ms, slowest {r['slowest'] / ns:.0f} ms; "
      f"status codes {codes}")
if errors or ok != r["count"]:
    print(f"ghz {rpc}: errors: {errors}", file=sys.stderr)
    sys.exit(1)
PYEOF
done
exit "$status"
