"""How many torch threads a ppomax command runs with: chosen once, at the CLI entry point (:mod:`ppomax.cli`).

Library code never calls ``torch.set_num_threads``: a program that imports ppomax keeps its own setting.

Precedence (the first that is set wins):

1. ``--threads N`` on the command line;
2. ``PPOMAX_THREADS=N``;
3. ``OMP_NUM_THREADS`` (torch reads it at start-up; ppomax keeps it), except the ``1`` that torchrun and
   ``accelerate launch`` put into every worker when nothing is set (a launch with ``LOCAL_WORLD_SIZE`` > 1):
   that one is the launchers' default, not a choice, and step 4 decides;
4. the CPUs this process may actually use (:func:`available_cpus`: its affinity mask capped by its cgroup CPU
   quota), no more than the physical cores (torch's own default), divided among the processes a launcher
   started on this machine (``LOCAL_WORLD_SIZE``).

When 1 or 2 replace a different ``OMP_NUM_THREADS``, or 4 replaces the launchers' ``1``, one line on stderr says
so. The machine's load is deliberately not consulted: the thread count can change the last bits of
floating-point results, and a run should not depend on what else was running.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ppomax.console import console
from ppomax.errors import UserError

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")
# How many processes a launcher started on this machine: torchrun / accelerate, MPICH, Open MPI, MVAPICH
LOCAL_SIZE_VARS = (
    "LOCAL_WORLD_SIZE",
    "MPI_LOCALNRANKS",
    "OMPI_COMM_WORLD_LOCAL_SIZE",
    "MV2_COMM_WORLD_LOCAL_SIZE",
)


# --------------------------------------------------------------------------- available CPUs


def _ancestors(base: Path, rel: str) -> list[Path]:
    """``base/rel`` and each parent up to ``base`` itself."""
    parts = [p for p in rel.strip().strip("/").split("/") if p]
    return [base.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _v2_limit(d: Path) -> float | None:
    """``cpu.max`` is ``"$QUOTA $PERIOD"`` (microseconds) or ``"max $PERIOD"``."""
    text = _read(d / "cpu.max")
    try:
        quota, period = (text or "").split()
        return int(quota) / int(period) if quota != "max" and int(period) > 0 else None
    except ValueError:
        return None


def _v1_limit(d: Path) -> float | None:
    """``cpu.cfs_quota_us`` (-1: unlimited) over ``cpu.cfs_period_us``."""
    try:
        quota, period = int(_read(d / "cpu.cfs_quota_us") or ""), int(_read(d / "cpu.cfs_period_us") or "")
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def cgroup_cpu_quota(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_SELF_CGROUP) -> float | None:
    """CPUs' worth of time per period this process's cgroup may use (quota / period), None when unlimited or
    unreadable (not Linux, no cgroup files).

    cgroup v2 (``0::PATH`` in ``/proc/self/cgroup``): ``ROOT/PATH/cpu.max``; v1 (a ``N:cpu,...:PATH`` line):
    ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` under the cpu controller's mount. A limit on any ancestor binds
    too, so the smallest over the cgroup, its parents and the mount's root wins (the root also covers a container
    whose ``/proc/self/cgroup`` names the host's path).
    """
    lines = (_read(proc_cgroup) or "").splitlines()
    limits: list[float | None] = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, rel = rest.partition(":")
        if hierarchy == "0" and not controllers:
            limits += [_v2_limit(d) for d in _ancestors(root, rel)]
        elif "cpu" in controllers.split(","):
            for mount in dict.fromkeys((root / controllers, root / "cpu")):
                limits += [_v1_limit(d) for d in _ancestors(mount, rel)]
    found = [x for x in limits if x is not None]
    return min(found) if found else None


def affinity_cpus() -> int:
    """CPUs in this process's affinity mask (taskset, cpusets, ``docker --cpuset-cpus``)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def physical_cores() -> int | None:
    """The machine's physical cores (what torch uses by default), None when unknown."""
    try:
        import psutil  # a dependency of accelerate
    except ImportError:
        return None
    return psutil.cpu_count(logical=False)


def available_cpus(affinity: int, quota: float | None) -> int:
    """CPUs this process can keep busy at once: its affinity mask, capped by the cgroup quota rounded down (a
    thread beyond the quota only waits for the throttled period), at least 1."""
    n = affinity if quota is None else min(affinity, math.floor(quota))
    return max(1, n)


# --------------------------------------------------------------------------- the choice


@dataclass(frozen=True)
class ThreadChoice:
    threads: int | None  # None: leave torch as it is (an OMP_NUM_THREADS torch parsed itself)
    source: str
    note: str | None = None  # the one line to print when an explicit setting is replaced


def _positive(text: str, what: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise UserError(f"{what}={text!r}: expected a whole number of threads >= 1")
    return n


def _local_processes(env: Mapping[str, str]) -> int:
    for var in LOCAL_SIZE_VARS:
        if env.get(var, "").strip().isdigit():
            return max(1, int(env[var]))
    return 1


def choose_threads(flag: int | None, env: Mapping[str, str], cpus: int, physical: int | None) -> ThreadChoice:
    """The torch thread count for one process, by the precedence of this module's docstring (pure: ``cpus`` is
    :func:`available_cpus`, ``physical`` :func:`physical_cores`)."""
    omp = env.get("OMP_NUM_THREADS", "").strip()
    local = _local_processes(env)
    explicit = None
    if flag is not None:
        explicit = (flag, "--threads")
    elif env.get("PPOMAX_THREADS", "").strip():
        explicit = (_positive(env["PPOMAX_THREADS"], "PPOMAX_THREADS"), "PPOMAX_THREADS")
    if explicit is not None:
        n, source = explicit
        note = f"{source} {n} replaces OMP_NUM_THREADS={omp} for torch" if omp and omp != str(n) else None
        return ThreadChoice(n, source, note)
    share = max(1, (cpus if physical is None else min(cpus, physical)) // local)
    if omp and not (omp == "1" and local > 1):
        return ThreadChoice(int(omp) if omp.isdigit() and int(omp) > 0 else None, "OMP_NUM_THREADS")
    note = None
    if omp and share != 1:
        note = (
            f"{share} torch threads per process ({cpus} CPUs for {local} local processes) instead of the "
            "launcher's OMP_NUM_THREADS=1; choose with --threads N or PPOMAX_THREADS=N"
        )
    return ThreadChoice(share, f"{cpus} available CPUs / {local} local processes", note)


@contextmanager
def command_threads(flag: int | None) -> Iterator[ThreadChoice]:
    """Run a command with the chosen torch thread count, then give the caller's back (``main()`` may be called
    in-process, e.g. by tests)."""
    import torch

    choice = choose_threads(
        flag, os.environ, available_cpus(affinity_cpus(), cgroup_cpu_quota()), physical_cores()
    )
    if choice.note and os.environ.get("RANK", "0") == "0":  # the same line from every rank would be noise
        console().info("%s", choice.note)
    before = torch.get_num_threads()
    # accelerate's multi-CPU setup sets its own count when OMP_NUM_THREADS is unset (accelerate/state.py)
    set_omp = choice.threads is not None and "OMP_NUM_THREADS" not in os.environ
    if choice.threads is not None:
        torch.set_num_threads(choice.threads)
    if set_omp:
        os.environ["OMP_NUM_THREADS"] = str(choice.threads)
    try:
        yield choice
    finally:
        if set_omp:
            os.environ.pop("OMP_NUM_THREADS", None)
        torch.set_num_threads(before)
