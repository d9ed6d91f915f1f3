"""The three-stage runner on its own: file order kept whatever the compute order, errors raised, helpers, workers."""

from __future__ import annotations

import random
import threading
import time
from contextlib import nullcontext

import pytest

from shadowgraft import stages


class Op:
    def __init__(self, kind: str, value: int):
        self.kind, self.value = kind, value
        self.seq = self.slot = None


def _run(ops, *, compute=None, workers=1, cost=None):
    written, slots_in_use, lock = [], set(), threading.Lock()

    def read(op):
        if op.kind == "chunk":
            with lock:
                assert op.slot not in slots_in_use, "a slot handed out twice"
                slots_in_use.add(op.slot)

    def write(op):
        written.append((op.seq, op.kind, op.value))
        if op.kind == "chunk":
            with lock:
                slots_in_use.discard(op.slot)

    stages.run(iter(ops), read=read, compute=compute or (lambda op: None), write=write, bind=lambda owner: None,
               context=nullcontext, cost=cost if cost is not None else [0.0, 0.0, 0.0], workers=workers)
    return written


def test_ops_are_written_in_order_when_helpers_finish_out_of_order():
    rng = random.Random(3)
    ops = [Op("chunk" if k % 5 else "copy", k) for k in range(200)]
    threads = set()

    def slow(op):
        threads.add(threading.get_ident())
        time.sleep(rng.random() * 0.002)
        op.value *= 10

    # Compute "costs" everything: helpers start as soon as chunks queue up.
    written = _run(ops, compute=slow, workers=3, cost=[0.0, 1e9, 0.0])
    assert [w[0] for w in written] == list(range(200))
    assert [w[2] for w in written] == [k * 10 if k % 5 else k for k in range(200)]
    assert len(threads) > 1


def test_no_helper_where_compute_does_not_bind():
    threads = set()
    _run([Op("chunk", k) for k in range(100)], compute=lambda op: threads.add(threading.get_ident()), workers=4,
         cost=[1e9, 0.0, 1e9])
    assert threads == {threading.get_ident()}


def test_an_error_in_a_stage_is_raised_here_and_stops_the_rest():
    def boom(op):
        if op.value == 7:
            raise ValueError("chunk 7")

    with pytest.raises(ValueError, match="chunk 7"):
        _run([Op("chunk", k) for k in range(1000)], compute=boom)
    started = time.perf_counter()
    with pytest.raises(OSError, match="disk"):
        stages.run(iter([Op("chunk", k) for k in range(1000)]), read=lambda op: None, compute=lambda op: None,
                   write=lambda op: (_ for _ in ()).throw(OSError("disk")), bind=lambda o: None, context=nullcontext,
                   cost=[0.0, 0.0, 0.0])
    assert time.perf_counter() - started < 5


def test_default_workers_one_per_usable_cpu_capped(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(stages.os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert stages.default_workers() == 3
    monkeypatch.setattr(stages.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert stages.default_workers() == stages.MAX_WORKERS
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert stages.default_workers() == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "junk")
    assert stages.default_workers() == stages.MAX_WORKERS
