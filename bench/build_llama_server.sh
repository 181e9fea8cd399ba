#!/usr/bin/env bash
# Build llama-server (and llama-bench) from the llama.cpp source that the llama-cpp-python sdist
# vendors, for the side-by-side benchmarks (bench/bench_vs_llama_server.py). Nothing is committed:
# the sdist and the build live under .cache/llama.cpp/ (git-ignored).
#
#   bench/build_llama_server.sh            -> prints the path of llama-server
#
# Environment: LLAMA_CPP_PYTHON_VERSION (default 0.3.36), JOBS (default: every core).
# Takes ~10 min on 2 cores the first time; later runs print the path at once.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
DIR="$ROOT/.cache/llama.cpp/$VERSION"
BIN="$DIR/build/bin/llama-server"
STAMP="$DIR/build/.specserve-flags-no-amx"
if [ -x "$BIN" ] && [ -x "$DIR/build/bin/llama-bench" ] && [ -f "$STAMP" ]; then
  echo "$BIN"
  exit 0
fi
mkdir -p "$DIR"
PY="$ROOT/.venv/bin/python"
[ -x "$PY" ] || PY=python3
if [ ! -d "$DIR/src" ]; then
  "$PY" -m pip download --quiet --no-deps --no-binary :all: -d "$DIR" "llama-cpp-python==$VERSION" >&2
  tar -xzf "$DIR/llama_cpp_python-$VERSION.tar.gz" -C "$DIR"
  mv "$DIR/llama_cpp_python-$VERSION/vendor/llama.cpp" "$DIR/src"
  rm -rf "$DIR/llama_cpp_python-$VERSION"
fi
# -march=native, less AMX: ggml's AMX mat-mul segfaults on VMs whose kernel does not grant the AMX
# tile state (seen on a KVM Xeon with amx_int8 in its flags); llama.cpp then uses its AVX-512 kernels.
NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
cmake -S "$DIR/src" -B "$DIR/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
  -DCMAKE_C_FLAGS="$NO_AMX" -DCMAKE_CXX_FLAGS="$NO_AMX" \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF >&2
cmake --build "$DIR/build" --target llama-server llama-bench -j "${JOBS:-$(nproc)}" >&2
touch "$STAMP"
echo "$BIN"
