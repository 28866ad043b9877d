"""torchtune 0.6.1 peer behaviours (reference §10/§11) and the bug fixes of DESIGN.md, Llama family."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckpt_factory import LlamaSpec, llama_state_dict, split_keys, write_hf_checkpoint
from shardwise import CheckpointError, ConfigError, FormattedCheckpointFiles, FullModelHFCheckpointer, ModelType
from shardwise.checkpointer.files import check_outdir_not_in_ckptdir, copy_files, get_largest_iter_folder

CFG = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 4}


def _peer_llama2(tmp_path: Path, n_files: int = 1) -> tuple[Path, list[dict], list[str]]:
    """The peer fixtures: fp16 weights in torch.save .pt files with inv_freq, absolute paths."""
    spec = LlamaSpec(layers=2, heads=4, kv_heads=4, head_dim=16, hidden=64, intermediate=256, vocab=100,
                     dtype=torch.float16, inv_freq=True)
    sd = llama_state_dict(spec, 16)
    ckpt = tmp_path / "checkpoint_dir"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(CFG))
    layer1 = [k for k in sd if k.startswith("model.layers.1.")]
    first = {k: v for k, v in sd.items() if k not in layer1}
    parts = [first, {k: sd[k] for k in layer1}] if n_files == 2 else [sd]
    paths = []
    for i, part in enumerate(parts, 1):
        p = ckpt / f"llama2_hf_checkpoint_{i:02d}.pt"
        torch.save(part, p)
        paths.append(str(p))
    return ckpt, parts, paths


def test_single_pt_file_load_save(tmp_path):
    ckpt, (orig,), paths = _peer_llama2(tmp_path)
    ck = FullModelHFCheckpointer(str(ckpt), paths, "LLAMA2", str(tmp_path / "output_dir"))
    state = ck.load_checkpoint()
    assert len(state["model"]) + 2 == len(orig)  # the two inv_freq buffers are kept aside
    assert all(k in ck._weight_map for k in orig)
    ck.save_checkpoint(state, epoch=1)
    out = tmp_path / "output_dir" / "epoch_1" / "llama2_hf_checkpoint_01.safetensors"
    written = load_file(str(out))
    # fix of torchtune: nothing is lost, inv_freq included; same tensors, same dtypes
    assert set(written) == set(orig)
    assert all(torch.equal(written[k], orig[k]) for k in orig)
    assert not (out.parent / "model.safetensors.index.json").exists()  # one file: no index, like HF


def test_multiple_files_partition_follows_sources(tmp_path):
    ckpt, parts, paths = _peer_llama2(tmp_path, 2)
    ck = FullModelHFCheckpointer(str(ckpt), list(reversed(paths)), "LLAMA2", str(tmp_path / "out"))
    state = ck.load_checkpoint()
    assert ck._weight_map["model.embed_tokens.weight"] == "0001"
    assert ck._weight_map["model.layers.1.mlp.up_proj.weight"] == "0002"
    ck.save_checkpoint(state, epoch=1)
    folder = tmp_path / "out" / "epoch_1"
    for i, part in enumerate(parts, 1):
        assert set(load_file(str(folder / f"llama2_hf_checkpoint_{i:02d}.safetensors"))) == set(part)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    written = {}
    for name in set(index["weight_map"].values()):
        written.update({k: (name, v) for k, v in load_file(str(folder / name)).items()})
    assert {k: n for k, (n, _) in written.items()} == index["weight_map"]
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for _, v in written.values())


def test_adapter_only(tmp_path):
    ckpt, _, paths = _peer_llama2(tmp_path)
    ck = FullModelHFCheckpointer(str(ckpt), paths, "LLAMA2", str(tmp_path / "out"))
    state = ck.load_checkpoint()
    with pytest.raises(ValueError, match="Adapter checkpoint not found in state_dict"):
        ck.save_checkpoint(state, epoch=2, adapter_only=True)
    assert not (tmp_path / "out" / "epoch_2").exists()
    state["adapter"] = {}
    ck.save_checkpoint(state, epoch=2, adapter_only=True)
    folder = tmp_path / "out" / "epoch_2"
    assert load_file(str(folder / "adapter_model.safetensors")) == {}
    assert not list(folder.glob("*checkpoint*")) and not (folder / "model.safetensors.index.json").exists()


def test_gemma_tied_with_head_dim(tmp_path):
    spec = LlamaSpec(layers=1, heads=4, kv_heads=1, head_dim=16, hidden=64, intermediate=256, vocab=100,
                     lm_head=False, dtype=torch.float16)
    sd = llama_state_dict(spec)
    names = write_hf_checkpoint(tmp_path / "hf", sd, [list(sd)], spec.config())
    ck = FullModelHFCheckpointer(str(tmp_path / "hf"), names, "GEMMA", str(tmp_path / "out"))
    state = ck.load_checkpoint()
    assert len(state["model"]) == len(sd) and "output.weight" not in state["model"]
    assert state["model"]["layers.0.attn.q_proj.weight"].shape == (64, 64)
    ck.save_checkpoint(state, epoch=0)
    out_file = tmp_path / "out/epoch_0/model.safetensors"
    assert out_file.read_bytes() == (tmp_path / "hf/model.safetensors").read_bytes()


def test_bin_output_and_index(tmp_path):
    spec = LlamaSpec()
    sd = llama_state_dict(spec)
    names = write_hf_checkpoint(tmp_path / "hf", sd, split_keys(list(sd), [6]), spec.config())
    ck = FullModelHFCheckpointer(
        str(tmp_path / "hf"), names, "LLAMA3", str(tmp_path / "out"), safe_serialization=False
    )
    ck.save_checkpoint(ck.load_checkpoint(), epoch=0)
    folder = tmp_path / "out" / "epoch_0"
    index = json.loads((folder / "pytorch_model.bin.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [
        "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    loaded = {}
    for name in set(index["weight_map"].values()):
        part = torch.load(folder / name, weights_only=True)
        assert all(part[k].untyped_storage().nbytes() == part[k].nbytes for k in part)  # no mapped-file blobs
        loaded.update(part)
    assert set(loaded) == set(sd) and all(torch.equal(loaded[k], sd[k]) for k in sd)


def test_intermediate_checkpoint_recipe_state_and_no_mutation(tmp_path):
    spec = LlamaSpec()
    sd = llama_state_dict(spec)
    names = write_hf_checkpoint(tmp_path / "hf", sd, [list(sd)], spec.config())
    ck = FullModelHFCheckpointer(str(tmp_path / "hf"), names, "LLAMA3", str(tmp_path / "out"))
    state = ck.load_checkpoint()
    state.update({"seed": 3, "epochs_run": 1, "total_epochs": 2, "max_steps_per_epoch": None,
                  "optimizer": {"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": [{"lr": 0.1}]}})
    state["adapter_config"] = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "output_proj"]}
    snapshot = {k: (v if not isinstance(v, dict) else dict(v)) for k, v in state.items()}
    cfg_before = copy.deepcopy(state["adapter_config"])
    ck.save_checkpoint(state, epoch=0, intermediate_checkpoint=True)
    assert set(state) == set(snapshot) and all(state[k] is snapshot[k] or state[k] == snapshot[k] for k in ("seed",))
    assert state["model"].keys() == snapshot["model"].keys()
    assert state["adapter_config"] == cfg_before
    recipe = torch.load(tmp_path / "out" / "recipe_state" / "recipe_state.pt", weights_only=True)
    # the recipe keys, plus the folder they were saved with (stripped again when shardwise loads it)
    assert set(recipe) == {"seed", "epochs_run", "total_epochs", "max_steps_per_epoch", "optimizer",
                           "_shardwise_checkpoint_folder"}
    assert recipe["_shardwise_checkpoint_folder"] == "epoch_0"
    assert torch.equal(recipe["optimizer"]["state"][0]["exp_avg"], torch.ones(3))
    # saving twice with the same dict works, and the result is the same
    ck.save_checkpoint(state, epoch=0)
    out_file = tmp_path / "out/epoch_0/model.safetensors"
    assert out_file.read_bytes() == (tmp_path / "hf/model.safetensors").read_bytes()


def test_save_before_load_and_new_keys(tmp_path):
    spec = LlamaSpec(lm_head=False, inv_freq=True)
    sd = llama_state_dict(spec)
    names = write_hf_checkpoint(tmp_path / "hf", sd, split_keys(list(sd), [7]), spec.config())
    ck = FullModelHFCheckpointer(str(tmp_path / "hf"), names, "LLAMA3_2", str(tmp_path / "out"))
    other = FullModelHFCheckpointer(str(tmp_path / "hf"), names, "LLAMA3_2", str(tmp_path / "o2"))
    model = dict(other.load_checkpoint()["model"])
    model["output.weight"] = torch.randn(spec.vocab, spec.hidden).to(spec.dtype)  # untied fine-tune
    ck.save_checkpoint({"model": model}, epoch=0)  # no load_checkpoint on this instance
    folder = tmp_path / "out" / "epoch_0"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert index["weight_map"]["lm_head.weight"] == "model-00003-of-00003.safetensors"
    # the renamed shards are byte-identical to the originals
    for i in (1, 2):
        renamed = folder / f"model-0000{i}-of-00003.safetensors"
        assert renamed.read_bytes() == (tmp_path / "hf" / names[i - 1]).read_bytes()
    keys = set()
    for name in set(index["weight_map"].values()):
        keys |= set(load_file(str(folder / name)))
    assert keys == set(index["weight_map"]) == set(sd) | {"lm_head.weight"}


def test_orphan_shard_of_dropped_keys_is_kept(tmp_path):
    spec = LlamaSpec(layers=1, inv_freq=True)
    sd = llama_state_dict(spec)
    inv = [k for k in sd if "inv_freq" in k]
    rest = [k for k in sd if k not in inv]
    names = write_hf_checkpoint(tmp_path / "hf", sd, [rest, inv], spec.config())
    ck = FullModelHFCheckpointer(str(tmp_path / "hf"), names, "LLAMA3", str(tmp_path / "out"))
    ck.save_checkpoint(ck.load_checkpoint(), epoch=0)
    for n in names:
        assert (tmp_path / "out/epoch_0" / n).read_bytes() == (tmp_path / "hf" / n).read_bytes()


def test_mixed_formats_and_numeric_sort(tmp_path):
    spec = LlamaSpec(layers=3)
    sd = llama_state_dict(spec)
    groups = split_keys(list(sd), [3, 6, 9, 12, 15, 18, 21, 24, 27])
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(spec.config()))
    names = []
    from safetensors.torch import save_file
    for i, g in enumerate(groups, 1):
        name = f"m-{i}.safetensors" if i % 2 else f"m-{i}.pt"
        part = {k: sd[k] for k in g}
        save_file(part, str(folder / name)) if i % 2 else torch.save(part, folder / name)
        names.append(name)
    ck = FullModelHFCheckpointer(str(folder), names[::-1], "LLAMA3", str(tmp_path / "out"))
    assert [p.name for p in ck._checkpoint_paths] == names  # m-2 before m-10
    ck.save_checkpoint(ck.load_checkpoint(), epoch=0)
    out = tmp_path / "out" / "epoch_0"
    for i, g in enumerate(groups, 1):
        got = load_file(str(out / f"m-{i}.safetensors"))
        assert set(got) == set(g) and all(torch.equal(got[k], sd[k]) for k in g)


def test_errors_are_typed_and_name_the_problem(tmp_path):
    spec = LlamaSpec()
    sd = llama_state_dict(spec)
    names = write_hf_checkpoint(tmp_path / "hf", sd, [list(sd)], spec.config())
    hf = str(tmp_path / "hf")
    with pytest.raises(KeyError):
        FullModelHFCheckpointer(hf, names, "LLAMA9", str(tmp_path / "o"))
    with pytest.raises(ValueError, match="unknown model_type"):
        FullModelHFCheckpointer(hf, names, "LLAMA9", str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()  # nothing created by a failed construction
    with pytest.raises(ValueError, match="cannot be the same as or a subdirectory"):
        FullModelHFCheckpointer(hf, names, "LLAMA3", hf + "/sub")
    with pytest.raises(ValueError, match="No file with name"):
        FullModelHFCheckpointer(hf, ["nope.safetensors"], "LLAMA3", str(tmp_path / "o"))
    bad = dict(spec.config())
    del bad["num_key_value_heads"]
    (tmp_path / "hf" / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        FullModelHFCheckpointer(hf, names, "LLAMA3", str(tmp_path / "o"))
    (tmp_path / "hf" / "config.json").unlink()
    with pytest.raises(ConfigError, match="config.json"):
        FullModelHFCheckpointer(hf, names, "LLAMA3", str(tmp_path / "o"))


def test_non_tensor_and_unexpected_key(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CFG))
    torch.save({"model.norm.weight": torch.ones(64), "step": 3}, folder / "a.pt")
    ck = FullModelHFCheckpointer(str(folder), ["a.pt"], "LLAMA2", str(tmp_path / "o"))
    with pytest.raises(CheckpointError, match=r"a\.pt.*Expected all values .* torch\.Tensor"):
        ck.load_checkpoint()
    torch.save({"model.norm.weight": torch.ones(64), "model.layers.0.foo.weight": torch.ones(2)}, folder / "a.pt")
    with pytest.raises(CheckpointError, match=r"a\.pt.*model\.layers\.0\.foo\.weight"):
        ck.load_checkpoint()


def test_unsupported_family_raises_not_implemented_or_loads(tmp_path):
    # Every member exists; a member without a converter says so by name
    for m in ModelType:
        assert ModelType[m.name] is m and m.value == m.name.lower()


def test_formatted_checkpoint_files():
    f = FormattedCheckpointFiles.from_dict({"filename_format": "model_{}_of_{}.pt", "max_filename": "0012"})
    assert f.build_checkpoint_filenames() == [f"model_{i:04d}_of_0012.pt" for i in range(1, 13)]
    three = FormattedCheckpointFiles("model-{}-of-{}.safetensors", "3").build_checkpoint_filenames()
    assert three[0] == "model-1-of-3.safetensors"
    with pytest.raises(ValueError, match="Must pass 'filename_format'"):
        FormattedCheckpointFiles.from_dict({"max_filename": "2"})
    with pytest.raises(ValueError, match="`max_filename` must be a string"):
        FormattedCheckpointFiles.from_dict({"filename_format": "a_{}_{}", "max_filename": 0o00025})
    with pytest.raises(ValueError, match="must have exactly two placeholders"):
        FormattedCheckpointFiles("invalid_format_{}.pt", "2")
    with pytest.raises(ValueError, match="positional"):
        FormattedCheckpointFiles("file_{i}_of_{n}.pth", "2")  # torchtune accepts it, then crashes in build


def test_formatted_files_resolve(tmp_path):
    spec = LlamaSpec()
    sd = llama_state_dict(spec)
    names = write_hf_checkpoint(tmp_path / "hf", sd, split_keys(list(sd), [4, 9]), spec.config())
    ck = FullModelHFCheckpointer(str(tmp_path / "hf"), {"filename_format": "model-{}-of-{}.safetensors",
                                                        "max_filename": "00003"}, "LLAMA3", str(tmp_path / "o"))
    assert [p.name for p in ck._checkpoint_paths] == names


@pytest.mark.parametrize(
    "ckpt,out,ok",
    [("/path/to/ckpt", "/path/to/output", True), ("/path/to/output/ckpt_dir", "/path/to/output", True),
     ("/path/to/ckpt", "/path/to/ckpt", False), ("/path/to/ckpt", "/path/to/ckpt/subdir", False),
     ("/path/to/ckpt", "/path/to/ckpt/subdir/another_subdir", False)],
)
def test_check_outdir_not_in_ckptdir(ckpt, out, ok):
    if ok:
        assert check_outdir_not_in_ckptdir(Path(ckpt), Path(out))
    else:
        with pytest.raises(ValueError, match="The output directory cannot be the same as or a subdirectory"):
            check_outdir_not_in_ckptdir(Path(ckpt), Path(out))


def test_copy_files(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "original").mkdir(parents=True)
    (src / ".cache").mkdir()
    (src / "empty").mkdir()
    for name in ["config.json", "tokenizer.json", "generation_config.json", "LICENSE", "original/params.json",
                 "model.safetensors", "x.bin", "y.pt", "z.pth", "model.safetensors.index.json",
                 "adapter_config.json", ".hidden", ".cache/blob", "training_args.bin"]:
        (src / name).write_text(name)
    with open(src / "big.gguf", "wb") as f:
        f.truncate(100 * 1024 * 1024 + 1)
    dst.mkdir()
    (dst / "config.json").write_text("mine")
    copy_files(src, dst)
    got = sorted(str(p.relative_to(dst)) for p in dst.rglob("*"))
    assert got == sorted(["config.json", "tokenizer.json", "generation_config.json", "LICENSE", "original",
                          "original/params.json", "empty"])
    assert (dst / "config.json").read_text() == "mine"  # never overwrites


def test_largest_iter_folder(tmp_path):
    for name in ["epoch_9", "epoch_10", "epoch_2"]:
        (tmp_path / name).mkdir()
    (tmp_path / "epoch_11.txt").write_text("x")
    (tmp_path / "epoch_12_old").mkdir()
    (tmp_path / ".epoch_13.shardwise-staging-1").mkdir()
    assert get_largest_iter_folder(tmp_path) == "epoch_10"
    assert get_largest_iter_folder(tmp_path / "missing") is None


def test_logs_like_torchtune(tmp_path, caplog):
    spec = LlamaSpec()
    sd = llama_state_dict(spec)
    names = write_hf_checkpoint(tmp_path / "hf", sd, [list(sd)], spec.config())
    ck = FullModelHFCheckpointer(str(tmp_path / "hf"), names, "LLAMA3", str(tmp_path / "o"),
                                 resume_from_checkpoint=False)
    with caplog.at_level(logging.INFO, logger="shardwise"):
        ck.save_checkpoint(ck.load_checkpoint(), epoch=0)
    assert "Model checkpoint of size" in caplog.text


def test_tied_llama_with_stored_lm_head(tmp_path):
    """A tied checkpoint that stores lm_head.weight anyway: no output.weight for torchtune's TiedLinear
    model; the head is written back unchanged, and follows the embedding once that is fine-tuned."""
    spec = LlamaSpec(lm_head=True, extra_config={"tie_word_embeddings": True})
    sd = llama_state_dict(spec)
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    names = write_hf_checkpoint(tmp_path / "hf", sd, split_keys(list(sd), [5]), spec.config())
    ck = FullModelHFCheckpointer(str(tmp_path / "hf"), names, "LLAMA3_2", str(tmp_path / "out"))
    state = ck.load_checkpoint()
    assert "output.weight" not in state["model"]
    ck.save_checkpoint(state, epoch=0)
    for n in names:
        assert (tmp_path / "out/epoch_0" / n).read_bytes() == (tmp_path / "hf" / n).read_bytes()
    model = dict(state["model"])
    model["tok_embeddings.weight"] = model["tok_embeddings.weight"] + 1
    ck.save_checkpoint({"model": model}, epoch=1)
    out = {}
    for n in names:
        out.update(load_file(str(tmp_path / "out/epoch_1" / n)))
    assert torch.equal(out["lm_head.weight"], model["tok_embeddings.weight"])


def test_names_from_a_checkpoint_never_escape_its_folder(tmp_path):
    """An index that names a file outside its folder (absolute or ``..``) is refused by ``convert``;
    nothing outside the folder is read."""
    from shardwise.report.tunedir import convert_checkpoint

    spec = LlamaSpec()
    sd = llama_state_dict(spec)
    outside = tmp_path / "elsewhere"
    names = write_hf_checkpoint(outside, sd, split_keys(list(sd), [5]), spec.config())
    for bad in (str(outside / names[0]), f"../elsewhere/{names[0]}"):
        hf = tmp_path / f"hf-{len(bad)}"
        write_hf_checkpoint(hf, sd, split_keys(list(sd), [5]), spec.config())
        index = json.loads((hf / "model.safetensors.index.json").read_text())
        index["weight_map"] = {k: (bad if v == names[0] else v) for k, v in index["weight_map"].items()}
        (hf / "model.safetensors.index.json").write_text(json.dumps(index))
        (hf / names[0]).unlink()
        with pytest.raises(CheckpointError, match="escape"):
            convert_checkpoint(hf, tmp_path / f"out-{len(bad)}", "LLAMA3", to="tune")
        assert not (tmp_path / f"out-{len(bad)}").exists()


def test_resume_pairs_weights_with_their_recipe_state(tmp_path):
    """A final save after the last intermediate one leaves a newer folder without recipe state; a
    resume that does not spell out the folder must load the weights saved with the recipe state."""
    spec = LlamaSpec()
    sd = llama_state_dict(spec)
    names = write_hf_checkpoint(tmp_path / "hf", sd, [list(sd)], spec.config())
    out = tmp_path / "out"
    ck = FullModelHFCheckpointer(str(tmp_path / "hf"), names, "LLAMA3", str(out))
    model = ck.load_checkpoint()["model"]
    ck.save_checkpoint({"model": model, "epochs_run": 1, "seed": 0}, epoch=0, intermediate_checkpoint=True)
    final = {k: v + 1 for k, v in model.items()}
    ck.save_checkpoint({"model": final, "epochs_run": 2, "seed": 0}, epoch=1)  # final: no recipe state
    resumed = FullModelHFCheckpointer(str(tmp_path / "hf"), names, "LLAMA3", str(out), should_load_recipe_state=True)
    assert resumed._checkpoint_paths == [out / "epoch_0" / names[0]]
    state = resumed.load_checkpoint()
    assert state["epochs_run"] == 1 and "_shardwise_checkpoint_folder" not in state
    assert all(torch.equal(state["model"][k], model[k]) for k in model)


def test_resume_accepts_torchtune_output_names(tmp_path):
    """A resume config written for torchtune names the output shards model-0000k-of-0000n; shardwise
    kept the input names (model.safetensors / llama2_hf_checkpoint_0k), and resolves the k-th of n."""
    ckpt, parts, paths = _peer_llama2(tmp_path, 2)
    out = tmp_path / "out"
    ck = FullModelHFCheckpointer(str(ckpt), paths, "LLAMA2", str(out))
    state = ck.load_checkpoint()
    state.update({"seed": 1, "epochs_run": 1})
    ck.save_checkpoint(state, epoch=0, intermediate_checkpoint=True)
    tt_names = ["epoch_0/model-00001-of-00002.safetensors", "epoch_0/model-00002-of-00002.safetensors"]
    resumed = FullModelHFCheckpointer(str(ckpt), tt_names, "LLAMA2", str(out), recipe_checkpoint=None,
                                      resume_from_checkpoint=True)
    assert [p.name for p in resumed._checkpoint_paths] == ["llama2_hf_checkpoint_01.safetensors",
                                                           "llama2_hf_checkpoint_02.safetensors"]
    got = resumed.load_checkpoint()
    assert got["seed"] == 1 and all(torch.equal(got["model"][k], state["model"][k]) for k in state["model"])
    with pytest.raises(ValueError, match="No file with name"):
        FullModelHFCheckpointer(str(ckpt), ["epoch_0/model-00001-of-00003.safetensors"], "LLAMA2", str(out),
                                should_load_recipe_state=True)


def test_malformed_or_escaping_index_is_ignored_with_a_warning(tmp_path, caplog):
    """Loading never needs the index (the files come from checkpoint_files): one that is malformed or
    names a file outside its folder is reported and replaced by a correct one on save."""
    spec = LlamaSpec()
    sd = llama_state_dict(spec)
    names = write_hf_checkpoint(tmp_path / "hf", sd, split_keys(list(sd), [5]), spec.config())
    index_path = tmp_path / "hf" / "model.safetensors.index.json"
    good = json.loads(index_path.read_text())
    bad = {"metadata": good["metadata"], "weight_map": {k: "../" + v for k, v in good["weight_map"].items()}}
    index_path.write_text(json.dumps(bad))
    ck = FullModelHFCheckpointer(str(tmp_path / "hf"), names, "LLAMA3", str(tmp_path / "out"))
    with caplog.at_level(logging.WARNING, logger="shardwise"):
        ck.save_checkpoint(ck.load_checkpoint(), epoch=0)
    assert "would escape" in caplog.text
    written = json.loads((tmp_path / "out/epoch_0/model.safetensors.index.json").read_text())
    assert written == good


def test_pruning_keeps_the_folder_read_and_the_recipe_states_folder(tmp_path, caplog):
    spec = LlamaSpec()
    sd = llama_state_dict(spec)
    names = write_hf_checkpoint(tmp_path / "hf", sd, [list(sd)], spec.config())
    out = tmp_path / "out"
    ck = FullModelHFCheckpointer(str(tmp_path / "hf"), names, "LLAMA3", str(out), keep_last_n_checkpoints=1)
    model = ck.load_checkpoint()["model"]
    ck.save_checkpoint({"model": model, "epochs_run": 1}, epoch=0, intermediate_checkpoint=True)
    ck.save_checkpoint({"model": model}, epoch=1)  # final: epoch_0 goes with the recipe state, so it stays
    assert (out / "epoch_0").is_dir() and (out / "epoch_1").is_dir()
    ck.save_checkpoint({"model": model, "epochs_run": 3}, epoch=2, intermediate_checkpoint=True)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("epoch")) == ["epoch_2"]
    # a run that reads its weights from output_dir/epoch_2 never prunes that folder
    reader = FullModelHFCheckpointer(str(out / "epoch_2"), names, "LLAMA3", str(out), keep_last_n_checkpoints=1)
    m2 = reader.load_checkpoint()["model"]
    reader.save_checkpoint({"model": m2, "epochs_run": 4}, epoch=3, intermediate_checkpoint=True)
    reader.save_checkpoint({"model": m2}, epoch=4)
    # epoch_2: read by this run; epoch_3: the recipe state's; epoch_4: just saved
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("epoch")) == ["epoch_2", "epoch_3", "epoch_4"]
    # explicit files from another folder than the recipe state's: loaded as asked, with a warning
    with caplog.at_level(logging.WARNING, logger="shardwise"):
        FullModelHFCheckpointer(str(tmp_path / "hf"), [f"epoch_4/{names[0]}"], "LLAMA3", str(out),
                                should_load_recipe_state=True)
    assert "the checkpoint the recipe state was saved with" in caplog.text


def test_copy_files_fails_when_the_checkpoint_dir_is_gone(tmp_path):
    from shardwise import CheckpointIOError

    with pytest.raises(CheckpointIOError, match="checkpoint_dir is gone"):
        copy_files(tmp_path / "missing", tmp_path / "dst")


def test_index_that_is_not_an_object_is_ignored(tmp_path, caplog):
    spec = LlamaSpec()
    sd = llama_state_dict(spec)
    names = write_hf_checkpoint(tmp_path / "hf", sd, split_keys(list(sd), [5]), spec.config())
    index_path = tmp_path / "hf" / "model.safetensors.index.json"
    good = json.loads(index_path.read_text())
    index_path.write_text(json.dumps([{}, good]))
    ck = FullModelHFCheckpointer(str(tmp_path / "hf"), names, "LLAMA3", str(tmp_path / "out"))
    with caplog.at_level(logging.WARNING, logger="shardwise"):
        ck.save_checkpoint(ck.load_checkpoint(), epoch=0)
    assert "must be a JSON object" in caplog.text
    assert json.loads((tmp_path / "out/epoch_0/model.safetensors.index.json").read_text()) == good


@pytest.mark.parametrize("names", [["model.safetensors"], ["weights-a.safetensors", "weights-b.safetensors"]])
def test_any_load_accepts_torchtune_output_names(tmp_path, caplog, names):
    """A follow-up config written for torchtune (generation after a fine-tune) names the output
    model-0000k-of-0000n under epoch_0/; shardwise kept the input names on disk and loads the k-th file in
    numeric order, with one INFO line naming the file used."""
    spec = LlamaSpec()
    sd = llama_state_dict(spec)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(spec.config()))
    for name, keys in zip(names, split_keys(list(sd), [len(sd) // 2] if len(names) == 2 else [])):
        save_file({k: sd[k] for k in keys}, tmp_path / "hf" / name, metadata={"format": "pt"})
    out = tmp_path / "out"
    ck = FullModelHFCheckpointer(str(tmp_path / "hf"), names, "LLAMA3", str(out))
    state = ck.load_checkpoint()
    ck.save_checkpoint(state, epoch=0)
    assert sorted(p.name for p in (out / "epoch_0").glob("*.safetensors")) == names  # input names kept
    n = len(names)
    tt = [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="shardwise"):
        gen = FullModelHFCheckpointer(str(out / "epoch_0"), tt, "LLAMA3", str(tmp_path / "gen"))
    assert [p.name for p in gen._checkpoint_paths] == names
    lines = [r.getMessage() for r in caplog.records if "the file torchtune would have named so" in r.getMessage()]
    assert len(lines) == n and all(tt[i] in lines[i] and names[i] in lines[i] for i in range(n))
    got = gen.load_checkpoint()["model"]
    assert set(got) == set(state["model"]) and all(torch.equal(got[k], state["model"][k]) for k in got)
    formatted = {"filename_format": "model-{}-of-{}.safetensors", "max_filename": f"{n:05d}"}
    again = FullModelHFCheckpointer(str(out / "epoch_0"), formatted, "LLAMA3", str(tmp_path / "gen"))
    assert again._checkpoint_paths == gen._checkpoint_paths
