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

One module per section of a config file (``model``, ``data``, ``generation``, ``optim``, ``logging``, ``reward``,
``ppo`` with its ``kl`` group, ``collapse``); :mod:`.section` holds what every section shares, :mod:`.runs` the
config of each command with the rules across sections, :mod:`.validation` how a validation error is printed and
:mod:`.loading` where a config comes from (files, presets, ``--set``, Python objects). Import the names from here.
"""

from ppomax.config.collapse import CollapseConfig
from ppomax.config.data import DataConfig, DatasetArgs, DataSource, PPODataConfig, RMDataConfig
from ppomax.config.generation import GenerationConfig
from ppomax.config.loading import (
    PRESET_NAMES,
    apply_overrides,
    config_from,
    deep_merge,
    load_config,
    parse_override,
    preset_path,
    read_preset,
    read_yaml,
    to_yaml,
)
from ppomax.config.logging import LoggingConfig, PPOLoggingConfig, Tracker
from ppomax.config.model import LoraSettings, ModelConfig, PPOLoraSettings, PPOModelConfig
from ppomax.config.optim import AdamWConfig, OptimConfig, PPOOptimConfig
from ppomax.config.ppo import (
    AdvantageEstimatorName,
    KLEstimatorName,
    KLSettings,
    LossAggregationName,
    PPOSettings,
)
from ppomax.config.reward import RewardConfig, RewardFunctionConfig
from ppomax.config.runs import (
    CONFIG_CLASSES,
    CommandConfig,
    PPOConfig,
    RMConfig,
    RunConfig,
    RunKind,
    SFTConfig,
)
from ppomax.config.section import KeyConflicts, Section
from ppomax.config.validation import validate_config

__all__ = [
    "CONFIG_CLASSES",
    "PRESET_NAMES",
    "AdamWConfig",
    "AdvantageEstimatorName",
    "CollapseConfig",
    "CommandConfig",
    "DataConfig",
    "DataSource",
    "DatasetArgs",
    "GenerationConfig",
    "KLEstimatorName",
    "KLSettings",
    "KeyConflicts",
    "LoggingConfig",
    "LoraSettings",
    "LossAggregationName",
    "ModelConfig",
    "OptimConfig",
    "PPOConfig",
    "PPODataConfig",
    "PPOLoggingConfig",
    "PPOLoraSettings",
    "PPOModelConfig",
    "PPOOptimConfig",
    "PPOSettings",
    "RMConfig",
    "RMDataConfig",
    "RewardConfig",
    "RewardFunctionConfig",
    "RunConfig",
    "RunKind",
    "SFTConfig",
    "Section",
    "Tracker",
    "apply_overrides",
    "config_from",
    "deep_merge",
    "load_config",
    "parse_override",
    "preset_path",
    "read_preset",
    "read_yaml",
    "to_yaml",
    "validate_config",
]
