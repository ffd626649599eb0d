"""Host memory that follows the live tensors: set once, at the CLI entry point (:mod:`ppomax.cli`), like the thread
count. Library code leaves the process's allocator alone.

Torch's CPU tensors come from ``malloc``. glibc serves a request from its heap unless it is at least its mmap
threshold, and raises that threshold (up to 32 MiB on 64-bit) to the size of each mmapped block freed. So once
the first backward has freed its activations, the next ones, a few MiB each on a 100M-parameter model, come from
the heap, which keeps what is freed in it for reuse and returns little to the system: the resident set grows well
past the live tensors, from one iteration to the next, as differently shaped batches fragment the heap (PPO on
SmolLM2-135M: BENCHMARKS.md). :func:`pin_mmap_threshold` fixes the threshold (``mallopt(M_MMAP_THRESHOLD)``, which
also stops the adjustment): every block of at least :data:`MMAP_THRESHOLD` gets its own mapping, unmapped when
freed, and resident memory follows the tensors that are alive.

The environment wins: with glibc's own ``MALLOC_MMAP_THRESHOLD_`` (or ``glibc.malloc.mmap_threshold`` in
``GLIBC_TUNABLES``) set, nothing is changed; elsewhere than glibc nothing is either.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Mapping

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
MMAP_THRESHOLD = 1 << 20
"""1 MiB: tensors from 1 MiB up (activations, logits, gradients, optimiser states of any real model) are
returned to the system when freed; smaller ones keep the heap's reuse."""


def _chosen_by_environment(env: Mapping[str, str]) -> bool:
    return "MALLOC_MMAP_THRESHOLD_" in env or "glibc.malloc.mmap_threshold" in env.get("GLIBC_TUNABLES", "")


def is_glibc() -> bool:
    """Whether this process runs on glibc (whose ``mallopt`` :func:`pin_mmap_threshold` calls)."""
    try:
        return sys.platform.startswith("linux") and (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith(
            "glibc"
        )
    except (ValueError, OSError, AttributeError):
        return False


def pin_mmap_threshold(threshold: int = MMAP_THRESHOLD, env: Mapping[str, str] | None = None) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes (see the module docstring); False where nothing was
    changed (not Linux with glibc, or the environment chose a threshold)."""
    if not is_glibc() or _chosen_by_environment(os.environ if env is None else env):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl names its library otherwise and has no mallopt)
        return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, threshold))
