"""``shardwise roundtrip``: HF → torchtune → HF (and the checkpointer's load → save), compared, and
its rendering."""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import CheckpointError
from ..format.scan import file_format, index_truth, not_a_folder, read_files, scan
from .base import Report, n_of, register_renderer
from .comparison import compare, file_rows
from .progress import Progress, human_bytes

__all__ = ["roundtrip"]


def roundtrip(
    path: str | os.PathLike[str] | None = None,
    model_type: str | None = None,
    *,
    workdir: str | os.PathLike[str] | None = None,
    keep: str | os.PathLike[str] | None = None,
    tamper: Callable[[Path], None] | None = None,
    progress: bool = False,
) -> Report:
    """HF → torchtune → HF through ``shardwise convert`` in a temporary folder, then ``compare``.

    ``ok`` when every shard and the index come back byte for byte (for ``.bin``/``.pt`` inputs, which
    come back as safetensors: the same tensors and index content). With ``path=None`` it runs on the
    bundled sample (``shardwise.sample``, a tiny Llama-3-style checkpoint generated on the fly).

    ``workdir``: where the temporary folder goes (default: the system's); ``keep``: a folder to keep
    every intermediate result in instead (``sample/`` when generated, ``tune/``, ``hf/``,
    ``checkpointer/epoch_0/``; a folder kept by an earlier run is replaced); ``tamper``: called with the
    torchtune folder before converting back (fault injection for tests of the comparison).

    Raises ``CheckpointError``/``OSError`` for unreadable input, ``KeyError`` for an unknown model type
    and ``NotImplementedError`` for one without a converter.
    """
    from .. import sample
    from ..checkpointer import FullModelHFCheckpointer
    from ..format.layout import output_name
    from ..model_types import parse_model_type
    from .tunedir import convert_checkpoint

    if path is None:
        mt = parse_model_type(model_type or sample.SAMPLE_MODEL_TYPE)
    elif model_type is None:
        raise ValueError("roundtrip needs a model_type for a checkpoint folder (e.g. LLAMA3)")
    else:
        mt = parse_model_type(model_type)
    from ..convert import get_converter

    get_converter(mt)  # NotImplementedError before any work
    t0 = time.perf_counter()
    if keep is not None:
        work = _keep_folder(Path(keep))
    else:
        work = Path(tempfile.mkdtemp(prefix="shardwise-roundtrip-", dir=workdir))
    try:
        timings: dict[str, float | None] = {"generate_seconds": None}
        if path is None:
            src = sample.write_sample(work / "sample")
            timings["generate_seconds"] = time.perf_counter() - t0
        else:
            src = Path(path)
            if not src.is_dir():
                raise not_a_folder(src)
        t = time.perf_counter()
        to_tune = convert_checkpoint(src, work / "tune", mt.name, to="tune", progress=progress)
        timings["to_tune_seconds"] = time.perf_counter() - t
        if tamper is not None:
            tamper(work / "tune")
        t = time.perf_counter()
        convert_checkpoint(work / "tune", work / "hf", mt.name, to="hf", progress=progress)
        timings["to_hf_seconds"] = time.perf_counter() - t
        s = scan(src)
        # a flawed input is the input's problem: where its index is wrong and the output right, the
        # difference is a warning ("input inconsistent, corrected in the output"), not a regression
        truth = index_truth(s, read_files(s.root, s.loadable))

        def rename(name: str) -> str:
            if s.index is not None and name == s.index.name:
                return "model.safetensors.index.json"
            return output_name(name, True) if file_format(name) == "torch" else name

        t = time.perf_counter()
        cmp = compare(src, work / "hf", rename=rename, strict_layout=True, ignore=s.strays, index_truth=truth,
                      progress=progress)
        timings["compare_seconds"] = time.perf_counter() - t
        # the path recipes take: FullModelHFCheckpointer load_checkpoint → save_checkpoint
        t = time.perf_counter()
        ck = FullModelHFCheckpointer(str(src), s.loadable, mt.name, str(work / "checkpointer"), fsync=False)
        size = sum((src / n).stat().st_size for n in s.loadable)
        with Progress(size, "checkpointer load → save", enabled=progress) as bar, bar.watch_writes():
            ck.save_checkpoint(ck.load_checkpoint(), epoch=0)
        timings["checkpointer_seconds"] = time.perf_counter() - t
        via_ck = compare(src, work / "checkpointer" / "epoch_0", rename=rename, strict_layout=True, ignore=s.strays,
                         index_truth=truth, progress=progress)
    finally:
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)
    def identical(c: Report) -> bool:
        return c.ok and all(f["status"] == "identical" for f in c.files) and (
            c.details["index"] is None or c.details["index"]["status"] == "identical"
        )

    exact = identical(cmp) and identical(via_ck)
    seen = {(p.kind, p.file, p.tensor, p.byte_range) for p in cmp.problems}
    problems = list(cmp.problems) + [  # what only the checkpointer's path gets wrong
        dataclasses.replace(p, message=f"FullModelHFCheckpointer load → save: {p.message}")
        for p in via_ck.problems
        if (p.kind, p.file, p.tensor, p.byte_range) not in seen
    ]
    stats = {
        "shards": len([f for f in cmp.files if f["expected"] is not None]),
        "tensors": to_tune.stats["input_tensors"],
        "tune_tensors": to_tune.stats["tensors"],
        "aside": to_tune.stats["aside"],
        "bytes": to_tune.stats["bytes"],
        **{k: None if v is None else round(v, 6) for k, v in timings.items()},
        "seconds": round(time.perf_counter() - t0, 6),
    }
    details = {
        "model_type": mt.name,
        "sample": path is None,
        "byte_identical": exact,
        "kept": None if keep is None else str(keep),
        "index": cmp.details["index"],
    }
    warnings = list(to_tune.warnings) + list(cmp.warnings)
    warnings += [w for w in via_ck.warnings if (w.kind, w.message) not in {(x.kind, x.message) for x in warnings}]
    where = "<sample>" if path is None else str(path)
    return Report("roundtrip", where, problems, cmp.files, stats, details, warnings)


#: what ``keep=`` holds: the generated sample, both conversions, the checkpointer's output
KEPT = ("sample", "tune", "hf", "checkpointer")
_KEEP_MARK = ".shardwise-roundtrip"


def _keep_folder(work: Path) -> Path:
    """The ``keep`` folder, new, empty, or kept by an earlier round trip (whose results are replaced);
    any other folder is refused so that nothing of the user's is deleted."""
    if work.exists() and not work.is_dir():
        raise CheckpointError(f"{work}: the folder to keep the round trip in is a file")
    if work.exists() and any(work.iterdir()):
        if not (work / _KEEP_MARK).is_file():
            raise CheckpointError(f"{work}: the folder to keep the round trip in must be new, empty, or one an "
                                  "earlier `roundtrip --keep` wrote")
        others = sorted(p.name for p in work.iterdir() if p.name not in (*KEPT, _KEEP_MARK))
        if others:
            raise CheckpointError(f"{work}: holds files an earlier round trip did not write ({', '.join(others)})")
        for name in KEPT:
            shutil.rmtree(work / name, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    (work / _KEEP_MARK).write_text("kept by `shardwise roundtrip --keep`; a later --keep run replaces it\n")
    return work


def _verdict_roundtrip(r: Report) -> str:
    if r.ok:
        if r.details.get("byte_identical"):
            return "byte-identical: yes"
        if any(w.kind == "input-inconsistent" for w in r.warnings):
            return "byte-identical: no — the input's index is inconsistent and is corrected in the output (warnings)"
        return "byte-identical: no — same tensors and index content (format changed)"
    return "byte-identical: NO"


def _render_roundtrip(r: Report) -> list[str]:
    st = r.stats
    what = r.path
    if r.details.get("sample"):
        ms = (st["generate_seconds"] or 0) * 1000
        what = f"bundled sample: a tiny Llama-3-style checkpoint, generated in {ms:.0f} ms"
    lines = [
        "shardwise roundtrip: Hugging Face → torchtune → Hugging Face, compared byte for byte",
        f"  checkpoint   {what}",
        f"  model type   {r.details['model_type']}",
        f"  contents     {n_of(st['shards'], 'shard')}, {n_of(st['tensors'], 'tensor')}, {human_bytes(st['bytes'])}"
        + (f", index {r.details['index']['expected']}" if r.details.get("index") else ""),
        f"  HF → tune    {st['to_tune_seconds'] * 1000:8.1f} ms   {st['tune_tensors']} torchtune tensors"
        + (f" + {st['aside']} kept aside" if st["aside"] else ""),
        f"  tune → HF    {st['to_hf_seconds'] * 1000:8.1f} ms",
        f"  compare      {st['compare_seconds'] * 1000:8.1f} ms",
        f"  checkpointer {st['checkpointer_seconds'] * 1000:8.1f} ms   FullModelHFCheckpointer load → save, compared",
        *file_rows(r),
    ]
    if r.details.get("kept"):
        kept = ["tune/", "hf/", "checkpointer/epoch_0/"]
        if r.details.get("sample"):
            kept.insert(0, "sample/")
        lines.append(f"  intermediate folders kept in {r.details['kept']}: {', '.join(kept)}")
    return lines


register_renderer("roundtrip", _render_roundtrip, _verdict_roundtrip)
