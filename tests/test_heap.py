"""heap: the collector paused for the imports, and what they made frozen, tracked without asking gc (whose count walks every frozen object)."""

from __future__ import annotations

import gc

import pytest

from shadowgraft import heap


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(heap, "_state", {"for_good": False, "held": 0, "paused": False})
    assert gc.get_freeze_count() == 0
    yield
    gc.unfreeze()


def test_held_freezes_for_the_block_and_nests(fresh):
    with heap.held():
        inside = gc.get_freeze_count()
        assert inside > 0
        with heap.held():  # an inner block neither freezes again nor thaws the outer one
            pass
        assert gc.get_freeze_count() == inside
    assert gc.get_freeze_count() == 0


def test_held_thaws_after_an_error(fresh):
    with pytest.raises(RuntimeError):
        with heap.held():
            raise RuntimeError("x")
    assert gc.get_freeze_count() == 0


def test_frozen_for_good_stays_frozen(fresh):
    heap.freeze_for_good()
    count = gc.get_freeze_count()
    with heap.held():
        pass
    assert gc.get_freeze_count() == count > 0


def test_a_graft_never_asks_gc_for_the_freeze_count(fresh, tmp_path, trio, monkeypatch):
    # gc.get_freeze_count() walks every frozen object: asked once per output shard it cost a 3 GB graft 0.3 s.
    import shadowgraft

    def walk():
        raise AssertionError("gc.get_freeze_count called")

    monkeypatch.setattr(gc, "get_freeze_count", walk)
    shadowgraft.apply(instruct=trio["instruct"], base=trio["base"], tuned=trio["tuned"], output=tmp_path / "o")
    monkeypatch.undo()
    assert gc.get_freeze_count() == 0  # thawed after the graft
