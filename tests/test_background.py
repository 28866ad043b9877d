"""Background saves: ``FullModelHFCheckpointer.save_checkpoint(..., background=True)`` and
``shardwise.dcp.async_save`` return once the state is staged; what changes afterwards is not in the
checkpoint; errors surface from ``result()`` and from the next save; a process killed during the
background write leaves the previous checkpoint complete and nothing new that looks complete; a
collective (DTensor) background save equals a synchronous one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import dist_scenarios as S
import pytest
import torch
from dist_helpers import run_ranks

from ckpt_factory import LlamaSpec, llama_state_dict, split_keys, write_hf_checkpoint
from shardwise import CheckpointError, FullModelHFCheckpointer
from shardwise.staging import Stager

SPEC = LlamaSpec()


@pytest.fixture
def hf(tmp_path: Path) -> tuple[Path, list[str]]:
    sd = llama_state_dict(SPEC, seed=3)
    names = write_hf_checkpoint(tmp_path / "hf", sd, split_keys(list(sd), [10]), SPEC.config())
    return tmp_path / "hf", names


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_values_changed_after_the_call_are_not_in_the_checkpoint(hf, tmp_path: Path) -> None:
    folder, names = hf
    ck = FullModelHFCheckpointer(str(folder), names, "LLAMA3", str(tmp_path / "out"))
    state = ck.load_checkpoint()
    model = {k: v.clone() for k, v in state["model"].items()}  # writable: training owns these
    opt = {"state": {0: {"exp_avg": torch.ones(4)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    future = ck.save_checkpoint({"model": model, "optimizer": opt, "epochs_run": 1}, epoch=0,
                                intermediate_checkpoint=True, background=True)
    assert future is not None
    for t in model.values():  # the next training step, right away
        t.add_(1)
    opt["state"][0]["exp_avg"].mul_(7)
    opt["param_groups"][0]["lr"] = 0.5
    future.result(timeout=120)
    assert future.done()
    out = tmp_path / "out" / "epoch_0"
    for n in names:  # unchanged weights: the original shards, byte for byte
        assert (out / n).read_bytes() == (folder / n).read_bytes()
    recipe = torch.load(tmp_path / "out" / "recipe_state" / "recipe_state.pt", weights_only=True)
    assert torch.equal(recipe["optimizer"]["state"][0]["exp_avg"], torch.ones(4))
    assert recipe["optimizer"]["param_groups"][0]["lr"] == 0.1 and recipe["epochs_run"] == 1


def test_an_error_surfaces_from_result_and_else_from_the_next_save(hf, tmp_path: Path, monkeypatch) -> None:
    from shardwise.store.local import LocalOutput

    folder, names = hf
    ck = FullModelHFCheckpointer(str(folder), names, "LLAMA3", str(tmp_path / "out"))
    state = ck.load_checkpoint()
    real = LocalOutput.write_files

    def full_disk(self, groups):
        raise OSError(28, "No space left on device (injected)")

    monkeypatch.setattr(LocalOutput, "write_files", full_disk)
    failed = ck.save_checkpoint(state, epoch=0, background=True)
    assert failed is not None
    with pytest.raises(OSError, match="injected"):
        failed.result(timeout=120)
    unseen = ck.save_checkpoint(state, epoch=1, background=True)  # its error is never looked at
    assert unseen is not None
    with pytest.raises(CheckpointError, match="previous background save to .*epoch_1 failed.*injected"):
        ck.save_checkpoint(state, epoch=2)  # waits for epoch_1 first, and writes nothing
    monkeypatch.setattr(LocalOutput, "write_files", real)
    assert ck.save_checkpoint(state, epoch=3) is None  # reported once; the next save goes ahead
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["epoch_3"]


def test_staging_buffers_are_reused_and_bounded() -> None:
    stager = Stager()
    a = {"w": torch.randn(8, 4), "b": torch.randn(3), "n": 3}
    first = stager.stage(a)
    second = stager.stage({"w": torch.randn(8, 4), "b": torch.randn(5), "n": 4})
    assert first["w"].data_ptr() == second["w"].data_ptr()  # the same buffer, save after save
    assert first["b"].data_ptr() != second["b"].data_ptr() and second["b"].shape == (5,)
    assert second["n"] == 4
    stager.stage({"w": torch.randn(8, 4)})
    assert set(stager._buffers) == {"/w"}  # a key that went away takes its buffer along


KILLED_CHILD = textwrap.dedent(
    """
    import json, sys
    from shardwise import FullModelHFCheckpointer
    from shardwise.store.local import LocalOutput

    src, names, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    ck = FullModelHFCheckpointer(src, names, "LLAMA3", out)
    state = ck.load_checkpoint()
    ck.save_checkpoint({**state, "epochs_run": 1}, epoch=0, intermediate_checkpoint=True)
    real = LocalOutput.write_files

    def parked(self, groups):
        for files in groups:
            real(self, [files[:1]])
            print("WRITING", flush=True)
            sys.stdin.readline()  # parked until the parent kills us

    LocalOutput.write_files = parked
    ck.save_checkpoint({**state, "epochs_run": 2}, epoch=1, intermediate_checkpoint=True, background=True)
    print("RETURNED", flush=True)
    sys.stdin.readline()
    """
)


def test_a_process_killed_during_the_background_write_keeps_the_previous_checkpoint(hf, tmp_path: Path) -> None:
    folder, names = hf
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    child = subprocess.Popen([sys.executable, "-c", KILLED_CHILD, str(folder), json.dumps(names), str(out)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env)
    lines: list[str] = []

    def read() -> None:
        while len(lines) < 2:
            line = child.stdout.readline()  # type: ignore[union-attr]
            if not line:
                return
            lines.append(line.strip())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=120)
    try:
        done = child.poll() is not None
        assert sorted(lines) == ["RETURNED", "WRITING"], child.stderr.read() if done else lines  # type: ignore[union-attr]
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["epoch_0", "recipe_state"]
    assert any(p.name.startswith(".epoch_1") for p in out.iterdir())  # it was killed mid-write, staged
    kept = {n: b for n, b in _files(out / "epoch_0").items() if n in names}
    assert kept == {n: (folder / n).read_bytes() for n in names}
    recipe = torch.load(out / "recipe_state" / "recipe_state.pt", weights_only=True)
    assert recipe["epochs_run"] == 1  # the recipe state still goes with epoch_0
    resumed = FullModelHFCheckpointer(str(folder), names, "LLAMA3", str(out), should_load_recipe_state=True)
    assert resumed._checkpoint_paths[0].parent.name == "epoch_0"


def test_a_collective_background_save_equals_a_synchronous_one(hf, tmp_path: Path) -> None:
    """2 gloo ranks, DTensor model and optimizer state changed right after the call: the background
    folder is byte-identical to a synchronous save of the values at the call; the resume reads them."""
    folder, names = hf
    res = run_ranks(S.background_collective, 2, str(folder), str(tmp_path / "bg"), str(tmp_path / "sync"), names)
    assert res == {0: "ok", 1: "ok"}
    assert _files(tmp_path / "bg" / "epoch_0") == _files(tmp_path / "sync" / "epoch_0")
    for n in names:  # unchanged weights: the original bytes
        assert (tmp_path / "bg" / "epoch_0" / n).read_bytes() == (folder / n).read_bytes()


@pytest.mark.parametrize("world", [2])
def test_dcp_async_save_is_the_state_at_the_call(tmp_path: Path, world: int) -> None:
    """2 gloo ranks: each changes its shards right after ``async_save`` returns; the folder holds the
    values at the call, byte-identical to a synchronous save of them; a second save waits for the first."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    full = {"w": torch.randn(10, 6, generator=g), "b": torch.randn(7, generator=g), "ids": torch.arange(5)}
    res = run_ranks(S.async_saves, world, full, str(tmp_path / "a"), str(tmp_path / "b"))
    assert all(r == "ok" for r in res.values()), res
    save_file(full, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    ref = (tmp_path / "ref.safetensors").read_bytes()
    assert (tmp_path / "a" / "model-00001-of-00001.safetensors").read_bytes() == ref
    doubled = {k: (v * 2 if v.is_floating_point() else v + 1) for k, v in full.items()}
    save_file(doubled, str(tmp_path / "ref2.safetensors"), metadata={"format": "pt"})
    got = (tmp_path / "b" / "model-00001-of-00001.safetensors").read_bytes()
    assert got == (tmp_path / "ref2.safetensors").read_bytes()
