"""Crash safety of ``save_checkpoint``, with real processes:

- a save loop killed with SIGKILL at random moments never leaves a folder that resume discovery or
  ``keep_last_n_checkpoints`` treats as a checkpoint unless it is complete and exact, and the latest
  complete checkpoint still resumes;
- a save that hits a write error (``RLIMIT_FSIZE``: Python ignores SIGXFSZ, so writes fail with EFBIG)
  raises ``OSError`` and leaves ``output_dir`` exactly as it was (tests run as root, so read-only
  folders would not stop the writes);
- re-saving an existing ``epoch_N`` replaces it whole (no stale shards).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ckpt_factory import LlamaSpec, llama_state_dict, split_keys, write_hf_checkpoint
from shardwise import FullModelHFCheckpointer
from shardwise.store.local import is_staging_name

SPEC = LlamaSpec(layers=4, heads=4, kv_heads=2, head_dim=32, hidden=256, intermediate=512, vocab=1024,
                 dtype=torch.float32)  # ~11 MB, 3 shards: a save takes long enough to be hit mid-way

CHILD = textwrap.dedent(
    """
    import json, sys, torch
    from shardwise import FullModelHFCheckpointer

    base, out, names, mode = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]

    def lora(n):
        g = torch.Generator().manual_seed(n)
        return {f"layers.{i}.attn.v_proj.{k}": torch.randn(*s, generator=g)
                for i in range(4) for k, s in (("lora_a.weight", (4, 256)), ("lora_b.weight", (64, 4)))}

    cfg = {"r": 4, "lora_alpha": 8, "target_modules": ["v_proj"]}
    ck = FullModelHFCheckpointer(base, names, "LLAMA3", out, keep_last_n_checkpoints=2)
    model = ck.load_checkpoint()["model"]
    if mode == "loop":
        # a warm process (torch imported, base loaded) forks one saver per trial and SIGKILLs it
        # after the delay the parent sends; the parent inspects output_dir after each "killed"
        import os, signal, time
        print("ready", flush=True)
        for line in sys.stdin:
            delay, start = float(line.split()[0]), int(line.split()[1])
            pid = os.fork()
            if pid == 0:
                for epoch in range(start, start + 10_000):
                    state = {"model": {k: v + epoch for k, v in model.items()}, "adapter": lora(epoch),
                             "adapter_config": cfg, "epochs_run": epoch,
                             "optimizer": {"m": torch.full((1000,), epoch)}}
                    ck.save_checkpoint(state, epoch=epoch, intermediate_checkpoint=True)
                    os.write(1, f"saved {epoch}\\n".encode())  # one write: a kill cannot split the line
            time.sleep(delay)
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.write(1, b"\\nkilled\\n")
    else:  # saves under a file-size limit, one forked process each: OSError, and nothing changes
        import os, resource
        for line in sys.stdin:
            epoch, limit, big = int(line.split()[0]), int(line.split()[1]), line.split()[2] == "recipe"
            pid = os.fork()
            if pid == 0:
                state = {"adapter": lora(7), "adapter_config": cfg, "epochs_run": 7,
                         "optimizer": {"m": torch.ones(4 * limit if big else 10)}}
                if not big:
                    state["model"] = {k: v + 7 for k, v in model.items()}
                resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
                try:
                    ck.save_checkpoint(state, epoch=epoch, intermediate_checkpoint=True, adapter_only=big)
                except OSError as e:
                    print("OSError", type(e).__name__, e.errno, flush=True)
                else:
                    print("no error", flush=True)
                os._exit(0)
            os.waitpid(pid, 0)
    """
)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], dict[str, torch.Tensor], Path]:
    tmp = tmp_path_factory.mktemp("crash")
    sd = llama_state_dict(SPEC, seed=1)
    folder = tmp / "base"
    names = write_hf_checkpoint(folder, sd, split_keys(list(sd), [12, 24]), SPEC.config())
    script = tmp / "child.py"
    script.write_text(CHILD)
    return folder, names, sd, script


@contextlib.contextmanager
def _run(script: Path, *args: str, timeout: float = 90) -> Iterator[subprocess.Popen[str]]:
    """The child script, killed by a watchdog after ``timeout`` s so that a bug fails the test, not hangs it."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.Popen([sys.executable, str(script), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env)
    watchdog = threading.Timer(timeout, proc.kill)
    watchdog.start()
    try:
        yield proc
    finally:
        watchdog.cancel()
        proc.kill()
        proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None and not pipe.closed:
                pipe.close()


def _lora(n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(n)
    return {f"layers.{i}.attn.v_proj.{k}": torch.randn(*s, generator=g)
            for i in range(4) for k, s in (("lora_a.weight", (4, 256)), ("lora_b.weight", (64, 4)))}


def _check_complete(folder: Path, n: int, names: list[str], sd: dict[str, torch.Tensor]) -> None:
    """A visible checkpoint folder holds exactly what epoch ``n`` saved, every file whole."""
    files = {p.name for p in folder.iterdir()}
    assert set(names) <= files and {"model.safetensors.index.json", "adapter_model.pt",
                                    "adapter_model.safetensors", "config.json"} <= files
    for name in names:
        for k, v in load_file(str(folder / name)).items():
            assert torch.equal(v, sd[k] + n), (folder, k)
    pt = torch.load(folder / "adapter_model.pt", weights_only=True)
    assert pt.keys() == _lora(n).keys() and all(torch.equal(pt[k], v) for k, v in _lora(n).items())
    if (folder / "adapter_config.json").exists():
        json.loads((folder / "adapter_config.json").read_text())


def test_sigkill_at_random_points_never_exposes_a_partial_checkpoint(base, tmp_path: Path) -> None:
    folder, names, sd, script = base
    rng = random.Random(1234)
    out = tmp_path / "out"
    seen_saved = mid_save = 0
    start = 1
    with _run(script, str(folder), str(out), json.dumps(names), "loop") as proc:
        assert proc.stdin is not None and proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        for _ in range(8):
            proc.stdin.write(f"{rng.uniform(0.05, 0.6)} {start}\n")
            proc.stdin.flush()
            while (line := proc.stdout.readline()).strip() != "killed":
                assert line, "the child died or the watchdog killed it"
                seen_saved += line.startswith("saved")
            visible = [p for p in out.iterdir() if p.name.startswith("epoch_") and not is_staging_name(p.name)]
            mid_save += any(is_staging_name(p.name) for p in out.iterdir())
            for p in visible:
                _check_complete(p, int(p.name.split("_")[1]), names, sd)
            assert len(visible) <= 3  # keep_last_n=2, plus at most the one published just before the kill
            if not visible:
                continue
            latest = max(int(p.name.split("_")[1]) for p in visible)
            start = latest + 2  # numbering goes on, as in training
            # resume loads the recipe state and the adapter of the folder it was saved with: the latest
            # one, or the one published before it when the kill landed between publishing and renaming
            ck = FullModelHFCheckpointer(str(folder), names, "LLAMA3", str(out), should_load_recipe_state=True)
            state = ck.load_checkpoint()
            paired = state["epochs_run"]
            earlier = [int(p.name.split("_")[1]) for p in visible if int(p.name.split("_")[1]) < latest]
            assert paired == latest or (earlier and paired == max(earlier)), (paired, latest, earlier)
            assert ck._adapter_checkpoint == out / f"epoch_{paired}" / "adapter_model.pt"
            assert all(torch.equal(state["adapter"][k], v) for k, v in _lora(paired).items())
            assert torch.equal(state["optimizer"]["m"], torch.full((1000,), paired))
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0
    assert seen_saved > 0 and mid_save > 0  # kills landed after complete saves and in the middle of saves

    # the next save cleans up: pruning counts complete checkpoints only
    ck = FullModelHFCheckpointer(str(folder), names, "LLAMA3", str(out), keep_last_n_checkpoints=2)
    model = ck.load_checkpoint()["model"]
    ck.save_checkpoint({"model": {k: v + 1 for k, v in model.items()}, "adapter": _lora(1)}, epoch=10_000)
    complete = sorted(int(p.name[6:]) for p in out.iterdir() if p.name.startswith("epoch_")
                      and not is_staging_name(p.name))
    assert complete[-1] == 10_000 and len(complete) == 2


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def test_write_error_raises_oserror_and_changes_nothing(base, tmp_path: Path) -> None:
    """Shards bigger than the limit (a re-save over an existing epoch, and a new one), or a recipe
    state bigger than it (the adapter files fit): OSError, and output_dir is byte for byte as before."""
    folder, names, sd, script = base
    out = tmp_path / "out"
    ck = FullModelHFCheckpointer(str(folder), names, "LLAMA3", str(out))
    model = ck.load_checkpoint()["model"]
    ck.save_checkpoint({"model": {k: v + 1 for k, v in model.items()}, "adapter": _lora(1), "epochs_run": 1},
                       epoch=1, intermediate_checkpoint=True)
    before = _snapshot(out)
    with _run(script, str(folder), str(out), json.dumps(names), "limit") as proc:
        assert proc.stdin is not None and proc.stdout is not None
        for case in ("1 600000 model", "3 600000 model", "1 3000000 recipe", "4 3000000 recipe"):
            proc.stdin.write(case + "\n")
            proc.stdin.flush()
            assert proc.stdout.readline().split() == ["OSError", "CheckpointIOError", "27"], case  # EFBIG, typed
            assert _snapshot(out) == before, case
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0
    _check_complete(out / "epoch_1", 1, names, sd)


def test_resave_replaces_folder_whole(base, tmp_path: Path) -> None:
    folder, names, sd, _ = base
    out = tmp_path / "out"
    ck = FullModelHFCheckpointer(str(folder), names, "LLAMA3", str(out))
    model = ck.load_checkpoint()["model"]
    extra = {**model, "layers.9.mlp.w2.weight": torch.ones(256, 512)}  # a new key: an extra shard
    ck.save_checkpoint({"model": extra, "adapter": _lora(1)}, epoch=1, max_shard_size="100KB")
    first = {p.name for p in (out / "epoch_1").iterdir()}
    ck.save_checkpoint({"model": {k: v + 1 for k, v in model.items()}, "adapter": _lora(1)}, epoch=1)
    second = {p.name for p in (out / "epoch_1").iterdir()}
    assert first - second  # the extra shard and the renamed originals are gone, not left stale
    assert sorted(p.name for p in out.iterdir()) == ["epoch_1"]  # no temporary folder left
    _check_complete(out / "epoch_1", 1, names, sd)
    index = json.loads((out / "epoch_1" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(names)


def test_leftovers_of_dead_saves_are_removed_later(base, tmp_path: Path) -> None:
    """A killed save leaves its temporary folder; the next save removes it once its process is gone and
    it is over an hour old (a live save, possibly on another host sharing the folder, keeps its own)."""
    folder, names, _, _ = base
    out = tmp_path / "out"
    out.mkdir()
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(done.stdout)
    old = time.time() - 2 * 3600
    stale = [out / f".epoch_3.shardwise-{dead}-0123abcd", out / f".recipe_state.pt.shardwise-tmp-{dead}"]
    keep = [out / f".epoch_4.shardwise-{dead}-4567abcd",  # recent: maybe a save on another host
            out / f".epoch_5.shardwise-{os.getppid()}-89abcdef"]  # old but its process is alive
    for p in stale[:1] + keep:
        p.mkdir()
        (p / "model.safetensors").write_bytes(b"partial")
    stale[1].write_bytes(b"partial")
    for p in stale + keep[1:]:
        os.utime(p, (old, old))
    ck = FullModelHFCheckpointer(str(folder), names, "LLAMA3", str(out))
    ck.save_checkpoint({"adapter": _lora(1)}, epoch=1, adapter_only=True)
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in keep)
