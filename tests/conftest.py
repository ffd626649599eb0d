"""Shared pytest fixtures."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread(monkeypatch):
    """Tiny models on a shared 2-core machine: one intra-op thread is far faster than two contending ones (also
    for `ppomax.cli.main` called in-process, which sets the thread count of the command it runs)."""
    monkeypatch.setenv("PPOMAX_THREADS", "1")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
