"""Atomic checkpoint directories.

A checkpoint is written into ``<name>.tmp-<pid>`` and renamed into place only when complete, so a run killed
mid-save (SIGKILL) leaves the previous checkpoint intact and never a half-written one.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

_STEP_DIR = re.compile(r"^step-(\d+)$")


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces ``final`` atomically (best effort on one filesystem)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.with_name(f"{final.name}.old-{os.getpid()}")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


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


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete ``step-N`` directory under ``root``, or None."""
    dirs = step_dirs(root)
    return dirs[-1][1] if dirs else None


def prune_checkpoints(root: str | Path, keep: int) -> None:
    """Delete all but the ``keep`` newest ``step-N`` directories."""
    for _, path in step_dirs(root)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
