"""A Ctrl-C that arrives after the command's work is done (its report printed, the interpreter
shutting down, where CPython restores the default SIGINT handler) does not turn a success into death
by SIGINT: the command's exit status stands. Before, most such runs died with -2 and no message."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from ckpt_factory import LlamaSpec, llama_state_dict, write_hf_checkpoint


def test_ctrl_c_during_shutdown_keeps_the_exit_status(tmp_path: Path) -> None:
    spec = LlamaSpec()
    sd = llama_state_dict(spec)
    write_hf_checkpoint(tmp_path / "hf", sd, [list(sd)], spec.config(), {"format": "pt"})
    codes = []
    for delay in (0.0, 0.01, 0.03):
        out = tmp_path / f"tune-{delay}"
        cmd = [sys.executable, "-m", "shardwise", "convert", str(tmp_path / "hf"), str(out), "--to", "tune",
               "--model-type", "LLAMA3", "-q"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            first = proc.stdout.readline() if proc.stdout else ""  # the report is printed: the work is done
            time.sleep(delay)
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
        codes.append(proc.returncode)
        assert first.startswith("converted"), (first, err)
        assert (out / "shardwise-origin.json").is_file()
    assert codes == [0, 0, 0], codes
