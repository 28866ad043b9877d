"""Adapter export (torchtune → PEFT) and import (PEFT → torchtune) without transformers: key names per
family, which rows are permuted, fused Phi modules, config contents, fallbacks and errors."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from ckpt_factory import LlamaSpec, llama_state_dict, write_hf_checkpoint
from shardwise import ConversionError, FullModelHFCheckpointer, ModelConfig, ModelType
from shardwise.adapters import (
    PeftExportError,
    peft_to_tune_adapter_weights,
    supports_peft,
    tune_to_peft_adapter,
    tune_to_peft_adapter_config,
)
from shardwise.convert import permute_to_hf

P = "base_model.model."
LLAMA_CFG = {"hidden_size": 48, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
             "intermediate_size": 40, "tie_word_embeddings": False}
VISION_CFG = {
    "text_config": {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 50,
                    "cross_attention_layers": [1, 4]},
    "vision_config": {"hidden_size": 32, "image_size": 28, "max_num_tiles": 2,
                      "supported_aspect_ratios": [[1, 1], [1, 2], [2, 1]]},
}


def _lora(gen: torch.Generator, out: int, inp: int, r: int = 4, dora: bool = False) -> dict[str, torch.Tensor]:
    d = {"lora_a.weight": torch.randn(r, inp, generator=gen), "lora_b.weight": torch.randn(out, r, generator=gen)}
    if dora:
        d["magnitude"] = torch.rand(out, generator=gen) + 0.5
    return d


def llama_adapter(layers: int = 2, dora: bool = False, output: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, hd, nh, nkv, inter = 48, 16, 4, 2, 40
    shapes = {"attn.q_proj": (nh * hd, h), "attn.k_proj": (nkv * hd, h), "attn.v_proj": (nkv * hd, h),
              "attn.output_proj": (h, nh * hd), "mlp.w1": (inter, h), "mlp.w2": (h, inter), "mlp.w3": (inter, h)}
    out: dict[str, torch.Tensor] = {}
    for n in range(layers):
        for mod, (o, i) in shapes.items():
            out.update({f"layers.{n}.{mod}.{k}": v for k, v in _lora(g, o, i, dora=dora).items()})
    if output:
        out.update({f"output.{k}": v for k, v in _lora(g, 37, h, dora=dora).items()})
    return out


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize(
    "mt", ["LLAMA2", "LLAMA3", "LLAMA3_2", "MISTRAL", "GEMMA", "GEMMA2", "REWARD", "QWEN2", "QWEN3"]
)
def test_generic_export_names_and_permutation(mt: str, dora: bool) -> None:
    model_type = ModelType[mt]
    adapter = llama_adapter(dora=dora)
    snapshot = copy.deepcopy(adapter)
    exp = tune_to_peft_adapter(adapter, model_type, ModelConfig(LLAMA_CFG))
    assert all(torch.equal(adapter[k], snapshot[k]) for k in snapshot)  # not mutated
    head = "score" if mt == "REWARD" else "lm_head"
    w = exp.weights
    assert torch.equal(w[f"{P}{head}.lora_A.weight"], adapter["output.lora_a.weight"])
    assert torch.equal(w[f"{P}model.layers.1.mlp.gate_proj.lora_B.weight"], adapter["layers.1.mlp.w1.lora_b.weight"])
    assert torch.equal(w[f"{P}model.layers.0.self_attn.o_proj.lora_B.weight"],
                       adapter["layers.0.attn.output_proj.lora_b.weight"])
    permuted = mt not in ("QWEN2", "QWEN3")
    for leaf, heads in (("q_proj", 4), ("k_proj", 2)):
        tb = adapter[f"layers.0.attn.{leaf}.lora_b.weight"]
        pb = w[f"{P}model.layers.0.self_attn.{leaf}.lora_B.weight"]
        assert torch.equal(pb, permute_to_hf(tb, heads, 16) if permuted else tb)
        assert torch.equal(w[f"{P}model.layers.0.self_attn.{leaf}.lora_A.weight"],
                           adapter[f"layers.0.attn.{leaf}.lora_a.weight"])
        if dora:
            tm = adapter[f"layers.0.attn.{leaf}.magnitude"]
            pm = w[f"{P}model.layers.0.self_attn.{leaf}.lora_magnitude_vector"]
            assert torch.equal(pm, permute_to_hf(tm, heads, 16) if permuted else tm)
    assert len(w) == len(adapter)
    assert exp.use_dora is dora
    # and back, exactly
    back = peft_to_tune_adapter_weights(w, model_type, ModelConfig(LLAMA_CFG), exp.metadata())
    assert back.keys() == adapter.keys() and all(torch.equal(back[k], adapter[k]) for k in adapter)


def test_config_is_new_and_complete() -> None:
    cfg_in = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "output_proj", "w1", "w2", "w3", "output"],
              "peft_type": "LORA"}
    snapshot = copy.deepcopy(cfg_in)
    exp = tune_to_peft_adapter(llama_adapter(dora=True), ModelType.REWARD, ModelConfig(LLAMA_CFG))
    out = tune_to_peft_adapter_config(cfg_in, ModelType.REWARD, "org/m", exp, ModelConfig(LLAMA_CFG))
    assert cfg_in == snapshot
    assert out["target_modules"][:6] == ["q_proj", "o_proj", "gate_proj", "down_proj", "up_proj", "score"]
    # modules present in the weights but missing from target_modules are added so PEFT loads them
    assert set(out["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj",
                                          "up_proj", "score"}
    assert out["base_model_name_or_path"] == "org/m" and out["use_dora"] is True
    assert "rank_pattern" not in out
    with pytest.raises(ValueError, match="Unknown target module o_proj"):
        tune_to_peft_adapter_config(
            {**cfg_in, "target_modules": ["o_proj"]}, ModelType.LLAMA3, cfg=ModelConfig(LLAMA_CFG)
        )
    with pytest.raises(ValueError, match=r"requires \['target_modules', 'r', 'lora_alpha'\]"):
        tune_to_peft_adapter_config({"r": 4}, ModelType.LLAMA3, cfg=ModelConfig(LLAMA_CFG))


PHI_CFG = {"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 24}


def phi_adapter(parts: list[str], dora: bool = False, layers: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    shapes = {"attn.q_proj": (32, 32), "attn.k_proj": (16, 32), "attn.v_proj": (16, 32), "mlp.w1": (24, 32),
              "mlp.w3": (24, 32), "attn.output_proj": (32, 32), "mlp.w2": (32, 24)}
    out = {}
    for n in range(layers):
        for mod in parts:
            out.update({f"layers.{n}.{mod}.{k}": v for k, v in _lora(g, *shapes[mod], dora=dora).items()})
    return out


@pytest.mark.parametrize("mt", ["PHI3_MINI", "PHI4"])
def test_phi_fused_block_lora(mt: str) -> None:
    adapter = phi_adapter(["attn.q_proj", "attn.v_proj", "mlp.w1", "mlp.w3", "attn.output_proj"])
    cfg = ModelConfig(PHI_CFG)
    exp = tune_to_peft_adapter(adapter, ModelType[mt], cfg)
    a = exp.weights[f"{P}model.layers.0.self_attn.qkv_proj.lora_A.weight"]
    b = exp.weights[f"{P}model.layers.0.self_attn.qkv_proj.lora_B.weight"]
    assert a.shape == (8, 32) and b.shape == (64, 8)
    aq, bq = adapter["layers.0.attn.q_proj.lora_a.weight"], adapter["layers.0.attn.q_proj.lora_b.weight"]
    av, bv = adapter["layers.0.attn.v_proj.lora_a.weight"], adapter["layers.0.attn.v_proj.lora_b.weight"]
    expected = torch.zeros(64, 32)
    expected[:32] = bq @ aq
    expected[48:] = bv @ av
    torch.testing.assert_close(b @ a, expected)  # rank-8 block LoRA == the two rank-4 LoRAs, k rows zero
    assert torch.count_nonzero(b[32:48]) == 0
    out = tune_to_peft_adapter_config({"r": 4, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj", "w1", "w3",
                                       "output_proj"]}, ModelType[mt], None, exp, cfg)
    assert out["target_modules"] == ["qkv_proj", "gate_up_proj", "o_proj"]
    assert out["rank_pattern"] == {"qkv_proj": 8, "gate_up_proj": 8}
    assert out["alpha_pattern"] == {"qkv_proj": 32, "gate_up_proj": 32}
    back = peft_to_tune_adapter_weights(exp.weights, ModelType[mt], cfg, exp.metadata())
    assert back.keys() == adapter.keys() and all(torch.equal(back[k], adapter[k]) for k in adapter)
    # without the metadata a partly adapted fused module is ambiguous: a clear error, not a guess
    with pytest.raises(ConversionError, match="adapter_model.pt"):
        peft_to_tune_adapter_weights(exp.weights, ModelType[mt], cfg)


def test_phi_layers_with_different_parts_use_module_patterns() -> None:
    adapter = phi_adapter(["attn.q_proj", "attn.k_proj", "attn.v_proj"], layers=1)
    adapter.update({k.replace("layers.0", "layers.1"): v for k, v in phi_adapter(["attn.q_proj"], layers=1).items()})
    exp = tune_to_peft_adapter(adapter, ModelType.PHI4, ModelConfig(PHI_CFG))
    out = tune_to_peft_adapter_config({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}, ModelType.PHI4, None,
                                      exp, ModelConfig(PHI_CFG))
    assert out["rank_pattern"] == {r"model\.layers\.0\.self_attn\.qkv_proj": 12}
    assert out["alpha_pattern"] == {r"model\.layers\.0\.self_attn\.qkv_proj": 24}


def test_phi_dora_all_parts_exported_partial_refused() -> None:
    cfg = ModelConfig(PHI_CFG)
    full = phi_adapter(["attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.w1", "mlp.w3"], dora=True)
    exp = tune_to_peft_adapter(full, ModelType.PHI4, cfg)
    mag = exp.weights[f"{P}model.layers.1.self_attn.qkv_proj.lora_magnitude_vector"]
    assert torch.equal(mag, torch.cat([full[f"layers.1.attn.{p}_proj.magnitude"] for p in "qkv"]))
    back = peft_to_tune_adapter_weights(exp.weights, ModelType.PHI4, cfg)  # all parts: no metadata needed
    assert all(torch.equal(back[k], full[k]) for k in full) and back.keys() == full.keys()
    with pytest.raises(PeftExportError, match="DoRA"):
        tune_to_peft_adapter(phi_adapter(["attn.q_proj", "attn.v_proj"], dora=True), ModelType.PHI4, cfg)


def test_vision_names_permutation_and_regex() -> None:
    g = torch.Generator().manual_seed(1)
    adapter = {}
    mods = {"decoder.layers.0.attn.q_proj": (64, 64), "decoder.layers.1.fusion_layer.attn.q_proj": (64, 64),
            "decoder.layers.3.attn.k_proj": (32, 64), "encoder.clip.layers.0.attn.q_proj": (32, 32),
            "encoder.projection.layers.0.mlp.w1": (40, 32), "encoder.projection.output": (64, 96),
            "decoder.output": (50, 64)}
    for mod, (o, i) in mods.items():
        adapter.update({f"{mod}.{k}": v for k, v in _lora(g, o, i).items()})
    cfg = ModelConfig(VISION_CFG)
    exp = tune_to_peft_adapter(adapter, ModelType.LLAMA3_VISION, cfg)
    w = exp.weights
    # layer renumbering around the cross-attention layers 1 and 4: tune 3 -> HF 5
    kb = w[f"{P}model.language_model.layers.5.self_attn.k_proj.lora_B.weight"]
    assert torch.equal(kb, permute_to_hf(adapter["decoder.layers.3.attn.k_proj.lora_b.weight"], 2, 16))
    assert torch.equal(w[f"{P}model.language_model.layers.1.cross_attn.q_proj.lora_B.weight"],
                       adapter["decoder.layers.1.fusion_layer.attn.q_proj.lora_b.weight"])
    assert torch.equal(w[f"{P}model.vision_model.transformer.layers.0.self_attn.q_proj.lora_B.weight"],
                       adapter["encoder.clip.layers.0.attn.q_proj.lora_b.weight"])
    assert f"{P}model.vision_model.global_transformer.layers.0.mlp.fc1.lora_A.weight" in w
    assert f"{P}model.multi_modal_projector.lora_A.weight" in w and f"{P}lm_head.lora_B.weight" in w
    import re

    rx = re.compile(exp.target_regex or "")
    for name in ("language_model.model.layers.0.self_attn.q_proj",
                 "model.language_model.layers.0.self_attn.q_proj",
                 "model.language_model.layers.1.cross_attn.q_proj",
                 "vision_model.transformer.layers.0.self_attn.q_proj",
                 "model.multi_modal_projector", "lm_head", "language_model.lm_head"):
        assert rx.fullmatch(name), name
    for name in ("model.language_model.layers.2.self_attn.q_proj",
                 "model.language_model.layers.1.self_attn.q_proj",
                 "model.vision_model.transformer.layers.1.self_attn.q_proj",
                 "model.language_model.layers.0.mlp.up_proj"):
        assert not rx.fullmatch(name), name
    back = peft_to_tune_adapter_weights(w, ModelType.LLAMA3_VISION, cfg)
    assert back.keys() == adapter.keys() and all(torch.equal(back[k], adapter[k]) for k in adapter)
    # the checkpoint-style names convert back too
    old = {k.replace(f"{P}model.language_model.", f"{P}language_model.model."): v for k, v in w.items()}
    assert peft_to_tune_adapter_weights(old, ModelType.LLAMA3_VISION, cfg).keys() == adapter.keys()


def test_unsupported_and_unknown_modules() -> None:
    assert not supports_peft(ModelType.LLAMA4) and not supports_peft(ModelType.CLIP_TEXT)
    with pytest.raises(PeftExportError, match="no PEFT equivalent"):
        tune_to_peft_adapter({"tok_embeddings.lora_a.weight": torch.ones(2, 3), "tok_embeddings.lora_b.weight":
                              torch.ones(5, 2)}, ModelType.LLAMA3, ModelConfig(LLAMA_CFG))
    with pytest.raises(PeftExportError, match="lora_b"):
        tune_to_peft_adapter({"layers.0.attn.q_proj.lora_a.weight": torch.ones(2, 3)}, ModelType.LLAMA3,
                             ModelConfig(LLAMA_CFG))
    with pytest.raises(ConversionError, match="no torchtune equivalent"):
        peft_to_tune_adapter_weights({f"{P}model.embed_tokens.lora_A.weight": torch.ones(2, 3)}, ModelType.LLAMA3,
                                     ModelConfig(LLAMA_CFG))


# ------------------------------------------------------------------------------ through the checkpointer
def _ckpt(tmp_path: Path) -> tuple[Path, list[str]]:
    spec = LlamaSpec(layers=2, heads=4, kv_heads=2, head_dim=16, hidden=48, intermediate=40, vocab=37,
                     dtype=torch.float32)
    sd = llama_state_dict(spec)
    folder = tmp_path / "base"
    names = write_hf_checkpoint(folder, sd, [list(sd)], spec.config())
    (folder / "original_repo_id.json").write_text(json.dumps({"repo_id": "meta/tiny"}))
    (folder / "adapter_config.json").write_text('{"stale": true}')  # must not be copied over ours
    return folder, names


def test_save_adapter_files_and_no_mutation(tmp_path: Path) -> None:
    ckpt, names = _ckpt(tmp_path)
    ck = FullModelHFCheckpointer(str(ckpt), names, "LLAMA3", str(tmp_path / "out"))
    state = ck.load_checkpoint()
    state["adapter"] = llama_adapter(dora=True)
    state["adapter_config"] = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj"], "peft_type": "LORA"}
    state["seed"] = 3
    snapshot = {k: (dict(v) if isinstance(v, dict) else v) for k, v in state.items()}
    cfg_snapshot = copy.deepcopy(state["adapter_config"])
    for _ in range(2):  # twice with the same dict: torchtune's second call fails
        ck.save_checkpoint(state, epoch=0, intermediate_checkpoint=True)
    assert state.keys() == snapshot.keys() and state["adapter_config"] == cfg_snapshot
    assert all(state["model"][k] is snapshot["model"][k] for k in snapshot["model"])
    folder = tmp_path / "out" / "epoch_0"
    pt = torch.load(folder / "adapter_model.pt", weights_only=True)
    assert pt.keys() == state["adapter"].keys()
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert len(list(f.keys())) == len(pt)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "meta/tiny" and cfg["use_dora"] is True and "stale" not in cfg
    assert (folder / "model.safetensors").is_file()
    rs = torch.load(tmp_path / "out" / "recipe_state" / "recipe_state.pt", weights_only=True)
    assert rs == {"seed": 3, "_shardwise_checkpoint_folder": folder.name}  # the folder it goes with


def test_adapter_only_and_empty_adapter(tmp_path: Path) -> None:
    ckpt, names = _ckpt(tmp_path)
    ck = FullModelHFCheckpointer(str(ckpt), names, "LLAMA3", str(tmp_path / "out"))
    state = ck.load_checkpoint()
    with pytest.raises(ValueError, match="Adapter checkpoint not found in state_dict"):
        ck.save_checkpoint(state, epoch=2, adapter_only=True)
    assert not any((tmp_path / "out").iterdir())  # nothing written
    state["adapter"] = {}
    ck.save_checkpoint(state, epoch=2, adapter_only=True)
    folder = tmp_path / "out" / "epoch_2"
    assert not list(folder.glob("model*")) and not (folder / "model.safetensors.index.json").exists()
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        assert list(f.keys()) == []


@pytest.mark.parametrize("mt", ["LLAMA4"])
def test_unsupported_family_warns_and_keeps_torchtune_format(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                             mt: str) -> None:
    ckpt, names = _ckpt(tmp_path)
    ck = FullModelHFCheckpointer(str(ckpt), names, "LLAMA3", str(tmp_path / "out"))
    ck._writer.model_type = ModelType[mt]  # the folder is a Llama one; only the adapter path is exercised
    state = {"adapter": llama_adapter(layers=1), "adapter_config": {"r": 4, "lora_alpha": 8, "target_modules": []}}
    with caplog.at_level(logging.WARNING, logger="shardwise"):
        ck.save_checkpoint(state, epoch=0, adapter_only=True)
    folder = tmp_path / "out" / "epoch_0"
    assert (folder / "adapter_model.pt").is_file()
    assert not (folder / "adapter_model.safetensors").exists() and not (folder / "adapter_config.json").exists()
    assert "saving to torchtune format instead" in caplog.text and "skipping adapter config save" in caplog.text
