#!/usr/bin/env bash
# Build the CPU image (docker/Dockerfile.cpu) and run it for real, with no
# container daemon and no registry: buildah (vfs storage, chroot isolation)
# builds it on top of a Debian bookworm base made locally with debootstrap.
#
#   scripts/image_test.sh               build + run: health, Generate, ghz, SIGTERM drain
#   scripts/image_test.sh --build-only  build + static checks + import check only
#   scripts/image_test.sh --clean       remove the images this script made, then exit
#
# Needs root (buildah chroot isolation, debootstrap) and apt access to Debian;
# buildah and debootstrap are installed with apt when missing. The base
# tarball is cached under .cache/image-test/ (delete it to rebuild the base).
#
# Environment knobs:
#   IMAGE_TEST_PORT       gRPC port the server binds on the host network (default 50151)
#   IMAGE_TEST_TIMEOUT    seconds to wait for SERVING (default 300)
#   IMAGE_TEST_CA         CA bundle mounted into the build for pip (default: $PIP_CERT
#                         or /etc/ssl/certs/ca-certificates.crt)
#   IMAGE_TEST_LAYERS     1 = cache build layers for faster reruns (vfs: slower cold builds)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE_DIR="$ROOT/.cache/image-test"
BASE_TAR="$CACHE_DIR/base-bookworm.tar.gz"
BASE_IMAGE=localhost/specserve-test-base:bookworm
IMAGE=localhost/specserve:cpu-test
CONTAINER="specserve-image-test-$$"
PORT="${IMAGE_TEST_PORT:-50151}"
TIMEOUT="${IMAGE_TEST_TIMEOUT:-300}"
CA="${IMAGE_TEST_CA:-${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}}"
PY="$ROOT/.venv/bin/python"
[ -x "$PY" ] || PY=python3
BUILDAH=(buildah --storage-driver vfs)
MODE=full

for arg in "$@"; do
  case "$arg" in
    --build-only) MODE=build ;;
    --clean) MODE=clean ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg (see --help)" >&2; exit 2 ;;
  esac
done

log() { printf '\n=== %s\n' "$*"; }
fail() { printf '\nFAIL: image test: %s\n' "$*" >&2; exit 1; }
now() { date +%s; }
declare -a TIMINGS=()
timed() {  # timed LABEL CMD...: run CMD, record its wall time
  local label=$1 t0 rc=0; shift
  t0=$(now)
  "$@" || rc=$?
  TIMINGS+=("$label: $(( $(now) - t0 ))s")
  return "$rc"
}

SERVER_PID=""
cleanup() {
  local rc=$?
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill_tree TERM "$SERVER_PID"; sleep 2; kill_tree KILL "$SERVER_PID"
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  "${BUILDAH[@]}" rm "$CONTAINER" >/dev/null 2>&1 || true
  if [ -n "${WORK_TMP:-}" ]; then
    # a failed debootstrap can leave its mounts behind
    for m in dev/pts proc sys; do umount "$WORK_TMP/rootfs/$m" 2>/dev/null || true; done
    rm -rf --one-file-system "$WORK_TMP"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
trap 'printf "\nFAIL: image test: command failed (line %s): %s\n" "$LINENO" "$BASH_COMMAND" >&2' ERR

descendants() {  # print PID and all its descendants (children first by depth)
  local pid=$1 child
  echo "$pid"
  for child in $(ps -o pid= --ppid "$pid" 2>/dev/null); do descendants "$child"; done
}
kill_tree() {  # kill_tree SIGNAL PID: signal PID and everything it started
  local sig=$1 pid
  for pid in $(descendants "$2"); do kill -s "$sig" "$pid" 2>/dev/null || true; done
}

# --------------------------------------------------------------------------
[ "$(id -u)" = 0 ] || fail "needs root (buildah chroot isolation, debootstrap)"

if [ "$MODE" = clean ]; then
  "${BUILDAH[@]}" rmi -f "$IMAGE" "$BASE_IMAGE" >/dev/null 2>&1 || true
  "${BUILDAH[@]}" rmi --prune >/dev/null 2>&1 || true
  echo "removed $IMAGE and $BASE_IMAGE (base tarball kept: $BASE_TAR)"
  exit 0
fi

if ! command -v buildah >/dev/null || ! command -v debootstrap >/dev/null; then
  log "installing buildah and debootstrap (apt)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq buildah debootstrap >/dev/null
fi

# Containers left by earlier runs that were killed (their pid is gone).
for name in $("${BUILDAH[@]}" containers --format '{{.ContainerName}}' 2>/dev/null); do
  case "$name" in
    specserve-image-test-*) kill -0 "${name##*-}" 2>/dev/null || "${BUILDAH[@]}" rm "$name" >/dev/null 2>&1 || true ;;
  esac
done

mkdir -p "$CACHE_DIR"
WORK_TMP=$(mktemp -d "$CACHE_DIR/tmp.XXXXXX")

make_base_tar() {
  local rootfs="$WORK_TMP/rootfs"
  debootstrap --variant=minbase bookworm "$rootfs" http://deb.debian.org/debian \
    >"$CACHE_DIR/debootstrap.log" 2>&1 || { tail -20 "$CACHE_DIR/debootstrap.log"; return 1; }
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -czf "$BASE_TAR.tmp" . && mv "$BASE_TAR.tmp" "$BASE_TAR"
  rm -rf "$rootfs"
}
if [ ! -s "$BASE_TAR" ]; then
  log "debootstrap --variant=minbase bookworm -> $BASE_TAR"
  timed "base rootfs (debootstrap + tar)" make_base_tar || fail "debootstrap failed"
else
  log "base tarball cached: $BASE_TAR"
fi

make_base_image() {
  local ctx="$WORK_TMP/base"
  mkdir -p "$ctx"
  ln "$BASE_TAR" "$ctx/base.tar.gz" 2>/dev/null || cp "$BASE_TAR" "$ctx/base.tar.gz"
  printf 'FROM scratch\nADD base.tar.gz /\n' >"$ctx/Containerfile"
  local old_base
  old_base=$("${BUILDAH[@]}" inspect --type image --format '{{.FromImageID}}' "$BASE_IMAGE" 2>/dev/null || true)
  "${BUILDAH[@]}" bud --isolation chroot --quiet -f "$ctx/Containerfile" -t "$BASE_IMAGE" "$ctx" >/dev/null
  [ -z "$old_base" ] || "${BUILDAH[@]}" rmi "$old_base" >/dev/null 2>&1 || true
}
# Rebuild the base image when it is missing or older than the tarball.
base_created=$("${BUILDAH[@]}" inspect --type image --format '{{.OCIv1.Created.Unix}}' "$BASE_IMAGE" 2>/dev/null || echo 0)
if [ "$base_created" -lt "$(stat -c %Y "$BASE_TAR")" ]; then
  log "base image $BASE_IMAGE from the tarball"
  timed "base image (FROM scratch + ADD)" make_base_image || fail "base image build failed"
else
  log "base image cached: $BASE_IMAGE"
fi

log "buildah bud docker/Dockerfile.cpu (BASE_IMAGE=$BASE_IMAGE) -> $IMAGE"
build_args=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
volumes=()
if [ -r "$CA" ]; then
  volumes+=(-v "$CA:/run/host-ca.crt:ro")
  build_args+=(--build-arg PIP_CERT=/run/host-ca.crt)
fi
# Layer caching costs a full rootfs copy per step with the vfs driver, so a
# cold build (CI) is faster without it; IMAGE_TEST_LAYERS=1 caches for reruns.
layers=(--layers=false)
[ "${IMAGE_TEST_LAYERS:-0}" = 1 ] && layers=(--layers)
old_id=$("${BUILDAH[@]}" inspect --type image --format '{{.FromImageID}}' "$IMAGE" 2>/dev/null || true)
timed "image build (buildah bud)" \
  "${BUILDAH[@]}" bud --isolation chroot --network host "${layers[@]}" --pull=never \
    --format docker "${volumes[@]}" "${build_args[@]}" \
    --ignorefile "$ROOT/docker/Dockerfile.cpu.dockerignore" \
    -f "$ROOT/docker/Dockerfile.cpu" -t "$IMAGE" "$ROOT" \
  || fail "image build failed"
# The previous build of the tag is now untagged: remove it (vfs images are big).
if [ -n "$old_id" ] && [ "$old_id" != "$("${BUILDAH[@]}" inspect --type image --format '{{.FromImageID}}' "$IMAGE")" ]; then
  "${BUILDAH[@]}" rmi "$old_id" >/dev/null 2>&1 || true
fi

# -------------------------------------------------------------- static checks
log "static checks on the image config"
"${BUILDAH[@]}" inspect --type image "$IMAGE" >"$WORK_TMP/image.json"
config() {  # config KEY: a field of the image's Docker config (JSON for lists/maps)
  "$PY" -c 'import json, sys
v = json.load(open(sys.argv[1]))["Docker"]["config"].get(sys.argv[2])
print(v if isinstance(v, str) else json.dumps(v, separators=(",", ":")))' "$WORK_TMP/image.json" "$1"
}
user=$(config User)
entrypoint=$(config Entrypoint)
cmd=$(config Cmd)
healthcheck=$(config Healthcheck)
size=$("${BUILDAH[@]}" images --format '{{.Size}}' "$IMAGE" | head -1)
echo "user=$user entrypoint=$entrypoint cmd=$cmd size=$size"
echo "healthcheck=$healthcheck"
case "$user" in ""|0|0:*|root|root:*) fail "image runs as root (USER=$user)" ;; esac
case "$entrypoint" in '["'*) ;; *) fail "ENTRYPOINT is not exec form: $entrypoint" ;; esac
case "$healthcheck" in *'"specserve","health"'*) ;; *) fail "HEALTHCHECK missing: $healthcheck" ;; esac

"${BUILDAH[@]}" from --name "$CONTAINER" --pull=never "$IMAGE" >/dev/null
crun() { "${BUILDAH[@]}" run --isolation chroot --network host "$CONTAINER" -- "$@"; }

compilers=$(crun sh -c 'for c in gcc cc g++ c++ clang make; do command -v $c; done; true')
[ -z "$compilers" ] || fail "runtime stage contains compilers: $compilers"
echo "no compilers in the runtime stage; runs as: $(crun id)"

log "import check inside the image"
crun python -c "import numpy, grpc, gguf, pyopencl; print('numpy', numpy.__version__, 'grpc', grpc.__version__, 'pyopencl', pyopencl.VERSION_TEXT)" \
  || fail "python imports failed inside the image"
log "OpenCL devices inside the image (specserve serve --list-devices: each probed)"
crun specserve serve --list-devices | tee "$WORK_TMP/devices.txt" \
  || fail "specserve serve --list-devices failed inside the image"
grep -q '\] ok (' "$WORK_TMP/devices.txt" \
  || fail "no OpenCL device inside the image passed its probe (see the reasons above)"

if [ "$MODE" = build ]; then
  log "timings"; printf '  %s\n' "${TIMINGS[@]}"
  printf '\nPASS: image test (build only): %s\n' "$IMAGE"
  exit 0
fi

# ------------------------------------------------------------------ real run
crun sh -c 'command -v specserve' >/dev/null || fail "no specserve console script in the image"

log "starting the image's entrypoint on 127.0.0.1:$PORT (host network)"
# The image's own ENTRYPOINT, with CMD replaced to bind the test port.
mapfile -t ENTRY < <("$PY" -c 'import json,sys; print("\n".join(json.loads(sys.argv[1])))' "$entrypoint")
SERVER_LOG="$WORK_TMP/server.log"
"${BUILDAH[@]}" run --isolation chroot --network host "$CONTAINER" -- \
  "${ENTRY[@]}" serve --host 127.0.0.1 --port "$PORT" >"$SERVER_LOG" 2>&1 &
SERVER_PID=$!

health() {  # prints the grpc.health.v1 status of service "" (or the error)
  "$PY" - "$1" <<'EOF'
import sys, grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
try:
    with grpc.insecure_channel(sys.argv[1]) as ch:
        r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=3)
        print(health_pb2.HealthCheckResponse.ServingStatus.Name(r.status))
except grpc.RpcError as e:
    print(e.code().name)
EOF
}
t0=$(now); status=""
while :; do
  status=$(health "127.0.0.1:$PORT")
  [ "$status" = SERVING ] && break
  kill -0 "$SERVER_PID" 2>/dev/null || { cat "$SERVER_LOG"; fail "server exited before SERVING"; }
  [ $(( $(now) - t0 )) -lt "$TIMEOUT" ] || { tail -50 "$SERVER_LOG"; fail "not SERVING after ${TIMEOUT}s (last: $status)"; }
  sleep 2
done
TIMINGS+=("server start to SERVING: $(( $(now) - t0 ))s")
echo "grpc.health.v1 Check(\"\") from the host: SERVING"

crun "${ENTRY[@]}" health --address "127.0.0.1:$PORT" \
  || fail "the HEALTHCHECK command (specserve health) failed inside the image"
echo "HEALTHCHECK command inside the image: exit 0"

log "Generate (unary, max_tokens=4)"
# The client runs on the host when it can: the venv's console script, else the
# source tree with the venv's packages, else (no grpc on the host) the image's.
if [ -x "$ROOT/.venv/bin/specserve" ]; then
  client=("$ROOT/.venv/bin/specserve"); where="host: .venv/bin/specserve"
elif (cd "$ROOT" && "$PY" -c "import service.cli") 2>/dev/null; then
  client=(env "PYTHONPATH=$ROOT" "$PY" -m service.cli); where="host: $PY -m service.cli (source tree)"
else
  client=("${BUILDAH[@]}" run --isolation chroot --network host "$CONTAINER" -- specserve); where="inside the image (no host client)"
fi
t0=$(now)
out=$("${client[@]}" generate --no-stream --address "127.0.0.1:$PORT" --max-tokens 4 "Hello") \
  || { tail -30 "$SERVER_LOG"; fail "Generate failed"; }
TIMINGS+=("Generate (4 tokens): $(( $(now) - t0 ))s")
echo "client: $where"
echo "output: $out"
[ -n "$out" ] || fail "Generate returned nothing"
grep -q "backend=ggml" "$SERVER_LOG" || { grep -i backend "$SERVER_LOG" | tail -5; fail "the image did not serve on ggml"; }
echo "backend: ggml (server log)"

GHZ=$(command -v "$ROOT/.tools/ghz" ghz 2>/dev/null | head -1 || true)
if [ -n "$GHZ" ]; then
  log "ghz with the compose load-test config (docker/ghz/generate.json), 4 calls"
  t0=$(now)
  "$GHZ" --config "$ROOT/docker/ghz/generate.json" -n 4 -c 2 --connections 1 -O json \
    "127.0.0.1:$PORT" >"$WORK_TMP/ghz.json" || { tail -30 "$SERVER_LOG"; fail "ghz failed"; }
  TIMINGS+=("ghz (4 x Generate, max_tokens 16): $(( $(now) - t0 ))s")
  "$PY" - "$WORK_TMP/ghz.json" <<'EOF2' || fail "ghz calls failed (see above)"
import json, sys
r = json.load(open(sys.argv[1]))
codes = r.get("statusCodeDistribution", {})
print(f"ghz: {r['count']} calls, status {codes}, average {r['average'] / 1e9:.2f}s")
sys.exit(0 if codes == {"OK": r["count"]} else 1)
EOF2
else
  echo "(ghz not found: skipping the load-test config check; make setup builds .tools/ghz)"
fi

log "SIGTERM drain"
# chroot isolation shares the host PID namespace: signal the server itself.
srv=""
for pid in $(descendants "$SERVER_PID"); do
  if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "serve --host 127.0.0.1 --port $PORT"; then
    [ "$pid" = "$SERVER_PID" ] || srv=$pid
  fi
done
[ -n "$srv" ] || fail "could not find the server process under buildah run ($SERVER_PID)"
# A streaming generation is in flight when SIGTERM arrives: it must finish.
"${client[@]}" generate --address "127.0.0.1:$PORT" --timeout 90 --max-tokens 64 "Count from one to fifty:" \
  >"$WORK_TMP/inflight.out" 2>&1 &
inflight=$!
sleep 2
in_flight=yes
kill -0 "$inflight" 2>/dev/null || in_flight="no (it finished within 2 s)"
kill -TERM "$srv"
t0=$(now)
while kill -0 "$SERVER_PID" 2>/dev/null && [ $(( $(now) - t0 )) -lt 60 ]; do sleep 1; done
kill -0 "$SERVER_PID" 2>/dev/null && { tail -20 "$SERVER_LOG"; fail "server still running 60s after SIGTERM"; }
rc=0; wait "$SERVER_PID" || rc=$?
SERVER_PID=""
[ "$rc" = 0 ] || { tail -20 "$SERVER_LOG"; fail "server exit status $rc after SIGTERM (want 0)"; }
rc=0; wait "$inflight" || rc=$?
[ "$rc" = 0 ] || { cat "$WORK_TMP/inflight.out"; fail "the request in flight at SIGTERM failed (exit $rc)"; }
echo "request in flight at SIGTERM: $in_flight; it completed: $(tr '\n' ' ' <"$WORK_TMP/inflight.out" | cut -c1-60)..."
echo "server drained and exited 0 in $(( $(now) - t0 ))s"

log "timings"; printf '  %s\n' "${TIMINGS[@]}"
printf '\nPASS: image test: %s built, SERVING, Generate answered, SIGTERM drained\n' "$IMAGE"
