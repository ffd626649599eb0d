"""``logging``: where a run writes, how often, and which experiment trackers get its metrics."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from ppomax.config.section import KeyConflicts, Retired, Section

#: the experiment trackers of ``logging.report_to``: accelerate's (``accelerate.utils.LoggerType``, but ``all``)
Tracker = Literal[
    "tensorboard", "wandb", "trackio", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab"
]


def _tensorboard_only() -> list[Tracker]:
    return ["tensorboard"]


class LoggingConfig(Section):
    """Where a run writes and how often."""

    _retired: ClassVar[Retired] = {
        "eval_samples": (32, "used by train-ppo only"),
        "eval_greedy": (True, "used by train-ppo only"),
    }

    out_dir: str = Field(
        "runs/ppomax", description="The run directory (config.yaml, metrics, checkpoints, final/)."
    )
    log_every: int = Field(1, gt=0, description="Steps between metrics records.")
    eval_every: int = Field(
        0, ge=0, description="Steps between evaluations on held-out data; 0 = only at the end."
    )
    checkpoint_every: int = Field(0, ge=0, description="0 = only at the end (and on SIGINT/SIGTERM).")
    keep_checkpoints: int = Field(2, gt=0, description="The newest checkpoints kept.")
    report_to: list[Tracker] = Field(
        default_factory=_tensorboard_only,
        description="Experiment trackers that get the metrics too (accelerate's log_with; metrics.jsonl is always "
        "written): tensorboard (events in tb/), wandb, trackio, mlflow, comet_ml, aim, clearml, dvclive, swanlab; "
        "[] or none = none. Each but tensorboard needs its package installed.",
    )
    project: str = Field(
        "ppomax",
        min_length=1,
        description="The trackers' project (wandb/trackio project, MLflow experiment).",
    )
    run_name: str | None = Field(None, description="The run's name in the trackers; null = out_dir's name.")
    progress: bool = Field(True, description="A progress bar on the console.")

    @model_validator(mode="before")
    @classmethod
    def _tensorboard_is_report_to(cls, data: Any) -> Any:
        """``tensorboard: true/false`` (configs of earlier versions) is ``report_to`` with or without tensorboard;
        a string ``report_to`` is a list of one (``none``: no tracker), as transformers' ``report_to`` reads."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if isinstance(data.get("report_to"), str):
            data["report_to"] = [] if data["report_to"] == "none" else [data["report_to"]]
        if "tensorboard" not in data:
            return data
        tensorboard = data.pop("tensorboard")
        if not isinstance(tensorboard, bool):
            raise KeyConflicts([(("tensorboard",), f"must be true or false (got {tensorboard!r})")])
        if "report_to" not in data:
            data["report_to"] = ["tensorboard"] if tensorboard else []
        elif isinstance(data["report_to"], list) and ("tensorboard" in data["report_to"]) != tensorboard:
            raise KeyConflicts(
                [
                    (
                        ("tensorboard", "report_to"),
                        f"tensorboard: {str(tensorboard).lower()} disagrees with report_to {data['report_to']}; "
                        "set report_to only (tensorboard is its earlier spelling)",
                    )
                ]
            )
        return data

    @field_validator("report_to")
    @classmethod
    def _each_tracker_once(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"names a tracker twice: {v}")
        return v


class PPOLoggingConfig(LoggingConfig):
    """PPO's logging: :class:`LoggingConfig` plus its periodic evaluation's samples."""

    _retired: ClassVar[Retired] = {}

    eval_every: int = Field(
        0,
        ge=0,
        description="Iterations between evaluations on data.valid_prompts; 0 = no periodic evaluation.",
    )
    eval_samples: int = Field(32, gt=0, description="Held-out prompts answered at each evaluation.")
    eval_greedy: bool = Field(
        True, description="Greedy answers at evaluation (false: sampled as in rollouts)."
    )
