"""``optim``: AdamW with warmup and a schedule; SFT's and RM's one learning rate (:class:`OptimConfig`), PPO's
one per model with PPO-max's defaults (:class:`PPOOptimConfig`).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from ppomax.config.section import KeyConflicts, Retired, Section


class AdamWConfig(Section):
    """AdamW with warmup and a schedule: what SFT, RM and PPO share (:class:`OptimConfig`, :class:`PPOOptimConfig`)."""

    warmup_steps: int | None = Field(
        None,
        ge=0,
        description="Absolute warmup (optimiser steps); null = warmup_ratio. Not with warmup_ratio > 0.",
    )
    warmup_ratio: float = Field(
        0.0, ge=0, lt=1, description="Warmup as a fraction of the optimiser steps; needs warmup_steps: null."
    )
    schedule: Literal["constant", "linear", "cosine"] = Field("constant", description="Decay after warmup.")
    min_lr_ratio: float = Field(
        0.1, ge=0, le=1, description="Cosine/linear decay floor as a fraction of peak."
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW's decoupled weight decay.")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW's beta1.")
    adam_beta2: float = Field(0.95, ge=0, lt=1, description="AdamW's beta2.")
    adam_eps: float = Field(1e-8, gt=0, description="AdamW's epsilon.")

    @model_validator(mode="after")
    def _one_warmup(self) -> AdamWConfig:
        if self.warmup_steps is not None and self.warmup_ratio > 0:
            raise KeyConflicts(
                [
                    (
                        ("warmup_steps", "warmup_ratio"),
                        "two warmups: set warmup_steps (absolute) or warmup_ratio (with warmup_steps: null), not both",
                    )
                ]
            )
        return self


class OptimConfig(AdamWConfig):
    """SFT's and reward-model training's optimiser (PPO's is :class:`PPOOptimConfig`)."""

    lr: float = Field(1e-5, gt=0, description="Learning rate of SFT / reward-model training.")


class PPOOptimConfig(AdamWConfig):
    """PPO's optimiser settings, one AdamW per model (policy, critic) with its own learning rate: PPO-max's
    defaults, each naming its source. SFT and RM keep their own defaults (:class:`OptimConfig`)."""

    # `lr` (SFT/RM's) was accepted and ignored by PPO up to ppomax 0.1; saved configs hold its default
    _retired: ClassVar[Retired] = {
        "lr": (1e-5, "PPO has one learning rate per model: set optim.policy_lr and optim.critic_lr")
    }

    policy_lr: float = Field(5e-7, gt=0, description="Paper 5.1 / MOSS-RLHF code (lr 5e-7).")
    critic_lr: float = Field(
        1.5e-6, gt=0, description="MOSS-RLHF code (critic_lr 15e-7); paper 5.1 says 1.65e-6."
    )
    warmup_steps: int | None = Field(
        10,
        ge=0,
        description="Absolute warmup (optimiser steps of each model); null = warmup_ratio. Ours: 10 optimiser steps (paper 5.1 warms up over "
        "the first 10% of steps, MOSS-RLHF code 500 of 5000; paper 5.3.3 recommends critic pre-training instead).",
    )
    warmup_ratio: float = Field(
        0.0, ge=0, lt=1, description="Ours: 0 (warmup_steps is set); needs warmup_steps: null."
    )
    schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="Ours (MOSS-RLHF code decays as 1/sqrt(step) after warmup)."
    )
    min_lr_ratio: float = Field(
        0.1,
        ge=0,
        le=1,
        description="Cosine/linear decay floor as a fraction of peak. Ours (unused with constant).",
    )
    weight_decay: float = Field(0.0, ge=0, description="MOSS-RLHF code (weight_decay 0.0).")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="MOSS-RLHF code (beta1).")
    adam_beta2: float = Field(0.95, ge=0, lt=1, description="MOSS-RLHF code (beta2).")
    adam_eps: float = Field(
        1e-6, gt=0, description="MOSS-RLHF code (eps 1e-6 for the policy; its critic uses 1e-8)."
    )
