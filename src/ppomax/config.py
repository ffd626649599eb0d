"""Typed configuration for every ppomax command.

One pydantic model per command (:class:`SFTConfig`, :class:`RMConfig`, :class:`PPOConfig`), built from shared
sections. Configs come from YAML files or named presets, are overridden with ``--set a.b=value``, and are validated
once: unknown keys are errors, and every error names the dotted key and what is allowed. A validated config is
never rewritten behind the user's back; derived values (e.g. the reference model path defaulting to the policy)
are resolved by the code that needs them through explicit helper properties.

Each PPO trick has one field that can say "off" (``null`` or ``0``), never a boolean beside a number.

PPO-max is defined once, here: the defaults of the PPO sections (:class:`GenerationConfig`,
:class:`PPOOptimConfig`, :class:`PPOSettings`) are the recipe, each field's description naming its source (a paper
section, the MOSS-RLHF code, or "ours"). The preset ``ppo_max`` sets nothing and the other presets inherit it and
set only what differs, so a preset and the defaults cannot drift apart. SFT and RM keep their own optimiser
defaults (:class:`OptimConfig`).
"""

from __future__ import annotations

import copy
import json
import re
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ppomax.algos.registry import ADVANTAGE_ESTIMATORS, KL_ESTIMATORS, LOSS_AGGREGATIONS
from ppomax.config_compat import OLD_PPO_KEYS, upgrade_ppo_keys, warn_deprecated
from ppomax.errors import ConfigError

PRESET_NAMES = ("vanilla", "ppo_max", "ppo_ptx", "grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")


class KeyConflicts(ValueError):
    """Raised by a model-level check: each problem names the keys it involves (relative to the section).

    ``_format_validation_error`` prints one line per problem, ``section.key_a, section.key_b: message``, instead of
    pydantic's "Value error" with the whole section as its input."""

    def __init__(self, problems: list[tuple[tuple[str, ...], str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{', '.join(keys)}: {msg}" for keys, msg in problems))


class _Section(BaseModel):
    # allow_inf_nan=False: YAML's .inf/.nan are no setting of any float here (an infinite KL coefficient or
    # temperature "validates" against gt=0 and then wrecks training); _no_bool_for_numbers: YAML's true/false are
    # not the numbers 1/0 (pydantic's lax mode would take `iterations: true` as 1)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, allow_inf_nan=False)

    #: Keys a section does not have (its command never reads them) that configs written by earlier ppomax versions
    #: hold, each with the value those versions wrote by default: that value is dropped on load (it never had an
    #: effect), any other value is an error naming the key and the command that does read it.
    _retired: ClassVar[dict[str, tuple[Any, str]]] = {}

    @model_validator(mode="before")
    @classmethod
    def _drop_retired_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not cls._retired:
            return data
        out, problems = dict(data), []
        for key, (written_by_default, why) in cls._retired.items():
            if key in out and out.pop(key) != written_by_default:
                problems.append(((key,), f"{why}; remove it (got {data[key]!r})"))
        if problems:
            raise KeyConflicts(problems)
        return out

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, bool) and info.field_name is not None:
            types = _leaf_types(cls.model_fields[info.field_name].annotation)
            if bool not in types and types & {int, float}:
                raise ValueError(f"must be a number, not {str(value).lower()}")
        return value


def _leaf_types(annotation: Any) -> set[Any]:
    """The types a field's annotation admits (``int | None`` -> ``{int, NoneType}``)."""
    args = get_args(annotation)
    if not args or get_origin(annotation) is Literal:
        return {annotation}
    return set().union(*(_leaf_types(a) for a in args))


class LoraSettings(_Section):
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


class ModelConfig(_Section):
    """Where the model comes from (SFT, RM). A model path is a local directory written by ``save_pretrained`` or a
    Hub id ``org/name`` (a revision as ``org/name@rev``), downloaded into the Hugging Face cache when missing unless
    ``HF_HUB_OFFLINE`` is set."""

    _retired = {
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

    _retired = {}

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


class GenerationConfig(_Section):
    """Sampling settings for rollouts. Defaults are PPO-max's; each description names its source."""

    max_new_tokens: int = Field(
        128,
        gt=0,
        description="MOSS-RLHF code (maxlen_res default 128; the paper evaluates with up to 2048, 6.1).",
    )
    temperature: float = Field(0.8, gt=0, description="Paper 6.1 (its generation settings) / MOSS-RLHF code.")
    top_p: float = Field(
        0.9, gt=0, le=1, description="Paper 6.1 (nucleus sampling, p = 0.9) / MOSS-RLHF code."
    )
    top_k: int = Field(
        0, ge=0, description="0 = off. Ours: off (neither the paper nor MOSS-RLHF code uses it)."
    )
    repetition_penalty: float = Field(
        1.1,
        gt=0,
        description="1.0 = off. Paper 6.1 (beta = 1.1, on previously generated tokens) / MOSS-RLHF code.",
    )
    logprobs_from: Literal["sampling", "raw", "generate"] = Field(
        "sampling",
        description="Log-probs for the ratio and KL from temperature-scaled logits (the distribution actually "
        "sampled from) or from raw logits; generate: as sampling, the policy's taken from the sampling pass's "
        "logits (no second forward). Ours: sampling (MOSS-RLHF code uses raw logits).",
    )
    truncated_response: Literal["score", "penalty"] = Field(
        "score",
        description="A response that hits max_new_tokens without EOS: scored as is, or given `truncated_penalty`. "
        "Ours: score.",
    )
    truncated_penalty: float = Field(-1.0, description="Ours: used only with truncated_response: penalty.")
    compile: bool = Field(
        False,
        description="Sample with a static KV cache and the decoding step compiled by torch.compile (HF generate's "
        "CompileConfig; on CPU inductor, which needs a C++ compiler). Measured on CPU (BENCHMARKS.md): ~15% faster "
        "generation of a 21.5M-parameter Llama after a cold compilation of ~20 s, which only pays back after ~35 "
        "generate calls, and no gain at 4.5M. Single-process and DDP only (not with a policy sharded by ZeRO-3 or "
        "FSDP). Ours: off.",
    )
    samples_per_prompt: int = Field(
        1,
        ge=1,
        description="Responses sampled per prompt, generated and trained on together as a group (the n of GRPO and "
        "RLOO, ppo.advantage_estimator); ppo.rollout_batch_size, buffer_size and minibatch_size count responses "
        "and must be multiples of it. Ours: 1, one response per prompt as in the paper.",
    )


class _AdamWConfig(_Section):
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
    def _one_warmup(self) -> _AdamWConfig:
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


class OptimConfig(_AdamWConfig):
    """SFT's and reward-model training's optimiser (PPO's is :class:`PPOOptimConfig`)."""

    lr: float = Field(1e-5, gt=0, description="Learning rate of SFT / reward-model training.")


class PPOOptimConfig(_AdamWConfig):
    """PPO's optimiser settings, one AdamW per model (policy, critic) with its own learning rate: PPO-max's
    defaults, each naming its source. SFT and RM keep their own defaults (:class:`OptimConfig`)."""

    # `lr` (SFT/RM's) was accepted and ignored by PPO up to ppomax 0.1; saved configs hold its default
    _retired = {"lr": (1e-5, "PPO has one learning rate per model: set optim.policy_lr and optim.critic_lr")}

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


#: the experiment trackers of ``logging.report_to``: accelerate's (``accelerate.utils.LoggerType``, but ``all``)
Tracker = Literal[
    "tensorboard", "wandb", "trackio", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab"
]


class LoggingConfig(_Section):
    """Where a run writes and how often."""

    _retired = {
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
        default_factory=lambda: ["tensorboard"],
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

    _retired = {}

    eval_every: int = Field(
        0,
        ge=0,
        description="Iterations between evaluations on data.valid_prompts; 0 = no periodic evaluation.",
    )
    eval_samples: int = Field(32, gt=0, description="Held-out prompts answered at each evaluation.")
    eval_greedy: bool = Field(
        True, description="Greedy answers at evaluation (false: sampled as in rollouts)."
    )


class CollapseConfig(_Section):
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
        0.15,
        gt=0,
        description="Also fire on drift: KL per token (the exact KL where logged) at least this and still rising "
        "while the reward is above its baseline (ppomax.collapse); null = the paper's joint signature only. Ours: "
        "0.15 (measured on the demo's runs, see ppomax.collapse).",
    )


class DatasetArgs(_Section):
    """A data source given as ``datasets.load_dataset``'s own arguments (README: Data)."""

    path: str = Field(
        description="A Hub dataset id, a local directory, or a builder name (json, parquet, csv, arrow) with "
        "data_files."
    )
    name: str | None = Field(None, description="The dataset's configuration (load_dataset's `name`).")
    data_dir: str | None = Field(None, description="A directory of the dataset's repository to read.")
    data_files: str | list[str] | dict[str, str | list[str]] | None = Field(
        None, description="Data files (paths or globs), or a mapping split -> files."
    )
    split: str | None = Field(
        None,
        description="The split to read (a slice too, e.g. train[:1000]); null = train, or for a held-out set the "
        "only split of a local source.",
    )
    revision: str | None = Field(None, description="A Hub revision: a branch, tag or commit.")


def _source(value: Any) -> Any:
    """A data source: a non-empty path/glob/Hub id, a non-empty list of them, or a :class:`DatasetArgs` mapping;
    anything else is one error naming what is allowed (not pydantic's error for each member of the union)."""
    if value is None or isinstance(value, DatasetArgs):
        return value
    if isinstance(value, str):
        if not value.strip():
            raise ValueError("an empty path")
        return value
    if isinstance(value, list):
        if not value or not all(isinstance(v, str) and v.strip() for v in value):
            raise ValueError("a list source holds file paths or globs (non-empty strings)")
        return value
    if isinstance(value, dict):
        try:
            return DatasetArgs.model_validate(value)
        except ValidationError as err:
            e = err.errors()[0]
            key = ".".join(str(p) for p in e["loc"])
            what = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
            raise ValueError(f"{key}: {what} (a mapping has {', '.join(DatasetArgs.model_fields)})") from None
    raise ValueError(
        f"must be a path, a list of paths or a mapping {{{', '.join(DatasetArgs.model_fields)}}}, "
        f"not {type(value).__name__}"
    )


#: a data key's value (:mod:`ppomax.data.sources`)
DataSource = Annotated[str | list[str] | DatasetArgs | None, BeforeValidator(_source)]
_SOURCE_HELP = (
    "a file (.jsonl/.json/.gz, .parquet, .csv, .arrow), directory, glob, list of files, Hub dataset id or "
    "mapping {path, name, data_dir, data_files, split, revision} (README: Data)"
)
_HELD_OUT_HELP = "; a Hub dataset needs the mapping with its split"


class _DataCommon(_Section):
    max_prompt_tokens: int = Field(
        256, gt=0, description="Longer prompts lose their oldest turns (system and latest turn kept)."
    )
    on_bad_line: Literal["fail", "skip"] = Field(
        "fail", description="A bad record (a line of a file, a row of a dataset): stop, or skip and count."
    )
    chat_format: Literal["auto", "hh", "chat_template"] = Field(
        "auto",
        description="Prompt format: the tokenizer's chat template, HH-RLHF's Human/Assistant text, or auto (the "
        "chat template when the tokenizer has one, else hh).",
    )
    num_proc: int = Field(
        1,
        gt=0,
        description="Processes that parse and tokenise the data (1 = the training process); the data is the same "
        "for any value.",
    )


class DataConfig(_DataCommon):
    """SFT inputs (the record shapes of the README's Data section)."""

    _retired = {"test": (None, "used by train-rm only")}

    train: DataSource = Field(None, description=f"Training examples: {_SOURCE_HELP}.")
    valid: DataSource = Field(
        None,
        description=f"Validation examples, a data source{_HELD_OUT_HELP}; null = valid_fraction of train.",
    )
    valid_fraction: float = Field(0.0, ge=0, lt=1, description="Held out from `train` when `valid` is null.")
    max_response_tokens: int = Field(256, gt=0, description="Longer responses are cut from the right.")


class RMDataConfig(DataConfig):
    """Reward-model inputs: preference pairs, with a test split scored at the end."""

    _retired = {}

    train: DataSource = Field(None, description=f"Training preference pairs: {_SOURCE_HELP}.")
    valid: DataSource = Field(
        None, description=f"Validation pairs, a data source{_HELD_OUT_HELP}; null = valid_fraction of train."
    )
    test: DataSource = Field(
        None,
        description=f"Test pairs scored at the end, a data source{_HELD_OUT_HELP}; null = the validation split.",
    )


class PPODataConfig(_DataCommon):
    """PPO inputs: prompts, evaluation prompts and the PPO-ptx corpus."""

    prompts: DataSource = Field(None, description=f"Training prompts: {_SOURCE_HELP}.")
    valid_prompts: DataSource = Field(
        None, description=f"Prompts for periodic evaluation, a data source{_HELD_OUT_HELP}."
    )
    ptx: DataSource = Field(
        None, description="SFT/pretraining examples for the PPO-ptx loss (eq. 17), a data source."
    )
    max_ptx_response_tokens: int = Field(
        256, gt=0, description="PPO-ptx examples: response tokens kept (cut from the right), as in SFT."
    )


class RewardFunctionConfig(_Section):
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


class RewardConfig(_Section):
    """Reward sources summed with weights: the reward model (`model.reward`) and programmatic functions."""

    model_weight: float = Field(1.0, description="Weight of model.reward's score in the summed reward.")
    functions: list[RewardFunctionConfig] = Field(
        default_factory=list,
        description="Programmatic rewards, each {function: 'module:fn', name, weight, kwargs}; summed with "
        "model_weight x the reward model's score.",
    )


# The names of ppomax.algos.registry's tables: the config accepts what the update can look up, and nothing else.
AdvantageEstimatorName = Literal[ADVANTAGE_ESTIMATORS.names()]  # type: ignore[valid-type]
KLEstimatorName = Literal[KL_ESTIMATORS.names()]  # type: ignore[valid-type]
LossAggregationName = Literal[LOSS_AGGREGATIONS.names()]  # type: ignore[valid-type]


class KLSettings(_Section):
    """``ppo.kl``: the KL to the reference policy, one group (as verl's KLControlConfig): how much (``coef``, or
    an adaptive coefficient toward ``target`` over ``horizon``), which per-token estimate (``estimator``, bounded
    by ``clamp``) and where it acts (``acts_in``: the token rewards, paper eq. 19, or the policy loss)."""

    coef: float = Field(
        0.05,
        ge=0,
        description='0 = no KL penalty. Paper 5.3.2 / fig. 7 ("setting lambda to 0.05"; eta of eq. 19).',
    )
    estimator: KLEstimatorName = Field(
        "k1",
        description="Paper eq. 19 (an empirical per-token KL); k1 = log pi_RL - log pi_SFT, as MOSS-RLHF code.",
    )
    acts_in: Literal["reward", "loss"] = Field(
        "reward",
        description="Where the KL to the reference acts. reward: -coef * KL_t in the token rewards (paper eq. "
        "19). loss: coef * the token mean of the estimator is added to the policy loss instead (GRPO: Shao et "
        'al. 2024 "DeepSeekMath" eq. 3-4, with k3); needs estimator k2 or k3 (k1 as a loss has zero expected '
        "gradient). Ours: reward, as the paper.",
    )
    clamp: float | None = Field(
        None,
        gt=0,
        description="Bound on the per-token KL estimate in the penalty (or the KL loss), [-c, c], after bounding "
        "the log-ratio to +-20; null = unclamped. Ours: null, as paper eq. 19 and MOSS-RLHF code (k3 then reads 142 "
        "at a log-ratio of 5 and inf in float32 past 88.7: kl/estimator_max logs the largest value); verl's "
        "low_var_kl clamps k3 to 10.",
    )
    target: float | None = Field(
        None,
        gt=0,
        description="Target KL per response (nats, the logged kl/per_sequence) of the adaptive KL coefficient of "
        'Ziegler et al. 2019 ("Fine-Tuning Language Models from Human Preferences", sec. 2.2), which starts from '
        "coef and is updated after every iteration (logged as ppo/kl_coef). null = a fixed coef: ours, as the "
        "paper (5.3.2 fixes it).",
    )
    horizon: int = Field(
        10000,
        gt=0,
        description="Responses over which the adaptive coefficient responds: it moves by a factor 1 + e * n / "
        "horizon per iteration of n responses (all processes), e in [-0.2, 0.2]; needs target. Ziegler et al. "
        "2019's code (horizon 10000 episodes); ours: the same.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> KLSettings:
        problems: list[tuple[tuple[str, ...], str]] = []
        if self.target is not None and self.coef == 0:
            problems.append(
                (
                    ("target", "coef"),
                    "the adaptive KL coefficient starts from coef and multiplies it, so from 0 it stays 0; "
                    "set coef > 0 (its initial value) or target: null",
                )
            )
        if self.target is None and self.horizon != type(self).model_fields["horizon"].default:
            problems.append(
                (
                    ("horizon", "target"),
                    "horizon sets the speed of the adaptive KL coefficient, which target: null turns off; "
                    "set target or leave horizon at its default",
                )
            )
        if self.acts_in == "loss" and not KL_ESTIMATORS.spec(self.estimator).as_loss:
            problems.append(
                (
                    ("acts_in", "estimator"),
                    f"{self.estimator} as a loss has zero expected gradient (E[grad log pi] = 0): it would add "
                    "noise, not a KL penalty; set estimator: k3 (GRPO) or k2",
                )
            )
        if problems:
            raise KeyConflicts(problems)
        return self


class PPOSettings(_Section):
    """The paper's implementation details (fig. 5), one field per trick. Defaults are PPO-max (paper 5.4); each
    description names the value's source: a paper section, the MOSS-RLHF code released with the paper, or "ours".

    Score re-parameterisation (paper 5.3.1) is one choice, ``reward_transform`` (fig. 5's trick 4, scaling, or
    trick 5, normalisation, eq. 18: never both, since normalisation divides by the running std too), applied by
    :func:`ppomax.algos.reparameterize_scores`; ``reward_clip`` (eq. 18's delta) stays its own key, a number whose
    null is "off" like every other clip here, because it bounds the score under either transform. The KL to the
    reference is one group, ``kl`` (:class:`KLSettings`). The combinations that have no single meaning are errors
    naming both keys, never a silent precedence: ``reward_clip`` with ``reward_transform: none`` (the clip acts on
    the re-parameterised score, in units of the running std of the raw scores, so with the raw score it would
    silently change units to the RM's); ``entropy_clip`` with ``entropy_coef: 0`` (a clip on a bonus that is
    off). Keys of earlier versions (``kl_coef``, ``reward_norm``, ...) are read with a deprecation line
    (:mod:`ppomax.config_compat`).
    """

    # 1. token-level KL penalty (5.3.2), with the beyond-the-paper KL controls grouped beside it
    kl: KLSettings = Field(
        default_factory=KLSettings,
        description="The KL to the reference policy (paper 5.3.2, eq. 19), one group as verl's KLControlConfig: "
        "its coefficient, estimator, where it acts, bound and adaptive target (see KLSettings).",
    )
    # 2. importance sampling against the sampling policy; false = ratio against the reference
    importance_sampling: bool = Field(
        True,
        description="true: ratio against the sampling (old) policy, standard PPO (MOSS-RLHF code). false: against "
        'the reference, paper 5.3.2\'s "fixing the policy distribution to observations of reference model" (an '
        'infinite buffer), which is the curve fig. 7 calls "Importance Sample" (with kl.coef > 0: "KL '
        'Penalty+Importance Sample"). Paper 5.3.2: more stable, lower final performance; so true here.',
    )
    # 3. entropy bonus with clip (5.3.2, app. B.3)
    entropy_coef: float = Field(
        0.0,
        ge=0,
        description="0 = no entropy bonus. Paper 5.3.2 / app. B.3: not recommended, off (MOSS-RLHF code: 0).",
    )
    entropy_clip: float | None = Field(
        None,
        gt=0,
        description="Entropy above this earns no bonus; null = no clip; needs entropy_coef > 0. Paper app. B.3 "
        "(fig. 16: delta = 30; MOSS-RLHF code default 35).",
    )
    # 4./5. reward scaling or normalisation (5.3.1, eq. 18), and clipping
    reward_transform: Literal["none", "scale", "normalize"] = Field(
        "normalize",
        description="What the RM score becomes before the KL is added (fig. 5's tricks 4 and 5, one choice since "
        "normalisation divides by the running std too). normalize: minus the historical (running) mean, over the "
        'running std (paper 5.4 / eq. 18; PPO-max). scale: over the running std only (paper 5.3.1: "reward '
        "scaling doesn't guide proper policy optimization\"). none: the raw score (vanilla PPO).",
    )
    reward_clip: float | None = Field(
        5.0,
        gt=0,
        description="Bound on the re-parameterised score, in running-std units (eq. 18's delta); needs "
        "reward_transform normalize or scale; null = no clip. "
        'Paper 5.3.1 advises "a relaxed clipping strategy" without a number (fig. 6 tries 0.3 and 0.8; even 0.3 '
        "only delays collapse); ours: 5, which clips outliers only (MOSS-RLHF code default 10).",
    )
    # 6. advantage normalisation and clipping (5.3.1)
    advantage_norm: bool = Field(
        False,
        description="Minibatch whitening of the advantages (paper 5.3.1, fig. 6; app. B.1). Paper: off in PPO-max: "
        "5.4 lists reward normalisation and clipping, the KL penalty, the critic's initialisation from the RM and "
        "its pre-training, global gradient clipping, a small buffer, value-loss clipping and the LM loss, not this; "
        "fig. 5 marks no pentagram on it; fig. 14's caption finds the operations on the advantage and on the value "
        "loss in conflict. MOSS-RLHF code: off unless --use_advantage_norm. True is ours to offer, not the paper's.",
    )
    advantage_clip: float | None = Field(
        None, gt=0, description='null = no clip. Paper 5.3.1: "constraining ... on the reward level" instead.'
    )
    # 7. value-function loss clipping (app. B.1)
    value_clip: float | None = Field(
        0.2,
        gt=0,
        description="null = unclipped value loss. Paper 5.4 (clipped), app. B.1 (fig. 14: 0.2) / MOSS-RLHF code.",
    )
    # 8. critic initialisation (5.3.3)
    critic_init: Literal["reward_model", "sft", "random"] = Field(
        "reward_model", description="Paper 5.1 / 5.4 (critic initialised from the reward model)."
    )
    critic_pretrain_steps: int = Field(
        10,
        ge=0,
        description="Critic-only iterations before policy updates. Paper 5.3.3 / 5.4 pre-trains the critic and gives "
        "no length; ours: 10.",
    )
    # 10. GAE (app. C.3)
    gamma: float = Field(1.0, ge=0, le=1, description="MOSS-RLHF code (gamma 1); the paper gives no gamma.")
    lam: float = Field(
        0.95, ge=0, le=1, description="MOSS-RLHF code (lam 0.95); paper app. C.3 uses 0.9 in its experiments."
    )
    # advantage estimator (beyond the paper): GAE with a critic, or a critic-free estimator
    advantage_estimator: AdvantageEstimatorName = Field(
        "gae",
        description="gae: GAE with a critic (paper eq. 9-11 / app. C.3; PPO-max). The others train no critic "
        "(ppomax.algos.estimators): grpo, the group-normalised sequence reward (Shao et al. 2024, DeepSeekMath "
        "4.1.2); rloo, the leave-one-out baseline (Ahmadian et al. 2024); both need "
        "generation.samples_per_prompt >= 2; reinforce_pp, the return of the token-level rewards whitened over "
        "the global batch (Hu 2025, REINFORCE++), one response per prompt; reinforce_pp_baseline, the same after "
        "subtracting the mean score of the prompt's responses (REINFORCE++ w/ baseline), needs samples_per_prompt >= "
        "2. Each is an entry of ppomax.algos.registry.ADVANTAGE_ESTIMATORS. Ours: gae.",
    )

    group_std_norm: bool = Field(
        True,
        description="grpo only: divide each group's centred rewards by their std (Shao et al. 2024, DeepSeekMath "
        "4.1.2), which gives a group of near-ties (rewards spanning 0.003) advantages of +-1.08; false: the centred "
        "reward alone (Liu et al. 2025, Dr. GRPO; verl norm_adv_by_std_in_grpo, TRL scale_rewards: none). Ours: "
        "true, GRPO as published.",
    )
    loss_aggregation: LossAggregationName = Field(
        "token_mean",
        description="How the policy loss (surrogate, KL loss, entropy bonus) averages its tokens. token_mean: over "
        "every response token of the minibatch (MOSS-RLHF code; DAPO); seq_mean_token_mean: each response's token "
        "mean, then the mean over responses (Shao et al. 2024, DeepSeekMath eq. 3); seq_mean_token_sum_norm: each "
        "response's token sum / generation.max_new_tokens, then the mean over responses (Liu et al. 2025, Dr. "
        "GRPO). verl's loss_agg_mode names. The value loss stays a token mean.",
    )

    @property
    def uses_critic(self) -> bool:
        """Whether a critic is built, trained and saved: only GAE needs values."""
        return ADVANTAGE_ESTIMATORS.spec(self.advantage_estimator).critic

    # 11. clipped surrogate (app. C.1)
    clip_ratio: float | None = Field(
        0.2,
        gt=0,
        description="null = unclipped surrogate. Paper eq. 15 / app. C.1 give no epsilon; 0.2: MOSS-RLHF code.",
    )
    # Beyond the paper: dual clip (the KL controls are in KLSettings)
    dual_clip: float | None = Field(
        None,
        gt=1,
        description="c > 1: for negative advantages the clipped objective is bounded below by c * A (dual-clip PPO, "
        'Ye et al. 2020 "Mastering Complex Control in MOBA Games with Deep Reinforcement Learning"; they use '
        "c = 3); needs clip_ratio. null = off: ours, as the paper (fig. 5 has no dual clip).",
    )
    # 12. global gradient clipping (app. C.2)
    max_grad_norm: float | None = Field(
        1.0,
        gt=0,
        description="null = no clipping. Paper app. C.2 (on in PPO-max; fig. 18 compares 0, 0.5, 1.0) / MOSS-RLHF code "
        "(accelerate config gradient_clipping 1.0).",
    )
    # PPO-ptx (eq. 17)
    ptx_coef: float = Field(
        0.0,
        ge=0,
        description="0 = no pretraining loss. Ours: off, since it needs data.ptx (preset ppo_ptx turns it on); paper "
        "5.4 adds it to PPO-max without a number, MOSS-RLHF code default 0.",
    )
    ptx_batch_size: int = Field(8, gt=0, description="Ours: ptx sequences mixed into each minibatch update.")
    vf_coef: float = Field(1.0, ge=0, description="MOSS-RLHF code (vf_loss_weight 1).")
    # Experience and updates (5.4: a small buffer)
    iterations: int = Field(100, gt=0, description="Rollout + update cycles. Ours.")
    rollout_batch_size: int = Field(
        32, gt=0, description="Prompts per generate() call. MOSS-RLHF code (rollout_batch_size 32)."
    )
    buffer_size: int = Field(
        128,
        gt=0,
        description='Samples collected per iteration before updating. Paper 5.1 ("a batch size of 128 for sampling") '
        "and 5.4 (a small experience buffer) / MOSS-RLHF code (num_rollouts 128).",
    )
    minibatch_size: int = Field(
        32,
        gt=0,
        description='Paper 5.1 ("a batch size of 32 for training") / MOSS-RLHF code (batch_size 32).',
    )
    micro_batch_size: int | None = Field(
        None,
        gt=0,
        description="Rows per forward/backward inside a minibatch (gradient accumulation, to bound memory); "
        "null = the whole minibatch at once. One optimiser step per minibatch either way. Ours.",
    )
    ppo_epochs: int = Field(
        1, gt=0, description="One pass over a small buffer keeps updates on-policy: ours, as MOSS-RLHF code."
    )
    max_nonfinite_in_row: int = Field(
        3,
        gt=0,
        description="Consecutive skipped updates (a non-finite loss or gradient, or a buffer without one finite "
        "reward score) that stop the run; its last good checkpoint is kept. Ours.",
    )

    @model_validator(mode="before")
    @classmethod
    def _read_old_keys(cls, data: Any) -> Any:
        """Keys of earlier versions (a saved run's ``config.yaml``, a dict): see :mod:`ppomax.config_compat`."""
        if not isinstance(data, dict) or not any(k in data for k in OLD_PPO_KEYS):
            return data
        default = cls.model_fields["reward_transform"].default
        data, notes, problems = upgrade_ppo_keys(data, default)
        if problems:
            raise KeyConflicts(problems)
        warn_deprecated(notes)
        return data

    @model_validator(mode="after")
    def _consistent(self) -> PPOSettings:
        problems: list[tuple[tuple[str, ...], str]] = []
        if self.reward_clip is not None and self.reward_transform == "none":
            problems.append(
                (
                    ("reward_clip", "reward_transform"),
                    "reward_clip is in running-std units and needs reward_transform normalize or scale; "
                    "set reward_clip: null to use the raw score",
                )
            )
        if self.entropy_clip is not None and self.entropy_coef == 0:
            problems.append(
                (
                    ("entropy_clip", "entropy_coef"),
                    "entropy_clip bounds the entropy bonus, which entropy_coef: 0 turns off; "
                    "set entropy_coef > 0 or entropy_clip: null",
                )
            )
        if self.dual_clip is not None and self.clip_ratio is None:
            problems.append(
                (
                    ("dual_clip", "clip_ratio"),
                    "the dual clip bounds the clipped surrogate, which clip_ratio: null turns off; "
                    "set clip_ratio or dual_clip: null",
                )
            )
        spec = ADVANTAGE_ESTIMATORS.spec(self.advantage_estimator)
        for key in sorted(
            {k for n in ADVANTAGE_ESTIMATORS.names() for k in ADVANTAGE_ESTIMATORS.spec(n).reads}
        ):
            if key not in spec.reads and getattr(self, key) != type(self).model_fields[key].default:
                readers = [
                    n for n in ADVANTAGE_ESTIMATORS.names() if key in ADVANTAGE_ESTIMATORS.spec(n).reads
                ]
                problems.append(
                    (
                        (key, "advantage_estimator"),
                        f"{key} is read by advantage_estimator {' / '.join(readers)} only, not by "
                        f"{self.advantage_estimator}; leave it at its default or change the estimator",
                    )
                )
        for size in ("rollout_batch_size", "minibatch_size"):
            if self.buffer_size % getattr(self, size):
                problems.append(
                    (
                        ("buffer_size", size),
                        f"buffer_size ({self.buffer_size}) must be a multiple of {size} ({getattr(self, size)})",
                    )
                )
        if problems:
            raise KeyConflicts(problems)
        return self


class _RunConfig(_Section):
    seed: int = Field(42, description="Seeds data order, initialisation and sampling.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)


class SFTConfig(_RunConfig):
    """`ppomax train-sft`: loss on response tokens only; cosine decay to 10% of peak (paper 5.1)."""

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


class RMConfig(_RunConfig):
    """`ppomax train-rm`: paper eq. 2 with the optional LM term."""

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


class PPOConfig(_RunConfig):
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


CONFIG_CLASSES: dict[str, type[_RunConfig]] = {"sft": SFTConfig, "rm": RMConfig, "ppo": PPOConfig}


# --------------------------------------------------------------------------- loading


def _format_validation_error(err: ValidationError, origin: str, cls: type[BaseModel]) -> str:
    from ppomax.config_keys import did_you_mean

    lines = [f"invalid config ({origin}):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["loc"] and not re.fullmatch(
            r"[\w.-]+", key
        ):  # an unknown key may hold a line break, blanks, a colon
            key = repr(key)
        conflicts = e.get("ctx", {}).get("error")
        if isinstance(conflicts, KeyConflicts):
            prefix = "".join(f"{p}." for p in e["loc"])
            lines.extend(
                f"  {', '.join(prefix + k for k in keys)}: {msg}" for keys, msg in conflicts.problems
            )
            continue
        if e["type"] == "extra_forbidden":
            msg = "unknown key" + did_you_mean(key, cls)
        elif e["type"] == "string_type" and isinstance(e.get("input"), bool | int | float):
            what = f"the {'boolean' if isinstance(e['input'], bool) else 'number'} {json.dumps(e['input'])}"
            msg = (
                f"must be text, but YAML read the unquoted value as {what} (yes/no/on/off/true/false are booleans, "
                f'digits numbers): quote it, e.g. --set \'{key}="..."\' or {key.rsplit(".", 1)[-1]}: "..." in a file'
            )
        elif e["type"] == "literal_error":
            msg = f"must be one of {e['ctx']['expected']} (got {e.get('input')!r})"
        elif not e["loc"]:
            msg = e["msg"]
        elif e["type"] == "value_error":  # our own validators' messages, without pydantic's "Value error, "
            msg = f"{e['ctx']['error']} (got {e.get('input')!r})"
        else:
            msg = f"{e['msg']} (got {e.get('input')!r})"
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse one ``--set a.b=value``; the value is read as YAML (numbers, null, true, lists)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. ppo.kl.coef=0.1")
    key, raw = text.split("=", 1)
    parts = [p.strip() for p in key.split(".")]
    if not "".join(parts):
        raise ConfigError(f"--set {text!r}: empty key")
    if not all(parts):  # `a..b`, `.a`, `a. .b`: a typo, not a key
        raise ConfigError(f"--set {text!r}: empty part in the key {key.strip()!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: value is not valid YAML: {_yaml_problem(exc)[1]}") from None
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``a.b=value`` override set (sections are created as needed).

    Old PPO keys (:mod:`ppomax.config_compat`) are read into the new ones, the ``--set`` values of the ``ppo``
    section taken together as one source: an old key and its new key set to different values are an error."""
    below, data = data, copy.deepcopy(data)
    old, new_ppo = [], []
    for text in overrides:
        parts, value = parse_override(text)
        if len(parts) == 2 and parts[0] == "ppo" and parts[1] in OLD_PPO_KEYS:
            old.append((parts[1], value))
            continue
        if parts[0] == "ppo":
            new_ppo.append(text)
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    if old:
        given = apply_overrides({}, new_ppo).get("ppo", {})
        section = {**(given if isinstance(given, dict) else {}), **dict(old)}
        data = deep_merge(data, {"ppo": _upgraded_section(section, below, "--set")})
    return data


def preset_path(name: str) -> Path:
    """The YAML file of a shipped preset."""
    if name not in PRESET_NAMES:
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(PRESET_NAMES)}")
    return Path(str(resources.files("ppomax") / "configs" / f"{name}.yaml"))


def read_preset(name: str) -> dict[str, Any]:
    """A preset's YAML, with ``inherit: OTHER`` resolved (the preset's keys override OTHER's)."""
    data = read_yaml(preset_path(name))
    parent = data.pop("inherit", None)
    if parent:
        data = deep_merge(read_preset(parent), data)
    data["preset"] = name
    return data


def _yaml_problem(exc: yaml.YAMLError) -> tuple[int | None, str]:
    """``(1-based line or None, one-line description)`` of a YAML error (PyYAML's own text spans lines, with a
    caret drawing under a copy of the input)."""
    mark = getattr(exc, "problem_mark", None)
    what = ": ".join(str(x) for x in (getattr(exc, "context", None), getattr(exc, "problem", None)) if x)
    what = " ".join((what or str(exc)).split())
    if mark is None:
        return None, what
    return mark.line + 1, f"{what} (line {mark.line + 1}, column {mark.column + 1})"


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        line, problem = _yaml_problem(exc)
        raise ConfigError(f"{p}{f':{line}' if line else ''}: not valid YAML: {problem}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not UTF-8 text (byte {exc.object[exc.start]:#04x})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections")
    return data


def load_config(
    kind: Literal["sft", "rm", "ppo"],
    path: str | Path | None = None,
    preset: str | None = None,
    overrides: list[str] | None = None,
) -> _RunConfig:
    """Build and validate a config: preset (PPO only), then the YAML file on top, then ``--set`` overrides.

    A YAML file may itself name ``preset: NAME``; its keys then override that preset's.
    """
    cls = CONFIG_CLASSES[kind]
    data: dict[str, Any] = {}
    origin = []
    file_data = read_yaml(path) if path else {}
    preset = preset or file_data.get("preset")
    if preset:
        if kind != "ppo":
            raise ConfigError(f"presets are PPO configs; `{kind}` takes --config FILE")
        data = read_preset(preset)
        origin.append(f"preset {preset}")
    data = _upgraded_merge(data, file_data, str(path))
    if path:
        origin.append(str(path))
    data = apply_overrides(data, overrides or [])
    if overrides:
        origin.append("--set")
    return validate_config(cls, data, " + ".join(origin) or "defaults")


def validate_config(cls: type[_RunConfig], data: dict[str, Any], origin: str) -> _RunConfig:
    """``cls`` from ``data``; a :class:`ConfigError` naming each bad key and ``origin`` (where the data came from)."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, origin, cls)) from None


def config_from(kind: Literal["sft", "rm", "ppo"], config: Any = None) -> _RunConfig:
    """The config of a trainer built from Python: a config object of ``kind`` (a copy: the trainer's changes never
    reach the caller's), a dict of sections (as a YAML file holds them; ``preset: NAME`` starts from that preset), a
    YAML file's path, a preset's name (PPO), or None (the defaults)."""
    cls = CONFIG_CLASSES[kind]
    if config is None:
        return cls()
    if isinstance(config, cls):
        return config.model_copy(deep=True)
    if isinstance(config, BaseModel):
        raise ConfigError(
            f"config: the {kind} trainer takes its {cls.__name__}, not a {type(config).__name__}"
        )
    if isinstance(config, str | Path):
        if kind == "ppo" and str(config) in PRESET_NAMES:
            return load_config(kind, preset=str(config))
        if not Path(config).is_file() and not str(config).endswith((".yaml", ".yml")):
            names = f"; a preset name is one of {', '.join(PRESET_NAMES)}" if kind == "ppo" else ""
            raise ConfigError(f"config: {config!r} is no YAML file{names}")
        return load_config(kind, path=config)
    if isinstance(config, dict):
        data = copy.deepcopy(config)
        preset = data.get("preset")
        if preset:
            if kind != "ppo":
                raise ConfigError(f"config: presets are PPO configs; the {kind} trainer takes its own keys")
            data = _upgraded_merge(read_preset(preset), data, "config dict")
        return validate_config(cls, data, "config dict" + (f" on preset {preset}" if preset else ""))
    raise ConfigError(
        f"config: the {kind} trainer takes its {cls.__name__}, a dict, a YAML file path"
        f"{' or a preset name' if kind == 'ppo' else ''}, not {type(config).__name__}"
    )


def _upgraded_merge(base: dict[str, Any], top: dict[str, Any], origin: str) -> dict[str, Any]:
    """``deep_merge(base, top)`` with the old PPO keys of ``top`` read into the new ones first."""
    section = top.get("ppo")
    if not isinstance(section, dict) or not any(k in section for k in OLD_PPO_KEYS):
        return deep_merge(base, top)
    return deep_merge(base, {**top, "ppo": _upgraded_section(section, base, origin)})


def _upgraded_section(section: dict[str, Any], base: dict[str, Any], origin: str) -> dict[str, Any]:
    """One source's ``ppo`` section with its old keys read into the new ones (one deprecation line each),
    relative to ``base``, the config it goes on top of: ``ppo.reward_norm: false`` turns off the normalisation
    ``base`` has."""
    below = base.get("ppo") if isinstance(base.get("ppo"), dict) else {}
    transform = below.get("reward_transform", PPOSettings.model_fields["reward_transform"].default)
    section, notes, problems = upgrade_ppo_keys(section, transform)
    if problems:
        raise ConfigError(
            "\n".join(
                [f"invalid config ({origin}):"]
                + [f"  {', '.join('ppo.' + k for k in keys)}: {msg}" for keys, msg in problems]
            )
        )
    warn_deprecated(notes)
    return section


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``base`` with ``top`` merged in, nested dicts key by key (``top`` wins)."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def to_yaml(config: BaseModel) -> str:
    """The fully resolved config as YAML (what `ppomax config` prints and every run saves)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
