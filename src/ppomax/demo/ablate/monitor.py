"""The collapse monitor replayed on an ablation run's records (:data:`MONITOR_RULES`: the library's rule, the
paper's signature alone, candidates) and the rules' evidence against the gold truth, in and out of the sample
their thresholds were chosen on (:func:`monitor_evidence`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from statistics import fmean
from typing import Any

from ppomax.demo.ablate.variants import CAUSES, ESTIMATORS, MONITOR, WHITENING

NA = "n/a"  # a rule that cannot be replayed on a run (it logged no exact KL)
Fired = int | str | None  # the step a rule fired at, None (never) or NA


def replay_monitor(records: Sequence[dict[str, Any]], drift: bool) -> Fired:
    """The first step the collapse monitor fires on these records, with the default thresholds, with
    (``drift``: the library's rule) or without (the paper's joint signature only) drift.
    The monitor reads the exact KL where the run logged it (:func:`ppomax.ppo.collapse.kl_of`)."""
    from ppomax.config import CollapseConfig

    c = CollapseConfig()
    return _replay(records, c.drift_kl_per_token if drift else None)


def _replay(
    records: Sequence[dict[str, Any]],
    drift: float | None,
    kl_per_token: float | None = None,
    kl: str | None = None,
) -> Fired:
    """The first step :class:`ppomax.ppo.collapse.CollapseMonitor` (default window and signature thresholds, drift at
    ``drift``) fires on the records; ``kl``: the record key it reads as the KL instead of its own choice (:data:`NA`
    when the run did not log it); ``kl_per_token``: the signature's KL threshold (inf: drift alone)."""
    from ppomax.config import CollapseConfig
    from ppomax.ppo.collapse import EXACT_KL, KL, LENGTH, PPL, REWARD, CollapseMonitor

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
    from ppomax.config import CollapseConfig
    from ppomax.ppo.collapse import EXACT_KL, KL, REWARD

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


def _drift_per_token(t: float) -> Callable[[Sequence[dict[str, Any]]], Fired]:
    """Candidate: the drift rule at ``t`` nats/token on the exact KL."""
    return lambda r: _replay(r, t, kl="kl/exact_per_token")


def _drift_per_response(s: float) -> Callable[[Sequence[dict[str, Any]]], Fired]:
    """Candidate: the signature, or the exact KL per response above ``s`` nats."""
    return lambda r: _first(
        _replay(r, None), _replay(r, s, kl_per_token=float("inf"), kl="kl/exact_per_sequence")
    )


# The collapse monitor's rules replayed on every run, the library's first: its default (drift
# `collapse.drift_kl_per_token` nats/token on the exact KL where logged), the paper's signature alone, the drift
# rule as first chosen (0.15, on the estimator's KL), and candidates for an out-of-sample campaign to choose from
# (`ppomax ablate --only monitor estimators causes`): other absolute levels on the exact KL, per response instead
# of per token, and the KL's trend. A rule a run cannot be replayed with (no exact KL logged) is left out of that
# run's counts.
def _library_rule_name() -> str:
    from ppomax.config import CollapseConfig

    return f"library (drift {CollapseConfig().drift_kl_per_token}/token, exact KL where logged)"


MONITOR_RULES: dict[str, Callable[[Sequence[dict[str, Any]]], Fired]] = {
    _library_rule_name(): lambda r: replay_monitor(r, drift=True),
    "signature only (paper 5.2)": lambda r: replay_monitor(r, drift=False),
    "drift 0.15/token on the estimator's KL (as first chosen)": lambda r: _replay(r, 0.15, kl="kl/per_token"),
    **{f"drift {t}/token on the exact KL": _drift_per_token(t) for t in (0.03, 0.05, 0.1, 0.15)},
    **{f"drift {s}/response on the exact KL": _drift_per_response(s) for s in (0.5, 1.0)},
    "trend: exact KL rising over 3 windows, >= 0.02/token": _trend_rule,
}


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


# Variant groups (Variant.figure) whose runs the collapse monitor's thresholds were not chosen on.
OUT_OF_SAMPLE = (MONITOR, ESTIMATORS, CAUSES, WHITENING)


def monitor_evidence(nums: dict[str, dict[int, dict[str, Any]]], figures: dict[str, str]) -> dict[str, Any]:
    """Every rule of :data:`MONITOR_RULES` against the gold truth, over the runs out of sample (:data:`OUT_OF_SAMPLE`;
    ``figures``: variant -> its group) and over all: fired / silent x over-optimised / healthy, the runs it cannot
    be replayed on, and its lead on the over-optimised runs it caught (the step gold had fallen by
    :data:`~ppomax.demo.ablate.numbers.GOLD_NOISE` minus the step it fired: negative = after)."""
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
