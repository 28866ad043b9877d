"""Typed errors where raw ones escaped: a meta tensor in the state dict, an output folder that cannot be
created, a mapped source file truncated by someone else, and ``..`` in recipe/adapter checkpoint paths."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ckpt_factory import LlamaSpec, llama_state_dict
from shardwise import CheckpointError, CheckpointIOError, FullModelHFCheckpointer


def _hf(folder: Path, fmt: str = "safetensors") -> tuple[LlamaSpec, str]:
    spec = LlamaSpec(hidden=64, intermediate=96, vocab=512)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(spec.config()))
    sd = llama_state_dict(spec)
    if fmt == "safetensors":
        save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
        return spec, "model.safetensors"
    torch.save(sd, folder / "pytorch_model.bin")
    return spec, "pytorch_model.bin"


@pytest.mark.parametrize("where", ["model", "adapter"])
def test_meta_tensor_is_a_checkpoint_error_naming_the_key(tmp_path: Path, where: str) -> None:
    _, name = _hf(tmp_path / "hf")
    ck = FullModelHFCheckpointer(str(tmp_path / "hf"), [name], "LLAMA3", str(tmp_path / "out"))
    model = dict(ck.load_checkpoint()["model"])
    state: dict = {"model": model}
    if where == "model":
        model["layers.0.attn.q_proj.weight"] = torch.empty(model["layers.0.attn.q_proj.weight"].shape, device="meta")
        key = "layers.0.attn.q_proj.weight"
    else:
        key = "layers.0.attn.q_proj.lora_a.weight"
        state["adapter"] = {key: torch.empty(2, 64, device="meta")}
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.") + ".*meta tensor"):
        ck.save_checkpoint(state, epoch=0)
    assert not (tmp_path / "out" / "epoch_0").exists()


def test_output_dir_that_cannot_be_created_is_a_checkpoint_io_error(tmp_path: Path) -> None:
    _, name = _hf(tmp_path / "hf")
    (tmp_path / "file").write_text("in the way")
    with pytest.raises(CheckpointIOError, match="cannot create the output folder") as e:
        FullModelHFCheckpointer(str(tmp_path / "hf"), [name], "LLAMA3", str(tmp_path / "file" / "out"))
    assert e.value.filename == str(tmp_path / "file" / "out")
    # the folder vanished and a file took its place after construction: the save says so, typed
    out = tmp_path / "out"
    ck = FullModelHFCheckpointer(str(tmp_path / "hf"), [name], "LLAMA3", str(out / "sub"))
    state = ck.load_checkpoint()
    (out / "sub").rmdir()
    out.rmdir()
    out.write_text("in the way")
    with pytest.raises(CheckpointIOError, match="cannot create"):
        ck.save_checkpoint(state, epoch=0)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_truncated_source_is_named_not_the_output(tmp_path: Path, fmt: str) -> None:
    """The tensors from load_checkpoint are views of the files: someone truncating one in place is
    reported as that file's problem before a page of it is read."""
    _, name = _hf(tmp_path / "hf", fmt)
    ck = FullModelHFCheckpointer(str(tmp_path / "hf"), [name], "LLAMA3", str(tmp_path / "out"),
                                 safe_serialization=fmt == "safetensors")
    state = ck.load_checkpoint()
    os.truncate(tmp_path / "hf" / name, 4096)
    with pytest.raises(CheckpointIOError, match="truncated from") as e:
        ck.save_checkpoint(state, epoch=0)
    assert e.value.filename == str(tmp_path / "hf" / name)
    assert not (tmp_path / "out" / "epoch_0").exists()


def test_replaced_source_is_fine(tmp_path: Path) -> None:
    """A file replaced by a new one (a new inode) leaves the mapping intact: the save works."""
    _, name = _hf(tmp_path / "hf")
    ck = FullModelHFCheckpointer(str(tmp_path / "hf"), [name], "LLAMA3", str(tmp_path / "out"))
    state = ck.load_checkpoint()
    p = tmp_path / "hf" / name
    p.unlink()
    p.write_bytes(b"x")
    ck.save_checkpoint(state, epoch=0)
    assert (tmp_path / "out" / "epoch_0" / name).stat().st_size > 4096


def test_truncated_during_the_write_is_named_too(tmp_path: Path) -> None:
    """Truncated after the check, while the native writer copies mapped pages (pwrite fails with EFAULT):
    still the source file's error. QWEN2 (no permutation), so no Python code reads the pages; run in a
    subprocess so that a SIGBUS could never take the test process down."""
    spec = LlamaSpec(hidden=64, intermediate=96, vocab=4096)
    hf = tmp_path / "hf"
    hf.mkdir()
    cfg = spec.config()
    cfg.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"])
    (hf / "config.json").write_text(json.dumps(cfg))
    sd = llama_state_dict(spec)
    save_file(sd, hf / "model.safetensors", metadata={"format": "pt"})
    script = textwrap.dedent(f"""
        import os
        from shardwise.store.local import LocalOutput
        from shardwise import CheckpointIOError, FullModelHFCheckpointer
        ck = FullModelHFCheckpointer({str(hf)!r}, ["model.safetensors"], "QWEN2", {str(tmp_path / "out")!r})
        state = ck.load_checkpoint()
        original = LocalOutput.write_files
        def truncating(self, groups):
            os.truncate({str(hf / "model.safetensors")!r}, 4096)
            return original(self, groups)
        LocalOutput.write_files = truncating
        try:
            ck.save_checkpoint(state, epoch=0)
        except CheckpointIOError as e:
            print("NAMED", e.filename, "truncated from" in str(e))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["NAMED", str(hf / "model.safetensors"), "True"], proc.stderr


@pytest.mark.parametrize("arg", ["recipe_checkpoint", "adapter_checkpoint"])
def test_recipe_and_adapter_paths_cannot_climb_out_of_output_dir(tmp_path: Path, arg: str) -> None:
    """The same traversal rule as checkpoint_files: relative to output_dir, no ``..``."""
    _, name = _hf(tmp_path / "hf")
    out = tmp_path / "out"
    ck = FullModelHFCheckpointer(str(tmp_path / "hf"), [name], "LLAMA3", str(out))
    state = ck.load_checkpoint()
    ck.save_checkpoint({**state, "seed": 0}, epoch=0, intermediate_checkpoint=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    torch.save({"seed": 0}, elsewhere / "x.pt")
    with pytest.raises(ValueError, match=f"{arg} name .*escapes"):
        FullModelHFCheckpointer(str(tmp_path / "hf"), [name], "LLAMA3", str(out), should_load_recipe_state=True,
                                **{arg: "../elsewhere/x.pt"})
