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
from shardwise.model_types import candidates, infer_model_type, model_type_mismatch


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
    phi = _folder(tmp_path / "p", model_type="phi3", architectures=["Phi3ForCausalLM"])
    assert cli.main(["roundtrip", str(phi)]) == 2
    assert "PHI3_MINI, PHI4" in capsys.readouterr().err
