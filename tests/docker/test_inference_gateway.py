"""The inference-gateway component (docker/k8s/components/inference-gateway), checked without a cluster:
every overlay rendered by kustomize validates with kubeconform against the Kubernetes 1.35 schemas and
the CRDs of the InferencePool (gateway-api-inference-extension v1.6.2) and of Gateway/HTTPRoute
(gateway-api v1.5.0), and its core kinds with kubernetes-validate; a pool with a wrong appProtocol or
failureMode is rejected. The tools and schemas are set up
by scripts/setup.sh (step 5): a missing one fails here, it is not skipped."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "docker" / "k8s"
TOOLS = ROOT / ".tools"
SCHEMAS = ROOT / ".cache" / "k8s-schemas"
K8S_VERSION = "1.35.0"  # scripts/setup.sh K8S_SCHEMA_VERSION
CRD_KINDS = {"InferencePool", "Gateway", "HTTPRoute"}
OVERLAYS = ["cpu", "nvidia", "amd", "intel", "cpu-inference-gateway"]


def _tool(name: str) -> str:
    path = TOOLS / name
    assert path.exists(), f"{path} is missing: run scripts/setup.sh (its step 5 builds it)"
    return str(path)


def render(overlay: Path) -> str:
    r = subprocess.run([_tool("kustomize"), "build", str(overlay)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


def kubeconform(manifests: str) -> subprocess.CompletedProcess:
    """kubeconform -strict over `manifests`, with the core and the CRD schemas on this machine only."""
    assert (SCHEMAS / f"v{K8S_VERSION}-standalone-strict").is_dir(), "run scripts/setup.sh (core schemas)"
    return subprocess.run(
        [_tool("kubeconform"), "-strict", "-summary", "-kubernetes-version", K8S_VERSION,
         "-schema-location", str(SCHEMAS / "{{.NormalizedKubernetesVersion}}-standalone{{.StrictSuffix}}"
                                           / "{{.ResourceKind}}{{.KindSuffix}}.json"),
         "-schema-location", str(SCHEMAS / "{{.Group}}-{{.ResourceKind}}-{{.ResourceAPIVersion}}.json"), "-"],
        input=manifests, capture_output=True, text=True)


def kubernetes_validate(manifests: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """kubernetes-validate --strict over the core kinds of `manifests` (it knows no CRDs)."""
    core = [d for d in yaml.safe_load_all(manifests) if d and d["kind"] not in CRD_KINDS]
    f = tmp_path / "core.yaml"
    f.write_text(yaml.safe_dump_all(core))
    return subprocess.run([sys.executable, "-m", "kubernetes_validate", "-k", K8S_VERSION, "--strict", str(f)],
                          capture_output=True, text=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_validates_with_kubeconform_and_kubernetes_validate(overlay, tmp_path):
    out = render(K8S / "overlays" / overlay)
    r = kubeconform(out)
    assert r.returncode == 0, r.stdout + r.stderr
    n = len([d for d in yaml.safe_load_all(out) if d])
    assert f"Valid: {n}, Invalid: 0, Errors: 0, Skipped: 0" in r.stdout, r.stdout  # nothing left unchecked
    r = kubernetes_validate(out, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_component_together_validates(tmp_path):
    """models-pvc, tls-auth and inference-gateway on one overlay: the files no overlay above uses."""
    k8s = shutil.copytree(K8S, tmp_path / "k8s")
    overlay = k8s / "overlays" / "all"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [../nvidia]\n"
        "components: [../../components/tls-auth, ../../components/inference-gateway]\n")
    out = render(overlay)
    assert "specserve-tls" in out and "InferencePool" in out and "PersistentVolumeClaim" in out
    r = kubeconform(out)
    assert r.returncode == 0 and "Invalid: 0, Errors: 0, Skipped: 0" in r.stdout, r.stdout + r.stderr
    r = kubernetes_validate(out, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_gateway_overlay_routes_the_openai_port_through_the_pool():
    docs = [d for d in yaml.safe_load_all(render(K8S / "overlays" / "cpu-inference-gateway")) if d]
    by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    server = by[("Deployment", "specserve")]
    (c,) = [c for c in server["spec"]["template"]["spec"]["containers"] if c["name"] == "specserve"]
    assert c["args"][c["args"].index("--http-port") + 1] == "8080"
    assert {"name": "http", "containerPort": 8080, "protocol": "TCP"} in c["ports"]
    pool = by[("InferencePool", "specserve")]["spec"]
    assert pool["selector"]["matchLabels"] == server["spec"]["selector"]["matchLabels"]
    assert pool["targetPorts"] == [{"number": 8080}] and pool["appProtocol"] == "http"
    epp_ref = pool["endpointPickerRef"]
    epp_svc = by[("Service", epp_ref["name"])]
    assert epp_ref["port"]["number"] in [p["port"] for p in epp_svc["spec"]["ports"]]
    epp = by[("Deployment", "specserve-epp")]["spec"]["template"]["spec"]
    assert epp["serviceAccountName"] == "specserve-epp"
    (config,) = by[("ConfigMap", "specserve-epp")]["data"].values()
    plugins = {p["type"] for p in yaml.safe_load(config)["plugins"]}
    assert {"queue-scorer", "kv-cache-utilization-scorer", "prefix-cache-scorer"} <= plugins
    route = by[("HTTPRoute", "specserve")]["spec"]
    assert route["parentRefs"][0]["name"] == "specserve"
    assert route["rules"][0]["backendRefs"] == [{"group": "inference.networking.k8s.io", "kind": "InferencePool",
                                                 "name": "specserve"}]
    assert by[("Gateway", "specserve")]["spec"]["gatewayClassName"] == "istio"
    headless = by[("Service", "specserve-headless")]["spec"]  # the gRPC door keeps its own balancing
    assert headless["clusterIP"] == "None" and [p["name"] for p in headless["ports"]] == ["grpc"]


def _broken_overlay(tmp_path: Path, patch: str) -> str:
    """The gateway overlay plus one JSON patch, rendered (kustomize refuses paths outside its tree)."""
    k8s = shutil.copytree(K8S, tmp_path / "k8s")
    overlay = k8s / "overlays" / "broken"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources: [../cpu-inference-gateway]\npatches:\n{patch}")
    return render(overlay)


@pytest.mark.parametrize("field, value", [("appProtocol", "grpc"), ("endpointPickerRef/failureMode", "FailSoft")])
def test_a_wrong_pool_field_is_rejected(tmp_path, field, value):
    patch = ("  - target: {kind: InferencePool, name: specserve}\n"
             f"    patch: '[{{\"op\": \"replace\", \"path\": \"/spec/{field}\", \"value\": \"{value}\"}}]'\n")
    r = kubeconform(_broken_overlay(tmp_path, patch))
    assert r.returncode == 1, r.stdout
    assert "InferencePool specserve is invalid" in r.stdout, r.stdout
    assert f"at '/spec/{field}': value must be one of" in r.stdout, r.stdout
    print(r.stdout)  # the refusal, for the record (pytest -s)
