"""shardwise._core: fresh layouts, atomic parallel writes, directory publication.

``fresh_layout`` + ``write_file`` must reproduce ``safetensors.torch.save_file`` byte for byte; writes
are all-or-nothing (no temp file left behind, the destination untouched on failure); the GIL is
released while writing.
"""

from __future__ import annotations

import collections
import json
import os
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import _TYPES as ST_TYPES
from safetensors.torch import save_file

from shardwise import _core
from shardwise.errors import CheckpointIOError, HeaderError

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
TORCH_TO_ST = {v: k for k, v in ST_TYPES.items()}
DTYPE_NAMES = sorted(ST_TYPES)


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    size = torch.empty((), dtype=dtype).element_size()
    n = 1
    for d in shape:
        n *= d
    high = 2 if dtype == torch.bool else 256
    return torch.randint(0, high, (n * size,), dtype=torch.uint8, generator=g).view(dtype).reshape(shape)


def as_bytes_view(t: torch.Tensor) -> np.ndarray:
    """What the Python side passes: a uint8 numpy view of the tensor's memory (no copy)."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


def leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if "shardwise-tmp" in p.name or "shardwise-old" in p.name]


def write_like_safetensors(path: Path, tensors: dict, metadata, threads: int = 0, split: int = 0) -> int:
    names = list(tensors)
    header, offsets = _core.fresh_layout(
        names,
        [TORCH_TO_ST[tensors[n].dtype] for n in names],
        [list(tensors[n].shape) for n in names],
        metadata,
    )
    pieces = []
    for name, (begin, end) in zip(names, offsets):
        view = as_bytes_view(tensors[name])
        assert len(view) == end - begin
        if split and len(view) > split:  # several pieces per tensor (at most ~16)
            step = max(split, len(view) // 16)
            pieces += [(begin + i, view[i : i + step]) for i in range(0, len(view), step)]
        else:
            pieces.append((begin, view))
    return _core.write_file(str(path), header, pieces, fsync=False, threads=threads)


names_st = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12).filter(
    lambda s: s != "__metadata__"
)
shape_st = st.lists(st.integers(0, 5), max_size=3).map(tuple)


@st.composite
def tensor_dicts(draw, max_size: int = 8) -> dict[str, torch.Tensor]:
    names = draw(st.lists(names_st, max_size=max_size, unique=True))
    return {
        name: random_tensor(ST_TYPES[draw(st.sampled_from(DTYPE_NAMES))], draw(shape_st), seed=i)
        for i, name in enumerate(names)
    }


metadata_st = st.one_of(
    st.none(),
    st.just({"format": "pt"}),
    st.dictionaries(st.text(max_size=8), st.text(max_size=16), max_size=6),
)


def metadata_order_in(path: Path) -> list[str] | None:
    """The metadata keys in the order safetensors wrote them (random for 2+ keys: it uses a HashMap)."""
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    md = json.loads(data[8 : 8 + n], object_pairs_hook=collections.OrderedDict).get("__metadata__")
    return None if md is None else list(md)


# ----------------------------------------------------------------------------------------------
# byte identity with safetensors


@SETTINGS
@given(tensors=tensor_dicts(), metadata=metadata_st, threads=st.integers(0, 4))
def test_byte_identical_to_safetensors(tensors, metadata, threads):
    if not tensors and metadata == {}:
        # safetensors 0.8 writes invalid JSON here ('{},"__metadata__":{}}'); we write valid JSON.
        metadata = None
    with tempfile.TemporaryDirectory() as tmp:
        ref = Path(tmp) / "ref.safetensors"
        save_file(tensors, str(ref), metadata=metadata)
        order = metadata_order_in(ref)
        ours = Path(tmp) / "ours.safetensors"
        # Same keys, in the order safetensors happened to write them: then byte-identical.
        same_order = None if metadata is None else {k: metadata[k] for k in order}
        n = write_like_safetensors(ours, tensors, same_order, threads=threads)
        assert ours.read_bytes() == ref.read_bytes()
        assert n == ref.stat().st_size
        # In the caller's order: the same file up to metadata key order.
        write_like_safetensors(ours, tensors, metadata, threads=threads)
        a, b = ours.read_bytes(), ref.read_bytes()
        assert len(a) == len(b)
        na = struct.unpack("<Q", a[:8])[0]
        assert json.loads(a[8 : 8 + na]) == json.loads(b[8 : 8 + na])
        assert a[8 + na :] == b[8 + na :]
        assert metadata_order_in(ours) == (None if metadata is None else list(metadata))
        assert leftovers(Path(tmp)) == []


def test_multi_key_metadata_order_is_the_callers(tmp_path):
    md = {f"k{i}": f"v{i}" for i in (3, 1, 4, 0, 2)}
    header, _ = _core.fresh_layout(["a"], ["F32"], [[1]], md)
    assert header[8:].startswith(b'{"__metadata__":{"k3":"v3","k1":"v1","k4":"v4","k0":"v0","k2":"v2"},"a":')
    # Any Mapping works, in its iteration order.
    header2, _ = _core.fresh_layout(["a"], ["F32"], [[1]], collections.OrderedDict(md))
    assert header2 == header


def test_fresh_layout_known_case():
    header, offsets = _core.fresh_layout(
        ["b", "c", "a", "B"], ["I64", "F64", "F32", "BOOL"], [[3], [0], [2], [1]], {"format": "pt"}
    )
    n = struct.unpack("<Q", header[:8])[0]
    assert len(header) == 8 + n and n % 8 == 0
    assert header[8:].rstrip(b" ") == (
        b'{"__metadata__":{"format":"pt"},"b":{"dtype":"I64","shape":[3],"data_offsets":[0,24]},'
        b'"c":{"dtype":"F64","shape":[0],"data_offsets":[24,24]},"a":{"dtype":"F32","shape":[2],'
        b'"data_offsets":[24,32]},"B":{"dtype":"BOOL","shape":[1],"data_offsets":[32,33]}}'
    )
    assert offsets == [(0, 24), (24, 24), (24, 32), (32, 33)]
    header, offsets = _core.fresh_layout([], [], [], None)
    assert header == b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " and offsets == []
    header, _ = _core.fresh_layout([], [], [], {})
    assert header[8:].rstrip() == b'{"__metadata__":{}}'
    # shapes may be tuples / torch.Size
    h1, _ = _core.fresh_layout(["x"], ["BF16"], [torch.Size([2, 3])], None)
    h2, _ = _core.fresh_layout(["x"], ["BF16"], [(2, 3)], None)
    assert h1 == h2


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ((["a"], ["F99"], [[1]], None), 'unknown dtype "F99"'),
        ((["a", "a"], ["F32", "F32"], [[1], [1]], None), "duplicate tensor name"),
        ((["a"], ["F32", "F16"], [[1]], None), "same length"),
        ((["__metadata__"], ["F32"], [[1]], None), "cannot be called"),
        ((["a"], ["F32"], [[-1]], None), "negative dimension"),
        ((["a"], ["F4"], [[3]], None), "whole number of bytes"),
        ((["a"], ["F32"], [[2**62, 8]], None), "overflows"),
        ((["a"], ["F32"], [[1]], {"k": 1}), "metadata values must be str"),
        ((["a"], ["F32"], [[1]], {1: "v"}), "metadata keys must be str"),
    ],
)
def test_fresh_layout_bad_arguments(args, fragment):
    with pytest.raises(HeaderError) as info:
        _core.fresh_layout(*args)
    assert fragment in str(info.value)


# ----------------------------------------------------------------------------------------------
# write_file


def many_tensors() -> dict[str, torch.Tensor]:
    out = {}
    for i in range(300):
        dtype = [torch.bfloat16, torch.float32, torch.int64, torch.bool, torch.uint8][i % 5]
        shape = [(), (0,), (1,), (3, 7), (i % 11, 2), (0, 5)][i % 6]
        out[f"model.layers.{i}.w"] = random_tensor(dtype, shape, seed=i)
    out["big"] = random_tensor(torch.float32, (600, 1000), seed=999)  # 2.4 MB: several chunks/threads
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tensors = many_tensors()
    path = tmp_path_factory.mktemp("ref") / "ref.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    return tensors, path.read_bytes()


@settings(max_examples=20, deadline=None)
@given(threads=st.integers(1, 8), split=st.sampled_from([0, 1, 7, 4096, 100_000]))
def test_any_thread_count_and_split_gives_the_same_bytes(reference, threads, split):
    tensors, expected = reference
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "out.safetensors"
        assert write_like_safetensors(path, tensors, {"format": "pt"}, threads=threads, split=split) == len(expected)
        assert path.read_bytes() == expected
        assert leftovers(Path(tmp)) == []


def test_buffer_kinds(tmp_path):
    header, _ = _core.fresh_layout(["a", "b", "c", "d"], ["U8", "U8", "U8", "F32"], [[3], [2], [2], [2]], None)
    f32 = np.array([1.5, -2.0], dtype=np.float32)  # not a uint8 buffer: taken as its raw bytes
    pieces = [(0, b"abc"), (3, bytearray(b"de")), (5, memoryview(b"xfg")[1:]), (7, f32)]
    path = tmp_path / "kinds.safetensors"
    assert _core.write_file(str(path), header, pieces) == len(header) + 15
    assert path.read_bytes()[len(header) :] == b"abcdefg" + f32.tobytes()
    # header as any bytes-like object, path as PathLike
    _core.write_file(path, memoryview(header), pieces, fsync=False)
    assert _core.read_header(str(path)).names == ["d", "a", "b", "c"]


def test_bad_buffers(tmp_path):
    header, _ = _core.fresh_layout(["a"], ["U8"], [[4]], None)
    path = tmp_path / "x.safetensors"
    strided = np.arange(8, dtype=np.uint8)[::2]
    with pytest.raises(ValueError, match="not C-contiguous"):
        _core.write_file(str(path), header, [(0, strided)])
    with pytest.raises(ValueError, match="not C-contiguous"):
        _core.write_file(str(path), header, [(0, np.zeros((4, 2), dtype=np.float32)[:, 0])])
    with pytest.raises(TypeError, match="bytes-like"):
        _core.write_file(str(path), header, [(0, 1234)])
    with pytest.raises((TypeError, ValueError)):
        _core.write_file(str(path), header, [(0,)])
    assert not path.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("pieces", "fragment"),
    [
        ([(0, b"abcd"), (3, b"xyzw")], "overlap"),
        ([(0, b"abcd"), (2, b""), (4, b"xyzw"), (8, b"")], None),  # empty pieces inside the area are fine
        ([(0, b"abcd"), (5, b"xyz")], "gap of 1 bytes"),
        ([(1, b"abcd"), (5, b"xyz")], "gap"),
        ([(0, b"abcd")], "cover 4 bytes of data but the header declares 8"),
        ([(0, b"abcd"), (4, b"xyzwv")], "cover 9 bytes"),
        ([(0, b"abcd"), (4, b"xyzw"), (9, b"")], "past the end"),
        ([], "cover 0 bytes"),
    ],
)
def test_pieces_must_tile(tmp_path, pieces, fragment):
    header, _ = _core.fresh_layout(["a", "b"], ["U8", "U8"], [[4], [4]], None)
    path = tmp_path / "t.safetensors"
    if fragment is None:
        assert _core.write_file(str(path), header, pieces) == len(header) + 8
        assert path.read_bytes().endswith(b"abcdxyzw")
        return
    with pytest.raises(HeaderError) as info:
        _core.write_file(str(path), header, pieces)
    assert fragment in str(info.value) and str(path) in str(info.value)
    assert not path.exists() and leftovers(tmp_path) == []


def test_header_must_be_valid(tmp_path):
    path = tmp_path / "h.safetensors"
    for header in [b"", b"{}", struct.pack("<Q", 16) + b"{}      ", struct.pack("<Q", 8) + b"not json"]:
        with pytest.raises(HeaderError):
            _core.write_file(str(path), header, [])
    assert not path.exists() and leftovers(tmp_path) == []


def test_missing_directory_is_an_oserror(tmp_path):
    header, _ = _core.fresh_layout(["a"], ["U8"], [[2]], None)
    dest = tmp_path / "nope" / "x.safetensors"
    with pytest.raises(CheckpointIOError) as info:
        _core.write_file(str(dest), header, [(0, b"hi")])
    assert isinstance(info.value, OSError)
    assert info.value.errno == 2 and info.value.filename == str(dest)
    assert leftovers(tmp_path) == []


def test_destination_is_a_directory(tmp_path):
    header, _ = _core.fresh_layout(["a"], ["U8"], [[2]], None)
    (tmp_path / "d").mkdir()
    with pytest.raises(CheckpointIOError) as info:
        _core.write_file(str(tmp_path / "d"), header, [(0, b"hi")])
    assert info.value.errno == 21
    assert leftovers(tmp_path) == []


CHILD = textwrap.dedent(
    """
    import json, os, resource, sys
    import numpy as np
    from shardwise import _core
    from shardwise.errors import CheckpointIOError

    dest, mode = sys.argv[1], sys.argv[2]
    n = 1 << 20
    header, _ = _core.fresh_layout(["x"], ["U8"], [[n]], {"format": "pt"})
    data = np.full(n, 7, dtype=np.uint8)
    resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))  # Python ignores SIGXFSZ: writes get EFBIG
    try:
        if mode == "one":
            _core.write_file(dest, header, [(0, data)], threads=4)
        else:
            small, _ = _core.fresh_layout(["x"], ["U8"], [[4]], None)
            _core.write_files([(dest + ".small", small, [(0, b"abcd")]), (dest, header, [(0, data)])])
    except OSError as e:
        print(json.dumps({"type": type(e).__name__, "errno": e.errno, "filename": e.filename,
                          "checkpoint_error": isinstance(e, CheckpointIOError)}))
    else:
        print(json.dumps({"type": None}))
    """
)


@pytest.mark.parametrize("mode", ["one", "many"])
def test_file_size_limit_leaves_nothing_behind(tmp_path, mode):
    dest = tmp_path / "model.safetensors"
    dest.write_bytes(b"previous contents")
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(dest), mode], capture_output=True, text=True, timeout=120, check=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"type": "CheckpointIOError", "errno": 27, "filename": str(dest), "checkpoint_error": True}
    assert dest.read_bytes() == b"previous contents"
    assert not (tmp_path / "model.safetensors.small").exists()  # all-or-nothing across files
    assert leftovers(tmp_path) == []


def test_write_files(tmp_path):
    ta = {"w": random_tensor(torch.bfloat16, (4, 4), 1)}
    tb = {"x": random_tensor(torch.int64, (3,), 2), "y": random_tensor(torch.bool, (0,), 3)}
    files, expected = [], {}
    for name, tensors in [("a.safetensors", ta), ("b.safetensors", tb)]:
        save_file(tensors, str(tmp_path / ("ref-" + name)), metadata={"format": "pt"})
        expected[name] = (tmp_path / ("ref-" + name)).read_bytes()
        names = list(tensors)
        header, offsets = _core.fresh_layout(
            names,
            [TORCH_TO_ST[tensors[n].dtype] for n in names],
            [list(tensors[n].shape) for n in names],
            {"format": "pt"},
        )
        pieces = [(b, as_bytes_view(tensors[n])) for n, (b, _) in zip(names, offsets)]
        files.append((str(tmp_path / name), header, pieces))
    total = _core.write_files(files, fsync=True, threads=3)
    assert total == sum(len(v) for v in expected.values())
    for name, data in expected.items():
        assert (tmp_path / name).read_bytes() == data
    assert _core.write_files([]) == 0
    # a bad file anywhere: nothing is written
    for f in ("a.safetensors", "b.safetensors"):
        (tmp_path / f).unlink()
    bad = (str(tmp_path / "c.safetensors"), files[0][1], [])
    with pytest.raises(HeaderError):
        _core.write_files([files[0], bad, files[1]])
    assert not any((tmp_path / f).exists() for f in ("a.safetensors", "b.safetensors", "c.safetensors"))
    with pytest.raises(HeaderError, match="twice"):
        _core.write_files([files[0], files[0]])
    assert leftovers(tmp_path) == []


def test_gil_is_released_during_write(tmp_path):
    """A Python thread runs while write_file works: it sees the temp file, which exists only inside the call."""
    directory = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else tmp_path
    directory = Path(tempfile.mkdtemp(dir=directory))
    try:
        n = 200 << 20
        data = np.ones(n, dtype=np.uint8)
        header, _ = _core.fresh_layout(["x"], ["U8"], [[n]], None)
        stop = threading.Event()
        seen = [0, 0]  # loop iterations, iterations that saw the temp file

        def spin():
            while not stop.is_set():
                seen[0] += 1
                if any(".shardwise-tmp-" in name for name in os.listdir(directory)):
                    seen[1] += 1

        t = threading.Thread(target=spin)
        t.start()
        try:
            _core.write_file(str(directory / "big.safetensors"), header, [(0, data)], fsync=False, threads=2)
        finally:
            stop.set()
            t.join()
        print("spin iterations, of which during the write:", seen)
        assert seen[1] > 3, seen
        assert (directory / "big.safetensors").stat().st_size == len(header) + n
    finally:
        for p in directory.iterdir():
            p.unlink()
        directory.rmdir()


# ----------------------------------------------------------------------------------------------
# fsync_dir, publish_dir


def make_tree(root: Path, tag: str) -> None:
    (root / "sub").mkdir(parents=True)
    (root / "config.json").write_text(tag)
    (root / "sub" / f"{tag}.bin").write_text(tag)


def test_publish_dir_new_and_existing(tmp_path):
    staging, final = tmp_path / "staging", tmp_path / "final"
    make_tree(staging, "one")
    _core.publish_dir(str(staging), str(final))
    assert not staging.exists() and (final / "config.json").read_text() == "one"
    make_tree(staging, "two")
    _core.publish_dir(staging, final)  # PathLike too
    assert not staging.exists()
    assert (final / "config.json").read_text() == "two"
    assert sorted(p.relative_to(final).as_posix() for p in final.rglob("*")) == ["config.json", "sub", "sub/two.bin"]
    assert [p.name for p in tmp_path.iterdir()] == ["final"]


def test_publish_dir_errors(tmp_path):
    with pytest.raises(CheckpointIOError) as info:
        _core.publish_dir(str(tmp_path / "missing"), str(tmp_path / "final"))
    assert info.value.errno == 2
    (tmp_path / "file").write_text("x")
    make_tree(tmp_path / "st", "x")
    with pytest.raises(CheckpointIOError) as info:
        _core.publish_dir(str(tmp_path / "st"), str(tmp_path / "file"))
    assert info.value.errno == 20  # ENOTDIR: never replaces a non-directory
    assert (tmp_path / "file").read_text() == "x" and (tmp_path / "st" / "config.json").exists()


def test_fsync_dir(tmp_path):
    _core.fsync_dir(str(tmp_path))
    with pytest.raises(CheckpointIOError) as info:
        _core.fsync_dir(str(tmp_path / "missing"))
    assert info.value.errno == 2
