"""The index keeps everything it had; a flawed input is the input's problem; a stray shard the index
does not list is a warning, not an error (as transformers follows the index)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from ckpt_factory import LlamaSpec, llama_state_dict, split_keys, write_hf_checkpoint
from shardwise import FullModelHFCheckpointer, compare, roundtrip, verify
from shardwise.cli import app as cli
from shardwise.report.tunedir import convert_checkpoint

INDEX = "model.safetensors.index.json"
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
extra_names = st.text(st.characters(codec="ascii", categories=["L", "N"]), min_size=1, max_size=8)


def _hf(folder: Path, seed: int = 0) -> None:
    spec = LlamaSpec()
    sd = llama_state_dict(spec, seed)
    keys = list(sd)
    write_hf_checkpoint(folder, sd, split_keys(keys, [len(keys) // 3, 2 * len(keys) // 3]), spec.config(),
                        {"format": "pt"})


def _edit_index(folder: Path, edit) -> bytes:
    index = json.loads((folder / INDEX).read_text())
    edit(index)
    raw = (json.dumps(index, indent=2, sort_keys=True) + "\n").encode()
    (folder / INDEX).write_bytes(raw)
    return raw


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(top=st.dictionaries(extra_names.filter(lambda k: k not in ("metadata", "weight_map")), json_values,
                           min_size=1, max_size=3),
       meta=st.dictionaries(extra_names.filter(lambda k: k not in ("total_size", "total_parameters")), json_values,
                            max_size=3))
def test_index_keeps_unknown_keys_and_fields(tmp_path_factory: pytest.TempPathFactory, top: dict, meta: dict) -> None:
    root = tmp_path_factory.mktemp("idx")
    _hf(root / "hf")
    raw = _edit_index(root / "hf", lambda i: (i.update(top), i["metadata"].update(meta)))
    names = sorted(set(json.loads(raw)["weight_map"].values()))
    ck = FullModelHFCheckpointer(str(root / "hf"), names, "LLAMA3", str(root / "out"))
    state = ck.load_checkpoint()
    ck.save_checkpoint(state, epoch=0)
    assert (root / "out" / "epoch_0" / INDEX).read_bytes() == raw  # unchanged content: the original bytes
    # a new key changes the content: the unknown parts still survive
    import torch

    model = dict(state["model"])
    model["new_head.weight"] = torch.zeros(3, 48, dtype=torch.bfloat16)
    from shardwise.convert import llama

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(llama.LlamaConverter, "tune_to_hf_ops",
                   lambda self, tune, cfg, aside, orig=llama.LlamaConverter.tune_to_hf_ops:
                   orig(self, {k: v for k, v in tune.items() if k != "new_head.weight"}, cfg, aside)
                   + [llama.identity_op("new_head.weight", tune["new_head.weight"])])
        ck.save_checkpoint({"model": model}, epoch=1)
    out = json.loads((root / "out" / "epoch_1" / INDEX).read_text())
    assert {k: out[k] for k in top} == top and all(out["metadata"][k] == v for k, v in meta.items())
    assert "new_head.weight" in out["weight_map"]
    # the CLI's round trip reproduces the index byte for byte too
    report = roundtrip(root / "hf", "LLAMA3")
    assert report.ok and report.details["byte_identical"], report.summary()


def test_compare_never_calls_different_content_the_same(tmp_path: Path) -> None:
    _hf(tmp_path / "a")
    _hf(tmp_path / "b")
    _edit_index(tmp_path / "a", lambda i: i.update(extra={"x": 1}))
    _edit_index(tmp_path / "b", lambda i: i.update(extra={"x": 2}))
    report = compare(tmp_path / "a", tmp_path / "b")
    assert not report.ok and report.details["index"]["status"] == "different"
    assert not any("same JSON content" in p.message for p in report.problems)
    assert any("extra" in p.message for p in report.problems)


FLAWS = {
    "total_size": lambda i: i["metadata"].update(total_size=i["metadata"]["total_size"] + 16),
    "total_parameters": lambda i: i["metadata"].update(total_parameters=12345),
    "wrong_shard": lambda i: i["weight_map"].update({"model.norm.weight": "model-00001-of-00003.safetensors"}),
    "unlisted_tensor": lambda i: i["weight_map"].pop("model.norm.weight"),
    "phantom_entry": lambda i: i["weight_map"].update({"model.ghost.weight": "model-00002-of-00003.safetensors"}),
}


@pytest.mark.parametrize("flaw", sorted(FLAWS))
def test_flawed_input_index_is_blamed_on_the_input(tmp_path: Path, flaw: str) -> None:
    """verify flags the input; roundtrip passes (no regression) with an input-inconsistent warning."""
    _hf(tmp_path / "hf")
    if flaw == "total_parameters":  # a correct one first: transformers >= 4.5x writes it
        _edit_index(tmp_path / "hf", lambda i: i["metadata"].update(total_parameters=sum(
            t.numel() for t in llama_state_dict(LlamaSpec()).values())))
        assert roundtrip(tmp_path / "hf", "LLAMA3").details["byte_identical"]
    _edit_index(tmp_path / "hf", FLAWS[flaw])
    assert not verify(tmp_path / "hf").ok
    report = roundtrip(tmp_path / "hf", "LLAMA3")
    assert report.ok and not report.problems, report.summary()
    assert report.warnings and {w.kind for w in report.warnings} == {"input-inconsistent"}
    assert report.details["index"]["status"] == "corrected" and not report.details["byte_identical"]


def test_stray_shard_is_a_warning_and_ignored(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An older save left model-00001-of-00002.safetensors (repeating some tensors) next to a 3-shard
    save whose index does not list it: roundtrip and convert follow the index, with a warning."""
    _hf(tmp_path / "hf")
    spec = LlamaSpec()
    old = llama_state_dict(spec, seed=7)
    save_file({k: old[k] for k in list(old)[:5]}, tmp_path / "hf" / "model-00001-of-00002.safetensors",
              metadata={"format": "pt"})
    assert any(p.kind == "unlisted-file" for p in verify(tmp_path / "hf").problems)  # integrity: still flagged
    code = cli.main(["roundtrip", str(tmp_path / "hf"), "--model-type", "LLAMA3", "--json", "-q"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0 and doc["ok"] and doc["byte_identical"], doc["problems"]
    assert [(w["kind"], w["file"]) for w in doc["warnings"]] == [("unlisted-file", "model-00001-of-00002.safetensors")]
    report = convert_checkpoint(tmp_path / "hf", tmp_path / "tune", "LLAMA3", to="tune")
    assert [w.file for w in report.warnings] == ["model-00001-of-00002.safetensors"]
    assert "ignored" in report.summary()
    assert not (tmp_path / "tune" / "model-00001-of-00002.safetensors").exists()
