"""Where the reference datasets live: real request traces and real-engine operator profiles.

``KVLAB_DATA_DIR`` (a folder holding ``traces/`` and ``profiles/``) wins. Without it, kvlab looks for a
``shared/data`` folder beside or above the working directory, then beside or above a source checkout.
Nothing is derived from the install location alone, so an installed kvlab finds data through the
variable, a ``--trace``/``--profiles`` flag, or the directory it runs in.
"""
from __future__ import annotations

import os
from pathlib import Path

DATA_DIR_ENV = "KVLAB_DATA_DIR"


def data_dir() -> Path | None:
    """The folder holding traces/ and profiles/, or None when none is configured or found."""
    configured = os.environ.get(DATA_DIR_ENV)
    if configured:
        return Path(configured)
    checkout = Path(__file__).resolve().parents[1]
    for start in (Path.cwd().resolve(), checkout):
        for base in (start, *list(start.parents)[:3]):
            candidate = base / "shared" / "data"
            if candidate.is_dir():
                return candidate
    return None


def dataset(*parts: str) -> Path | None:
    """A path under the data folder (e.g. ``dataset("traces")``), or None when it is not there."""
    root = data_dir()
    path = root.joinpath(*parts) if root else None
    return path if path is not None and path.exists() else None
