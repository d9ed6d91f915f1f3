"""Interrupted, killed, starved and concurrent ``apply`` runs never leave a partial model under the final name.

Runs happen in child processes forked from one warm server process (so each
trial costs the run, not another ``import torch``), running the real CLI
``main``. The children write through a "slow disk" (every write call sleeps a
little) so that a tiny model takes about a second and signals land at random
moments: before the first shard, inside a tensor, between shards, during the
side files or the commit. The seed is printed with each failure.
"""

from __future__ import annotations

import json
import os
import random
import resource
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import shadowgraft
from shadowgraft import ShadowgraftError
from shadowgraft.synthetic import Shape, make_trio
from shadowgraft.verify import verify
from shadowgraft.writer import OutputDir, signals_deferred

REPO = Path(__file__).resolve().parents[1]
SLOW = 0.015  # seconds per write call in the children: about one second per run
WINDOW = 1.2  # signals land within this many times a measured run after the temp folder appears (some after the end)
SERVER = r"""
import json, os, resource, signal, sys, time
import shadowgraft.cli, shadowgraft.graft, shadowgraft.verify  # warm: children start with torch imported

def slow_down(delay):
    # A slow disk: each write-like call waits first, so a signal can land inside it.
    for name in ("write", "pwrite", "writev", "pwritev", "copy_file_range", "sendfile"):
        real = getattr(os, name, None)
        if real is not None:
            def wrapped(*a, _real=real, **k):
                time.sleep(delay)
                return _real(*a, **k)
            setattr(os, name, wrapped)

def child(req):
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.dup2(os.open(req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 2)
    if req.get("slow"):
        slow_down(req["slow"])
    # A terminal's default, whatever the test runner was started under (nohup ignores SIGHUP).
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    code = 0
    try:
        shadowgraft.cli.main(req["argv"])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    sys.stderr.flush()
    os._exit(code)

for line in sys.stdin:
    req = json.loads(line)
    if req["op"] == "start":
        pid = os.fork()
        if pid == 0:
            child(req)
        print(json.dumps({"pid": pid}), flush=True)
    else:
        _, status = os.waitpid(req["pid"], 0)
        print(json.dumps({"code": os.waitstatus_to_exitcode(status)}), flush=True)
"""


class Forker:
    """Starts CLI runs in children of one warm process; ``wait`` returns the exit code (-9 for SIGKILL)."""

    def __init__(self):
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, cwd=REPO, env=env)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.proc.stdout, selectors.EVENT_READ)

    def _ask(self, req: dict, timeout: float = 60) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        if not self.sel.select(timeout):
            raise TimeoutError(f"no answer to {req['op']} within {timeout} s")
        return json.loads(self.proc.stdout.readline())

    def start(self, argv: list[str], stderr: Path, slow: float = 0.0) -> int:
        return self._ask({"op": "start", "argv": argv, "stderr": str(stderr), "slow": slow})["pid"]

    def wait(self, pid: int, timeout: float = 60) -> int:
        try:
            return self._ask({"op": "wait", "pid": pid}, timeout)["code"]
        except TimeoutError:
            os.kill(pid, signal.SIGKILL)
            raise

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def forker():
    f = Forker()
    yield f
    f.close()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("interrupt")
    trio = make_trio(root / "in", shape=Shape(layers=4, hidden=64, intermediate=96, vocab=128), shard_bytes=90_000)
    ref = root / "reference"
    shadowgraft.apply(instruct=trio["instruct"], base=trio["base"], tuned=trio["tuned"], output=ref)
    return trio, ref


def apply_argv(trio, out: Path, *extra: str) -> list[str]:
    return ["apply", "--instruct", str(trio["instruct"]), "--base", str(trio["base"]), "--tuned", str(trio["tuned"]),
            "--output", str(out), "--quiet", *extra]


def weights(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name.startswith("model")}


def assert_complete(out: Path, ref: Path) -> None:
    assert weights(out) == weights(ref)
    assert verify(out).ok


def debris(parent: Path, name: str = "out") -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


@pytest.fixture(scope="module")
def run_seconds(forker, inputs, tmp_path_factory) -> float:
    """How long a slowed-down child runs after its temporary folder appears: measured here, not assumed."""
    trio, _ = inputs
    parent = tmp_path_factory.mktemp("timing")
    pid = forker.start(apply_argv(trio, parent / "out"), parent / "stderr", slow=SLOW)
    wait_for_temp(parent, pid)
    t0 = time.monotonic()
    assert forker.wait(pid) == 0
    return time.monotonic() - t0


def moments(rng: random.Random, n: int, run_seconds: float) -> list[float]:
    """``n`` random signal delays, the k-th drawn in the k-th n-th of WINDOW x the run.

    Stratified so the first always lands mid-run (whatever the machine's
    speed) while later ones may land after the end.
    """
    span = WINDOW * run_seconds / n
    return [rng.uniform(k * span, (k + 1) * span) for k in range(n)]


def wait_for_temp(parent: Path, pid: int, timeout: float = 60) -> None:
    """Block until the child has created its temporary folder (it holds the lock from then on)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if any(".shadowgraft-tmp-" in p.name for p in parent.iterdir()):
            return
        time.sleep(0.002)
    os.kill(pid, signal.SIGKILL)
    raise TimeoutError("the child never created its temporary folder")


def signal_midway(forker, argv: list[str], parent: Path, sig: int, delay: float) -> int:
    """Start a slowed ``main(argv)`` child, send ``sig`` ``delay`` s after its temp folder appears; its exit code."""
    pid = forker.start(argv, parent / "stderr", slow=SLOW)
    wait_for_temp(parent, pid)
    time.sleep(delay)
    os.kill(pid, sig)
    return forker.wait(pid)


def lines(path: Path) -> list[str]:
    return [ln for ln in path.read_text().splitlines() if ln.strip()]


def test_sigint_sigterm_sighup_at_random_moments_remove_everything(forker, inputs, tmp_path, run_seconds):
    trio, ref = inputs
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    cut_short = 0
    trials = [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)] * 2
    delays = moments(rng, len(trials), run_seconds)
    for k, (sig, code) in enumerate(trials):
        parent = tmp_path / f"t{k}"
        parent.mkdir()
        out = parent / "out"
        got = signal_midway(forker, apply_argv(trio, out), parent, sig, delays[k])
        where = f"seed {seed}, trial {k}, {sig.name}"
        assert got in (0, code), where
        if got == code:
            assert lines(parent / "stderr") == ["interrupted; unfinished output was removed"], where
        # A signal after the rename (or held during it) leaves the finished model.
        if out.exists():
            assert_complete(out, ref)
        else:
            cut_short += 1
        assert debris(parent) == [], where
    assert cut_short, f"every run finished before its signal (seed {seed}); slow the children down"


def test_sigkill_at_random_moments_leaves_no_partial_model(forker, inputs, tmp_path, run_seconds):
    trio, ref = inputs
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    killed = 0
    delays = moments(rng, 3, run_seconds)
    for k in range(3):
        parent = tmp_path / f"t{k}"
        parent.mkdir()
        out = parent / "out"
        got = signal_midway(forker, apply_argv(trio, out), parent, signal.SIGKILL, delays[k])
        where = f"seed {seed}, trial {k}"
        assert got in (0, -signal.SIGKILL), where
        killed += got != 0
        # The rename is the commit point: the final name is absent or complete.
        if out.exists():
            assert_complete(out, ref)
        else:
            # Debris may remain, but it does not block the next run, which cleans it up.
            shadowgraft.apply(instruct=trio["instruct"], base=trio["base"], tuned=trio["tuned"], output=out)
            assert_complete(out, ref)
            assert debris(parent) == [], where
    assert killed, f"every run finished before SIGKILL (seed {seed}); slow the children down"


def test_overwrite_killed_midway_keeps_a_complete_model(forker, inputs, tmp_path, run_seconds):
    trio, ref = inputs
    old = tmp_path / "old-version"
    shadowgraft.apply(instruct=trio["instruct"], base=trio["base"], tuned=trio["tuned"], output=old, alpha=0.5)
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    delays = moments(rng, 2, run_seconds)
    for k in range(2):
        parent = tmp_path / f"t{k}"
        parent.mkdir()
        out = parent / "out"
        subprocess.run(["cp", "-r", str(old), str(out)], check=True)
        signal_midway(forker, apply_argv(trio, out, "--overwrite"), parent, signal.SIGKILL, delays[k])
        assert weights(out) in (weights(old), weights(ref)), f"seed {seed}, trial {k}"


def test_killed_between_the_two_renames_is_repaired(inputs, tmp_path):
    # The window between moving the old output aside and renaming the new one
    # in is too short to hit by chance, so build what a kill there leaves.
    trio, ref = inputs
    out = tmp_path / "out"
    os.rename(_copy(ref, tmp_path / "x"), tmp_path / ".out.shadowgraft-old-4242")
    _copy(ref, tmp_path / ".out.shadowgraft-tmp-4242")
    (tmp_path / ".out.shadowgraft-lock").touch()
    with pytest.raises(ShadowgraftError, match="already exists; pass --overwrite"):
        shadowgraft.apply(instruct=trio["instruct"], base=trio["base"], tuned=trio["tuned"], output=out)
    assert_complete(out, ref)  # the old output is back under its name
    assert debris(tmp_path) == []


def _copy(src: Path, dst: Path) -> Path:
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    return dst


def test_stale_temp_and_lock_from_a_killed_run_do_not_block(inputs, tmp_path):
    trio, ref = inputs
    stale = tmp_path / ".out.shadowgraft-tmp-999999"
    stale.mkdir()
    (stale / "model-00001-of-00002.safetensors").write_bytes(b"half")
    (tmp_path / ".out.shadowgraft-lock").touch()
    shadowgraft.apply(instruct=trio["instruct"], base=trio["base"], tuned=trio["tuned"], output=tmp_path / "out")
    assert_complete(tmp_path / "out", ref)
    assert debris(tmp_path) == []


def test_disk_full_is_reported_and_leaves_nothing(inputs, tmp_path):
    """The real console script under ``ulimit -f`` (files may not exceed 60 kB): a write fails mid-shard.

    The CLI itself ignores SIGXFSZ, so the failing write raises EFBIG instead
    of the kernel killing the process; that is what this run relies on.
    """
    trio, ref = inputs
    shard = max(p.stat().st_size for p in ref.glob("*.safetensors"))
    limit = 60_000
    assert shard > limit

    def starve():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    exe = Path(sys.executable).with_name("shadowgraft")
    # No .pyc writing: a large one could hit the limit before the CLI ignores SIGXFSZ.
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")
    res = subprocess.run([str(exe), *apply_argv(trio, tmp_path / "out")], capture_output=True, text=True,
                         preexec_fn=starve, env=env, timeout=120)
    out = tmp_path / "out"
    assert res.returncode == 1, res.stderr
    assert [ln for ln in res.stderr.splitlines() if ln.strip()] == [
        f"error: {out}: disk full while writing (File too large); nothing was left behind, free space and retry"]
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_not_enough_free_space_fails_before_writing(inputs, tmp_path, monkeypatch):
    trio, _ = inputs
    import shutil as sh

    from shadowgraft import writer

    usage = sh.disk_usage(tmp_path)
    monkeypatch.setattr(writer.shutil, "disk_usage", lambda p: usage._replace(free=999))
    need = shadowgraft.apply(instruct=trio["instruct"], base=trio["base"], tuned=trio["tuned"], output=tmp_path / "out",
                             dry_run=True).plan.nbytes
    assert 1e3 <= need < 1e6  # real numbers in human units, never "needs 0.00 GB but only 0.00 GB"
    with pytest.raises(ShadowgraftError) as e:
        shadowgraft.apply(instruct=trio["instruct"], base=trio["base"], tuned=trio["tuned"], output=tmp_path / "out")
    assert str(e.value) == (f"{tmp_path}: the output needs {need / 1e3:.2f} KB but only 999 B is free there; "
                            "free some space or choose another --output")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("overwrite", [False, True], ids=["new", "overwrite"])
def test_two_concurrent_applies_to_one_output(overwrite, forker, inputs, tmp_path):
    trio, ref = inputs
    out = tmp_path / "out"
    extra = ("--overwrite",) if overwrite else ()
    if overwrite:
        _copy(ref, out)
    first = forker.start(apply_argv(trio, out, *extra), tmp_path / "first.err", slow=SLOW)
    wait_for_temp(tmp_path, first)
    second = forker.start(apply_argv(trio, out, *extra), tmp_path / "second.err", slow=SLOW)
    assert forker.wait(second) == 1
    assert lines(tmp_path / "second.err") == [
        f"error: {out}: another shadowgraft run is writing it; wait for it or choose another --output"]
    assert forker.wait(first) == 0, (tmp_path / "first.err").read_text()
    assert_complete(out, ref)
    assert debris(tmp_path) == []


def test_lock_survives_the_unlink_race(tmp_path, monkeypatch):
    """The previous holder unlinks the lock file between our open and our flock: we must retry on a fresh file."""
    from shadowgraft import writer

    real = writer.fcntl.flock
    calls = []

    def flock(fd, op):
        real(fd, op)
        if not calls:
            (tmp_path / ".out.shadowgraft-lock").unlink()  # what the finishing holder does
        calls.append(op)

    monkeypatch.setattr(writer.fcntl, "flock", flock)
    with OutputDir(tmp_path / "out") as tmp:
        assert len(calls) == 2 and (tmp_path / ".out.shadowgraft-lock").exists()
        (tmp / "f").write_text("x")
    assert (tmp_path / "out" / "f").read_text() == "x" and debris(tmp_path) == []


def test_lock_refuses_a_second_writer_in_process(tmp_path):
    with OutputDir(tmp_path / "out"):
        with pytest.raises(ShadowgraftError, match="another shadowgraft run is writing it"):
            OutputDir(tmp_path / "out").__enter__()
    assert (tmp_path / "out").is_dir() and debris(tmp_path) == []


def test_sighup_is_left_ignored_under_nohup(inputs, tmp_path):
    """``nohup shadowgraft apply ...`` must survive the terminal closing: SIGHUP stays ignored."""
    trio, ref = inputs
    out = tmp_path / "out"
    code = (
        "import os, signal, sys\n"
        "signal.signal(signal.SIGHUP, signal.SIG_IGN)\n"
        "from shadowgraft import writer\n"
        "real = writer.OutputDir.__exit__\n"
        "def hup_then_exit(self, *exc):\n"
        "    os.kill(os.getpid(), signal.SIGHUP)\n"
        "    return real(self, *exc)\n"
        "writer.OutputDir.__exit__ = hup_then_exit\n"
        "from shadowgraft.cli import main\n"
        "main(sys.argv[1:])\n"
    )
    p = subprocess.run([sys.executable, "-c", code, *apply_argv(trio, out)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert_complete(out, ref)


HUNG_UP_CHILD = r"""
import os, sys, time
real_write = os.write
def slow_write(fd, data):
    if fd > 2:  # the output files, not the terminal
        if not getattr(slow_write, "said", False):
            slow_write.said = True
            real_write(1, b"writing\n")
        time.sleep(0.2)
    return real_write(fd, data)
os.write = slow_write
from shadowgraft.cli import main
main(sys.argv[1:])
"""


def test_sighup_after_the_terminal_closed_cleans_up_and_exits_129(inputs, tmp_path):
    """A closed ssh session: the terminal is gone (writes to it fail with EIO) when SIGHUP arrives."""
    import pty

    trio, _ = inputs
    out = tmp_path / "out"
    master, slave = pty.openpty()
    p = subprocess.Popen([sys.executable, "-c", HUNG_UP_CHILD, *apply_argv(trio, out)[:-1]],  # no --quiet: a live progress bar
                         stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    seen = b""
    try:
        while b"writing" not in seen:
            seen += os.read(master, 4096)
    finally:
        os.close(master)  # the terminal goes away
    time.sleep(0.1)
    p.send_signal(signal.SIGHUP)
    assert p.wait(timeout=60) == 129
    assert debris(tmp_path) == [] and not out.exists()


def test_signals_are_held_during_commit_and_delivered_after():
    # Python's own SIGINT handler, whatever the test runner inherited (a
    # background job of a non-interactive shell starts with SIGINT ignored).
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    order = []
    try:
        with pytest.raises(KeyboardInterrupt):
            with signals_deferred():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.01)  # a handler would run here if the signal were not held
                order.append("block finished")
        assert order == ["block finished"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, inherited)
