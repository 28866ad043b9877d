"""Differential tests against torchtune 0.6.1 (the behaviour shardwise replaces).

1. Converters: for random HF state dicts, shardwise's ``hf_to_tune`` gives exactly torchtune's keys and
   tensors, and shardwise's save gives torchtune's HF tensors, except for the documented fixes, each
   asserted explicitly (Gemma2 norm swap, reward ``inv_freq``/``head_dim``, keys torchtune drops and
   shardwise keeps aside, CLIP/T5 save, tile tables with non-zero padding).
2. Builders: a real transformers checkpoint converted by shardwise loads into the torchtune model
   built by torchtune's own builder with ``strict=True`` (the names and shapes a recipe expects), and
   for Llama and Gemma2 the torchtune model computes the transformers model's logits.

Install: ``pip install torchtune==0.6.1 torchao==0.10.0 torchvision`` (torchvision only for CLIP and
Llama-3.2-Vision, whose torchtune packages import it)."""

from __future__ import annotations

import importlib
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_convert_families import FAMILIES, P, params

from shardwise.config import ModelConfig
from shardwise.constants import ModelType
from shardwise.convert import get_converter
from shardwise.convert.llama3_vision import VisionDims, tiles_tune_to_hf

_INSTALL = "pip install torchtune==0.6.1 torchao==0.10.0 torchvision"
try:
    import torchtune

    _TT_ERROR = None if torchtune.__version__.startswith("0.6.1") else f"torchtune {torchtune.__version__} != 0.6.1"
except Exception as e:  # noqa: BLE001 - any import failure means "not available"
    _TT_ERROR = f"torchtune 0.6.1 is not importable ({type(e).__name__}: {e}); install with `{_INSTALL}`"

try:
    import torchvision  # noqa: F401

    _TV_ERROR = None
except Exception as e:  # noqa: BLE001
    _TV_ERROR = f"torchvision is not importable ({type(e).__name__}); torchtune's clip/vision modules need it"

pytestmark = [pytest.mark.torchtune, pytest.mark.skipif(_TT_ERROR is not None, reason=_TT_ERROR or "")]
needs_torchvision = pytest.mark.skipif(_TV_ERROR is not None, reason=_TV_ERROR or "")

HF = dict[str, torch.Tensor]
_SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _tt(module: str) -> Any:
    return importlib.import_module(module)


def _ours(family: str, p: P) -> tuple[HF, dict[str, Any], Any, Any]:
    hf, cfg_dict = FAMILIES[family].make(p)
    cfg = ModelConfig(cfg_dict)
    conv = get_converter(FAMILIES[family].model_type)
    return hf, cfg_dict, conv.hf_to_tune(hf, cfg), conv


def _assert_equal_dicts(ours: HF, theirs: HF, skip: set[str] = frozenset()) -> None:  # type: ignore[assignment]
    assert set(ours) - skip == set(theirs) - skip, (sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours)))
    for k in set(theirs) - skip:
        assert ours[k].dtype == theirs[k].dtype and ours[k].shape == theirs[k].shape, k
        assert torch.equal(ours[k], theirs[k]), k


def _generic_args(cfg: dict[str, Any]) -> dict[str, Any]:
    return dict(num_heads=cfg["num_attention_heads"], num_kv_heads=cfg["num_key_value_heads"],
                dim=cfg["hidden_size"], head_dim=cfg.get("head_dim"))


# ----------------------------------------------------------------------------------------------------
# 1. converter functions
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["LLAMA2", "LLAMA3", "LLAMA3_2", "MISTRAL", "GEMMA"])
@_SETTINGS
@given(data=st.data())
def test_generic_matches_torchtune(family: str, data: st.DataObject) -> None:
    cw = _tt("torchtune.models.convert_weights")
    hf, cfg, res, conv = _ours(family, data.draw(params(family)))
    theirs = cw.hf_to_tune(dict(hf), **_generic_args(cfg))
    theirs, tied_head = _without_tied_head(hf, cfg, res, theirs)
    _assert_equal_dicts(res.tune, theirs)
    # what torchtune drops, shardwise keeps aside
    inv = {k for k in hf if "rotary_emb.inv_freq" in k}
    assert set(res.aside) == inv | tied_head
    ours_hf = conv.tune_to_hf(res.tune, ModelConfig(cfg), res.aside)
    skip = inv | ({"lm_head.weight"} if tied_head else set())
    _assert_equal_dicts(ours_hf, cw.tune_to_hf(dict(res.tune), **_generic_args(cfg)), skip=skip)


def _without_tied_head(hf, cfg, res, theirs):
    """Documented difference: with ``tie_word_embeddings`` a stored ``lm_head.weight`` becomes
    torchtune's ``output.weight``, which its ``TiedLinear`` models reject under strict loading;
    shardwise keeps it aside (with the embedding it ties to) and writes it back on save."""
    if not (cfg.get("tie_word_embeddings") and "lm_head.weight" in hf):
        return theirs, set()
    assert "output.weight" in theirs and "output.weight" not in res.tune
    assert torch.equal(res.aside["lm_head.weight"], hf["lm_head.weight"])
    return {k: v for k, v in theirs.items() if k != "output.weight"}, {"lm_head.weight", "model.embed_tokens.weight"}


@_SETTINGS
@given(data=st.data())
def test_gemma2_matches_torchtune_except_the_norm_swap(data: st.DataObject) -> None:
    mod = _tt("torchtune.models.gemma2._convert_weights")
    hf, cfg, res, conv = _ours("GEMMA2", data.draw(params("GEMMA2")))
    theirs = mod.gemma2_hf_to_tune(dict(hf), **_generic_args(cfg))
    theirs, tied_head = _without_tied_head(hf, cfg, res, theirs)
    swapped = {k for k in theirs if k.endswith(("mlp_norm.scale", "mlp_scale.scale"))}
    _assert_equal_dicts(res.tune, theirs, skip=swapped)
    # torchtune 0.6.1 bug (fixed upstream later): pre/post feed-forward norms swapped
    for k in swapped:
        other = k.replace("mlp_norm", "@").replace("mlp_scale", "mlp_norm").replace("@", "mlp_scale")
        assert torch.equal(res.tune[k], theirs[other])
        n = k.split(".")[1]
        pre = hf[f"model.layers.{n}.pre_feedforward_layernorm.weight"]
        assert torch.equal(res.tune[f"layers.{n}.mlp_norm.scale"], pre)
    # the reverse direction of torchtune's own dict gives the same HF tensors as ours of ours
    ours_hf = conv.tune_to_hf(res.tune, ModelConfig(cfg), res.aside)
    _assert_equal_dicts(ours_hf, mod.gemma2_tune_to_hf(dict(theirs), **_generic_args(cfg)), skip=set(res.aside))


@pytest.mark.parametrize("family", ["PHI3_MINI", "PHI4"])
@_SETTINGS
@given(data=st.data())
def test_phi3_matches_torchtune(family: str, data: st.DataObject) -> None:
    mod = _tt("torchtune.models.phi3._convert_weights")
    p = data.draw(params(family))
    p = P(**{**p.__dict__, "inv_freq": False})  # torchtune raises on inv_freq (see below)
    hf, cfg, res, conv = _ours(family, p)
    mha = cfg["num_attention_heads"] == cfg["num_key_value_heads"]
    args = (None, None, None) if mha else (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"])
    theirs = mod.phi3_hf_to_tune(dict(hf), *args)
    _assert_equal_dicts(res.tune, theirs)
    ours_hf = conv.tune_to_hf(res.tune, ModelConfig(cfg), res.aside)
    _assert_equal_dicts(ours_hf, mod.phi3_tune_to_hf(dict(res.tune)))


def test_phi3_inv_freq_kept_where_torchtune_raises() -> None:
    mod = _tt("torchtune.models.phi3._convert_weights")
    hf, cfg, res, _ = _ours("PHI4", P(inv_freq=True, explicit_head_dim=False, hidden=32))
    with pytest.raises(Exception, match="inv_freq"):
        mod.phi3_hf_to_tune(dict(hf), cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"])
    assert set(res.aside) == {k for k in hf if "inv_freq" in k}


@pytest.mark.parametrize("family", ["QWEN2"])
@_SETTINGS
@given(data=st.data())
def test_qwen2_matches_torchtune(family: str, data: st.DataObject) -> None:
    mod = _tt("torchtune.models.qwen2._convert_weights")
    hf, cfg, res, conv = _ours(family, data.draw(params(family)))
    tied = cfg["tie_word_embeddings"]
    theirs = mod.qwen2_hf_to_tune(dict(hf), **_generic_args(cfg), tie_word_embeddings=tied)
    _assert_equal_dicts(res.tune, theirs)
    ours_hf = conv.tune_to_hf(res.tune, ModelConfig(cfg), res.aside)
    theirs_hf = mod.qwen2_tune_to_hf(dict(res.tune), **_generic_args(cfg), tie_word_embeddings=tied)
    # torchtune never writes back a tied lm_head.weight nor inv_freq; shardwise writes what the input had
    extra = set(ours_hf) - set(theirs_hf)
    head = {"lm_head.weight"} if tied and "lm_head.weight" in hf else set()
    assert extra == {k for k in hf if "inv_freq" in k} | head
    _assert_equal_dicts(ours_hf, theirs_hf, skip=extra)


@_SETTINGS
@given(data=st.data())
def test_reward_matches_torchtune_where_torchtune_is_right(data: st.DataObject) -> None:
    mod = _tt("torchtune.rlhf.utils._convert_weights")
    p = data.draw(params("REWARD"))
    # torchtune ignores head_dim and mishandles inv_freq: compare where those do not matter
    p = P(**{**p.__dict__, "inv_freq": False, "explicit_head_dim": False, "hidden": p.heads * p.head_dim})
    hf, cfg, res, conv = _ours("REWARD", p)
    args = dict(num_heads=cfg["num_attention_heads"], num_kv_heads=cfg["num_key_value_heads"], dim=cfg["hidden_size"])
    _assert_equal_dicts(res.tune, mod.reward_hf_to_tune(dict(hf), **args))
    assert set(res.aside) == ({"score.bias"} & set(hf))  # torchtune drops score.bias for good
    ours_hf = conv.tune_to_hf(res.tune, ModelConfig(cfg), res.aside)
    _assert_equal_dicts(ours_hf, mod.reward_tune_to_hf(dict(res.tune), **args), skip=set(res.aside))


def test_reward_inv_freq_bug_not_repeated() -> None:
    mod = _tt("torchtune.rlhf.utils._convert_weights")
    hf, cfg, res, _ = _ours("REWARD", P(inv_freq=True, explicit_head_dim=False, hidden=32, layers=2))
    args = dict(num_heads=cfg["num_attention_heads"], num_kv_heads=cfg["num_key_value_heads"], dim=cfg["hidden_size"])
    theirs = mod.reward_hf_to_tune(dict(hf), **args)
    # torchtune assigns the inv_freq tensor to the previously converted key
    wrong = [k for k in theirs if not torch.equal(theirs[k], res.tune[k]) or theirs[k].shape != res.tune[k].shape]
    assert wrong, "torchtune 0.6.1's inv_freq overwrite no longer reproduces"
    assert all(any(t is hf[k] for k in hf if "inv_freq" in k) for t in (theirs[k] for k in wrong))
    assert set(res.aside) == {k for k in hf if "inv_freq" in k}


def test_reward_head_dim_honoured() -> None:
    """torchtune ignores head_dim (permutation shape error); shardwise permutes with it."""
    mod = _tt("torchtune.rlhf.utils._convert_weights")
    hf, cfg, res, _ = _ours("REWARD", P(heads=2, kv_heads=1, head_dim=8, hidden=12))
    with pytest.raises(RuntimeError):
        mod.reward_hf_to_tune(dict(hf), num_heads=2, num_kv_heads=1, dim=12)
    cw = _tt("torchtune.models.convert_weights")
    generic = cw.hf_to_tune({k: v for k, v in hf.items() if not k.startswith("score")}, num_heads=2,
                            num_kv_heads=1, dim=12, head_dim=8)
    _assert_equal_dicts({k: v for k, v in res.tune.items() if k != "output.weight"}, generic)


@needs_torchvision
@_SETTINGS
@given(data=st.data())
def test_clip_text_matches_torchtune(data: st.DataObject) -> None:
    mod = _tt("torchtune.models.clip._convert_weights")
    hf, _, res, _ = _ours("CLIP_TEXT", data.draw(params("CLIP_TEXT")))
    _assert_equal_dicts(res.tune, mod.clip_text_hf_to_tune(dict(hf)))
    assert set(res.aside) == set(hf) - {k for k in hf if k.startswith("text_model.") and "position_ids" not in k}


@_SETTINGS
@given(data=st.data())
def test_t5_encoder_matches_torchtune(data: st.DataObject) -> None:
    mod = _tt("torchtune.models.t5._convert_weights")
    hf, _, res, _ = _ours("T5_ENCODER", data.draw(params("T5_ENCODER")))
    theirs = mod.t5_encoder_hf_to_tune(dict(hf))
    if "encoder.embed_tokens.weight" in hf:
        _assert_equal_dicts(res.tune, theirs)
    else:
        # recent transformers store the encoder embedding only as shared.weight: torchtune loses it
        assert "token_embedding.weight" not in theirs
        assert res.tune["token_embedding.weight"] is hf["shared.weight"]
        _assert_equal_dicts(res.tune, theirs, skip={"token_embedding.weight"})


@needs_torchvision
@_SETTINGS
@given(data=st.data())
def test_llama3_vision_matches_torchtune(data: st.DataObject) -> None:
    mod = _tt("torchtune.models.llama3_2_vision._convert_weights")
    hf, cfg, res, conv = _ours("LLAMA3_VISION", data.draw(params("LLAMA3_VISION")))
    text, vision = cfg["text_config"], cfg["vision_config"]
    args = dict(
        num_heads=text["num_attention_heads"], num_kv_heads=text["num_key_value_heads"], dim=text["hidden_size"],
        head_dim=text.get("head_dim"), vocab_size=text["vocab_size"],
        cross_attention_layers=text["cross_attention_layers"], encoder_dim=vision["hidden_size"],
        tile_size=vision["image_size"], num_tiles=vision["max_num_tiles"],
        supported_aspect_ratios=vision["supported_aspect_ratios"],
    )
    theirs = mod.llama3_vision_hf_to_tune(dict(hf), **args)
    _assert_equal_dicts(res.tune, theirs)
    ours_hf = conv.tune_to_hf(res.tune, ModelConfig(cfg), res.aside)
    theirs_hf = mod.llama3_vision_tune_to_hf(dict(res.tune), **args)
    tables = {k for k in res.aside if "positional_embedding" in k}
    inv = {k for k in res.aside if "inv_freq" in k}
    _assert_equal_dicts(ours_hf, theirs_hf, skip=tables | inv)
    dims = VisionDims.from_config(ModelConfig(cfg))
    for k in tables:
        # torchtune rebuilds (losing the padding row / unused slots); shardwise writes the original back
        assert torch.equal(ours_hf[k], hf[k])
        tune_key = {"tile_embedding": "encoder.clip.token_pos_embedding.global_token_positional_embedding",
                    "pre_tile": "encoder.clip.pre_tile_pos_embed.embedding",
                    "post_tile": "encoder.clip.post_tile_pos_embed.embedding"}
        name = next(v for s, v in tune_key.items() if s in k)
        assert torch.equal(theirs_hf[k], tiles_tune_to_hf(res.tune[name], dims))


# ----------------------------------------------------------------------------------------------------
# 2. torchtune's builders load what shardwise produced from real transformers checkpoints
# ----------------------------------------------------------------------------------------------------


def _hf_state(model: Any) -> HF:
    """The tensors ``save_pretrained`` writes (tied duplicates and non-persistent buffers left out)."""
    import tempfile

    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        out: HF = {}
        import pathlib

        for f in sorted(pathlib.Path(d).glob("*.safetensors")):
            out.update(load_file(f))
        return out


def _tt_model(name: str) -> Any:
    common = dict(vocab_size=96, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, max_seq_len=64)
    if name == "llama3":
        return _tt("torchtune.models.llama3._component_builders").llama3(**common, intermediate_dim=96,
                                                                           rope_base=10000)
    if name == "llama3_2_tied":
        return _tt("torchtune.models.llama3_2._component_builders").llama3_2(**common, intermediate_dim=96,
                                                                               tie_word_embeddings=True)
    if name == "mistral":
        return _tt("torchtune.models.mistral._component_builders").mistral(**common, intermediate_dim=96)
    if name == "gemma":
        return _tt("torchtune.models.gemma._component_builders").gemma(**common, head_dim=32, intermediate_dim=96)
    if name == "gemma2":
        return _tt("torchtune.models.gemma2._component_builders").gemma2(
            **common, head_dim=32, intermediate_dim=96, query_pre_attn_scalar=32)
    if name == "phi4":
        return _tt("torchtune.models.phi3._component_builders").phi3(**common, intermediate_dim=96)
    if name == "phi3_mini":
        return _tt("torchtune.models.phi3._component_builders").phi3(**{**common, "num_kv_heads": 4},
                                                                       intermediate_dim=96)
    if name in ("qwen2", "qwen2_tied"):
        return _tt("torchtune.models.qwen2._component_builders").qwen2(
            **common, intermediate_dim=96, tie_word_embeddings=name == "qwen2_tied")
    if name == "reward":
        return _tt("torchtune.models.llama2._component_builders").llama2_classifier(
            num_classes=1, **common, intermediate_dim=96)
    if name == "clip":
        return _tt("torchtune.models.clip._component_builders").clip_text_encoder(
            embed_dim=32, num_heads=2, num_layers=2, vocab_size=96, max_seq_len=16)
    if name in ("t5_encoder", "t5_seq2seq"):
        return _tt("torchtune.models.t5._component_builders").t5_encoder(
            embed_dim=32, mlp_dim=64, num_heads=4, head_dim=8, num_layers=2, rel_pos_num_buckets=8,
            rel_pos_max_dist=128, vocab_size=96, norm_eps=1e-6, max_seq_len=32)
    if name == "mllama":
        b = _tt("torchtune.models.llama3_2_vision._component_builders")
        fusion = _tt("torchtune.modules.model_fusion")
        encoder = b.llama3_2_vision_encoder(
            patch_size=14, num_heads=2, clip_embed_dim=32, clip_num_layers=2, clip_hidden_states=[0],
            num_layers_projection=1, decoder_embed_dim=64, tile_size=28, max_num_tiles=2, in_channels=3)
        decoder = b.llama3_2_vision_decoder(
            vocab_size=96, num_layers=2, fusion_interval=2, num_special_tokens=8, num_heads=4, num_kv_heads=2,
            embed_dim=64, max_seq_len=64, encoder_max_seq_len=64, intermediate_dim=96)
        return fusion.DeepFusionModel(decoder=decoder, encoder=encoder)
    raise KeyError(name)


_BUILDER_CASES = ["llama3", "llama3_2_tied", "mistral", "gemma", "gemma2", "phi3_mini", "phi4", "qwen2",
                  "qwen2_tied", "reward", "clip", "t5_encoder", "t5_seq2seq", "mllama"]


@pytest.mark.parametrize("name", _BUILDER_CASES)
def test_torchtune_builder_loads_strict(name: str) -> None:
    if name in ("clip", "mllama") and _TV_ERROR:
        pytest.skip(_TV_ERROR)
    from test_models_real import CASES

    case = CASES[name]
    torch.manual_seed(0)
    hf_model = case.build()
    hf = _hf_state(hf_model)
    cfg = ModelConfig(hf_model.config.to_dict())
    res = get_converter(ModelType[case.model_type]).hf_to_tune(hf, cfg)
    tt_model = _tt_model(name)
    expected = tt_model.state_dict()
    assert set(res.tune) == set(expected), (sorted(set(res.tune) - set(expected)),
                                           sorted(set(expected) - set(res.tune)))
    for k, t in expected.items():
        assert tuple(res.tune[k].shape) == tuple(t.shape), (k, res.tune[k].shape, t.shape)
    tt_model.load_state_dict(res.tune, strict=True)


def _logits_pair(hf_model: Any, tt_model: Any, tune: HF) -> tuple[torch.Tensor, torch.Tensor]:
    """(torchtune model's logits with ``tune`` loaded, transformers model's logits) on a fixed input."""
    tt_model.load_state_dict(tune, strict=True)
    ids = torch.tensor([[1, 5, 17, 33, 60, 2, 9, 44]])
    hf_model.eval()
    tt_model.eval()
    with torch.no_grad():
        return tt_model(ids), hf_model(input_ids=ids).logits


def test_llama_logits_match_torchtune_model() -> None:
    """The q/k permutation is right: torchtune's Llama-2 model (plain RoPE, base 10000, like transformers'
    default Llama config) computes transformers' logits from shardwise's weights."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    hf_model = transformers.LlamaForCausalLM(cfg)
    res = get_converter(ModelType.LLAMA2).hf_to_tune(dict(_hf_state(hf_model)), ModelConfig(cfg.to_dict()))
    tt_model = _tt("torchtune.models.llama2._component_builders").llama2(
        vocab_size=96, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, max_seq_len=64,
        intermediate_dim=96, norm_eps=1e-5)
    got, expected = _logits_pair(hf_model, tt_model, res.tune)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    # without the q/k permutation the logits are far off
    hf = _hf_state(hf_model)
    unpermuted = dict(res.tune)
    for n in range(2):
        for proj in ("q_proj", "k_proj"):
            unpermuted[f"layers.{n}.attn.{proj}.weight"] = hf[f"model.layers.{n}.self_attn.{proj}.weight"]
    wrong, _ = _logits_pair(hf_model, tt_model, unpermuted)
    assert (wrong - expected).abs().max() > 100 * (got - expected).abs().max()


def test_gemma2_logits_match_only_with_the_norm_fix() -> None:
    """With shardwise's mapping torchtune's Gemma2 computes transformers' logits; with torchtune 0.6.1's
    own converter (pre/post feed-forward norms swapped) it does not."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.Gemma2Config(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                    query_pre_attn_scalar=32, max_position_embeddings=64, pad_token_id=0,
                                    bos_token_id=1, eos_token_id=2)
    hf_model = transformers.Gemma2ForCausalLM(cfg)
    with torch.no_grad():  # make the feed-forward norms differ so that a swap is visible
        for layer in hf_model.model.layers:
            layer.pre_feedforward_layernorm.weight.uniform_(-1, 1)
            layer.post_feedforward_layernorm.weight.uniform_(-1, 1)
    hf = _hf_state(hf_model)
    res = get_converter(ModelType.GEMMA2).hf_to_tune(hf, ModelConfig(cfg.to_dict()))
    got, expected = _logits_pair(hf_model, _tt_model("gemma2"), res.tune)
    scale = expected.abs().max()
    # torchtune 0.6.1's Gemma2 and transformers 5's differ by ~0.2% numerically (also at position 0, so
    # not in the weights' mapping); a mis-mapped norm is off by ~100%
    assert (got - expected).abs().max() < 0.01 * scale
    mod = _tt("torchtune.models.gemma2._convert_weights")
    buggy = mod.gemma2_hf_to_tune(dict(hf), num_heads=4, num_kv_heads=2, dim=64, head_dim=32)
    wrong, _ = _logits_pair(hf_model, _tt_model("gemma2"), buggy)
    assert (wrong - expected).abs().max() > 0.3 * scale
