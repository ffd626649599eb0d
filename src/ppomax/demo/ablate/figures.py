"""The ablation's PNGs: fig. 4's panels once per paper figure (:func:`plot_variant_figures`), each variant against
SFT, the alignment tax (fig. 12) and the over-optimisation frontier.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from statistics import fmean
from typing import Any

from ppomax.demo.ablate.estimators import KL_FRONTIER
from ppomax.demo.outcome import PANELS
from ppomax.demo.plots import plot_training_curves, plot_win_tie_lose, pyplot, run_colours


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
    plt = pyplot()
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


def plot_frontier(
    curves: dict[str, dict[int, tuple[list[float], list[float]]]],
    budget: float,
    path: str | os.PathLike[str],
    kl_metric: str = KL_FRONTIER,
) -> Path:
    """Gold reward against KL spent (the over-optimisation frontier), every method on shared axes: one faint line
    per seed, a bold one for the step-wise mean over seeds, the common KL budget dashed."""
    plt = pyplot()
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


def plot_variant_figures(
    records: dict[str, dict[int, list[dict[str, Any]]]], variants: Sequence[Any], rep: Path
) -> dict[str, str]:
    """Fig. 4's panels once per paper figure (or group of variants), each variant's mean over seeds drawn against
    its baseline as the paper draws it; returns figure -> PNG name (in ``rep``)."""
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
        runs: dict[str, Sequence[dict[str, Any]]] = {
            n: mean_records(list(records[n].values())) for n in names if n in records
        }
        png = f"fig{fig_name.split()[-1]}.png" if fig_name.startswith("fig.") else f"{fig_name}.png"
        shown = sorted({s for n in runs for s in records[n]})
        title = f"hh-mini, paper {fig_name} variants (mean over seeds {', '.join(map(str, shown))})"
        plot_training_curves(runs, rep / png, title=title)
        pngs[fig_name] = png
    return pngs


def plot_variants_vs_sft(
    nums: dict[str, dict[int, dict[str, Any]]],
    variants: Sequence[Any],
    ran: dict[str, list[int]],
    path: str | os.PathLike[str],
) -> Path:
    """Each variant's win/tie/lose against SFT by the gold judge, summed over its seeds (fig. 10's bars)."""
    rows = []
    for v in variants:
        w = [sum(nums[v.name][s]["win_tie_lose"][i] for s in ran[v.name]) for i in range(3)]
        n = sum(w)
        if n:
            rows.append((v.name, {"win_rate": w[0] / n, "tie_rate": w[1] / n, "lose_rate": w[2] / n}))
    return plot_win_tie_lose(rows, path, "Each variant vs SFT by the gold judge (all seeds)")


def plot_alignment_tax(
    nums: dict[str, dict[int, dict[str, Any]]],
    variants: Sequence[Any],
    ran: dict[str, list[int]],
    path: str | os.PathLike[str],
) -> Path:
    """Fig. 12 (:func:`plot_heldout`) for SFT and the variants it compares: ppo_max, ppo_ptx, vanilla."""
    sft_loss = {s: r["heldout_loss_sft"] for runs in nums.values() for s, r in runs.items()}
    rows = [("sft", [sft_loss[s] for s in sorted(sft_loss)])]
    rows += [
        (v.name, [nums[v.name][s]["heldout_loss"] for s in ran[v.name]])
        for v in variants
        if v.name in ("ppo_max", "ppo_ptx", "vanilla") and ran[v.name]
    ]
    return plot_heldout(rows, path)
