"""``header.parse_header`` against the safetensors library, exact refusals, and fuzzing.

The fuzz properties: whatever the bytes, parsing either returns a Header whose
every promise holds (offsets inside the data area, no overlaps, sizes equal
to numel x itemsize, string metadata) or raises ShadowgraftError, never any
other exception; and a file the safetensors library accepts, we accept too,
with the same tensors.
"""

from __future__ import annotations

import functools
import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import deserialize
from safetensors.torch import save

from shadowgraft import ShadowgraftError
from shadowgraft.header import DTYPE_BITS, MAX_HEADER_BYTES, Header, parse_header, read_header

P = Path("m.safetensors")
FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def pack(header, data: bytes = b"", *, length: int | None = None) -> bytes:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(body) if length is None else length) + body + data


def parse(raw: bytes, file_size: int | None = None) -> Header:
    return parse_header(raw, path=P, file_size=len(raw) if file_size is None else file_size)


@functools.lru_cache(maxsize=1)
def sample_file() -> bytes:
    torch.manual_seed(0)
    return save({
        "w": torch.randn(3, 4, dtype=torch.bfloat16),
        "b": torch.randn(4, dtype=torch.float32),
        "i": torch.arange(5, dtype=torch.int64),
        "empty": torch.empty(0, 2, dtype=torch.float16),
        "flag": torch.tensor([True, False]),
    }, metadata={"format": "pt"})


def test_valid_file_matches_the_safetensors_library():
    raw = sample_file()
    h = parse(raw)
    theirs = {name: spec for name, spec in deserialize(raw)}
    assert {t.name for t in h.tensors} == set(theirs)
    for t in h.tensors:
        assert t.dtype == theirs[t.name]["dtype"]
        assert list(t.shape) == theirs[t.name]["shape"]
        assert raw[t.start:t.end] == bytes(theirs[t.name]["data"])
    (n,) = struct.unpack("<Q", raw[:8])
    assert h.data_start == 8 + n
    assert h.sha256 == hashlib.sha256(raw[: 8 + n]).hexdigest()
    assert h.metadata == {"format": "pt"}
    assert [t.start for t in h.tensors] == sorted(t.start for t in h.tensors)


def test_read_header_reads_only_the_header(tmp_path):
    f = tmp_path / "m.safetensors"
    f.write_bytes(sample_file())
    h = read_header(f)
    assert h.file == f and len(h.tensors) == 5


def entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


BAD = {
    "empty file": (b"", "file is 0 bytes, too short for a safetensors header"),
    "length over cap": (struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}",
                        f"header length {MAX_HEADER_BYTES + 1} exceeds the {MAX_HEADER_BYTES}-byte cap"),
    "length past end": (pack(b"{}", length=50), "header length 50 runs past the end of the 10-byte file"),
    "not utf-8": (pack(b"\xff\xfe"), "header is not valid JSON (UnicodeDecodeError)"),
    "not json": (pack(b"{nope"), "header is not valid JSON (JSONDecodeError)"),
    "deep nesting": (pack(b"[" * 100_000), "header is not valid JSON (RecursionError)"),
    "not an object": (pack(b"[1, 2]"), "header is not a JSON object"),
    "metadata not strings": (pack({"__metadata__": {"format": 1}}), "__metadata__ must map strings to strings"),
    "metadata a list": (pack({"__metadata__": []}), "__metadata__ must map strings to strings"),
    "entry not object": (pack({"a": 3}), "tensor 'a' entry is not an object"),
    "unknown dtype": (pack({"a": entry(dtype="F33")}, bytes(8)), "tensor 'a' has unknown dtype 'F33'"),
    "unhashable dtype": (pack({"a": entry(dtype=["F32"])}, bytes(8)), "tensor 'a' has unknown dtype ['F32']"),
    "negative dim": (pack({"a": entry(shape=(-2,))}, bytes(8)), "tensor 'a' has an invalid shape [-2]"),
    "float dim": (pack({"a": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, bytes(8)),
                  "tensor 'a' has an invalid shape [2.0]"),
    "reversed offsets": (pack({"a": entry(offsets=(8, 0))}, bytes(8)), "tensor 'a' has invalid data_offsets [8, 0]"),
    "bool offsets": (pack({"a": {"dtype": "F32", "shape": [0], "data_offsets": [False, False]}}),
                     "tensor 'a' has invalid data_offsets [False, False]"),
    "offsets past end": (pack({"a": entry(offsets=(0, 8))}, bytes(4)),
                         "tensor 'a' data_offsets [0, 8] run past the end of the file (data area is 4 bytes)"),
    "size mismatch": (pack({"a": entry(shape=(3,))}, bytes(8)), "tensor 'a' is 8 bytes but F32[3] needs 12"),
    "sub-byte remainder": (pack({"a": entry(dtype="F4", shape=(3,), offsets=(0, 2))}, bytes(2)),
                           "tensor 'a' is 2 bytes but F4[3] needs 12 bits, not a whole number of bytes"),
    "overlap": (pack({"a": entry(offsets=(0, 8)), "b": entry(offsets=(4, 12))}, bytes(12)),
                "tensors 'a' and 'b' overlap in the data area"),
    "duplicate name": (pack(b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
                            b'"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b"\0"),
                       "header names 'a' twice"),
}


@pytest.mark.parametrize("raw, why", list(BAD.values()), ids=list(BAD))
def test_refusals_name_the_file_and_the_fix(raw, why):
    with pytest.raises(ShadowgraftError) as exc:
        parse(raw)
    assert str(exc.value) == f"{P}: {why}; the file is corrupt or not a safetensors file, re-download or re-save it"


def test_huge_shape_is_refused_without_overflow():
    # numel beyond what a float can hold used to crash the error message itself.
    raw = pack({"a": entry(shape=(10**200, 10**200))}, bytes(8))
    with pytest.raises(ShadowgraftError, match=r"tensor 'a' shape \[10+, 10+\] overflows 64 bits"):
        parse(raw)


def test_header_truncated_in_buffer():
    raw = pack({"a": entry()}, bytes(8))
    with pytest.raises(ShadowgraftError, match=r"header truncated \(3 of \d+ bytes\)"):
        parse(raw[:11], file_size=len(raw))


def test_null_metadata_and_gaps_are_accepted():
    # Both load in safetensors / are harmless to a reader; `verify` reports gaps.
    h = parse(pack({"__metadata__": None, "a": entry(offsets=(4, 12))}, bytes(16)))
    assert h.metadata == {} and h.tensors[0].start == h.data_start + 4


# -- fuzzing ------------------------------------------------------------------


def check_invariants(h: Header, raw: bytes, file_size: int) -> None:
    (n,) = struct.unpack("<Q", raw[:8])
    assert h.data_start == 8 + n <= file_size
    assert h.sha256 == hashlib.sha256(raw[: 8 + n]).hexdigest()
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in h.metadata.items())
    prev_end = h.data_start
    for t in h.tensors:
        assert t.dtype in DTYPE_BITS
        assert all(type(d) is int and d >= 0 for d in t.shape)
        assert h.data_start <= t.start <= t.end <= file_size
        assert (t.end - t.start) * 8 == t.numel * DTYPE_BITS[t.dtype]
        assert t.start >= prev_end
        prev_end = t.end


def outcome(raw: bytes, file_size: int | None = None) -> Header | None:
    size = len(raw) if file_size is None else file_size
    try:
        h = parse(raw, size)
    except ShadowgraftError:
        return None
    check_invariants(h, raw, size)
    return h


@FUZZ
@given(st.binary(max_size=200), st.integers(0, 1000))
def test_fuzz_random_bytes(raw, extra):
    outcome(raw, len(raw) + extra)


JSONISH = st.text(alphabet='{}[]":, 0123456789-.eE_aFIUBdtypshaofrmDLS\\', max_size=120)


@FUZZ
@given(JSONISH, st.binary(max_size=64))
def test_fuzz_random_json_text_with_correct_length(text, data):
    outcome(pack(text.encode(), data))


json_leaf = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=6)
             | st.sampled_from(sorted(DTYPE_BITS)))
json_any = st.recursive(json_leaf, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                        max_leaves=8)
small_int = st.integers(-3, 40) | st.integers(0, 2**64 + 5)
field_value = {
    "dtype": st.sampled_from(sorted(DTYPE_BITS)) | st.text(max_size=8) | json_any,
    "shape": st.lists(small_int, max_size=4) | json_any,
    "data_offsets": st.lists(small_int, min_size=2, max_size=2) | st.lists(small_int, max_size=3) | json_any,
}


def base_header() -> tuple[dict, bytes]:
    raw = sample_file()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


@FUZZ
@given(st.data())
def test_fuzz_mutated_valid_headers(data):
    head, payload = base_header()
    names = sorted(head)
    for _ in range(data.draw(st.integers(1, 3))):
        kind = data.draw(st.sampled_from(["field", "drop_field", "entry", "drop_entry", "new_tensor", "metadata"]))
        name = data.draw(st.sampled_from(names))
        if kind == "field" and isinstance(head.get(name), dict) and name != "__metadata__":
            key = data.draw(st.sampled_from(sorted(field_value)))
            head[name][key] = data.draw(field_value[key])
        elif kind == "drop_field" and isinstance(head.get(name), dict) and head[name]:
            head[name].pop(data.draw(st.sampled_from(sorted(head[name]))))
        elif kind == "entry":
            head[name] = data.draw(json_any)
        elif kind == "drop_entry":
            head.pop(name, None)
        elif kind == "new_tensor":
            head[data.draw(st.text(max_size=4))] = {k: data.draw(v) for k, v in field_value.items()}
        else:
            head["__metadata__"] = data.draw(st.dictionaries(st.text(max_size=3), json_leaf, max_size=2) | json_any)
    cut = data.draw(st.integers(-len(payload), 16))
    payload = payload[:cut] if cut < 0 else payload + bytes(cut)
    body = json.dumps(head).encode()
    length = data.draw(st.sampled_from([len(body)] * 6 + [len(body) - 1, len(body) + 1, 2**63]))
    raw = pack(body, payload, length=length)
    ours = outcome(raw)
    # Differential: what the safetensors library accepts, we must accept, with the same tensors.
    try:
        theirs = deserialize(raw)
    except Exception:
        return
    assert ours is not None, f"safetensors accepts a header we refuse: {body[:300]!r}"
    assert sorted((t.name, t.dtype, list(t.shape)) for t in ours.tensors) == sorted(
        (name, spec["dtype"], spec["shape"]) for name, spec in theirs)


@FUZZ
@given(st.data())
def test_fuzz_byte_flips_of_a_valid_file(data):
    raw = bytearray(sample_file())
    (n,) = struct.unpack("<Q", raw[:8])
    for _ in range(data.draw(st.integers(1, 4))):
        # Aim most flips at the header, where the parser's decisions are.
        pos = data.draw(st.integers(0, 8 + n - 1) | st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    raw = bytes(raw[: data.draw(st.integers(0, len(raw)))]) if data.draw(st.booleans()) else bytes(raw)
    ours = outcome(raw)
    try:
        theirs = deserialize(raw)
    except Exception:
        return
    if ours is None:
        # The one refusal of ours the library does not share: a name given twice.
        assert has_duplicate_keys(raw), f"safetensors accepts a file we refuse: {raw[: 8 + n + 8]!r}"
        return
    assert sorted(t.name for t in ours.tensors) == sorted(name for name, _ in theirs)


def has_duplicate_keys(raw: bytes) -> bool:
    (n,) = struct.unpack("<Q", raw[:8])
    dup = []

    def hook(pairs):
        if len({k for k, _ in pairs}) != len(pairs):
            dup.append(True)
        return dict(pairs)

    json.loads(raw[8 : 8 + n], object_pairs_hook=hook)
    return bool(dup)


def test_a_shape_whose_product_overflows_is_refused_as_the_library_refuses_it():
    raw = pack({"t": entry(shape=(2**62, 2**62, 0), offsets=(0, 0))})
    with pytest.raises(Exception):
        deserialize(raw)  # the reference: safetensors itself
    with pytest.raises(ShadowgraftError, match=r"tensor 't' shape \[4611686018427387904, 4611686018427387904, 0\] overflows 64 bits"):
        parse(raw)
    assert parse(pack({"t": entry(shape=(2**31, 2**31, 0), offsets=(0, 0))})).tensors[0].numel == 0
