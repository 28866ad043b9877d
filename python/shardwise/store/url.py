"""The one place that decides whether a location is an object-store URL (fsspec) or a local path."""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["is_url", "local_folder", "protocol"]

URL = re.compile(r"^(?P<proto>[A-Za-z][A-Za-z0-9+.\-]*)://")


def is_url(path: object) -> bool:
    """True for an fsspec URL other than a local one (``file://``)."""
    m = URL.match(str(path)) if isinstance(path, str) else None
    return m is not None and m.group("proto").lower() not in ("file", "local")


def protocol(url: str) -> str:
    """The URL's protocol in lower case (``s3``), "" when it has none."""
    m = URL.match(url)
    return m.group("proto").lower() if m else ""


def local_folder(path: str | os.PathLike[str], what: str) -> Path:
    """``path`` as a local folder for a feature that has no object-storage backend yet (``what`` names
    it): a URL is refused with an error naming it, never turned into a local path (``s3:/bucket``)."""
    if is_url(path):
        from ..errors import CheckpointError

        raise CheckpointError(
            f"{path}: {what} reads and writes local or mounted folders only; object storage "
            f"({protocol(str(path))}://) is not supported there yet (mount it, or copy the folder first)"
        )
    return Path(path)
