"""The objects imports leave behind, kept out of the garbage collector's passes.

Importing torch and the rest makes ~1M objects that live as long as the
process and are never garbage; every full pass of the collector walks them
all (80 ms each, measured, holding the GIL that every stage of a graft
needs), and so does the pass at exit. ``gc.freeze()`` moves them out of its
reach. Who froze is tracked here, not asked of ``gc``: in CPython 3.11
``gc.get_freeze_count()`` walks every frozen object, and asking it once per
output shard cost a 3 GB graft 0.3 s.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager
from typing import Iterator

_state = {"for_good": False, "held": 0}


def freeze_for_good() -> None:
    """Freeze what exists now for the rest of the process (a script, once its imports are done)."""
    gc.freeze()
    _state["for_good"] = True


@contextmanager
def held() -> Iterator[None]:
    """Freeze what exists now for the block, and thaw it after, unless it is frozen already."""
    if _state["for_good"] or _state["held"]:
        yield
        return
    gc.freeze()
    _state["held"] += 1
    try:
        yield
    finally:
        _state["held"] -= 1
        gc.unfreeze()
