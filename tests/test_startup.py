"""Headers-only commands never import torch: ``--version``, ``inspect``, ``verify`` (also with
``--checksums`` and manifests) and ``compare`` of two safetensors checkpoints run in a fresh
interpreter, which then reports whether ``torch`` ended up in ``sys.modules``.

``convert`` builds tensors and must import torch: it is the control showing that the probe can fail.
(Start-up time is measured in ``benches/test_bench_startup.py``, never asserted here.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from ckpt_factory import LlamaSpec, llama_state_dict, split_keys, write_hf_checkpoint

#: runs the command line in-process, then prints whether torch was imported (last stderr line)
PROBE = """
import sys
from shardwise.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:
    code = e.code
print("TORCH_LOADED=%s" % ("torch" in sys.modules), file=sys.stderr)
sys.exit(code)
"""

CASES: dict[str, tuple[list[str], int, bool]] = {  # name -> (argv, exit code, torch expected)
    "version": (["--version"], 0, False),
    "help": (["inspect", "--help"], 0, False),
    "inspect": (["inspect", "hf"], 0, False),
    "inspect-tensors-json": (["inspect", "hf", "--tensors", "--json"], 0, False),
    "inspect-one-file": (["inspect", "hf/model-00001-of-00002.safetensors"], 0, False),
    "verify": (["verify", "hf"], 0, False),
    "verify-checksums": (["verify", "hf", "--checksums"], 0, False),
    "verify-write-manifest": (["verify", "hf", "--write-manifest", "pins.json"], 0, False),
    "compare-same": (["compare", "hf", "copy"], 0, False),
    "compare-different": (["compare", "hf", "flipped", "--json"], 1, False),
    "inspect-missing": (["inspect", "nowhere"], 2, False),
    "control-convert": (["convert", "hf", "tune", "--to", "tune", "--model-type", "LLAMA3", "-q"], 0, True),
}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, subprocess.CompletedProcess[str]]:
    root = tmp_path_factory.mktemp("startup")
    spec = LlamaSpec()
    sd = llama_state_dict(spec, seed=5)
    keys = list(sd)
    write_hf_checkpoint(root / "hf", sd, split_keys(keys, [len(keys) // 2]), spec.config(), {"format": "pt"})
    shutil.copytree(root / "hf", root / "copy")
    shutil.copytree(root / "hf", root / "flipped")
    last = root / "flipped" / "model-00002-of-00002.safetensors"
    data = bytearray(last.read_bytes())
    data[-3] ^= 0x01
    last.write_bytes(bytes(data))
    env = {k: v for k, v in os.environ.items() if k != "SHARDWISE_DEBUG"}

    def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", PROBE, *argv], cwd=root, env=env, capture_output=True,
                              text=True, timeout=300)

    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(run, argv) for name, (argv, _, _) in CASES.items()}
        out = {name: f.result() for name, f in futures.items()}
    assert json.loads((root / "pins.json").read_text())["files"]
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_torch_is_imported_only_where_tensors_are_built(results, name):
    argv, code, torch_expected = CASES[name]
    r = results[name]
    assert r.returncode == code, (argv, r.stdout, r.stderr)
    assert r.stderr.strip().splitlines()[-1] == f"TORCH_LOADED={torch_expected}", (argv, r.stderr)


def test_import_shardwise_is_torch_free_until_the_checkpointer_is_used():
    code = (
        "import sys, shardwise; a = 'torch' in sys.modules; "
        "shardwise.FullModelHFCheckpointer; print(a, 'torch' in sys.modules, 'torchtune' in sys.modules)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert r.stdout.split() == ["False", "True", "False"]
