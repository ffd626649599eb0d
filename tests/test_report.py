"""ppomax.demo.outcome and ppomax.demo.report: trajectory summaries and outcome checks by hand, and a report written from synthetic runs."""

from __future__ import annotations

import math

import pytest

from ppomax.demo.outcome import (
    moving_average,
    outcome,
    policy_records,
    run_trajectories,
    series,
    trajectory,
)
from ppomax.demo.report import write_report


def test_moving_average_by_hand():
    assert moving_average([1, 2, 3, 4, 5], 2) == [1.0, 1.5, 2.5, 3.5, 4.5]
    assert moving_average([4.0], 3) == [4.0]


def test_trajectory_by_hand():
    t = trajectory([0, 1, 2, 3, 4, 5, 6, 7, 8, 9], frac=0.2)  # window 2
    assert t["start"] == pytest.approx(0.5)
    assert t["end"] == pytest.approx(8.5)
    assert t["peak"] == pytest.approx(8.5)  # smoothed max
    assert t["trough"] == pytest.approx(0.5)
    assert t["peak_at"] == pytest.approx(1.0)
    rise_fall = trajectory([0, 0, 4, 4, 0, 0], frac=0.34)  # window 2
    assert rise_fall["peak"] == pytest.approx(4.0)
    assert rise_fall["peak_at"] == pytest.approx(4 / 6)
    assert math.isnan(trajectory([])["start"])


def test_series_and_policy_records():
    recs = [
        {"step": 1, "reward/raw_mean": 0.1, "train/critic_only": 1},
        {"step": 2, "reward/raw_mean": 0.2, "train/critic_only": 1},
        {
            "step": 3,
            "reward/raw_mean": 0.3,
            "reward/rm_mean": 0.3,
            "kl/per_token": "nan",
            "train/critic_only": 0,
        },
        {"step": 3, "eval/gold": 1.0},
        {
            "step": 4,
            "reward/raw_mean": 0.4,
            "reward/rm_mean": 0.4,
            "kl/per_token": 0.01,
            "train/critic_only": 0,
        },
    ]
    pol = policy_records(recs)
    assert [r["step"] for r in pol] == [1, 2]
    assert series(pol, ("missing", "reward/rm_mean")) == ("reward/rm_mean", [1, 2], [0.3, 0.4])
    assert series(pol, "kl/per_token") == ("kl/per_token", [2], [0.01])  # the "nan" string is skipped
    assert series(pol, "nothing") == (None, [], [])


def _run(rm, gold, kl, ppl, length):
    return [
        {
            "step": i + 1,
            "reward/raw_mean": r,
            "reward/rm_mean": r,
            "reward/gold_mean": g,
            "kl/per_token": k,
            "ppl/policy": p,
            "response/length_mean": n,
        }
        for i, (r, g, k, p, n) in enumerate(zip(rm, gold, kl, ppl, length, strict=True))
    ]


N = 20
VANILLA = _run(
    rm=[0.1 * i for i in range(N)],
    gold=[0.3 + 0.05 * i if i < 8 else 0.7 - 0.1 * (i - 8) for i in range(N)],
    kl=[0.02 * i for i in range(N)],
    ppl=[3.0 - 0.08 * i for i in range(N)],
    length=[10 + i for i in range(N)],
)
PPO_MAX = _run(
    rm=[0.02 * i for i in range(N)],
    gold=[0.3 + 0.02 * i for i in range(N)],
    kl=[min(0.01 * i, 0.05) for i in range(N)],
    ppl=[3.0] * N,
    length=[10] * N,
)


def _eval(win, tie, lose):
    wtl = {
        "overall": {
            "n": win + tie + lose,
            "win": win,
            "tie": tie,
            "lose": lose,
            "win_rate": win / 10,
            "tie_rate": tie / 10,
            "lose_rate": lose / 10,
            "mean_a": 0.5,
            "mean_b": 0.3,
        },
        "helpful": {
            "n": 6,
            "win": 3,
            "tie": 2,
            "lose": 1,
            "win_rate": 0.5,
            "tie_rate": 1 / 3,
            "lose_rate": 1 / 6,
            "mean_a": 0.5,
            "mean_b": 0.3,
        },
        "harmless": {
            "n": 4,
            "win": win - 3,
            "tie": tie - 2,
            "lose": lose - 1,
            "win_rate": 0.25,
            "tie_rate": 0.25,
            "lose_rate": 0.5,
            "mean_a": 0.5,
            "mean_b": 0.3,
        },
    }
    sample = {
        "prompt": "\n\nHuman: What is 2 plus 2?\n\nAssistant:",
        "subset": "helpful",
        "policy": "2 plus 2 is 4.",
        "baseline": "It is 5 | five.",
        "scores": {"gold": [1.0, -0.4], "rm": [0.8, 0.1]},
    }
    return {
        "settings": {"tie_margin": 0.1},
        "policy": {
            "perplexity": 2.5,
            "length_tokens": 9.0,
            "length_words": 5.0,
            "truncated_rate": 0.0,
            "kl_per_token": 0.03,
            "kl_per_sequence": 0.3,
        },
        "baseline": {"perplexity": 2.7, "length_tokens": 10.0, "length_words": 6.0, "truncated_rate": 0.1},
        "judges": {
            "gold": {"kind": "gold", "win_tie_lose": wtl, "mean_policy": 0.5, "mean_baseline": 0.3},
            "rm": {"kind": "reward-model", "win_tie_lose": wtl, "mean_policy": 0.8, "mean_baseline": 0.1},
        },
        "samples": [sample, {**sample, "subset": "harmless"}],
    }


def test_outcome_detects_the_papers_finding():
    res = outcome(
        {"vanilla": VANILLA, "ppo_max": PPO_MAX}, {"ppo_max": _eval(5, 3, 2), "vanilla": _eval(3, 3, 4)}
    )
    assert res["ppo_max_beats_sft"] is True
    assert res["ppo_max_vs_sft"] == {"win": 5, "tie": 3, "lose": 2, "n": 10}
    assert res["ppo_max_stable"] is True
    assert res["vanilla_over_optimises"] is True
    assert set(res["vanilla_signatures"]) == {"length up", "perplexity down", "KL above PPO-max's"}
    tr = run_trajectories(VANILLA)
    assert tr["rm"]["key"] == "reward/rm_mean" and tr["gold"]["key"] == "reward/gold_mean"


def test_outcome_says_no_when_it_does_not_hold():
    # PPO-max losing to SFT, with KL growing without bound; "vanilla" improving gold along with the RM
    growing_kl = _run(
        rm=[0.0] * N, gold=[0.3] * N, kl=[0.001 * i * i for i in range(N)], ppl=[3.0] * N, length=[10] * N
    )
    honest = _run(
        rm=[0.1 * i for i in range(N)],
        gold=[0.05 * i for i in range(N)],
        kl=[0.01] * N,
        ppl=[3.0] * N,
        length=[10] * N,
    )
    res = outcome({"vanilla": honest, "ppo_max": growing_kl}, {"ppo_max": _eval(3, 3, 4)})
    assert res["ppo_max_beats_sft"] is False
    assert res["ppo_max_stable"] is False and res["ppo_max_stability"]["kl_bounded"] is False
    assert res["vanilla_over_optimises"] is False
    assert res["vanilla_signatures"] == []
    # a late gold collapse of PPO-max is caught even with bounded KL
    collapse = _run(rm=[0.0] * N, gold=[0.5] * 15 + [-0.5] * 5, kl=[0.01] * N, ppl=[3.0] * N, length=[10] * N)
    res = outcome({"ppo_max": collapse}, {})
    assert res["ppo_max_stable"] is False and res["ppo_max_stability"]["gold_no_late_collapse"] is False


def test_write_report_files(tmp_path):
    runs = {"vanilla": VANILLA, "ppo_max": PPO_MAX}
    evals = {"vanilla": _eval(3, 3, 4), "ppo_max": _eval(5, 3, 2)}
    rm_stats = {
        "n": 4,
        "accuracy_annotator": 0.75,
        "accuracy_gold": 0.5,
        "margins": [0.5, -0.2, 1.0, 0.3],
        "gold_agrees": [True, True, False, True],
    }
    path = write_report(tmp_path, runs, evals, rm_stats, rm_judge="rm", meta={"seed": 0})
    md = path.read_text()
    for png in ("training_curves.png", "win_tie_lose.png", "rm_margins.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png})" in md
    assert "PPO-max beats SFT by the gold judge (more wins than losses): **yes**" in md
    assert "| ppo_max | overall | 10 | 5 (50%) | 3 (30%) | 2 (20%) |" in md
    assert "Vanilla PPO over-optimises the reward model: **yes**" in md
    assert "It is 5 \\| five." in md  # table cells escape pipes
    assert "75%" in md and "50%" in md  # RM accuracies


def test_write_report_without_runs_or_gold(tmp_path):
    """Missing pieces give 'n/a' sections, not a crash."""
    path = write_report(tmp_path, {}, {"ppo_max": _eval(5, 3, 2)}, None)
    md = path.read_text()
    assert "win_tie_lose.png" in md and "training_curves.png" not in md


def test_collapse_monitor_step_is_reported(tmp_path):
    fired = [{**r, "collapse/firing": int(r["step"] >= 12)} for r in VANILLA]
    res = outcome({"vanilla": fired, "ppo_max": PPO_MAX}, {})
    assert res["collapse_first_step"] == {"vanilla": 12, "ppo_max": None}
    md = write_report(tmp_path, {"vanilla": fired, "ppo_max": PPO_MAX}, {}).read_text()
    assert "fired for vanilla at policy step 12" in md and "fired for ppo_max" not in md
