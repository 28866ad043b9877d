"""Remote checkpoints against a real S3 endpoint (moto's standalone server on 127.0.0.1, reached with
s3fs over HTTP through a counting, fault-injecting proxy): byte-identical round trips local ⇄ remote
in every direction, the download cache, the completion-marker rule (resume, pruning, verify, a save
killed mid-upload), errors naming the URL (missing bucket, 403 on one part, server gone mid-save,
no credentials), and headers-only ``inspect``/``verify`` of a remote checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ckpt_factory import LlamaSpec, llama_state_dict, split_keys, write_hf_checkpoint
from shardwise import CheckpointIOError, FullModelHFCheckpointer
from shardwise.store import fsspec as rm
from shardwise.store import marker as mk
from shardwise.store import upload, url

pytest.importorskip("moto.server")
s3fs = pytest.importorskip("s3fs")

from s3_server import S3, s3_server  # noqa: E402

# ~27 MB in two shards of ~13.6 MB: with 5 MiB parts every shard is a 3-part multipart upload
SPEC = LlamaSpec(layers=2, heads=8, kv_heads=4, head_dim=64, hidden=512, intermediate=1024, vocab=2048,
                 dtype=torch.float32)
PART = 5 * 1024 * 1024
INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    with s3_server() as server:
        yield server


@pytest.fixture(autouse=True)
def _small_parts(monkeypatch: pytest.MonkeyPatch, s3: S3) -> Iterator[None]:
    monkeypatch.setenv("SHARDWISE_REMOTE_PART_SIZE", str(PART))
    s3.proxy.reset()
    yield
    s3.proxy.reset()


@pytest.fixture
def fs(s3: S3):
    return s3fs.S3FileSystem(**s3.storage_options())


@pytest.fixture
def bucket(fs) -> str:
    name = f"b-{uuid.uuid4().hex[:12]}"
    fs.mkdir(name)
    return name


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A local HF checkpoint (two shards, index, config, a tokenizer side file)."""
    folder = tmp_path_factory.mktemp("hf") / "model"
    sd = llama_state_dict(SPEC)
    names = write_hf_checkpoint(folder, sd, split_keys(list(sd), [len(sd) // 2]), SPEC.config())
    (folder / "tokenizer.json").write_text('{"version": "1.0"}\n')
    return folder, names


def _upload(fs, local: Path, url: str) -> None:
    fs.put(str(local) + "/", url.removeprefix("s3://") + "/", recursive=True)
    fs.invalidate_cache()


def _ckpt(s3: S3, src: str, names: list[str], out: str, cache: Path, **kw) -> FullModelHFCheckpointer:
    return FullModelHFCheckpointer(src, names, "LLAMA3", out, storage_options=s3.storage_options(),
                                   cache_dir=cache, **kw)


def _save_locally(src: str, names: list[str], out: Path, cache: Path, **kw) -> dict[str, bytes]:
    """Load ``src`` (a URL), save ``out/epoch_0`` locally, and return what was written."""
    ck = FullModelHFCheckpointer(src, names, "LLAMA3", str(out), cache_dir=cache, **kw)
    ck.save_checkpoint(ck.load_checkpoint(), epoch=0)
    return _files(out / "epoch_0")


def _files(local: Path) -> dict[str, bytes]:
    return {p.relative_to(local).as_posix(): p.read_bytes() for p in sorted(local.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


def _remote_files(fs, url: str, hidden: bool = False) -> dict[str, bytes]:
    base = url.removeprefix("s3://").rstrip("/") + "/"
    fs.invalidate_cache()
    return {k[len(base):]: fs.cat_file(k) for k in sorted(fs.find(base))
            if hidden or not k.rsplit("/", 1)[-1].startswith(".")}


def _open_uploads(fs, bucket: str) -> list[dict]:
    return fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", []) or []


# ------------------------------------------------------------------------------------ pure parts


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=8, max_size=40), st.lists(st.binary(min_size=0, max_size=50), max_size=8),
       st.integers(1, 64), st.data())
def test_layout_reads_exactly_the_file_bytes(header: bytes, pieces: list[bytes], step: int, data) -> None:
    """Every part is the slice of header + pieces a local write would put there, whatever the order
    the pieces come in and wherever the part boundaries fall."""
    offsets, pos = [], 0
    for p in pieces:
        offsets.append(pos)
        pos += len(p)
    order = data.draw(st.permutations(list(range(len(pieces)))))
    lay = upload._Layout("mem://x", header, [(offsets[i], pieces[i]) for i in order])
    whole = header + b"".join(pieces)
    assert lay.size == len(whole)
    assert b"".join(bytes(lay.read(s, min(s + step, lay.size))) for s in range(0, lay.size, step)) == whole


def test_layout_refuses_pieces_that_do_not_tile() -> None:
    with pytest.raises(ValueError, match="do not tile"):
        upload._Layout("s3://b/x", b"12345678", [(0, b"ab"), (3, b"cd")])


def test_url_detection() -> None:
    assert url.is_url("s3://bucket/model") and url.is_url("gs://b/m") and url.is_url("memory://x")
    assert not url.is_url("/tmp/model") and not url.is_url("file:///tmp/model") and not url.is_url(Path("s3:/x"))


def test_missing_backend_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import fsspec  # noqa: F401 - loads fsspec.registry

    registry = sys.modules["fsspec.registry"]._registry
    monkeypatch.setitem(sys.modules, "gcsfs", None)  # as if not installed
    monkeypatch.delitem(registry, "gs", raising=False)
    monkeypatch.delitem(registry, "gcs", raising=False)
    with pytest.raises(CheckpointIOError, match=r"gcsfs.*pip install 'shardwise\[remote\]'") as e:
        rm.remote("gs://bucket/model")
    assert e.value.filename == "gs://bucket/model"


# ------------------------------------------------------------------------------------ round trips


def test_remote_to_remote_is_byte_identical(s3, fs, bucket, hf, tmp_path) -> None:
    local, names = hf
    _upload(fs, local, f"s3://{bucket}/model")
    ck = _ckpt(s3, f"s3://{bucket}/model", names, f"s3://{bucket}/run", tmp_path / "cache")
    state = ck.load_checkpoint()
    ck.save_checkpoint(state, epoch=0)
    assert _remote_files(fs, f"s3://{bucket}/run/epoch_0") == _files(local)
    marker = json.loads(fs.cat_file(f"{bucket}/run/epoch_0/{mk.COMPLETE_MARKER}"))
    assert marker["files"] == {n: len(b) for n, b in _files(local).items()}
    assert not fs.exists(f"{bucket}/run/epoch_0/{mk.SAVING_MARKER}")
    assert _open_uploads(fs, bucket) == []


def test_local_to_remote_to_local_is_byte_identical(s3, fs, bucket, hf, tmp_path) -> None:
    local, names = hf
    up = _ckpt(s3, str(local), names, f"s3://{bucket}/run", tmp_path / "cache")
    up.save_checkpoint(up.load_checkpoint(), epoch=0)
    assert _remote_files(fs, f"s3://{bucket}/run/epoch_0") == _files(local)
    # the shards went up as multipart uploads of 5 MiB parts, straight from the tensors
    parts = [r for r in s3.proxy.requests if r.method == "PUT" and "partNumber=" in r.path]
    assert len(parts) == 2 * 3
    got = _save_locally(f"s3://{bucket}/run/epoch_0", names, tmp_path / "out", tmp_path / "cache2",
                        storage_options=s3.storage_options())
    assert got == _files(local)


def test_load_maps_the_cached_files_zero_copy_and_downloads_once(s3, fs, bucket, hf, tmp_path) -> None:
    local, names = hf
    _upload(fs, local, f"s3://{bucket}/model")
    cache = tmp_path / "cache"
    model = _ckpt(s3, f"s3://{bucket}/model", names, str(tmp_path / "out"), cache).load_checkpoint()["model"]
    cached = cache / "s3" / bucket / "model"
    assert _files(cached) == _files(local)
    emb, norm = model["tok_embeddings.weight"], model["norm.scale"]
    assert emb.untyped_storage().data_ptr() != norm.untyped_storage().data_ptr()  # two shards: two mappings
    assert emb.untyped_storage().nbytes() == (cached / names[0]).stat().st_size
    got = s3.proxy.sent
    assert got > sum(len(b) for b in _files(local).values())
    s3.proxy.reset()
    again = _ckpt(s3, f"s3://{bucket}/model", names, str(tmp_path / "out"), cache).load_checkpoint()["model"]
    assert torch.equal(again["tok_embeddings.weight"], emb)
    assert s3.proxy.sent < 64 * 1024  # listings only: every shard came from the cache


def test_a_changed_remote_file_is_downloaded_again(s3, fs, bucket, hf, tmp_path) -> None:
    local, names = hf
    _upload(fs, local, f"s3://{bucket}/model")
    cache = tmp_path / "cache"
    _ckpt(s3, f"s3://{bucket}/model", names, str(tmp_path / "out"), cache).load_checkpoint()
    cfg = json.loads((local / "config.json").read_text())
    cfg["rope_theta"] = 1234.0
    fs.pipe_file(f"{bucket}/model/config.json", json.dumps(cfg).encode())
    ck = _ckpt(s3, f"s3://{bucket}/model", names, str(tmp_path / "out"), cache)
    assert json.loads((ck._checkpoint_dir / "config.json").read_text())["rope_theta"] == 1234.0


# ------------------------------------------------------------------------------------ marker rule


def _save_epochs(s3, bucket, hf, cache, epochs, **kw) -> FullModelHFCheckpointer:
    local, names = hf
    ck = _ckpt(s3, str(local), names, f"s3://{bucket}/run", cache, **kw)
    state = ck.load_checkpoint()
    for e in epochs:
        ck.save_checkpoint({**state, "epochs_run": e + 1, "seed": 7}, epoch=e, intermediate_checkpoint=True)
    return ck


def test_resume_reads_the_newest_complete_folder(s3, fs, bucket, hf, tmp_path) -> None:
    local, names = hf
    _save_epochs(s3, bucket, hf, tmp_path / "cache", [0, 1])
    # a dead save's epoch_2: shards and index, but no marker
    fs.pipe_file(f"{bucket}/run/epoch_2/{names[0]}", b"partial")
    fs.pipe_file(f"{bucket}/run/epoch_2/{INDEX}", (local / INDEX).read_bytes())
    resumed = _ckpt(s3, str(local), [f"epoch_1/{n}" for n in names], f"s3://{bucket}/run", tmp_path / "cache2",
                    should_load_recipe_state=True)
    state = resumed.load_checkpoint()
    assert state["epochs_run"] == 2 and state["seed"] == 7
    assert resumed._checkpoint_paths[0].parent.name == "epoch_1"
    assert mk.latest_complete(rm.remote(f"s3://{bucket}/run", s3.storage_options()), "epoch") == "epoch_1"


def test_keep_last_n_prunes_complete_folders_only(s3, fs, bucket, hf, tmp_path) -> None:
    _save_epochs(s3, bucket, hf, tmp_path / "cache", [0, 1, 2, 3], keep_last_n_checkpoints=2)
    fs.invalidate_cache()
    folders = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{bucket}/run") if "epoch_" in p)
    assert folders == ["epoch_2", "epoch_3"]
    assert fs.exists(f"{bucket}/run/recipe_state/recipe_state.pt")


def test_resaving_a_folder_replaces_it_whole(s3, fs, bucket, hf, tmp_path) -> None:
    local, names = hf
    fs.pipe_file(f"{bucket}/run/epoch_0/stale.safetensors", b"old")
    _save_epochs(s3, bucket, hf, tmp_path / "cache", [0])
    assert "stale.safetensors" not in _remote_files(fs, f"s3://{bucket}/run/epoch_0")


KILLED_CHILD = textwrap.dedent(
    """
    import json, sys
    import shardwise.store.upload as rm
    from shardwise import FullModelHFCheckpointer

    src, names, out, cache = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[5]
    opts = json.loads(sys.argv[4])
    upload_part = rm._upload_part

    def hooked(*args, **kwargs):
        etag = upload_part(*args, **kwargs)
        print("PART", flush=True)
        sys.stdin.readline()  # parked until the parent kills us
        return etag

    rm._upload_part = hooked
    ck = FullModelHFCheckpointer(src, names, "LLAMA3", out, storage_options=opts, cache_dir=cache)
    ck.save_checkpoint(ck.load_checkpoint(), epoch=1)
    """
)


def test_a_save_killed_mid_upload_leaves_nothing_complete(s3, fs, bucket, hf, tmp_path) -> None:
    from shardwise.report import verify

    local, names = hf
    _save_epochs(s3, bucket, hf, tmp_path / "cache", [0])
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_CHILD, str(local), json.dumps(names), f"s3://{bucket}/run",
         json.dumps(s3.storage_options()), str(tmp_path / "cache-child")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **s3.env()},
    )
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(child.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    reader.join(timeout=120)
    try:
        assert line == ["PART\n"], child.stderr.read() if child.poll() is not None else "no part uploaded in time"  # type: ignore[union-attr]
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    out = rm.remote(f"s3://{bucket}/run", s3.storage_options())
    assert mk.checkpoint_folders(out, "epoch") == {"epoch_0": True, "epoch_1": False}
    assert _open_uploads(fs, bucket), "the child was killed with its multipart uploads open"
    with pytest.MonkeyPatch.context() as mp:
        for k, v in s3.env().items():
            mp.setenv(k, v)
        report = verify(f"s3://{bucket}/run/epoch_1")
        assert not report.ok and any(p.kind == "incomplete" for p in report.problems)
        assert verify(f"s3://{bucket}/run/epoch_0").ok
    resumed = _ckpt(s3, str(local), names, f"s3://{bucket}/run", tmp_path / "cache2", should_load_recipe_state=True)
    assert resumed._checkpoint_paths[0].parent.name == "epoch_0"
    # the next save removes what the dead one left, and aborts its uploads
    _save_epochs(s3, bucket, hf, tmp_path / "cache", [2])
    assert mk.checkpoint_folders(out, "epoch") == {"epoch_0": True, "epoch_2": True}
    assert _open_uploads(fs, bucket) == []


# ------------------------------------------------------------------------------------ failures


def test_403_on_one_part_raises_naming_the_url_and_aborts(s3, fs, bucket, hf, tmp_path) -> None:
    local, names = hf
    s3.proxy.fault = lambda method, path: "403" if method == "PUT" and "partNumber=2&" in path + "&" else None
    ck = _ckpt(s3, str(local), names, f"s3://{bucket}/run", tmp_path / "cache")
    with pytest.raises(CheckpointIOError, match="part 2") as e:
        ck.save_checkpoint(ck.load_checkpoint(), epoch=0)
    assert e.value.filename.startswith(f"s3://{bucket}/run/epoch_0/")
    assert isinstance(e.value, PermissionError) or e.value.errno == 13
    s3.proxy.fault = None
    assert _open_uploads(fs, bucket) == []
    assert not fs.exists(f"{bucket}/run/epoch_0/{mk.COMPLETE_MARKER}")
    assert _remote_files(fs, f"s3://{bucket}/run", hidden=True) == {}


def test_server_gone_mid_save_raises_and_the_next_save_cleans_up(s3, fs, bucket, hf, tmp_path, monkeypatch) -> None:
    local, names = hf
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)  # s3fs's own retry loop: fail fast
    down = threading.Event()

    def after(req) -> None:
        if req.method == "PUT" and "partNumber=" in req.path:
            down.set()  # from now on the server is unreachable: connections are dropped

    s3.proxy.after = after
    s3.proxy.fault = lambda method, path: "drop" if down.is_set() else None
    ck = FullModelHFCheckpointer(str(local), names, "LLAMA3", f"s3://{bucket}/run", cache_dir=tmp_path / "cache",
                                 storage_options=s3.storage_options(config_kwargs={"retries": {"max_attempts": 1}}))
    with pytest.raises(CheckpointIOError) as e:
        ck.save_checkpoint(ck.load_checkpoint(), epoch=0)
    assert e.value.filename.startswith(f"s3://{bucket}/run")
    s3.proxy.reset()  # the server is back
    out = rm.remote(f"s3://{bucket}/run", s3.storage_options())
    assert mk.checkpoint_folders(out, "epoch") in ({}, {"epoch_0": False})
    ck.save_checkpoint(ck.load_checkpoint(), epoch=0)  # the same process saves again: it takes the folder over
    assert _remote_files(fs, f"s3://{bucket}/run/epoch_0") == _files(local)
    assert _open_uploads(fs, bucket) == []


def test_missing_bucket_names_the_url(s3, hf, tmp_path) -> None:
    local, names = hf
    with pytest.raises(CheckpointIOError) as e:
        _ckpt(s3, "s3://no-such-bucket-here/model", names, str(tmp_path / "out"), tmp_path / "cache")
    assert e.value.filename == "s3://no-such-bucket-here/model"
    ck = _ckpt(s3, str(local), names, "s3://no-such-bucket-here/run", tmp_path / "cache")
    with pytest.raises(CheckpointIOError) as e:
        ck.save_checkpoint(ck.load_checkpoint(), epoch=0)
    assert "s3://no-such-bucket-here/run" in e.value.filename


def test_missing_credentials_names_the_url(s3, fs, bucket, hf, tmp_path, monkeypatch) -> None:
    local, names = hf
    _upload(fs, local, f"s3://{bucket}/model")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(CheckpointIOError, match="(?i)credentials") as e:
        FullModelHFCheckpointer(f"s3://{bucket}/model", names, "LLAMA3", str(tmp_path / "out"),
                                storage_options={"endpoint_url": s3.url, "skip_instance_cache": True},
                                cache_dir=tmp_path / "cache")
    assert e.value.filename == f"s3://{bucket}/model"


def test_403_on_read_names_the_url(s3, fs, bucket, hf, tmp_path) -> None:
    local, names = hf
    _upload(fs, local, f"s3://{bucket}/model")
    s3.proxy.fault = lambda method, path: "403" if method == "GET" and names[1] in path else None
    with pytest.raises(CheckpointIOError) as e:
        _ckpt(s3, f"s3://{bucket}/model", names, str(tmp_path / "out"), tmp_path / "cache")
    assert e.value.filename == f"s3://{bucket}/model/{names[1]}"


# ------------------------------------------------------------------------------------ the command line


@pytest.fixture
def s3_env(s3, monkeypatch, tmp_path):
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("SHARDWISE_CACHE_DIR", str(tmp_path / "cli-cache"))  # not the user's ~/.cache
    return s3


def _cli(*args: str) -> tuple[int, dict]:
    import contextlib
    import io

    from shardwise.cli.app import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["--json", "-q", *args])
    return code, json.loads(buf.getvalue())


def test_inspect_of_a_remote_checkpoint_reads_only_the_headers(s3_env, fs, bucket, hf) -> None:
    from shardwise.report import inspect_checkpoint

    local, names = hf
    _upload(fs, local, f"s3://{bucket}/model")
    s3_env.proxy.reset()
    code, remote_report = _cli("inspect", f"s3://{bucket}/model", "--tensors")
    assert code == 0
    local_report = inspect_checkpoint(str(local), tensors=True).to_dict()
    for key in ("files", "problems"):
        assert remote_report[key] == local_report[key]
    assert remote_report["tensors"] == local_report["tensors"] and remote_report["index"] == local_report["index"]
    gets = [r for r in s3_env.proxy.requests if r.method == "GET" and "model-0" in r.path]
    assert len(gets) == 2 * len(names)  # the 8-byte length, then exactly the header
    headers = sum(8 + int.from_bytes((local / n).read_bytes()[:8], "little") for n in names)
    data = sum((local / n).stat().st_size for n in names)
    # all the server sent: listing, index, two ranged reads per shard (with HTTP framing)
    assert s3_env.proxy.sent < headers + 64 * 1024 < data / 100


def test_verify_of_remote_folders_follows_the_marker_rule(s3_env, fs, bucket, hf, tmp_path) -> None:
    local, names = hf
    _upload(fs, local, f"s3://{bucket}/model")
    assert _cli("verify", f"s3://{bucket}/model")[0] == 0  # not a shardwise save: no marker needed
    code, report = _cli("verify", f"s3://{bucket}/model", "--checksums")
    assert code == 0 and all(f["sha256"] for f in report["files"])
    _upload(fs, local, f"s3://{bucket}/run/epoch_3")  # looks like a checkpoint, but has no marker
    code, report = _cli("verify", f"s3://{bucket}/run/epoch_3")
    assert code == 1 and [p["kind"] for p in report["problems"]] == ["incomplete"]
    ck = _ckpt(s3_env, str(local), names, f"s3://{bucket}/run", tmp_path / "cache")
    ck.save_checkpoint(ck.load_checkpoint(), epoch=4)
    assert _cli("verify", f"s3://{bucket}/run/epoch_4")[0] == 0
    fs.rm(f"{bucket}/run/epoch_4/{names[1]}")  # a file the marker lists is gone
    code, report = _cli("verify", f"s3://{bucket}/run/epoch_4")
    assert code == 1 and "incomplete" in {p["kind"] for p in report["problems"]}


def test_convert_roundtrip_and_compare_on_urls(s3_env, fs, bucket, hf, tmp_path) -> None:
    local, names = hf
    _upload(fs, local, f"s3://{bucket}/model")
    code, report = _cli("convert", f"s3://{bucket}/model", f"s3://{bucket}/tune", "--to", "tune",
                        "--model-type", "LLAMA3")
    assert code == 0, report
    assert (report["path"], report["output"]) == (f"s3://{bucket}/model", f"s3://{bucket}/tune")
    assert fs.exists(f"{bucket}/tune/{mk.COMPLETE_MARKER}")
    code, report = _cli("convert", f"s3://{bucket}/tune", str(tmp_path / "hf"), "--to", "hf")
    assert code == 0, report
    assert _files(tmp_path / "hf") == _files(local)
    code, report = _cli("convert", str(tmp_path / "hf"), f"s3://{bucket}/tune", "--to", "tune",
                        "--model-type", "LLAMA3")
    assert code == 2 and "not empty" in report["error"]["message"]
    assert _cli("compare", str(local), f"s3://{bucket}/model")[0] == 0
    code, report = _cli("roundtrip", f"s3://{bucket}/model", "--model-type", "LLAMA3")
    assert code == 0, report


def test_adapters_recipe_state_and_side_files_match_a_local_save(s3, fs, bucket, tmp_path) -> None:
    """The remote folder holds exactly the bytes a local save writes (model, adapter in both formats,
    adapter config, side files), and a resume from it gets the adapter and the recipe state back."""
    from test_adapters import llama_adapter

    spec = LlamaSpec(layers=2, heads=4, kv_heads=2, head_dim=16, hidden=48, intermediate=40, vocab=37,
                     dtype=torch.float32)
    sd = llama_state_dict(spec)
    names = write_hf_checkpoint(tmp_path / "base", sd, [list(sd)], spec.config())
    (tmp_path / "base" / "original_repo_id.json").write_text(json.dumps({"repo_id": "meta/tiny"}))
    results = {}
    for where, out in [("local", str(tmp_path / "out")), ("remote", f"s3://{bucket}/run")]:
        ck = _ckpt(s3, str(tmp_path / "base"), names, out, tmp_path / f"cache-{where}")
        state = ck.load_checkpoint()
        state["adapter"] = llama_adapter()
        state["adapter_config"] = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj"], "peft_type": "LORA"}
        state["seed"] = 3
        ck.save_checkpoint(state, epoch=0, intermediate_checkpoint=True)
        results[where] = state
    local = _files(tmp_path / "out" / "epoch_0")
    expected = {"adapter_model.pt", "adapter_model.safetensors", "adapter_config.json", "original_repo_id.json"}
    assert expected <= set(local)
    assert _remote_files(fs, f"s3://{bucket}/run/epoch_0") == local
    resumed = _ckpt(s3, str(tmp_path / "base"), names, f"s3://{bucket}/run", tmp_path / "cache-resume",
                    should_load_recipe_state=True).load_checkpoint()
    assert resumed["seed"] == 3
    assert resumed["adapter"].keys() == results["remote"]["adapter"].keys()
    assert all(torch.equal(resumed["adapter"][k], v) for k, v in results["remote"]["adapter"].items())


def test_headers_only_commands_on_urls_do_not_import_torch(s3_env, fs, bucket, hf) -> None:
    local, names = hf
    _upload(fs, local, f"s3://{bucket}/model")
    code = ("import sys; from shardwise.cli import main; "
            f"rc = [main(['-q', c, 's3://{bucket}/model']) for c in ('inspect', 'verify')]; "
            "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(max(rc))")
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, **s3_env.env()}, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"s3://{bucket}/model: 2 shards" in done.stdout


def test_any_fsspec_store_round_trips_byte_identical(hf, tmp_path) -> None:
    """Stores without S3's multipart API (here fsspec's in-memory one) get streamed writers: the same
    bytes, the same marker rule."""
    import fsspec

    local, names = hf
    url = f"memory://shardwise-{uuid.uuid4().hex[:8]}"
    up = FullModelHFCheckpointer(str(local), names, "LLAMA3", f"{url}/run", cache_dir=tmp_path / "cache")
    up.save_checkpoint(up.load_checkpoint(), epoch=0)
    mem = fsspec.filesystem("memory")
    base = url.removeprefix("memory://") + "/run/epoch_0/"
    got = {k.split(base, 1)[1]: mem.cat_file(k) for k in mem.find(base)}
    assert got.pop(mk.COMPLETE_MARKER) and got == _files(local)
    assert _save_locally(f"{url}/run/epoch_0", names, tmp_path / "out", tmp_path / "cache2") == _files(local)


def test_a_side_file_deleted_remotely_is_not_copied_from_the_cache(s3, fs, bucket, hf, tmp_path) -> None:
    local, names = hf
    _upload(fs, local, f"s3://{bucket}/model")
    cache = tmp_path / "cache"
    _ckpt(s3, f"s3://{bucket}/model", names, str(tmp_path / "out"), cache).load_checkpoint()
    fs.rm(f"{bucket}/model/tokenizer.json")
    ck = _ckpt(s3, f"s3://{bucket}/model", names, str(tmp_path / "out"), cache)
    ck.save_checkpoint(ck.load_checkpoint(), epoch=0)
    assert not (tmp_path / "out" / "epoch_0" / "tokenizer.json").exists()
    assert (tmp_path / "out" / "epoch_0" / "config.json").exists()


@settings(max_examples=80, deadline=None)
@given(st.binary(min_size=0, max_size=24), st.integers(0, 600), st.integers(-3, 3), st.data())
def test_ranged_header_reads_judge_like_local_reads(junk: bytes, cut: int, size_delta: int, data) -> None:
    """A remote header read (``remote.read_header``: the length prefix, then the header, validated by
    ``_core.parse_header``) accepts and refuses exactly what ``_core.read_header`` does on the same
    bytes on disk (truncations, bad lengths, trailing bytes, junk), with the same message."""
    import tempfile

    import fsspec

    from shardwise import _core

    tensors = {"a": torch.arange(6, dtype=torch.float32), "b": torch.ones(2, 3, dtype=torch.bfloat16)}
    with tempfile.TemporaryDirectory() as d:
        from safetensors.torch import save_file

        save_file(tensors, f"{d}/ok.safetensors")
        good = Path(f"{d}/ok.safetensors").read_bytes()
        choice = data.draw(st.sampled_from(["cut", "junk-tail", "junk-head", "length"]))
        if choice == "cut":
            raw = good[: min(cut, len(good))]
        elif choice == "junk-tail":
            raw = good + junk
        elif choice == "junk-head":
            raw = junk + good[len(junk):]
        else:
            n = int.from_bytes(good[:8], "little") + size_delta
            raw = max(n, 0).to_bytes(8, "little") + good[8:]
        path = Path(f"{d}/x.safetensors")
        path.write_bytes(raw)
        name = f"shardwise-prop-{uuid.uuid4().hex[:8]}/x.safetensors"
        mem = fsspec.filesystem("memory")
        mem.pipe_file(name, raw)
        try:
            r = rm.remote(f"memory://{name}")
            outcomes = []
            for read in (lambda: _core.read_header(str(path)), lambda: rm.read_header(r, len(raw))):
                try:
                    h = read()
                    outcomes.append(("ok", h.raw, list(h.names), list(h.offsets)))
                except ValueError as e:
                    outcomes.append(("error", type(e).__name__, str(e).split(": ", 1)[-1]))
            assert outcomes[0] == outcomes[1]
        finally:
            mem.rm(name)
