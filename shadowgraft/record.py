"""``shadowgraft.json``: how an output folder was made, in one home.

Every folder shadowgraft writes (a graft, a delta, a shadow adapter) holds
one: inputs pinned to revisions or header hashes, the settings, the tensors
grafted and the bytes written. ``verify`` checks a folder against it and
``--overwrite`` replaces only folders that hold it.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import ShadowgraftError

RECORD_NAME = "shadowgraft.json"


def write_record(folder: Path, record: dict) -> None:
    (Path(folder) / RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def read_record(folder: Path) -> dict | None:
    """The record of ``folder`` (None when it has none); one ``ShadowgraftError`` line when it is not a JSON object.

    The caller checks first that the file is a regular file of the folder (``files.regular_file``).
    """
    p = Path(folder) / RECORD_NAME
    if not p.is_file():
        return None
    try:
        rec = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ShadowgraftError(f"{p}: not valid JSON; it was changed after shadowgraft wrote it") from None
    if not isinstance(rec, dict):
        raise ShadowgraftError(f"{p}: not a JSON object; it was changed after shadowgraft wrote it")
    return rec
