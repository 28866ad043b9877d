"""What torchtune prints, shardwise prints: the INFO lines (shard sizes and final paths, the published
folder, the recipe state, which folder a resume loads) reach stderr in a plain script and inside a
torchtune recipe (its ``utils.get_logger`` handler, a ``config.instantiate``d checkpointer), the root
logger is never configured, and an application's own logging config prints each line once."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from safetensors.torch import save_file

from ckpt_factory import LlamaSpec, llama_state_dict

_FLOW = """
import logging
root_before = list(logging.getLogger().handlers), logging.getLogger().level
from shardwise import FullModelHFCheckpointer
ck = make(should_load_recipe_state=False)
state = ck.load_checkpoint()
ck.save_checkpoint({"model": state["model"], "seed": 1, "epochs_run": 1}, epoch=0, intermediate_checkpoint=True)
ck = make(should_load_recipe_state=True)
ck.load_checkpoint()
assert (list(logging.getLogger().handlers), logging.getLogger().level) == root_before  # shardwise left it alone
print("ROOT-CLEAN")
"""


def _run(tmp_path: Path, prelude: str) -> subprocess.CompletedProcess[str]:
    spec = LlamaSpec()
    hf = tmp_path / "hf"
    hf.mkdir()
    save_file(llama_state_dict(spec), hf / "model.safetensors", metadata={"format": "pt"})
    (hf / "config.json").write_text(json.dumps(spec.config()))
    script = textwrap.dedent(prelude).format(hf=str(hf), out=str(tmp_path / "out")) + _FLOW
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)


_PLAIN = """
def make(**kw):
    from shardwise import FullModelHFCheckpointer
    return FullModelHFCheckpointer("{hf}", ["model.safetensors"], "LLAMA3", "{out}", **kw)
"""


def _check(proc: subprocess.CompletedProcess[str], out: Path, once: bool = True) -> None:
    assert proc.returncode == 0, proc.stderr
    assert "ROOT-CLEAN" in proc.stdout
    err = proc.stderr
    shard = f"Model checkpoint of size 0.00 GiB saved to {out / 'epoch_0' / 'model.safetensors'}"
    for line in [shard, f"Checkpoint saved to {out / 'epoch_0'}", "Recipe checkpoint of size",
                 "Loading the recipe state using:", str(out / "epoch_0" / "model.safetensors")]:
        assert line in err, (line, err)
    assert ".shardwise-" not in err  # no staging paths: the lines name the files a user will find
    if once:
        assert err.count(shard) == 1, err


def test_plain_script_shows_info_lines(tmp_path: Path) -> None:
    _check(_run(tmp_path, _PLAIN), tmp_path / "out")


def test_application_logging_config_prints_each_line_once(tmp_path: Path) -> None:
    proc = _run(tmp_path, """
import logging, sys
logging.basicConfig(level=logging.WARNING, format="APP|%(name)s|%(message)s", stream=sys.stderr)
""" + _PLAIN)
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr  # the application's handler prints them, in its format, and nothing else does
    assert "APP|shardwise|Checkpoint saved to" in err, err
    assert err.count("Checkpoint saved to") == 1, err


def test_inside_a_torchtune_recipe(tmp_path: Path) -> None:
    pytest.importorskip("torchtune")
    proc = _run(tmp_path, """
from omegaconf import OmegaConf
from torchtune import config, utils
log = utils.get_logger("DEBUG")  # what every torchtune recipe does at import
log.info("recipe started")

def make(**kw):
    cfg = OmegaConf.create(dict(_component_="shardwise.FullModelHFCheckpointer", checkpoint_dir="{hf}",
                                checkpoint_files=["model.safetensors"], model_type="LLAMA3", output_dir="{out}",
                                **kw))
    return config.instantiate(cfg)
""")
    assert "recipe started" in proc.stderr
    _check(proc, tmp_path / "out")
