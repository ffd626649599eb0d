"""``reward``: the reward sources PPO sums (the reward model's score and programmatic functions)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from ppomax.config.section import Section


class RewardFunctionConfig(Section):
    """A programmatic reward `module:function(prompts, responses, **kwargs) -> scores`."""

    function: str = Field(
        description="'package.module:function', called with (prompts, responses, **kwargs)."
    )
    name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_-]+$",
        description="Logged as `reward/<name>_mean`; null = the function's own name (the part after the colon).",
    )
    weight: float = Field(1.0, description="Its weight in the summed reward.")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra keyword arguments of every call.")

    @field_validator("function")
    @classmethod
    def _module_colon_function(cls, v: str) -> str:
        if v.count(":") != 1 or not all(v.split(":")):
            raise ValueError("must look like 'package.module:function'")
        return v


class RewardConfig(Section):
    """Reward sources summed with weights: the reward model (`model.reward`) and programmatic functions."""

    model_weight: float = Field(1.0, description="Weight of model.reward's score in the summed reward.")
    functions: list[RewardFunctionConfig] = Field(
        default_factory=list,
        description="Programmatic rewards, each {function: 'module:fn', name, weight, kwargs}; summed with "
        "model_weight x the reward model's score.",
    )
