#!/usr/bin/env bash
# Build and run bench/q4k_float_ceiling.c (see its header): the Q4_K mat-vec speed hand-written
# AVX-512 C reaches with float32 activations on this CPU, on all cores (or OMP_NUM_THREADS).
#     bench/q4k_float_ceiling.sh [N K]      default 5632 2048 (TinyLlama-1.1B's ffn_gate)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
if ! grep -qw avx512f /proc/cpuinfo; then echo "needs AVX-512F (this CPU has none)"; exit 0; fi
gcc -O3 -march=native -fopenmp "$here/q4k_float_ceiling.c" -o "$out/ceiling"
echo "# $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs) (family $(grep -m1 'cpu family' /proc/cpuinfo | cut -d: -f2 | xargs) model $(grep -m1 '^model\s' /proc/cpuinfo | cut -d: -f2 | xargs)), $(nproc) logical CPUs"
"$out/ceiling" "${1:-5632}" "${2:-2048}"
