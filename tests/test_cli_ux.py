"""The command line as a pipeline engineer meets it: progress bars on a real terminal (a pty), Ctrl-C
at any moment, argument handling, errors that point the right way, ``--keep`` reuse, side files in
``verify`` / ``compare``, and ``compare`` across re-sharding. Subprocesses, each bounded by a timeout.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from ckpt_factory import LlamaSpec, llama_state_dict, split_keys, write_hf_checkpoint
from shardwise.cli import app as cli

INDEX = "model.safetensors.index.json"


# --------------------------------------------------------------------------------------------- helpers


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "SHARDWISE_DEBUG"}
    env["COLUMNS"] = "160"
    return env


def run_on_a_terminal(
    argv: list[str], cwd: Path, *, interrupt_after: float | None = None, timeout: float = 240
) -> tuple[int, str, str]:
    """Run ``python -m shardwise ARGV`` with stderr on a pseudo-terminal (stdout piped); optionally
    send SIGINT (what Ctrl-C sends) after ``interrupt_after`` seconds. Returns (exit, stderr, stdout)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "shardwise", *argv], cwd=cwd, env=_env(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    err = bytearray()
    start = time.monotonic()
    sent = False
    try:
        while True:
            now = time.monotonic()
            if now - start > timeout:
                raise AssertionError(f"{argv}: no exit within {timeout} s")
            if interrupt_after is not None and not sent and now - start >= interrupt_after:
                proc.send_signal(signal.SIGINT)
                sent = True
            ready, _, _ = select.select([master], [], [], 0.02)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    chunk = b""
                if chunk:
                    err += chunk
                    continue
            if proc.poll() is not None and not ready:
                break
            if ready and proc.poll() is not None:
                break
        out = proc.stdout.read().decode() if proc.stdout else ""
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        os.close(master)
    return proc.returncode, err.decode(errors="replace"), out


def text_lines(stderr: str) -> list[str]:
    """What stays on the screen: per line the text after the last carriage return, blank ones dropped."""
    return [line.split("\r")[-1].strip() for line in stderr.replace("\r\n", "\n").split("\n")
            if line.split("\r")[-1].strip()]


def bar_frames(stderr: str) -> list[str]:
    return [f for f in re.split(r"[\r\n]", stderr) if "%|" in f]


def sparse_safetensors(path: Path, nbytes: int) -> None:
    """A valid single-tensor safetensors file of ``nbytes`` zeros, sparse (costs no disk)."""
    header = json.dumps({"blob": {"dtype": "U8", "shape": [nbytes], "data_offsets": [0, nbytes]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + nbytes)


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ux")
    spec = LlamaSpec()
    sd = llama_state_dict(spec, seed=7)
    keys = list(sd)
    write_hf_checkpoint(root / "hf", sd, split_keys(keys, [len(keys) // 2]), spec.config(), {"format": "pt"})
    (root / "hf" / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    (root / "hf" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 8192}))
    (root / "big").mkdir()
    sparse_safetensors(root / "big" / "model.safetensors", 3 * 10**9)
    return root


def _main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(args)
    out, err = capsys.readouterr()
    return code, out, err


# -------------------------------------------------------------------------------------------- progress


def test_progress_bar_on_a_terminal_moves_within_a_single_file(ws: Path) -> None:
    code, err, out = run_on_a_terminal(["verify", "big", "--checksums"], ws)
    assert code == 0, err
    frames = bar_frames(err)
    assert frames, err
    assert all("sha256 model.safetensors" in f for f in frames)
    percents = {int(m.group(1)) for f in frames if (m := re.search(r"(\d+)%\|", f))}
    assert len([p for p in percents if 0 < p < 100]) >= 2, frames  # byte-level movement, not one jump
    assert any(re.search(r"\[\d\d:\d\d<\d\d:\d\d, [\d.]+[kMG]?B/s\]", f) for f in frames), frames  # elapsed<ETA, rate
    assert text_lines(err) == []  # the bar is erased; the summary goes to stdout
    assert out.rstrip().endswith("OK")


def test_quiet_draws_nothing_on_a_terminal(ws: Path) -> None:
    code, err, out = run_on_a_terminal(["-q", "verify", "big", "--checksums"], ws)
    assert code == 0 and err == "" and out.rstrip().endswith("OK")


def test_convert_and_roundtrip_draw_bars_for_their_phases(ws: Path, tmp_path: Path) -> None:
    shutil.copytree(ws / "hf", tmp_path / "hf")
    code, err, _ = run_on_a_terminal(["roundtrip", "hf", "--model-type", "LLAMA3", "--keep", "kept"], tmp_path)
    assert code == 0, err
    assert text_lines(err) == [], err  # whatever was drawn was erased


# ---------------------------------------------------------------------------------------------- Ctrl-C


# From 0.2 s on the interrupt lands in shardwise's own start-up (for convert: the seconds of
# ``import torch``) or in the work; before that it is in the interpreter's bootstrap, which is Python's.


def _staging_left(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".shardwise-" in p.name]


@pytest.mark.parametrize("after", [0.2, 1.0, 2.5])
def test_ctrl_c_during_checksums_is_one_line_and_exit_130(ws: Path, after: float) -> None:
    code, err, out = run_on_a_terminal(["verify", "big", "--checksums"], ws, interrupt_after=after)
    assert "Traceback" not in err
    if code == 0:  # finished before the signal (a fast machine): nothing to check
        return
    assert code == 130, err
    assert text_lines(err) == ["shardwise verify: interrupted"], err
    assert out == ""


@pytest.mark.parametrize("after", [0.2, 0.6, 1.5, 3.0])
def test_ctrl_c_during_convert_leaves_nothing_behind(ws: Path, tmp_path: Path, after: float) -> None:
    code, err, _ = run_on_a_terminal(
        ["convert", str(ws / "hf"), "out", "--to", "tune", "--model-type", "LLAMA3"], tmp_path,
        interrupt_after=after)
    assert "Traceback" not in err
    assert _staging_left(tmp_path) == []
    if code == 0:
        assert (tmp_path / "out" / "shardwise-origin.json").is_file()
        return
    assert code == 130, err
    assert text_lines(err) == ["shardwise convert: interrupted"], err
    assert not (tmp_path / "out").exists()


def test_keyboard_interrupt_in_process_is_one_line(monkeypatch, capsys) -> None:
    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr("shardwise.report.inspection.scan", interrupted)
    code, out, err = _main(["inspect", "anything"], capsys)
    assert code == 130 and out == "" and err == "shardwise inspect: interrupted\n"


# ------------------------------------------------------------------------------------ argument handling


@pytest.mark.parametrize("argv", [
    ["--json", "inspect", "{hf}"], ["inspect", "{hf}", "--json"], ["--json", "-q", "inspect", "{hf}"],
    ["-q", "inspect", "--json", "{hf}"],
])
def test_json_and_quiet_before_or_after_the_subcommand(ws: Path, argv: list[str], capsys) -> None:
    code, out, _ = _main([a.format(hf=ws / "hf") for a in argv], capsys)
    assert code == 0 and json.loads(out)["command"] == "inspect"


def test_abbreviations_are_rejected_with_the_subcommands_usage(ws: Path, capsys) -> None:
    for argv, usage in [(["verify", str(ws / "hf"), "--check"], "usage: shardwise verify"),
                        (["inspect", str(ws / "hf"), "--tens"], "usage: shardwise inspect"),
                        (["compare", "a", "b", "--stric"], "usage: shardwise compare"),
                        (["--js", "inspect", str(ws / "hf")], "usage: shardwise")]:
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        _, err = capsys.readouterr()
        assert e.value.code == 2 and err.startswith(usage) and "unrecognized arguments" in err, (argv, err)


def test_keep_documents_what_it_keeps_and_can_be_reused(ws: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        cli.main(["roundtrip", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for kept in ("sample/", "tune/", "hf/", "checkpointer/epoch_0/", "replaced"):
        assert kept in help_text
    keep = tmp_path / "kept"
    for _ in range(2):
        code, out, _ = _main(["roundtrip", "--keep", str(keep), "-q"], capsys)
        assert code == 0, out
        assert "sample/, tune/, hf/, checkpointer/epoch_0/" in out
    assert {p.name for p in keep.iterdir()} >= {"sample", "tune", "hf", "checkpointer"}
    assert (keep / "checkpointer" / "epoch_0" / INDEX).is_file()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    code, _, err = _main(["roundtrip", "--keep", str(mine)], capsys)
    assert code == 2 and "earlier `roundtrip --keep`" in err and (mine / "notes.txt").read_text() == "mine"


# ------------------------------------------------------------------------------ errors point the right way


def test_convert_errors_in_cli_words(ws: Path, tmp_path: Path, capsys) -> None:
    hf = str(ws / "hf")
    code, out, err = _main(["convert", hf, str(tmp_path / "x"), "--to", "hf", "--json"], capsys)
    assert code == 2 and "already a Hugging Face checkpoint" in err and "--to tune" in err
    assert json.loads(out)["error"]["path"] == hf
    code, _, err = _main(["convert", hf, hf, "--to", "tune", "--model-type", "LLAMA3"], capsys)
    assert code == 2 and "SRC and DST are the same folder" in err
    assert "ckpt_dir" not in err and "out_dir" not in err
    code, _, err = _main(["convert", hf, f"{hf}/inner", "--to", "tune", "--model-type", "LLAMA3"], capsys)
    assert code == 2 and "inside SRC" in err and not (ws / "hf" / "inner").exists()
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------- side files


def test_manifest_pins_side_files_and_against_names_a_changed_one(ws: Path, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "ck"
    shutil.copytree(ws / "hf", folder)
    code, _, _ = _main(["verify", str(folder), "--write-manifest", str(tmp_path / "m.json")], capsys)
    assert code == 0
    pinned = json.loads((tmp_path / "m.json").read_text())["files"]
    assert {"config.json", "generation_config.json", "tokenizer_config.json", INDEX} <= set(pinned)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-6
    (folder / "config.json").write_text(json.dumps(cfg))
    code, out, _ = _main(["verify", str(folder), "--against", str(tmp_path / "m.json"), "--json"], capsys)
    doc = json.loads(out)
    assert code == 1 and [(p["kind"], p["file"]) for p in doc["problems"]] in (
        [("size", "config.json")], [("checksum", "config.json")])
    (folder / "generation_config.json").unlink()
    code, out, _ = _main(["verify", str(folder), "--against", str(tmp_path / "m.json"), "--json"], capsys)
    assert ("missing-file", "generation_config.json") in {(p["kind"], p["file"]) for p in json.loads(out)["problems"]}


def test_compare_names_a_changed_config_field(ws: Path, tmp_path: Path, capsys) -> None:
    other = tmp_path / "other"
    shutil.copytree(ws / "hf", other)
    cfg = json.loads((other / "config.json").read_text())
    was = cfg.get("rms_norm_eps")
    cfg["rms_norm_eps"] = 1e-6 if was != 1e-6 else 1e-5
    (other / "config.json").write_text(json.dumps(cfg, indent=4))
    (other / "tokenizer_config.json").unlink()
    code, out, _ = _main(["compare", str(ws / "hf"), str(other), "--json"], capsys)
    doc = json.loads(out)
    assert code == 1
    messages = [p["message"] for p in doc["problems"] if p["kind"] == "side-file"]
    assert any(m.startswith("config.json: rms_norm_eps is") for m in messages), messages
    assert any(m.startswith("tokenizer_config.json: missing") for m in messages), messages
    assert {p["kind"] for p in doc["problems"]} == {"side-file"}  # the weights are the same
    # reformatting alone is not a difference
    shutil.copy(ws / "hf" / "tokenizer_config.json", other / "tokenizer_config.json")
    (other / "config.json").write_text(json.dumps(json.loads((ws / "hf" / "config.json").read_text()), indent=8))
    code, out, _ = _main(["compare", str(ws / "hf"), str(other), "--json"], capsys)
    assert code == 0, out
    assert {f["name"]: f["status"] for f in json.loads(out)["side_files"]}["config.json"] == "equal-content"


# ------------------------------------------------------------------------------------ compare, re-sharded


def test_compare_sees_through_resharding(ws: Path, tmp_path: Path, capsys) -> None:
    hf = str(ws / "hf")
    code, _, _ = _main(["convert", hf, str(tmp_path / "tune"), "--to", "tune", "--model-type", "LLAMA3", "-q"], capsys)
    assert code == 0
    # the torchtune folder converted back with a small shard cap: same tensors, 5+ shards instead of 2
    code, _, _ = _main(["convert", str(tmp_path / "tune"), str(tmp_path / "resharded"), "--to", "hf",
                        "--max-shard-size", "20kB", "-q"], capsys)
    assert code == 0
    shards = [p for p in (tmp_path / "resharded").iterdir() if p.name.endswith(".safetensors")]
    assert len(shards) > 2
    code, out, _ = _main(["compare", hf, str(tmp_path / "resharded")], capsys)
    assert code == 0 and out.rstrip().endswith("OK: same tensors, different layout"), out
    code, out, _ = _main(["compare", hf, str(tmp_path / "resharded"), "--strict-layout", "--json"], capsys)
    doc = json.loads(out)
    assert code == 1 and [p["kind"] for p in doc["problems"]] == ["layout"] and doc["layout"] == "different"
    # a real difference is still named tensor by tensor, in the file it is in now
    key = "model.layers.1.mlp.down_proj.weight"
    index = json.loads((tmp_path / "resharded" / INDEX).read_text())
    target = tmp_path / "resharded" / index["weight_map"][key]
    header_len = struct.unpack("<Q", target.read_bytes()[:8])[0]
    header = json.loads(target.read_bytes()[8:8 + header_len])
    offset = 8 + header_len + header[key]["data_offsets"][0] + 3
    data = bytearray(target.read_bytes())
    data[offset] ^= 0x40
    target.write_bytes(bytes(data))
    code, out, _ = _main(["compare", hf, str(tmp_path / "resharded"), "--json"], capsys)
    doc = json.loads(out)
    assert code == 1
    assert [(p["kind"], p["tensor"], p["file"]) for p in doc["problems"]] == [("data", key, target.name)]
    assert doc["problems"][0]["tensor_range"] == [3, 4] and doc["problems"][0]["byte_range"] == [offset, offset + 1]
