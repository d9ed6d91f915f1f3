"""ending: a process that ran a process group leaves after its exit handlers, before the interpreter's teardown."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from shadowgraft import ending

# A module global whose __del__ runs only in the interpreter's teardown, an
# exit handler, and output left in the buffers (stdout is a pipe, so fully
# buffered): what an ending keeps and what it skips.
SCRIPT = textwrap.dedent("""
    import atexit, sys
    from shadowgraft import ending

    class Teardown:
        def __del__(self):
            print("teardown ran", flush=True)

    keep = Teardown()
    atexit.register(lambda: print("exit handler ran"))
    print("written before the end", end="")
    sys.stderr.write("to stderr ")
    if sys.argv[1] == "group":
        ending.threads_outlive_teardown()
    code = sys.argv[2]
    ending.end(None if code == "none" else int(code) if code.isdigit() else code)
""")


def run(mode: str, code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT, mode, code], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("code,status", [("none", 0), ("0", 0), ("3", 3)])
def test_after_a_group_the_handlers_run_the_buffers_flush_and_teardown_is_skipped(code, status):
    r = run("group", code)
    assert r.returncode == status
    assert r.stdout == "written before the endexit handler ran\n"
    assert r.stderr == "to stderr "


def test_a_message_goes_to_stderr_with_status_1():
    r = run("group", "bad input")
    assert (r.returncode, r.stderr) == (1, "to stderr bad input\n")
    assert "teardown ran" not in r.stdout


def test_without_a_group_the_process_ends_normally():
    # The same script tells the two endings apart: here the teardown runs.
    r = run("plain", "3")
    assert r.returncode == 3
    assert r.stdout == "written before the endexit handler ran\nteardown ran\n"


def test_in_process_end_raises_system_exit(monkeypatch):
    monkeypatch.setattr(ending, "_state", {"threads": False})
    with pytest.raises(SystemExit) as e:
        ending.end(4)
    assert e.value.code == 4
