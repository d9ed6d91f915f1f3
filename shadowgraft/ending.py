"""How a process that ran one command ends: normally, or without the interpreter's teardown.

A gloo process group keeps worker threads that hold the last references to
finished collectives, tensors with Python objects among them, and release
them a moment after the collective completes. ``destroy_process_group`` does
not stop those threads (gloo has no shutdown; they stop when the group's last
reference goes, and DTensor's caches keep it). A rank that returns from its
last barrier and exits can reach interpreter teardown while such a thread is
still releasing a tensor: the thread wants the GIL, finds the interpreter
finalizing, is unwound, and ``std::terminate`` aborts the rank ("terminate
called without an active exception"; one torchrun test run in five on a busy
2-core machine). A process that ran a group therefore ends like this: exit
handlers run while the interpreter is whole, streams are flushed, and the
process leaves with ``os._exit`` before the teardown those threads cannot
survive. Every file the command wrote was closed before it returned.
"""

from __future__ import annotations

import atexit
import os
import sys
from typing import NoReturn

_state = {"threads": False}


def threads_outlive_teardown() -> None:
    """Called when this process starts a process group: its threads may still be releasing tensors at exit."""
    _state["threads"] = True


def end(code: object) -> NoReturn:
    """Leave the process with ``code`` (a ``SystemExit`` code: None, an int or a message)."""
    if not _state["threads"]:
        sys.exit(code)
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:
        print(code, file=sys.stderr)
        status = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass  # a closed pipe or stream has nothing left to say
    os._exit(status)
