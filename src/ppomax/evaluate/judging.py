"""Win / tie / lose of the policy against the baseline by one judge's scores, overall and per subset
(:func:`win_tie_lose`).
"""

from __future__ import annotations

from collections.abc import Sequence

SUBSETS = ("helpful", "harmless")


def win_tie_lose(
    scores_a: Sequence[float],
    scores_b: Sequence[float],
    subsets: Sequence[str] | None = None,
    tie_margin: float = 0.05,
) -> dict[str, dict[str, float]]:
    """Win/tie/lose of A against B: A wins when ``a > b + tie_margin``, loses when ``a < b - tie_margin``.

    Returns ``{"overall": {...}, "helpful": {...}, "harmless": {...}}`` (a subset key only when it occurs,
    ``overall`` always), each with counts ``n, win, tie, lose``, rates ``win_rate, tie_rate, lose_rate`` and
    the mean scores ``mean_a, mean_b``.
    """
    if len(scores_a) != len(scores_b):
        raise ValueError(f"scores_a has {len(scores_a)} entries, scores_b {len(scores_b)}")
    if subsets is not None and len(subsets) != len(scores_a):
        raise ValueError(f"subsets has {len(subsets)} entries for {len(scores_a)} scores")
    groups: dict[str, list[int]] = {"overall": list(range(len(scores_a)))}
    for i, s in enumerate(subsets or []):
        groups.setdefault(str(s), []).append(i)
    out: dict[str, dict[str, float]] = {}
    for name, idx in groups.items():
        win = sum(1 for i in idx if scores_a[i] > scores_b[i] + tie_margin)
        lose = sum(1 for i in idx if scores_a[i] < scores_b[i] - tie_margin)
        n = len(idx)
        out[name] = {
            "n": n,
            "win": win,
            "tie": n - win - lose,
            "lose": lose,
            "win_rate": win / n if n else 0.0,
            "tie_rate": (n - win - lose) / n if n else 0.0,
            "lose_rate": lose / n if n else 0.0,
            "mean_a": sum(scores_a[i] for i in idx) / n if n else 0.0,
            "mean_b": sum(scores_b[i] for i in idx) / n if n else 0.0,
        }
    return out
