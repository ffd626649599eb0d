"""The reward-model evaluation report `ppomax train-rm` writes for any run: the margins r(chosen) - r(rejected)
of a held-out split, their summary (accuracy, mean, median, std) and their histogram (paper fig. 2), as
``rm_eval_<split>.json`` and ``rm_margins_<split>.png`` in the run directory. (The demo's report draws its own
figure, split by whether the gold reward agrees, in :func:`ppomax.demo.plots.plot_rm_margins`.)"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def margin_summary(margins: Sequence[float]) -> dict[str, float]:
    """Accuracy (margin > 0; ties count as wrong, as in training), mean/median/std of the margins, count."""
    n = len(margins)
    if n == 0:
        return {"pairs": 0}
    ordered = sorted(margins)
    mean = sum(ordered) / n
    mid = n // 2
    median = ordered[mid] if n % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])
    var = sum((m - mean) ** 2 for m in ordered) / n
    return {
        "pairs": n,
        "accuracy": sum(m > 0 for m in ordered) / n,
        "margin_mean": mean,
        "margin_median": median,
        "margin_std": math.sqrt(var),
    }


def plot_margin_histogram(margins: Sequence[float], path: str | Path, title: str = "") -> Path:
    """PNG histogram of preferred - dispreferred RM scores, with the zero line and the accuracy in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    summary = margin_summary(margins)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.hist(list(margins), bins=min(50, max(10, len(margins) // 10)), color="#4c72b0", edgecolor="white")
    ax.axvline(0.0, color="black", linewidth=1, linestyle="--")
    ax.set_xlabel("(preferred - dispreferred) RM score")
    ax.set_ylabel("Count")
    acc = summary.get("accuracy")
    suffix = f" (accuracy {acc:.3f}, n={summary['pairs']})" if acc is not None else ""
    ax.set_title((title or "RM score difference") + suffix, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_rm_eval(out_dir: str | Path, split: str, margins: Sequence[float], extra: dict[str, Any]) -> Path:
    """``rm_eval_<split>.json`` (summary + every margin) and ``rm_margins_<split>.png`` under ``out_dir``."""
    out = Path(out_dir)
    summary = {"split": split, **margin_summary(margins), **extra}
    plot_margin_histogram(margins, out / f"rm_margins_{split}.png", title=f"RM on {split}")
    path = out / f"rm_eval_{split}.json"
    path.write_text(json.dumps({**summary, "margins": list(margins)}, indent=1) + "\n", encoding="utf-8")
    return path
