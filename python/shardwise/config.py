"""``config.json`` access with errors that name the file and the missing field."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = ["ModelConfig"]

_MISSING = object()


class ModelConfig(Mapping[str, Any]):
    """A read-only view of a (possibly nested) HF ``config.json`` that reports where a field is missing.

    It is a ``Mapping``, so code written for torchtune's ``checkpointer._config`` dict keeps working.
    """

    def __init__(self, data: Mapping[str, Any], source: str = "config.json", prefix: str = "") -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: expected a JSON object{' at ' + prefix if prefix else ''}")
        self._data = data
        self.source = source
        self.prefix = prefix

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        """Read ``path``; a missing file or bad JSON is a ``ConfigError`` naming the file."""
        p = Path(path)
        try:
            text = p.read_text()
        except FileNotFoundError as e:
            raise ConfigError(f"{p}: config.json not found (it is required to convert the weights)") from e
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}: not valid JSON ({e})") from e
        return cls(data, str(p))

    @property
    def data(self) -> Mapping[str, Any]:
        return self._data

    def _name(self, key: str) -> str:
        return f"{self.prefix}.{key}" if self.prefix else key

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: str, default: Any = None) -> Any:
        """The field's value, ``default`` when it is absent or JSON ``null``."""
        v = self._data.get(key, None)
        return default if v is None else v

    def require(self, key: str, kind: type | tuple[type, ...] | None = None) -> Any:
        """The field's value; ``ConfigError`` naming the file and field when absent, null or of the wrong kind."""
        v = self._data.get(key, _MISSING)
        if v is _MISSING or v is None:
            raise ConfigError(f"{self.source}: missing required field '{self._name(key)}'")
        if kind is not None:
            ok = isinstance(v, kind) and not (kind in (int, float) and isinstance(v, bool))
            if not ok:
                raise ConfigError(
                    f"{self.source}: field '{self._name(key)}' must be {getattr(kind, '__name__', kind)}, "
                    f"got {v!r}"
                )
        return v

    def require_int(self, key: str) -> int:
        """A required positive integer field."""
        v = self.require(key, int)
        if v <= 0:
            raise ConfigError(f"{self.source}: field '{self._name(key)}' must be positive, got {v}")
        return v

    def optional_int(self, key: str) -> int | None:
        """An optional positive integer field (absent or null gives None)."""
        if self.get(key) is None:
            return None
        return self.require_int(key)

    def sub(self, key: str) -> ModelConfig:
        """A nested section such as ``text_config``; ``ConfigError`` when it is missing."""
        return ModelConfig(self.require(key), self.source, self._name(key))
