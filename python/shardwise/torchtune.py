"""torchtune's distributed recipes with a one-line YAML swap: ``DistributedHFCheckpointer``.

torchtune 0.6.1's ``CheckpointClient`` skips ``gather_cpu_state_dict`` (and the rank-0-only save) when
the configured checkpointer is a ``DistributedCheckpointer``: it then calls ``save_checkpoint`` on every
rank with the *sharded* ``model.state_dict()`` and the raw ``optimizer.state_dict()``. This class is
such a checkpointer that writes Hugging Face shards collectively (``shardwise.dcp``): every rank writes
its own rows of the final files, nothing is gathered. The optimizer state (parameter-id keyed, DTensor
values) is re-keyed by parameter name at save time and saved sharded, so that a resume hands
``training.load_from_full_optimizer_state_dict`` the name-keyed full state dict it expects.

Importing this module imports torchtune; ``import shardwise`` never does.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torchtune.training.checkpointing._checkpointer import DistributedCheckpointer

from shardwise.checkpointer import FullModelHFCheckpointer
from shardwise.constants import MODEL_KEY, OPT_KEY
from shardwise.errors import CheckpointError

__all__ = ["DistributedHFCheckpointer", "OptimizerKeyError", "optimizer_state_by_name"]

_STATE = "state"
_GROUPS = "param_groups"
_PARAMS = "params"


class OptimizerKeyError(CheckpointError):
    """The optimizer's parameter ids cannot be matched to the model's parameter names with certainty."""


def _is_dtensor(v: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(v, DTensor)


def _check_state(name: str, pid: Any, param: Any, state: Mapping[str, Any]) -> int:
    """Every non-scalar tensor of one parameter's optimizer state must have the parameter's global
    shape and placements; returns how many were checked."""
    checked = 0
    for what, v in state.items():
        if not isinstance(v, torch.Tensor) or v.dim() == 0:
            continue
        if tuple(v.shape) != tuple(param.shape):
            raise OptimizerKeyError(
                f"optimizer state {what!r} of parameter id {pid!r} has shape {tuple(v.shape)}, but the model "
                f"parameter it maps to by order, {name!r}, has shape {tuple(param.shape)}: the optimizer's "
                "parameters are not model.parameters() in order, so its state cannot be saved by name"
            )
        if _is_dtensor(v) != _is_dtensor(param) or (
            _is_dtensor(v) and tuple(v.placements) != tuple(param.placements)
        ):
            raise OptimizerKeyError(
                f"optimizer state {what!r} of parameter id {pid!r} is not sharded like the model parameter "
                f"{name!r} it maps to by order"
            )
        checked += 1
    return checked


def _by_name_one(opt: Mapping[str, Any], names: list[str], model: Mapping[str, Any]) -> dict[str, Any]:
    groups = opt.get(_GROUPS)
    state = opt.get(_STATE)
    if not isinstance(groups, list) or not isinstance(state, Mapping):
        raise OptimizerKeyError("the optimizer state dict has no 'state' / 'param_groups' (not torch.optim's form)")
    ids = [pid for g in groups for pid in g[_PARAMS]]
    if all(isinstance(pid, str) for pid in ids) and all(isinstance(k, str) for k in state):
        return dict(opt)  # already keyed by name (get_optimizer_state_dict's form)
    if len(set(ids)) != len(ids):
        raise OptimizerKeyError("the optimizer lists a parameter id twice")
    if len(ids) != len(names):
        raise OptimizerKeyError(
            f"the optimizer holds {len(ids)} parameters but the model state dict has {len(names)} sharded "
            "parameters (DTensors): its ids cannot be matched to names by order. Build the optimizer from "
            "model.parameters() of the fully sharded model (as torchtune's recipes do), or pass "
            "torch.distributed.checkpoint.state_dict.get_optimizer_state_dict(model, optimizer), which is "
            "keyed by name and stays sharded"
        )
    to_name = dict(zip(ids, names))
    unknown = [k for k in state if k not in to_name]
    if unknown:
        raise OptimizerKeyError(f"optimizer state for parameter ids {unknown[:5]} that no param group lists")
    checked = sum(_check_state(to_name[k], k, model[to_name[k]], st) for k, st in state.items())
    if state and not checked:
        raise OptimizerKeyError(
            "the optimizer state has no tensor with a parameter's shape, so the match of parameter ids to "
            "names by order cannot be validated"
        )
    return {
        _STATE: {to_name[k]: st for k, st in state.items()},
        _GROUPS: [{**g, _PARAMS: [to_name[p] for p in g[_PARAMS]]} for g in groups],
    }


def optimizer_state_by_name(opt: Mapping[str, Any], model: Mapping[str, Any]) -> dict[str, Any]:
    """``optimizer.state_dict()`` (keyed by parameter id) → the same, still sharded, keyed by parameter
    name as ``get_optimizer_state_dict`` keys it.

    The ids are matched to the model state dict's DTensor entries in order (``model.parameters()`` and
    ``model.state_dict()`` walk the modules in the same order; FSDP2 / TP parameters are DTensors,
    buffers are not); every state tensor must have its parameter's global shape and placements, else
    ``OptimizerKeyError``. torchtune's ``OptimizerInBackwardWrapper.state_dict()`` form (one optimizer
    per parameter name) is converted per parameter."""
    names = [k for k, v in model.items() if _is_dtensor(v)]
    if _STATE in opt or _GROUPS in opt:
        return _by_name_one(opt, names, model)
    out: dict[str, Any] = {}
    for name, one in opt.items():  # optimizer in backward: {param name: that param's optimizer state dict}
        if name not in model or not isinstance(one, Mapping):
            raise OptimizerKeyError(f"optimizer state for {name!r}, which is no model parameter")
        out[name] = _by_name_one(one, [name], model)
    return out


class DistributedHFCheckpointer(FullModelHFCheckpointer, DistributedCheckpointer):
    """A ``FullModelHFCheckpointer`` (same constructor, same YAML keys, same HF output) that torchtune's
    ``CheckpointClient`` treats as distributed: ``save_checkpoint`` runs on every rank with the sharded
    state dicts and writes the HF shards collectively, with no gather.

    YAML: ``checkpointer: {_component_: shardwise.torchtune.DistributedHFCheckpointer, ...}``.
    """

    # the constructor is FullModelHFCheckpointer's (first in the MRO); DistributedCheckpointer's own
    # state serves only its methods, all of which are overridden here

    def save_checkpoint(  # type: ignore[override]
        self,
        state_dict: dict[str, Any],
        epoch: int,
        intermediate_checkpoint: bool = False,
        adapter_only: bool = False,
        *,
        save_async: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Call on every rank. The model (DTensors) is written collectively as HF shards; with
        ``intermediate_checkpoint`` the optimizer state is saved sharded, keyed by parameter name.
        ``save_async``: as torchtune's ``DistributedCheckpointer``, the call returns once the state is
        staged and the files are written in the background (``FullModelHFCheckpointer``'s
        ``background=True``); the next save waits for it."""
        opt, model = state_dict.get(OPT_KEY), state_dict.get(MODEL_KEY)
        # sharded (every rank, from CheckpointClient): re-key by name. A gathered or single-device save
        # (other recipes call this on rank 0 with full tensors) keeps the optimizer as the recipe gave it.
        if (intermediate_checkpoint and isinstance(opt, Mapping) and isinstance(model, Mapping)
                and any(_is_dtensor(v) for v in model.values())):
            state_dict = {**state_dict, OPT_KEY: optimizer_state_by_name(opt, model)}
        return super().save_checkpoint(state_dict, epoch, intermediate_checkpoint, adapter_only, background=save_async,
                                **kwargs)

    def load_checkpoint(  # type: ignore[override]
        self, state_dict: dict[str, Any] | None = None, checkpoint_path: str | os.PathLike[str] | None = None
    ) -> dict[str, Any]:
        """Without ``state_dict`` (``CheckpointClient.load_base_checkpoint``): the full load of
        ``FullModelHFCheckpointer`` — model mapped; when resuming, the optimizer state keyed by name, ready
        for ``training.load_from_full_optimizer_state_dict`` (full tensors on rank 0, zero placeholders
        elsewhere: see ``_load_sharded_recipe_state``).

        With ``state_dict`` (``DistributedCheckpointer``'s form, a sharded template): it is filled in place —
        each rank reads only its rows of the model from the HF folder (``checkpoint_path``, else the
        folder being resumed) and of the optimizer state (a template keyed by id or by name), plus the
        recipe progress keys."""
        if state_dict is None:
            if checkpoint_path is not None:
                raise ValueError("checkpoint_path is only used with a state_dict template to load into")
            return super().load_checkpoint()
        return self._load_into(state_dict, checkpoint_path)

    def _load_sharded_recipe_state(self, recipe: dict[str, Any]) -> dict[str, Any]:
        """Rank 0 reads the sharded recipe state (the optimizer) as full tensors; the other ranks get the
        same structure with zero placeholders (stride 0, no memory) for every non-scalar tensor (scalars,
        hyperparameters and names are real). ``training.load_from_full_optimizer_state_dict`` takes the
        values from rank 0 (``distribute_tensor`` scatters from rank 0; the DSD path broadcasts from it),
        so a node need not hold one full optimizer state per rank."""
        from shardwise.checkpointer.collective import load_sharded_recipe_state

        return load_sharded_recipe_state(self._output_dir, recipe, values=_rank() == 0)

    def _load_into(self, state_dict: dict[str, Any], checkpoint_path: str | os.PathLike[str] | None) -> dict[str, Any]:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import CheckpointException, FileSystemReader

        from shardwise import dcp as sdcp
        from shardwise.checkpointer.collective import fill_leaves, split_leaves
        from shardwise.checkpointer.recipe_state import SHARDED_DIR, SHARDED_KEYS, load_recipe_state
        from shardwise.dcp.api import unwrap

        folder = Path(checkpoint_path) if checkpoint_path is not None else self._checkpoint_paths[0].parent
        model = state_dict.get(MODEL_KEY)
        if isinstance(model, dict):
            sdcp.load(model, folder, model_type=self._model_type.name, config=self._config)
        recipe: dict[str, Any] = {}
        if self._should_load_recipe_state and self._recipe_checkpoint is not None:
            recipe = load_recipe_state(self._recipe_checkpoint)
        sharded = list(recipe.pop(SHARDED_KEYS, None) or [])
        where = recipe.pop(SHARDED_DIR, None)
        for k, v in recipe.items():
            if k in state_dict and k not in (MODEL_KEY, OPT_KEY):
                state_dict[k] = v
        opt = state_dict.get(OPT_KEY)
        if isinstance(opt, Mapping) and OPT_KEY in sharded and isinstance(model, Mapping):
            # the DTensor leaves are in the DCP folder under their dotted names; everything else
            # (steps, param groups) is in recipe_state.pt around the markers that stand for them
            leaves: dict[str, Any] = {}
            split_leaves(optimizer_state_by_name(opt, model), OPT_KEY, leaves)
            try:
                dcp.load(leaves, storage_reader=FileSystemReader(str(self._output_dir / str(where))))
            except CheckpointException as e:
                raise unwrap(e, "load of the sharded optimizer state") from None
            loaded = fill_leaves(recipe[OPT_KEY], leaves, self._output_dir / str(where))
            state_dict[OPT_KEY] = _back_to_ids(opt, loaded)
        return state_dict


def _back_to_ids(template: Mapping[str, Any], by_name: Mapping[str, Any]) -> dict[str, Any]:
    """The loaded name-keyed optimizer state in the template's keys (ids, or names when it had names)."""
    if _STATE not in template:  # optimizer in backward: per parameter
        return {n: _back_to_ids(template[n], by_name[n]) for n in template}
    groups = template[_GROUPS]
    loaded_groups = by_name[_GROUPS]
    to_id = {name: pid for g, lg in zip(groups, loaded_groups) for pid, name in zip(g[_PARAMS], lg[_PARAMS])}
    return {
        _STATE: {to_id[name]: st for name, st in by_name[_STATE].items()},
        _GROUPS: [{**lg, _PARAMS: list(g[_PARAMS])} for g, lg in zip(groups, loaded_groups)],
    }


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
