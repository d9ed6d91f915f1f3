"""Check a checkpoint folder the way a careful loader would: ``shadowgraft verify``.

The cheap part reads only headers, the index and file sizes, and checks
``shadowgraft.json`` against them; ``apply`` runs it on its own output before
the rename. The full part streams every floating tensor once through reused
buffers and counts NaN/Inf. Each problem is one line naming the file and the
tensor, and one cause gives one line (a file whose header is broken is not
also reported as missing from the index).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .checkpoint import Checkpoint, is_repo_spec
from .errors import ShadowgraftError
from .files import Layout, file_problem, foreign_entries, locate, stray_shard, stray_shards
from .header import DTYPE_BITS, Header, TensorInfo, read_header
from .record import RECORD_NAME, read_record

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class VerifyReport:
    """What ``verify`` found; ``ok`` when ``problems`` is empty."""

    path: Path
    files: tuple[str, ...]  # the safetensors files that make up the checkpoint
    n_tensors: int
    nbytes: int  # tensor bytes, over all files
    problems: tuple[str, ...]  # one line each, naming file and tensor
    warnings: tuple[str, ...] = ()  # odd but loadable (e.g. a wrong total_size in the index)
    nonfinite: dict[str, int] = field(default_factory=dict)  # tensor -> NaN/Inf count
    values_checked: bool = False
    sha256: dict[str, str] = field(default_factory=dict)  # file -> sha256, with hash_files=True

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(
    path: str | os.PathLike,
    *,
    full: bool = True,
    hash_files: bool = False,
    progress: Callable[[int], None] | None = None,
) -> VerifyReport:
    """Validate a checkpoint folder (or one ``.safetensors`` file, an index file, or a Hub id).

    Cheap checks: every file is a regular file inside the folder (see
    ``files.py``), every header (see ``header.py``), no bytes outside tensors,
    the safetensors library itself accepts each file, no tensor stored twice,
    the index and the files agree, and ``shadowgraft.json`` (when present)
    matches the names, sizes and header hashes of what is there. ``full``
    also reads every floating tensor and counts NaN/Inf; ``hash_files``
    computes each file's sha256 (one more full read) and compares it with the
    blob name when the file lives in a Hugging Face cache.

    >>> verify("./grafted").problems                   # doctest: +SKIP
    ()
    """
    spec = path
    path = Path(path).expanduser()
    if not os.path.lexists(path):
        if not is_repo_spec(spec):
            raise FileNotFoundError(f"{path}: no such file or folder")
        from . import hub  # lazy: only Hub users pay for it

        # The snapshot as apply would read it; with hash_files, every file is
        # checked against the sha256 its blob is named by.
        path = hub.resolve(spec).path
    tick = progress or (lambda n: None)
    try:
        layout = locate(path)
    except ShadowgraftError as e:
        return VerifyReport(path, (), 0, 0, (str(e),))
    seen = _Seen.read(path, layout)
    problems, warnings = seen.problems, [*layout.notes, *seen.warnings]
    if path.is_dir():
        problems += foreign_entries(path)
        if not layout.notes:  # both layouts in one folder: already a warning naming them
            problems += [stray_shard(path / n) for n in stray_shards(path, layout)]
        if os.path.lexists(path / RECORD_NAME) and file_problem(path / RECORD_NAME, path) is None:
            _check_record(path, seen.headers, seen.tensors, seen.bad_files, seen.odd, problems, warnings)
    nonfinite: dict[str, int] = {}
    if full:
        nonfinite = _scan_values(path, seen.headers, problems, tick)
    sums: dict[str, str] = {}
    if hash_files:
        sums = _hash_files(seen.headers, problems, tick)
    return VerifyReport(
        path=path,
        files=tuple(f.name for f in layout.files),
        n_tensors=len(seen.tensors),
        nbytes=sum(t.nbytes for t in seen.tensors.values()),
        problems=tuple(problems),
        warnings=tuple(warnings),
        nonfinite=nonfinite,
        values_checked=full,
        sha256=sums,
    )


def check_written(folder: Path, plan, *, what: str = "checkpoint") -> dict[str, dict]:
    """The cheap checks of ``verify`` on a folder shadowgraft just wrote, reading each header once.

    Raises on the first problem, or when the tensors differ from ``plan``'s;
    returns what ``shadowgraft.json`` records as ``outputs``, built from the
    same headers. Run it once the weights and the index are written.

    >>> check_written(tmp, plan)                       # doctest: +SKIP
    {'model.safetensors': {'size': 1032, 'header_sha256': '9f2c...'}}
    """
    try:
        layout = locate(folder)
    except ShadowgraftError as e:
        raise ShadowgraftError(f"the written {what} fails verification, so it was not kept: {e}") from None
    seen = _Seen.read(folder, layout)
    problems = seen.problems + foreign_entries(folder)
    if problems:
        raise ShadowgraftError(f"the written {what} fails verification, so it was not kept: {problems[0]}")
    if {t.name: (t.dtype, t.shape) for t in seen.tensors.values()} != {i.name: (i.dtype, i.shape) for i in plan.items}:
        raise ShadowgraftError(f"{folder}: written {what} does not match the plan; this is a bug, please report it")
    return record_outputs(seen.headers, layout.index_path)


def record_outputs(headers: list[Header], index_path: Path | None) -> dict[str, dict]:
    """What ``shadowgraft.json`` records about the weight files: from headers already read, no file reopened.

    Shards get their size and header sha256: both come free with reading the
    header back, and together they catch a truncated, replaced or re-saved
    shard. A full sha256 would cost one more read of the whole output, so it is
    left to ``shadowgraft verify --hash``. The small index gets a full sha256.
    """
    out = {h.file.name: {"size": h.file.stat().st_size, "header_sha256": h.sha256} for h in headers}
    if index_path is not None:
        raw = index_path.read_bytes()
        out[index_path.name] = {"size": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    return dict(sorted(out.items()))


@dataclass
class _Seen:
    """Each header of a checkpoint read once, with what the header-level checks found."""

    headers: list[Header]
    tensors: dict[str, TensorInfo]
    problems: list[str]
    warnings: list[str]
    bad_files: set[Path]  # files whose header could not be read
    odd: set[Path]  # files already reported: later checks skip them, one cause, one line

    @classmethod
    def read(cls, path: Path, layout: Layout) -> "_Seen":
        problems: list[str] = []
        warnings: list[str] = []
        headers: list[Header] = []
        odd: set[Path] = set()
        for f in layout.files:
            try:
                h = read_header(f)
            except ShadowgraftError as e:
                problems.append(str(e))
                continue
            except OSError as e:
                problems.append(f"{f}: cannot be read ({e.strerror or type(e).__name__}); check its permissions")
                continue
            problem = _layout_problem(h) or _library_problem(h)
            if problem:
                problems.append(problem)
                odd.add(f)
            headers.append(h)
        tensors = _merge(path, headers, problems)
        bad_files = set(layout.files) - {h.file for h in headers}
        if layout.index is not None:
            held = {h.file: {t.name for t in h.tensors} for h in headers}
            _check_index(layout.index, layout.index_path, tensors, held, bad_files, problems, warnings)
        return cls(headers, tensors, problems, warnings, bad_files, odd)


# -- structure ------------------------------------------------------------


def _layout_problem(h: Header) -> str | None:
    # header.py accepts gaps (harmless to us); safetensors refuses them, so a
    # file with gaps or trailing bytes would not load in transformers.
    pos = h.data_start
    for t in h.tensors:
        if t.start > pos:
            return (f"{h.file}: bytes {pos - h.data_start}..{t.start - h.data_start} of the data area belong to no tensor "
                    f"(before '{t.name}'); safetensors refuses such files, re-save it")
        pos = max(pos, t.end)
    size = h.file.stat().st_size
    if size > pos:
        return f"{h.file}: {size - pos} byte(s) after the last tensor; safetensors refuses such files, re-save it"
    return None


def _library_problem(h: Header) -> str | None:
    # An independent second parser: the one every loader of the file will use.
    from safetensors import safe_open

    try:
        with safe_open(str(h.file), framework="numpy") as f:
            names = set(f.keys())
    except Exception as e:  # whatever the library raises, it means "will not load"
        return f"{h.file}: the safetensors library refuses it ({' '.join(str(e).split())})"
    if names != {t.name for t in h.tensors}:
        return f"{h.file}: the safetensors library sees other tensor names than its header lists; re-save it"
    return None


def _merge(path: Path, headers: list[Header], problems: list[str]) -> dict[str, TensorInfo]:
    tensors: dict[str, TensorInfo] = {}
    twice: dict[tuple[str, str], list[str]] = {}
    for h in headers:
        for t in h.tensors:
            if t.name in tensors:
                twice.setdefault((tensors[t.name].file.name, t.file.name), []).append(t.name)
            else:
                tensors[t.name] = t
    for (a, b), names in twice.items():
        problems.append(f"{path}: tensor '{names[0]}'{_more(names)} stored in both {a} and {b}; keep each tensor in one file")
    return tensors


def _check_index(index, index_path, tensors, held, bad_files, problems, warnings) -> None:
    wrong: dict[str, list[str]] = {}
    for name, f in index.items():
        if f not in bad_files and name not in held.get(f, ()):
            wrong.setdefault(f.name, []).append(name)
    for fname, names in wrong.items():
        problems.append(f"{index_path}: maps '{names[0]}'{_more(names)} to {fname}, which does not hold it; re-download the checkpoint")
    stray: dict[str, list[str]] = {}
    for name, t in tensors.items():
        if name not in index:
            stray.setdefault(t.file.name, []).append(name)
    for fname, names in stray.items():
        problems.append(f"{index_path}: tensor '{names[0]}'{_more(names)} in {fname} is not in the index; the index is stale")
    try:
        total = json.loads(index_path.read_text(encoding="utf-8")).get("metadata", {}).get("total_size")
    except (AttributeError, ValueError, OSError):
        total = None
    have = sum(t.nbytes for t in tensors.values())
    if isinstance(total, int) and total != have and not bad_files:
        warnings.append(f"{index_path}: metadata.total_size is {total} but the tensors hold {have} bytes (loaders ignore it)")


def _check_record(folder: Path, headers: list[Header], tensors: dict[str, TensorInfo], bad_files, odd, problems, warnings) -> None:
    p = folder / RECORD_NAME
    try:
        rec = read_record(folder)
    except ShadowgraftError as e:
        problems.append(str(e))
        return
    lists = {}
    for key in ("grafted", "copied"):
        names = rec.get(key)
        if names is None:
            continue
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            problems.append(f"{p}: '{key}' is not a list of tensor names")
            continue
        lists[key] = names
        missing = [n for n in names if n not in tensors]
        if missing and not bad_files:
            problems.append(f"{p}: {key} tensor '{missing[0]}'{_more(missing)} is not in the checkpoint; the folder was changed after shadowgraft wrote it")
    if len(lists) == 2 and not bad_files:
        known = set(lists["grafted"]) | set(lists["copied"])
        extra = [n for n in tensors if n not in known]
        if extra:
            problems.append(f"{folder}: tensor '{extra[0]}'{_more(extra)} is not recorded in {RECORD_NAME}; the folder was changed after shadowgraft wrote it")
    outputs = rec.get("outputs")
    if outputs is None:
        warnings.append(f"{p}: no 'outputs' record (older shadowgraft); file sizes and header hashes not compared")
        return
    if not isinstance(outputs, dict):
        problems.append(f"{p}: 'outputs' is not an object")
        return
    by_name = {h.file.name: h for h in headers}
    skip = {f.name for f in bad_files | odd}
    for fname, want in outputs.items():
        problem = None if fname in skip else _output_problem(folder, fname, want, by_name)
        if problem:
            problems.append(problem)
    unrecorded = [n for n in by_name if n not in outputs]
    if unrecorded:
        problems.append(f"{folder / unrecorded[0]}: not among the outputs recorded in {RECORD_NAME}; it was added afterwards")


def _output_problem(folder: Path, fname: str, want, by_name: dict[str, Header]) -> str | None:
    p = Path(fname)
    if not isinstance(want, dict) or p.is_absolute() or len(p.parts) != 1 or p.name in ("..", "."):
        return f"{folder / RECORD_NAME}: output entry '{fname}' is malformed"
    full = folder / p
    if not os.path.lexists(full):
        return f"{full}: recorded in {RECORD_NAME} but missing"
    if file_problem(full, folder):
        return None  # reported once, by foreign_entries
    size = full.stat().st_size
    if want.get("size") is not None and size != want["size"]:
        return f"{full}: {size} bytes but {RECORD_NAME} recorded {want['size']}; the file changed after shadowgraft wrote it"
    if "header_sha256" in want:
        h = by_name.get(fname)
        if h is None:
            return None  # its header problem is already reported
        if h.sha256 != want["header_sha256"]:
            return f"{full}: header sha256 differs from the one recorded in {RECORD_NAME}; the file was re-saved or replaced"
    if "sha256" in want and _sha256(full) != want["sha256"]:
        return f"{full}: sha256 differs from the one recorded in {RECORD_NAME}; the file changed after shadowgraft wrote it"
    return None


# -- values ---------------------------------------------------------------


def _scan_values(path: Path, headers: list[Header], problems: list[str], tick) -> dict[str, int]:
    """NaN/Inf count per floating tensor, reading each once in reused chunk buffers."""
    import torch

    from .stream import Reader

    if not headers:
        return {}
    # An element is NaN or Inf exactly when its exponent bits are all ones, i.e.
    # when its magnitude bits (sign masked off) are >= that pattern. One integer
    # AND and one max per chunk run ~25x faster than torch.isfinite on bf16.
    bits = {"BF16": (torch.int16, 0x7FFF, 0x7F80), "F16": (torch.int16, 0x7FFF, 0x7C00),
            "F32": (torch.int32, 0x7FFFFFFF, 0x7F800000),
            "F64": (torch.int64, 0x7FFFFFFFFFFFFFFF, 0x7FF0000000000000),
            "F8_E4M3": (torch.int8, 0x7F, 0x7F)}  # e4m3fn has no Inf; S.1111.111 is its NaN
    ck = Checkpoint(source=str(path), root=None, headers=headers, tensors={})
    reader = Reader([ck])
    found: dict[str, int] = {}
    try:
        for h in headers:
            try:
                for t in h.tensors:
                    if t.dtype not in bits or t.numel == 0:
                        tick(t.nbytes)
                        continue
                    itype, magnitude, inf = bits[t.dtype]
                    bad, isz = 0, DTYPE_BITS[t.dtype] // 8
                    for s, n in reader.spans(t):
                        x = reader.load("v", t, s, n).view(itype)
                        m = torch.bitwise_and(x, magnitude, out=reader.work("bits", n, itype))
                        if int(m.max()) >= inf:
                            bad += int((m >= inf).sum())
                        tick(n * isz)
                    if bad:
                        found[t.name] = bad
                        problems.append(f"{t.file}: tensor '{t.name}' has {bad} NaN/Inf value(s) of {t.numel}; "
                                        "a model with these weights outputs NaN, rebuild it from clean inputs")
            except ShadowgraftError as e:  # the file shrank since its header was read
                problems.append(str(e))
    finally:
        ck.close()
    return found


def _hash_files(headers: list[Header], problems: list[str], tick) -> dict[str, str]:
    sums = {}
    for h in headers:
        digest = _sha256(h.file, tick)
        sums[h.file.name] = digest
        # A Hugging Face cache stores each LFS file as blobs/<its sha256>.
        target = h.file.resolve()
        if h.file.is_symlink() and target.parent.name == "blobs" and _HEX64.match(target.name) and target.name != digest:
            problems.append(f"{h.file}: sha256 {digest} differs from its Hub blob name {target.name}; "
                            "the download is corrupt, delete it from the cache and download again")
    return sums


def _sha256(path: Path, tick=None) -> str:
    h = hashlib.sha256()
    buf = bytearray(8 << 20)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
            if tick is not None:
                tick(n)
    return h.hexdigest()


def _more(names: list[str]) -> str:
    return f" (and {len(names) - 1} more)" if len(names) > 1 else ""
