"""What the demo's PPO runs show, from their ``metrics.jsonl`` records and evaluation results: the metric
curves of the paper's fig. 4 panels (:func:`series`, :func:`moving_average`), their start / peak / end
(:func:`trajectory`), and the paper's finding checked on this world (:func:`outcome`). Plain functions, so that
the seed benchmark and the ablation apply exactly the same criteria."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

# The name the demo's PPO runs give the gold reward function (stages.ppo_config), so it is logged as
# reward/gold_mean wherever it sits in reward.functions.
GOLD_REWARD = "gold"
# Fig. 4 panels: (title, candidate metric keys in a PPO run's metrics.jsonl; the first present is used).
PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("RM reward (raw)", ("reward/rm_mean", "reward/raw_mean")),
    ("gold reward (not optimised)", (f"reward/{GOLD_REWARD}_mean",)),
    ("KL(policy || reference) per token", ("kl/per_token",)),
    ("policy perplexity", ("ppl/policy",)),
    ("response length (tokens)", ("response/length_mean",)),
)


def policy_records(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The training records of policy iterations, renumbered from 1: critic pre-training iterations
    (``train/critic_only``, paper 5.3.3) and evaluation records are dropped, so runs with and without critic
    pre-training share the x axis (policy updates)."""
    out: list[dict[str, Any]] = []
    for r in records:
        if "reward/raw_mean" not in r or r.get("train/critic_only"):
            continue
        out.append({**r, "step": len(out) + 1})
    return out


def first_collapse_step(records: Sequence[dict[str, Any]]) -> int | None:
    """The first step at which the trainer's pattern-collapse monitor fired (``collapse/firing``), if any."""
    return next((int(r["step"]) for r in records if r.get("collapse/firing")), None)


def finite(x: Any) -> float | None:
    """``x`` as a float when it is a finite number (not a bool), else None."""
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    return float(x) if math.isfinite(x) else None


def series(
    records: Sequence[dict[str, Any]], keys: Sequence[str] | str
) -> tuple[str | None, list[int], list[float]]:
    """``(key used, steps, values)`` of the first of ``keys`` present in the records (finite values only)."""
    keys = (keys,) if isinstance(keys, str) else tuple(keys)
    for key in keys:
        steps, vals = [], []
        for r in records:
            v = finite(r.get(key))
            if v is not None and "step" in r:
                steps.append(int(r["step"]))
                vals.append(v)
        if vals:
            return key, steps, vals
    return None, [], []


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` values (the first points average what exists so far)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def trajectory(values: Sequence[float], frac: float = 0.15) -> dict[str, float]:
    """Start / peak / end summary of a metric over a run: start and end are means over the first and last
    ``frac`` of the steps (at least one), peak is the maximum and trough the minimum of the moving average
    over the same window, ``peak_at`` the peak's position as a fraction of the run."""
    n = len(values)
    if n == 0:
        return {
            "start": float("nan"),
            "peak": float("nan"),
            "trough": float("nan"),
            "end": float("nan"),
            "peak_at": float("nan"),
            "n": 0,
        }
    w = max(1, round(frac * n))
    smooth = moving_average(values, w)[w - 1 :] or [sum(values) / n]
    peak = max(smooth)
    return {
        "start": sum(values[:w]) / w,
        "peak": peak,
        "trough": min(smooth),
        "end": sum(values[-w:]) / w,
        "peak_at": (smooth.index(peak) + w) / n,
        "n": n,
    }


def run_trajectories(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """:func:`trajectory` of each fig. 4 panel's metric, keyed ``rm``, ``gold``, ``kl``, ``ppl``, ``length``."""
    names = ("rm", "gold", "kl", "ppl", "length")
    out = {}
    for name, (_, keys) in zip(names, PANELS, strict=True):
        key, _, vals = series(records, keys)
        out[name] = {**trajectory(vals), "key": key}
    return out


def outcome(
    runs: dict[str, Sequence[dict[str, Any]]], evals: dict[str, dict[str, Any]], gold_judge: str = "gold"
) -> dict[str, Any]:
    """The paper's finding, checked on this world.

    * ``ppo_max_beats_sft``: more gold-judge wins than losses against SFT (overall) on held-out prompts.
    * ``ppo_max_stable``: its KL stays bounded (end KL at most 1.5x its mid-run level plus 0.02 nats, i.e. not
      growing without limit) and its gold reward does not collapse late (end >= peak - 0.15, within the
      noise of a batch mean on this world's -4.6..1 scale).
    * ``vanilla_over_optimises``: its RM reward rises (end - start > 0) while its gold reward ends below its
      start or at least 0.15 below its peak; ``vanilla_signatures`` lists which of the paper's 5.2 signatures
      moved: length up, perplexity down, KL above PPO-max's.
    """
    res: dict[str, Any] = {"runs": {}, "collapse_first_step": {}}
    for name, recs in runs.items():
        res["runs"][name] = run_trajectories(recs)
        res["collapse_first_step"][name] = first_collapse_step(recs)
    pm, va = res["runs"].get("ppo_max"), res["runs"].get("vanilla")
    ev = evals.get("ppo_max", {}).get("judges", {}).get(gold_judge)
    if ev is not None:
        o = ev["win_tie_lose"]["overall"]
        res["ppo_max_vs_sft"] = {k: o[k] for k in ("win", "tie", "lose", "n")}
        res["ppo_max_beats_sft"] = o["win"] > o["lose"]
    ev_va = evals.get("vanilla", {}).get("judges", {}).get(gold_judge)
    if ev_va is not None:
        o = ev_va["win_tie_lose"]["overall"]
        res["vanilla_vs_sft"] = {k: o[k] for k in ("win", "tie", "lose", "n")}
    if pm is not None and pm["kl"]["n"] and pm["gold"]["n"]:
        recs = runs["ppo_max"]
        _, _, kl = series(recs, PANELS[2][1])
        mid = trajectory(kl[: max(1, len(kl) // 2)])["end"]
        kl_ok = pm["kl"]["end"] <= 1.5 * max(mid, 0.0) + 0.02
        gold_ok = pm["gold"]["end"] >= pm["gold"]["peak"] - 0.15
        res["ppo_max_stable"] = bool(kl_ok and gold_ok)
        res["ppo_max_stability"] = {
            "kl_mid": mid,
            "kl_end": pm["kl"]["end"],
            "kl_bounded": bool(kl_ok),
            "gold_no_late_collapse": bool(gold_ok),
        }
    if va is not None and va["rm"]["n"] and va["gold"]["n"]:
        rm_up = va["rm"]["end"] - va["rm"]["start"] > 0
        gold_bad = va["gold"]["end"] < va["gold"]["start"] or va["gold"]["end"] < va["gold"]["peak"] - 0.15
        res["vanilla_over_optimises"] = bool(rm_up and gold_bad)
        sig = []
        if va["length"]["n"] and va["length"]["end"] > 1.1 * va["length"]["start"]:
            sig.append("length up")
        if va["ppl"]["n"] and va["ppl"]["end"] < 0.95 * va["ppl"]["start"]:
            sig.append("perplexity down")
        if va["kl"]["n"] and pm is not None and pm["kl"]["n"] and va["kl"]["end"] > 2 * pm["kl"]["end"]:
            sig.append("KL above PPO-max's")
        res["vanilla_signatures"] = sig
    return res
