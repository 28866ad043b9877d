"""CLIP_TEXT in both key layouts: transformers 5 saves ``CLIPTextModel`` bare (``embeddings.*``), while
``CLIPModel``, ``CLIPTextModelWithProjection`` and transformers 4.x use ``text_model.*``. Each loads to
the same torchtune keys and is written back in the layout it was read in, byte for byte (checkpointer
and ``shardwise.roundtrip``, which converts through a torchtune folder and back)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import shardwise
from shardwise import FullModelHFCheckpointer

transformers = pytest.importorskip("transformers")

_TEXT = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
             max_position_embeddings=16, pad_token_id=0, bos_token_id=1, eos_token_id=2, projection_dim=8)


def _build(kind: str, folder: Path) -> None:
    torch.manual_seed(0)
    if kind == "clip_model":
        cfg = transformers.CLIPConfig(text_config=_TEXT, projection_dim=8, vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
            patch_size=14))
        transformers.CLIPModel(cfg).save_pretrained(folder)
        return
    cls = "CLIPTextModelWithProjection" if kind == "with_projection" else "CLIPTextModel"
    getattr(transformers, cls)(transformers.CLIPTextConfig(**_TEXT)).save_pretrained(folder)
    if kind == "text_model_4x":  # transformers 4.x: the same model saved under text_model., with position_ids
        sd = load_file(folder / "model.safetensors")
        sd = {"text_model." + k: v for k, v in sd.items()}
        sd["text_model.embeddings.position_ids"] = torch.arange(16).unsqueeze(0)
        save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
        cfg = json.loads((folder / "config.json").read_text())
        cfg["transformers_version"] = "4.44.2"
        (folder / "config.json").write_text(json.dumps(cfg, indent=2))


def _tune(folder: Path, out: Path) -> tuple[FullModelHFCheckpointer, dict[str, Any]]:
    ck = FullModelHFCheckpointer(str(folder), ["model.safetensors"], "CLIP_TEXT", str(out))
    return ck, ck.load_checkpoint()


@pytest.mark.parametrize("kind", ["text_model_5x", "text_model_4x", "with_projection", "clip_model"])
def test_clip_text_round_trips_in_the_layout_it_was_read(tmp_path: Path, kind: str) -> None:
    folder = tmp_path / kind
    _build(kind, folder)
    keys = list(load_file(folder / "model.safetensors"))
    assert any(k.startswith("text_model.") for k in keys) == (kind != "text_model_5x")
    ck, state = _tune(folder, tmp_path / "out")
    ck.save_checkpoint(state, epoch=0)
    assert (tmp_path / "out" / "epoch_0" / "model.safetensors").read_bytes() == (
        folder / "model.safetensors").read_bytes()
    report = shardwise.roundtrip(str(folder), model_type="CLIP_TEXT")
    assert report.ok and report.to_dict()["byte_identical"], report.summary()


def test_both_layouts_give_the_same_torchtune_keys(tmp_path: Path) -> None:
    _build("text_model_5x", tmp_path / "bare")
    _build("with_projection", tmp_path / "prefixed")
    bare = _tune(tmp_path / "bare", tmp_path / "o1")[1]["model"]
    prefixed = _tune(tmp_path / "prefixed", tmp_path / "o2")[1]["model"]
    assert set(bare) == set(prefixed) and "token_embedding.weight" in bare
    assert all(torch.equal(bare[k], prefixed[k]) for k in bare)  # same seed, same text tower


def test_mixed_layouts_are_rejected(tmp_path: Path) -> None:
    _build("text_model_5x", tmp_path / "m")
    sd = load_file(tmp_path / "m" / "model.safetensors")
    sd["text_model.final_layer_norm.weight"] = sd["final_layer_norm.weight"].clone()
    save_file(sd, tmp_path / "m" / "model.safetensors")
    with pytest.raises(shardwise.ConversionError, match="mixes"):
        _tune(tmp_path / "m", tmp_path / "out")
