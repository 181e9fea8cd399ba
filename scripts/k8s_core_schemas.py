"""Write kubeconform-readable JSON schemas of the core Kubernetes kinds from the ones kubernetes-validate bundles.

kubernetes-validate ships yannh/kubernetes-json-schema's "local" schemas: each kind's file refers to
one shared `/api/_definitions.json`, a path only its own resolver knows. kubeconform wants each file
to stand alone, so each kind here gets the definitions it reaches copied in (`#/$defs/...`), and
loses its `$id` (a kubernetes.io URL its references would otherwise be fetched from).

    python scripts/k8s_core_schemas.py OUT_DIR [KUBERNETES_VERSION]   (default 1.35.0)

OUT_DIR/v<version>-standalone-strict/<kind>-<group>-<version>.json: the layout kubeconform's
default registry uses ({{.NormalizedKubernetesVersion}}-standalone{{.StrictSuffix}}/...).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import kubernetes_validate

PREFIX = "/api/_definitions.json#/$defs/"  # a kind's file to a definition
LOCAL = "#/$defs/"  # one definition to another


def refs(node, found: set[str]) -> None:
    """Every definition name `node` refers to, added to `found`."""
    if isinstance(node, dict):
        r = node.get("$ref")
        for prefix in (PREFIX, LOCAL):
            if isinstance(r, str) and r.startswith(prefix):
                found.add(r[len(prefix):])
        for v in node.values():
            refs(v, found)
    elif isinstance(node, list):
        for v in node:
            refs(v, found)


def standalone(schema: dict, defs: dict) -> dict:
    """`schema` with the definitions it reaches, transitively, under "$defs", and no "$id"."""
    todo, seen = set(), set()
    refs(schema, todo)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        refs(defs[name], todo)
    own = {k: v for k, v in schema.items() if k != "$id"}
    text = json.dumps({**own, "$defs": {n: defs[n] for n in sorted(seen)}})
    return json.loads(text.replace(json.dumps(PREFIX)[1:-1], LOCAL))


def main(out: str, version: str = "1.35.0") -> None:
    src = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / f"v{version}-local-strict"
    dst = Path(out) / f"v{version}-standalone-strict"
    dst.mkdir(parents=True, exist_ok=True)
    defs = json.loads((src / "_definitions.json").read_text())["$defs"]
    for f in src.glob("*.json"):
        if f.name.startswith("_") or f.name == "all.json":
            continue
        schema = json.loads(f.read_text())
        if "x-kubernetes-group-version-kind" not in schema:
            continue  # a part of a kind, not one that a manifest names
        (dst / f.name).write_text(json.dumps(standalone(schema, defs)))


if __name__ == "__main__":
    main(*sys.argv[1:])
