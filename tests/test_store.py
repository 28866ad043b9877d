"""The storage layer's local backend on its own: a save is staged, written from buffers at their
offsets, published whole or discarded without a trace; leftovers of dead saves are swept, live ones
kept; and features without an object-storage backend refuse a URL by name."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shardwise import CheckpointError
from shardwise.format.layout import fresh_header
from shardwise.store.dirs import open_dirs
from shardwise.store.local import STAGING_MARK, LocalOutput, is_staging_name, remove_leftovers, staging_path
from shardwise.store.url import local_folder

#: shard name -> its tensors' bytes (uint8 vectors)
files_st = st.dictionaries(
    st.from_regex(r"[a-z]{1,8}\.safetensors", fullmatch=True),
    st.lists(st.binary(min_size=1, max_size=300), max_size=4),
    min_size=1, max_size=4,
)


def _shard(name: str, chunks: list[bytes]) -> tuple[str, bytes, list[tuple[int, bytes]]]:
    """A valid safetensors header for the chunks and the chunks at their data offsets."""
    header, offsets = fresh_header([(f"t{i}", torch.uint8, (len(c),)) for i, c in enumerate(chunks)], None)
    return name, header, [(begin, c) for (begin, _), c in zip(offsets, chunks)]


def _file_bytes(name: str, chunks: list[bytes]) -> bytes:
    _, header, _ = _shard(name, chunks)
    return header + b"".join(chunks)


@settings(max_examples=30, deadline=None)
@given(files=files_st, old=st.booleans())
def test_a_published_save_holds_exactly_the_written_bytes(tmp_path_factory, files, old) -> None:
    out = tmp_path_factory.mktemp("out")
    if old:  # a folder of the same name is replaced whole
        (out / "epoch_0").mkdir()
        (out / "epoch_0" / "stale.bin").write_bytes(b"old")
    o = LocalOutput(out, fsync=False)
    staging = o.begin("epoch_0")
    assert is_staging_name(staging.name) and staging.parent == out
    # two groups, as the checkpointer hands them over
    groups = [[_shard(n, c) for n, c in list(files.items())[i::2]] for i in range(2)]
    o.write_files(g for g in groups if g)
    (staging / "config.json").write_text("{}")
    assert o.publish() == str(out / "epoch_0")
    got = {p.name: p.read_bytes() for p in (out / "epoch_0").iterdir()}
    assert got == {"config.json": b"{}", **{n: _file_bytes(n, c) for n, c in files.items()}}
    assert [p.name for p in out.iterdir()] == ["epoch_0"]  # no staging folder, no replaced one left


@settings(max_examples=20, deadline=None)
@given(files=files_st)
def test_a_failed_save_leaves_the_previous_folder_as_it_was(tmp_path_factory, files) -> None:
    out = tmp_path_factory.mktemp("out")
    (out / "epoch_0").mkdir()
    (out / "epoch_0" / "model.safetensors").write_bytes(b"previous")
    o = LocalOutput(out, fsync=False)
    o.begin("epoch_0")

    def groups():
        yield [_shard(n, c) for n, c in files.items()]
        raise OSError(28, "No space left on device (injected)")

    with pytest.raises(OSError, match="injected"):
        o.write_files(groups())
    o.discard()
    assert sorted(p.name for p in out.iterdir()) == ["epoch_0"]
    assert (out / "epoch_0" / "model.safetensors").read_bytes() == b"previous"
    with pytest.raises(RuntimeError, match="begin"):  # nothing to publish after a discard
        o.publish()


def test_leftovers_of_dead_old_saves_go_and_live_or_young_ones_stay(tmp_path: Path) -> None:
    dead_pid = 2**22 + 12345  # above the default pid_max: no such process
    old = time.time() - 7200
    dead_old = tmp_path / f".epoch_1{STAGING_MARK}{dead_pid}-abcd1234"
    dead_young = tmp_path / f".epoch_2{STAGING_MARK}{dead_pid}-abcd1234"
    live_old = tmp_path / f".epoch_3{STAGING_MARK}{os.getppid()}-abcd1234"
    tmp_file = tmp_path / f".recipe_state.pt{STAGING_MARK}tmp-{dead_pid}"
    for p in (dead_old, dead_young, live_old):
        p.mkdir()
    tmp_file.write_bytes(b"x")
    for p in (dead_old, live_old, tmp_file):
        os.utime(p, (old, old))
    (tmp_path / "epoch_0").mkdir()
    remove_leftovers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["epoch_0", dead_young.name, live_old.name])
    remove_leftovers(tmp_path / "missing")  # a folder that does not exist has no leftovers


def test_prune_keeps_what_the_run_reads_and_the_paired_folder(tmp_path: Path) -> None:
    for n in range(5):
        (tmp_path / f"epoch_{n}").mkdir()
    o = LocalOutput(tmp_path, fsync=False)
    o.prune("epoch", keep="epoch_4", keep_n=2, paired="epoch_1", reads=[tmp_path / "epoch_0" / "model.safetensors"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_0", "epoch_1", "epoch_3", "epoch_4"]


def test_open_dirs_of_local_paths_is_the_local_backend(tmp_path: Path) -> None:
    src, out = open_dirs(tmp_path / "in", tmp_path / "out")
    assert src == tmp_path / "in" and isinstance(out, LocalOutput) and out.folder == tmp_path / "out"
    assert out.where("epoch_0") == str(tmp_path / "out" / "epoch_0")
    assert staging_path(tmp_path / "out" / "epoch_0").name.startswith(f".epoch_0{STAGING_MARK}{os.getpid()}-")


@pytest.mark.parametrize("url", ["s3://bucket/run/epoch_0", "gs://b/x"])
def test_a_url_where_only_folders_work_is_refused_by_name(url: str) -> None:
    with pytest.raises(CheckpointError) as e:
        local_folder(url, "shardwise.dcp.load")
    assert url in str(e.value) and "s3:/bucket" not in str(e.value).replace("s3://bucket", "")
    assert local_folder("/tmp/x", "y") == Path("/tmp/x")


def test_dcp_load_of_a_url_names_the_url_not_a_mangled_path() -> None:
    """``shardwise.dcp.load(sd, "s3://...")`` once said ``s3:/bucket/.../config.json: config.json not found``."""
    pytest.importorskip("torch.distributed.checkpoint")
    from shardwise import dcp

    with pytest.raises(CheckpointError) as e:
        dcp.load({}, "s3://bucket/run/epoch_0", model_type="LLAMA3")
    assert "s3://bucket/run/epoch_0" in str(e.value) and "config.json" not in str(e.value)
    with pytest.raises(CheckpointError, match="s3://bucket/out"):
        dcp.HFStorageWriter("s3://bucket/out")
