"""Learning-rate schedules: linear warmup, then constant / linear / cosine decay to min_lr_ratio on the last step."""

from __future__ import annotations

import math

import pytest
import torch

from ppomax.config import AdamWConfig
from ppomax.optim import build_optimizer, lr_multiplier


def test_warmup_is_linear_then_constant():
    assert [lr_multiplier(s, 10, 4, "constant", 0.1) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_decay_reaches_the_floor_on_the_last_step(schedule):
    total, warm, floor = 12, 2, 0.1
    values = [lr_multiplier(s, total, warm, schedule, floor) for s in range(total)]
    assert values[warm] == pytest.approx(1.0) and values[-1] == pytest.approx(floor)
    assert all(a >= b for a, b in zip(values[warm:], values[warm + 1 :], strict=False))
    mid = warm + (total - warm - 1) / 2  # half way through the decay
    expected_mid = 0.55 if schedule == "linear" else floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi / 2))
    assert lr_multiplier(mid, total, warm, schedule, floor) == pytest.approx(expected_mid)


def test_adamw_takes_the_fused_kernel_on_cpu_and_steps_as_the_default_one():
    """The fused kernel (one pass per tensor) where torch has one: the same update as torch's default AdamW."""
    torch.manual_seed(0)
    cfg = AdamWConfig(weight_decay=0.1)
    a = torch.nn.Linear(8, 4)
    b = torch.nn.Linear(8, 4)
    b.load_state_dict(a.state_dict())
    fused = build_optimizer(a.parameters(), 1e-2, cfg)
    plain = torch.optim.AdamW(b.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    assert fused.defaults["fused"] is True
    for _ in range(3):
        x = torch.randn(5, 8)
        for model, opt in ((a, fused), (b, plain)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)


def test_adamw_falls_back_where_torch_has_no_fused_kernel():
    for param in (torch.zeros(3, device="meta"), torch.zeros(3, dtype=torch.complex64)):
        opt = build_optimizer([torch.nn.Parameter(param)], 1e-3, AdamWConfig())
        assert not opt.defaults["fused"]
