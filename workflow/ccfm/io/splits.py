"""The fold split file (``splits/fold{k}.json``): the one writer and the one reader."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ccfm.io.atomic import write_text_atomic


class SplitLeakError(ValueError):
    """A perturbation is both trained on and held out."""


def write_split(split: dict[str, Any], path: str | Path) -> Path:
    """Write a split dict as JSON, atomically."""
    return write_text_atomic(path, json.dumps(split, indent=2) + "\n")


def read_split(path: str | Path) -> dict[str, Any]:
    """Read a fold's split file; it must list ``train`` and ``test`` and they must not overlap."""
    path = Path(path)
    split = json.loads(path.read_text())
    for key in ("train", "test"):
        if key not in split:
            raise KeyError(f"{path}: split file has no {key!r} list; rerun the split rule")
    leaked = sorted(set(split["train"]) & set(split["test"]))
    if leaked:
        raise SplitLeakError(f"{path}: perturbations {leaked[:5]} are in both train and test; rerun the split rule")
    return split
