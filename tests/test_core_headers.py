"""shardwise._core: header reading and validation, dtype sizes, shard-name sorting.

Every malformed header must raise ``shardwise.errors.HeaderError`` naming the file, never crash; every
file written by ``safetensors.torch.save_file`` must read back exactly as safetensors itself reads it.
"""

from __future__ import annotations

import collections
import json
import os
import re
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import _TYPES as ST_TYPES
from safetensors.torch import save_file

from shardwise import _core
from shardwise.errors import CheckpointIOError, HeaderError

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# ----------------------------------------------------------------------------------------------
# helpers


def file_bytes(header_json: str, data_len: int, pad: bool = True) -> bytes:
    """A safetensors file: length prefix, the JSON (padded with spaces like the writer), data."""
    h = header_json.encode()
    if pad:
        h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + bytes(range(256)) * (data_len // 256) + bytes(data_len % 256)


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def assert_header_error(path: Path, *fragments: str) -> str:
    with pytest.raises(HeaderError) as info:
        _core.read_header(str(path))
    msg = str(info.value)
    assert str(path) in msg
    for f in fragments:
        assert f in msg, msg
    assert isinstance(info.value, ValueError)
    return msg


def entry(dtype: str, shape: list[int], begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def tensor_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    size = torch.empty((), dtype=dtype).element_size()
    n = 1
    for d in shape:
        n *= d
    high = 2 if dtype == torch.bool else 256
    raw = torch.randint(0, high, (n * size,), dtype=torch.uint8, generator=g)
    return raw.view(dtype).reshape(shape)


DTYPE_NAMES = sorted(ST_TYPES)
names_st = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=0, max_size=12).filter(
    lambda s: s != "__metadata__"
)
shape_st = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)
metadata_st = st.one_of(
    st.none(),
    st.just({"format": "pt"}),
    st.dictionaries(st.text(max_size=8), st.text(max_size=16), max_size=5),
)


@st.composite
def tensor_dicts(draw) -> dict[str, torch.Tensor]:
    names = draw(st.lists(names_st, min_size=0, max_size=8, unique=True))
    out = {}
    for i, name in enumerate(names):
        dtype = ST_TYPES[draw(st.sampled_from(DTYPE_NAMES))]
        out[name] = random_tensor(dtype, draw(shape_st), seed=i)
    return out


def save_to(tmp: Path, tensors: dict, metadata: dict | None, name: str = "model.safetensors") -> Path:
    path = tmp / name
    save_file(tensors, str(path), metadata=metadata)
    return path


GOOD = {
    "__metadata__": {"format": "pt"},
    "w": entry("F32", [2, 3], 0, 24),
    "e": entry("BF16", [0, 4], 24, 24),
    "s": entry("I64", [], 24, 32),
}

# ----------------------------------------------------------------------------------------------
# valid files


def test_reads_a_hand_made_header(tmp_path):
    data = file_bytes(json.dumps(GOOD, separators=(",", ":")), 32)
    path = write(tmp_path / "m.safetensors", data)
    h = _core.read_header(str(path))
    n = struct.unpack("<Q", data[:8])[0]
    assert h.path == str(path)
    assert h.header_size == n
    assert h.data_start == 8 + n
    assert h.file_size == len(data)
    assert h.raw == data[: 8 + n]
    assert h.metadata == {"format": "pt"}
    assert h.names == ["w", "e", "s"]
    assert h.dtypes == ["F32", "BF16", "I64"]
    assert h.shapes == [[2, 3], [0, 4], []]
    assert h.offsets == [(0, 24), (24, 24), (24, 32)]
    assert len(h) == 3
    assert str(path) in repr(h) and "tensors=3" in repr(h)
    assert _core.MAX_HEADER_SIZE == 100_000_000


def test_empty_and_metadata_only_files(tmp_path):
    h = _core.read_header(str(write(tmp_path / "a", file_bytes("{}", 0))))
    assert len(h) == 0 and h.metadata is None and h.names == [] and h.offsets == []
    h = _core.read_header(str(write(tmp_path / "b", file_bytes('{"__metadata__":{"a":"1","b":"2"}}', 0))))
    assert h.metadata == {"a": "1", "b": "2"} and list(h.metadata) == ["a", "b"]
    # null metadata is read as absent, as the safetensors crate does
    h = _core.read_header(str(write(tmp_path / "c", file_bytes('{"__metadata__":null}', 0))))
    assert h.metadata is None


def test_accepts_pathlike(tmp_path):
    path = save_to(tmp_path, {"a": torch.zeros(2)}, None)
    assert _core.read_header(path).names == ["a"]  # a pathlib.Path, not only str


@SETTINGS
@given(tensors=tensor_dicts(), metadata=metadata_st)
def test_agrees_with_safetensors(tensors, metadata):
    if not tensors and metadata == {}:
        metadata = None  # safetensors writes invalid JSON there: see test_safetensors_empty_metadata_bug
    with tempfile.TemporaryDirectory() as tmp:
        path = save_to(Path(tmp), tensors, metadata)
        data = path.read_bytes()
        h = _core.read_header(str(path))
        n = struct.unpack("<Q", data[:8])[0]
        assert h.header_size == n and h.data_start == 8 + n and h.file_size == len(data)
        assert h.raw == data[: 8 + n]
        parsed = json.loads(data[8 : 8 + n], object_pairs_hook=collections.OrderedDict)
        file_md = parsed.pop("__metadata__", None)
        assert h.metadata == (dict(file_md) if file_md is not None else None)
        if file_md is not None:
            assert list(h.metadata) == list(file_md)  # file order kept
        by_offset = sorted(parsed.items(), key=lambda kv: tuple(kv[1]["data_offsets"]))
        assert h.names == [k for k, _ in by_offset]
        assert h.dtypes == [v["dtype"] for _, v in by_offset]
        assert h.shapes == [v["shape"] for _, v in by_offset]
        assert h.offsets == [tuple(v["data_offsets"]) for _, v in by_offset]
        assert sorted(h.names) == sorted(tensors)
        with safe_open(str(path), framework="pt") as f:
            assert f.metadata() == h.metadata
            assert sorted(f.keys()) == sorted(h.names)
        for name, dtype, shape, (b, e) in zip(h.names, h.dtypes, h.shapes, h.offsets):
            t = tensors[name]
            assert ST_TYPES[dtype] == t.dtype
            assert tuple(shape) == tuple(t.shape)
            assert data[h.data_start + b : h.data_start + e] == tensor_bytes(t)


def test_safetensors_empty_metadata_bug(tmp_path):
    """safetensors 0.8 writes '{},"__metadata__":{}}' for no tensors and metadata={}; nobody can read it."""
    path = save_to(tmp_path, {}, {})
    assert path.read_bytes()[8:].rstrip() == b'{},"__metadata__":{}}'
    assert_header_error(path, "not valid JSON")
    with pytest.raises(Exception):  # noqa: B017 - safetensors' own error type
        safe_open(str(path), framework="pt")


def test_read_headers_keeps_input_order_and_reports_first_failure(tmp_path):
    paths = []
    for i in range(7):
        paths.append(str(save_to(tmp_path, {f"t{i}": torch.zeros(i)}, {"i": str(i)}, f"m{i}.safetensors")))
    hs = _core.read_headers(paths, threads=3)
    assert [h.path for h in hs] == paths
    assert [h.metadata["i"] for h in hs] == [str(i) for i in range(7)]
    assert _core.read_headers(paths) and _core.read_headers([]) == []
    bad2 = write(tmp_path / "bad2.safetensors", b"\x01\x02")
    bad5 = write(tmp_path / "bad5.safetensors", b"\xff" * 16)
    mixed = paths[:2] + [str(bad2)] + paths[2:4] + [str(bad5)]
    for threads in (0, 1, 4):
        with pytest.raises(HeaderError) as info:
            _core.read_headers(mixed, threads=threads)
        assert str(bad2) in str(info.value) and str(bad5) not in str(info.value)
    with pytest.raises(CheckpointIOError) as info:
        _core.read_headers(paths + [str(tmp_path / "missing")])
    assert info.value.errno == 2 and info.value.filename == str(tmp_path / "missing")


def test_io_errors_are_oserrors(tmp_path):
    with pytest.raises(CheckpointIOError) as info:
        _core.read_header(str(tmp_path / "nope.safetensors"))
    assert isinstance(info.value, OSError)
    assert info.value.errno == 2
    assert info.value.filename == str(tmp_path / "nope.safetensors")
    with pytest.raises(OSError) as info:
        _core.read_header(str(tmp_path))
    assert info.value.errno == 21  # EISDIR
    with pytest.raises((OSError, ValueError)):
        _core.read_header(str(tmp_path) + "/a\x00b")
    os.mkfifo(tmp_path / "fifo")
    assert_header_error(tmp_path / "fifo", "FIFO")  # refused, without blocking on the open


# ----------------------------------------------------------------------------------------------
# every malformed class


@pytest.mark.parametrize("size", range(8))
def test_too_short(tmp_path, size):
    assert_header_error(write(tmp_path / "short.safetensors", b"\x00" * size), "too short")


def test_header_length_problems(tmp_path):
    p = tmp_path / "x.safetensors"
    write(p, struct.pack("<Q", 100) + b"{}      ")
    assert_header_error(p, "header length 100 runs past the end of the file (16 bytes)")
    write(p, struct.pack("<Q", 100_000_001) + b"{}      ")
    assert_header_error(p, "exceeds the format's maximum of 100000000")
    write(p, struct.pack("<Q", 2**64 - 1) + b"{}      ")
    assert_header_error(p, "exceeds")
    write(p, struct.pack("<Q", 0))
    assert_header_error(p, "empty")


@pytest.mark.parametrize(
    ("header", "data_len", "fragment"),
    [
        ('{"a":1', 0, "not valid JSON"),
        ("{} x", 0, "not valid JSON"),
        ("{}\x00", 0, "not valid JSON"),
        ("[]", 0, "start with '{'"),
        (' {"a":{}}', 0, "start with '{'"),
        ("null", 0, "start with '{'"),
        ('{"a":5}', 0, 'tensor "a": invalid entry'),
        ('{"a":{"dtype":"F32","shape":[1]}}', 4, "missing field"),
        ('{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}', 4, "invalid entry"),
        ('{"a":{"dtype":"F32","shape":[1.5],"data_offsets":[0,4]}}', 4, "invalid entry"),
        ('{"a":{"dtype":"F128","shape":[1],"data_offsets":[0,16]}}', 16, 'unknown dtype "F128"'),
        ('{"a":{"dtype":"f32","shape":[1],"data_offsets":[0,4]}}', 4, "unknown dtype"),
        ('{"a":{"dtype":"U8","shape":[2],"data_offsets":[1,3]}}', 3, "does not start at offset 0"),
        (
            '{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[2],"data_offsets":[1,3]}}',
            3,
            "overlaps",
        ),
        (
            '{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[2],"data_offsets":[3,5]}}',
            5,
            "hole of 1 bytes",
        ),
        ('{"a":{"dtype":"U8","shape":[0],"data_offsets":[2,0]}}', 0, "end before they begin"),
        ('{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}', 2, "runs past the end of the file"),
        ('{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}', 9, "5 trailing bytes"),
        ('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}', 4, "need 8 bytes"),
        ('{"a":{"dtype":"F32","shape":[18446744073709551615,2],"data_offsets":[0,4]}}', 4, "overflows"),
        ('{"a":{"dtype":"F64","shape":[4294967296,4294967296],"data_offsets":[0,4]}}', 4, "overflows"),
        ('{"a":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}}', 2, "whole number of bytes"),
        (
            '{"a":{"dtype":"U8","shape":[0],"data_offsets":[0,0]},"a":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}}',
            0,
            'duplicate entry "a"',
        ),
        (
            '{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"\\u0061":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}',
            1,
            "duplicate entry",
        ),
        ('{"__metadata__":{},"__metadata__":{}}', 0, 'duplicate entry "__metadata__"'),
        ('{"__metadata__":{"k":"1","k":"2"}}', 0, 'duplicate key "k"'),
        ('{"__metadata__":{"k":1}}', 0, 'value of key "k" is not a string'),
        ('{"__metadata__":{"k":null}}', 0, "not a string"),
        ('{"__metadata__":{"k":["v"]}}', 0, "not a string"),
        ('{"__metadata__":[]}', 0, "not a JSON object"),
        ('{"__metadata__":"x"}', 0, "not a JSON object"),
        (
            '{"a":{"dtype":"F32","dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
            4,
            "duplicate field",
        ),
    ],
)
def test_malformed_headers(tmp_path, header, data_len, fragment):
    assert_header_error(write(tmp_path / "bad.safetensors", file_bytes(header, data_len)), fragment)


def test_not_utf8(tmp_path):
    data = bytearray(file_bytes(json.dumps(GOOD), 32))
    data[12] = 0xFF
    assert_header_error(write(tmp_path / "x.safetensors", bytes(data)), "UTF-8")


def test_duplicates_that_safetensors_would_merge(tmp_path):
    # serde/JSON-to-dict keeps the last one; the file is still wrong and must be refused.
    header = '{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}'
    assert_header_error(write(tmp_path / "dup.safetensors", file_bytes(header, 2)), 'duplicate entry "a"')


def test_deep_nesting_does_not_crash(tmp_path):
    header = '{"a":' + "[" * 50_000 + "]" * 50_000 + "}"
    assert_header_error(write(tmp_path / "deep.safetensors", file_bytes(header, 0)))


@pytest.fixture(scope="module")
def valid_file(tmp_path_factory) -> bytes:
    tmp = tmp_path_factory.mktemp("valid")
    tensors = {
        "model.layers.0.w": random_tensor(torch.bfloat16, (3, 4), 1),
        "model.layers.0.b": random_tensor(torch.float32, (4,), 2),
        "empty": random_tensor(torch.int64, (0, 3), 3),
        "scalar": random_tensor(torch.float16, (), 4),
        "mask": random_tensor(torch.bool, (5,), 5),
    }
    return save_to(tmp, tensors, {"format": "pt", "x": "y"}).read_bytes()


@SETTINGS
@given(data=st.data())
def test_truncations_are_refused(valid_file, data):
    cut = data.draw(st.integers(0, len(valid_file) - 1))
    with tempfile.TemporaryDirectory() as tmp:
        assert_header_error(write(Path(tmp) / "cut.safetensors", valid_file[:cut]))


@SETTINGS
@given(n=st.one_of(st.integers(0, 2**64 - 1), st.integers(0, 1000), st.integers(99_999_990, 100_000_010)))
def test_wrong_header_lengths_are_refused(valid_file, n):
    original = struct.unpack("<Q", valid_file[:8])[0]
    assume(n != original)
    with tempfile.TemporaryDirectory() as tmp:
        assert_header_error(write(Path(tmp) / "len.safetensors", struct.pack("<Q", n) + valid_file[8:]))


@SETTINGS
@given(data=st.data())
def test_byte_flips_never_crash(valid_file, data):
    """Flip bytes of the JSON: either HeaderError, or a file safetensors itself reads the same way."""
    n = struct.unpack("<Q", valid_file[:8])[0]
    buf = bytearray(valid_file)
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(8, 8 + n - 1))
        buf[i] = data.draw(st.integers(0, 255))
    with tempfile.TemporaryDirectory() as tmp:
        path = write(Path(tmp) / "flip.safetensors", bytes(buf))
        try:
            h = _core.read_header(str(path))
        except HeaderError as e:
            assert str(path) in str(e)
            return
        with safe_open(str(path), framework="pt") as f:
            assert sorted(f.keys()) == sorted(h.names)
            assert f.metadata() == h.metadata


@SETTINGS
@given(data=st.data())
def test_offset_and_dtype_corruptions(valid_file, data):
    """Rewrite one entry's offsets / dtype / shape in the JSON (re-padded): HeaderError unless valid."""
    n = struct.unpack("<Q", valid_file[:8])[0]
    header = json.loads(valid_file[8 : 8 + n])
    body = valid_file[8 + n :]
    name = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
    what = data.draw(st.sampled_from(["begin", "end", "dtype", "shape"]))
    e = header[name]
    if what == "begin":
        e["data_offsets"][0] = data.draw(st.integers(0, 2 * len(body)))
    elif what == "end":
        e["data_offsets"][1] = data.draw(st.integers(0, 2 * len(body)))
    elif what == "dtype":
        e["dtype"] = data.draw(st.sampled_from([*DTYPE_NAMES, "F4", "bf16", "X", ""]))
    else:
        e["shape"] = data.draw(st.lists(st.integers(0, 2**40), max_size=3))
    raw = file_bytes(json.dumps(header, separators=(",", ":")), 0) + body
    with tempfile.TemporaryDirectory() as tmp:
        path = write(Path(tmp) / "c.safetensors", raw)
        try:
            h = _core.read_header(str(path))
        except HeaderError as err:
            assert str(path) in str(err)
            return
        with safe_open(str(path), framework="pt") as f:  # only valid files get here
            assert sorted(f.keys()) == sorted(h.names)


@SETTINGS
@given(extra=st.binary(min_size=1, max_size=64))
def test_trailing_bytes_are_refused(valid_file, extra):
    with tempfile.TemporaryDirectory() as tmp:
        assert_header_error(write(Path(tmp) / "t.safetensors", valid_file + extra), "trailing bytes")


# ----------------------------------------------------------------------------------------------
# dtype_size


def test_dtype_size_matches_torch():
    for name, dtype in ST_TYPES.items():
        assert _core.dtype_size(name) == torch.empty((), dtype=dtype).element_size(), name
    assert _core.dtype_size("F8_E8M0") == 1
    for bad in ["F4", "F6_E2M3", "F6_E3M2", "bf16", "", "F32 "]:
        with pytest.raises(HeaderError):
            _core.dtype_size(bad)


# ----------------------------------------------------------------------------------------------
# sort_shard_names


def number_runs(s: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", s)]


def test_sort_examples():
    assert _core.sort_shard_names(["model-10-of-10", "model-2-of-10", "model-1-of-10"]) == [
        "model-1-of-10",
        "model-2-of-10",
        "model-10-of-10",
    ]
    assert _core.sort_shard_names(["model-10-of-00010", "model-00002-of-00010"]) == [
        "model-00002-of-00010",
        "model-10-of-00010",
    ]
    assert _core.sort_shard_names(["m-2", "m-002", "m-02"]) == ["m-002", "m-02", "m-2"]
    assert _core.sort_shard_names(["b", "a", ""]) == ["", "a", "b"]
    assert _core.sort_shard_names([]) == []
    with pytest.raises(TypeError):
        _core.sort_shard_names("abc")


name_alphabet = st.sampled_from(list("0012389-_.abé/"))
shard_names = st.lists(st.text(name_alphabet, max_size=10), max_size=30)


@settings(max_examples=200, deadline=None)
@given(names=shard_names)
def test_sort_is_a_deterministic_permutation(names):
    once = _core.sort_shard_names(names)
    assert collections.Counter(once) == collections.Counter(names)
    assert _core.sort_shard_names(once) == once
    assert _core.sort_shard_names(list(reversed(names))) == once
    assert _core.sort_shard_names(sorted(names)) == once


@settings(max_examples=200, deadline=None)
@given(
    shards=st.lists(st.tuples(st.integers(0, 10**12), st.integers(0, 8)), max_size=20, unique_by=lambda t: t[0]),
    total_pad=st.integers(0, 6),
    prefix=st.sampled_from(["model", "/ckpt/dir-7/model", "pytorch_model"]),
)
def test_numbers_sort_numerically_whatever_the_padding(shards, total_pad, prefix):
    names = [f"{prefix}-{i:0{pad}d}-of-{len(shards):0{total_pad}d}.safetensors" for i, pad in shards]
    out = _core.sort_shard_names(names)
    numbers = [number_runs(n.rsplit("/", 1)[-1])[0] for n in out]
    assert numbers == sorted(i for i, _ in shards)
