"""LoRA/DoRA adapters saved by shardwise, loaded for real by PEFT (``PeftModel.from_pretrained``).

For each family a tiny random transformers model is saved with ``save_pretrained``; a torchtune-style
adapter with random non-zero ``lora_b`` goes through ``FullModelHFCheckpointer.save_checkpoint``; then

- PEFT must load every adapter tensor into the right module: our file equals
  ``get_peft_model_state_dict`` of the loaded model, key for key and bit for bit (PEFT only warns
  about missing/unexpected keys);
- the PEFT model's logits equal those of the base model with the update merged *by hand* in HF
  space. The expected HF weights are computed here, independently of shardwise: the torchtune-space
  q/k rows are moved to HF order with the formula ``hf[h*hd + i*hd/2 + j] = tune[h*hd + 2j + i]``
  (only for families whose base q/k weights torchtune permutes), and fused Phi modules are built
  from row blocks;
- DoRA: the same, with ``W' = m * (W + s·BA) / ||W + s·BA||`` (norm of each output row, PEFT's and
  torchtune's convention), checked against PEFT's forward and against PEFT's own merge.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from shardwise import FullModelHFCheckpointer

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.slow

R, ALPHA = 4, 8.0
SCALE = ALPHA / R


@pytest.fixture(autouse=True)
def _no_torchao(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchtune pins torchao 0.10, which PEFT 0.21 refuses to use; PEFT works without it."""
    import peft.tuners.lora.torchao as lora_torchao

    monkeypatch.setattr(lora_torchao, "is_torchao_available", lambda: False)


_COMMON: dict[str, Any] = dict(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=64,
)

ATTN = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
        "output_proj": "self_attn.o_proj"}
MLP = {"w1": "mlp.gate_proj", "w2": "mlp.down_proj", "w3": "mlp.up_proj"}
ALL = ["q_proj", "k_proj", "v_proj", "output_proj", "w1", "w2", "w3"]


@dataclass
class Family:
    model_type: str
    build: Any
    permuted: bool
    head_dim: int
    output: str | None = "lm_head"  # HF module of torchtune's "output" (None: tied, no output LoRA)
    phi: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def _causal(cls: str, config: str, **kw: Any) -> Any:
    def build() -> Any:
        cfg = getattr(transformers, config)(**{**_COMMON, **kw})
        return getattr(transformers, cls)(cfg)

    return build


FAMILIES = {
    "LLAMA3": Family("LLAMA3", _causal("LlamaForCausalLM", "LlamaConfig", head_dim=16, tie_word_embeddings=False),
                     True, 16),
    "LLAMA3_2": Family("LLAMA3_2", _causal("LlamaForCausalLM", "LlamaConfig", tie_word_embeddings=True), True, 8,
                       output=None),
    "MISTRAL": Family("MISTRAL", _causal("MistralForCausalLM", "MistralConfig", head_dim=8,
                                         tie_word_embeddings=False), True, 8),
    "QWEN2": Family("QWEN2", _causal("Qwen2ForCausalLM", "Qwen2Config", tie_word_embeddings=False), False, 8),
    "GEMMA": Family("GEMMA", _causal("GemmaForCausalLM", "GemmaConfig", head_dim=16), True, 16, output=None),
    "GEMMA2": Family("GEMMA2", _causal("Gemma2ForCausalLM", "Gemma2Config", head_dim=16), True, 16, output=None),
    "REWARD": Family("REWARD", _causal("LlamaForSequenceClassification", "LlamaConfig", num_labels=1,
                                       tie_word_embeddings=False), True, 8, output="score"),
    "PHI4": Family("PHI4", _causal("Phi3ForCausalLM", "Phi3Config", tie_word_embeddings=False), False, 8,
                   phi=True),
}


def tune_to_hf_rows(n_heads: int, hd: int) -> torch.Tensor:
    """``idx`` with ``hf = tune[idx]``: ``hf[h*hd + i*hd/2 + j] = tune[h*hd + 2j + i]``."""
    idx = torch.empty(n_heads * hd, dtype=torch.long)
    for h in range(n_heads):
        for i in range(2):
            for j in range(hd // 2):
                idx[h * hd + i * (hd // 2) + j] = h * hd + 2 * j + i
    return idx


def save_base(fam: Family, folder: Path, seed: int = 0) -> Any:
    torch.manual_seed(seed)
    model = fam.build().float().eval()
    model.save_pretrained(folder)
    return model


def hf_module_of(fam: Family, leaf: str, layer: int) -> tuple[str, slice | None]:
    """(HF module, its rows inside a fused module) of torchtune ``layers.{layer}.<attn|mlp>.{leaf}``."""
    if leaf == "output":
        assert fam.output is not None
        return fam.output, None
    return f"model.layers.{layer}.{ATTN.get(leaf) or MLP[leaf]}", None


def make_adapter(
    fam: Family, base_sd: dict[str, torch.Tensor], leaves: list[str], dora: bool, seed: int = 1
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, int]]]:
    """A torchtune adapter (random, non-zero lora_b); returns it and each module's (out, in)."""
    g = torch.Generator().manual_seed(seed)
    cfg = base_sd["__cfg__"]
    hd, nh, nkv = fam.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    adapter: dict[str, torch.Tensor] = {}
    shapes: dict[str, tuple[int, int]] = {}
    for n in range(cfg.num_hidden_layers):
        for leaf in leaves:
            if leaf == "output":
                continue
            if fam.phi and leaf in ("q_proj", "k_proj", "v_proj"):
                out = (nh if leaf == "q_proj" else nkv) * hd
                inp = cfg.hidden_size
            elif fam.phi and leaf in ("w1", "w3"):
                out, inp = cfg.intermediate_size, cfg.hidden_size
            else:
                w = base_sd[hf_module_of(fam, leaf, n)[0] + ".weight"]
                out, inp = w.shape
            mod = f"layers.{n}.{'attn' if leaf in ATTN else 'mlp'}.{leaf}"
            shapes[mod] = (out, inp)
    if "output" in leaves:
        w = base_sd[f"{fam.output}.weight"]
        shapes["output"] = tuple(w.shape)  # type: ignore[assignment]
    for mod, (out, inp) in shapes.items():
        adapter[f"{mod}.lora_a.weight"] = torch.randn(R, inp, generator=g) / inp**0.5
        adapter[f"{mod}.lora_b.weight"] = torch.randn(out, R, generator=g)
        if dora:
            adapter[f"{mod}.magnitude"] = torch.rand(out, generator=g) + 0.5
    return adapter, shapes


def expected_hf_weights(
    fam: Family, base_sd: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor], dora: bool
) -> dict[str, torch.Tensor]:
    """Base HF weights with the adapter merged by hand (LoRA: W + s·BA; DoRA: m·V/||V||_row)."""
    cfg = base_sd["__cfg__"]
    hd, nh, nkv = fam.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    delta: dict[str, torch.Tensor] = {}
    mags: dict[str, torch.Tensor] = {}
    for key in adapter:
        if not key.endswith(".lora_a.weight"):
            continue
        mod = key[: -len(".lora_a.weight")]
        a, b = adapter[key], adapter[f"{mod}.lora_b.weight"]
        d = SCALE * (b @ a)
        m = adapter.get(f"{mod}.magnitude")
        leaf = mod.rpartition(".")[2]
        if fam.permuted and leaf in ("q_proj", "k_proj"):
            idx = tune_to_hf_rows(nh if leaf == "q_proj" else nkv, hd)
            d = d[idx]
            m = None if m is None else m[idx]
        layer = int(mod.split(".")[1]) if mod.startswith("layers.") else -1
        if fam.phi and leaf in ("q_proj", "k_proj", "v_proj", "w1", "w3"):
            name = f"model.layers.{layer}." + ("self_attn.qkv_proj" if leaf in ATTN else "mlp.gate_up_proj")
            w = base_sd[name + ".weight"]
            sizes = {"q_proj": (0, nh * hd), "k_proj": (nh * hd, nkv * hd), "v_proj": ((nh + nkv) * hd, nkv * hd),
                     "w1": (0, cfg.intermediate_size), "w3": (cfg.intermediate_size, cfg.intermediate_size)}[leaf]
            full = delta.setdefault(name, torch.zeros_like(w))
            full[sizes[0]: sizes[0] + sizes[1]] += d
            if m is not None:
                mags.setdefault(name, torch.zeros(w.shape[0]))[sizes[0]: sizes[0] + sizes[1]] = m
            continue
        name = hf_module_of(fam, leaf, layer)[0]
        delta[name] = d
        if m is not None:
            mags[name] = m
    out = {}
    for name, d in delta.items():
        v = base_sd[name + ".weight"] + d
        if dora:
            v = mags[name][:, None] * v / torch.linalg.norm(v, dim=1, keepdim=True)
        out[name + ".weight"] = v
    return out


def base_state(model: Any) -> dict[str, Any]:
    sd: dict[str, Any] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    sd["__cfg__"] = model.config
    return sd


def save_adapter(
    fam: Family, ckpt: Path, out: Path, adapter: dict[str, torch.Tensor], leaves: list[str], dora: bool,
    adapter_only: bool = True, **kw: Any,
) -> Path:
    files = sorted(p.name for p in ckpt.glob("*.safetensors"))
    (ckpt / "original_repo_id.json").write_text(json.dumps({"repo_id": "org/tiny"}))
    ck = FullModelHFCheckpointer(str(ckpt), files, fam.model_type, str(out), **kw)
    state = ck.load_checkpoint()
    state["adapter"] = adapter
    state["adapter_config"] = {"r": R, "lora_alpha": ALPHA, "target_modules": list(leaves), "peft_type": "LORA"}
    before = copy.deepcopy(state)
    ck.save_checkpoint(state, epoch=0, adapter_only=adapter_only)
    assert state.keys() == before.keys()
    assert all(torch.equal(state["adapter"][k], before["adapter"][k]) for k in before["adapter"])
    assert state["adapter_config"] == before["adapter_config"]
    return out / "epoch_0"


def check_peft_load(folder: Path, base: Any, rename: Any = None) -> Any:
    """Load with PEFT; every tensor of our file must be in the loaded model, bit for bit (``rename``
    maps our checkpoint-style module names to the model's runtime names, for transformers 5)."""
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()
    loaded = peft.get_peft_model_state_dict(pm, save_embedding_layers=False)
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        ours = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    if rename is not None:
        p = "base_model.model."
        ours = {p + rename(k[len(p):]): v for k, v in ours.items()}
    assert set(loaded) == set(ours)
    bad = sorted(k for k, v in ours.items() if not torch.equal(loaded[k], v))
    assert not bad
    return pm


def logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def leaves_for(fam: Family, dora: bool) -> list[str]:
    leaves = list(ALL)
    if fam.phi and not dora:
        leaves = ["q_proj", "v_proj", "output_proj", "w1", "w3", "w2"]  # partial qkv: zero k block
    if fam.output is not None:
        leaves.append("output")
    return leaves


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_peft_loads_shardwise_adapter_exactly(tmp_path: Path, name: str, dora: bool) -> None:
    fam = FAMILIES[name]
    ckpt = tmp_path / "base"
    base = save_base(fam, ckpt)
    sd = base_state(base)
    leaves = leaves_for(fam, dora)
    adapter, _ = make_adapter(fam, sd, leaves, dora)
    folder = save_adapter(fam, ckpt, tmp_path / "out", adapter, leaves, dora)

    assert (folder / "adapter_model.pt").is_file()
    assert not list(folder.glob("model*.safetensors"))
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "org/tiny"
    assert cfg["peft_type"] == "LORA" and cfg["r"] == R and cfg["lora_alpha"] == ALPHA
    assert cfg.get("use_dora", False) is dora
    if fam.phi:
        assert "qkv_proj" in cfg["target_modules"] and "gate_up_proj" in cfg["target_modules"]
        k = 3 if dora else 2
        assert cfg["rank_pattern"] == {"qkv_proj": k * R, "gate_up_proj": 2 * R}
        assert cfg["alpha_pattern"] == {"qkv_proj": k * ALPHA, "gate_up_proj": 2 * ALPHA}

    pm = check_peft_load(folder, base)
    merged = copy.deepcopy(base)
    expected = expected_hf_weights(fam, sd, adapter, dora)
    missing, unexpected = merged.load_state_dict(expected, strict=False)
    assert not unexpected
    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(5))
    ref = logits(merged, ids)
    assert not torch.allclose(ref, logits(base, ids), atol=1e-3)  # the adapter changes the output
    # in float64: PEFT's unmerged forward (x W + s x A B) and the merged weights then differ only by
    # the float32 rounding of W + s B A, not by float32 accumulation order (~1e-4 on these logits)
    torch.testing.assert_close(logits(copy.deepcopy(pm).double(), ids), logits(merged.double(), ids),
                               rtol=1e-4, atol=1e-4)
    if dora:
        # PEFT's own merge of the DoRA adapter equals the hand-computed DoRA weights
        unloaded = pm.merge_and_unload().state_dict()
        for k, v in expected.items():
            torch.testing.assert_close(unloaded[k], v, rtol=1e-5, atol=1e-5)


def test_phi_partial_dora_falls_back_to_torchtune_format(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    fam = FAMILIES["PHI4"]
    ckpt = tmp_path / "base"
    base = save_base(fam, ckpt)
    leaves = ["q_proj", "v_proj", "output_proj"]
    adapter, _ = make_adapter(fam, base_state(base), leaves, dora=True)
    with caplog.at_level(logging.WARNING, logger="shardwise"):
        folder = save_adapter(fam, ckpt, tmp_path / "out", adapter, leaves, dora=True)
    assert (folder / "adapter_model.pt").is_file()
    assert not (folder / "adapter_model.safetensors").exists()
    assert not (folder / "adapter_config.json").exists()
    assert "saving to torchtune format instead" in caplog.text and "qkv_proj" in caplog.text
    assert "skipping adapter config save" in caplog.text


def test_bin_adapter_with_merged_model(tmp_path: Path) -> None:
    """safe_serialization=False: adapter_model.bin in PEFT keys, which PEFT loads too."""
    fam = FAMILIES["LLAMA3"]
    ckpt = tmp_path / "base"
    base = save_base(fam, ckpt)
    leaves = ["q_proj", "k_proj", "v_proj"]
    adapter, _ = make_adapter(fam, base_state(base), leaves, dora=False)
    folder = save_adapter(fam, ckpt, tmp_path / "out", adapter, leaves, False, adapter_only=False,
                          safe_serialization=False)
    assert (folder / "adapter_model.bin").is_file() and not (folder / "adapter_model.safetensors").exists()
    assert (folder / "pytorch_model.bin").is_file()  # named after the input model.safetensors
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()
    ours = torch.load(folder / "adapter_model.bin", weights_only=True)
    loaded = peft.get_peft_model_state_dict(pm, save_embedding_layers=False)
    assert set(loaded) == set(ours) and all(torch.equal(loaded[k], ours[k]) for k in ours)


# ------------------------------------------------------------------------------ Llama-3.2-Vision
def _mllama() -> Any:
    cfg = transformers.MllamaConfig(
        text_config=dict(hidden_size=64, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, cross_attention_layers=[1],
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=64),
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_global_layers=1,
                           attention_heads=2, image_size=28, patch_size=14, max_num_tiles=2,
                           supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]], intermediate_layers_indices=[0],
                           vision_output_dim=64),
        image_token_index=63,
    )
    return transformers.MllamaForConditionalGeneration(cfg)


def test_llama3_vision_adapter_loads_in_peft(tmp_path: Path) -> None:
    """torchtune's vision LoRA adapts some same-named modules (here: decoder self-attention q/k, the
    cross-attention q/v, one vision-encoder layer and the projector) but not others; PEFT must load
    exactly those, with self-attention q/k permuted and cross-attention not."""
    torch.manual_seed(0)
    base = _mllama().float().eval()
    ckpt = tmp_path / "base"
    base.save_pretrained(ckpt)
    hf = {k: v for k, v in base.state_dict().items()}
    g = torch.Generator().manual_seed(3)
    hd, nh, nkv = 16, 4, 2
    # torchtune module -> (HF module in checkpoint names, rows permuted with heads or None)
    mods = {
        "decoder.layers.0.attn.q_proj": ("language_model.model.layers.0.self_attn.q_proj", nh),
        "decoder.layers.2.attn.k_proj": ("language_model.model.layers.3.self_attn.k_proj", nkv),
        "decoder.layers.1.fusion_layer.attn.q_proj": ("language_model.model.layers.1.cross_attn.q_proj", None),
        "decoder.layers.1.fusion_layer.attn.v_proj": ("language_model.model.layers.1.cross_attn.v_proj", None),
        "decoder.layers.1.fusion_layer.mlp.w1": ("language_model.model.layers.1.mlp.gate_proj", None),
        "decoder.layers.1.attn.output_proj": ("language_model.model.layers.2.self_attn.o_proj", None),
        "encoder.clip.layers.1.attn.q_proj": ("vision_model.transformer.layers.1.self_attn.q_proj", None),
        "encoder.projection.output": ("multi_modal_projector", None),
        "decoder.output": ("language_model.lm_head", None),
    }
    runtime = {  # transformers 5 module names
        "language_model.model.": "model.language_model.", "vision_model.": "model.vision_model.",
        "multi_modal_projector": "model.multi_modal_projector", "language_model.lm_head": "lm_head",
    }

    def rt(name: str) -> str:
        for a, b in runtime.items():
            if name.startswith(a):
                return b + name[len(a):]
        return name

    adapter, expected = {}, {}
    for mod, (hf_mod, heads) in mods.items():
        w = hf[rt(hf_mod) + ".weight"]
        a = torch.randn(R, w.shape[1], generator=g) / w.shape[1] ** 0.5
        b = torch.randn(w.shape[0], R, generator=g)
        adapter[f"{mod}.lora_a.weight"], adapter[f"{mod}.lora_b.weight"] = a, b
        d = SCALE * (b @ a)
        if heads is not None:
            d = d[tune_to_hf_rows(heads, hd)]
        expected[rt(hf_mod) + ".weight"] = w + d
    files = sorted(p.name for p in ckpt.glob("*.safetensors"))
    ck = FullModelHFCheckpointer(str(ckpt), files, "LLAMA3_VISION", str(tmp_path / "out"))
    state = ck.load_checkpoint()
    state["adapter"] = adapter
    state["adapter_config"] = {"r": R, "lora_alpha": ALPHA, "peft_type": "LORA",
                               "target_modules": ["q_proj", "k_proj", "v_proj", "output_proj", "w1", "output"]}
    ck.save_checkpoint(state, epoch=0, adapter_only=True)
    folder = tmp_path / "out" / "epoch_0"
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert isinstance(cfg["target_modules"], str)

    pm = check_peft_load(folder, base)  # the keys use transformers 5 module names, as PEFT writes them
    adapted = {n for n, m in pm.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert {n.removeprefix("base_model.model.") for n in adapted} == {rt(h) for h, _ in mods.values()}
    merged = pm.merge_and_unload().state_dict()
    for k, v in expected.items():
        torch.testing.assert_close(merged[k], v, rtol=1e-5, atol=1e-5)
