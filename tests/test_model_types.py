"""Model type vs config.json: the checkpointer warns when ``model_type`` contradicts the config (naming
both), the CLI refuses with exit 2 unless ``--force``, and infers ``--model-type`` from the config when
it is omitted (the ambiguous cases named in the error). The table is checked against the configs the
real ``transformers`` classes write."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from ckpt_factory import LlamaSpec, llama_state_dict, write_hf_checkpoint
from shardwise import FullModelHFCheckpointer, ModelType
from shardwise.cli import app as cli
from shardwise.convert import get_converter
from shardwise.model_types import SAME_CONVERSION, candidates, infer_model_type, model_type_mismatch, pick_model_type


def _folder(tmp_path: Path, **config: object) -> Path:
    spec = LlamaSpec()
    sd = llama_state_dict(spec)
    cfg = {**spec.config(), **config}
    write_hf_checkpoint(tmp_path / "hf", sd, [list(sd)], cfg, {"format": "pt"})
    return tmp_path / "hf"


def test_table_fits_the_configs_transformers_writes() -> None:
    """Every real model of test_models_real: its saved config (model_type + architectures) lists the
    model type the suite proves it with; inference gives it, or names it among the choices."""
    from test_models_real import CASES

    for name, case in CASES.items():
        model = case.build()
        cfg = {**model.config.to_dict(), "architectures": [type(model).__name__]}
        mt = ModelType[case.model_type]
        fits = candidates(cfg)
        assert fits is not None and mt in fits, (name, fits)
        assert model_type_mismatch(mt, cfg) is None
        try:
            assert infer_model_type(cfg) is mt, name
        except Exception as e:  # ambiguous: the error names every choice
            assert len(fits) > 1 and all(m.name in str(e) for m in fits), (name, e)


def test_checkpointer_warns_naming_both(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    hf = _folder(tmp_path)
    with caplog.at_level(logging.WARNING, logger="shardwise"):
        FullModelHFCheckpointer(str(hf), ["model.safetensors"], "LLAMA3", str(tmp_path / "ok"))
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="shardwise"):
        FullModelHFCheckpointer(str(hf), ["model.safetensors"], "QWEN2", str(tmp_path / "out"))
    (msg,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "QWEN2" in msg and "'llama'" in msg and "LlamaForCausalLM" in msg and str(hf / "config.json") in msg


def test_unknown_configs_are_not_judged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    hf = _folder(tmp_path, model_type="my_custom_llama", architectures=["MyCustomForCausalLM"])
    with caplog.at_level(logging.WARNING, logger="shardwise"):
        FullModelHFCheckpointer(str(hf), ["model.safetensors"], "LLAMA3", str(tmp_path / "out"))
    assert not caplog.records


def test_cli_refuses_a_contradiction_unless_forced(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hf = _folder(tmp_path)
    code = cli.main(["roundtrip", str(hf), "--model-type", "QWEN2"])
    err = capsys.readouterr().err
    assert code == 2 and "contradicts" in err and "QWEN2" in err and "llama" in err and "--force" in err
    code = cli.main(["convert", str(hf), str(tmp_path / "t"), "--to", "tune", "--model-type", "QWEN2"])
    assert code == 2 and not (tmp_path / "t").exists()
    capsys.readouterr()
    assert cli.main(["roundtrip", str(hf), "--model-type", "QWEN2", "--force", "-q"]) == 0


def test_cli_infers_the_model_type(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hf = _folder(tmp_path, model_type="qwen2", architectures=["Qwen2ForCausalLM"], tie_word_embeddings=False)
    code = cli.main(["roundtrip", str(hf), "--json", "-q"])
    out = capsys.readouterr().out
    assert code == 0 and json.loads(out)["model_type"] == "QWEN2"
    code = cli.main(["convert", str(hf), str(tmp_path / "tune"), "--to", "tune", "--json", "-q"])
    assert code == 0 and json.loads(capsys.readouterr().out)["model_type"] == "QWEN2"
    # a llama config without architectures also fits REWARD, whose conversion differs: ask
    bare = _folder(tmp_path / "b", model_type="llama", architectures=None)
    assert cli.main(["roundtrip", str(bare)]) == 2
    assert "LLAMA2, LLAMA3, LLAMA3_2, REWARD" in capsys.readouterr().err


def test_groups_that_convert_identically_share_one_converter() -> None:
    """``SAME_CONVERSION`` is what lets the CLI pick without asking: each group's members must have the
    same converter class, and every ambiguous architecture must be inside one group or ask."""
    for group in SAME_CONVERSION:
        assert len({type(get_converter(m)) for m in group}) == 1, group


@pytest.mark.parametrize(("config", "expected"), [
    ({"rope_scaling": {"rope_type": "llama3", "factor": 32.0}, "tie_word_embeddings": True}, "LLAMA3_2"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}, "tie_word_embeddings": False}, "LLAMA3"),
    ({"vocab_size": 128256, "tie_word_embeddings": False}, "LLAMA3"),
    ({"vocab_size": 32000, "tie_word_embeddings": False}, "LLAMA2"),
])
def test_a_llama_config_picks_by_its_hints_and_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        config: dict[str, object], expected: str) -> None:
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 256, **config}
    mt, note = pick_model_type(cfg)
    assert mt.name == expected and note is not None and expected in note and "convert identically" in note
    hf = _folder(tmp_path, **{k: v for k, v in config.items() if k == "rope_scaling"})
    picked, _ = pick_model_type(json.loads((hf / "config.json").read_text()))
    code = cli.main(["roundtrip", str(hf), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert json.loads(captured.out)["model_type"] == picked.name
    (line,) = [ln for ln in captured.err.splitlines() if "convert identically" in ln]
    assert line.startswith("shardwise roundtrip: model type ")


def test_phi_picks_phi4_by_its_vocabulary() -> None:
    phi = {"model_type": "phi3", "architectures": ["Phi3ForCausalLM"]}
    assert pick_model_type({**phi, "vocab_size": 100352})[0] is ModelType.PHI4
    assert pick_model_type({**phi, "vocab_size": 32064})[0] is ModelType.PHI3_MINI
    assert pick_model_type({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}) == (ModelType.QWEN2, None)
