"""The `ppomax` entry point itself: --version, the launch checks, the thread count every command runs with."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import ppomax
from ppomax.cli import main

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
    proc = subprocess.run([sys.executable, "-m", "ppomax", "--version"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ppomax ")
