"""What one ablation run's files say (:func:`run_numbers`): fig. 4's panels' start / peak / end, the
early-training numbers (first half of the run), over-optimisation and collapse, the step gold started to fall,
the collapse monitor's first firing (:mod:`.monitor`), and what the run cost and how it was set
(:func:`iteration_costs`, :func:`method_settings`). Every number is a plain function of the run's
``metrics.jsonl`` records (policy iterations, as :func:`ppomax.demo.outcome.policy_records` renumbers them) and
its evaluation files, so the numbers in ``ablate.md`` can be recomputed from the run directories.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from statistics import fmean
from typing import Any

from ppomax.config_compat import upgrade_ppo_keys
from ppomax.demo.ablate.monitor import MONITOR_RULES, replay_monitor
from ppomax.demo.outcome import PANELS, finite, first_collapse_step, moving_average, run_trajectories, series

# A gold fall smaller than this is noise: the sd of one rollout's gold mean is ~0.07 on this world, so a peak of a
# 12-step moving average sits up to ~0.05 above the level it fluctuates around.
GOLD_NOISE = 0.1
OVER_OPT_FRACTION = 0.1  # over-optimised: gold fell by >= 10% of its rise from its peak


def _gold(records: Sequence[dict[str, Any]]) -> list[float]:
    return series(records, PANELS[1][1])[2]


def _rm(records: Sequence[dict[str, Any]]) -> list[float]:
    return series(records, PANELS[0][1])[2]


def gold_fall_step(records: Sequence[dict[str, Any]], window: int | None = None) -> int | None:
    """The first policy step at which gold's moving average (window 15% of the run) is :data:`GOLD_NOISE` below
    its peak so far: when the gold reward has measurably started to fall. ``None``: it never did."""
    gold = _gold(records)
    if not gold:
        return None
    w = window or max(1, round(0.15 * len(gold)))
    peak = float("-inf")
    for i, v in enumerate(moving_average(gold, w)):
        if i < w - 1:
            continue
        peak = max(peak, v)
        if peak - v >= GOLD_NOISE:
            return i + 1
    return None


def over_optimised(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Over-optimised: gold fell from its peak by at least 10% of its rise (start -> peak), and by at
    least :data:`GOLD_NOISE`, while the RM reward kept rising (its end above its value at gold's peak). Start, peak
    and end as :func:`ppomax.demo.outcome.trajectory` (15% windows of the smoothed curve)."""
    gold, rm = _gold(records), _rm(records)
    if not gold or not rm:
        return {"over_optimised": None}
    n = len(gold)
    w = max(1, round(0.15 * n))
    smooth_g = moving_average(gold, w)[w - 1 :]
    smooth_r = moving_average(rm, w)[w - 1 :]
    start, end = fmean(gold[:w]), fmean(gold[-w:])
    at = max(range(len(smooth_g)), key=smooth_g.__getitem__)
    peak = smooth_g[at]
    fall, rise = peak - end, peak - start
    rm_end, rm_at_peak = fmean(rm[-w:]), smooth_r[at]
    flag = fall >= max(OVER_OPT_FRACTION * max(rise, 0.0), GOLD_NOISE) and rm_end > rm_at_peak
    return {
        "over_optimised": bool(flag),
        "gold_peak_step": at + w,
        "gold_fall": fall,
        "gold_rise": rise,
        "rm_end_minus_at_gold_peak": rm_end - rm_at_peak,
    }


def early(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """The first half of the run: KL per token at its end (mean of its last 15% of steps), gold's largest fall
    within it (peak of the moving average minus its end), and the RM reward's roughness (sd of its step-to-step
    changes: the fluctuation a better-trained critic should damp)."""
    out: dict[str, float] = {}
    half = max(2, len(records) // 2)
    part = records[:half]
    w = max(1, round(0.15 * half))
    _, _, kl = series(part, PANELS[2][1])
    out["kl_mid"] = fmean(kl[-w:]) if kl else float("nan")
    gold = _gold(part)
    if gold:
        smooth = moving_average(gold, w)[w - 1 :]
        out["gold_drop_early"] = max(smooth) - fmean(gold[-w:])
    rm = _rm(part)
    if len(rm) > 2:
        diffs = [b - a for a, b in itertools.pairwise(rm)]
        mu = fmean(diffs)
        out["rm_roughness_early"] = (sum((d - mu) ** 2 for d in diffs) / (len(diffs) - 1)) ** 0.5
    return out


def run_numbers(
    records: Sequence[dict[str, Any]], ev: dict[str, Any], heldout: dict[str, Any]
) -> dict[str, Any]:
    """Everything the report says about one run (see the module docstring)."""
    tr = run_trajectories(records)
    oo = over_optimised(records)
    wtl = ev["judges"]["gold"]["win_tie_lose"]["overall"]
    res: dict[str, Any] = {
        "n_steps": len(records),
        "trajectories": {k: {m: t[m] for m in ("start", "peak", "end")} for k, t in tr.items()},
        **oo,
        **early(records),
        "gold_fall_step": gold_fall_step(records),
        "monitor_logged": first_collapse_step(records),
        "monitor_before": replay_monitor(records, drift=False),
        "monitor_after": replay_monitor(records, drift=True),
        "monitor_rules": {name: rule(records) for name, rule in MONITOR_RULES.items()},
        "win_tie_lose": [wtl["win"], wtl["tie"], wtl["lose"]],
        "gold_end": tr["gold"]["end"],
        "eval_gold_policy": ev["judges"]["gold"]["mean_policy"],
        "eval_gold_sft": ev["judges"]["gold"]["mean_baseline"],
        "eval_kl_per_token": ev["policy"].get("kl_per_token"),
        "heldout_loss": heldout["policy"],
        "heldout_loss_sft": heldout["sft"],
    }
    # collapsed: the policy ends worse than SFT on most held-out prompts (it lost what SFT had)
    res["collapsed"] = bool(wtl["lose"] > wtl["n"] / 2)
    return res


def iteration_costs(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Wall time from a run's ``time/iteration`` (all its training records, critic-only ones included: PPO-max's
    critic pre-training is part of what it costs): mean seconds per policy iteration, and the training total."""
    train = [r for r in records if "reward/raw_mean" in r and finite(r.get("time/iteration")) is not None]
    policy = [float(r["time/iteration"]) for r in train if not r.get("train/critic_only")]
    return {
        "seconds_per_iteration": fmean(policy) if policy else None,
        "train_seconds": sum(float(r["time/iteration"]) for r in train) if train else None,
        "critic_only_iterations": sum(1 for r in train if r.get("train/critic_only")),
    }


def method_settings(config: dict[str, Any]) -> dict[str, Any]:
    """What tells the methods apart, from a run's resolved ``config.yaml`` (a run made before a key existed has
    its default; one made before the ``ppo.kl`` group has its keys read into it)."""
    ppo, gen = config.get("ppo", {}), config.get("generation", {})
    ppo = upgrade_ppo_keys(ppo, "normalize")[0]
    kl = ppo.get("kl", {})
    return {
        "advantage_estimator": ppo.get("advantage_estimator", "gae"),
        "samples_per_prompt": gen.get("samples_per_prompt", 1),
        "kl_coef": kl.get("coef"),
        "kl_in": kl.get("acts_in", "reward"),
        "kl_estimator": kl.get("estimator"),
        "rollout_batch_size": ppo.get("rollout_batch_size"),
        "buffer_size": ppo.get("buffer_size"),
    }
