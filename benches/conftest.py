"""Benchmark fixtures: a generated Llama-style bf16 checkpoint on tmpfs and on disk.

Size: ``SHARDWISE_BENCH_GB`` (default 1; 3 when run by hand with ``make bench-full``). Under
``--benchmark-disable`` (the CI smoke pass) a 64 MB checkpoint on tmpfs only is used so the pass
stays quick.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

ROOTS = {"tmpfs": "/dev/shm", "disk": tempfile.gettempdir()}


def bench_bytes(config) -> int:
    if config.getoption("benchmark_disable", False):
        return 64 * 2**20
    return int(float(os.environ.get("SHARDWISE_BENCH_GB", "1")) * 2**30)


def make_checkpoint(folder: Path, total_bytes: int, shards: int = 4, tiny: bool = False) -> list[str]:
    """A Llama-style bf16 checkpoint (GQA, head_dim 128) of about ``total_bytes`` in ``shards`` files,
    named and indexed as ``save_pretrained`` does (``tiny``: small dims, for smoke runs)."""
    hidden, heads, kv, hd, inter, vocab = (256, 4, 2, 64, 704, 4000) if tiny else (2048, 16, 4, 128, 5632, 32000)
    per_layer = 2 * (hidden * heads * hd * 2 + hidden * kv * hd * 2 + 3 * hidden * inter + 2 * hidden)
    layers = max(1, (total_bytes - 2 * vocab * hidden * 2) // per_layer)
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float32).to(torch.bfloat16)

    keys: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for n in range(layers):
        p = f"model.layers.{n}."
        keys += [
            (p + "self_attn.q_proj.weight", (heads * hd, hidden)),
            (p + "self_attn.k_proj.weight", (kv * hd, hidden)),
            (p + "self_attn.v_proj.weight", (kv * hd, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, heads * hd)),
            (p + "mlp.gate_proj.weight", (inter, hidden)),
            (p + "mlp.up_proj.weight", (inter, hidden)),
            (p + "mlp.down_proj.weight", (hidden, inter)),
            (p + "input_layernorm.weight", (hidden,)),
            (p + "post_attention_layernorm.weight", (hidden,)),
        ]
    keys += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    per = -(-len(keys) // shards)
    folder.mkdir(parents=True, exist_ok=True)
    names, weight_map, total = [], {}, 0
    n = -(-len(keys) // per)
    for i in range(n):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        part = {k: rnd(*s) for k, s in keys[i * per : (i + 1) * per]}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        for k, t in part.items():
            weight_map[k] = name
            total += t.nbytes
        names.append(name)
        del part
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    config = {"hidden_size": hidden, "num_attention_heads": heads, "num_key_value_heads": kv,
              "head_dim": hd, "intermediate_size": inter, "num_hidden_layers": layers, "vocab_size": vocab}
    (folder / "config.json").write_text(json.dumps(config))
    return names


def prefault(nbytes: int) -> None:
    """Touch and free ``nbytes`` of RAM in a child process, so that the timed run does not pay the
    VM's first-touch cost for memory the host took back."""
    subprocess.run(
        [sys.executable, "-c", f"import numpy as np; a = np.ones({nbytes}, np.uint8); a[::4096].sum()"],
        check=True,
    )


def _anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class Peak:
    """Peak RssAnon above the level at start, sampled every millisecond in a thread."""

    def __enter__(self) -> Peak:
        self.base = _anon()
        self.peak = self.base
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop:
            self.peak = max(self.peak, _anon())
            time.sleep(0.001)

    def __exit__(self, *exc: Any) -> None:
        self._stop = True
        self._t.join()
        self.peak = max(self.peak, _anon())

    @property
    def extra(self) -> int:
        return self.peak - self.base


@pytest.fixture(scope="session", params=sorted(ROOTS))
def checkpoint(request):
    if request.config.getoption("benchmark_disable", False) and request.param != "tmpfs":
        pytest.skip("smoke pass (--benchmark-disable): tmpfs only, to stay within ~30 s")
    root = Path(ROOTS[request.param])
    tmp = Path(tempfile.mkdtemp(prefix="shardwise-bench-", dir=root))
    size = bench_bytes(request.config)
    names = make_checkpoint(tmp / "hf", size)
    yield request.param, tmp, names, size
    shutil.rmtree(tmp, ignore_errors=True)
