"""Bounds checks of a GGUF file's layout, before `gguf.GGUFReader` materialises anything.

`gguf.GGUFReader` trusts every count and length in the header: an array whose count says
2**60 makes it loop (or allocate) for ever, a string length past the end of the file makes
it fail deep inside numpy. `check_layout(path)` walks the same header with `struct` over a
read-only memory map and checks every count, length and offset against the file's size:

    magic "GGUF" | version u32 | n_tensors u64 | n_kv u64
    n_kv x       (key: string, value type u32, value)
    n_tensors x  (name: string, n_dims u32, dims u64 x n_dims, ggml type u32, data offset u64)
    padding to `general.alignment` | tensor data

where a string is (length u64, bytes) and an array value is (item type u32, count u64, items).
It is a validator only: it keeps nothing, and the reader still parses the file once it passes.
Refusals raise `LayoutError` with a message in the user's terms (what declares how much, and
how big the file is).
"""

from __future__ import annotations

import math
import mmap
import os
import struct

import gguf
from gguf import GGUFValueType as V

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)  # what gguf.GGUFReader reads
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_TENSORS = 1 << 16  # a 4096-block model has ~40k tensors
MAX_KV = 1 << 16  # real files hold tens of metadata keys
MAX_KEY_BYTES = 1 << 16  # the GGUF spec's limit on key length
MAX_ARRAY_ENTRIES = 1 << 23  # all metadata arrays together: the reader walks them one entry at a time
MAX_TENSOR_ELEMENTS = 1 << 48  # beyond any real tensor, far below numpy's int64 limits
MAX_NESTING = 2  # arrays of arrays at most

SCALAR_SIZES = {V.UINT8: 1, V.INT8: 1, V.BOOL: 1, V.UINT16: 2, V.INT16: 2, V.UINT32: 4, V.INT32: 4,
                V.FLOAT32: 4, V.UINT64: 8, V.INT64: 8, V.FLOAT64: 8}
MIN_KV_BYTES = 8 + 4 + 1  # empty key, value type, the smallest value
MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # empty name, n_dims, one dim, type, offset


class LayoutError(ValueError):
    """A GGUF header whose counts, lengths or offsets do not fit the file."""


def fmt_size(n: int) -> str:
    """Bytes for people: 1834 -> '1.8 KB', 1_800_000 -> '1.8 MB' (decimal units)."""
    if n < 1000:
        return f"{n} bytes"
    for unit in ("KB", "MB", "GB", "TB", "PB"):
        n /= 1000
        if n < 1000 or unit == "PB":
            return f"{n:.1f} {unit}"
    return f"{n} bytes"  # unreachable


class _Cursor:
    """Reads little- or big-endian fields from a buffer, refusing any read past its end."""

    def __init__(self, buf, size: int):
        self.buf, self.size, self.off, self.endian = buf, size, 0, "<"

    @property
    def left(self) -> int:
        return self.size - self.off

    def need(self, n: int, what: str) -> None:
        if n > self.left:
            raise LayoutError(f"the file ends inside {what} (byte {self.off} + {n} of {fmt_size(self.size)}): "
                              "it is truncated or corrupt")

    def _unpack(self, fmt: str, n: int, what: str) -> int:
        self.need(n, what)
        (v,) = struct.unpack_from(self.endian + fmt, self.buf, self.off)
        self.off += n
        return v

    def u32(self, what: str) -> int:
        return self._unpack("I", 4, what)

    def u64(self, what: str) -> int:
        return self._unpack("Q", 8, what)

    def skip(self, n: int, what: str) -> None:
        self.need(n, what)
        self.off += n

    def string(self, what: str, limit: int | None = None) -> bytes:
        """A (length u64, bytes) string; its length checked against the file (and `limit`)."""
        n = self.u64(f"the length of {what}")
        if n > self.left:
            raise LayoutError(f"{what} declares {n} bytes, the file holds {fmt_size(self.size)}")
        if limit is not None and n > limit:
            raise LayoutError(f"{what} is {n} bytes long, at most {limit} are allowed")
        s = bytes(self.buf[self.off:self.off + n])
        self.off += n
        return s


def _text(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise LayoutError(f"{what} is not UTF-8 text ({raw[:32]!r})") from None


class _Walk:
    """One pass over the header; `entries` counts metadata array entries against MAX_ARRAY_ENTRIES."""

    def __init__(self, cur: _Cursor):
        self.cur, self.entries, self.alignment = cur, 0, gguf.GGUF_DEFAULT_ALIGNMENT

    def header(self) -> tuple[int, int]:
        cur = self.cur
        if cur.size < 4 or bytes(cur.buf[:4]) != MAGIC:
            raise LayoutError(f"no GGUF magic: the file starts with {bytes(cur.buf[:4])!r}, not {MAGIC!r}")
        cur.off = 4
        version = cur.u32("the GGUF version")
        if version & 0xFFFF == 0:  # written on a big-endian machine (as gguf.GGUFReader detects it)
            cur.endian = ">"
            version = struct.unpack(">I", struct.pack("<I", version))[0]
        if version not in SUPPORTED_VERSIONS:
            raise LayoutError(f"GGUF version {version} is not supported (versions "
                              f"{', '.join(map(str, SUPPORTED_VERSIONS))} are)")
        n_tensors = cur.u64("the tensor count")
        n_kv = cur.u64("the metadata key count")
        self._count(n_kv, MIN_KV_BYTES, MAX_KV, "the header", "metadata entries")
        return n_tensors, n_kv

    def _count(self, n: int, min_bytes: int, cap: int, who: str, what: str) -> None:
        """A declared count whose smallest possible encoding must fit in what is left of the file."""
        if n * min_bytes > self.cur.left:
            raise LayoutError(f"{who} declares {n} {what}, the file holds {fmt_size(self.cur.size)}")
        if n > cap:
            raise LayoutError(f"{who} declares {n} {what}, at most {cap} are allowed")

    def metadata(self, n_kv: int) -> None:
        seen = set()
        for i in range(n_kv):
            key = _text(self.cur.string(f"metadata key #{i}", MAX_KEY_BYTES), f"metadata key #{i}")
            if key in seen:
                raise LayoutError(f"metadata key {key} appears twice")
            seen.add(key)
            vtype = self.cur.u32(f"the value type of {key}")
            if key == "general.alignment":
                self._alignment(vtype)
            else:
                self.value(key, vtype, 0)

    def _alignment(self, vtype: int) -> None:
        if vtype != V.UINT32:
            raise LayoutError(f"general.alignment must be a uint32 (its value type is {vtype})")
        a = self.cur.u32("general.alignment")
        if a == 0 or a & (a - 1):
            raise LayoutError(f"general.alignment {a} is not a power of two")
        self.alignment = a

    def value(self, key: str, vtype: int, depth: int) -> None:
        cur = self.cur
        if vtype in SCALAR_SIZES:
            cur.skip(SCALAR_SIZES[vtype], f"the value of {key}")
        elif vtype == V.STRING:
            cur.string(key)
        elif vtype == V.ARRAY:
            if depth >= MAX_NESTING:
                raise LayoutError(f"{key} nests arrays more than {MAX_NESTING} deep")
            itype = cur.u32(f"the item type of {key}")
            count = cur.u64(f"the entry count of {key}")
            self.array(key, itype, count, depth)
        else:
            raise LayoutError(f"{key} has an unknown value type {vtype}")

    def array(self, key: str, itype: int, count: int, depth: int) -> None:
        cur = self.cur
        min_bytes = SCALAR_SIZES.get(itype) or {V.STRING: 8, V.ARRAY: 12}.get(itype)
        if min_bytes is None:
            raise LayoutError(f"{key} is an array of an unknown value type {itype}")
        self._count(count, min_bytes, MAX_ARRAY_ENTRIES, key, "entries")
        self.entries += count
        if self.entries > MAX_ARRAY_ENTRIES:
            raise LayoutError(f"the metadata arrays hold more than {MAX_ARRAY_ENTRIES} entries in all")
        if itype in SCALAR_SIZES:
            cur.skip(count * min_bytes, f"the entries of {key}")
        elif itype == V.STRING:
            length = struct.Struct(cur.endian + "Q")
            for i in range(count):  # the hot loop of a 150k-token vocabulary: no helper calls
                cur.need(8, f"{key}[{i}]")
                (n,) = length.unpack_from(cur.buf, cur.off)
                if n > cur.left - 8:
                    raise LayoutError(f"{key}[{i}] declares {n} bytes, the file holds {fmt_size(cur.size)}")
                cur.off += 8 + n
        else:
            for i in range(count):
                self.value(f"{key}[{i}]", V.ARRAY, depth + 1)

    def tensor_infos(self, n_tensors: int) -> list[tuple[str, int, int]]:
        """(name, data offset, data bytes) of every tensor, each field checked."""
        self._count(n_tensors, MIN_TENSOR_INFO_BYTES, MAX_TENSORS, "the header", "tensors")
        cur, out, seen = self.cur, [], set()
        for i in range(n_tensors):
            name = _text(cur.string(f"the name of tensor #{i}", MAX_KEY_BYTES), f"the name of tensor #{i}")
            if name in seen:
                raise LayoutError(f"tensor {name} appears twice")
            seen.add(name)
            n_dims = cur.u32(f"the dimension count of tensor {name}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise LayoutError(f"tensor {name} has {n_dims} dimensions; GGUF tensors have 1 to {MAX_DIMS}")
            dims = [cur.u64(f"the shape of tensor {name}") for _ in range(n_dims)]
            if min(dims) < 1 or math.prod(dims) > MAX_TENSOR_ELEMENTS:
                raise LayoutError(f"tensor {name} has shape {dims}: each dimension must be >= 1 "
                                  f"and at most {MAX_TENSOR_ELEMENTS} elements in all")
            raw_type = cur.u32(f"the type of tensor {name}")
            try:
                ggml_type = gguf.GGMLQuantizationType(raw_type)
                block, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
            except (ValueError, KeyError):
                raise LayoutError(f"tensor {name} has an unknown type {raw_type}") from None
            if dims[0] % block:
                raise LayoutError(f"tensor {name}: a row of {dims[0]} is not a whole number of "
                                  f"{ggml_type.name} blocks of {block}")
            offset = cur.u64(f"the data offset of tensor {name}")
            out.append((name, offset, math.prod(dims) // block * type_size))
        return out

    def tensor_data(self, infos: list[tuple[str, int, int]]) -> None:
        size, a = self.cur.size, self.alignment
        start = -(-self.cur.off // a) * a
        for name, offset, nbytes in infos:
            if offset % a:
                raise LayoutError(f"tensor {name}: data offset {offset} is not a multiple of the alignment {a}")
            if start + offset + nbytes > size:
                raise LayoutError(f"tensor {name}: its {fmt_size(nbytes)} of data at byte {start + offset} "
                                  f"end past the end of the file ({fmt_size(size)}): it is truncated or corrupt")


def check_layout(path: str | os.PathLike) -> None:
    """Walk the GGUF header of `path` with bounds checks; raise LayoutError at the first field that
    does not fit the file. Reads only the header, through a read-only memory map."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 4:
            raise LayoutError(f"the file is {size} bytes long: too short for a GGUF file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            walk = _Walk(_Cursor(mm, size))
            n_tensors, n_kv = walk.header()
            walk.metadata(n_kv)
            walk.tensor_data(walk.tensor_infos(n_tensors))
