"""Shared pytest fixtures, and the hypothesis profiles of the fuzz tests (tests/test_fuzz_*.py)."""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import torch

#: PPOMAX_FUZZ=full: the fuzz tests' big budget (at least 10,000 generated cases in all) with fresh random seeds;
#: otherwise (CI, `make test`) a small derandomised budget, so that a run is deterministic and quick.
FUZZ_FULL = os.environ.get("PPOMAX_FUZZ", "").lower() == "full"

try:
    from hypothesis import HealthCheck, settings
    from hypothesis.configuration import set_hypothesis_home_dir
except ImportError:  # hypothesis is a dev extra: the fuzz tests skip themselves without it
    pass
else:
    # Nothing is written into the repository: database=None (a failure prints its reproduction blob instead), and
    # hypothesis' other caches go to the temporary directory, not ./.hypothesis
    set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "ppomax-hypothesis")
    common = {"database": None, "deadline": None, "print_blob": True}
    settings.register_profile("ppomax-ci", derandomize=True, **common)
    settings.register_profile(
        "ppomax-full", derandomize=False, suppress_health_check=[HealthCheck.too_slow], **common
    )
    settings.load_profile("ppomax-full" if FUZZ_FULL else "ppomax-ci")

_FUZZ_CASES = pytest.StashKey[Counter]()


@pytest.fixture(scope="session")
def fuzz_cases(request) -> Counter:
    """Generated cases run per fuzz test (``fuzz_cases[name] += 1`` in the test body); the total is printed at the
    end of the session."""
    return request.config.stash.setdefault(_FUZZ_CASES, Counter())


def pytest_terminal_summary(terminalreporter, config) -> None:
    cases = config.stash.get(_FUZZ_CASES, None)
    if cases:
        budget = "full (PPOMAX_FUZZ=full)" if FUZZ_FULL else "ci"
        # names in parentheses count something else than cases, e.g. "(loaded items checked)"
        total = sum(n for name, n in cases.items() if not name.startswith("("))
        terminalreporter.write_line(f"fuzz cases run: {total} ({budget} budget)")
        for name, n in sorted(cases.items()):
            terminalreporter.write_line(f"  {name}: {n}")


@pytest.fixture(autouse=True)
def _hub_offline(monkeypatch):
    """Tests never download: every model path that is a Hub id resolves from the (hand-made) Hugging Face cache
    only, as with HF_HUB_OFFLINE=1 (subprocesses inherit it)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def one_thread(monkeypatch):
    """Tiny models on a shared 2-core machine: one intra-op thread is far faster than two contending ones (also
    for `ppomax.cli.main` called in-process, which sets the thread count of the command it runs)."""
    monkeypatch.setenv("PPOMAX_THREADS", "1")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
