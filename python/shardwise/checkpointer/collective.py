"""``FullModelHFCheckpointer.save_checkpoint`` on every rank with DTensor values: the collective save.

Every rank writes its own rows of the final HF shards through ``HFStorageWriter`` (no gather of the
model). Adapters (small) are gathered and written by rank 0 with the side files, before the folder is
published; recipe state with sharded values (the optimizer) is written sharded by DCP's own
``FileSystemWriter`` under ``output_dir/recipe_state/``, next to ``recipe_state.pt``, which records
where it is. Rank 0 publishes everything only after every rank has written and fsynced; a failure
anywhere fails every rank and publishes nothing.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException, FileSystemReader, FileSystemWriter
from torch.distributed.tensor import DTensor

from .. import _core
from ..constants import ADAPTER_CONFIG, RECIPE_STATE_DIRNAME
from ..convert.base import Op
from ..dcp.api import save, save_group, unwrap
from ..dcp.plan import HF_PREFIX, SourceLayout
from ..errors import CheckpointError
from ..format.layout import made
from ..format.torchfile import commit, stage_torch_save
from ..staging import SaveFuture, Stager, submit, wait_for_previous
from ..store.local import STAGING_MARK, remove_leftovers
from .files import copy_files
from .recipe_state import SHARDED_DIR, SHARDED_KEYS, recipe_keys


class Checkpoint(Protocol):
    """What a collective save reads from its checkpointer (``FullModelHFCheckpointer`` hands one over)."""

    output_dir: Path
    checkpoint_dir: Path
    fsync: bool

    def source_layout(self) -> SourceLayout:
        """The input files' layout (loaded now if the checkpointer has not loaded them yet)."""
        ...

    def write_adapter_files(
        self, state_dict: Mapping[str, Any], adapter: Mapping[str, torch.Tensor] | None, folder: Path
    ) -> None:
        """The adapter files of the folder (rank 0, into the staging folder)."""
        ...

__all__ = ["Checkpoint", "fill_leaves", "load_sharded_recipe_state", "save_collective", "split_leaves"]



def _has_dtensor(obj: Any) -> bool:
    if isinstance(obj, DTensor):
        return True
    if isinstance(obj, Mapping):
        return any(_has_dtensor(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_has_dtensor(v) for v in obj)
    return False


#: stands in ``recipe_state.pt`` for a DTensor saved with DCP under the name that follows it
_LEAF = "__shardwise_dcp_leaf__"


def split_leaves(obj: Any, path: str, leaves: dict[str, DTensor]) -> Any:
    """``obj`` with every DTensor replaced by a ``(_LEAF, name)`` marker (the DTensor goes to
    ``leaves[name]``), keeping every container type and key (DCP alone would turn int keys into str)."""
    if isinstance(obj, DTensor):
        leaves[path] = obj
        return (_LEAF, path)
    if isinstance(obj, Mapping):
        return type(obj)((k, split_leaves(v, f"{path}.{k}", leaves)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(split_leaves(v, f"{path}.{i}", leaves) for i, v in enumerate(obj))
    return obj


def fill_leaves(obj: Any, leaves: Mapping[str, torch.Tensor], where: Path) -> Any:
    if isinstance(obj, tuple) and len(obj) == 2 and obj[0] == _LEAF:
        if obj[1] not in leaves:
            raise CheckpointError(f"{where}: the sharded recipe state has no tensor {obj[1]!r}")
        return leaves[obj[1]]
    if isinstance(obj, Mapping):
        return type(obj)((k, fill_leaves(v, leaves, where)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(fill_leaves(v, leaves, where) for v in obj)
    return obj


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _closure_tensors(op: Op) -> list[torch.Tensor]:
    """The tensors an op's ``make`` reads (its closure and default arguments)."""
    found: list[torch.Tensor] = []

    def visit(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            found.append(x)
        elif isinstance(x, (list, tuple)):
            for y in x:
                visit(y)
        elif isinstance(x, Mapping):
            for y in x.values():
                visit(y)

    fn = op.make
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            visit(cell.cell_contents)
        except ValueError:  # an empty cell
            continue
    for d in getattr(fn, "__defaults__", None) or ():
        visit(d)
    return found


def _materialize_non_row_ops(
    src: SourceLayout, model: Mapping[str, Any], world: int, rank: int
) -> dict[str, Any]:
    """Keys whose conversion is no row map (Llama4's fused experts, vision tile tables) cannot be written
    rows-first: their inputs are gathered (collective, one key at a time, the same order on every rank),
    converted, and each HF result is handed to the writer by one rank (round robin), so no rank keeps
    more than its share."""
    meta = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in model.items()}
    owner = {id(t): k for k, t in meta.items()}
    ops = src.converter.tune_to_hf_ops(meta, src.config, src.aside)
    todo = [op for op in ops if op.rows is None]
    if not todo:
        return dict(model)
    out = dict(model)
    needed: list[str] = []
    for op in todo:
        for t in _closure_tensors(op):
            k = owner.get(id(t))
            if k is not None and k not in needed:
                needed.append(k)
    full = {k: _full(model[k]) for k in needed}  # collective, same order on every rank
    real = src.converter.tune_to_hf_ops({**{k: v for k, v in meta.items() if k not in full}, **full},
                                        src.config, src.aside)
    wanted = [op.key for op in todo]
    for op in real:
        if op.key not in wanted:
            continue
        t = made(op)
        # a plain tensor kept by one rank only (round robin): DCP writes it from there, whatever the
        # mesh, and no rank holds more than its share of these once they are made
        if wanted.index(op.key) % world == rank:
            out[HF_PREFIX + op.key] = t.contiguous()
        del t
    by_row_ops = {owner.get(id(rs.tensor)) for o in ops if o.rows for rs in o.rows}
    for k in needed:  # consumed by the HF tensors above; the other ops need only what is left
        if k not in by_row_ops:
            out.pop(k, None)
    return out


def save_collective(
    ck: Checkpoint,
    state_dict: Mapping[str, Any],
    model: Mapping[str, Any] | None,
    adapter: Mapping[str, Any] | None,
    final: Path,
    intermediate_checkpoint: bool,
    cap: int | None,
    *,
    stager: Stager | None = None,
    after: Callable[[], None] = lambda: None,
) -> SaveFuture | None:
    """The collective form of ``save_checkpoint``; see the module docstring. Call on every rank.

    Every step that runs on some ranks only (rank 0's file work) ends at a point where all ranks agree
    on its outcome (``_agree``), so a failure there is an error on every rank, never a rank left
    waiting in a collective. With a ``stager`` the save goes to the background: the collectives that
    need the training's process group (gathering adapters and the keys that are no row map) run now,
    the state is staged, and the writes, DCP's own collectives and the publish run on the background
    thread over a gloo group of their own; ``after`` runs once the folder is published."""
    if not dist.is_initialized():
        raise CheckpointError("a state dict with DTensors is saved collectively: initialise torch.distributed first")
    rank, world = dist.get_rank(), dist.get_world_size()
    for d in (model or {}, adapter or {}):
        _check_placements(d)

    layout: list[SourceLayout] = []

    def prepare() -> None:
        if rank == 0:
            ck.output_dir.mkdir(parents=True, exist_ok=True)
            remove_leftovers(ck.output_dir)
            remove_leftovers(ck.output_dir / RECIPE_STATE_DIRNAME)
        layout.append(ck.source_layout())

    _agree(prepare, "prepare the save")
    source = layout[0]
    adapter_full = {k: _full(v) for k, v in adapter.items()} if adapter is not None else None
    out_sd = _materialize_non_row_ops(source, model, world, rank) if model is not None else {}
    recipe: dict[str, Any] = {}
    leaves: dict[str, DTensor] = {}
    sharded: list[str] = []
    if intermediate_checkpoint:
        recipe = recipe_keys(state_dict, final.name)
        sharded = sorted(k for k, v in recipe.items() if _has_dtensor(v))
        recipe = {k: (split_leaves(v, k, leaves) if k in sharded else v) for k, v in recipe.items()}
    config = {ADAPTER_CONFIG: state_dict[ADAPTER_CONFIG]} if ADAPTER_CONFIG in state_dict else {}
    parts = {"model": out_sd, "adapter": adapter_full, "recipe": recipe, "leaves": leaves, "config": config}

    def write(parts: dict[str, Any], group: dist.ProcessGroup | None) -> None:
        _write(ck, parts, sharded, source, final, cap, group)
        after()

    if stager is None:
        write(parts, None)
        return None
    wait_for_previous()  # the buffers are the previous save's until it is done
    staged = stager.stage(parts)
    group = save_group(None)
    return submit(lambda: write(staged, group), str(final))


def _write(
    ck: Checkpoint, parts: dict[str, Any], sharded: list[str], source: SourceLayout, final: Path,
    cap: int | None, group: dist.ProcessGroup | None,
) -> None:
    """Every rank writes its rows of the model folder (rank 0 adds adapters and side files), the
    sharded recipe state goes to a DCP folder of its own, then rank 0 publishes both and commits
    ``recipe_state.pt``; all collectives over ``group`` (None: the default group)."""
    coord = dist.get_rank() == 0
    adapter_full, recipe, leaves = parts["adapter"], parts["recipe"], parts["leaves"]

    def side_files(staging: Path) -> None:  # rank 0, inside finish, before anything is published
        ck.write_adapter_files(parts["config"], adapter_full, staging)
        copy_files(ck.checkpoint_dir, staging)

    writer = save(parts["model"], final, source=source, max_shard_size=cap, fsync=ck.fsync, publish=False,
                  side_files=side_files, process_group=group)
    state_dir = ck.output_dir / RECIPE_STATE_DIRNAME
    recipe_path = state_dir / "recipe_state.pt"
    opt_tmp: Path | None = None
    opt_final: Path | None = None
    recipe_tmp: Path | None = None
    try:
        if sharded:
            # a folder of its own per save, named in recipe_state.pt, which is committed last: a
            # crash in between leaves the previous pair (recipe_state.pt + its folder) as it was
            # names from rank 0 (its pid marks the staging folder as its own for the leftover sweep)
            tag, pid = _broadcast((f"{final.name}-{uuid.uuid4().hex[:8]}", os.getpid()), group)
            opt_final = state_dir / f"sharded-{tag}"
            opt_tmp = state_dir / f".sharded-{tag}{STAGING_MARK}{pid}"
            try:
                dcp.save(leaves, storage_writer=FileSystemWriter(str(opt_tmp), sync_files=ck.fsync),
                         process_group=group)
            except CheckpointException as e:
                raise unwrap(e, "save of the sharded recipe state") from None
            recipe = {**recipe, SHARDED_KEYS: sharded, SHARDED_DIR: f"{RECIPE_STATE_DIRNAME}/{opt_final.name}"}

        def publish() -> None:
            nonlocal recipe_tmp, opt_tmp
            if not coord:
                return
            if recipe:
                recipe_tmp = stage_torch_save(
                    recipe, recipe_path, fsync=ck.fsync,
                    tmp=ck.output_dir / f".recipe_state.pt{STAGING_MARK}tmp-{os.getpid()}",
                )
            assert writer.staging is not None
            _core.publish_dir(str(writer.staging), str(final))
            writer.staging = None
            if opt_tmp is not None and opt_final is not None:
                os.rename(opt_tmp, opt_final)
                opt_tmp = None
            if recipe_tmp is not None:
                commit(recipe_tmp, recipe_path, fsync=ck.fsync)
                recipe_tmp = None
                _drop_old_sharded(state_dir, keep=opt_final)

        _agree(publish, f"publish {final}", group)
    finally:
        if coord:
            writer.abort()
            if opt_tmp is not None:
                shutil.rmtree(opt_tmp, ignore_errors=True)
            if recipe_tmp is not None:
                recipe_tmp.unlink(missing_ok=True)


def _drop_old_sharded(state_dir: Path, keep: Path | None) -> None:
    """Remove the sharded recipe states of earlier saves (``recipe_state.pt`` no longer names them)."""
    for p in state_dir.glob("sharded-*"):
        if p != keep and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def _check_placements(d: Mapping[str, Any]) -> None:
    """DCP does not describe ``_StridedShard`` chunks (FSDP2 × TP) by their real rows: refuse them."""
    for k, v in d.items():
        if isinstance(v, DTensor) and any(type(p).__name__ == "_StridedShard" for p in v.placements):
            raise CheckpointError(
                f'"{k}": placement {v.placements} (_StridedShard, FSDP2 with tensor parallel) is not supported by '
                "torch.distributed.checkpoint's chunk metadata; redistribute it to Shard/Replicate placements first"
            )


def _agree(fn: Any, what: str, group: dist.ProcessGroup | None = None) -> None:
    """Run ``fn`` here, then make every rank raise if it failed on any rank (no rank is left waiting)."""
    error: str | None = None
    try:
        fn()
    except BaseException as e:  # noqa: BLE001 - reported on every rank below
        error = f"{type(e).__name__}: {e}"
        failure: BaseException | None = e
    else:
        failure = None
    errors = [None] * dist.get_world_size(group)
    dist.all_gather_object(errors, error, group=group)
    bad = {r: err for r, err in enumerate(errors) if err is not None}
    if bad:
        if failure is not None:
            raise failure
        first = min(bad)
        raise CheckpointError(f"could not {what}: rank {first} failed: {bad[first]}")


def _broadcast(obj: Any, group: dist.ProcessGroup | None = None) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def load_sharded_recipe_state(output_dir: Path, state: dict[str, Any], values: bool = True) -> dict[str, Any]:
    """Merge back the recipe keys a collective save wrote sharded (as full, unsharded values, the
    form ``load_checkpoint`` has always returned); ``state`` is what ``recipe_state.pt`` held. With
    ``values=False`` no non-scalar tensor is read: each is a zero placeholder of its shape and dtype
    (stride 0, no memory), for ranks that take the values from rank 0."""
    keys = state.pop(SHARDED_KEYS, None)
    folder = state.pop(SHARDED_DIR, None)
    if not keys:
        return state
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    path = output_dir / str(folder)
    if not (path / ".metadata").is_file():
        raise CheckpointError(
            f"{path}: the sharded recipe state ({', '.join(keys)}) recorded in recipe_state.pt is missing"
        )
    reader = FileSystemReader(str(path))
    md = reader.read_metadata()
    entries = md.state_dict_metadata
    skip = [k for k, v in entries.items() if not values and isinstance(v, TensorStorageMetadata) and len(v.size)]
    wanted = set(entries) - set(skip)
    leaves: dict[str, Any] = {}
    if wanted:
        planner = _EmptyStateDictLoadPlanner(keys=wanted if skip else None)
        _load_state_dict(leaves, storage_reader=reader, planner=planner, no_dist=True)
    flat = _flatten(leaves)
    for k in skip:  # placeholders of the right shape that take no memory
        meta = entries[k]
        assert isinstance(meta, TensorStorageMetadata)
        flat[k] = torch.zeros((), dtype=meta.properties.dtype).expand(meta.size)
    for k in keys:
        state[k] = fill_leaves(state[k], flat, path)
    return state


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, torch.Tensor]:
    """DCP's loader nests dotted names again; the markers name the dotted form."""
    out: dict[str, torch.Tensor] = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{name}."))
        else:
            out[name] = v
    return out
