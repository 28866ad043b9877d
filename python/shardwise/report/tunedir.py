"""``shardwise convert``: a Hugging Face checkpoint folder ⇄ a folder of torchtune-keyed safetensors.

HF → tune keeps the partitioning (one torchtune shard per HF shard, same file names; ``.bin``/``.pt``
become ``.safetensors``) unless ``max_shard_size`` asks for a new one, and writes ``shardwise-origin
.json``: the original shard names and header bytes, the original index bytes, the kept-aside keys
(their tensors in ``shardwise-aside.safetensors``, or a reference to the torchtune tensor that holds
the same bytes) and the side files. tune → HF uses it to reproduce the original shards and index
byte for byte; a torchtune folder without it gets a fresh HF layout.

Built on the checkpointer's pieces: converters (``convert``), planning and headers (``layout``), shard
reading (``shards``) and the native writer (``layout.write_safetensors_shards``). Every output
folder is assembled next to its destination and published atomically (``_core.publish_dir``).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import _core
from ..checkpointer.files import copy_files, resolve_checkpoint_files
from ..config import ModelConfig
from ..constants import SAFETENSOR_INDEX_FNAME, SUFFIXES_TO_NOT_COPY, ModelType
from ..convert import get_converter
from ..convert.base import Converter, LoadResult, Op, identity_op
from ..errors import CheckpointError, ConfigError, ConversionError
from ..format.layout import OutputShard, SavePlan, count_params, index_bytes, plan_shards, write_safetensors_shards
from ..format.scan import not_a_folder, read_files, scan_folder
from ..format.shards import SourceFile, load_merged, load_source_tensors, read_sources, with_file
from ..model_types import parse_model_type
from ..store.local import fsync_tree, safe_join
from ..units import parse_size
from ..version import __version__
from .base import Problem, Report, n_of, register_renderer, stray_warnings
from .origin import ASIDE_NAME, ORIGIN_NAME, ORIGIN_SCHEMA, origin_shard, origin_sources, read_origin
from .progress import Progress, human_bytes

__all__ = ["convert_checkpoint"]

#: shard size of a fresh HF layout when neither an origin nor ``max_shard_size`` says otherwise
DEFAULT_SHARD_SIZE = "5GB"


def convert_checkpoint(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    model_type: str | ModelType | None = None,
    *,
    to: str,
    max_shard_size: int | str | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> Report:
    """Convert checkpoint folder ``src`` into a new folder ``dst`` (``to="tune"`` or ``to="hf"``).

    ``model_type`` is a ``ModelType`` name (for ``to="hf"`` it defaults to the one recorded in the
    origin). ``max_shard_size`` (``5GB``, ``500MiB``, bytes) re-shards. ``dst`` must not exist or be
    empty unless ``overwrite``; it appears only when complete. Returns a ``Report`` (``command
    "convert"``) listing the written files.
    """
    if to not in ("tune", "hf"):
        raise ValueError(f"to must be 'tune' or 'hf', got {to!r}")
    t0 = time.perf_counter()
    src_p, dst_p = Path(src), Path(dst)
    if not src_p.is_dir():
        raise not_a_folder(src_p)
    mt = None if model_type is None else parse_model_type(model_type)
    cap = parse_size(max_shard_size)
    _check_destination(src_p, dst_p, overwrite)
    dst_p.parent.mkdir(parents=True, exist_ok=True)
    staging = dst_p.parent / f".{dst_p.name}.shardwise-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        if to == "tune":
            if mt is None:
                raise ValueError("converting to torchtune needs a model type (e.g. LLAMA3)")
            result = _to_tune(src_p, staging, mt, cap, progress)
        else:
            result = _to_hf(src_p, staging, mt, cap, progress)
        _sync(staging, progress)
        _core.publish_dir(str(staging), str(dst_p))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    files = []
    for name, role, tensors in result.files:
        files.append({"name": name, "role": role, "size": (dst_p / name).stat().st_size, "tensors": tensors})
    stats = {
        "shards": sum(f["role"] == "shard" for f in files),
        "tensors": result.tensors,
        "input_tensors": result.inputs,
        "bytes": result.nbytes,
        "aside": result.aside,
        "seconds": round(time.perf_counter() - t0, 6),
    }
    details = {
        "output": str(dst_p),
        "model_type": result.model_type.name,
        "direction": "hf-to-tune" if to == "tune" else "tune-to-hf",
    }
    return Report("convert", str(src_p), [], files, stats, details, result.warnings)


def _check_destination(src: Path, dst: Path, overwrite: bool) -> None:
    if dst.resolve() == src.resolve():
        raise ValueError(f"SRC and DST are the same folder ({src}): convert writes a new folder, give another DST")
    if src.resolve() in dst.resolve().parents:
        raise ValueError(f"DST {dst} is inside SRC {src}: give a DST outside it")
    if dst.resolve() in src.resolve().parents:
        raise ValueError(f"DST {dst} contains SRC {src}: give a DST that does not")
    if dst.exists():
        if not dst.is_dir():
            raise CheckpointError(f"{dst}: exists and is not a folder")
        if any(dst.iterdir()) and not overwrite:
            raise CheckpointError(f"{dst}: exists and is not empty (pass --overwrite to replace it)")


@dataclass
class _Result:
    model_type: ModelType
    files: list[tuple[str, str, int | None]] = field(default_factory=list)  # name, role, tensors
    tensors: int = 0  # written
    inputs: int = 0  # read
    nbytes: int = 0
    aside: int = 0
    warnings: list[Problem] = field(default_factory=list)


def _labelled(shard: OutputShard, bar: Progress, label: str) -> list[Op]:
    """The shard's ops, the first of which names the shard on the bar when the writer gets to it."""

    def first(op: Op) -> Op:
        def make() -> torch.Tensor:
            bar.set_label(f"{label} {shard.name}")
            return op.make()

        return Op(op.key, op.dtype, op.shape, make)

    return [first(op) for op in shard.ops[:1]] + list(shard.ops[1:])


def _write_plan(plan: SavePlan, folder: Path, label: str, progress: bool) -> None:
    """Write the plan's shards; the bar follows the bytes as the native writer writes them."""
    with Progress(plan.total_size, label, enabled=progress) as bar:
        for shard in plan.shards:
            shard.ops = _labelled(shard, bar, label)
        with bar.watch_writes():
            write_safetensors_shards(plan, folder)


def _sync(folder: Path, progress: bool) -> None:
    """fsync everything written (on a disk this can take seconds: it gets a bar of its own)."""
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    with Progress(total, "fsync", enabled=progress) as bar:
        fsync_tree(folder, lambda p: (bar.set_label(f"fsync {p.name}"), bar.update(p.stat().st_size)))


def _meta(d: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(tuple(t.shape), dtype=t.dtype, device="meta") for k, t in d.items()}


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.numel() > 0
        and a.dtype == b.dtype
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.data_ptr() == b.data_ptr()
    )


@dataclass
class _Unit:
    """A group of torchtune tensors converted together: one HF shard, or the whole checkpoint."""

    source: SourceFile | None
    hf: dict[str, torch.Tensor]
    layout: dict[str, tuple[torch.dtype, tuple[int, ...]]]  # tune key -> (dtype, shape)


def _plan_units(
    conv: Converter, cfg: ModelConfig, sources: Sequence[SourceFile], hf: Sequence[dict[str, torch.Tensor]],
    where: Mapping[str, str],
) -> tuple[list[_Unit], list[str], LoadResult | None]:
    """Shard by shard when the converter maps each shard on its own exactly as it maps the whole (checked
    on meta tensors: no data is read); otherwise one unit converted in full. Returns the units, the
    kept-aside HF keys and, in the second case, the full conversion."""
    merged = {k: t for d in hf for k, t in d.items()}
    try:
        whole = conv.hf_to_tune(_meta(merged), cfg)
        parts = [conv.hf_to_tune(_meta(d), cfg) for d in hf]
    except ConversionError as e:
        raise with_file(e, where) from e
    except Exception:  # a converter that needs real data on load: convert once, in full
        whole = None
    if whole is not None:
        seen: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        disjoint = True
        for p in parts:
            for k, t in p.tune.items():
                disjoint &= k not in seen
                seen[k] = (t.dtype, tuple(t.shape))
        expected = {k: (t.dtype, tuple(t.shape)) for k, t in whole.tune.items()}
        if disjoint and seen == expected:
            units = [
                _Unit(src, d, {k: (t.dtype, tuple(t.shape)) for k, t in p.tune.items()})
                for src, d, p in zip(sources, hf, parts)
            ]
            return units, list(whole.aside), None
    try:
        full = conv.hf_to_tune(merged, cfg)
    except ConversionError as e:
        raise with_file(e, where) from e
    layout = {k: (t.dtype, tuple(t.shape)) for k, t in full.tune.items()}
    return [_Unit(None, merged, layout)], list(full.aside), full


def _to_tune(src: Path, out: Path, mt: ModelType, cap: int | None, progress: bool) -> _Result:
    conv = get_converter(mt)
    if (src / ORIGIN_NAME).exists():
        raise CheckpointError(
            f"{src}: already a torchtune-keyed folder written by `shardwise convert --to tune` (use --to hf)"
        )
    cfg = ModelConfig.from_file(src / "config.json")
    conv.validate_config(cfg)
    s = scan_folder(src)
    if s.index is not None and s.index.error is not None:
        raise CheckpointError(f"{src / s.index.name}: {s.index.error}")
    paths = resolve_checkpoint_files(s.loadable, src, inside=True)
    sources = read_sources(paths)
    hf, key_source = load_merged(sources)
    where = {k: str(source.path) for k, source in key_source.items()}
    units, aside_keys, full = _plan_units(conv, cfg, sources, hf, where)

    # aside keys whose tensor is also a torchtune tensor (same memory) are stored once, as a reference
    aliases: dict[str, str] = {}
    aside_of_unit: dict[int, list[str]] = {}
    for k in aside_keys:
        home = next((i for i, u in enumerate(units) if k in u.hf), None)
        if home is not None:
            aside_of_unit.setdefault(home, []).append(k)
    cache: dict[str, Any] = {"unit": None, "tune": None}

    def converted(i: int) -> dict[str, torch.Tensor]:
        if cache["unit"] != i:
            cache["unit"], cache["tune"] = None, None  # drop the previous unit first
            tune = full.tune if full is not None else conv.hf_to_tune(units[i].hf, cfg).tune
            for k in aside_of_unit.get(i, []):
                alias = next((tk for tk, tt in tune.items() if _same_memory(tt, units[i].hf[k])), None)
                if alias is not None:
                    aliases[k] = alias
            cache["unit"], cache["tune"] = i, tune
        return cache["tune"]

    ops: list[Op] = []
    key_source: dict[str, SourceFile] = {}
    for i, unit in enumerate(units):
        for key, (dtype, shape) in unit.layout.items():
            ops.append(Op(key, dtype, shape, lambda i=i, key=key: converted(i)[key]))
            if unit.source is not None:
                key_source[key] = unit.source
    if cap is None:
        plan = plan_shards(ops, [u.source for u in units if u.source is not None], key_source,
                           safe=True, had_index=False)
    else:
        plan = plan_shards(ops, [], {}, safe=True, had_index=False, max_shard_size=cap)
    _write_plan(plan, out, "HF → tune", progress)
    cache["unit"], cache["tune"] = None, None

    result = _Result(mt, tensors=len(ops), inputs=len(where), nbytes=plan.total_size, aside=len(aside_keys),
                     warnings=stray_warnings(s))
    result.files = [(sh.name, "shard", len(sh.ops)) for sh in plan.shards]
    if len(plan.shards) > 1:
        (out / SAFETENSOR_INDEX_FNAME).write_bytes(index_bytes(plan, None, count_params(ops)))
        result.files.append((SAFETENSOR_INDEX_FNAME, "index", None))
    merged = {k: t for d in hf for k, t in d.items()}
    stored = [k for k in aside_keys if k not in aliases]
    if stored:
        aside_plan = SavePlan([OutputShard(ASIDE_NAME, [identity_op(k, merged[k]) for k in stored])], False)
        write_safetensors_shards(aside_plan, out)
        result.files.append((ASIDE_NAME, "aside", len(stored)))
    side = [str(p.relative_to(out)) for p in copy_files(src, out)]
    result.files.extend((n, "side", None) for n in side)

    origin = {
        "schema": ORIGIN_SCHEMA,
        "shardwise_version": __version__,
        "model_type": mt.name,
        "source": {
            "shards": [origin_shard(source) for source in sources],
            "index": None if s.index is None else {
                "name": s.index.name, "bytes": base64.b64encode(s.index.raw).decode("ascii"),
            },
        },
        "tune": {
            "shards": [sh.name for sh in plan.shards],
            "index": SAFETENSOR_INDEX_FNAME if len(plan.shards) > 1 else None,
        },
        "aside": {"file": ASIDE_NAME if stored else None, "keys": aside_keys, "aliases": aliases},
        "side_files": side,
    }
    (out / ORIGIN_NAME).write_text(json.dumps(origin, indent=2) + "\n")
    result.files.append((ORIGIN_NAME, "origin", None))
    return result


# ---------------------------------------------------------------------------------------- tune -> HF


#: key prefixes only Hugging Face checkpoints have (torchtune keys start with tok_embeddings, layers, ...)
_HF_PREFIXES = ("model.", "lm_head.", "transformer.", "language_model.", "vision_model.", "text_model.")


def _refuse_hf_folder(src: Path) -> None:
    """``--to hf`` of a folder that is already Hugging Face (no origin, HF key names): say so."""
    s = scan_folder(src)
    infos = read_files(s.root, [n for n in s.shards if n in s.present])
    hf_key = next((t.name for f in infos for t in f.tensors if t.name.startswith(_HF_PREFIXES)), None)
    if hf_key is not None:
        raise CheckpointError(
            f"{src}: already a Hugging Face checkpoint (keys like {hf_key!r}, no {ORIGIN_NAME}); "
            "to convert it to torchtune keys use --to tune"
        )


def _to_hf(src: Path, out: Path, mt: ModelType | None, cap: int | None, progress: bool) -> _Result:
    origin_path = src / ORIGIN_NAME
    origin = read_origin(origin_path) if origin_path.exists() else None
    if origin is not None:
        recorded = parse_model_type(str(origin.get("model_type")))
        if mt is None:
            mt = recorded
        elif get_converter(mt).__class__ is not get_converter(recorded).__class__:
            raise ConfigError(f"{origin_path}: converted as {recorded.name}, but the model type given is {mt.name}")
    if origin is None:
        _refuse_hf_folder(src)
    if mt is None:
        raise ValueError(f"{src} has no {ORIGIN_NAME}: give the model type (e.g. LLAMA3)")
    conv = get_converter(mt)
    cfg = ModelConfig.from_file(src / "config.json")
    conv.validate_config(cfg)
    strays: list[Problem] = []
    if origin is not None:
        names = [str(n) for n in origin["tune"]["shards"]]
    else:
        found = scan_folder(src)
        names = found.loadable
        strays = stray_warnings(found)
    paths = resolve_checkpoint_files(names, src, inside=True)
    per_source, key_source = load_merged(read_sources(paths))
    tune = {k: t for tensors in per_source for k, t in tensors.items()}
    where = {k: str(source.path) for k, source in key_source.items()}
    aside: dict[str, torch.Tensor] = {}
    if origin is not None:
        info = origin.get("aside") or {}
        stored: dict[str, torch.Tensor] = {}
        if info.get("file"):
            (aside_src,) = read_sources([safe_join(src, str(info["file"]), "aside file")])
            stored = load_source_tensors(aside_src)
        aliases = info.get("aliases") or {}
        for k in info.get("keys") or []:
            if k in aliases:
                if aliases[k] not in tune:
                    msg = f"kept-aside {k!r} refers to {aliases[k]!r}, which is not in the shards"
                    raise CheckpointError(f"{origin_path}: {msg}")
                aside[k] = tune[aliases[k]]
            elif k in stored:
                aside[k] = stored[k]
            else:
                raise CheckpointError(f"{origin_path}: kept-aside tensor {k!r} is not in {info.get('file')}")
    try:
        ops = conv.tune_to_hf_ops(tune, cfg, aside)
    except ConversionError as e:
        raise with_file(e, where) from e
    original_index: tuple[bytes, dict[str, Any]] | None = None
    if origin is not None and origin["source"].get("index"):
        raw = base64.b64decode(origin["source"]["index"]["bytes"])
        try:
            parsed = json.loads(raw)
            if isinstance(parsed, dict):
                original_index = (raw, parsed)
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass
    if cap is None and origin is not None:
        sources, key_source = origin_sources(origin, str(origin_path))
        had_index = original_index is not None or len(sources) > 1
        plan = plan_shards(ops, sources, key_source, safe=True, had_index=had_index)
    else:
        plan = plan_shards(ops, [], {}, safe=True, had_index=False,
                           max_shard_size=cap or parse_size(DEFAULT_SHARD_SIZE))
    _write_plan(plan, out, "tune → HF", progress)
    result = _Result(mt, tensors=len(ops), inputs=len(tune), nbytes=plan.total_size, aside=len(aside),
                     warnings=strays)
    result.files = [(sh.name, "shard", len(sh.ops)) for sh in plan.shards]
    if plan.write_index:
        (out / SAFETENSOR_INDEX_FNAME).write_bytes(index_bytes(plan, original_index, count_params(ops)))
        result.files.append((SAFETENSOR_INDEX_FNAME, "index", None))
    side = copy_files(src, out, ignore_suffixes=[*SUFFIXES_TO_NOT_COPY, ORIGIN_NAME])
    result.files.extend((str(p.relative_to(out)), "side", None) for p in side)
    return result


def _render_convert(r: Report) -> list[str]:
    st = r.stats
    arrow = "HF → torchtune" if r.details["direction"] == "hf-to-tune" else "torchtune → HF"
    lines = [
        f"converted {r.path} → {r.details['output']} ({arrow}, {r.details['model_type']})",
        f"  {n_of(st['shards'], 'shard')}, {n_of(st['tensors'], 'tensor')}, {human_bytes(st['bytes'])}"
        + (f", {st['aside']} kept aside" if st.get("aside") else "")
        + f" in {st['seconds']:.3f} s",
    ]
    w = max([len(f["name"]) for f in r.files] + [4])
    for f in r.files:
        tensors = "" if f["tensors"] is None else f"{f['tensors']} tensors"
        lines.append(f"  {f['name']:<{w}}  {human_bytes(f['size']):>9}  {f['role']:<6}  {tensors}".rstrip())
    return lines


register_renderer("convert", _render_convert)
