"""torchtitan integration: its Hugging Face saves and loads through ``shardwise.dcp``.

``ShardwiseCheckpointManager`` is torchtitan's ``CheckpointManager`` with the HF paths replaced, chosen
the way torchtitan is extended — by its nested ``Config`` in the trainer configuration::

    from shardwise.torchtitan import ShardwiseCheckpointManager
    config.checkpoint = ShardwiseCheckpointManager.Config(enable=True, last_save_in_hf=True, ...)

- HF save (``dcp_save(..., to_hf=True)``, used by ``last_save_in_hf``): every rank writes its rows of
  the final HF shards once (the adapter's ``fqn_to_index_mapping`` names the files, as in torchtitan);
  no ``sharded/`` folder, no consolidation pass. ``async_mode`` is honoured for HF saves too.
- HF load (``dcp_load(..., from_hf=True)``, used by ``initial_load_in_hf``): each rank reads only its
  rows through ``shardwise.dcp.HFStorageReader``.

Everything else (DCP checkpoints, purge, staging) is torchtitan's own. Importing this module imports
torchtitan; ``import shardwise`` never does.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch
from torchtitan.components.checkpointer import MODEL, AsyncMode, CheckpointManager

from .dcp import api

__all__ = ["ShardwiseCheckpointManager"]


class ShardwiseCheckpointManager(CheckpointManager):
    """torchtitan's ``CheckpointManager`` whose HF saves and loads go through ``shardwise.dcp``."""

    @dataclass(kw_only=True, slots=True)
    class Config(CheckpointManager.Config):
        """torchtitan's checkpoint configuration, unchanged (a subclass so that ``build()`` makes a
        ``ShardwiseCheckpointManager``)."""

    @torch.no_grad()
    def dcp_save(
        self,
        state_dict: dict[str, Any],
        checkpoint_id: str,
        async_mode: AsyncMode,
        enable_garbage_collection: bool = False,
        to_hf: bool = False,
    ) -> Any:
        """torchtitan's save; with ``to_hf`` the final HF files written from every rank at once."""
        if not to_hf:
            return CheckpointManager.dcp_save(self, state_dict, checkpoint_id, async_mode,
                                              enable_garbage_collection, to_hf)
        assert self.sd_adapter is not None, "sd_adapter is required for to_hf=True"
        hf_state = self.sd_adapter.to_hf(state_dict)
        mapping = self.sd_adapter.fqn_to_index_mapping
        if async_mode == AsyncMode.DISABLED:
            api.save(hf_state, checkpoint_id, fqn_to_index_mapping=mapping)
            ret = None
        else:  # the returned future is what torchtitan waits on before the next save
            pending = api.async_save(hf_state, checkpoint_id, fqn_to_index_mapping=mapping)
            ret = _as_future(pending)
        if enable_garbage_collection:
            import gc

            gc.collect()
        return ret

    def dcp_load(
        self, state_dict: dict[str, Any], checkpoint_id: str, from_hf: bool, from_quantized: bool
    ) -> None:
        """torchtitan's load; with ``from_hf`` each rank reads its own rows of the HF folder."""
        if not from_hf or from_quantized:
            return CheckpointManager.dcp_load(self, state_dict, checkpoint_id, from_hf, from_quantized)
        assert self.sd_adapter is not None, "trying to load a HF checkpoint, but sd_adapter is not provided"
        hf_state = self.sd_adapter.to_hf(state_dict)
        api.load(hf_state, checkpoint_id)
        self.states[MODEL].load_state_dict(self.sd_adapter.from_hf(hf_state))


def _as_future(pending: Any) -> Future[None]:
    """A ``concurrent.futures.Future`` (what torchtitan's ``_wait_for_saving`` calls ``result()`` on)
    that completes with shardwise's background save."""
    fut: Future[None] = Future()

    def done(_: Any) -> None:
        try:
            pending.result()
        except BaseException as e:  # noqa: BLE001 - handed to the waiter
            fut.set_exception(e)
        else:
            fut.set_result(None)

    pending.add_done_callback(done)
    return fut
