"""Results remembered by key: one JSON file per key, published atomically. For figures that cost minutes to make and
depend only on what their key names (a fixed model judged on fixed rows), so every run under one home makes them once.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from . import atomic


def remembered(root: Path, key: str, make: Callable[[], object]):
    """The value stored under `key` in `root`, made by `make()` and stored first if there is none (or it is
    unreadable: a torn or hand-edited file is made again, never trusted)."""
    path = Path(root) / f"{key}.json"
    try:
        return atomic.read_json(path)
    except (OSError, ValueError):
        pass
    value = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(path, value)
    return value
