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

_state = {"for_good": False, "held": 0, "paused": False}


def pause() -> None:
    """Turn the collector off until ``imported()``: for a process that runs one command (``cli.console``).

    The collector's passes over what the imports make were a third of a
    small command's time: a 2 GB ``stats`` took 1.33 s end to end, 0.89 s
    with the collector paused and those objects then frozen (2-core AMD EPYC).
    """
    if gc.isenabled():
        gc.disable()
        _state["paused"] = True


def imported() -> None:
    """Called by each command once its libraries are imported: where ``pause()`` stopped the collector,
    freeze what exists now for the rest of the process and start it again. Otherwise (``cli.main`` run
    from Python) nothing changes."""
    if _state["paused"]:
        _state["paused"] = False
        freeze_for_good()
        gc.enable()


def freeze_for_good() -> None:
    """Freeze what exists now for the rest of the process: later passes, and the one at exit, skip it."""
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
