"""The `ppomax` entry point itself: --version, the launch checks, the thread count every command runs with."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

import ppomax
from ppomax.cli import main
from ppomax.errors import UserError
from ppomax.threads import available_cpus, cgroup_cpu_quota, choose_threads

ROOT = Path(__file__).resolve().parents[1]


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == f"ppomax {importlib.metadata.version('ppomax')}\n"


def test_version_has_one_source():
    """pyproject.toml (what --version reports once installed) and ppomax.__version__ (the demo's cache key)."""
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert ppomax.__version__ == declared


def test_python_dash_m_ppomax(tmp_path):
    """`python -m ppomax`, the form `accelerate launch -m ppomax ...` runs, is the CLI."""
    proc = subprocess.run(
        [sys.executable, "-m", "ppomax", "--version"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ppomax ")


# --------------------------------------------------------------------------- threads


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_cgroup_v2_quota_of_the_process_and_its_ancestors(tmp_path):
    proc = _write(tmp_path / "proc_self_cgroup", "0::/user.slice/job\n")
    root = tmp_path / "cgroup"
    _write(root / "user.slice" / "job" / "cpu.max", "150000 100000\n")
    _write(root / "user.slice" / "cpu.max", "max 100000\n")
    assert cgroup_cpu_quota(root, proc) == 1.5
    _write(root / "user.slice" / "cpu.max", "50000 100000\n")  # a parent's limit binds its children too
    assert cgroup_cpu_quota(root, proc) == 0.5
    _write(root / "user.slice" / "cpu.max", "max 100000\n")
    _write(root / "user.slice" / "job" / "cpu.max", "max 100000\n")
    assert cgroup_cpu_quota(root, proc) is None


def test_cgroup_v2_container_sees_its_own_cgroup_at_the_root(tmp_path):
    """Without a cgroup namespace /proc/self/cgroup names the host's path, which is not under the container's
    /sys/fs/cgroup: the limit is on the mount's root."""
    proc = _write(tmp_path / "proc_self_cgroup", "0::/docker/0123abcd\n")
    root = tmp_path / "cgroup"
    _write(root / "cpu.max", "200000 100000\n")
    assert cgroup_cpu_quota(root, proc) == 2.0


def test_cgroup_v1_cfs_quota(tmp_path):
    proc = _write(tmp_path / "proc_self_cgroup", "5:memory:/job\n4:cpu,cpuacct:/job\n0::/\n")
    root = tmp_path / "cgroup"
    d = root / "cpu,cpuacct" / "job"
    _write(d / "cpu.cfs_quota_us", "250000\n")
    _write(d / "cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_quota(root, proc) == 2.5
    _write(d / "cpu.cfs_quota_us", "-1\n")  # unlimited
    assert cgroup_cpu_quota(root, proc) is None


def test_cgroup_unreadable_or_garbled_is_no_limit(tmp_path):
    assert cgroup_cpu_quota(tmp_path / "none", tmp_path / "no_proc_file") is None
    proc = _write(tmp_path / "proc_self_cgroup", "0::/\n")
    _write(tmp_path / "cgroup" / "cpu.max", "lots\n")
    assert cgroup_cpu_quota(tmp_path / "cgroup", proc) is None


@pytest.mark.parametrize(
    ("affinity", "quota", "cpus"), [(8, None, 8), (8, 2.5, 2), (2, 0.3, 1), (1, 4.0, 1), (16, 16.0, 16)]
)
def test_available_cpus(affinity, quota, cpus):
    assert available_cpus(affinity, quota) == cpus


E = {}  # no thread variables at all
CASES = [
    # (--threads, environment, available CPUs, physical cores) -> (torch threads, a note on stderr?)
    ((None, E, 8, None), (8, False)),
    ((None, E, 8, 4), (4, False)),  # no more than torch's own default, the physical cores
    ((None, E, 2, None), (2, False)),
    ((None, {"LOCAL_WORLD_SIZE": "2"}, 8, None), (4, False)),  # the cores shared among local processes
    ((None, {"LOCAL_WORLD_SIZE": "4"}, 2, None), (1, False)),
    ((3, E, 8, None), (3, False)),
    ((3, {"OMP_NUM_THREADS": "1"}, 8, None), (3, True)),  # --threads wins, saying so
    ((None, {"PPOMAX_THREADS": "2", "OMP_NUM_THREADS": "4"}, 8, None), (2, True)),
    ((None, {"PPOMAX_THREADS": "2", "OMP_NUM_THREADS": "2"}, 8, None), (2, False)),
    ((None, {"OMP_NUM_THREADS": "4"}, 2, None), (4, False)),  # the user's OMP_NUM_THREADS is respected
    ((None, {"OMP_NUM_THREADS": "4,2"}, 2, None), (None, False)),  # nested OpenMP syntax: torch's own reading
    # torchrun and accelerate launch put OMP_NUM_THREADS=1 in every worker when nothing is set
    ((None, {"OMP_NUM_THREADS": "1", "LOCAL_WORLD_SIZE": "2"}, 8, None), (4, True)),
    ((None, {"OMP_NUM_THREADS": "1", "LOCAL_WORLD_SIZE": "2"}, 2, None), (1, False)),
    ((None, {"OMP_NUM_THREADS": "3", "LOCAL_WORLD_SIZE": "2"}, 8, None), (3, False)),
]


@pytest.mark.parametrize(("given", "expected"), CASES)
def test_thread_choice_precedence(given, expected):
    flag, env, cpus, physical = given
    choice = choose_threads(flag, env, cpus, physical)
    assert (choice.threads, choice.note is not None) == expected, choice
    assert choice.note is None or "\n" not in choice.note


@pytest.mark.parametrize("bad", ["0", "two", "-1", "1.5"])
def test_bad_ppomax_threads_is_a_one_line_user_error(bad):
    with pytest.raises(UserError, match="PPOMAX_THREADS") as exc:
        choose_threads(None, {"PPOMAX_THREADS": bad}, 4, None)
    assert "\n" not in str(exc.value)


@pytest.fixture
def seen_threads(monkeypatch):
    """The torch thread count a command runs with (the `config` command, replaced by a probe)."""
    import ppomax.commands.config

    seen = []
    monkeypatch.setattr(
        ppomax.commands.config, "_run", lambda args: seen.append(torch.get_num_threads()) or 0
    )
    for var in ("OMP_NUM_THREADS", "PPOMAX_THREADS", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    n = torch.get_num_threads()
    yield seen
    torch.set_num_threads(n)


@pytest.mark.parametrize("argv", [["--threads", "3", "config"], ["config", "--threads", "3"]])
def test_threads_flag_before_or_after_the_command(seen_threads, argv):
    before = torch.get_num_threads()
    assert main(argv) == 0
    assert seen_threads == [3]
    assert torch.get_num_threads() == before  # main() called in-process leaves the caller's setting


def test_threads_from_env_and_default(seen_threads, monkeypatch):
    import ppomax.threads

    monkeypatch.setenv("PPOMAX_THREADS", "2")
    assert main(["config"]) == 0
    monkeypatch.delenv("PPOMAX_THREADS")
    monkeypatch.setattr(ppomax.threads, "affinity_cpus", lambda: 3)
    monkeypatch.setattr(ppomax.threads, "cgroup_cpu_quota", lambda: None)
    monkeypatch.setattr(ppomax.threads, "physical_cores", lambda: None)
    assert main(["config"]) == 0
    assert seen_threads == [2, 3]


def test_bad_threads_flag_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--threads", "0", "config"])
    assert exc.value.code == 2
    assert "--threads" in capsys.readouterr().err
