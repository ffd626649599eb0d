"""``collapse``: the pattern-collapse monitor's action and thresholds (:mod:`ppomax.ppo.collapse`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ppomax.config.section import Section


class CollapseConfig(Section):
    """Pattern-collapse monitor (paper 5.2): length up, perplexity down and KL up together. Thresholds are ours."""

    action: Literal["off", "warn", "stop"] = Field(
        "warn",
        description="warn: log and print; stop: also end the run, keeping the checkpoints saved before it.",
    )
    window: int = Field(5, gt=0, description="Policy iterations in the baseline and in the current mean.")
    length_ratio: float = Field(1.3, gt=1, description="Response length at least this x its baseline.")
    ppl_ratio: float = Field(0.9, gt=0, lt=1, description="Policy perplexity at most this x its baseline.")
    kl_per_token: float = Field(
        0.1, ge=0, description="KL(policy||reference) per token at least this (nats)."
    )
    drift_kl_per_token: float | None = Field(
        0.05,
        gt=0,
        description="Also fire on drift: KL per token (the exact KL where logged) at least this and still rising "
        "while the reward is above its baseline (ppomax.ppo.collapse); null = the paper's joint signature only. Ours: "
        "0.05, chosen on 30 hh-mini runs (ppomax.ppo.collapse): ahead of every over-optimised run's gold fall.",
    )
