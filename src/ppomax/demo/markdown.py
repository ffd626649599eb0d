"""What the demo's report and the ablation's write into their Markdown tables: a number, a percentage, a text."""

from __future__ import annotations

from collections.abc import Sequence
from statistics import fmean
from typing import Any

from ppomax.demo.outcome import finite


def fmt_num(x: Any, fmt: str = ".3f") -> str:
    """``x`` formatted with ``fmt``, or ``n/a`` when it is no finite number."""
    v = finite(x)
    return "n/a" if v is None else format(v, fmt)


def fmt_pct(x: Any) -> str:
    """A rate as a whole percentage, or ``n/a``."""
    v = finite(x)
    return "n/a" if v is None else f"{100 * v:.0f}%"


def md_cell(s: str, limit: int = 220) -> str:
    """A text as one table cell: on one line, cut at ``limit`` characters, its pipes escaped."""
    s = " ".join(s.split())
    s = s if len(s) <= limit else s[: limit - 1] + "…"
    return s.replace("|", "\\|") or "*(empty)*"


def fmt_list(xs: Sequence[Any], fmt: str = ".3f") -> str:
    """Per-seed values joined by ``/`` (a bool as itself)."""
    return "/".join(fmt_num(x, fmt) if not isinstance(x, bool) else str(x) for x in xs)


def fmt_spread(xs: Sequence[Any], fmt: str = ".3f") -> str:
    """``mean [min, max]`` of the finite values over seeds (one value: itself; none: ``n/a``)."""
    vals = [float(x) for x in xs if finite(x) is not None]
    if not vals:
        return "n/a"
    mean = fmean(vals)
    if len(vals) == 1:
        return format(mean, fmt)
    return f"{format(mean, fmt)} [{format(min(vals), fmt)}, {format(max(vals), fmt)}]"
