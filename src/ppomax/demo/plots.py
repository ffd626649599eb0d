"""The figures the demo's report and the ablation's share (matplotlib, Agg): the paper's fig. 4 panels over
training for every run (:func:`plot_training_curves`), win/tie/lose bars against SFT (fig. 10) and the reward
model's margins (fig. 2)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ppomax.demo.outcome import PANELS, first_collapse_step, moving_average, series

COLOURS = {"vanilla": "#d62728", "ppo_max": "#1f77b4", "sft": "#7f7f7f"}
# other runs (`ppomax ablate`'s variants), in order: matplotlib's tab10 without the colours above
OTHER_COLOURS = ("#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf", "#000000")


def run_colours(names: Sequence[str]) -> dict[str, str]:
    """A colour per run: the fixed ones of :data:`COLOURS`, the others from :data:`OTHER_COLOURS` in order."""
    others = iter(OTHER_COLOURS * (1 + len(names) // len(OTHER_COLOURS)))
    return {n: COLOURS[n] if n in COLOURS else next(others) for n in names}


WTL_COLOURS = ("#2ca02c", "#c7c7c7", "#d62728")


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display), imported on first use."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_training_curves(
    runs: dict[str, Sequence[dict[str, Any]]],
    path: str | os.PathLike[str],
    title: str = "PPO training dynamics on hh-mini (paper fig. 4 panels)",
) -> Path:
    """Fig. 4 panels for every run on shared axes (one PNG, 2x3 grid; the sixth cell holds the legend)."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.2))
    flat = axes.ravel()
    colours = run_colours(list(runs))
    for ax, (panel, keys) in zip(flat, PANELS, strict=False):
        used = None
        for name, recs in runs.items():
            key, steps, vals = series(recs, keys)
            if not vals:
                continue
            used = key
            colour = colours[name]
            fired = first_collapse_step(recs)
            if fired is not None:
                ax.axvline(fired, color=colour, linestyle=":", linewidth=1.5)
            w = max(1, len(vals) // 12)
            ax.plot(steps, vals, color=colour, alpha=0.25, linewidth=1)
            ax.plot(steps, moving_average(vals, w), color=colour, linewidth=2.2, label=name)
        ax.set_title(panel if used else f"{panel}\n(not logged)", fontsize=11)
        ax.set_xlabel("PPO step")
        ax.grid(alpha=0.3)
    leg_ax = flat[-1]
    leg_ax.axis("off")
    handles = [plt.Line2D([0], [0], color=colours[n], linewidth=3) for n in runs]
    leg_ax.legend(handles, list(runs), loc="center", fontsize=13, frameon=False, title="PPO run")
    leg_ax.text(
        0.5,
        0.12,
        "faint: per step   bold: moving average\ndotted: the collapse monitor fires (paper 5.2)\n"
        "the gold reward is logged, never optimised",
        ha="center",
        va="center",
        fontsize=10,
        transform=leg_ax.transAxes,
    )
    fig.suptitle(title, fontsize=14)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    out = Path(path)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def plot_win_tie_lose(
    rows: Sequence[tuple[str, dict[str, Any]]], path: str | os.PathLike[str], title: str
) -> Path:
    """Horizontal stacked win/tie/lose bars (paper fig. 10). ``rows``: (label, wtl dict with *_rate keys)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(10, 0.55 * len(rows) + 1.6))
    labels = [r[0] for r in rows][::-1]
    data = [r[1] for r in rows][::-1]
    left = [0.0] * len(rows)
    for key, colour, name in zip(
        ("win_rate", "tie_rate", "lose_rate"), WTL_COLOURS, ("win", "tie", "lose"), strict=True
    ):
        vals = [d[key] * 100 for d in data]
        bars = ax.barh(labels, vals, left=left, color=colour, edgecolor="white", label=name)
        for b, v in zip(bars, vals, strict=True):
            if v >= 6:
                ax.text(
                    b.get_x() + b.get_width() / 2,
                    b.get_y() + b.get_height() / 2,
                    f"{v:.0f}%",
                    ha="center",
                    va="center",
                    fontsize=10,
                )
        left = [a + v for a, v in zip(left, vals, strict=True)]
    ax.set_xlim(0, 100)
    ax.set_xlabel("% of held-out prompts")
    ax.set_title(title)
    ax.legend(
        ncol=3,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.5 / (0.55 * len(rows) + 1.6) - 0.12),
        frameon=False,
    )
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def plot_rm_margins(
    margins: Sequence[float], gold_agrees: Sequence[bool], path: str | os.PathLike[str], title: str
) -> Path:
    """Histogram of r(chosen) - r(rejected) (paper fig. 2), split by whether gold agrees with the label."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.2))
    agree = [m for m, g in zip(margins, gold_agrees, strict=True) if g]
    disagree = [m for m, g in zip(margins, gold_agrees, strict=True) if not g]
    lo, hi = (min(margins), max(margins)) if margins else (-1.0, 1.0)
    bins = [lo + (hi - lo) * i / 30 for i in range(31)] if hi > lo else 10
    ax.hist(
        [agree, disagree],
        bins=bins,
        stacked=True,
        color=["#1f77b4", "#ff7f0e"],
        label=["gold agrees with the annotators' choice", "gold disagrees (noise / length bias)"],
    )
    ax.axvline(0, color="black", linewidth=1)
    ax.set_xlabel("r(chosen) - r(rejected)")
    ax.set_ylabel("pairs")
    ax.set_title(title)
    ax.legend(fontsize=9)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
