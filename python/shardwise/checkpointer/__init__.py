"""``FullModelHFCheckpointer`` (a thin facade), its path rules for resuming, the recipe state, and the
collective (DTensor) save."""

from .facade import FullModelHFCheckpointer, UnknownModelTypeError, parse_size

__all__ = ["FullModelHFCheckpointer", "UnknownModelTypeError", "parse_size"]
