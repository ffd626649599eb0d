"""One writer per run directory: an exclusive ``flock`` on ``DIR/.ppomax.lock``.

The main process of a run takes it before it writes anything into its directory and holds it for as long as it
runs; the operating system drops it when the process ends, however it ends (a ``kill -9`` leaves no stale lock).
A second run into the same directory (a new run, ``--resume`` or ``--overwrite``) is refused with the holder's PID.
The file stays when the run ends: removing it would let two runs lock two different files of the same name.
POSIX only (``fcntl``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import weakref
from pathlib import Path

from ppomax.console import console
from ppomax.errors import UserError

LOCK_FILE = ".ppomax.lock"

# The locks this process holds, by directory: a lock left held by a run of this process that ended without
# closing (an exception in a notebook) is taken over by the next run into that directory, which only one
# process-wide training at a time could have left.
_held: weakref.WeakValueDictionary[str, RunLock] = weakref.WeakValueDictionary()


class RunLock:
    """The lock on one run directory, held while this object lives or until :meth:`release`."""

    def __init__(self, directory: Path, fd: int) -> None:
        self.directory = directory
        self._close = weakref.finalize(self, os.close, fd)

    @property
    def held(self) -> bool:
        return self._close.alive

    def release(self) -> None:
        """Close the lock file (closing, not unlocking: a forked child's copy of the descriptor keeps its own)."""
        self._close()

    @classmethod
    def take(cls, directory: Path) -> RunLock | None:
        """Lock ``directory`` (which exists) for this process; a :class:`UserError` naming the holder when another
        run holds it. None (with a warning) on a filesystem without locks: the run goes on unprotected."""
        key = os.path.realpath(directory)
        earlier = _held.pop(key, None)
        if earlier is not None:
            earlier.release()
        path = directory / LOCK_FILE
        try:
            # read-only: an open write descriptor would keep the filesystem from being remounted read-only
            fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UserError(
                f"{directory}: cannot write the run directory (logging.out_dir): {exc.strerror or exc}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                os.close(fd)
                console().warning(
                    "warning: %s: cannot lock %s (%s), so another run writing into this directory at the same "
                    "time would not be noticed",
                    directory,
                    LOCK_FILE,
                    exc.strerror or exc,
                )
                return None
            holder = _holder(fd)
            os.close(fd)
            raise UserError(
                f"{directory}: another ppomax run ({holder}) is writing here; wait for it to end, or choose "
                "another logging.out_dir"
            ) from None
        with contextlib.suppress(OSError):  # the PID is for the message of a run refused here
            path.write_text(f"{os.getpid()}\n", encoding="utf-8")
        lock = cls(directory, fd)
        _held[key] = lock
        return lock


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return f"PID {text}" if text.isdigit() else "PID unknown"


def release_run_locks() -> None:
    """Release every run lock this process holds (the end of a command, whatever way it ended)."""
    for lock in list(_held.values()):
        lock.release()
    _held.clear()
