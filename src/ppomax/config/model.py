"""``model``: where the models come from (SFT/RM's one, PPO's four) and their LoRA adapters."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from ppomax.config.section import KeyConflicts, Retired, Section


class LoraSettings(Section):
    """LoRA adapters through PEFT (``model.lora``; null = train every weight). The base weights stay frozen; the
    value head of an RM or critic is always fully trained. Under PPO the reference is the policy's base with its
    adapters disabled (no second copy) unless ``model.reference`` names another model."""

    r: int = Field(8, gt=0, description="Rank of the adapter matrices.")
    alpha: float = Field(16.0, gt=0, description="Scaling numerator: the update is (alpha / r) * B A.")
    dropout: float = Field(
        0.0, ge=0, lt=1, description="Dropout on the adapter's input (SFT/RM; PPO turns every dropout off)."
    )
    target_modules: list[str] | str = Field(
        "all-linear",
        description="Module names to adapt (name suffixes, e.g. [q_proj, v_proj]), or all-linear: every linear "
        "layer except the LM head.",
    )
    save_merged: bool = Field(
        False,
        description="Also save the merged weights (base + adapters) as a plain model under <model dir>/merged.",
    )

    @field_validator("target_modules")
    @classmethod
    def _names(cls, v: list[str] | str) -> list[str] | str:
        if v == "all-linear" or (isinstance(v, list) and v and all(n.strip() for n in v)):
            return v
        raise ValueError("a non-empty list of module names, or all-linear")


class PPOLoraSettings(LoraSettings):
    """PPO's LoRA settings: :class:`LoraSettings` plus whether the critic gets adapters too."""

    critic: bool = Field(
        True,
        description="Adapters on the critic's backbone too (false: the whole critic is trained).",
    )


class ModelConfig(Section):
    """Where the model comes from (SFT, RM). A model path is a local directory written by ``save_pretrained`` or a
    Hub id ``org/name`` (a revision as ``org/name@rev``), downloaded into the Hugging Face cache when missing unless
    ``HF_HUB_OFFLINE`` is set."""

    _retired: ClassVar[Retired] = {
        k: (None, "used by train-ppo only")  # the PPO-only keys an earlier SFT/RM config.yaml held
        for k in ("reference", "reward", "critic")
    }

    policy: str | None = Field(
        None, description="The model to train: a base model (SFT) or an SFT model (RM)."
    )
    tokenizer: str | None = Field(
        None, description="Tokenizer directory or Hub id; null = the policy's (its directory or Hub id)."
    )
    trust_remote_code: bool = Field(
        False, description="Run the Python files shipped in a model directory (as transformers does)."
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32",
        description="Compute dtype. bfloat16/float16: mixed precision (trained models keep float32 master weights "
        "and optimiser states and run under autocast, or the engine's bf16/fp16 mode); frozen models (reference, "
        "reward) are stored in it.",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute activations in the backward pass: less memory, about a third more compute.",
    )
    lora: LoraSettings | None = Field(None, description="LoRA adapters (see LoraSettings); null = off.")

    @model_validator(mode="before")
    @classmethod
    def _lora_critic_is_ppos(cls, data: Any) -> Any:
        """``model.lora.critic`` (PPO's) in an earlier SFT/RM config.yaml: its default dropped, else an error."""
        lora = data.get("lora") if isinstance(data, dict) else None
        if cls is ModelConfig and isinstance(lora, dict) and "critic" in lora:
            if lora["critic"] is not True:
                raise KeyConflicts(
                    [(("lora.critic",), f"used by train-ppo only; remove it (got {lora['critic']!r})")]
                )
            data = {**data, "lora": {k: v for k, v in lora.items() if k != "critic"}}
        return data


class PPOModelConfig(ModelConfig):
    """PPO's four models. Paths are local directories or Hub ids ``org/name[@rev]`` (see ModelConfig)."""

    _retired: ClassVar[Retired] = {}

    policy: str | None = Field(None, description="The SFT model the policy starts from.")
    reference: str | None = Field(
        None, description="Frozen reference policy; null = same weights as `policy`."
    )
    reward: str | None = Field(
        None,
        description="Reward model: a *ForSequenceClassification checkpoint with one label (ppomax train-rm's, "
        "TRL's, a Hub reward model sharing the policy's tokenizer).",
    )
    critic: str | None = Field(
        None, description="Explicit critic checkpoint; null = chosen by `ppo.critic_init` from reward/policy."
    )
    lora: PPOLoraSettings | None = Field(None, description="LoRA adapters (see PPOLoraSettings); null = off.")
