"""Start-up of the headers-only commands, as a ratio to a bare interpreter (``python -c "import json"``).

Each command runs in a fresh interpreter; best of 7 rounds, interleaved (the smoke pass: 1 round,
without the ``import torch`` reference).
Rerun: ``make bench`` (or ``.venv/bin/python -m pytest benches/test_bench_startup.py -s``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from conftest import make_checkpoint


def _seconds(argv: list[str], cwd: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, cwd=cwd, check=True, capture_output=True, timeout=300)
    return time.perf_counter() - t0


def test_startup_ratios(tmp_path, request):
    make_checkpoint(tmp_path / "hf", 8 * 2**20, shards=2)
    rounds = 1 if request.config.getoption("benchmark_disable", False) else 7
    py = sys.executable
    variants = {
        "python -c 'import json'": [py, "-c", "import json"],
        "shardwise --version": [py, "-m", "shardwise", "--version"],
        "shardwise inspect": [py, "-m", "shardwise", "inspect", "hf"],
        "shardwise verify --checksums": [py, "-m", "shardwise", "verify", "hf", "--checksums"],
    }
    if rounds > 1:  # the smoke pass skips the seconds of a torch import
        variants["python -c 'import torch'"] = [py, "-c", "import torch"]
    best = {k: float("inf") for k in variants}
    for _ in range(rounds):
        for name, argv in variants.items():
            best[name] = min(best[name], _seconds(argv, tmp_path))
    base = best["python -c 'import json'"]
    report = {"rounds": rounds, "best_s": {k: round(v, 4) for k, v in best.items()},
              "ratio_to_import_json": {k: round(v / base, 2) for k, v in best.items()}}
    print("\n" + json.dumps(report, indent=2))
    assert all(v > 0 for v in best.values())
