"""Parse and validate one safetensors header without trusting it.

The format is ``u64 little-endian N`` + ``N`` bytes of JSON + a data area.
Everything a later read relies on is checked here, before any tensor byte is
touched: a hostile header can only produce a ``ShadowgraftError``.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import ShadowgraftError

# Real headers are well under 1 MB; the cap only stops a lying length from
# making us allocate gigabytes.
MAX_HEADER_BYTES = 100 * 1024 * 1024

# Bits per element, from the safetensors spec. Sub-byte types pack elements.
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}

# Dtypes the engine does arithmetic on; every other tensor is only copied.
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes live: ``file[start:end]`` (absolute offsets)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


@dataclass(frozen=True)
class Header:
    file: Path
    data_start: int  # absolute offset of the data area
    tensors: tuple[TensorInfo, ...]  # in data-offset order
    metadata: dict[str, str]
    sha256: str  # of the 8 length bytes + JSON header, i.e. the file's identity


def _fail(path: Path, what: str) -> ShadowgraftError:
    return ShadowgraftError(f"{path}: {what}; the file is corrupt or not a safetensors file, re-download or re-save it")


def parse_header(raw: bytes, *, path: Path, file_size: int) -> Header:
    """Validate header bytes (starting at the 8 length bytes) against ``file_size``."""
    if len(raw) < 8:
        raise _fail(path, f"file is {file_size} bytes, too short for a safetensors header")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > MAX_HEADER_BYTES:
        raise _fail(path, f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte cap")
    if 8 + n > file_size:
        raise _fail(path, f"header length {n} runs past the end of the {file_size}-byte file")
    if len(raw) < 8 + n:
        raise _fail(path, f"header truncated ({len(raw) - 8} of {n} bytes)")
    body = raw[8 : 8 + n]
    try:
        obj = json.loads(body.decode("utf-8"), object_pairs_hook=unique_keys)
    except DuplicateKey as exc:
        raise _fail(path, f"header names '{exc.args[0]}' twice") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: deeply nested JSON
        raise _fail(path, f"header is not valid JSON ({exc.__class__.__name__})") from None
    if not isinstance(obj, dict):
        raise _fail(path, "header is not a JSON object")
    meta = obj.pop("__metadata__", None)
    meta = {} if meta is None else meta
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise _fail(path, "__metadata__ must map strings to strings")
    data_start = 8 + n
    data_size = file_size - data_start
    infos = []
    for name, entry in obj.items():
        infos.append(_entry(path, name, entry, data_start, data_size))
    infos.sort(key=lambda t: (t.start, t.end))
    prev = None
    for t in infos:
        if prev is not None and t.start < prev.end:
            raise _fail(path, f"tensors '{prev.name}' and '{t.name}' overlap in the data area")
        prev = t
    return Header(path, data_start, tuple(infos), dict(meta), hashlib.sha256(raw[: 8 + n]).hexdigest())


class DuplicateKey(ValueError):
    pass


def unique_keys(pairs: list) -> dict:
    # json keeps the last of two equal keys, other readers the first: a name
    # given twice could mean different tensors to different tools, so refuse it.
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set = set()
        raise DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return obj


def _entry(path: Path, name: str, entry, data_start: int, data_size: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise _fail(path, f"tensor '{name}' entry is not an object")
    dtype, shape, offs = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise _fail(path, f"tensor '{name}' has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise _fail(path, f"tensor '{name}' has an invalid shape {shape!r}")
    if (
        not isinstance(offs, list)
        or len(offs) != 2
        or not all(type(o) is int and o >= 0 for o in offs)
        or offs[0] > offs[1]
    ):
        raise _fail(path, f"tensor '{name}' has invalid data_offsets {offs!r}")
    if offs[1] > data_size:
        raise _fail(path, f"tensor '{name}' data_offsets {offs} run past the end of the file (data area is {data_size} bytes)")
    numel = 1
    for d in shape:
        numel *= d
        if numel >= 1 << 64:
            # The safetensors library multiplies in order with overflow checks and refuses such a
            # file even when a later dimension is 0; so do we, or the two would disagree on it.
            raise _fail(path, f"tensor '{name}' shape {shape} overflows 64 bits")
    bits = numel * DTYPE_BITS[dtype]
    if bits % 8 or bits // 8 != offs[1] - offs[0]:
        # Integer arithmetic only: a hostile shape can make numel overflow a float.
        need = f"{bits // 8}" if bits % 8 == 0 else f"{bits} bits, not a whole number of bytes"
        raise _fail(path, f"tensor '{name}' is {offs[1] - offs[0]} bytes but {dtype}{shape} needs {need}")
    return TensorInfo(name, dtype, tuple(shape), path, data_start + offs[0], data_start + offs[1])


def read_header(path: Path) -> Header:
    """Read and validate the header of the safetensors file at ``path``."""
    path = Path(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) == 8:
            (n,) = struct.unpack("<Q", head)
            if n <= MAX_HEADER_BYTES and 8 + n <= size:
                head += f.read(n)
    return parse_header(head, path=path, file_size=size)
