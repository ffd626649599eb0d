"""The critic-free estimators against PPO-max (beyond the paper): each run's over-optimisation frontier, gold
against KL (:func:`frontier`), the methods' numbers at equal KL and their costs (:func:`compare_estimators`), the
answers read from them (:func:`estimator_verdicts`), and what makes GRPO differ from RLOO (:func:`cause_effects`).
"""

from __future__ import annotations

from collections.abc import Sequence
from statistics import fmean
from typing import Any

from ppomax.demo.ablate.verdicts import HOLDS, paired
from ppomax.demo.markdown import fmt_list, fmt_num, fmt_spread
from ppomax.demo.outcome import PANELS, finite, moving_average

# The frontier's x: the KL of a whole response to the reference's (nats; Gao et al. 2022, "Scaling Laws for
# Reward Model Overoptimization", plot gold reward against it). Per token it would credit a method that spends its
# divergence on longer answers, which is how this world's RM is exploited. The exact KL over the vocabulary, the
# same quantity for every method: the sampled estimators are not (k1 for PPO, k3 for GRPO, on tokens drawn with
# top-p 0.9 and a repetition penalty, which are no sample of the policy: in a toy case a KL of 1.004 reads 1.220 by
# k1 and 0.575 by k3). Runs made before it was logged fall back to their estimator's `kl/per_sequence`.
KL_FRONTIER = "kl/exact_per_sequence"
KL_FRONTIER_FALLBACK = "kl/per_sequence"


def frontier(records: Sequence[dict[str, Any]]) -> tuple[list[float], list[float]]:
    """``(KL, gold)`` per policy step where both are logged, each a trailing moving average over 15% of the run
    (the report's window; the first points average what exists so far, so the curve starts near KL 0)."""
    kl, gold = [], []
    key = frontier_metric(records)
    for r in records:
        k, g = finite(r.get(key)), finite(r.get(PANELS[1][1][0]))
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
    out: dict[str, Any] = {"kl_metric": kl_metric, "budget": budget, "methods": methods}
    out["verdicts"] = estimator_verdicts(out)
    return out


def _majority(flags: Sequence[bool]) -> bool:
    return sum(flags) * 2 > len(flags)


def estimator_verdicts(cmp: dict[str, Any]) -> list[dict[str, Any]]:
    """Which method reaches the most gold reward at equal KL, the most at the end, which over-optimise, which is
    cheapest per iteration in time and memory: each answered from the numbers, whichever method that is.

    The best method is the highest mean over seeds; it "holds" when its paired difference to every other method
    (same seeds) passes the paired t-test (:func:`~ppomax.demo.ablate.verdicts.paired`), else the answer names the methods it is not ahead of
    beyond the seeds' noise, and the numbers say on how many seeds it is ahead of each. A method over-optimises
    when the rule of :func:`~ppomax.demo.ablate.numbers.over_optimised` flags it on a majority of its seeds."""
    methods: dict[str, Any] = cmp["methods"]
    out: list[dict[str, Any]] = []

    def best(key: str, higher: bool, question: str, fmt: str = ".3f") -> None:
        per = {
            n: {s: r[key] for s, r in m["seeds"].items() if finite(r[key]) is not None}
            for n, m in methods.items()
        }
        means = {n: fmean(v.values()) for n, v in per.items() if v}
        numbers = ", ".join(f"{n} {fmt_spread(list(per[n].values()), fmt)}" for n in methods)
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
                f"{ahead}/{p['n']} seeds against {n} ({fmt_num(p['mean'], '+' + fmt)}: {p['decision']})"
            )
            if p["decision"] != HOLDS:
                weak.append(n)
        answer = win if not weak else f"{win} on the mean, within the seeds' noise against {', '.join(weak)}"
        numbers += f"; {win} ahead on " + ", ".join(against) if against else ""
        out.append({"question": question, "answer": answer, "holds": not weak, "numbers": numbers})

    budget = cmp["budget"]
    best("gold_at_budget", True, f"most gold reward at equal KL ({fmt_num(budget)} nats per response)")
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
                f"{fmt_list([r['gold_fall'] for _, r in sorted(methods[n]['seeds'].items())])})"
                for n, f in flags.items()
            ),
        }
    )
    best("seconds_per_iteration", False, "least wall time per policy iteration (s, the runs)", ".2f")
    best("peak_rss_mib", False, "least memory (peak RSS of the training process, MiB, the probes)", ".0f")
    return out


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
