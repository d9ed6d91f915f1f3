"""Three stages on their own threads, joined by small bounded queues: read ahead, compute, write in order.

One thread reads chunks ahead into a few buffer slots, a compute worker
(the caller's thread) turns each into output, and one thread writes the
computed chunks in file order. Where computing is the stage that binds (it
costs more CPU than its share of the cores), helper workers, up to one per
core, take chunks too, and the writer puts their out-of-order results back
in order. The stages know nothing of tensors: the engine hands in what each
does to an op. An error in any stage stops all of them and is raised on the
caller's thread; so is an interrupt.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from contextlib import AbstractContextManager
from typing import Callable, Iterator

# Buffer sets in flight between stages: one being filled, one being
# computed, one being written. More does not help on a warm page cache
# (5 measured 5-10% slower than 3 on the 2-core development machine: the
# buffers a chunk touches fall out of the core's cache); each helper
# compute worker adds two.
DEPTH = 3
# A helper compute worker starts once BACKLOG chunks wait for compute (all
# the slots but the one being computed: the reader can get no further ahead)
# and computing costs more than HELP times the cores' fair share of all
# three stages (see help_wanted).
BACKLOG = DEPTH - 1
HELP = 1.2
# Compute workers at most: memory bandwidth, not cores, limits beyond this.
MAX_WORKERS = 8

_DONE = object()  # to the writer: every op has been computed
_END = object()  # to a compute worker: no more ops


def run(ops: Iterator, *, read: Callable[[object], None], compute: Callable[[object], None],
        write: Callable[[object], None], bind: Callable[[str], None],
        context: Callable[[], AbstractContextManager], cost: list[float], workers: int = 1) -> None:
    """Run every op through ``read``, ``compute`` and ``write``; returns when the last op is written.

    Ops have a ``kind``; only ``"chunk"`` ops hold a buffer slot (``op.slot``,
    released after ``write``) and are computed; every op gets ``op.seq``, its
    place in file order, and is read and written. ``bind(owner)`` is called
    first on each stage's thread (``"reader"``, ``"compute<i>"``, the writer
    none), ``context()`` wraps each compute worker's loop. ``cost`` holds
    the CPU seconds of reading, computing and writing so far (it may carry
    over from earlier runs); it decides whether helpers start.
    """
    free: queue.Queue[int] = queue.Queue()
    for s in range(DEPTH):
        free.put(s)
    slots = DEPTH
    to_compute: queue.Queue = queue.Queue(DEPTH + 2 * (workers - 1))
    # Unbounded, but every chunk in it holds one of the slots.
    to_write: queue.Queue = queue.Queue()
    stop = threading.Event()
    errors: list[BaseException] = []
    helpers: list[threading.Thread] = []  # started by the reader, joined here

    def put(q: queue.Queue, x) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def get(q: queue.Queue):
        while not stop.is_set():
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                continue
        return None

    def guarded(stage: Callable[[], None]) -> Callable[[], None]:
        def go() -> None:
            try:
                stage()
            except BaseException as e:  # handed to the caller's thread
                errors.append(e)
                stop.set()
        return go

    def help_wanted() -> bool:
        # Chunks queue up for compute, and compute is the stage that
        # binds: it costs more CPU than the cores' fair share of all
        # three stages. Otherwise a helper only takes CPU time from the
        # reader and writer: on the 2-core development machine, where
        # reading and writing cost as much as computing, a second worker
        # made grafts 10% slower, and even one merely waiting for work
        # cost 5-8%, so helpers start only once they are wanted.
        r, c, w = cost
        return to_compute.qsize() >= BACKLOG and c > HELP * (r + c + w) / workers

    def reader() -> None:
        nonlocal slots
        bind("reader")
        for seq, op in enumerate(ops):
            op.seq = seq
            if op.kind == "chunk":
                slot = get(free)
                if slot is None:
                    return
                op.slot = slot
            t0 = time.thread_time()
            read(op)
            cost[0] += time.thread_time() - t0
            if not put(to_compute, op):
                return
            if len(helpers) < workers - 1 and help_wanted():
                # Two more slots: the chunk the helper computes, and one
                # done early that waits for an earlier one to be written.
                for _ in range(2):
                    free.put(slots)
                    slots += 1
                helpers.append(threading.Thread(target=guarded(lambda w=len(helpers) + 1: worker(w)), daemon=True))
                helpers[-1].start()
        for _ in range(1 + len(helpers)):
            put(to_compute, _END)

    def worker(i: int) -> None:
        # Each run has new threads; buffers stay with the stage.
        bind(f"compute{i}")
        with context():
            while True:
                op = get(to_compute)
                if op is None or op is _END:
                    return
                if op.kind == "chunk":
                    t0 = time.thread_time()
                    compute(op)
                    # Not atomic across workers: a rare lost update only blurs the estimate.
                    cost[1] += time.thread_time() - t0
                if not put(to_write, op):
                    return

    def writer() -> None:
        # Workers finish chunks out of order; they are written in file order.
        done: dict[int, object] = {}
        nxt = 0
        while True:
            op = get(to_write)
            if op is None or op is _DONE:
                return
            done[op.seq] = op
            while nxt in done:
                op = done.pop(nxt)
                nxt += 1
                t0 = time.thread_time()
                write(op)
                cost[2] += time.thread_time() - t0
                if op.kind == "chunk":
                    free.put(op.slot)

    threads = [threading.Thread(target=guarded(f), daemon=True) for f in (reader, writer)]
    for t in threads:
        t.start()
    try:
        worker(0)
        # Every helper was started before the reader queued the first _END.
        for t in helpers:
            t.join()
        put(to_write, _DONE)
    except BaseException:
        stop.set()
        raise
    finally:
        for t in threads + helpers:
            t.join() if not stop.is_set() else t.join(timeout=5)
        stop.set()
    if errors:
        raise errors[0]


def default_workers() -> int:
    """Compute workers on the CPU: one per CPU this process may run on, at most ``MAX_WORKERS``.

    Logical CPUs, not torch's count of physical cores: on a 2-vCPU machine
    whose vCPUs are one core's two hyperthreads, torch counts one, and the
    second worker still fills the time the first spends waiting.
    ``OMP_NUM_THREADS``, when set, caps it, as it caps torch.
    """
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    cap = os.environ.get("OMP_NUM_THREADS", "").strip()
    if cap.isdigit() and int(cap) > 0:
        n = min(n, int(cap))
    return max(1, min(MAX_WORKERS, n))
