"""Shared pieces of the benchmarks: cached synthetic trios, measured subprocesses, tables.

Every tool is timed as a separate process, so each pays its own interpreter
start-up and imports exactly as a user would. Memory is reported two ways:
peak total RSS (``ru_maxrss`` from ``wait4``, what ``time -v`` shows) and
peak *anonymous* RSS (``RssAnon`` sampled from /proc), because file pages a
tool maps or reads belong to the page cache and are freed by the kernel on
demand, while anonymous pages are memory the tool really holds.
"""

from __future__ import annotations

import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VENV_BIN = ROOT / ".venv" / "bin"
MB = 1_000_000
# Bump when the trio recipe changes, so stale cached trios are rebuilt.
TRIO_VERSION = 1


# -- sizes --------------------------------------------------------------------

def parse_size(text: str) -> int:
    """``"400MB"`` -> 400_000_000; decimal units like the Hub's shard sizes."""
    t = text.strip().upper().removesuffix("B")
    mult = {"K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}.get(t[-1:], 1)
    return int(float(t[:-1] if t[-1:] in "KMGT" else t) * mult)


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}" if abs(n) < 10 else f"{n:.0f} {unit}"
        n /= 1000
    return str(n)


@dataclass(frozen=True)
class TrioShape:
    """A Llama-shaped decoder: GQA attention with 64-dim heads, SwiGLU MLP, untied head."""

    layers: int
    hidden: int = 2048
    intermediate: int = 5632  # 2.75 x hidden, as TinyLlama
    # Real vocabularies are larger, but then the embedding (copied, never
    # grafted) would be the largest tensor and loosen the memory target.
    vocab: int = 4096

    def synthetic(self):
        from shadowgraft.synthetic import Shape

        heads = max(1, self.hidden // 64)
        return Shape(layers=self.layers, hidden=self.hidden, intermediate=self.intermediate, vocab=self.vocab,
                     heads=heads, kv_heads=max(1, heads // 4))

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        from shadowgraft.synthetic import llama_tensors

        return list(llama_tensors(self.synthetic()))

    def nbytes(self) -> int:
        """Bytes of one model in bf16."""
        return 2 * sum(math.prod(s) for _, s in self.tensors())

    def largest_numel(self) -> int:
        return max(math.prod(s) for _, s in self.tensors())

    def scaled(self, factor: int) -> "TrioShape":
        return TrioShape(self.layers * factor, self.hidden, self.intermediate, self.vocab)

    def label(self) -> str:
        return f"L{self.layers}-h{self.hidden}-i{self.intermediate}-v{self.vocab}"


def shape_for_size(nbytes: int, *, min_layers: int = 4) -> TrioShape:
    """The widest Llama-like shape that reaches ``nbytes`` per model with at least ``min_layers`` layers.

    >>> shape_for_size(400 * MB)
    TrioShape(layers=4, hidden=2048, intermediate=5632, vocab=4096)
    """
    for hidden in (4096, 3072, 2048, 1536, 1024, 768, 512, 384, 256, 128):
        inter = -(-int(2.75 * hidden) // 256) * 256
        one = TrioShape(1, hidden, inter, 2 * hidden)
        zero_layer = 2 * 2 * one.vocab * hidden  # embeddings + lm_head, bf16
        per_layer = one.nbytes() - zero_layer
        layers = round((nbytes - zero_layer) / per_layer)
        if layers >= min_layers:
            return TrioShape(layers, hidden, inter, 2 * hidden)
    return TrioShape(min_layers, 128, 384, 256)


# -- trios --------------------------------------------------------------------

@dataclass(frozen=True)
class Trio:
    root: Path
    shape: TrioShape

    @property
    def base(self) -> Path:
        return self.root / "base"

    @property
    def instruct(self) -> Path:
        return self.root / "instruct"

    @property
    def tuned(self) -> Path:
        return self.root / "tuned"

    def files(self, which: str) -> list[Path]:
        return sorted(getattr(self, which).glob("*.safetensors"))

    def input_bytes(self) -> int:
        """Bytes of the three models' weight files: what every tool has to read."""
        return sum(f.stat().st_size for w in ("base", "instruct", "tuned") for f in self.files(w))


def build_trio(*, workdir: Path, shape: TrioShape, shard_bytes: int) -> Trio:
    """Write (or reuse) a bf16 base/instruct/tuned trio of ``shape`` under ``workdir/trios``.

    Built with ``shadowgraft.synthetic.make_trio``: deterministic values per
    tensor name, written one shard at a time, so building never holds a whole
    model in RAM and a rebuild gives the same bytes.

    >>> build_trio(workdir=Path("bench-out"), shape=TrioShape(4), shard_bytes=100 * MB)  # doctest: +SKIP
    """
    def make(tmp: Path) -> None:
        from shadowgraft.synthetic import make_trio

        make_trio(tmp, shape=shape.synthetic(), shard_bytes=shard_bytes)

    root = Path(workdir) / "trios" / f"{shape.label()}-s{shard_bytes}"
    return Trio(build_once(root, f"trio {shape.label()} ({human(shape.nbytes())}/model)", make), shape)


def build_once(root: Path, what: str, make) -> Path:
    """``root``, built by ``make(tmp)`` into a sibling and renamed into place, unless an earlier build completed it."""
    done = root / f".complete-v{TRIO_VERSION}"
    if not done.exists():
        shutil.rmtree(root, ignore_errors=True)
        tmp = root.with_name(root.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        t0 = time.perf_counter()
        print(f"building {what} in {root} ...", flush=True)
        make(tmp)
        os.rename(tmp, root)
        done.touch()
        print(f"  built in {time.perf_counter() - t0:.1f} s", flush=True)
    return root


def warm_cache(paths: list[Path]) -> None:
    """Read every file once so all tools start from the same warm page cache."""
    buf = bytearray(16 << 20)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


# -- measuring a subprocess ---------------------------------------------------

@dataclass(frozen=True)
class Measurement:
    seconds: float
    cpu_seconds: float  # user + system time of the process tree: less sensitive to other load than wall time
    peak_rss: int  # bytes: the process tree's peak resident size, file pages included
    peak_anon: int  # bytes, max sampled sum of RssAnon over the process tree
    returncode: int
    stderr: str

    def check(self, what: str) -> "Measurement":
        if self.returncode != 0:
            tail = "\n".join(self.stderr.strip().splitlines()[-15:])
            raise RuntimeError(f"{what} exited with {self.returncode}:\n{tail}")
        return self


def _status(pid: int) -> tuple[int, int]:
    """``(VmHWM, RssAnon)`` of ``pid`` in kB; zeros once it has exited."""
    hwm = anon = 0
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    hwm = int(line.split()[1])
                elif line.startswith(b"RssAnon:"):
                    anon = int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return hwm, anon


def _tree(pid: int) -> list[int]:
    """``pid`` and its live descendants (shell pipelines, worker processes)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            pass
    return out


def prime_pages(folder: Path, nbytes: int) -> None:
    """Write and delete ``nbytes`` under ``folder`` so the next writes find warm free pages.

    On a virtual machine, page-cache pages the guest has not touched for a
    few seconds may have been handed back to the host; the first write into
    them then costs up to 8x more system time (measured here: a 1 GB write
    took 0.2 s or 1.8 s depending on it). Priming before every timed run
    bills every tool the same, warm, cost for its writes.
    """
    folder.mkdir(parents=True, exist_ok=True)
    scratch = folder / ".prime"
    block = bytes(8 << 20)
    with open(scratch, "wb") as f:
        for _ in range(0, nbytes, len(block)):
            f.write(block)
    scratch.unlink()


def measure(cmd: list[str] | str, *, env: dict | None = None, poll_s: float = 0.005,
            timeout_s: float = 3600, prime: tuple[Path, int] | None = None) -> Measurement:
    """Run ``cmd`` once; wall time, peak RSS and peak anonymous RSS.

    A string runs through ``sh -c``. Dirty pages left by the previous run are
    flushed first (``sync``) so one tool's write-back is not billed to the next.
    ``prime=(folder, nbytes)`` warms that many bytes of free pages first
    (``prime_pages``).

    >>> measure([".venv/bin/python", "-c", "import torch"]).seconds  # doctest: +SKIP
    1.02
    """
    shell = isinstance(cmd, str)
    if prime is not None:
        prime_pages(*prime)
    os.sync()
    # exec() records the spawning process's high-water RSS in the child's
    # ru_maxrss, so wait4's figure is exact only when the child outgrew this
    # process; otherwise the sampled VmHWM (the child's own peak) is used.
    own_hwm = _status(os.getpid())[0]
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, shell=shell, stdout=subprocess.DEVNULL, stderr=err, env=env)
        hwm, anon = [0], [0]
        stop = threading.Event()

        def poll():
            # Sampling misses what happens in the last poll_s before exit and
            # allocations that live for less than poll_s.
            while not stop.is_set():
                st = [_status(q) for q in _tree(p.pid)]
                hwm[0] = max(hwm[0], sum(h for h, _ in st))
                anon[0] = max(anon[0], sum(a for _, a in st))
                stop.wait(poll_s)

        th = threading.Thread(target=poll, daemon=True)
        th.start()
        timer = threading.Timer(timeout_s, p.kill)
        timer.start()
        try:
            _, status, ru = os.wait4(p.pid, 0)
        finally:
            timer.cancel()
        seconds = time.perf_counter() - t0
        stop.set()
        th.join()
        p.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        text = err.read().decode(errors="replace")
    peak = ru.ru_maxrss if ru.ru_maxrss > own_hwm else hwm[0]
    return Measurement(seconds, ru.ru_utime + ru.ru_stime, peak * 1024, anon[0] * 1024, p.returncode, text)


def best_of(runs: list[Measurement]) -> Measurement:
    """Fastest time of the repeats; the largest memory seen in any of them (memory is not noise)."""
    fast = min(runs, key=lambda m: m.seconds)
    return Measurement(fast.seconds, min(m.cpu_seconds for m in runs), max(m.peak_rss for m in runs),
                       max(m.peak_anon for m in runs), fast.returncode, fast.stderr)


# -- reporting ----------------------------------------------------------------

def machine() -> str:
    """One line naming the machine, for table titles."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    # Free memory now: with the page cache full, every write first reclaims a page, which costs
    # the tools that write (measured here: apply's CPU per GB 0.12-0.14 with 21 GiB free, 0.19-0.25 with 5).
    free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    return (f"{os.cpu_count()} cores ({cpu}), {mem / 2**30:.0f} GiB RAM ({free / 2**30:.0f} GiB free), "
            f"Linux {platform.release()}")


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def print_table(title: str, columns: list[str], rows: list[list[str]], *, markdown: list[str] | None = None) -> None:
    """Print with rich when it is installed (plain text otherwise); append a markdown copy to ``markdown``."""
    try:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=title, title_justify="left")
        for i, c in enumerate(columns):
            t.add_column(c, justify="left" if i == 0 else "right")
        for r in rows:
            t.add_row(*r)
        Console(width=max(100, shutil.get_terminal_size().columns)).print(t)
    except ImportError:
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
        print(title)
        for r in [columns, *rows]:
            print("  ".join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(r, widths))))
    if markdown is not None:
        markdown.append(f"**{title}**\n")
        markdown.append("| " + " | ".join(columns) + " |")
        markdown.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|")
        markdown.extend("| " + " | ".join(r) + " |" for r in rows)
        markdown.append("")
