"""The ``shardwise`` command as users run it: subprocesses (``python -m shardwise``), exit codes,
the ``--json`` schema (key sets pinned), no progress output in pipes, one-line errors.

The subprocesses of one module run concurrently (each pays for importing torch); the rarer failure
modes run ``shardwise.cli.main`` in-process, which is the same code path.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ckpt_factory import LlamaSpec, llama_state_dict, split_keys, write_hf_checkpoint
from shardwise.cli import app as cli
from shardwise.convert import _REGISTRY
from shardwise.report import PROBLEM_KINDS

INDEX = "model.safetensors.index.json"

# ------------------------------------------------------------------------------------------ JSON schema
TOP = {"schema", "command", "path", "ok", "files", "problems", "warnings", "stats"}
DETAILS = {
    "inspect": {"index", "tensors"},
    "verify": {"index", "side_files", "manifest", "wrote_manifest"},
    "convert": {"output", "model_type", "direction"},
    "roundtrip": {"model_type", "sample", "byte_identical", "kept", "index"},
    "compare": {"other", "index", "layout", "layout_note", "side_files"},
}
STATS = {
    "inspect": {"shards", "tensors", "bytes", "file_bytes", "seconds"},
    "verify": {"shards", "tensors", "bytes", "file_bytes", "seconds", "checksummed"},
    "convert": {"shards", "tensors", "input_tensors", "bytes", "aside", "seconds"},
    "roundtrip": {"shards", "tensors", "tune_tensors", "aside", "bytes", "generate_seconds", "to_tune_seconds",
                  "to_hf_seconds", "compare_seconds", "checkpointer_seconds", "seconds"},
    "compare": {"files", "identical", "different", "bytes", "seconds"},
}
SHARD_ENTRY = {"name", "format", "size", "tensors", "data_bytes", "dtypes", "metadata", "error", "sha256"}
COMPARE_ENTRY = {"name", "expected", "status", "size", "expected_size", "tensors", "first_difference"}
FILE_ENTRY = {
    "inspect": SHARD_ENTRY,
    "verify": SHARD_ENTRY,
    "convert": {"name", "role", "size", "tensors"},
    "roundtrip": COMPARE_ENTRY,
    "compare": COMPARE_ENTRY,
}
PROBLEM = {"kind", "message", "file", "tensor", "byte_range", "tensor_range"}
ERROR = {"schema", "command", "ok", "error"}


def assert_schema(doc: dict, command: str) -> None:
    assert set(doc) == TOP | DETAILS[command], command
    assert doc["schema"] == 1 and doc["command"] == command and isinstance(doc["ok"], bool)
    assert set(doc["stats"]) == STATS[command], command
    for f in doc["files"]:
        assert set(f) == FILE_ENTRY[command], (command, f)
    for p in doc["problems"] + doc["warnings"]:
        assert set(p) == PROBLEM and p["kind"] in PROBLEM_KINDS
    assert doc["ok"] == (not doc["problems"])


# ---------------------------------------------------------------------------------------------- fixtures


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    spec = LlamaSpec()
    sd = llama_state_dict(spec, seed=3)
    keys = list(sd)
    write_hf_checkpoint(root / "hf", sd, split_keys(keys, [len(keys) // 2]), spec.config(), {"format": "pt"})
    names = sorted(json.loads((root / "hf" / INDEX).read_text())["weight_map"].values())
    for variant in ("flipped", "edited", "broken", "noconfig"):
        shutil.copytree(root / "hf", root / variant)
    _flip(root / "flipped" / names[-1], (root / "flipped" / names[-1]).stat().st_size - 5)
    index = json.loads((root / "edited" / INDEX).read_text())
    index["metadata"]["total_size"] += 8
    (root / "edited" / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    (root / "broken" / names[0]).unlink()
    (root / "noconfig" / "config.json").unlink()
    (root / "malformed.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    return root


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "SHARDWISE_DEBUG"}
    return subprocess.run([sys.executable, "-m", "shardwise", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


#: name -> (argv, expected exit code)
CASES: dict[str, tuple[list[str], int]] = {
    "roundtrip-sample": (["roundtrip"], 0),
    "inspect-json": (["inspect", "hf", "--tensors", "--json"], 0),
    "verify-json": (["verify", "hf", "--checksums", "--write-manifest", "pins.json", "--json"], 0),
    "compare-flipped-json": (["compare", "hf", "flipped", "--json"], 1),
    "roundtrip-edited-index-json": (["roundtrip", "edited", "--model-type", "LLAMA3", "--json"], 0),
    "inspect-missing-path": (["inspect", "nowhere"], 2),
    "roundtrip-wrong-model-type-json": (["roundtrip", "hf", "--model-type", "LLAMA4", "--json", "--force"], 2),
    "inspect-malformed": (["inspect", "malformed.safetensors"], 2),
    "usage-no-command": ([], 2),
}


@pytest.fixture(scope="module")
def results(ws: Path) -> dict[str, subprocess.CompletedProcess[str]]:
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 2)) as pool:
        futures = {name: pool.submit(_run, argv, ws) for name, (argv, _) in CASES.items()}
        return {name: f.result() for name, f in futures.items()}


# ------------------------------------------------------------------------------------------ subprocesses


@pytest.mark.parametrize("case", list(CASES))
def test_exit_codes(results, case: str) -> None:
    r = results[case]
    assert r.returncode == CASES[case][1], (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("case", [c for c, (_, code) in CASES.items() if code != 2])
def test_no_progress_output_in_a_pipe(results, case: str) -> None:
    assert results[case].stderr == ""


@pytest.mark.parametrize("case", [c for c, (_, code) in CASES.items() if code == 2])
def test_errors_are_one_line(results, case: str) -> None:
    r = results[case]
    lines = r.stderr.strip().splitlines()
    if case == "usage-no-command":  # argparse: usage line + error line
        assert lines[-1].startswith("shardwise: error:")
        return
    assert len(lines) == 1 and lines[0].startswith("shardwise ") and ": error: " in lines[0], r.stderr


def test_error_messages_say_what_is_wrong(results) -> None:
    assert "nowhere: no such file or directory" in results["inspect-missing-path"].stderr
    assert "unexpected key" in results["roundtrip-wrong-model-type-json"].stderr
    assert "malformed.safetensors" in results["inspect-malformed"].stderr


def test_sample_roundtrip_summary(results) -> None:
    out = results["roundtrip-sample"].stdout
    assert "bundled sample" in out and "LLAMA3" in out
    assert out.count("identical") >= 3 and out.rstrip().endswith("byte-identical: yes")


@pytest.mark.parametrize(
    "case,command",
    [("inspect-json", "inspect"), ("verify-json", "verify"), ("compare-flipped-json", "compare"),
     ("roundtrip-edited-index-json", "roundtrip")],
)
def test_json_schema(results, case: str, command: str) -> None:
    assert_schema(json.loads(results[case].stdout), command)


def test_json_error_document(results) -> None:
    doc = json.loads(results["roundtrip-wrong-model-type-json"].stdout)
    assert set(doc) == ERROR and doc["ok"] is False and set(doc["error"]) == {"type", "message", "path"}
    assert doc["error"]["type"] == "ConversionError" and doc["error"]["path"].startswith("hf/model-")


def test_json_contents(results, ws: Path) -> None:
    inspect = json.loads(results["inspect-json"].stdout)
    assert inspect["ok"] and inspect["index"]["consistent"]
    assert len(inspect["tensors"]) == inspect["stats"]["tensors"] == len(json.loads((ws / "hf" / INDEX).read_text())
                                                                          ["weight_map"])
    assert set(inspect["tensors"][0]) == {"name", "dtype", "shape", "offsets", "file"}
    verify = json.loads(results["verify-json"].stdout)
    assert all(len(f["sha256"]) == 64 for f in verify["files"])
    assert json.loads((ws / "pins.json").read_text())["schema"] == "shardwise.manifest/1"
    flipped = json.loads(results["compare-flipped-json"].stdout)
    (p,) = flipped["problems"]
    assert p["kind"] == "data" and p["tensor"] and p["byte_range"][1] - p["byte_range"][0] == 1
    edited = json.loads(results["roundtrip-edited-index-json"].stdout)  # the input's flaw, not a regression
    assert edited["problems"] == [] and not edited["byte_identical"]
    assert [w["kind"] for w in edited["warnings"]] == ["input-inconsistent"]
    assert "total_size" in edited["warnings"][0]["message"]


# ------------------------------------------------------------------------------------- in-process (main)


def _main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(args)
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(code: int, err: str, fragment: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], err


def test_in_process_json_schemas(ws: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _main(["roundtrip", "--json"], capsys)
    assert code == 0
    assert_schema(json.loads(out), "roundtrip")
    code, out, _ = _main(["convert", str(ws / "hf"), str(tmp_path / "tune"), "--to", "tune", "--model-type", "LLAMA3",
                          "--json"], capsys)
    doc = json.loads(out)
    assert code == 0 and doc["direction"] == "hf-to-tune" and (tmp_path / "tune" / "shardwise-origin.json").is_file()
    assert_schema(doc, "convert")
    code, out, _ = _main(["verify", str(ws / "broken"), "--json"], capsys)
    doc = json.loads(out)
    assert code == 1 and "missing-file" in {p["kind"] for p in doc["problems"]}
    assert_schema(doc, "verify")


def test_more_failure_modes(ws: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hf = str(ws / "hf")
    code, _, err = _main(["roundtrip", hf, "--model-type", "NOPE"], capsys)
    _one_line_error(code, err, "unknown model_type 'NOPE'")
    assert "LLAMA3" in err  # lists the valid names
    code, _, err = _main(["convert", str(ws / "noconfig"), str(tmp_path / "z"), "--to", "tune", "--model-type",
                          "LLAMA3"], capsys)
    _one_line_error(code, err, "config.json")
    code, _, err = _main(["roundtrip", hf], capsys)  # LLAMA2, LLAMA3, LLAMA3_2 convert identically: picked
    assert code == 0 and "would convert identically" in err, err
    bare = tmp_path / "bare"  # a llama config without architectures could also be REWARD: that changes bytes
    shutil.copytree(hf, bare)
    cfg = json.loads((bare / "config.json").read_text())
    cfg.pop("architectures", None)
    (bare / "config.json").write_text(json.dumps(cfg))
    code, _, err = _main(["convert", str(bare), str(tmp_path / "x"), "--to", "tune"], capsys)
    _one_line_error(code, err, "fits several model types (LLAMA2, LLAMA3, LLAMA3_2, REWARD); pass --model-type")
    code, _, err = _main(["convert", hf, str(tmp_path / "x"), "--to", "tune", "--model-type", "LLAMA3",
                          "--max-shard-size", "lots"], capsys)
    _one_line_error(code, err, "max_shard_size")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    code, _, err = _main(["convert", hf, str(tmp_path / "full"), "--to", "tune", "--model-type", "LLAMA3"], capsys)
    _one_line_error(code, err, "--overwrite")
    code, _, err = _main(["convert", hf, str(tmp_path / "y"), "--to", "hf"], capsys)
    _one_line_error(code, err, "already a Hugging Face checkpoint")
    (tmp_path / "bad.json").write_text("{")
    code, _, err = _main(["verify", hf, "--against", str(tmp_path / "bad.json")], capsys)
    _one_line_error(code, err, "manifest")
    code, _, err = _main(["compare", hf, str(ws / "malformed.safetensors")], capsys)
    _one_line_error(code, err, "folder")
    code, _, err = _main(["verify", str(tmp_path / "nothing-here")], capsys)
    _one_line_error(code, err, "no such file or directory")
    code, _, err = _main(["inspect", str(tmp_path / "bad.json")], capsys)
    _one_line_error(code, err, "not a checkpoint file")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_model_type_without_converter(ws: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from shardwise.constants import ModelType

    monkeypatch.delitem(_REGISTRY, ModelType.GEMMA)
    code, _, err = _main(["roundtrip", str(ws / "hf"), "--model-type", "GEMMA", "--force"], capsys)
    _one_line_error(code, err, "not supported")


def test_lowercase_model_type_and_quiet(ws: Path, tmp_path: Path, capsys) -> None:
    code, out, err = _main(["roundtrip", str(ws / "hf"), "--model-type", "llama2", "--quiet"], capsys)
    assert code == 0 and "byte-identical: yes" in out and err == ""


def test_convert_back_and_forth(ws: Path, tmp_path: Path, capsys) -> None:
    code, _, _ = _main(["convert", str(ws / "hf"), str(tmp_path / "tune"), "--to", "tune", "--model-type",
                        "LLAMA2", "--max-shard-size", "10kB"], capsys)
    assert code == 0
    code, out, _ = _main(["convert", str(tmp_path / "tune"), str(tmp_path / "back"), "--to", "hf", "--json"], capsys)
    assert code == 0 and json.loads(out)["model_type"] == "LLAMA2"  # recorded in shardwise-origin.json
    code, out, _ = _main(["compare", str(ws / "hf"), str(tmp_path / "back")], capsys)
    assert code == 0 and out.rstrip().endswith("OK")
    code, out, _ = _main(["verify", str(tmp_path / "back"), "--against", str(ws / "pins.json")], capsys)
    assert code == 0, out


def test_verify_against_manifest_detects_change(ws: Path, tmp_path: Path, capsys) -> None:
    code, _, _ = _main(["verify", str(ws / "hf"), "--write-manifest", str(tmp_path / "m.json")], capsys)
    assert code == 0
    code, out, _ = _main(["verify", str(ws / "flipped"), "--against", str(tmp_path / "m.json"), "--json"], capsys)
    doc = json.loads(out)
    assert code == 1 and [p["kind"] for p in doc["problems"]] == ["checksum"]
    assert_schema(doc, "verify")


def test_inspect_human_output(ws: Path, capsys) -> None:
    code, out, _ = _main(["inspect", str(ws / "hf"), "--tensors"], capsys)
    assert code == 0
    assert "consistent with the shards" in out and "model.embed_tokens.weight" in out and "BF16" in out
