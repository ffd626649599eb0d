"""A run's checkpoint directories, ``checkpoints/step-N`` (written atomically by
:meth:`ppomax.trainers.run.RunContext.atomic_dir`): finding and pruning them."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

_STEP_DIR = re.compile(r"^step-(\d+)$")


def step_dirs(root: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of the complete ``step-N`` checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and child.is_dir():
            found.append((int(m.group(1)), child))
    return sorted(found)


def prune_checkpoints(root: str | Path, keep: int) -> None:
    """Delete all but the ``keep`` newest ``step-N`` directories."""
    for _, path in step_dirs(root)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
