"""``FullModelHFCheckpointer`` (a thin facade over ``resolve``: torchtune's path rules for loading and
resuming, ``write``: the files of one checkpoint folder, ``recipe_state`` and ``collective``: the
DTensor save); folders are read and written through ``shardwise.store``."""

from .facade import FullModelHFCheckpointer

__all__ = ["FullModelHFCheckpointer"]
