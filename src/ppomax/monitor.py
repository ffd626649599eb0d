"""Run metrics: one JSON line per step in ``metrics.jsonl``, the same numbers to the experiment trackers.

Every trainer logs through :class:`MetricsLogger`, so every run directory has the same layout: ``config.yaml``
(resolved), ``metrics.jsonl``, ``tb/`` (TensorBoard events, with ``logging.report_to: [tensorboard]``; the
trackers are :mod:`ppomax.trainers.trackers`).
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ppomax.errors import UserError


def to_scalar(value: Any) -> float | int | str | None:
    """A JSON-friendly scalar from a python number or a 0-d tensor (non-finite floats kept as strings)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().float().item()
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        f = float(value)
        return f if math.isfinite(f) else str(f)
    if value is None or isinstance(value, str):
        return value
    raise TypeError(f"metric value of type {type(value).__name__} is not a scalar")


class MetricsLogger:
    """Appends step metrics to ``out_dir/metrics.jsonl`` and passes their numbers to ``sink(values, step)`` (the
    experiment trackers: ``accelerator.log``).

    Only the main process writes (pass ``enabled=False`` on other ranks). ``resume_step``: the run continues
    from a checkpoint at that step, so the JSONL lines after it are dropped (the trackers drop theirs themselves,
    :func:`ppomax.trainers.trackers.start`): a resumed run's log reads as one run, each step once.
    ``resume_records``: the number of records the log held when that checkpoint was saved (:attr:`records`), which
    then decides instead of the step: records of the checkpoint's own step logged after it (a final evaluation) go
    too, and are logged again by the resumed run. ``table_sink(name, rows, step)``: where :meth:`log_table` sends a
    table (the trackers that have tables). :attr:`latest` holds the newest value of every metric logged.
    """

    def __init__(
        self,
        out_dir: str | Path,
        enabled: bool = True,
        resume_step: int | None = None,
        resume_records: int | None = None,
        sink: Callable[[dict[str, Any], int], None] | None = None,
        table_sink: Callable[[str, list[dict[str, Any]], int], None] | None = None,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self.path = self.out_dir / "metrics.jsonl"
        self.sink = sink
        self.table_sink = table_sink
        self.records = 0
        """Records in the log (main process)."""
        self.latest: dict[str, Any] = {}
        """The newest value of every metric in the log (its records kept on resume included; main process)."""
        if enabled:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if resume_step is not None:
                self._truncate_after(resume_step, resume_records)

    def _truncate_after(self, step: int, records: int | None = None) -> None:
        """Keep the first ``records`` logged lines, or (None) those whose step is at most ``step``."""
        if not self.path.exists():
            return
        lines = [line for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]
        kept = (
            lines[:records]
            if records is not None
            else [ln for ln in lines if json.loads(ln).get("step", 0) <= step]
        )
        self.path.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
        self.records = len(kept)
        for line in kept:
            self.latest.update({k: v for k, v in json.loads(line).items() if k != "step"})

    def log(self, step: int, metrics: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        """Write one record; returns it (scalars converted)."""
        record: dict[str, Any] = {"step": int(step)}
        for key, value in metrics.items():
            record[f"{prefix}{key}"] = to_scalar(value)
        if self.enabled:
            try:
                with self.path.open("a", encoding="utf-8") as fh:
                    fh.write(json.dumps(record) + "\n")
            except OSError as exc:
                raise UserError(f"{self.path}: cannot write the metrics: {exc.strerror or exc}") from None
            self.records += 1
            self.latest.update({k: v for k, v in record.items() if k != "step"})
            if self.sink is not None:
                numbers = {k: v for k, v in record.items() if k != "step" and isinstance(v, int | float)}
                self.sink(numbers, int(step))
        return record

    def log_table(self, name: str, rows: list[dict[str, Any]], step: int) -> None:
        """``rows`` as a table in the trackers that have tables (main process)."""
        if self.enabled and self.table_sink is not None:
            self.table_sink(name, rows, step)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl`` file."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]
