"""The reader's read-ahead advice: given for tensors not in the page cache, skipped for cached ones."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

from shadowgraft import Checkpoint, stream


@pytest.fixture
def reader(tmp_path):
    f = tmp_path / "model.safetensors"
    save_file({"w": torch.arange(300_000, dtype=torch.float32)}, str(f))
    f.read_bytes()  # now in the page cache
    with Checkpoint.open(f) as ck:
        yield stream.Reader([ck]), ck["w"]


@pytest.mark.skipif(not hasattr(os, "RWF_NOWAIT"), reason="no RWF_NOWAIT on this platform")
def test_cached_tensors_are_not_advised(reader, monkeypatch):
    r, info = reader
    calls = []
    monkeypatch.setattr(os, "posix_fadvise", lambda *a: calls.append(a))
    assert stream._cached(r.fd(info), info)
    r.advise(info)
    assert calls == []


def test_uncached_tensors_are_advised_whole(reader, monkeypatch):
    r, info = reader
    calls = []
    monkeypatch.setattr(os, "posix_fadvise", lambda *a: calls.append(a))

    def would_block(*a):
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(os, "preadv", would_block)
    r.advise(info)
    assert calls == [(r.fd(info), info.start, info.nbytes, os.POSIX_FADV_WILLNEED)]
