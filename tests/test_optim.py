"""Learning-rate schedules: linear warmup, then constant / linear / cosine decay to min_lr_ratio on the last step."""

from __future__ import annotations

import math

import pytest

from ppomax.optim import lr_multiplier


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
