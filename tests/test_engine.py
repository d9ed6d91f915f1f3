"""The streaming engine: chunk boundaries, several outputs, failures inside the pipeline."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

from shadowgraft import Checkpoint, ShadowgraftError
from shadowgraft.engine import Engine
from shadowgraft.plan import plan_graft

from .conftest import assert_exact, load


def _trio(tmp_path, n=10_007, dtype=torch.bfloat16, nan=False):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(n, 3, generator=g, dtype=torch.float64)
    vals = {"base": base, "instruct": base + 0.01 * torch.randn(n, 3, generator=g, dtype=torch.float64),
            "tuned": base + 0.01 * torch.randn(n, 3, generator=g, dtype=torch.float64)}
    if nan:
        vals["tuned"][5, 1] = float("nan")
        vals["tuned"][7, 2] = float("inf")
    paths = {}
    for k, v in vals.items():
        paths[k] = tmp_path / f"{k}.safetensors"
        save_file({"model.layers.0.mlp.up_proj.weight": v.to(dtype), "model.norm.weight": torch.ones(3, dtype=dtype)}, str(paths[k]))
    return {k: Checkpoint.open(p) for k, p in paths.items()}


def _run(cks, out, chunk, alpha=1.0):
    plan = plan_graft(cks["instruct"], base=cks["base"], tuned=cks["tuned"], alpha=alpha)
    eng = Engine(list(cks.values()), chunk=chunk)
    eng.write_shard(plan.shards[0], out)
    return eng


@pytest.mark.parametrize("chunk", [1, 97, 4096, 1 << 20])
def test_chunk_size_does_not_change_a_byte(tmp_path, chunk):
    cks = _trio(tmp_path)
    _run(cks, tmp_path / "ref.safetensors", 1 << 22)
    _run(cks, tmp_path / "c.safetensors", chunk)
    assert (tmp_path / "ref.safetensors").read_bytes() == (tmp_path / "c.safetensors").read_bytes()
    ref = {k: load(c.files[0])["model.layers.0.mlp.up_proj.weight"].double() for k, c in cks.items()}
    got = load(tmp_path / "c.safetensors")["model.layers.0.mlp.up_proj.weight"]
    assert_exact(got, ref["instruct"] + (ref["tuned"] - ref["base"]))


def test_nonfinite_values_are_counted(tmp_path):
    eng = _run(_trio(tmp_path, nan=True), tmp_path / "o.safetensors", 1000)
    assert eng.stats.nonfinite == {"model.layers.0.mlp.up_proj.weight": 2}


def test_file_truncated_during_the_run_fails_cleanly(tmp_path):
    cks = _trio(tmp_path, n=50_000)
    # Headers were validated at open; now the file shrinks under us.
    os.truncate(cks["tuned"].files[0], 1000)
    with pytest.raises(ShadowgraftError, match=r"tuned\.safetensors: file ended inside tensor 'model\.layers\.0\.mlp\.up_proj\.weight'"):
        _run(cks, tmp_path / "o.safetensors", 4096)


def test_many_outputs_share_reads(tmp_path):
    cks = _trio(tmp_path)
    plan = plan_graft(cks["instruct"], base=cks["base"], tuned=cks["tuned"])
    eng = Engine(list(cks.values()), chunk=4096)
    eng.write_shards([plan.shards[0], plan.shards[0]], [tmp_path / "a.safetensors", tmp_path / "b.safetensors"])
    one = _run(cks, tmp_path / "c.safetensors", 4096)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes() == (tmp_path / "c.safetensors").read_bytes()
    # Two outputs from the same inputs (an alpha grid): every tensor is read once.
    per_model = one.stats.bytes_read / 3
    assert eng.stats.bytes_read == pytest.approx(3 * per_model, rel=0.01)
    # A second tuned checkpoint: instruct and base are still read once, each tuned once.
    other = tmp_path / "tuned2.safetensors"
    other.write_bytes(cks["tuned"].files[0].read_bytes())
    t2 = Checkpoint.open(other)
    plan2 = plan_graft(cks["instruct"], base=cks["base"], tuned=t2)
    eng = Engine([*cks.values(), t2], chunk=4096)
    eng.write_shards([plan.shards[0], plan2.shards[0]], [tmp_path / "d.safetensors", tmp_path / "e.safetensors"])
    assert eng.stats.bytes_read == pytest.approx(4 * per_model, rel=0.01)


def _shuffled(monkeypatch, seed=0) -> set:
    """Make compute workers finish chunks out of order (a random short sleep before each); returns who computed.

    Helpers join in whenever chunks queue up (HELP = 0): a sleep costs no CPU
    time, so the engine would not count compute as the stage that binds.
    """
    import random
    import threading
    import time

    from shadowgraft import stages

    monkeypatch.setattr(stages, "HELP", 0.0)
    rng = random.Random(seed)
    real = Engine._compute
    who = set()

    def slow(self, op):
        who.add(threading.get_ident())
        time.sleep(rng.random() * 0.002)
        return real(self, op)

    monkeypatch.setattr(Engine, "_compute", slow)
    return who


@pytest.mark.parametrize("workers", [2, 3, 5])
def test_compute_workers_write_the_bytes_and_counts_of_one(tmp_path, monkeypatch, workers):
    cks = _trio(tmp_path, nan=True)
    one = _run(cks, tmp_path / "one.safetensors", 97)
    assert one.workers is None
    who = _shuffled(monkeypatch)
    plan = plan_graft(cks["instruct"], base=cks["base"], tuned=cks["tuned"])
    many = Engine(list(cks.values()), chunk=97, workers=workers)
    assert many._workers(plan.shards) == workers
    many.write_shard(plan.shards[0], tmp_path / "many.safetensors")
    assert len(who) > 1  # slowed down, the first worker fell behind the reader, and helpers took chunks
    assert (tmp_path / "one.safetensors").read_bytes() == (tmp_path / "many.safetensors").read_bytes()
    assert many.stats == one.stats  # bytes read and written, tensors grafted and copied, NaN/Inf per tensor
    assert many.stats.nonfinite == {"model.layers.0.mlp.up_proj.weight": 2}


def test_one_worker_is_the_single_threaded_path(tmp_path):
    cks = _trio(tmp_path)
    _run(cks, tmp_path / "ref.safetensors", 1 << 22)
    plan = plan_graft(cks["instruct"], base=cks["base"], tuned=cks["tuned"])
    Engine(list(cks.values()), chunk=97, workers=1).write_shard(plan.shards[0], tmp_path / "w1.safetensors")
    assert (tmp_path / "ref.safetensors").read_bytes() == (tmp_path / "w1.safetensors").read_bytes()


def test_ties_computes_on_one_worker(tmp_path):
    from shadowgraft.mix import Mix

    cks = _trio(tmp_path)
    ties = plan_graft(cks["instruct"], base=cks["base"], tuned=[cks["tuned"], cks["tuned"]],
                      mix=Mix("ties", weights=(0.5, 0.5), density=0.5))
    plain = plan_graft(cks["instruct"], base=cks["base"], tuned=cks["tuned"])
    eng = Engine(list(cks.values()), workers=4)
    assert eng._workers(ties.shards) == 1
    assert eng._workers(plain.shards) == 4


def test_a_failure_in_any_stage_stops_every_worker(tmp_path):
    cks = _trio(tmp_path, n=50_000)
    os.truncate(cks["tuned"].files[0], 1000)
    plan = plan_graft(cks["instruct"], base=cks["base"], tuned=cks["tuned"])
    with pytest.raises(ShadowgraftError, match="file ended inside tensor"):
        Engine(list(cks.values()), chunk=4096, workers=3).write_shard(plan.shards[0], tmp_path / "o.safetensors")


def test_a_compute_error_on_a_worker_thread_reaches_the_caller(tmp_path, monkeypatch):
    import threading
    import time

    cks = _trio(tmp_path, n=50_000)
    real = Engine._compute

    def boom(self, op):
        if threading.current_thread() is threading.main_thread():
            time.sleep(0.005)  # so the other workers surely take chunks
        elif op.start >= 100_000:
            raise RuntimeError("worker failed")
        return real(self, op)

    monkeypatch.setattr(Engine, "_compute", boom)
    plan = plan_graft(cks["instruct"], base=cks["base"], tuned=cks["tuned"])
    with pytest.raises(RuntimeError, match="worker failed"):
        Engine(list(cks.values()), chunk=1000, workers=3).write_shard(plan.shards[0], tmp_path / "o.safetensors")


def test_reader_buffers_belong_to_their_thread():
    import threading

    from shadowgraft.stream import Reader

    r = Reader([])
    mine = r.work("acc", 16, torch.float32)
    theirs = []
    t = threading.Thread(target=lambda: theirs.append(r.work("acc", 16, torch.float32)))
    t.start()
    t.join()
    assert r.work("acc", 16, torch.float32).data_ptr() == mine.data_ptr()  # reused by its own thread
    assert theirs[0].data_ptr() != mine.data_ptr()  # never handed to another


def _fake_fallocate(monkeypatch, err, calls):
    import ctypes

    from shadowgraft import fileio

    def fake(fd, mode, offset, length):
        calls.append((mode, offset, length))
        ctypes.set_errno(err)
        return -1 if err else 0

    monkeypatch.setattr(fileio, "_fallocate", fake)


def test_outputs_are_preallocated_to_their_final_size(tmp_path, monkeypatch):
    cks = _trio(tmp_path)
    _run(cks, tmp_path / "ref.safetensors", 4096)
    calls = []
    _fake_fallocate(monkeypatch, 0, calls)
    _run(cks, tmp_path / "o.safetensors", 4096)
    assert calls == [(0, 0, (tmp_path / "ref.safetensors").stat().st_size)]


def test_a_file_system_without_fallocate_is_written_as_before(tmp_path, monkeypatch):
    import errno

    cks = _trio(tmp_path)
    _run(cks, tmp_path / "ref.safetensors", 4096)
    calls = []
    _fake_fallocate(monkeypatch, errno.EOPNOTSUPP, calls)
    _run(cks, tmp_path / "o.safetensors", 4096)
    assert calls and (tmp_path / "ref.safetensors").read_bytes() == (tmp_path / "o.safetensors").read_bytes()


def test_no_space_for_the_output_fails_before_writing_it(tmp_path, monkeypatch):
    import errno

    cks = _trio(tmp_path)
    _fake_fallocate(monkeypatch, errno.ENOSPC, [])
    with pytest.raises(OSError) as e:
        _run(cks, tmp_path / "o.safetensors", 4096)
    assert e.value.errno == errno.ENOSPC
    assert (tmp_path / "o.safetensors").stat().st_size == 0


def test_bound_buffers_outlive_their_thread():
    import threading

    from shadowgraft.stream import Reader

    r = Reader([])
    got = []

    def stage(owner):
        r.bind(owner)
        got.append(r.raw("in0@0", 64).data_ptr())

    for owner in ("reader", "reader", "compute1"):
        t = threading.Thread(target=stage, args=(owner,))
        t.start()
        t.join()
    assert got[0] == got[1]  # the next pipeline's reader thread reuses the last one's buffer
    assert got[2] != got[0]  # another stage never gets it


def test_fp8_requantized_grafts_are_the_same_on_many_workers(tmp_path, monkeypatch):
    """Bands of one FP8 weight computed by different workers fill one scale table, written once complete."""
    import shadowgraft
    from shadowgraft import engine

    from .test_fp8 import FP8_SHAPES, PLAIN_SHAPES, _weights, fp8_model, write

    shapes = {**FP8_SHAPES, **PLAIN_SHAPES}
    w, noise, tn = _weights(0, shapes), _weights(1, shapes), _weights(2, shapes)
    trio = {"base": write(tmp_path / "b", fp8_model(w), quantized=True),
            "instruct": write(tmp_path / "i", fp8_model({n: w[n] + 0.1 * noise[n] for n in w}), quantized=True),
            "tuned": write(tmp_path / "t", fp8_model({n: w[n] + 0.05 * tn[n] for n in w}), quantized=True)}
    outs = {}
    for workers in (1, 4):
        monkeypatch.setattr(engine, "default_workers", lambda workers=workers: workers)
        who = _shuffled(monkeypatch, seed=workers)
        outs[workers] = tmp_path / f"o{workers}"
        shadowgraft.apply(instruct=trio["instruct"], base=trio["base"], tuned=trio["tuned"], output=outs[workers])
        assert (len(who) > 1) == (workers > 1)
        monkeypatch.undo()
    files = sorted(p.name for p in outs[1].glob("*.safetensors"))
    assert files and files == sorted(p.name for p in outs[4].glob("*.safetensors"))
    for f in files:
        assert (outs[1] / f).read_bytes() == (outs[4] / f).read_bytes()


def _burn(seconds: float) -> None:
    import time

    t0 = time.thread_time()
    while time.thread_time() - t0 < seconds:
        pass


@pytest.mark.parametrize("slow", ["_compute", "_read"])
def test_helpers_join_in_only_where_compute_is_the_stage_that_binds(tmp_path, monkeypatch, slow):
    import threading

    cks = _trio(tmp_path, n=30_000)
    who = set()
    real = {name: getattr(Engine, name) for name in ("_compute", "_read")}

    def compute(self, op):
        who.add(threading.get_ident())
        if slow == "_compute":
            _burn(0.001)
        return real["_compute"](self, op)

    def read(self, op):
        if slow == "_read":
            _burn(0.001)
        return real["_read"](self, op)

    monkeypatch.setattr(Engine, "_compute", compute)
    monkeypatch.setattr(Engine, "_read", read)
    plan = plan_graft(cks["instruct"], base=cks["base"], tuned=cks["tuned"])
    eng = Engine(list(cks.values()), chunk=1000, workers=2)
    eng.write_shard(plan.shards[0], tmp_path / "o.safetensors")
    read_cpu, compute_cpu, _ = eng._cost
    if slow == "_compute":
        assert compute_cpu > read_cpu and len(who) == 2
    else:
        # Reading binds: the second worker would only take CPU time from the reader.
        assert read_cpu > compute_cpu and who == {threading.get_ident()}
