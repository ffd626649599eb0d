"""Experiment trackers (``logging.report_to``) through accelerate: its tracker classes, ``Accelerator(log_with=...)``,
``init_trackers`` and ``accelerator.log``.

Every metrics record the run writes to ``metrics.jsonl`` (:class:`ppomax.monitor.MetricsLogger`) also goes to each
tracker, as numbers at the record's step; the resolved config goes to each as its hyperparameters (flattened to
dotted keys); PPO's evaluation samples go as a table to the trackers that have tables (wandb, MLflow). TensorBoard is
accelerate's ``TensorBoardTracker`` writing into ``out_dir/tb``; a resumed run opens it with ``purge_step`` (the
checkpoint's step + 1), so TensorBoard shows each step once. In the other trackers a resumed run is a new run that
starts at the checkpoint's step. Only the main process writes; the trackers' own settings (wandb's ``WANDB_MODE``,
``WANDB_DIR``, MLflow's ``MLFLOW_TRACKING_URI``...) are read from the environment, as their own libraries read them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from accelerate import Accelerator
from accelerate.tracking import TensorBoardTracker

from ppomax.errors import ConfigError

if TYPE_CHECKING:
    from ppomax.config import LoggingConfig, RunConfig

#: the package to install for each tracker, and the accelerate function telling whether it is there
_PACKAGES = {
    "wandb": "wandb",
    "trackio": "trackio",
    "mlflow": "mlflow",
    "comet_ml": "comet_ml",
    "aim": "aim",
    "clearml": "clearml",
    "dvclive": "dvclive",
    "swanlab": "swanlab",
}
TENSORBOARD_DIR = "tb"


def log_with(logging_cfg: LoggingConfig, out_dir: Path) -> list[TensorBoardTracker | str]:
    """``Accelerator(log_with=...)`` for ``logging.report_to``: TensorBoard as a tracker writing into
    ``out_dir/tb``, the others by name. A tracker whose package is missing is an error here, before any model
    loads (accelerate itself would leave it out with a debug message)."""
    import accelerate.utils as available

    out: list[TensorBoardTracker | str] = []
    for name in logging_cfg.report_to:
        if name == "tensorboard":
            out.append(TensorBoardTracker(TENSORBOARD_DIR, out_dir))
            continue
        if not getattr(available, f"is_{name}_available")():
            raise ConfigError(
                f"logging.report_to: {name} is not installed (pip install {_PACKAGES[name]}), or remove it"
            )
        out.append(name)
    return out


def hyperparameters(cfg: RunConfig) -> dict[str, Any]:
    """The resolved config as one level of dotted keys; lists and mappings as JSON text (TensorBoard's and
    MLflow's parameters are scalars)."""
    flat: dict[str, Any] = {}

    def walk(data: dict[str, Any], prefix: str) -> None:
        for key, value in data.items():
            if isinstance(value, dict) and value:
                walk(value, f"{prefix}{key}.")
            elif isinstance(value, list | dict):
                flat[f"{prefix}{key}"] = json.dumps(value)
            else:
                flat[f"{prefix}{key}"] = value

    walk(cfg.model_dump(mode="json"), "")
    return flat


def start(acc: Accelerator, cfg: RunConfig, resume_step: int | None) -> None:
    """Start the run in every tracker, with the config as its hyperparameters. ``resume_step``: the run continues
    from a checkpoint at that step (TensorBoard drops its later events)."""
    if not acc.log_with:
        return
    if resume_step is not None:
        for tracker in acc.log_with:
            if isinstance(tracker, TensorBoardTracker):
                tracker.init_kwargs["purge_step"] = resume_step + 1
    log = cfg.logging
    name = log.run_name or Path(log.out_dir).resolve().name
    acc.init_trackers(
        log.project,
        config=hyperparameters(cfg),
        init_kwargs={"wandb": {"name": name}, "trackio": {"name": name}, "mlflow": {"run_name": name}},
    )


def log_table(acc: Accelerator, name: str, rows: list[dict[str, Any]], step: int) -> None:
    """``rows`` (dicts) as a table ``name`` at ``step`` in the trackers that have tables: a ``wandb.Table``, an
    MLflow table artifact ``NAME/step-N.json``. Main process."""
    if not rows or not acc.is_main_process:
        return
    columns = list(dict.fromkeys(k for row in rows for k in row))
    for tracker in acc.trackers:
        if tracker.name == "wandb":
            data = [[row.get(c) for c in columns] for row in rows]
            tracker.log_table(name, columns=columns, data=data, step=step)
        elif tracker.name == "mlflow":
            import mlflow

            table = {c: [row.get(c) for row in rows] for c in columns}
            run_id = tracker.active_run.info.run_id
            mlflow.log_table(data=table, artifact_file=f"{name}/step-{step}.json", run_id=run_id)


def finish(acc: Accelerator) -> None:
    """End the run in every tracker (not ``accelerator.end_training``: that also ends the process group, which
    the trainer may still need, e.g. for the demo's next stage)."""
    for tracker in acc.trackers:
        tracker.finish()
    acc.trackers.clear()
