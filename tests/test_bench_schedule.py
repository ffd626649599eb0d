"""The PPO-vs-TRL bench's update schedules (bench/ppo_schedule.py): the named settings, their TRL PPOConfig
fields, the optimiser steps TRL's loops take with those fields, and the bench's step check. No TRL import: the
replay of TRL's loops is checked against counts worked out by hand from its PPOTrainer (trl 1.12)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from _tiny import SHAPES  # noqa: E402
from ppo_schedule import (  # noqa: E402
    Schedule,
    ScheduleError,
    prompts_needed,
    setting,
    trl_fields,
    trl_steps,
)
from real_model import MODEL_NAME, cache_root  # noqa: E402
from trl_compare import step_problems  # noqa: E402

from ppomax.config import load_config  # noqa: E402


@pytest.fixture(scope="module")
def ppo_max():
    return load_config("ppo", preset="ppo_max").ppo


def fields(per_device, accumulation, minibatches, epochs, gen):
    return {
        "per_device_train_batch_size": per_device,
        "gradient_accumulation_steps": accumulation,
        "num_mini_batches": minibatches,
        "num_ppo_epochs": epochs,
        "local_rollout_forward_batch_size": gen,
    }


def test_named_settings(ppo_max):
    # PPO-max: a buffer of 128 generated 32 at a time, 4 minibatches of 32, one epoch, no micro-batching
    assert setting("ppo_max_defaults", ppo_max) == Schedule(128, 32, 1, 32, 32)
    # TRL's PPOConfig: per_device_train_batch_size 8 x gradient_accumulation_steps 1, 4 epochs; its generation
    # batch of 64 capped at the 8 rollouts
    assert setting("trl_defaults") == Schedule(8, 8, 4, 8, 8)
    assert setting("one_epoch") == Schedule(32, 32, 1, 32, 32)
    with pytest.raises(ScheduleError, match="unknown setting"):
        setting("vanilla")


def test_overrides_keep_or_follow_the_rollout(ppo_max):
    assert setting("one_epoch", rollout=64) == Schedule(64, 64, 1, 64, 64)
    assert setting("ppo_max_defaults", ppo_max, rollout=256) == Schedule(256, 32, 1, 32, 32)
    assert setting("ppo_max_defaults", ppo_max, minibatch=64) == Schedule(128, 64, 1, 64, 32)
    assert setting("trl_defaults", rollout=32, micro_batch=8) == Schedule(32, 32, 4, 8, 32)
    assert setting("trl_defaults", epochs=1, rollout=None) == Schedule(8, 8, 1, 8, 8)
    with pytest.raises(ScheduleError, match="multiple of the minibatch"):
        setting("ppo_max_defaults", ppo_max, rollout=16)
    with pytest.raises(ScheduleError, match="multiple of the generation batch"):
        setting("trl_defaults", gen_batch=64)  # given explicitly: not capped


def test_ppomax_overrides_give_the_schedule(ppo_max):
    s = Schedule(64, 16, 3, 8, 32)
    p = load_config("ppo", preset="ppo_max", overrides=s.ppomax_overrides()).ppo
    got = (p.buffer_size, p.minibatch_size, p.ppo_epochs, p.micro_batch_size, p.rollout_batch_size)
    assert got == (64, 16, 3, 8, 32)
    whole = load_config("ppo", preset="ppo_max", overrides=Schedule(32, 32, 1, 32, 32).ppomax_overrides()).ppo
    assert whole.micro_batch_size is None


@pytest.mark.parametrize(
    ("schedule", "want_fields", "want_steps"),
    [
        # several minibatches per epoch: one micro-batch each, stepped alone (no accumulation)
        (Schedule(128, 32, 1, 32, 32), fields(128, 1, 4, 1, 32), [32, 32, 32, 32]),
        (Schedule(8, 8, 4, 8, 8), fields(8, 1, 1, 4, 8), [8, 8, 8, 8]),
        (Schedule(32, 32, 1, 32, 32), fields(32, 1, 1, 1, 32), [32]),
        # micro-batches: one minibatch per epoch, accumulated over rollout / micro-batch
        (Schedule(64, 64, 2, 16, 32), fields(16, 4, 1, 2, 32), [64, 64]),
    ],
)
def test_trl_fields_and_their_steps(schedule, want_fields, want_steps):
    got = trl_fields(schedule)
    assert got == want_fields
    assert schedule.steps() == want_steps
    n = 5
    assert trl_steps(got, n, prompts_needed(schedule, n)) == [want_steps] * n


def test_trl_cannot_accumulate_within_one_of_several_minibatches():
    with pytest.raises(ScheduleError, match=r"--micro-batch 32.*--minibatch 128"):
        trl_fields(Schedule(128, 32, 1, 8, 32))


def test_trl_steps_replay_its_loops():
    # The mapping users write for PPO-max (per_device 32 x accumulation 4 = 128 rollouts in 4 minibatches):
    # accelerate steps every 4 micro-batches of 32, i.e. once per epoch on all 128 rows, not per minibatch.
    assert trl_steps(fields(32, 4, 4, 2, 32), 2, 10_000) == [[128, 128]] * 2
    # per_device 32 with no accumulation and 4 minibatches: a rollout of 32, stepped every minibatch of 8
    assert trl_steps(fields(32, 1, 4, 1, 32), 1, 10_000) == [[8, 8, 8, 8]]
    # accumulation over 4 micro-batches of 8; 96 prompts = 3 batches of 32: the third iteration takes the
    # dataloader's last batch, where accelerate syncs at every micro-batch (8 steps of 8 in 2 epochs)
    assert trl_steps(fields(8, 4, 1, 2, 32), 4, 96) == [[32, 32], [32, 32], [8] * 8, [32, 32]]
    assert prompts_needed(Schedule(32, 32, 1, 8, 32), 3) == 128  # never the last batch in 3 iterations


def test_step_check_names_the_difference():
    s = Schedule(16, 8, 1, 8, 8)
    good = {"policy": [8, 8], "critic": [8, 8]}
    assert step_problems(s, "ppomax", [good, good]) == []
    bad = step_problems(s, "TRL", [good, {"policy": [16], "critic": [16]}])
    assert len(bad) == 2
    assert bad[0].startswith("TRL iteration 2: policy took 1 optimiser step(s) on [16] rows")
    assert "is 2 on [8, 8]" in bad[0]


def test_named_shape_is_the_real_models():
    config = cache_root() / MODEL_NAME / "config.json"
    if not config.is_file():
        pytest.skip(f"no real model config at {config}")
    real = json.loads(config.read_text())
    shape = SHAPES["smollm2-135m"]
    assert {k: real[k] for k in shape} == shape
