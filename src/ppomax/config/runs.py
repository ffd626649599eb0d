"""One config per command (:class:`SFTConfig`, :class:`RMConfig`, :class:`PPOConfig`), made of the sections,
with the rules between keys of different sections and what ``train-ppo`` needs beyond a valid config.
"""

from __future__ import annotations

from typing import Literal, TypeAlias

from pydantic import Field, model_validator

from ppomax.algos.registry import ADVANTAGE_ESTIMATORS
from ppomax.config.collapse import CollapseConfig
from ppomax.config.data import DataConfig, PPODataConfig, RMDataConfig
from ppomax.config.generation import GenerationConfig
from ppomax.config.logging import LoggingConfig, PPOLoggingConfig
from ppomax.config.model import ModelConfig, PPOModelConfig
from ppomax.config.optim import AdamWConfig, OptimConfig, PPOOptimConfig
from ppomax.config.ppo import PPOSettings
from ppomax.config.reward import RewardConfig
from ppomax.config.section import KeyConflicts, Section
from ppomax.errors import ConfigError


class RunConfig(Section):
    """What every command's config has: a seed and its model, optim and logging sections."""

    seed: int = Field(42, description="Seeds data order, initialisation and sampling.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    optim: AdamWConfig = Field(default_factory=AdamWConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)


class SFTConfig(RunConfig):
    """`ppomax train-sft`: loss on response tokens only; cosine decay to 10% of peak (paper 5.1)."""

    optim: OptimConfig = Field(default_factory=OptimConfig)
    data: DataConfig = Field(default_factory=DataConfig)

    epochs: float = Field(1.0, gt=0, description="Passes over the training data (a fraction stops part-way).")
    batch_size: int = Field(8, gt=0, description="Sequences per step and process.")
    grad_accum: int = Field(1, gt=0, description="Batches accumulated into one optimiser step.")
    max_grad_norm: float | None = Field(
        1.0, gt=0, description="Global gradient-norm clip; null = no clipping."
    )
    objective: Literal["sft", "pretrain"] = Field(
        "sft",
        description="sft: loss on response / assistant tokens only; pretrain: records {'text': ...} as plain "
        "text (HH dialogues included), loss on every token, long texts split into blocks of "
        "max_prompt_tokens + max_response_tokens.",
    )
    init_from_config: bool = Field(
        False,
        description="Start from random (seeded) weights built from model.policy's config.json (pretraining "
        "from scratch); model.policy then needs only config.json and the tokenizer.",
    )
    max_nonfinite_in_row: int = Field(
        3, gt=0, description="Consecutive skipped non-finite updates that stop the run."
    )

    @model_validator(mode="after")
    def _lora_needs_weights(self) -> SFTConfig:
        if self.init_from_config and self.model.lora is not None:
            raise KeyConflicts(
                [
                    (
                        ("init_from_config", "model.lora"),
                        "adapters on random weights could not be loaded again (their base is nowhere on "
                        "disk); pretrain without model.lora, then fine-tune the result with it",
                    )
                ]
            )
        return self


class RMConfig(RunConfig):
    """`ppomax train-rm`: paper eq. 2 with the optional LM term."""

    optim: OptimConfig = Field(default_factory=OptimConfig)
    data: RMDataConfig = Field(default_factory=RMDataConfig)

    epochs: float = Field(1.0, gt=0, description="Passes over the training data (a fraction stops part-way).")
    batch_size: int = Field(8, gt=0, description="Pairs per step (ignored when max_tokens_per_batch is set).")
    max_tokens_per_batch: int | None = Field(
        None, gt=0, description="Token-balanced dynamic batches (paper 4.2); null = fixed batch_size."
    )
    grad_accum: int = Field(1, gt=0, description="Batches accumulated into one optimiser step.")
    beta_rm: float = Field(
        1.0, ge=0, description="Weight of the LM loss on the chosen response; 0 = off (eq. 2)."
    )
    rm_lambda: float = Field(1.0, gt=0, description="Weight of the pairwise ranking loss (eq. 2).")
    max_grad_norm: float | None = Field(
        1.0, gt=0, description="Global gradient-norm clip; null = no clipping."
    )
    max_nonfinite_in_row: int = Field(
        3, gt=0, description="Consecutive skipped non-finite updates that stop the run."
    )


class PPOConfig(RunConfig):
    """`ppomax train-ppo`."""

    preset: str | None = Field(
        None, description="Name of the preset this config started from (informational)."
    )
    model: PPOModelConfig = Field(default_factory=PPOModelConfig)
    data: PPODataConfig = Field(default_factory=PPODataConfig)
    optim: PPOOptimConfig = Field(default_factory=PPOOptimConfig)
    logging: PPOLoggingConfig = Field(default_factory=PPOLoggingConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    ppo: PPOSettings = Field(default_factory=PPOSettings)
    collapse: CollapseConfig = Field(default_factory=CollapseConfig)

    @model_validator(mode="after")
    def _groups_and_critic(self) -> PPOConfig:
        """Group sampling and the critic-free estimators, against the keys they constrain."""
        p, n = self.ppo, self.generation.samples_per_prompt
        spp = "generation.samples_per_prompt"
        problems: list[tuple[tuple[str, ...], str]] = []
        for size in ("rollout_batch_size", "buffer_size", "minibatch_size"):
            if getattr(p, size) % n:
                problems.append(
                    (
                        (f"ppo.{size}", spp),
                        f"{size} counts responses ({getattr(p, size)}) and must be a multiple of "
                        f"samples_per_prompt ({n}), so that every prompt's responses stay together",
                    )
                )
        est = p.advantage_estimator
        groups = ADVANTAGE_ESTIMATORS.spec(est).groups
        if groups == "required" and n < 2:
            problems.append(
                (
                    ("ppo.advantage_estimator", spp),
                    f"{est} compares the responses to one prompt and needs samples_per_prompt >= 2 (got {n})",
                )
            )
        if groups == "refused" and n > 1:
            users = [
                x for x in ADVANTAGE_ESTIMATORS.names() if ADVANTAGE_ESTIMATORS.spec(x).groups == "required"
            ]
            problems.append(
                (
                    ("ppo.advantage_estimator", spp),
                    f"{est} would take no baseline from a prompt's {n} responses (it ignores the groups); set "
                    f"samples_per_prompt: 1, or an estimator that uses them ({', '.join(users)})",
                )
            )
        if not p.uses_critic:
            no_critic = f"advantage_estimator {est} trains no critic"
            if p.critic_pretrain_steps > 0:
                problems.append(
                    (
                        ("ppo.advantage_estimator", "ppo.critic_pretrain_steps"),
                        f"{no_critic} to pre-train; set critic_pretrain_steps: 0 or advantage_estimator: gae",
                    )
                )
            if self.model.critic:
                problems.append(
                    (
                        ("ppo.advantage_estimator", "model.critic"),
                        f"{no_critic} to load; remove model.critic or set advantage_estimator: gae",
                    )
                )
            default_init = PPOSettings.model_fields["critic_init"].default
            if p.critic_init != default_init:
                problems.append(
                    (
                        ("ppo.advantage_estimator", "ppo.critic_init"),
                        f"{no_critic} to initialise; leave critic_init at {default_init} or set "
                        "advantage_estimator: gae",
                    )
                )
        if problems:
            raise KeyConflicts(problems)
        return self

    @model_validator(mode="after")
    def _lora_critic_needs_weights(self) -> PPOConfig:
        lora = self.model.lora
        if lora is not None and lora.critic and self.ppo.critic_init == "random" and not self.model.critic:
            raise KeyConflicts(
                [
                    (
                        ("model.lora.critic", "ppo.critic_init"),
                        "critic_init: random builds a randomly initialised backbone, whose adapters could not "
                        "be loaded again; set model.lora.critic: false (train the whole random critic) or "
                        "critic_init: sft / reward_model",
                    )
                ]
            )
        return self

    def check_runnable(self) -> None:
        """What `train-ppo` needs beyond a valid config; raises :class:`ConfigError` naming the keys."""
        problems = []
        if not self.model.policy:
            problems.append("model.policy: required (the SFT model directory)")
        if not self.data.prompts:
            problems.append("data.prompts: required (a prompts file)")
        if not self.model.reward and not self.reward.functions:
            problems.append("model.reward or reward.functions: at least one reward source is required")
        if (
            self.ppo.uses_critic
            and self.ppo.critic_init == "reward_model"
            and not (self.model.reward or self.model.critic)
        ):
            problems.append(
                "ppo.critic_init=reward_model needs model.reward (or set model.critic / critic_init: sft)"
            )
        if self.ppo.ptx_coef > 0 and not self.data.ptx:
            problems.append("ppo.ptx_coef > 0 needs data.ptx (SFT or pretraining examples)")
        if self.logging.eval_every > 0 and not self.data.valid_prompts:
            problems.append(
                "logging.eval_every > 0 needs data.valid_prompts (held-out prompts to evaluate on)"
            )
        if problems:
            raise ConfigError("config cannot run:\n  " + "\n  ".join(problems))


RunKind: TypeAlias = Literal["sft", "rm", "ppo"]
"""The trainers, each with its config class (:data:`CONFIG_CLASSES`)."""

CommandConfig: TypeAlias = SFTConfig | RMConfig | PPOConfig
"""The config of one trainer (what :func:`~ppomax.config.load_config` returns for a kind not known statically)."""

CONFIG_CLASSES: dict[RunKind, type[CommandConfig]] = {"sft": SFTConfig, "rm": RMConfig, "ppo": PPOConfig}
