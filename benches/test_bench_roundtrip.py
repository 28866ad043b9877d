"""Load + save speed against the plain ``safetensors`` path and a ``cp`` of the same bytes.

Variants run interleaved, each preceded by a prefault, and are reported as ratios (printed and saved
to ``.benchmarks/ratios-<fs>.json``). Rerun: ``make bench`` (1 GB) or ``make bench-full`` (3 GB).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from conftest import prefault
from shardwise import FullModelHFCheckpointer

ROUNDS = int(os.environ.get("SHARDWISE_BENCH_ROUNDS", "3"))


def _reset(out: Path) -> None:
    """Empty the output folder and flush dirty pages, so no variant pays for the previous one's
    background writeback (on disk that otherwise swings the ratios by ±50%)."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    os.sync()


def variant_copy(src: Path, out: Path, names: list[str]) -> None:
    dst = out / "epoch_0"
    dst.mkdir()
    for name in [*names, "model.safetensors.index.json", "config.json"]:
        shutil.copyfile(src / name, dst / name)


def variant_safetensors(src: Path, out: Path, names: list[str]) -> None:
    dst = out / "epoch_0"
    dst.mkdir()
    for name in names:
        save_file(load_file(str(src / name)), str(dst / name), metadata={"format": "pt"})
    for name in ["model.safetensors.index.json", "config.json"]:
        shutil.copyfile(src / name, dst / name)


def variant_shardwise(src: Path, out: Path, names: list[str], clone_and_prefault: int = 0) -> float:
    """Load + save. With ``clone_and_prefault`` (bytes to prefault) the loaded tensors are first cloned
    into RAM, the training case, and memory is prefaulted again; both untimed, so that the save
    runs in the same memory state as the other variants."""
    t0 = time.perf_counter()
    ck = FullModelHFCheckpointer(str(src), names, "LLAMA3", str(out), fsync=False)
    state = ck.load_checkpoint()
    if clone_and_prefault:
        pause = time.perf_counter()
        state["model"] = {k: v.clone() for k, v in state["model"].items()}
        prefault(clone_and_prefault)
        t0 += time.perf_counter() - pause
    ck.save_checkpoint(state, epoch=0)
    return time.perf_counter() - t0


def _timed(fn, *args) -> float:
    t0 = time.perf_counter()
    r = fn(*args)
    return r if isinstance(r, float) else time.perf_counter() - t0


def test_load_save_ratios(checkpoint, benchmark, request):
    fs, tmp, names, size = checkpoint
    src, out = tmp / "hf", tmp / "out"
    variants = {
        "copy": lambda: _timed(variant_copy, src, out, names),
        "safetensors": lambda: _timed(variant_safetensors, src, out, names),
        "shardwise_mmap": lambda: variant_shardwise(src, out, names),
        "shardwise_ram": lambda: variant_shardwise(src, out, names, clone_and_prefault=2 * size),
    }
    disabled = request.config.getoption("benchmark_disable", False)
    rounds = 1 if disabled else ROUNDS
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for name, fn in variants.items():  # interleaved
            _reset(out)
            prefault(2 * size)
            times[name].append(fn())
    # exactness of what was timed: the last shardwise output equals the input
    for n in names:
        assert (out / "epoch_0" / n).read_bytes() == (src / n).read_bytes()

    def setup():
        _reset(out)
        prefault(2 * size)

    benchmark.pedantic(variant_shardwise, args=(src, out, names), setup=setup, rounds=rounds)

    med = {k: statistics.median(v) for k, v in times.items()}
    report = {
        "fs": fs,
        "bytes": size,
        "rounds": rounds,
        "median_s": med,
        "all_s": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "shardwise_mmap_vs_copy": med["shardwise_mmap"] / med["copy"],
        "shardwise_ram_vs_copy": med["shardwise_ram"] / med["copy"],
        "safetensors_vs_shardwise_mmap": med["safetensors"] / med["shardwise_mmap"],
        "safetensors_vs_shardwise_ram": med["safetensors"] / med["shardwise_ram"],
    }
    print("\n" + json.dumps(report, indent=2))
    if not disabled:
        Path(".benchmarks").mkdir(exist_ok=True)
        Path(f".benchmarks/ratios-{fs}.json").write_text(json.dumps(report, indent=2))


def test_load_checkpoint_time(checkpoint, benchmark):
    fs, tmp, names, size = checkpoint
    ck = FullModelHFCheckpointer(str(tmp / "hf"), names, "LLAMA3", str(tmp / "out-load"))
    state = benchmark(ck.load_checkpoint)
    assert len(state["model"]) > 0


def _peak_anon_script(src: Path, out: Path, names: list[str], clone: bool) -> str:
    return f"""
import threading, time, json
from shardwise import FullModelHFCheckpointer
def anon():
    for line in open('/proc/self/status'):
        if line.startswith('RssAnon:'):
            return int(line.split()[1]) * 1024
ck = FullModelHFCheckpointer({str(src)!r}, {names!r}, 'LLAMA3', {str(out)!r}, fsync=False)
state = ck.load_checkpoint()
if {clone!r}:
    state['model'] = {{k: v.clone() for k, v in state['model'].items()}}
base = anon(); peak = [base]; stop = False
def sample():
    while not stop:
        peak[0] = max(peak[0], anon()); time.sleep(0.001)
t = threading.Thread(target=sample); t.start()
ck.save_checkpoint(state, epoch=0)
stop = True; t.join()
print(json.dumps({{'base': base, 'peak': peak[0]}}))
"""


def test_peak_memory_during_save(checkpoint):
    """Extra anonymous memory while saving, as a fraction of the checkpoint size (target < 10%)."""
    fs, tmp, names, size = checkpoint
    result = {}
    for clone in (False, True):
        out = tmp / f"out-mem-{clone}"
        proc = subprocess.run([sys.executable, "-c", _peak_anon_script(tmp / "hf", out, names, clone)],
                              check=True, capture_output=True, text=True)
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        result["ram" if clone else "mmap"] = (r["peak"] - r["base"]) / size
        shutil.rmtree(out, ignore_errors=True)
    print(f"\npeak extra anonymous memory during save ({fs}): "
          + ", ".join(f"{k}: {v:.1%} of checkpoint" for k, v in result.items()))


def test_import_time(request):
    """``import shardwise`` (torch-free) and its checkpointer against ``import torch`` (fresh
    interpreters, best of 3; 1 in the smoke pass)."""
    rounds = 1 if request.config.getoption("benchmark_disable", False) else 3

    def best(stmt: str) -> float:
        ts = []
        for _ in range(rounds):
            p = subprocess.run([sys.executable, "-c", f"import time; t=time.perf_counter(); {stmt}; "
                                "print(time.perf_counter()-t)"], check=True, capture_output=True, text=True,
                               timeout=300)
            ts.append(float(p.stdout.strip()))
        return min(ts)
    t_sw = best("import shardwise")
    if rounds == 1:  # the smoke pass: no torch imports (seconds each)
        print(f"\nimport shardwise {t_sw:.2f}s")
        return
    t_torch, t_ck = best("import torch"), best("from shardwise import FullModelHFCheckpointer")
    print(f"\nimport torch {t_torch:.2f}s, import shardwise {t_sw:.2f}s, "
          f"its checkpointer {t_ck:.2f}s (+{t_ck - t_torch:.2f}s over torch)")
    assert torch.__version__
