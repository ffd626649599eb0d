"""The report of `ppomax ablate` (:mod:`ppomax.demo.ablate`): per-run numbers, one verdict per claim, the PNGs.

Every criterion is a plain function of a run's ``metrics.jsonl`` records (policy iterations, as
:func:`ppomax.demo.report.policy_records` renumbers them) and its evaluation files, so the numbers in
``ablate.md`` can be recomputed from the run directories:

* :func:`run_numbers`: fig. 4's panels' start / peak / end (:func:`ppomax.demo.report.run_trajectories`), the
  early-training numbers (first half of the run), over-optimisation and collapse, the step gold started to fall,
  the collapse monitor's first firing (as logged, and replayed with the paper's signature alone and with drift).
* :func:`verdicts`: the claims of the paper's fig. 6, 7, 8 and 12 and the demo's two, each decided on the seeds by a
  paired test (:func:`paired`): reproduced, not reproduced, or within the seeds' noise.
* :func:`monitor_evidence`: the collapse monitor's rules (:data:`MONITOR_RULES`) against the gold truth, in and out
  of the sample its thresholds were chosen on, with their lead on gold's fall.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from statistics import fmean
from typing import Any

from ppomax.config_compat import upgrade_ppo_keys
from ppomax.demo.markdown import fmt_num as _f
from ppomax.demo.outcome import (
    PANELS,
    first_collapse_step,
    moving_average,
    policy_records,
    run_trajectories,
    series,
)
from ppomax.demo.outcome import finite as _num
from ppomax.demo.plots import plot_training_curves, plot_win_tie_lose, run_colours
from ppomax.demo.plots import pyplot as _plt
from ppomax.errors import UserError

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
    and end as :func:`ppomax.demo.report.trajectory` (15% windows of the smoothed curve)."""
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


def replay_monitor(records: Sequence[dict[str, Any]], drift: bool) -> Fired:
    """The first step the collapse monitor fires on these records, with the default thresholds, with
    (``drift``: the library's rule) or without (the paper's joint signature only) drift.
    The monitor reads the exact KL where the run logged it (:func:`ppomax.collapse.kl_of`)."""
    from ppomax.config import CollapseConfig

    c = CollapseConfig()
    return _replay(records, c.drift_kl_per_token if drift else None)


NA = "n/a"  # a rule that cannot be replayed on a run (it logged no exact KL)
Fired = int | str | None  # the step a rule fired at, None (never) or NA


def _replay(
    records: Sequence[dict[str, Any]],
    drift: float | None,
    kl_per_token: float | None = None,
    kl: str | None = None,
) -> Fired:
    """The first step :class:`ppomax.collapse.CollapseMonitor` (default window and signature thresholds, drift at
    ``drift``) fires on the records; ``kl``: the record key it reads as the KL instead of its own choice (:data:`NA`
    when the run did not log it); ``kl_per_token``: the signature's KL threshold (inf: drift alone)."""
    from ppomax.collapse import EXACT_KL, KL, LENGTH, PPL, REWARD, CollapseMonitor
    from ppomax.config import CollapseConfig

    c = CollapseConfig()
    sig_kl = c.kl_per_token if kl_per_token is None else kl_per_token
    mon = CollapseMonitor(c.window, c.length_ratio, c.ppl_ratio, sig_kl, drift)
    if kl is not None and not all(kl in r for r in records if KL in r):
        return NA
    for r in records:
        if not all(k in r for k in (KL, LENGTH, PPL, REWARD)):
            continue
        point = dict(r)
        if kl is not None:
            point.pop(EXACT_KL, None)
            point[KL] = r[kl]
        if mon.update(int(r["step"]), point) is not None:
            return int(r["step"])
    return None


def _first(*steps: Fired) -> Fired:
    if NA in steps:
        return NA
    real = [s for s in steps if isinstance(s, int)]
    return min(real) if real else None


def _trend_rule(records: Sequence[dict[str, Any]], floor: float = 0.02, windows: int = 3) -> Fired:
    """Candidate (replayed only): the signature, or the exact KL per token rising from each of ``windows``
    consecutive windows to the next (window = ``collapse.window`` policy iterations) and at least ``floor``, with
    the reward above its baseline: the KL's trend rather than its level."""
    from ppomax.collapse import EXACT_KL, KL, REWARD
    from ppomax.config import CollapseConfig

    w = CollapseConfig().window
    pts = [r for r in records if KL in r and REWARD in r]  # the policy iterations, as the monitor sees them
    if not pts or any(EXACT_KL not in r for r in pts):
        return NA
    fired = None
    for i in range(w + windows * w, len(pts) + 1):
        means = [
            fmean(p[EXACT_KL] for p in pts[i - (k + 1) * w : i - k * w]) for k in reversed(range(windows))
        ]
        base = fmean(p[REWARD] for p in pts[:w])
        now = fmean(p[REWARD] for p in pts[i - w : i])
        if all(a < b for a, b in itertools.pairwise(means)) and means[-1] >= floor and now > base:
            fired = int(pts[i - 1]["step"])
            break
    return _first(_replay(records, None), fired)


# The collapse monitor's rules replayed on every run, the library's first: its default (drift 0.15 nats/token on
# the exact KL where logged), the paper's signature alone, the drift rule as first chosen (on the estimator's KL),
# and candidates for an out-of-sample campaign to choose from (`ppomax ablate --only monitor estimators causes`):
# other absolute levels on the exact KL, per response instead of per token, and the KL's trend. A rule a run
# cannot be replayed with (no exact KL logged) is left out of that run's counts.
MONITOR_RULES: dict[str, Callable[[Sequence[dict[str, Any]]], Fired]] = {
    "library (drift 0.15/token, exact KL where logged)": lambda r: replay_monitor(r, drift=True),
    "signature only (paper 5.2)": lambda r: replay_monitor(r, drift=False),
    "drift 0.15/token on the estimator's KL (as first chosen)": lambda r: _replay(r, 0.15, kl="kl/per_token"),
    **{
        f"drift {t}/token on the exact KL": (lambda r, t=t: _replay(r, t, kl="kl/exact_per_token"))
        for t in (0.03, 0.05, 0.1, 0.15)
    },
    **{
        f"drift {s}/response on the exact KL": (
            lambda r, s=s: _first(
                _replay(r, None), _replay(r, s, kl_per_token=float("inf"), kl="kl/exact_per_sequence")
            )
        )
        for s in (0.5, 1.0)
    },
    "trend: exact KL rising over 3 windows, >= 0.02/token": _trend_rule,
}


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


# ------------------------------------------------------------------------------------------------ verdicts


def _majority(flags: Sequence[bool]) -> bool:
    return sum(flags) * 2 > len(flags)


# One-sided 95% quantiles of Student's t by degrees of freedom: a paired difference over n seeds is decided when
# its t statistic passes the quantile of n - 1 (with 3 seeds, t >= 2.92: a sign on 3 seeds alone is no verdict).
T95 = {1: 6.314, 2: 2.920, 3: 2.353, 4: 2.132, 5: 2.015, 6: 1.943, 7: 1.895, 8: 1.860, 9: 1.833, 10: 1.812}
HOLDS, FAILS, NOISE, CONTEXT = "holds", "fails", "within noise", "context"
MORE_SEEDS = "--seeds 1 2 3 4 5"  # what a verdict within the noise asks for


def paired(xs: Sequence[Any], ys: Sequence[Any], better: str = "higher") -> dict[str, Any]:
    """The paired difference of ``xs`` against ``ys`` (the same seeds, in order), signed so that positive means
    ``xs`` is better (``better``: higher or lower), and its one-sided paired t-test at 95%: ``decision`` is
    :data:`HOLDS` (better beyond the seed-to-seed noise), :data:`FAILS` (worse beyond it) or :data:`NOISE`.
    Seeds where either side is missing are dropped; one seed decides nothing."""
    sign = 1.0 if better == "higher" else -1.0
    d = [
        sign * (float(x) - float(y))
        for x, y in zip(xs, ys, strict=True)
        if _num(x) is not None and _num(y) is not None
    ]
    n = len(d)
    out: dict[str, Any] = {"n": n, "diffs": d, "mean": fmean(d) if d else float("nan"), "sd": 0.0, "t": None}
    if n < 2:
        out["decision"] = NOISE
        return out
    sd = (sum((x - out["mean"]) ** 2 for x in d) / (n - 1)) ** 0.5
    out["sd"] = sd
    crit = T95.get(n - 1, 1.645)
    if sd == 0:
        out["decision"] = HOLDS if out["mean"] > 0 else FAILS if out["mean"] < 0 else NOISE
        return out
    out["t"] = out["mean"] / (sd / n**0.5)
    out["decision"] = HOLDS if out["t"] >= crit else FAILS if out["t"] <= -crit else NOISE
    return out


def unanimous(flags: Sequence[bool]) -> str:
    """A yes/no comparison over seeds: :data:`HOLDS` when every seed says yes, :data:`FAILS` when most say no,
    else :data:`NOISE`."""
    if flags and all(flags):
        return HOLDS
    return FAILS if sum(not f for f in flags) * 2 > len(flags) else NOISE


def combine(decisions: Sequence[str]) -> str:
    """A claim's verdict from its comparisons (context lines aside): reproduced when every one holds, not
    reproduced when one fails, else within the noise."""
    ds = [d for d in decisions if d != CONTEXT]
    if ds and all(d == HOLDS for d in ds):
        return "reproduced"
    if any(d == FAILS for d in ds):
        return "not reproduced"
    return f"within noise (run {MORE_SEEDS})"


def _per_seed(nums: dict[str, dict[int, dict[str, Any]]], name: str, key: str) -> list[Any]:
    return [nums[name][s].get(key) for s in sorted(nums.get(name, {}))]


def _list(xs: Sequence[Any], fmt: str = ".3f") -> str:
    return "/".join(_f(x, fmt) if not isinstance(x, bool) else str(x) for x in xs)


def verdicts(nums: dict[str, dict[int, dict[str, Any]]]) -> list[dict[str, Any]]:
    """One verdict per claim, from the runs present (a claim whose variants did not run is "not run").

    A comparison holds on a seed when the variant is better than its baseline there; a claim is "reproduced" when
    every comparison it makes holds on a majority of the seeds that ran both sides."""
    out: list[dict[str, Any]] = []

    def have(*names: str) -> bool:
        return all(n in nums and nums[n] for n in names)

    def common(*names: str) -> list[int]:
        seeds = set.intersection(*(set(nums[n]) for n in names))
        return sorted(seeds)

    def cmp(a: str, b: str, key: str, better: str = "lower") -> tuple[str, str]:
        seeds = common(a, b)
        va = [nums[a][s].get(key) for s in seeds]
        vb = [nums[b][s].get(key) for s in seeds]
        p = paired(va, vb, better)
        t = "n/a" if p["t"] is None else f"{p['t']:.2f}"
        return p["decision"], (
            f"{key} {a} {_list(va)} vs {b} {_list(vb)} (seeds {'/'.join(map(str, seeds))}; {better} is better, "
            f"paired difference {_f(p['mean'], '+.3f')} ± {_f(p['sd'], '.3f')} sd, t {t}: {p['decision']})"
        )

    def verdict(claim: str, figure: str, checks: list[tuple[str, str]], explain: str) -> None:
        result = combine([c[0] for c in checks])
        out.append(
            {
                "claim": claim,
                "figure": figure,
                "verdict": result,
                "numbers": "; ".join(c[1] for c in checks),
                "explanation": explain if result == "not reproduced" else "",
            }
        )

    def not_run(claim: str, figure: str, names: Sequence[str]) -> None:
        missing = [n for n in names if not have(n)]
        out.append(
            {
                "claim": claim,
                "figure": figure,
                "verdict": "not run",
                "numbers": f"missing: {', '.join(missing)}",
                "explanation": "",
            }
        )

    # (a) fig. 6: the paper's curves (reward normalisation at delta 0.3 and 0.8, advantage normalisation with its
    # clip at 0.5 and 0.12); the unclipped advantage normalisation (ours) is context
    names = ("vanilla", "reward_norm_0.3", "reward_norm_0.8", "adv_norm_0.5", "adv_norm_0.12")
    claim = "(a) reward normalisation + clipping and advantage normalisation stabilise early training"
    if have(*names):
        checks = []
        for v in names[1:]:
            checks.append(cmp(v, "vanilla", "kl_mid"))
            checks.append(cmp(v, "vanilla", "gold_drop_early"))
        seeds = common(*names)
        shown = [*names, *(["adv_norm"] if have("adv_norm") else [])]
        lengths = {
            n: [nums[n][s]["trajectories"]["length"]["end"] for s in seeds if s in nums[n]] for n in shown
        }
        checks.append(
            (
                CONTEXT,
                "(context) length end " + ", ".join(f"{n} {_list(x, '.1f')}" for n, x in lengths.items()),
            )
        )
        verdict(
            claim,
            "fig. 6",
            checks,
            "without a KL term nothing pulls the policy back, and re-scaling the score (reward normalisation) or "
            "the advantages makes the RM's length bias, the largest part of its score's variance, a unit-scale "
            "signal: see the lengths; the tricks can lower KL, yet gold does not fall less than vanilla's beyond "
            "the seeds' noise. The paper's 'early' is ~100 of 1000 steps at lr 5e-7; hh-mini's runs drift within "
            "20 of 80 at lr 1e-4.",
        )
    else:
        not_run(claim, "fig. 6", names)
    # (b) fig. 7: "only a penalty of the policy entropy or KL divergence can provide a long-lasting stable
    # optimization" (the entropy bonus at fig. 16's coefficient and clip), and the reference as old policy trades
    # reward for stability
    names = ("vanilla", "kl_penalty", "entropy_bonus", "kl_reference_as_old")
    claim = (
        "(b) the KL penalty and the entropy bonus give long-lasting stability; importance sampling (reference as "
        "old policy) trades reward for stability"
    )
    if have(*names):
        seeds = common(*names)
        checks = []
        for v in ("kl_penalty", "entropy_bonus"):
            flags = [nums[v][s]["over_optimised"] for s in seeds]
            va_oo = [nums["vanilla"][s]["over_optimised"] for s in seeds]
            decision = unanimous([not x for x in flags])
            checks.append(
                (decision, f"over-optimised: {v} {_list(flags)} vs vanilla {_list(va_oo)}: {decision}")
            )
            checks.append(cmp(v, "vanilla", "gold_fall"))
        rm_kl = [nums["kl_penalty"][s]["trajectories"]["rm"]["end"] for s in seeds]
        rm_is = [nums["kl_reference_as_old"][s]["trajectories"]["rm"]["end"] for s in seeds]
        p = paired(rm_is, rm_kl, "lower")
        checks.append(
            (
                p["decision"],
                f"RM reward end kl_reference_as_old {_list(rm_is)} vs kl_penalty {_list(rm_kl)} (lower, paired "
                f"difference {_f(p['mean'], '+.3f')} ± {_f(p['sd'], '.3f')} sd: {p['decision']})",
            )
        )
        checks.append(cmp("kl_reference_as_old", "kl_penalty", "kl_mid"))
        verdict(
            claim,
            "fig. 7",
            checks,
            "see the numbers: a comparison that fails names which part of the claim does not hold here. The "
            "entropy bonus constrains no distance to the reference, and on hh-mini the RM's exploit (length) needs "
            "no low entropy; with the reference as the old policy every ratio is pi/pi_ref, so the clip bounds the "
            "distance to the reference itself, which at this learning rate may already be the binding constraint "
            "with or without the penalty.",
        )
    else:
        not_run(claim, "fig. 7", names)
    # (c) fig. 8
    names = ("vanilla", "critic_pretrain", "ppo_max", "policy_pretrained")
    claim = "(c) critic pre-training smooths early training; a policy without SFT fails"
    if have(*names):
        seeds = common(*names)
        wl = [nums["policy_pretrained"][s]["win_tie_lose"] for s in seeds]
        loses = unanimous([w[2] > w[0] for w in wl])
        checks = [
            cmp("critic_pretrain", "vanilla", "rm_roughness_early"),
            cmp("critic_pretrain", "vanilla", "kl_mid"),
            cmp("policy_pretrained", "ppo_max", "eval_gold_policy", better="lower"),
            (
                loses,
                f"policy_pretrained vs SFT win/tie/lose {', '.join('/'.join(map(str, w)) for w in wl)}: {loses}",
            ),
        ]
        verdict(
            claim,
            "fig. 8",
            checks,
            "hh-mini's critic starts from the RM, which already predicts the score at the last token, and 80 "
            "iterations on a 1M model leave little 'early' phase to smooth; and the pre-trained model answers "
            "dialogues too (its corpus holds dialogues), so it is a weaker but not an incapable policy.",
        )
    else:
        not_run(claim, "fig. 8", names)
    # (d) fig. 12
    names = ("ppo_max", "ppo_ptx")
    claim = "(d) PPO-ptx lowers the alignment tax (held-out pretraining-text loss)"
    if have(*names):
        seeds = common(*names)
        tax_max = [nums["ppo_max"][s]["heldout_loss"] - nums["ppo_max"][s]["heldout_loss_sft"] for s in seeds]
        tax_ptx = [nums["ppo_ptx"][s]["heldout_loss"] - nums["ppo_ptx"][s]["heldout_loss_sft"] for s in seeds]
        p = paired(tax_ptx, tax_max, "lower")
        verdict(
            claim,
            "fig. 12",
            [
                (
                    p["decision"],
                    f"loss - SFT's (nats/token): ppo_ptx {_list(tax_ptx, '+.4f')} vs ppo_max {_list(tax_max, '+.4f')} "
                    f"(paired difference {_f(p['mean'], '+.4f')} ± {_f(p['sd'], '.4f')} sd: {p['decision']})",
                )
            ],
            "PPO-max's KL penalty (0.5) already keeps the policy so close to SFT that there is little tax to lower, "
            "and the ptx loss here is on SFT demonstrations, not on the pretraining corpus the loss is measured on.",
        )
    else:
        not_run(claim, "fig. 12", names)
    # the demo's two
    if have("vanilla"):
        seeds = sorted(nums["vanilla"])
        oo = [nums["vanilla"][s]["over_optimised"] for s in seeds]
        verdict(
            "(demo) vanilla PPO over-optimises the reward model",
            "fig. 4",
            [
                (
                    unanimous(oo),
                    f"over-optimised per seed {_list(oo)}; gold fall {_list(_per_seed(nums, 'vanilla', 'gold_fall'))}",
                )
            ],
            "in this run length the policy found no exploit of this seed's RM that lowers the gold reward "
            "(compare its KL and length: a vanilla run that barely moved has nothing to over-optimise with).",
        )
    if have("ppo_max"):
        seeds = sorted(nums["ppo_max"])
        wl = [nums["ppo_max"][s]["win_tie_lose"] for s in seeds]
        verdict(
            "(demo) PPO-max beats SFT by the gold judge",
            "fig. 10",
            [
                (
                    unanimous([w[0] > w[2] for w in wl]),
                    f"win/tie/lose {', '.join('/'.join(map(str, w)) for w in wl)}",
                )
            ],
            "PPO-max's gains over SFT are small on this world (a few hundredths of gold reward): one sampled answer "
            "per prompt and a tie margin of 0.1 make the count noisy.",
        )
    # ours: advantage whitening on top of the paper's PPO-max
    if have("ppo_max", "ppo_max_adv_norm"):
        verdict(
            "(ours) advantage whitening helps PPO-max (more end gold, less gold fall)",
            "whitening",
            [
                cmp("ppo_max_adv_norm", "ppo_max", "gold_end", "higher"),
                cmp("ppo_max_adv_norm", "ppo_max", "gold_fall"),
            ],
            "whitening does not measurably help PPO-max here: it stays off (the paper's PPO-max has none).",
        )
    return out


def confusion(nums: dict[str, dict[int, dict[str, Any]]], key: str) -> dict[str, int]:
    """Fired (``key``: monitor_before / monitor_after / monitor_logged) x over-optimised, over all runs."""
    t = {"fired_oo": 0, "fired_ok": 0, "silent_oo": 0, "silent_ok": 0}
    for runs in nums.values():
        for r in runs.values():
            if r.get("over_optimised") is None:
                continue
            fired = r.get(key) is not None
            t[("fired" if fired else "silent") + ("_oo" if r["over_optimised"] else "_ok")] += 1
    return t


# ------------------------------------------------------------------ critic-free estimators vs PPO-max (beyond)

ESTIMATORS = "estimators"  # the variant group (Variant.figure) of the comparison
CAUSES = "causes"  # variants that move one of GRPO's differences from RLOO to the other side
WHITENING = "whitening"  # PPO-max with advantage whitening (ours)
MONITOR = "monitor"  # hard runs for the collapse monitor, out of the sample its thresholds were chosen on
# The frontier's x: the KL of a whole response to the reference's (nats; Gao et al. 2022, "Scaling Laws for
# Reward Model Overoptimization", plot gold reward against it). Per token it would credit a method that spends its
# divergence on longer answers, which is how this world's RM is exploited. The exact KL over the vocabulary, the
# same quantity for every method: the sampled estimators are not (k1 for PPO, k3 for GRPO, on tokens drawn with
# top-p 0.9 and a repetition penalty, which are no sample of the policy: in a toy case a KL of 1.004 reads 1.220 by
# k1 and 0.575 by k3). Runs made before it was logged fall back to their estimator's `kl/per_sequence`.
KL_FRONTIER = "kl/exact_per_sequence"
KL_FRONTIER_FALLBACK = "kl/per_sequence"
PROBE_STAGE = "probe_{}"  # a method's memory probe, a stage of its seed's directory


def frontier(records: Sequence[dict[str, Any]]) -> tuple[list[float], list[float]]:
    """``(KL, gold)`` per policy step where both are logged, each a trailing moving average over 15% of the run
    (the report's window; the first points average what exists so far, so the curve starts near KL 0)."""
    kl, gold = [], []
    key = frontier_metric(records)
    for r in records:
        k, g = _num(r.get(key)), _num(r.get(PANELS[1][1][0]))
        if k is not None and g is not None:
            kl.append(k)
            gold.append(g)
    w = max(1, round(0.15 * len(kl)))
    return moving_average(kl, w), moving_average(gold, w)


def frontier_metric(records: Sequence[dict[str, Any]]) -> str:
    """The KL a run's frontier is drawn on: :data:`KL_FRONTIER` where it logged it, else the fallback."""
    return KL_FRONTIER if any(KL_FRONTIER in r for r in records) else KL_FRONTIER_FALLBACK


def gold_at_kl(kl: Sequence[float], gold: Sequence[float], budget: float) -> float | None:
    """The (smoothed) gold reward when the run's KL first reached ``budget``, linearly interpolated between the
    two steps around the crossing; ``None`` when its KL never reached it."""
    for i, k in enumerate(kl):
        if k >= budget:
            if i == 0:
                return gold[0]
            t = (budget - kl[i - 1]) / (k - kl[i - 1])  # kl[i - 1] < budget <= k
            return gold[i - 1] + t * (gold[i] - gold[i - 1])
    return None


def iteration_costs(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Wall time from a run's ``time/iteration`` (all its training records, critic-only ones included: PPO-max's
    critic pre-training is part of what it costs): mean seconds per policy iteration, and the training total."""
    train = [r for r in records if "reward/raw_mean" in r and _num(r.get("time/iteration")) is not None]
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


def compare_estimators(
    names: Sequence[str],
    curves: dict[str, dict[int, tuple[list[float], list[float]]]],
    nums: dict[str, dict[int, dict[str, Any]]],
    memory: dict[str, dict[int, dict[str, Any] | None]],
    kl_metric: str = KL_FRONTIER,
) -> dict[str, Any]:
    """The comparison's numbers per method and seed (``memory``: the probes' ``memory.json`` per method and seed).
    The KL budget is the smallest, over all the runs, of a run's largest (smoothed) KL, so that every run reached
    it: gold at that budget compares the methods at equal KL."""
    budget = min((max(k) for n in names for k, _ in curves[n].values() if k), default=None)
    methods: dict[str, Any] = {}
    for n in names:
        seeds = {}
        for s, (kl, gold) in sorted(curves[n].items()):
            r = nums[n][s]
            probe = memory.get(n, {}).get(s) or {}
            seeds[s] = {
                "gold_at_budget": gold_at_kl(kl, gold, budget) if kl and budget is not None else None,
                "kl_max": max(kl) if kl else None,
                "kl_end": kl[-1] if kl else None,
                "gold_end": r["trajectories"]["gold"]["end"],
                "gold_peak": r["trajectories"]["gold"]["peak"],
                "over_optimised": r["over_optimised"],
                "gold_fall": r.get("gold_fall"),
                "win_tie_lose": r["win_tie_lose"],
                "seconds_per_iteration": r.get("seconds_per_iteration"),
                "train_seconds": r.get("train_seconds"),
                "peak_rss_mib": probe.get("peak_rss_mib"),
                "probe_seconds_per_iteration": probe.get("seconds_per_iteration"),
            }
        probes = [p for p in memory.get(n, {}).values() if p]
        methods[n] = {
            "seeds": seeds,
            "probe_policy_iterations": probes[0]["policy_iterations"] if probes else None,
            "settings": nums[n][min(nums[n])].get("settings"),
        }
    out = {"kl_metric": kl_metric, "budget": budget, "methods": methods}
    out["verdicts"] = estimator_verdicts(out)
    return out


def _stats(xs: Sequence[Any]) -> dict[str, float] | None:
    vals = [float(x) for x in xs if _num(x) is not None]
    return {"mean": fmean(vals), "min": min(vals), "max": max(vals), "n": len(vals)} if vals else None


def _spread(st: dict[str, float] | None, fmt: str = ".3f") -> str:
    """``mean [min, max]`` over seeds (one seed: its value)."""
    if st is None:
        return "n/a"
    if st["n"] == 1:
        return format(st["mean"], fmt)
    return f"{format(st['mean'], fmt)} [{format(st['min'], fmt)}, {format(st['max'], fmt)}]"


def estimator_verdicts(cmp: dict[str, Any]) -> list[dict[str, Any]]:
    """Which method reaches the most gold reward at equal KL, the most at the end, which over-optimise, which is
    cheapest per iteration in time and memory: each answered from the numbers, whichever method that is.

    The best method is the highest mean over seeds; it "holds" when its paired difference to every other method
    (same seeds) passes the paired t-test (:func:`paired`), else the answer names the methods it is not ahead of
    beyond the seeds' noise, and the numbers say on how many seeds it is ahead of each. A method over-optimises
    when the rule of :func:`over_optimised` flags it on a majority of its seeds."""
    methods: dict[str, Any] = cmp["methods"]
    out: list[dict[str, Any]] = []

    def best(key: str, higher: bool, question: str, fmt: str = ".3f") -> None:
        per = {
            n: {s: r[key] for s, r in m["seeds"].items() if _num(r[key]) is not None}
            for n, m in methods.items()
        }
        means = {n: fmean(v.values()) for n, v in per.items() if v}
        numbers = ", ".join(f"{n} {_spread(_stats(list(per[n].values())), fmt)}" for n in methods)
        if not means:
            out.append({"question": question, "answer": "n/a", "holds": None, "numbers": numbers})
            return
        win = (max if higher else min)(means, key=means.__getitem__)
        weak, against = [], []
        for n in means:
            common = sorted(set(per[win]) & set(per[n]))
            if n == win or not common:
                continue
            p = paired(
                [per[win][s] for s in common], [per[n][s] for s in common], "higher" if higher else "lower"
            )
            ahead = sum(d > 0 for d in p["diffs"])
            against.append(
                f"{ahead}/{p['n']} seeds against {n} ({_f(p['mean'], '+' + fmt)}: {p['decision']})"
            )
            if p["decision"] != HOLDS:
                weak.append(n)
        answer = win if not weak else f"{win} on the mean, within the seeds' noise against {', '.join(weak)}"
        numbers += f"; {win} ahead on " + ", ".join(against) if against else ""
        out.append({"question": question, "answer": answer, "holds": not weak, "numbers": numbers})

    budget = cmp["budget"]
    best("gold_at_budget", True, f"most gold reward at equal KL ({_f(budget)} nats per response)")
    best("gold_end", True, "most gold reward at the end of training (each at its own KL)")
    flags = {n: [r["over_optimised"] for _, r in sorted(m["seeds"].items())] for n, m in methods.items()}
    over = [n for n, f in flags.items() if f and _majority([bool(x) for x in f])]
    out.append(
        {
            "question": "over-optimises (gold falls from its peak while the RM reward rises)",
            "answer": ", ".join(over) if over else "none",
            "holds": None,
            "numbers": "; ".join(
                f"{n} {'/'.join('yes' if x else 'no' for x in f)} (gold fall "
                f"{_list([r['gold_fall'] for _, r in sorted(methods[n]['seeds'].items())])})"
                for n, f in flags.items()
            ),
        }
    )
    best("seconds_per_iteration", False, "least wall time per policy iteration (s, the runs)", ".2f")
    best("peak_rss_mib", False, "least memory (peak RSS of the training process, MiB, the probes)", ".0f")
    return out


def plot_frontier(
    curves: dict[str, dict[int, tuple[list[float], list[float]]]],
    budget: float,
    path: str | os.PathLike[str],
    kl_metric: str = KL_FRONTIER,
) -> Path:
    """Gold reward against KL spent (the over-optimisation frontier), every method on shared axes: one faint line
    per seed, a bold one for the step-wise mean over seeds, the common KL budget dashed."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8.5, 5.2))
    colours = run_colours(list(curves))
    for name, runs in curves.items():
        c = colours[name]
        for kl, gold in runs.values():
            ax.plot(kl, gold, color=c, alpha=0.3, linewidth=1)
        n = min((len(k) for k, _ in runs.values()), default=0)
        if n:
            mk = [fmean(k[i] for k, _ in runs.values()) for i in range(n)]
            mg = [fmean(g[i] for _, g in runs.values()) for i in range(n)]
            ax.plot(mk, mg, color=c, linewidth=2.4, label=name)
            ax.scatter([mk[-1]], [mg[-1]], color=c, s=30, zorder=3)
    if budget == budget:  # not NaN
        ax.axvline(budget, color="black", linestyle="--", linewidth=1, label=f"equal-KL budget {budget:.3g}")
    ax.set_xlabel(f"KL(policy || reference) per response, nats ({kl_metric}, 15% moving average)")
    ax.set_ylabel("gold reward (rollout mean, not optimised)")
    ax.set_title(
        "Over-optimisation frontier on hh-mini: gold reward against KL spent\n(faint: seeds; dot: end)"
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=10)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def estimators_markdown(cmp: dict[str, Any], png: str, jobs_note: str) -> list[str]:
    """The report's section of the comparison (its tables and figure)."""
    methods = cmp["methods"]
    md = [
        "## Critic-free estimators against PPO-max (beyond the paper)",
        "",
        "Every method is its preset (`ppomax.demo.ablate.VARIANTS`) on the same seeds and base stages, with equal "
        "samples (responses) per iteration, learning rate and iterations. *Gold at equal KL*: each run's gold "
        f"reward when its KL first reached the budget, the smallest of the runs' largest KL ({_f(cmp['budget'])} "
        f"nats per response, `{cmp['kl_metric']}`), interpolated on the 15% moving averages; mean [min, max] over "
        f"seeds. {jobs_note}",
        "",
        f"![gold against KL]({png})",
        "",
        "| method | estimator | samples/prompt | KL coef (in) | gold at equal KL | max KL | end gold | end KL | "
        "gold vs SFT w/t/l | over-optimised | s / policy iteration | training s | probe s / iteration | "
        "peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n, m in methods.items():
        rs = [r for _, r in sorted(m["seeds"].items())]
        st = m.get("settings") or {}
        wtl = [sum(r["win_tie_lose"][i] for r in rs) for i in range(3)]
        md.append(
            f"| {n} | {st.get('advantage_estimator', 'n/a')} | {st.get('samples_per_prompt', 'n/a')} | "
            f"{_f(st.get('kl_coef'), 'g')} ({st.get('kl_in', 'n/a')}, {st.get('kl_estimator', 'n/a')}) | "
            f"{_spread(_stats([r['gold_at_budget'] for r in rs]))} | {_spread(_stats([r['kl_max'] for r in rs]), '.2f')} | "
            f"{_spread(_stats([r['gold_end'] for r in rs]))} | {_spread(_stats([r['kl_end'] for r in rs]), '.2f')} | "
            f"{'/'.join(map(str, wtl))} | {'/'.join('yes' if r['over_optimised'] else 'no' for r in rs)} | "
            f"{_spread(_stats([r['seconds_per_iteration'] for r in rs]), '.2f')} | "
            f"{_spread(_stats([r['train_seconds'] for r in rs]), '.0f')} | "
            f"{_spread(_stats([r['probe_seconds_per_iteration'] for r in rs]), '.2f')} | "
            f"{_spread(_stats([r['peak_rss_mib'] for r in rs]), '.0f')} |"
        )
    md += ["", "| question | answer | numbers |", "|---|---|---|"]
    md += [f"| {v['question']} | **{v['answer']}** | {v['numbers']} |" for v in cmp["verdicts"]]
    md.append("")
    if cmp.get("causes"):
        md += causes_markdown(cmp["causes"])
    return md


# (key, which is better) of the causes' paired differences
CAUSE_KEYS = (
    ("gold_at_budget", "higher"),
    ("gold_end", "higher"),
    ("gold_fall", "lower"),
    ("kl_end", "lower"),
)


def cause_effects(cmp: dict[str, Any], bases: dict[str, str]) -> list[dict[str, Any]]:
    """Each cause variant against its preset (``bases``: variant -> preset method), paired over the seeds both ran:
    the difference (variant - preset) of :data:`CAUSE_KEYS`, its spread and the paired test's decision, and both
    sides' over-optimisation flags."""
    methods = cmp["methods"]
    rows = []
    for name, base in bases.items():
        if name not in methods or base not in methods:
            continue
        a, b = methods[name]["seeds"], methods[base]["seeds"]
        seeds = sorted(set(a) & set(b))
        effects = {}
        for key, better in CAUSE_KEYS:
            p = paired([a[s][key] for s in seeds], [b[s][key] for s in seeds], better)
            sign = 1.0 if better == "higher" else -1.0  # back to variant - preset
            effects[key] = {
                "diffs": [sign * d for d in p["diffs"]],
                "mean": sign * p["mean"],
                "sd": p["sd"],
                "decision": p["decision"],
            }
        rows.append(
            {
                "variant": name,
                "base": base,
                "seeds": seeds,
                "effects": effects,
                "over_optimised": [a[s]["over_optimised"] for s in seeds],
                "base_over_optimised": [b[s]["over_optimised"] for s in seeds],
            }
        )
    return rows


def causes_markdown(rows: Sequence[dict[str, Any]]) -> list[str]:
    md = [
        "### What makes GRPO differ from RLOO (paired over seeds)",
        "",
        "Each variant moves one of the presets' differences to the other side; its effect is its difference to its "
        "preset on the same seeds (variant - preset): mean ± sd over seeds [per seed], and the paired t-test's "
        "decision (for gold: *holds* = better, *fails* = worse, beyond the seeds' noise). Gold at equal KL uses the "
        "comparison's budget.",
        "",
        "| variant | vs | gold at equal KL | end gold | gold fall | end KL (nats/response) | over-optimised (variant / preset) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = []
        for key, _ in CAUSE_KEYS:
            e = r["effects"][key]
            cells.append(
                f"{_f(e['mean'], '+.3f')} ± {_f(e['sd'], '.3f')} [{_list(e['diffs'], '+.3f')}] {e['decision']}"
            )
        flags = f"{_list(['yes' if x else 'no' for x in r['over_optimised']])} / " + _list(
            ["yes" if x else "no" for x in r["base_over_optimised"]]
        )
        md.append(f"| {r['variant']} | {r['base']} | {' | '.join(cells)} | {flags} |")
    md.append("")
    return md


# Variant groups (Variant.figure) whose runs the collapse monitor's thresholds were not chosen on.
OUT_OF_SAMPLE = (MONITOR, ESTIMATORS, CAUSES, WHITENING)


def monitor_evidence(nums: dict[str, dict[int, dict[str, Any]]], figures: dict[str, str]) -> dict[str, Any]:
    """Every rule of :data:`MONITOR_RULES` against the gold truth, over the runs out of sample (:data:`OUT_OF_SAMPLE`;
    ``figures``: variant -> its group) and over all: fired / silent x over-optimised / healthy, the runs it cannot
    be replayed on, and its lead on the over-optimised runs it caught (the step gold had fallen by
    :data:`GOLD_NOISE` minus the step it fired: negative = after)."""
    out: dict[str, Any] = {}
    for sample in ("out of sample", "all"):
        rows = {}
        for rule in MONITOR_RULES:
            t: dict[str, Any] = {
                "fired_oo": 0,
                "fired_ok": 0,
                "silent_oo": 0,
                "silent_ok": 0,
                "not_replayable": 0,
            }
            leads = []
            for name, runs in nums.items():
                if sample == "out of sample" and figures.get(name) not in OUT_OF_SAMPLE:
                    continue
                for r in runs.values():
                    if r.get("over_optimised") is None:
                        continue
                    fired = r.get("monitor_rules", {}).get(rule, NA)
                    if fired == NA:
                        t["not_replayable"] += 1
                        continue
                    oo = r["over_optimised"]
                    t[("fired" if fired is not None else "silent") + ("_oo" if oo else "_ok")] += 1
                    if oo and isinstance(fired, int) and r.get("gold_fall_step") is not None:
                        leads.append(r["gold_fall_step"] - fired)
            t["leads"] = leads
            rows[rule] = t
        out[sample] = rows
    return out


def monitor_markdown(evidence: dict[str, Any]) -> list[str]:
    md = []
    for sample, rows in evidence.items():
        md += [
            "",
            f"Rules against the gold truth, runs {sample}:",
            "",
            "| rule | fired & over-optimised | fired & healthy (false alarms) | silent & over-optimised (misses) | "
            "silent & healthy | not replayable | lead in steps: mean [min, max] (negative: after gold fell) |",
            "|---|---|---|---|---|---|---|",
        ]
        for rule, t in rows.items():
            leads = t["leads"]
            lead = f"{_f(fmean(leads), '+.1f')} [{min(leads):+d}, {max(leads):+d}]" if leads else "n/a"
            md.append(
                f"| {rule} | {t['fired_oo']} | {t['fired_ok']} | {t['silent_oo']} | {t['silent_ok']} | "
                f"{t['not_replayable']} | {lead} |"
            )
    return md


# ----------------------------------------------------------------------------------------------------- plots


def mean_records(runs: Sequence[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Step-wise mean over seeds of the fig. 4 panels' metrics (steps present in every run)."""
    n = min((len(r) for r in runs), default=0)
    keys = {k for _, ks in PANELS for k in ks}
    out = []
    for i in range(n):
        row: dict[str, Any] = {"step": i + 1}
        for k in keys:
            vals = [r[i][k] for r in runs if isinstance(r[i].get(k), int | float)]
            if len(vals) == len(runs):
                row[k] = fmean(vals)
        out.append(row)
    return out


def plot_heldout(rows: Sequence[tuple[str, list[float]]], path: str | os.PathLike[str]) -> Path:
    """Fig. 12's comparison on hh-mini: held-out pretraining-text loss per model (bar: mean over seeds; dots: seeds)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for i, (_name, vals) in enumerate(rows):
        ax.bar(i, fmean(vals), color=f"C{i}", alpha=0.7)
        ax.scatter([i] * len(vals), vals, color="black", s=12, zorder=3)
    ax.set_xticks(range(len(rows)), [r[0] for r in rows])
    lo = min(min(v) for _, v in rows)
    hi = max(max(v) for _, v in rows)
    ax.set_ylim(lo - 0.2 * (hi - lo + 1e-3), hi + 0.2 * (hi - lo + 1e-3))
    ax.set_ylabel("NLL per token on held-out pretraining text")
    ax.set_title("Alignment tax (paper fig. 12: language ability after PPO)")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


# -------------------------------------------------------------------------------------------------- report


def _load(
    out: Path, seeds: Sequence[int], variants: Sequence[Any], stage_names: dict[str, str]
) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """The runs' metrics and numbers, and the ``variant/seed`` runs left out because their PPO run or its
    evaluation is not there (never trained, or interrupted): a partial ablation still gets a report."""
    import yaml

    from ppomax.monitor import read_metrics

    records: dict[str, dict[int, list[dict[str, Any]]]] = {}
    nums: dict[str, dict[int, dict[str, Any]]] = {}
    missing: list[str] = []
    for v in variants:
        for s in seeds:
            d = out / f"seed-{s}"
            needed = (
                d / stage_names[v.name] / "metrics.jsonl",
                d / stage_names[v.name] / "config.yaml",
                d / f"eval_{v.name}" / "vs_sft.json",
                d / f"eval_{v.name}" / "heldout_lm.json",
            )
            if not all(f.is_file() for f in needed):
                missing.append(f"{v.name}/{s}")
                continue
            raw = read_metrics(d / stage_names[v.name] / "metrics.jsonl")
            recs = policy_records(raw)
            ev = json.loads((d / f"eval_{v.name}" / "vs_sft.json").read_text())
            held = json.loads((d / f"eval_{v.name}" / "heldout_lm.json").read_text())
            config = yaml.safe_load((d / stage_names[v.name] / "config.yaml").read_text()) or {}
            records.setdefault(v.name, {})[s] = recs
            nums.setdefault(v.name, {})[s] = {
                **run_numbers(recs, ev, held),
                **iteration_costs(raw),
                "settings": method_settings(config),
            }
    return records, nums, missing


def probe_memory(out: Path, seed: int, name: str) -> dict[str, Any] | None:
    """The memory probe of ``name`` on ``seed`` (:func:`ppomax.demo.ablate.probe_stage`), if it ran."""
    f = out / f"seed-{seed}" / PROBE_STAGE.format(name) / "memory.json"
    return json.loads(f.read_text()) if f.is_file() else None


def _step(x: Any) -> str:
    return "never" if x is None else str(x)


def _conditions(cmp: dict[str, Any], jobs: int) -> str:
    """How the wall times and memory were measured (the table's last three columns)."""
    probed = [m["probe_policy_iterations"] for m in cmp["methods"].values() if m["probe_policy_iterations"]]
    text = (
        "Wall time: the runs' `time/iteration` (policy iterations; training s also counts critic-only ones), "
        f"{'one run per process with one torch thread, ' + str(jobs) + ' at once' if jobs > 1 else 'one run at a time'} "
        "when they were trained (a cached run keeps the time of the invocation that trained it)."
    )
    if probed:
        text += (
            f" Probe: a separate short run of each method and seed ({probed[0]} policy iterations, no critic-only "
            "ones) in a fresh process, one at a time, with one torch thread; peak RSS is that training process's "
            "peak resident memory (Linux VmHWM: Python, torch and the method's models included), at the response "
            "lengths of the start of training."
        )
    return text


def write_ablate_report(
    out: Path,
    seeds: Sequence[int],
    variants: Sequence[Any],
    stage_names: dict[str, str],
    prof: Any,
    timings: dict[str, Any],
    wall: float,
    compare: Sequence[str] = (),
    jobs: int = 1,
) -> Path:
    """``out/report/``: ablate.md, summary.json and the PNGs; returns the report directory. ``compare``: the
    methods of the estimators comparison (:func:`ppomax.demo.ablate.comparison`), none: no such section."""
    rep = out / "report"
    rep.mkdir(parents=True, exist_ok=True)
    records, nums, missing = _load(out, seeds, variants, stage_names)
    if not nums:  # nothing to judge or draw: say what a report would need instead of an empty one
        raise UserError(
            f"{out}: no finished ablation run to report (each needs its PPO run and its evaluation); missing: "
            f"{', '.join(missing)}; train them with `ppomax ablate --out {out}` (the same --seeds and --only)"
        )
    figures: dict[str, list[Any]] = {}
    for v in variants:
        # PPO-max is drawn in every figure that compares against it; fig. 4 is vanilla against PPO-max
        if v.figure != "fig. 5":
            figures.setdefault(v.figure, []).append(v)
    pngs = {}
    for fig_name, vs in figures.items():
        names = [v.name for v in vs]
        # each figure is drawn against its baseline, as the paper draws it
        base = "ppo_max" if fig_name in ("fig. 12",) or all(v.preset != "vanilla" for v in vs) else "vanilla"
        if base in records and base not in names:
            names = [base, *names]
        if fig_name in ("fig. 4", "fig. 8") and "ppo_max" in records and "ppo_max" not in names:
            names.append("ppo_max")
        runs = {n: mean_records(list(records[n].values())) for n in names if n in records}
        png = f"fig{fig_name.split()[-1]}.png" if fig_name.startswith("fig.") else f"{fig_name}.png"
        shown = sorted({s for n in runs for s in records[n]})
        title = f"hh-mini, paper {fig_name} variants (mean over seeds {', '.join(map(str, shown))})"
        plot_training_curves(runs, rep / png, title=title)
        pngs[fig_name] = png
    ran = {v.name: sorted(nums.get(v.name, {})) for v in variants}  # the seeds each variant has runs of
    wtl_rows = []
    for v in variants:
        w = [sum(nums[v.name][s]["win_tie_lose"][i] for s in ran[v.name]) for i in range(3)]
        n = sum(w)
        if n:
            wtl_rows.append((v.name, {"win_rate": w[0] / n, "tie_rate": w[1] / n, "lose_rate": w[2] / n}))
    plot_win_tie_lose(wtl_rows, rep / "win_tie_lose.png", "Each variant vs SFT by the gold judge (all seeds)")
    sft_loss = {s: r["heldout_loss_sft"] for runs in nums.values() for s, r in runs.items()}
    held_rows = [("sft", [sft_loss[s] for s in sorted(sft_loss)])]
    held_rows += [
        (v.name, [nums[v.name][s]["heldout_loss"] for s in ran[v.name]])
        for v in variants
        if v.name in ("ppo_max", "ppo_ptx", "vanilla") and ran[v.name]
    ]
    plot_heldout(held_rows, rep / "alignment_tax.png")
    vs = verdicts(nums)
    cmp = None
    compare = [n for n in compare if records.get(n)]  # methods with at least one run
    if len(compare) >= 2:
        curves = {n: {s: frontier(r) for s, r in records[n].items()} for n in compare}
        metrics = sorted({frontier_metric(r) for n in compare for r in records[n].values()})
        cmp = compare_estimators(
            compare,
            curves,
            nums,
            {n: {s: probe_memory(out, s, n) for s in seeds} for n in compare},
            " and ".join(metrics)
            + (" (runs of different versions: not one axis)" if len(metrics) > 1 else ""),
        )
        plot_frontier(curves, cmp["budget"], rep / "estimators_frontier.png", cmp["kl_metric"])
        cmp["causes"] = cause_effects(cmp, {v.name: v.preset for v in variants if v.figure == CAUSES})

    md = ["# `ppomax ablate`: the paper's ablations on hh-mini", ""]
    md += [
        f"Profile `{prof.name}` ({prof.ppo_iterations} PPO iterations per run), seeds {', '.join(map(str, seeds))}, "
        f"{len(variants)} variants; wall time of this invocation {wall:.0f} s (cached stages count 0)."
        + (
            f" Runs not in this report (not trained or not finished): {', '.join(missing)}."
            if missing
            else ""
        ),
        "Each variant is a preset plus `--set` overrides (`ppomax.demo.ablate.VARIANTS`); the gold reward is logged "
        "during PPO, never optimised. Numbers per run are in `summary.json`.",
        "",
        "## Verdicts",
        "",
        "| claim | paper | verdict | numbers | likely explanation (when not reproduced) |",
        "|---|---|---|---|---|",
    ]
    md += [
        f"| {v['claim']} | {v['figure']} | **{v['verdict']}** | {v['numbers']} | {v['explanation']} |"
        for v in vs
    ]
    md += [
        "",
        "Criteria: *early* = the first half of a run; `kl_mid` = KL per token at its end, `gold_drop_early` = gold's "
        "fall from its peak within it, `rm_roughness_early` = sd of the RM reward's step-to-step changes in it; "
        f"*over-optimised* = gold fell from its peak by >= 10% of its rise and >= {GOLD_NOISE} while the RM reward "
        "ended above its value at gold's peak; *collapsed* = loses to SFT on more than half the held-out prompts. "
        "A comparison of two variants is decided by the paired t-test of their per-seed difference (one-sided, "
        "95%: with 3 seeds the mean difference must be 2.92 standard errors from 0), a yes/no one (over-optimised) "
        "when every seed agrees; a claim is reproduced when all its comparisons hold, not reproduced when one "
        f"fails, and within noise otherwise: rerun it with `{MORE_SEEDS}`.",
        "",
    ]
    if cmp is not None:
        md += estimators_markdown(cmp, "estimators_frontier.png", _conditions(cmp, jobs))
    md += [
        "## Variants",
        "",
        "| variant | paper | preset | overrides | what |",
        "|---|---|---|---|---|",
    ]
    md += [
        f"| {v.name} | {v.figure} | {v.preset} | {' '.join(f'`{o}`' for o in v.overrides) or '-'} | {v.what} |"
        for v in variants
    ]
    md += ["", "## Per run", ""]
    md += [
        "| variant | seed | RM start/peak/end | gold start/peak/end | KL/token end | ppl end | length end | "
        "over-optimised | collapsed | gold vs SFT w/t/l | held-out loss (SFT) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v in variants:
        for s in ran[v.name]:
            r = nums[v.name][s]
            t = r["trajectories"]
            md.append(
                f"| {v.name} | {s} | {_f(t['rm']['start'], '.2f')}/{_f(t['rm']['peak'], '.2f')}/{_f(t['rm']['end'], '.2f')} | "
                f"{_f(t['gold']['start'], '.2f')}/{_f(t['gold']['peak'], '.2f')}/{_f(t['gold']['end'], '.2f')} | "
                f"{_f(t['kl']['end'], '.3f')} | {_f(t['ppl']['end'], '.3f')} | {_f(t['length']['end'], '.1f')} | "
                f"{'yes' if r['over_optimised'] else 'no'} | {'yes' if r['collapsed'] else 'no'} | "
                f"{'/'.join(map(str, r['win_tie_lose']))} | {_f(r['heldout_loss'], '.4f')} ({_f(r['heldout_loss_sft'], '.4f')}) |"
            )
    md += ["", "## Training curves (paper fig. 4's panels, one figure per paper figure)", ""]
    md += [f"### {k}\n\n![{k}]({p})\n" for k, p in pngs.items()]
    md += ["## Against SFT by the gold judge", "", "![win/tie/lose](win_tie_lose.png)", ""]
    md += ["## Alignment tax (fig. 12)", "", "![alignment tax](alignment_tax.png)", ""]
    figures_of = {v.name: v.figure for v in variants}
    evidence = monitor_evidence(nums, figures_of)
    md += [
        "## The collapse monitor against the gold truth",
        "",
        "Per run: the step gold started to fall (its moving average 0.1 below its peak so far) and the first step "
        "the monitor fires, replayed on the run's metrics: with the library's rule (drift: KL per token >= "
        "`collapse.drift_kl_per_token` and still rising while the reward is above its baseline, or the paper's "
        "joint signature; on the exact KL where the run logged it), with the paper's signature alone (length up, "
        "perplexity down, KL up), and as the run itself logged it. *Out of sample*: the runs of groups "
        f"{', '.join(OUT_OF_SAMPLE)}, which no threshold was chosen on. Lead = gold's fall step minus the firing "
        "step (negative: after).",
        "",
        "| variant | seed | sample | over-optimised | gold starts falling | library rule | lead | signature only | logged |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    library = next(iter(MONITOR_RULES))
    for v in variants:
        for s in ran[v.name]:
            r = nums[v.name][s]
            fired = r.get("monitor_rules", {}).get(library, r.get("monitor_after"))
            lead = (
                f"{r['gold_fall_step'] - fired:+d}"
                if r["over_optimised"] and isinstance(fired, int) and r["gold_fall_step"] is not None
                else ""
            )
            sample = "out" if v.figure in OUT_OF_SAMPLE else "in"
            md.append(
                f"| {v.name} | {s} | {sample} | {'yes' if r['over_optimised'] else 'no'} | "
                f"{_step(r['gold_fall_step'])} | {_step(fired)} | {lead} | {_step(r['monitor_before'])} | "
                f"{_step(r['monitor_logged'])} |"
            )
    tables = {k: confusion(nums, f"monitor_{k}") for k in ("before", "after")}
    md += monitor_markdown(evidence)
    md.append("")
    # stage seconds as each stage's done.json recorded them when it ran (a cached stage keeps its old time)
    base = ("world", "tokenizer", "pretrain", "sft", "rm")
    md += ["", "## Timings", "", "| seed | run | stage seconds |", "|---|---|---|"]
    seen: set[str] = set()
    for k, v in timings.items():
        seed = k.split("/")[0]
        if seed not in seen:
            seen.add(seed)
            md.append(f"| {seed} | base stages | {', '.join(f'{n} {v[n]:.0f}' for n in base if n in v)} |")
        md.append(
            f"| {seed} | {k.split('/', 1)[1]} | {', '.join(f'{n} {t:.0f}' for n, t in v.items() if n not in base)} |"
        )
    md.append("")
    (rep / "ablate.md").write_text("\n".join(md), encoding="utf-8")
    summary = {
        "profile": prof.name,
        "seeds": list(seeds),
        "variants": [v.name for v in variants],
        "missing_runs": missing,
        "verdicts": vs,
        "collapse_monitor": tables,
        "collapse_monitor_rules": evidence,
        "estimators": cmp,
        "runs": {k: {str(s): r for s, r in v.items()} for k, v in nums.items()},
        "timings": timings,
        "wall_seconds": wall,
    }
    (rep / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return rep
