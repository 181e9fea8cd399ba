"""The folder listing is the architecture, and imports point one way only.

    compute <- common <- config <- fit <- engine <- pairs <- edge <- {rpc, http} <- server <- cli

A module may import its own layer and any layer to its left, never one to its right; rpc and http
(the two doors) never import each other; compute never imports service; and only rpc and the CLI
touch protobuf (service/pb). Every import counts: module level, inside a function, or under
TYPE_CHECKING. The checker reads the source (ast), so nothing is imported to check it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# (package, rank): a module may import ranks <= its own (rpc and http share a rank but not each other).
LAYERS = (
    ("compute", 0),
    ("service.common", 1),
    ("service.config", 2),
    ("service.fit", 3),
    ("service.engine", 4),
    ("service.pairs", 5),
    ("service.edge", 6),
    ("service.rpc", 7),
    ("service.http", 7),
    ("service.server", 8),
    ("service.cli", 9),
)
PROTOBUF = "service.pb"  # generated messages: only these layers may import them
PROTOBUF_USERS = ("service.rpc", "service.cli")
SIBLINGS = {"service.rpc": "service.http", "service.http": "service.rpc"}


def layer_of(module: str) -> tuple[str, int] | None:
    """The layer a dotted module name belongs to (None: outside the layers, e.g. numpy or service.pb)."""
    for name, rank in LAYERS:
        if module == name or module.startswith(name + "."):
            return name, rank
    return None


def is_module(module: str) -> bool:
    """Whether a dotted name is a module or package of this tree (not a class or function in one)."""
    path = ROOT.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `source`, relative ones resolved."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from service import cli` imports the module service.cli: a name that is a module is what counts
            modules = [f"{target}.{a.name}" for a in node.names if is_module(f"{target}.{a.name}")]
            found += [(node.lineno, m) for m in modules or [target]]
    return found


def violations(module: str, source: str, is_package: bool = False) -> list[str]:
    """Every import in `source` (the text of `module`) that goes against the layering."""
    own = layer_of(module)
    bad = []
    for line, target in imported_modules(source, module, is_package):
        if target == PROTOBUF or target.startswith(PROTOBUF + "."):
            if not any(module == u or module.startswith(u + ".") for u in PROTOBUF_USERS):
                bad.append(f"{module}:{line} imports protobuf ({target}); only rpc and the CLI may")
            continue
        theirs = layer_of(target)
        if own is None or theirs is None:
            continue
        if own[0] == "compute" and target.startswith("service"):
            bad.append(f"{module}:{line} imports {target}: compute never imports service")
        elif theirs[1] > own[1]:
            bad.append(f"{module}:{line} imports {target}: {own[0]} may not import {theirs[0]} (above it)")
        elif SIBLINGS.get(own[0]) == theirs[0]:
            bad.append(f"{module}:{line} imports {target}: the two doors never import each other")
    return bad


def _sources():
    for top in ("compute", "service"):
        for path in sorted((ROOT / top).rglob("*.py")):
            if "pb" not in path.relative_to(ROOT).parts:
                yield path


def test_every_module_of_service_and_compute_belongs_to_a_layer():
    stray = [str(p.relative_to(ROOT)) for p in _sources()
             if layer_of(module_name(p)) is None and module_name(p) != "service"]
    assert not stray, f"modules outside every layer (put each in the folder of its layer): {stray}"


def test_imports_point_down_the_layers_only():
    bad = []
    for path in _sources():
        bad += violations(module_name(path), path.read_text(), path.name == "__init__.py")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


@pytest.mark.parametrize("module, source, needle", [
    ("service.engine.engine", "from service.pairs.registry import PairRegistry\n", "may not import service.pairs"),
    ("service.fit.plan", "def f():\n    from service.engine import prompt_cache\n", "may not import service.engine"),
    ("service.http.app", "from service.rpc import convert\n", "never import each other"),
    ("service.rpc.servicers", "import service.http.app\n", "never import each other"),
    ("service.edge.auth", "from service.pb.specserve.v1 import specserve_pb2\n", "imports protobuf"),
    ("compute.llama", "from service.common.errors import InvalidArgument\n", "compute never imports service"),
    ("service.common.errors", "from . import tokenizer\nfrom ..config import settings\n",
     "may not import service.config"),
])
def test_the_checker_refuses_an_arrow_against_the_direction(module, source, needle):
    found = violations(module, source)
    assert len(found) == 1 and needle in found[0], found


def test_the_checker_allows_the_direction():
    assert violations("service.cli.serve", "from service.server import SpecServer\nfrom service.pb import x\n") == []
    assert violations("service.http.app", "from service.edge import auth\nfrom service.pairs.registry import R\n") == []
    assert violations("compute.llama", "import numpy as np\nfrom compute.backend import Backend\n") == []


MAX_CLASS_LINES, MAX_FUNCTION_LINES = 250, 60  # a class or function longer than this does several jobs


def test_no_class_or_function_in_service_outgrows_one_job():
    long = []
    for path in _sources():
        if path.parts[len(ROOT.parts)] != "service":
            continue  # compute/ is held to it by its own owners
        for node in ast.walk(ast.parse(path.read_text())):
            n = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
            if isinstance(node, ast.ClassDef) and n > MAX_CLASS_LINES or \
                    isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and n > MAX_FUNCTION_LINES:
                long.append(f"{path.relative_to(ROOT)}: {node.name} is {n} lines")
    assert not long, long


def test_benchmarks_never_import_the_tests():
    """bench/ and tests/ share reference implementations through reference/, not through each other."""
    bad = []
    for path in sorted((ROOT / "bench").rglob("*.py")):
        for line, target in imported_modules(path.read_text(), module_name(path), path.name == "__init__.py"):
            if target == "tests" or target.startswith("tests."):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not bad, bad
