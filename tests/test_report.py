"""The Python API for regression suites: ``shardwise.roundtrip`` / ``verify`` / ``compare`` (and the
``convert`` they are built on) find every difference and name the shard, tensor and byte range."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import shardwise
from ckpt_factory import LlamaSpec, llama_state_dict, split_keys, write_hf_checkpoint
from shardwise import _core
from shardwise.convert import _REGISTRY
from shardwise.convert.llama import LLAMA_TABLE
from shardwise.report import PROBLEM_KINDS, compare, compute_checksums, inspect_checkpoint, roundtrip, verify
from shardwise.report.origin import ASIDE_NAME, ORIGIN_NAME
from shardwise.report.progress import Progress
from shardwise.report.tunedir import convert_checkpoint
from shardwise.sample import write_sample

INDEX = "model.safetensors.index.json"
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))


def _llama(folder: Path, shards: int = 3, **spec_kw: object) -> Path:
    spec = LlamaSpec(**spec_kw)  # type: ignore[arg-type]
    sd = llama_state_dict(spec, seed=7)
    keys = list(sd)
    cuts = [len(keys) * i // shards for i in range(1, shards)]
    write_hf_checkpoint(folder, sd, split_keys(keys, cuts), spec.config(), {"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _llama(tmp_path_factory.mktemp("hf") / "ckpt")


@pytest.fixture
def copy(hf: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(hf, out)
    return out


def _weight_map(folder: Path) -> dict[str, str]:
    return json.loads((folder / INDEX).read_text())["weight_map"]


def _flip(path: Path, offset: int, bit: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ (1 << bit)]))


def _tensor_at(path: Path, offset: int) -> tuple[str, int] | None:
    h = _core.read_header(str(path))
    rel = offset - h.data_start
    for name, (b, e) in zip(h.names, h.offsets):
        if b <= rel < e:
            return name, rel - b
    return None


def _rewrite(path: Path, edit) -> None:  # type: ignore[no-untyped-def]
    tensors = load_file(str(path))
    save_file(edit(tensors), str(path), metadata={"format": "pt"})


# --------------------------------------------------------------------------------------------- roundtrip


def test_roundtrip_sample_is_byte_identical() -> None:
    report = shardwise.roundtrip()
    assert report.ok, report.summary()
    assert report.details["sample"] and report.details["byte_identical"]
    assert report.stats["shards"] == 2 and report.details["index"]["status"] == "identical"
    assert "byte-identical: yes" in report.summary()


def test_roundtrip_folder(hf: Path) -> None:
    report = shardwise.roundtrip(hf, model_type="LLAMA3")
    assert report.ok, report.summary()
    assert [f["status"] for f in report.files] == ["identical"] * 3
    assert report.stats["tensors"] == len(_weight_map(hf))
    assert report.exit_code == 0


def test_roundtrip_needs_model_type_for_a_folder(hf: Path) -> None:
    with pytest.raises(ValueError, match="model_type"):
        roundtrip(hf)
    with pytest.raises(KeyError, match="NOPE"):
        roundtrip(hf, "NOPE")


def test_roundtrip_keep(hf: Path, tmp_path: Path) -> None:
    report = roundtrip(hf, "LLAMA2", keep=tmp_path / "kept")
    assert report.ok
    assert (tmp_path / "kept" / "tune" / ORIGIN_NAME).is_file()
    assert (tmp_path / "kept" / "hf" / INDEX).read_bytes() == (hf / INDEX).read_bytes()


@SETTINGS
@given(data=st.data())
def test_roundtrip_detects_a_flipped_bit_in_any_shard(hf: Path, data: st.DataObject) -> None:
    """A bit flipped in the torchtune intermediate comes back as one differing byte of the right HF
    tensor in the right HF shard (q/k rows are permuted, so the position moves inside the tensor)."""
    seen: dict[str, object] = {}

    def tamper(tune: Path) -> None:
        names = sorted(p.name for p in tune.glob("model-*.safetensors"))
        name = data.draw(st.sampled_from(names), label="shard")
        h = _core.read_header(str(tune / name))
        offset = data.draw(st.integers(h.data_start, h.file_size - 1), label="offset")
        bit = data.draw(st.integers(0, 7), label="bit")
        seen["tune"] = _tensor_at(tune / name, offset)
        _flip(tune / name, offset, bit)

    report = roundtrip(hf, "LLAMA3", tamper=tamper)
    assert not report.ok and report.exit_code == 1
    tune_key, rel = seen["tune"]  # type: ignore[misc]
    hf_key = LLAMA_TABLE.inverse().map(tune_key)
    shard = _weight_map(hf)[hf_key]
    assert [p.kind for p in report.problems] == ["data"], report.summary()
    p = report.problems[0]
    assert (p.file, p.tensor) == (shard, hf_key)
    assert p.tensor_range is not None and p.tensor_range[1] - p.tensor_range[0] == 1
    if "q_proj" not in hf_key and "k_proj" not in hf_key:
        assert p.tensor_range == (rel, rel + 1)
    assert p.byte_range is not None and _tensor_at(hf / shard, p.byte_range[0]) == (hf_key, p.tensor_range[0])
    entry = next(f for f in report.files if f["name"] == shard)
    assert entry["status"] == "different" and entry["first_difference"]["tensor"] == hf_key
    assert shard in report.summary() and hf_key in report.summary()


def test_roundtrip_detects_a_renamed_tune_tensor(hf: Path) -> None:
    def tamper(tune: Path) -> None:
        name = _weight_map(hf)["model.layers.1.mlp.up_proj.weight"]
        _rewrite(tune / name, lambda t: {("layers.9.mlp.w3.weight" if k == "layers.1.mlp.w3.weight" else k): v
                                          for k, v in t.items()})

    report = roundtrip(hf, "LLAMA3", tamper=tamper)
    assert not report.ok
    text = report.summary()
    assert "model.layers.1.mlp.up_proj.weight" in text and "model.layers.9.mlp.up_proj.weight" in text
    # the new key went to a new shard: the tensors are paired by name, the layout change is reported
    assert {"missing-tensor", "extra-tensor", "index", "layout"} <= {p.kind for p in report.problems}


def test_roundtrip_of_an_inconsistent_index_blames_the_input(copy: Path) -> None:
    """A wrong total_size in the input is the input's problem: verify flags it; roundtrip passes (no
    regression) and reports it apart, as a warning: corrected in the output."""
    index = json.loads((copy / INDEX).read_text())
    index["metadata"]["total_size"] += 2
    (copy / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    assert [p.kind for p in verify(copy).problems] == ["total-size"]
    report = roundtrip(copy, "LLAMA3")
    assert report.ok and not report.problems and report.details["byte_identical"] is False
    (w,) = report.warnings
    assert w.kind == "input-inconsistent" and "total_size" in w.message and "corrected in the output" in w.message
    assert report.details["index"]["status"] == "corrected"
    assert "corrected in the output" in report.summary()


def test_roundtrip_bin_input_compares_tensors(tmp_path: Path) -> None:
    spec = LlamaSpec(inv_freq=True, dtype=torch.float16)
    sd = llama_state_dict(spec)
    src = tmp_path / "bin"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(spec.config()))
    keys = list(sd)
    weight_map = {}
    for i, part in enumerate(split_keys(keys, [len(keys) // 2]), 1):
        name = f"pytorch_model-{i:05d}-of-00002.bin"
        torch.save({k: sd[k] for k in part}, src / name)
        weight_map.update(dict.fromkeys(part, name))
    total = sum(t.numel() * t.element_size() for t in sd.values())
    (src / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                 "weight_map": weight_map}))
    report = roundtrip(src, "LLAMA2")
    assert report.ok, report.summary()
    assert not report.details["byte_identical"]
    assert {f["status"] for f in report.files} == {"equal-tensors"}
    assert report.stats["aside"] == 2  # the inv_freq buffers travel in shardwise-aside.safetensors


# ----------------------------------------------------------------------------------------------- convert


def _family_cases() -> list[str]:
    return sorted(m.name for m in _REGISTRY)


@pytest.mark.parametrize("model_type", _family_cases())
def test_convert_to_tune_and_back_is_exact_for_every_model_type(model_type: str, tmp_path_factory) -> None:
    fam = pytest.importorskip("test_convert_families")
    if model_type not in fam.FAMILIES:
        pytest.skip(f"no synthetic builder for {model_type} in test_convert_families")

    @settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck))
    @given(p=fam.params(model_type), data=st.data())
    def check(p, data) -> None:  # type: ignore[no-untyped-def]
        sd, cfg = fam.FAMILIES[model_type].make(p)
        keys = list(sd)
        cuts = data.draw(st.lists(st.integers(1, max(1, len(keys) - 1)), max_size=3), label="cuts")
        tmp = tmp_path_factory.mktemp(model_type)
        write_hf_checkpoint(tmp / "hf", sd, split_keys(keys, cuts), cfg, {"format": "pt"})
        to_tune = convert_checkpoint(tmp / "hf", tmp / "tune", model_type, to="tune")
        assert to_tune.stats["input_tensors"] == len(keys)
        back = convert_checkpoint(tmp / "tune", tmp / "back", to="hf")  # model type from the origin file
        assert back.details["model_type"] == model_type
        report = compare(tmp / "hf", tmp / "back")
        assert report.ok, report.summary()
        assert {f["status"] for f in report.files} == {"identical"}
        assert (tmp / "back" / "config.json").read_bytes() == (tmp / "hf" / "config.json").read_bytes()
        shutil.rmtree(tmp)

    check()


def test_convert_tune_folder_layout(hf: Path, tmp_path: Path) -> None:
    report = convert_checkpoint(hf, tmp_path / "tune", "LLAMA3", to="tune")
    tune = tmp_path / "tune"
    names = sorted(p.name for p in tune.glob("*.safetensors"))
    assert names == sorted(set(_weight_map(hf).values()))
    keys = {k for n in names for k in _core.read_header(str(tune / n)).names}
    assert keys == {LLAMA_TABLE.map(k) for k in _weight_map(hf)}
    origin = json.loads((tune / ORIGIN_NAME).read_text())
    assert origin["model_type"] == "LLAMA3" and origin["source"]["index"]["name"] == INDEX
    assert verify(tune).ok  # the torchtune folder has its own consistent index
    assert {f["role"] for f in report.files} == {"shard", "index", "side", "origin"}


def test_convert_reshard_and_back(hf: Path, tmp_path: Path) -> None:
    small = convert_checkpoint(hf, tmp_path / "tune", "LLAMA3", to="tune", max_shard_size="8kB")
    assert small.stats["shards"] > 3
    assert compare(hf, convert_checkpoint(tmp_path / "tune", tmp_path / "back", to="hf").details["output"]).ok
    fresh = convert_checkpoint(tmp_path / "tune", tmp_path / "fresh", to="hf", max_shard_size="1MB")
    assert fresh.stats["shards"] == 1 and verify(tmp_path / "fresh").ok


def test_convert_tied_embedding_stored_once(tmp_path: Path) -> None:
    fam = pytest.importorskip("test_convert_families")
    sd, cfg = fam.FAMILIES["QWEN2"].make(fam.P(tied=True, lm_head=True))
    keys = list(sd)
    write_hf_checkpoint(tmp_path / "hf", sd, split_keys(keys, [len(keys) // 2]), cfg, {"format": "pt"})
    convert_checkpoint(tmp_path / "hf", tmp_path / "tune", "QWEN2", to="tune")
    aside = json.loads((tmp_path / "tune" / ORIGIN_NAME).read_text())["aside"]
    assert aside["aliases"] == {"model.embed_tokens.weight": "tok_embeddings.weight"}
    assert set(load_file(str(tmp_path / "tune" / ASIDE_NAME))) == {"lm_head.weight"}
    convert_checkpoint(tmp_path / "tune", tmp_path / "back", to="hf")
    assert compare(tmp_path / "hf", tmp_path / "back").ok


def test_convert_publishes_atomically(hf: Path, tmp_path: Path) -> None:
    dst = tmp_path / "out"
    with pytest.raises(shardwise.ConversionError, match="unexpected key"):
        convert_checkpoint(hf, dst, "LLAMA4", to="tune")
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a staging folder is left
    dst.mkdir()
    (dst / "old.txt").write_text("x")
    with pytest.raises(shardwise.CheckpointError, match="not empty"):
        convert_checkpoint(hf, dst, "LLAMA3", to="tune")
    convert_checkpoint(hf, dst, "LLAMA3", to="tune", overwrite=True)
    assert not (dst / "old.txt").exists() and (dst / ORIGIN_NAME).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(ValueError):
        convert_checkpoint(hf, hf / "inside", "LLAMA3", to="tune")


# ------------------------------------------------------------------------------------------------ compare


@SETTINGS
@given(data=st.data())
def test_compare_finds_a_flipped_bit_anywhere(hf: Path, tmp_path_factory, data: st.DataObject) -> None:
    produced = tmp_path_factory.mktemp("flip") / "ckpt"
    shutil.copytree(hf, produced)
    names = sorted(p.name for p in produced.glob("*.safetensors"))
    name = data.draw(st.sampled_from(names), label="shard")
    size = (produced / name).stat().st_size
    offset = data.draw(st.integers(0, size - 1), label="offset")
    where = _tensor_at(hf / name, offset)
    _flip(produced / name, offset, data.draw(st.integers(0, 7), label="bit"))
    report = compare(hf, produced)
    assert not report.ok and report.problems
    entry = next(f for f in report.files if f["name"] == name)
    assert entry["status"] == "different" and entry["first_difference"]["range"] == [offset, offset + 1]
    assert all(p.file == name for p in report.problems), report.summary()
    if where is not None:
        assert [(p.kind, p.tensor, p.byte_range, p.tensor_range) for p in report.problems] == [
            ("data", where[0], (offset, offset + 1), (where[1], where[1] + 1))
        ]
    else:
        assert entry["first_difference"]["region"] == "header"
    shutil.rmtree(produced)


def test_compare_identical(hf: Path, copy: Path) -> None:
    report = compare(hf, copy)
    assert report.ok and report.stats["identical"] == 3 and report.details["index"]["status"] == "identical"


def test_compare_renamed_tensor(hf: Path, copy: Path) -> None:
    name = _weight_map(hf)["model.norm.weight"]
    _rewrite(copy / name, lambda t: {("model.final_norm.weight" if k == "model.norm.weight" else k): v
                                     for k, v in t.items()})
    report = compare(hf, copy)
    got = {(p.kind, p.file, p.tensor) for p in report.problems}
    assert got == {("missing-tensor", name, "model.norm.weight"), ("extra-tensor", name, "model.final_norm.weight")}


def test_compare_changed_dtype(hf: Path, copy: Path) -> None:
    key = "model.layers.0.self_attn.v_proj.weight"
    name = _weight_map(hf)[key]
    _rewrite(copy / name, lambda t: {k: (v.float() if k == key else v) for k, v in t.items()})
    report = compare(hf, copy)
    assert [(p.kind, p.file, p.tensor) for p in report.problems] == [("dtype", name, key)]
    assert "BF16 became F32" in report.problems[0].message


def test_compare_dropped_key(hf: Path, copy: Path) -> None:
    key = "model.layers.1.input_layernorm.weight"
    name = _weight_map(hf)[key]
    _rewrite(copy / name, lambda t: {k: v for k, v in t.items() if k != key})
    index = json.loads((copy / INDEX).read_text())
    del index["weight_map"][key]
    (copy / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    report = compare(hf, copy)
    kinds = {(p.kind, p.tensor) for p in report.problems}
    assert ("missing-tensor", key) in kinds and ("index", key) in kinds


def test_compare_edited_index(hf: Path, copy: Path) -> None:
    index = json.loads((copy / INDEX).read_text())
    wm = index["weight_map"]
    key = "model.embed_tokens.weight"
    other = next(v for v in wm.values() if v != wm[key])
    wm[key] = other
    (copy / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    report = compare(hf, copy)
    assert [(p.kind, p.tensor) for p in report.problems] == [("index", key)]
    assert other in report.problems[0].message
    assert report.details["index"]["status"] == "different"


def test_compare_missing_and_extra_files(hf: Path, copy: Path) -> None:
    names = sorted(set(_weight_map(hf).values()))
    (copy / names[-1]).rename(copy / "model-00009-of-00009.safetensors")
    report = compare(hf, copy)
    assert {(p.kind, p.file) for p in report.problems} == {
        ("missing-file", names[-1]), ("extra-file", "model-00009-of-00009.safetensors"),
    }


# ------------------------------------------------------------------------------------------------- verify


def test_verify_clean(hf: Path) -> None:
    report = shardwise.verify(hf)
    assert report.ok, report.summary()
    assert report.stats["tensors"] == len(_weight_map(hf))
    assert report.details["index"]["total_size"] == report.stats["bytes"]


def _edit_index(folder: Path, edit) -> None:  # type: ignore[no-untyped-def]
    index = json.loads((folder / INDEX).read_text())
    edit(index)
    (folder / INDEX).write_text(json.dumps(index))


def test_verify_finds_structure_problems(copy: Path) -> None:
    wm = _weight_map(copy)
    names = sorted(set(wm.values()))
    key_a = next(k for k, v in wm.items() if v == names[0])
    key_b = next(k for k, v in wm.items() if v == names[1])

    def edit(index):  # type: ignore[no-untyped-def]
        index["weight_map"][key_a] = names[1]  # wrong shard
        index["weight_map"]["ghost.weight"] = names[0]  # not in any shard
        del index["weight_map"][key_b]  # unlisted tensor
        index["metadata"]["total_size"] = 1

    _edit_index(copy, edit)
    shutil.copy(copy / names[0], copy / "model-extra.safetensors")  # unlisted file, duplicate tensors
    report = verify(copy)
    got = {(p.kind, p.tensor) for p in report.problems}
    assert {("wrong-shard", key_a), ("missing-tensor", "ghost.weight"), ("unlisted-tensor", key_b),
            ("total-size", None), ("unlisted-file", None), ("duplicate-tensor", key_a)} <= got
    assert {p.kind for p in report.problems} <= set(PROBLEM_KINDS)


def test_verify_missing_and_truncated_shards(copy: Path) -> None:
    names = sorted(set(_weight_map(copy).values()))
    (copy / names[0]).unlink()
    with open(copy / names[1], "r+b") as f:
        f.truncate(f.seek(0, 2) - 3)
    report = verify(copy)
    got = {(p.kind, p.file) for p in report.problems}
    assert ("missing-file", names[0]) in got and ("unreadable", names[1]) in got
    assert any("past the end" in p.message for p in report.problems)


def test_verify_manifest(copy: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "pins.json"
    first = verify(copy, write_manifest=manifest)
    assert first.ok and all(f["sha256"] for f in first.files)
    assert verify(copy, against=manifest).ok
    name = sorted(set(_weight_map(copy).values()))[1]
    _flip(copy / name, (copy / name).stat().st_size - 1, 0)
    report = verify(copy, against=manifest)
    assert [(p.kind, p.file) for p in report.problems] == [("checksum", name)]
    with pytest.raises(shardwise.CheckpointError, match="manifest"):
        verify(copy, against=copy / INDEX)


def test_checksums_match_hashlib(hf: Path) -> None:
    import hashlib

    names = sorted(set(_weight_map(hf).values()))
    sums = compute_checksums(hf, names)
    assert sums == {n: hashlib.sha256((hf / n).read_bytes()).hexdigest() for n in names}


def test_verify_missing_path_raises(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        verify(tmp_path / "nope")


# ------------------------------------------------------------------------------------------------ inspect


def test_inspect_numeric_order_and_tensors(tmp_path: Path) -> None:
    t = {"a": torch.zeros(2, dtype=torch.bfloat16)}
    for n in (10, 2, 1):
        save_file(t, str(tmp_path / f"model-{n}-of-10.safetensors"), metadata={"format": "pt"})
    report = inspect_checkpoint(tmp_path, tensors=True)
    assert [f["name"] for f in report.files] == [f"model-{n}-of-10.safetensors" for n in (1, 2, 10)]
    assert report.details["tensors"][0] == {"name": "a", "dtype": "BF16", "shape": [2], "offsets": [0, 4],
                                            "file": "model-1-of-10.safetensors"}
    assert {p.kind for p in report.problems} == {"index", "duplicate-tensor"}


def test_inspect_malformed_raises(tmp_path: Path) -> None:
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(shardwise.HeaderError):
        inspect_checkpoint(tmp_path / "bad.safetensors")


def test_sample_is_deterministic(tmp_path: Path) -> None:
    a, b = write_sample(tmp_path / "a"), write_sample(tmp_path / "b")
    for p in sorted(a.iterdir()):
        assert p.read_bytes() == (b / p.name).read_bytes()
    assert verify(a).ok


# ----------------------------------------------------------------------------------------------- progress


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_only_on_a_tty() -> None:
    tty, pipe = _Tty(), io.StringIO()
    for stream in (tty, pipe):
        with Progress(10**9, "sha256 model-00001-of-00002.safetensors", delay=0, interval=0, stream=stream) as bar:
            bar.update(5 * 10**8)
    drawn = tty.getvalue().split("\r")
    line = next(d for d in drawn if "50%" in d)
    assert "sha256 model-00001-of-00002.safetensors" in line and "500M/1.00G" in line and "B/s" in line
    assert "<" in line  # elapsed<ETA
    assert drawn[-1] == "" and drawn[-2].strip() == ""  # erased: the next output starts on a clean line
    assert pipe.getvalue() == ""
    quiet = _Tty()
    with Progress(100, "work", delay=0, interval=0, stream=quiet, enabled=False) as bar:
        bar.update(100)
    assert quiet.getvalue() == ""


def test_progress_follows_the_bytes_a_native_writer_writes(tmp_path: Path) -> None:
    """``watch_writes`` counts what this process writes (a writer that reports nothing itself)."""
    from shardwise.report.progress import written_bytes

    if written_bytes() is None:
        pytest.skip("no /proc/self/io")
    with Progress(10**8, "write", delay=0, stream=_Tty()) as bar, bar.watch_writes(interval=0.01):
        with open(tmp_path / "f", "wb", buffering=0) as f:
            for _ in range(4):
                f.write(b"x" * 10**6)
    assert bar.done >= 4 * 10**6


def test_roundtrip_also_checks_the_checkpointer_path(monkeypatch):
    """``roundtrip`` runs FullModelHFCheckpointer load → save too: a key lost only on that path fails it."""
    import shardwise.checkpointer.facade as ckmod
    from shardwise import roundtrip

    real = ckmod.plan_shards

    def lossy(ops, *args, **kwargs):
        return real([op for op in ops if op.key != "model.norm.weight"], *args, **kwargs)

    monkeypatch.setattr(ckmod, "plan_shards", lossy)
    report = roundtrip()
    assert not report.ok
    assert any("FullModelHFCheckpointer" in p.message for p in report.problems), report.summary()
