"""The pattern-collapse monitor (paper 5.2) and its wiring into the PPO trainer."""

from __future__ import annotations

import pytest

from ppomax.ppo.collapse import KL, LENGTH, PPL, REWARD, CollapseMonitor


def _m(length: float, ppl: float, kl: float) -> dict[str, float]:
    return {LENGTH: length, PPL: ppl, KL: kl}


def _run(monitor: CollapseMonitor, points: list[dict[str, float]]) -> list[int]:
    return [step for step, p in enumerate(points, 1) if monitor.update(step, p) is not None]


def test_fires_once_when_length_ppl_and_kl_move_together():
    mon = CollapseMonitor(window=3, length_ratio=1.3, ppl_ratio=0.9, kl_per_token=0.1)
    stable = [_m(20, 3.0, 0.01)] * 3
    drifting = [_m(20 + 4 * i, 3.0 - 0.2 * i, 0.02 + 0.04 * i) for i in range(1, 10)]
    fired = _run(mon, stable + drifting)
    # recent-3 means at step 3+k: length 20+4(k-1), ppl 3.0-0.2(k-1), kl 0.02+0.04(k-1); all hold first at k=4
    assert fired == [7]
    assert mon.fired == 1 and mon.firing


@pytest.mark.parametrize(
    "drift",
    [
        lambda i: _m(20 + 4 * i, 3.0 - 0.2 * i, 0.01),  # no KL growth: the reference still explains it
        lambda i: _m(20, 3.0 - 0.2 * i, 0.02 + 0.04 * i),  # length flat
        lambda i: _m(20 + 4 * i, 3.0, 0.02 + 0.04 * i),  # perplexity flat
    ],
)
def test_one_signal_alone_is_not_collapse(drift):
    mon = CollapseMonitor(window=3, length_ratio=1.3, ppl_ratio=0.9, kl_per_token=0.1)
    assert _run(mon, [_m(20, 3.0, 0.01)] * 3 + [drift(i) for i in range(1, 12)]) == []


def test_rearms_after_recovery_and_state_round_trips():
    mon = CollapseMonitor(window=2, length_ratio=1.3, ppl_ratio=0.9, kl_per_token=0.1)
    bad, good = _m(40, 2.0, 0.5), _m(20, 3.0, 0.0)
    points = [good, good, bad, bad, bad, good, good, bad, bad]
    assert _run(mon, points) == [4, 8]  # step 8: the mean of (good, bad) already shows the signature
    clone = CollapseMonitor(window=2, length_ratio=1.3, ppl_ratio=0.9, kl_per_token=0.1)
    clone.load_state_dict(mon.state_dict())
    assert clone.state_dict() == mon.state_dict()


def _drift(kl: float, reward: float) -> dict[str, float]:
    return {LENGTH: 20.0, PPL: 3.0, KL: kl, REWARD: reward}


def test_drift_fires_on_rising_kl_with_rising_reward_without_the_joint_signature():
    """Over-optimisation on hh-mini: length and perplexity flat, KL climbing while the reward climbs. The paper's
    signature alone never fires; the drift rule does, once KL's mean passes the threshold while still rising."""
    points = [_drift(0.0, 1.0)] * 3 + [_drift(0.05 * i, 1.0 + 0.1 * i) for i in range(1, 12)]
    assert _run(CollapseMonitor(3, 1.3, 0.9, 0.1), points) == []
    # the trend needs the window before the current one: from step 9 (current KL mean 0.25 > 0.10 before it)
    assert _run(CollapseMonitor(3, 1.3, 0.9, 0.1, drift_kl_per_token=0.15), points) == [9]


@pytest.mark.parametrize(
    "points",
    [
        [_drift(0.0, 1.0)] * 3 + [_drift(0.3, 1.0 - 0.1 * i) for i in range(1, 12)],  # reward falling
        [_drift(0.0, 1.0)] * 3 + [_drift(0.3, 2.0)] * 11,  # KL high but no longer rising: settled
        [_drift(0.0, 1.0)] * 3 + [_drift(0.01 * i, 1.0 + 0.1 * i) for i in range(1, 12)],  # KL small
    ],
)
def test_drift_needs_rising_kl_above_the_threshold_and_reward_up(points):
    assert _run(CollapseMonitor(3, 1.3, 0.9, 0.1, drift_kl_per_token=0.15), points) == []


def _default_monitor() -> CollapseMonitor:
    from ppomax.config import CollapseConfig

    c = CollapseConfig()
    return CollapseMonitor(c.window, c.length_ratio, c.ppl_ratio, c.kl_per_token, c.drift_kl_per_token)


def test_the_default_drift_rule_warns_before_a_kl_penalised_run_over_optimises():
    """The shape of PPO-max at KL coefficient 0.1-0.2 on hh-mini (ablate's monitor group): the exact KL climbs
    slowly to ~0.1 nats/token while the RM reward climbs, and gold starts falling once it is past ~0.07: the default
    warns while it climbs (a threshold of 0.15 would stay silent throughout); the demo's PPO-max, whose KL settles
    at 0.02-0.045 per iteration, never warns."""
    climbing = [_drift(min(0.003 * i, 0.1), 1.0 + 0.02 * i) for i in range(60)]
    assert _run(_default_monitor(), climbing) == [
        20
    ]  # mean of steps 16-20: 0.051 >= 0.05, above 11-15's 0.036
    assert _run(CollapseMonitor(5, 1.3, 0.9, 0.1, drift_kl_per_token=0.15), climbing) == []
    settling = [
        _drift(min(0.003 * i, 0.03) + (0.015 if i % 7 == 3 else 0.0), 1.0 + 0.01 * i) for i in range(80)
    ]
    assert _run(_default_monitor(), settling) == []


def test_trainer_feeds_the_monitor_and_stop_ends_the_run(tmp_path, monkeypatch):
    import torch

    from ppo_helpers import make_setup
    from ppomax.cli import main
    from ppomax.monitor import read_metrics
    from ppomax.ppo.collapse import CollapseSignal

    torch.set_num_threads(1)
    setup = make_setup(tmp_path)
    seen: list[int] = []

    def fake_update(self, step, metrics):
        seen.append(step)
        assert {LENGTH, PPL, KL} <= set(metrics)
        self.firing = step >= 2
        return CollapseSignal(step, 2.0, 0.5, 1.0) if step == 3 else None

    monkeypatch.setattr(CollapseMonitor, "update", fake_update)
    monkeypatch.setattr(CollapseMonitor, "armed", property(lambda self: True))
    argv = ["train-ppo", "--preset", "ppo_max", "--set", "collapse.action=stop"]
    for item in (
        f"model.policy={setup.policy}",
        f"model.reward={setup.reward}",
        f"data.prompts={setup.prompts}",
        f"logging.out_dir={tmp_path / 'run'}",
        "ppo.iterations=4",
        "ppo.critic_pretrain_steps=1",
        "logging.checkpoint_every=1",
        "generation.max_new_tokens=8",
        "ppo.rollout_batch_size=4",
        "ppo.buffer_size=8",
        "ppo.minibatch_size=8",
        "logging.tensorboard=false",
        "logging.progress=false",
    ):
        argv += ["--set", item]
    assert main(argv) == 3
    # critic pre-training (step 1) is not fed; the policy steps are, until the signal at policy step 2 = step 3
    assert seen == [2, 3]
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["collapse/firing"] == 1
    assert not (tmp_path / "run" / "final").exists()
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "step-2").is_dir() and not (ckpts / "step-3").exists()  # the collapsing state is not kept


def test_armed_once_the_baseline_and_a_current_window_are_in():
    mon = CollapseMonitor(window=2, length_ratio=1.3, ppl_ratio=0.9, kl_per_token=0.1)
    armed = []
    for step in range(1, 6):
        mon.update(step, _m(20, 3.0, 0.01))
        armed.append(mon.armed)
    assert armed == [False, False, False, True, True]


def test_a_run_logs_the_monitor_as_not_armed_until_it_can_fire_and_says_so_at_start(tmp_path, caplog):
    """Before the monitor has its baseline and a current window it cannot fire: `collapse/firing 0` there read as
    "no collapse seen"; it logs `collapse/armed 0` instead, and a run shorter than 2 x collapse.window says at start
    that the monitor is not armed in it."""
    import logging

    import torch

    from ppo_helpers import FAST, make_setup
    from ppomax.cli import main
    from ppomax.monitor import read_metrics

    torch.set_num_threads(1)
    setup = make_setup(tmp_path)
    argv = ["train-ppo", "--preset", "ppo_max"]
    for item in (
        *FAST,
        f"model.policy={setup.policy}",
        f"model.reward={setup.reward}",
        f"data.prompts={setup.prompts}",
        f"logging.out_dir={tmp_path / 'run'}",
        "ppo.iterations=3",
        "collapse.window=2",
        "logging.tensorboard=false",
        "logging.progress=false",
    ):
        argv += ["--set", item]
    with caplog.at_level(logging.INFO, logger="ppomax"):
        assert main(argv) == 0
    text = caplog.text
    assert "the collapse monitor can fire from policy iteration 4" in text
    assert "needs 4 policy iterations (2 x collapse.window) before it can fire and this run has 3" in text
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["collapse/armed"] for r in rows] == [0, 0, 0]
    assert not any("collapse/firing" in r for r in rows)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            {"ppo": {"iterations": 2, "buffer_size": 32, "minibatch_size": 32}},
            "never trains at optim.policy_lr",
        ),
        (
            {"ppo": {"iterations": 15, "buffer_size": 32, "minibatch_size": 32}},
            "most of the run trains below",
        ),
        ({"ppo": {"iterations": 100}}, None),
    ],
)
def test_schedule_notes_warn_when_the_run_is_too_short_for_its_warmup(overrides, expected):
    from ppomax.config import PPOConfig
    from ppomax.ppo.schedule import schedule_notes

    line, warnings = schedule_notes(PPOConfig.model_validate(overrides))
    assert "10 critic-only iterations" in line
    warmup = [w for w in warnings if "warm" in w]
    assert (warmup == []) if expected is None else (expected in warmup[0])
