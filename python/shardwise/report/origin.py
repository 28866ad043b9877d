"""The origin file of a ``convert --to tune`` folder (``shardwise-origin.json``): each source shard's
header bytes (or torch keys), so that ``--to hf`` writes the original files back byte for byte."""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..format.shards import SourceFile
from ..store.local import safe_join

__all__ = ["ASIDE_NAME", "ORIGIN_NAME", "ORIGIN_SCHEMA", "RawHeader", "origin_shard", "origin_sources", "read_origin"]


ORIGIN_NAME = "shardwise-origin.json"



ASIDE_NAME = "shardwise-aside.safetensors"



ORIGIN_SCHEMA = "shardwise.origin/1"



def origin_shard(source: SourceFile) -> dict[str, Any]:
    h = source.header
    return {
        "name": source.name,
        "format": "safetensors" if h is not None else "torch",
        "size": source.path.stat().st_size,
        "header": None if h is None else base64.b64encode(bytes(h.raw)).decode("ascii"),
        "keys": None if h is not None else list(source.keys),
    }



@dataclass
class RawHeader:
    """The parts of ``_core.SafetensorsHeader`` that ``layout.shard_header`` reads, from saved bytes."""

    raw: bytes
    names: list[str]
    dtypes: list[str]
    shapes: list[list[int]]
    offsets: list[tuple[int, int]]
    metadata: dict[str, str] | None

    @classmethod
    def parse(cls, raw: bytes, where: str) -> RawHeader:
        try:
            n = int.from_bytes(raw[:8], "little")
            obj = json.loads(raw[8 : 8 + n])
            metadata = obj.pop("__metadata__", None)
            entries = sorted(obj.items(), key=lambda kv: kv[1]["data_offsets"][0])
            return cls(
                raw,
                [k for k, _ in entries],
                [str(v["dtype"]) for _, v in entries],
                [[int(x) for x in v["shape"]] for _, v in entries],
                [(int(v["data_offsets"][0]), int(v["data_offsets"][1])) for _, v in entries],
                metadata,
            )
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
            raise CheckpointError(f"{where}: a recorded header is not a safetensors header ({e})") from e



def read_origin(path: Path) -> dict[str, Any]:
    try:
        origin = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(origin, dict) or origin.get("schema") != ORIGIN_SCHEMA:
        raise CheckpointError(f"{path}: not a shardwise origin file (expected schema {ORIGIN_SCHEMA!r})")
    return origin



def origin_sources(origin: Mapping[str, Any], where: str) -> tuple[list[SourceFile], dict[str, SourceFile]]:
    sources: list[SourceFile] = []
    key_source: dict[str, SourceFile] = {}
    try:
        for entry in origin["source"]["shards"]:
            name = str(entry["name"])
            safe_join(Path("."), name, "shard")
            if entry["header"] is not None:
                h = RawHeader.parse(base64.b64decode(entry["header"]), f"{where} ({name})")
                src = SourceFile(Path(name), h, list(h.names))  # type: ignore[arg-type]
            else:
                src = SourceFile(Path(name), None, [str(k) for k in entry["keys"]])
            sources.append(src)
            for k in src.keys:
                key_source[k] = src
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{where}: malformed 'source.shards' ({e})") from e
    return sources, key_source
