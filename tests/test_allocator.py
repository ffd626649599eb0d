"""Host memory follows the live tensors in the CLI's processes (ppomax.allocator)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ppomax import cli
from ppomax.allocator import is_glibc, pin_mmap_threshold

# A 16 MiB tensor freed (glibc then raises its mmap threshold to 16 MiB), 200 tensors of 2 MiB allocated, all but
# the last freed: the MiB still resident.
SCENARIO = """
import sys, torch
from pathlib import Path
from ppomax.allocator import is_glibc, pin_mmap_threshold

def rss():
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmRSS"))
    return int(line.split()[1]) / 1024

if sys.argv[1] == "pin":
    assert pin_mmap_threshold()
big = torch.ones(4 << 20)
del big
base = rss()
blocks = [torch.ones(512 << 10) for _ in range(200)]
keep = blocks[-1]
del blocks
print(rss() - base)
"""

needs_glibc = pytest.mark.skipif(not is_glibc(), reason="glibc's mallopt only")


def _retained_mib(mode: str) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    env["OMP_NUM_THREADS"] = "1"
    out = subprocess.run(
        [sys.executable, "-c", SCENARIO, mode], capture_output=True, text=True, check=True, env=env
    )
    return float(out.stdout.strip().splitlines()[-1])


@needs_glibc
def test_freed_tensors_are_returned_to_the_system_with_the_threshold_pinned():
    """Without the pinned threshold glibc keeps the freed 2 MiB blocks in its heap (the scenario's control);
    with it each had its own mapping, gone when freed."""
    assert _retained_mib("default") > 300
    assert _retained_mib("pin") < 50


def test_the_environment_chooses_first():
    assert not pin_mmap_threshold(env={"MALLOC_MMAP_THRESHOLD_": "65536"})
    assert not pin_mmap_threshold(env={"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"})


def test_the_cli_pins_the_threshold(monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "pin_mmap_threshold", lambda: calls.append(1) or True)
    assert cli.main(["config", "--kind", "sft"]) == 0
    assert calls == [1]
