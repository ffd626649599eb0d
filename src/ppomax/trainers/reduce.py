"""Logged metrics: per-rank tensors to global floats, each reduced across ranks by what it is."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Literal

import torch
from torch import Tensor

Op = Literal["mean", "max", "min", "sum"]
Reduce = Callable[[Tensor, Op], Tensor]
"""``reduce(tensor, op)`` combines a tensor over ranks with ``op`` (e.g. ``accelerator.reduce``); it is never
asked for "min" (accelerate has none: :func:`reduce_metrics` takes the max of the negated values)."""


def reduction_of(name: str, sums: Collection[str] = ()) -> Op:
    """How a metric combines over ranks: ``*_max`` the max, ``*_min`` the min, ``*_count`` (and ``sums``) the
    sum, else the mean (per-rank means of equal-sized shards; global statistics are equal on every rank, so their
    mean is them)."""
    if name.endswith("_max"):
        return "max"
    if name.endswith("_min"):
        return "min"
    if name.endswith("_count") or name in sums:
        return "sum"
    return "mean"


def reduce_metrics(
    metrics: Mapping[str, Tensor | float],
    reduce: Reduce | None,
    device: torch.device | str = "cpu",
    sums: Collection[str] = (),
) -> dict[str, float]:
    """Scalar metrics -> floats in one host transfer; with ``reduce`` (several ranks), one collective per kind
    of reduction (:func:`reduction_of`). Every rank must pass the same keys."""
    groups: dict[Op, list[str]] = {}
    for k in metrics:
        groups.setdefault(reduction_of(k, sums), []).append(k)
    names, parts = [], []
    for op, keys in sorted(groups.items()):
        stacked = torch.stack([torch.as_tensor(metrics[k], dtype=torch.float32).to(device) for k in keys])
        if reduce is None:
            parts.append(stacked)
        else:
            parts.append(-reduce(-stacked, "max") if op == "min" else reduce(stacked, op))
        names += keys
    if not names:
        return {}
    out = dict(zip(names, torch.cat(parts).cpu().tolist(), strict=True))
    return {k: out[k] for k in metrics}
