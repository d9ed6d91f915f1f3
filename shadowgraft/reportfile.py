"""The files ``stats`` writes (--json, --csv, --plot): written whole or not at all, and replacing only their own kind.

A report path is typed by hand, often again and again; one slip (the
index file of the model being compared, a notes file of the same name)
must not cost the user that file. An existing file is replaced only when it
is a report of the same kind from an earlier run; anything else is refused
before any tensor is read. The new report is written beside the target and
moved over it, so a full disk or a file-size limit leaves the old file as
it was.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable

from .errors import ShadowgraftError

# The mark a plot carries (matplotlib's Creator field, in PNG, SVG and PDF alike).
PLOT_CREATOR = "shadowgraft stats"
_JSON_KEYS = {"a", "b", "summary", "tensors", "layers", "modules"}
_PLOT_MAX = 64 << 20  # a plot is a few hundred KB; a larger file is not one


def is_ours(path: Path, kind: str) -> bool:
    """Whether ``path`` holds a ``stats`` report of ``kind`` (so a new one may replace it)."""
    try:
        if kind == "json":
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
            return isinstance(d, dict) and _JSON_KEYS <= d.keys()
        if kind == "csv":
            with open(path, encoding="utf-8", newline="") as f:
                head = f.readline().rstrip("\r\n")
            return head.startswith("name,") and head.endswith(",only_in")
        if os.path.getsize(path) > _PLOT_MAX:
            return False
        return PLOT_CREATOR.encode() in Path(path).read_bytes()
    except (OSError, UnicodeDecodeError, ValueError):
        return False


def check_target(path: str | Path, kind: str) -> None:
    """Refuse now a target that is not ours to replace (called before any work); ``kind`` is the option's name."""
    p = Path(path).expanduser()
    if (p.exists() or p.is_symlink()) and not (p.is_file() and not p.is_symlink() and is_ours(p, kind)):
        raise ShadowgraftError(f"{path} exists and is not an earlier --{kind} report, so it is left alone; "
                               "name a new file, or remove that one first")


def write(path: str | Path, kind: str, fill: Callable[[str], None]) -> None:
    """Write the report through ``fill(temporary path)``, then move it over ``path``; on failure nothing changes."""
    p = Path(path).expanduser()
    check_target(p, kind)  # again: the run took time, and the file may have appeared since
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=f".tmp{p.suffix}", dir=p.parent)
    os.close(fd)
    try:
        fill(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, p)
    except OSError as e:
        raise ShadowgraftError(f"{path}: {e.strerror or e}; the report was not written"
                               f"{' and the earlier one is unchanged' if p.exists() else ''}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | Path, kind: str, text: str) -> None:
    def fill(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)

    write(path, kind, fill)


def _umask() -> int:
    # mkstemp makes 0600 files; a report gets the mode open() would have given it.
    mask = os.umask(0)
    os.umask(mask)
    return mask
