"""The PPO update schedule both sides of bench/trl_compare.py run, how each side's config expresses it, and the
optimiser steps each must then take. Pure Python (no torch, no TRL, no ppomax at import time): it runs in both
sides' processes and in the tests.

A schedule is five numbers: ``rollout`` responses per iteration (ppomax ``ppo.buffer_size``, TRL's
``batch_size``), ``minibatch`` responses per optimiser step (ppomax ``ppo.minibatch_size``), ``epochs`` passes
over the rollout (``ppo.ppo_epochs``, TRL ``num_ppo_epochs``), ``micro_batch`` rows per forward/backward
(``ppo.micro_batch_size``, TRL ``per_device_train_batch_size``) and ``gen_batch`` rows per ``generate()`` and
scoring call (``ppo.rollout_batch_size``, TRL ``local_rollout_forward_batch_size``).

TRL's PPOTrainer (``trl.experimental.ppo``, 1.x) takes ``per_device_train_batch_size x
gradient_accumulation_steps`` rollouts per iteration (one process), cuts each epoch's shuffle into
``num_mini_batches`` minibatches and those into micro-batches of ``per_device_train_batch_size`` rows, each under
accelerate's ``accumulate()``: its optimiser steps once every ``gradient_accumulation_steps`` micro-batches, not
once per minibatch (huggingface/trl#5645), and at every micro-batch of the iteration that takes the dataset's last
batch (accelerate syncs at the end of a dataloader). So a minibatch smaller than the rollout is expressible only
with ``gradient_accumulation_steps`` 1 and ``per_device_train_batch_size`` = the rollout (each minibatch is then
one micro-batch, stepped alone), and micro-batches smaller than a minibatch only with one minibatch per epoch.
:func:`trl_fields` maps a schedule onto those fields or says why it cannot; :func:`trl_steps` replays TRL's loops
to give the optimiser steps its fields make, which the bench checks against what each side measured.
"""

from __future__ import annotations

import dataclasses
from typing import Any

# TRL 1.x PPOConfig's defaults (TrainingArguments' for the batch and accumulation); the TRL side checks them
# against the installed PPOConfig, so a TRL that changes them fails loudly rather than report stale "defaults".
TRL_DEFAULTS = {
    "per_device_train_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "num_mini_batches": 1,
    "num_ppo_epochs": 4,
    "local_rollout_forward_batch_size": 64,
}

SETTINGS = ("ppo_max_defaults", "trl_defaults", "one_epoch")


class ScheduleError(ValueError):
    """A schedule that is inconsistent, or that one side cannot run (the message says which and why)."""


@dataclasses.dataclass(frozen=True)
class Schedule:
    rollout: int
    minibatch: int
    epochs: int
    micro_batch: int
    gen_batch: int

    def __post_init__(self) -> None:
        for name, value in dataclasses.asdict(self).items():
            if value < 1:
                raise ScheduleError(f"--{name.replace('_', '-')} must be at least 1 (got {value})")
        if self.rollout % self.minibatch:
            raise ScheduleError(
                f"the rollout ({self.rollout}) must be a multiple of the minibatch ({self.minibatch})"
            )
        if self.minibatch % self.micro_batch:
            raise ScheduleError(
                f"the minibatch ({self.minibatch}) must be a multiple of the micro-batch ({self.micro_batch})"
            )
        if self.rollout % self.gen_batch:  # ppomax: buffer_size a multiple of rollout_batch_size
            raise ScheduleError(
                f"the rollout ({self.rollout}) must be a multiple of the generation batch ({self.gen_batch})"
            )

    def label(self) -> str:
        return (
            f"{self.rollout} rollouts, {self.rollout // self.minibatch} x {self.minibatch}, "
            f"{self.epochs} epoch{'s' if self.epochs > 1 else ''}, micro {self.micro_batch}, gen {self.gen_batch}"
        )

    def steps(self) -> list[int]:
        """Rows of each optimiser step of one iteration: one step per minibatch per epoch."""
        return [self.minibatch] * (self.epochs * (self.rollout // self.minibatch))

    def ppomax_overrides(self) -> list[str]:
        """ppomax's ``--set`` overrides for this schedule (``micro_batch_size`` null: the whole minibatch)."""
        micro = "null" if self.micro_batch == self.minibatch else str(self.micro_batch)
        return [
            f"ppo.buffer_size={self.rollout}",
            f"ppo.minibatch_size={self.minibatch}",
            f"ppo.ppo_epochs={self.epochs}",
            f"ppo.micro_batch_size={micro}",
            f"ppo.rollout_batch_size={self.gen_batch}",
        ]


def setting(name: str, ppo: Any | None = None, **overrides: int | None) -> Schedule:
    """The named schedule, with any of ``overrides`` (Schedule's fields; None = keep) on top. A field the
    setting ties to the rollout (or the micro-batch to the minibatch) follows an override of it unless given
    too: ``one_epoch`` with ``rollout=64`` is one minibatch of 64; the default generation batch is capped at the
    rollout.

    ``ppo_max_defaults``: ppomax's ``ppo_max`` preset's buffer, minibatch, epochs, micro-batch (null: the
    minibatch) and rollout batch, read from ``ppo`` (its resolved ``PPOSettings``). ``trl_defaults``: TRL's
    PPOConfig defaults (:data:`TRL_DEFAULTS`: one minibatch of 8, 4 epochs; its generation batch 64, capped at the
    rollout). ``one_epoch``: one minibatch of 32 = the rollout, one epoch, in one micro-batch and one generation
    batch (the case where ppomax's update gives the scoring pass's policy and critic forwards)."""
    if name == "ppo_max_defaults":
        if ppo is None:
            raise ScheduleError("ppo_max_defaults needs ppomax's resolved ppo settings")
        base = {
            "rollout": ppo.buffer_size,
            "minibatch": ppo.minibatch_size,
            "epochs": ppo.ppo_epochs,
            "micro_batch": ppo.micro_batch_size or ppo.minibatch_size,
            "gen_batch": ppo.rollout_batch_size,
        }
    elif name == "trl_defaults":
        d = TRL_DEFAULTS
        rollout = d["per_device_train_batch_size"] * d["gradient_accumulation_steps"]
        base = {
            "rollout": rollout,
            "minibatch": rollout // d["num_mini_batches"],
            "epochs": d["num_ppo_epochs"],
            "micro_batch": d["per_device_train_batch_size"],
            "gen_batch": d["local_rollout_forward_batch_size"],
        }
    elif name == "one_epoch":
        base = {"rollout": 32, "minibatch": 32, "epochs": 1, "micro_batch": 32, "gen_batch": 32}
    else:
        raise ScheduleError(f"unknown setting {name!r}; one of {', '.join(SETTINGS)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(given) - set(base)
    if unknown:
        raise ScheduleError(f"unknown schedule fields {sorted(unknown)}")
    merged = {**base, **given}
    # A rollout given alone resizes the setting's proportions where they were "the whole rollout".
    if "rollout" in given:
        for key in ("minibatch", "micro_batch", "gen_batch"):
            if key not in given and base[key] == base["rollout"]:
                merged[key] = given["rollout"]
    if "minibatch" in given and "micro_batch" not in given and base["micro_batch"] == base["minibatch"]:
        merged["micro_batch"] = merged["minibatch"]
    if "gen_batch" not in given:
        merged["gen_batch"] = min(merged["gen_batch"], merged["rollout"])
    return Schedule(**merged)


def trl_fields(s: Schedule) -> dict[str, int]:
    """TRL PPOConfig fields that run ``s`` on one process (module docstring), or :class:`ScheduleError`."""
    if s.minibatch == s.rollout:
        per_device, accumulation, minibatches = s.micro_batch, s.rollout // s.micro_batch, 1
    elif s.micro_batch == s.minibatch:
        per_device, accumulation, minibatches = s.rollout, 1, s.rollout // s.minibatch
    else:
        raise ScheduleError(
            f"TRL's PPOTrainer cannot run {s.label()}: it steps its optimiser every gradient_accumulation_steps "
            "micro-batches, so several minibatches per epoch need micro-batch = minibatch (set --micro-batch "
            f"{s.minibatch}), and micro-batches need one minibatch per epoch (set --minibatch {s.rollout})"
        )
    return {
        "per_device_train_batch_size": per_device,
        "gradient_accumulation_steps": accumulation,
        "num_mini_batches": minibatches,
        "num_ppo_epochs": s.epochs,
        "local_rollout_forward_batch_size": s.gen_batch,
    }


def trl_steps(fields: dict[str, int], iterations: int, dataset_rows: int) -> list[list[int]]:
    """Rows of each optimiser step TRL's PPOTrainer takes in each of ``iterations`` iterations with PPOConfig
    ``fields`` on one process over a dataset of ``dataset_rows`` prompts: its loops (``train``'s epochs,
    minibatches and micro-batches) with accelerate's gradient-accumulation counter (``Accelerator._do_sync``:
    it runs on over iterations, and syncs, resetting, at every micro-batch while the dataloader is at its last
    batch; the dataloader drops a ragged last batch)."""
    per_device = fields["per_device_train_batch_size"]
    accumulation = fields["gradient_accumulation_steps"]
    batch = per_device * accumulation
    if batch % fields["num_mini_batches"]:
        raise ScheduleError(f"TRL: batch_size {batch} is not a multiple of num_mini_batches")
    mini = batch // fields["num_mini_batches"]
    per_pass = dataset_rows // batch
    if per_pass < 1:
        raise ScheduleError(f"TRL: {dataset_rows} prompts make no batch of {batch}")
    counter, out = 0, []
    for it in range(iterations):
        last_batch = it % per_pass == per_pass - 1
        steps, rows = [], 0
        for _epoch in range(fields["num_ppo_epochs"]):
            for _minibatch in range(fields["num_mini_batches"]):
                for micro in range(0, mini, per_device):
                    rows += min(per_device, mini - micro)
                    if last_batch:
                        counter, sync = 0, True
                    else:
                        counter += 1
                        sync = counter % accumulation == 0
                    if sync:
                        steps.append(rows)
                        rows = 0
        out.append(steps)
    return out


def prompts_needed(s: Schedule, iterations: int) -> int:
    """Prompts for a run of ``iterations``: one rollout more than it takes, so that TRL's dataloader never
    reaches its last batch (where accelerate would step at every micro-batch, :func:`trl_steps`)."""
    return s.rollout * (iterations + 1)
