"""What a trainer is given from Python besides its config: model and tokenizer objects, data, reward functions, a
PEFT config, callbacks; and what its ``train()`` returns.

Each argument stands for one config key (:data:`SFT_KEYS`, :data:`RM_KEYS`, :data:`PPO_KEYS`: ``model=`` is
``model.policy``, ``train_dataset=`` is ``data.train``, ...). The rules, the same for the three trainers:

* a string (a model directory or Hub id, a data file, a ``module:function``) is config: it becomes the key's value,
  as ``--set`` would set it, and the run is the one the CLI would run;
* an object (a ``PreTrainedModel``, a tokenizer, a ``datasets.Dataset`` or a list of records, a reward callable) is
  a collaborator passed to the trainer; the key records what it is, as ``<object ...>``: a model its class,
  ``name_or_path`` and parameter count, a tokenizer its class, ``name_or_path`` and vocabulary size, data its type
  (its content is fingerprinted in every checkpoint, as a file's bytes are), a function its ``module:qualname``;
* an argument and its config key may not disagree: the key must be unset, or hold that very value or record (a
  resumed run's ``config.yaml``); anything else is an error naming both;
* a run whose config records an object runs (and resumes) only with an object of the same record passed again: an
  error names the argument when it is missing, so such a run is resumed from Python, never by the CLI;
* ``peft_config`` (a ``peft.LoraConfig``) is ``model.lora``: its ``r``, ``lora_alpha``, ``lora_dropout`` and
  ``target_modules`` (none: ``model.lora``'s default, ``all-linear``); any other field of it set is an error;
* ``callbacks``: objects with any of ``on_step_end(step, metrics)``, ``on_evaluate(step, metrics)`` and
  ``on_save(path)`` (:class:`Callbacks`), called on the main process.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

import torch

from ppomax.config import (
    CONFIG_CLASSES,
    CommandConfig,
    PPOConfig,
    RMConfig,
    RunKind,
    SFTConfig,
    config_from,
    validate_config,
)
from ppomax.data.sources import in_memory
from ppomax.errors import ConfigError, UserError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ppomax.models import ValueHeadModel
    from ppomax.models.adapter_dir import CausalLM, TransformersLM

LM = TypeVar("LM", bound=torch.nn.Module)
"""A causal LM (or a model holding one), of whatever class the caller has."""

OBJECT = "<object "

#: argument -> config key, per trainer
SFT_KEYS = {
    "model": "model.policy",
    "processing_class": "model.tokenizer",
    "train_dataset": "data.train",
    "eval_dataset": "data.valid",
}
RM_KEYS = {**SFT_KEYS, "test_dataset": "data.test"}
PPO_KEYS = {
    "model": "model.policy",
    "ref_model": "model.reference",
    "reward_model": "model.reward",
    "value_model": "model.critic",
    "processing_class": "model.tokenizer",
    "train_dataset": "data.prompts",
    "eval_dataset": "data.valid_prompts",
    "ptx_dataset": "data.ptx",
}
KEYS = {"sft": SFT_KEYS, "rm": RM_KEYS, "ppo": PPO_KEYS}
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")  # RewardFunctionConfig.name's pattern
# PEFT LoraConfig fields that say how it was made or saved, not what it trains
_LORA_BOOKKEEPING = {
    "task_type",
    "peft_type",
    "auto_mapping",
    "peft_version",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "runtime_config",
}


def is_record(value: Any) -> bool:
    """Whether a config value is the record of an object passed from Python (see the module docstring)."""
    return isinstance(value, str) and value.startswith(OBJECT) and value.endswith(">")


def name_or_path(obj: Any) -> str:
    """Where a model or tokenizer object was loaded from (transformers' ``name_or_path``; "" if built in memory)."""
    value = getattr(obj, "name_or_path", None)
    if value is None:  # a value-head model: its backbone's
        value = getattr(getattr(obj, "config", None), "_name_or_path", "")
    return str(value or "")


def record_of(obj: Any) -> str:
    """The ``<object ...>`` a config key holds for ``obj``."""
    if in_memory(obj):
        return f"{OBJECT}{type(obj).__name__}>"
    if isinstance(obj, torch.nn.Module):
        params = sum(p.numel() for p in obj.parameters())
        where = name_or_path(obj)
        return f"{OBJECT}{type(obj).__name__}" + (f" {where}" if where else "") + f" params={params}>"
    if hasattr(obj, "convert_ids_to_tokens"):  # a tokenizer
        where = name_or_path(obj)
        return f"{OBJECT}{type(obj).__name__}" + (f" {where}" if where else "") + f" vocab={len(obj)}>"
    if callable(obj):
        fn = obj if hasattr(obj, "__qualname__") else type(obj)
        return f"{OBJECT}{fn.__module__}:{fn.__qualname__}>"
    return f"{OBJECT}{type(obj).__name__}>"


# --------------------------------------------------------------------------- callbacks


class Callbacks:
    """The trainer's callbacks, called on the main process: ``on_step_end(step, metrics)`` after each optimiser step
    (SFT, RM) or iteration (PPO), with the record written to ``metrics.jsonl`` at that step (keys as there, e.g.
    ``train/loss``; ``{}`` at a step ``logging.log_every`` skips); ``on_evaluate(step, metrics)`` after each
    evaluation (``eval/...`` keys); ``on_save(path)`` after each checkpoint and model directory is written. A
    callback needs none but the methods it uses; what it raises stops the run."""

    HOOKS = ("on_step_end", "on_evaluate", "on_save")

    def __init__(self, callbacks: Sequence[Any] | None = None, enabled: bool = True) -> None:
        self.callbacks = list(callbacks or [])
        self.enabled = enabled
        for i, cb in enumerate(self.callbacks):
            check_callback(cb, f"callbacks[{i}]")

    def _call(self, hook: str, *args: Any) -> None:
        if not self.enabled:
            return
        for cb in self.callbacks:
            method = getattr(cb, hook, None)
            if method is not None:
                method(*args)

    def step_end(self, step: int, metrics: dict[str, Any]) -> None:
        self._call("on_step_end", step, {k: v for k, v in metrics.items() if k != "step"})

    def evaluate(self, step: int, metrics: dict[str, Any]) -> None:
        self._call("on_evaluate", step, {k: v for k, v in metrics.items() if k != "step"})

    def save(self, path: Path) -> None:
        self._call("on_save", Path(path))


def check_callback(cb: Any, where: str) -> None:
    """A callback is an object with at least one of :attr:`Callbacks.HOOKS`, not a transformers TrainerCallback."""
    if isinstance(cb, type):
        raise UserError(f"{where}: the class {cb.__name__}, where an instance is needed ({cb.__name__}())")
    if any(c.__name__ == "TrainerCallback" for c in type(cb).__mro__):
        raise UserError(
            f"{where}: {type(cb).__name__} is a transformers TrainerCallback, whose methods take (args, state, "
            "control); ppomax calls on_step_end(step, metrics), on_evaluate(step, metrics) and on_save(path): "
            "write a small class with those"
        )
    if not any(callable(getattr(cb, hook, None)) for hook in Callbacks.HOOKS):
        raise UserError(f"{where}: {type(cb).__name__} has none of {', '.join(Callbacks.HOOKS)}")


# --------------------------------------------------------------------------- inputs


@dataclass
class Inputs:
    """The collaborators a trainer was given: objects by config key, reward callables by their record, and the
    callbacks. Empty for a run from the config alone (the CLI's)."""

    objects: dict[str, Any] = field(default_factory=dict)
    reward_functions: dict[str, Callable[..., Any]] = field(default_factory=dict)
    callbacks: list[Any] = field(default_factory=list)

    def get(self, key: str) -> Any | None:
        """The object given for a config key (``model.policy``, ``data.train``...), or None."""
        return self.objects.get(key)

    def source(self, key: str, configured: Any) -> Any:
        """A data key's source: the object given for it, else the config's value."""
        return self.objects.get(key, configured)

    def base_path(self, key: str, configured: str) -> str:
        """Where a model's base weights are (what saved LoRA adapters name): an object's ``name_or_path``, else the
        config's path."""
        obj = self.objects.get(key)
        if obj is None:
            return configured
        return name_or_path(obj) or record_of(obj)  # a model built in memory is found nowhere


@overload
def bind(
    kind: Literal["sft"],
    config: Any,
    arguments: Mapping[str, Any],
    reward_funcs: Any = None,
    peft_config: Any = None,
    callbacks: Sequence[Any] | None = None,
) -> tuple[SFTConfig, Inputs]: ...


@overload
def bind(
    kind: Literal["rm"],
    config: Any,
    arguments: Mapping[str, Any],
    reward_funcs: Any = None,
    peft_config: Any = None,
    callbacks: Sequence[Any] | None = None,
) -> tuple[RMConfig, Inputs]: ...


@overload
def bind(
    kind: Literal["ppo"],
    config: Any,
    arguments: Mapping[str, Any],
    reward_funcs: Any = None,
    peft_config: Any = None,
    callbacks: Sequence[Any] | None = None,
) -> tuple[PPOConfig, Inputs]: ...


@overload
def bind(
    kind: RunKind,
    config: Any,
    arguments: Mapping[str, Any],
    reward_funcs: Any = None,
    peft_config: Any = None,
    callbacks: Sequence[Any] | None = None,
) -> tuple[CommandConfig, Inputs]: ...


def bind(
    kind: RunKind,
    config: Any,
    arguments: Mapping[str, Any],
    reward_funcs: Any = None,
    peft_config: Any = None,
    callbacks: Sequence[Any] | None = None,
) -> tuple[CommandConfig, Inputs]:
    """The config a trainer runs (``config`` as :func:`ppomax.config.config_from` reads it, with the arguments
    set into their keys) and the objects it was given (see the module docstring)."""
    cfg = config_from(kind, config)
    keys = KEYS[kind]
    updates: dict[str, Any] = {}
    inputs = Inputs(callbacks=list(callbacks or []))
    Callbacks(inputs.callbacks)  # checked now, before anything loads
    for arg, key in keys.items():
        value = arguments.get(arg)
        current = _get(cfg, key)
        if value is None:
            if is_record(current):
                raise UserError(
                    f"{key}: this run was started with an object ({current}); pass it again ({arg}=...) to run or "
                    "resume it (a run started with objects is resumed from Python, not by the CLI)"
                )
            continue
        new = _config_value(arg, key, value, kind)
        if current is not None and _plain(current) != _plain(new):
            raise ConfigError(
                f"{arg} (argument) and {key} (config): both given, {_short(new)} and {_short(current)}; give one"
            )
        updates[key] = new
        if is_record(new):
            inputs.objects[key] = value
    policy = inputs.get("model.policy")
    if (
        policy is not None
        and arguments.get("processing_class") is None
        and _get(cfg, "model.tokenizer") is None
    ):
        where = name_or_path(policy)
        if not where:
            raise UserError(
                "processing_class: required with a model object built in memory (it has no name_or_path to load "
                "its tokenizer from)"
            )
        updates["model.tokenizer"] = where
    if isinstance(cfg, PPOConfig):
        updates.update(_bind_reward_funcs(cfg, reward_funcs, inputs))
    if peft_config is not None:
        updates.update(_bind_lora(cfg, peft_config))
    if not updates:
        return cfg, inputs
    data = cfg.model_dump(mode="json")
    for key, value in updates.items():
        section, name = key.split(".")
        data[section][name] = value
    return validate_config(CONFIG_CLASSES[kind], data, "the trainer's arguments"), inputs


def _get(cfg: CommandConfig, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _plain(value: Any) -> Any:
    return value.model_dump(exclude_none=True) if hasattr(value, "model_dump") else value


def _short(value: Any) -> str:
    text = repr(_plain(value))
    return text if len(text) <= 80 else text[:77] + "..."


def _config_value(arg: str, key: str, value: Any, kind: str) -> Any:
    """A string argument as the config value it is; an object as its record, checked to be usable for the key."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, str):
        return value
    if key.startswith("data."):
        if in_memory(value):
            return record_of(value)
        if isinstance(value, list | dict):  # a list of files, a mapping of load_dataset arguments
            return value
        raise UserError(
            f"{arg}: a path, a Hub dataset id, a datasets.Dataset or a list of records (dicts), not "
            f"{type(value).__name__}"
        )
    if key == "model.tokenizer":
        if not hasattr(value, "convert_ids_to_tokens"):
            raise UserError(f"{arg}: a tokenizer (or its directory / Hub id), not {type(value).__name__}")
        return record_of(value)
    _check_model(arg, key, value, value_head_ok=kind == "rm")
    return record_of(value)


def _check_model(arg: str, key: str, value: Any, value_head_ok: bool) -> None:
    """A model object fits its key: a ValueHeadModel for a reward model or critic (and, to train on, for the RM
    trainer's model), a causal LM otherwise; never a PEFT model (ppomax adds the adapters itself)."""
    from ppomax.models import ValueHeadModel

    if hasattr(value, "peft_config") or hasattr(getattr(value, "backbone", None), "peft_config"):
        raise UserError(
            f"{arg}: a PEFT model; pass its base model and the LoraConfig as peft_config= (ppomax adds the "
            "adapters, and under PPO disables them for the reference)"
        )
    if key in ("model.reward", "model.critic"):
        if not isinstance(value, ValueHeadModel):
            raise UserError(
                f"{arg}: a ppomax ValueHeadModel (ValueHeadModel.from_pretrained(DIR_OR_HUB_ID) reads any "
                "*ForSequenceClassification reward model: ppomax's, TRL's, the Hub's) or its directory / Hub id, "
                f"not {type(value).__name__}"
            )
        return
    if value_head_ok and isinstance(value, ValueHeadModel):
        return
    head = getattr(value, "get_output_embeddings", None)
    if head is None or head() is None or not callable(getattr(value, "generate", None)):
        raise UserError(
            f"{arg}: a causal LM (AutoModelForCausalLM.from_pretrained(...)) or its directory / Hub id, not "
            f"{type(value).__name__}"
        )


def _bind_reward_funcs(cfg: PPOConfig, reward_funcs: Any, inputs: Inputs) -> dict[str, Any]:
    """``reward_funcs``: one or a list of callables, ``module:function`` strings, or mappings {function, name,
    weight, kwargs} whose function is either; as ``reward.functions`` entries (a callable's ``name`` defaults to its
    ``__name__``, ``reward_I`` for a lambda)."""
    if reward_funcs is None:
        for i, f in enumerate(cfg.reward.functions):
            if is_record(f.function):
                raise UserError(
                    f"reward.functions[{i}].function: this run was started with a reward function object "
                    f"({f.function}); pass reward_funcs= again to run or resume it (a run started with objects is "
                    "resumed from Python, not by the CLI)"
                )
        return {}
    funcs = list(reward_funcs) if isinstance(reward_funcs, list | tuple) else [reward_funcs]
    entries = []
    for i, item in enumerate(funcs):
        entry = dict(item) if isinstance(item, Mapping) else {"function": item}
        fn = entry.get("function")
        if callable(fn):
            record = record_of(fn)
            inputs.reward_functions[record] = fn
            entry["function"] = record
            own = getattr(fn, "__name__", "")
            entry.setdefault("name", own if _NAME.match(own) else f"reward_{i}")
        elif not isinstance(fn, str):
            raise UserError(
                f"reward_funcs[{i}]: a callable, a 'module:function' string or a mapping with 'function', not "
                f"{type(fn).__name__}"
            )
        entries.append(entry)
    current = [f.model_dump() for f in cfg.reward.functions]
    full = [{"name": None, "weight": 1.0, "kwargs": {}, **e} for e in entries]
    if current and current != full:
        raise ConfigError(
            f"reward_funcs (argument) and reward.functions (config): both given ({len(full)} and {len(current)} "
            "functions, not the same); give one"
        )
    return {"reward.functions": full}


def _bind_lora(cfg: CommandConfig, peft_config: Any) -> dict[str, Any]:
    try:
        import peft
    except ImportError:
        raise UserError("peft_config: LoRA needs PEFT: pip install 'ppomax[lora]'") from None
    if not isinstance(peft_config, peft.LoraConfig):
        raise UserError(
            f"peft_config: a peft.LoraConfig (ppomax trains LoRA adapters), not {type(peft_config).__name__}"
        )
    defaults = peft.LoraConfig()
    mapped = {"r", "lora_alpha", "lora_dropout", "target_modules"}
    for f in dataclasses.fields(peft_config):
        if f.name in mapped or f.name in _LORA_BOOKKEEPING:
            continue
        if getattr(peft_config, f.name) != getattr(defaults, f.name):
            raise UserError(
                f"peft_config.{f.name}={getattr(peft_config, f.name)!r}: not supported (ppomax's LoRA, model.lora, "
                "sets r, lora_alpha, lora_dropout and target_modules; leave the other fields at PEFT's defaults)"
            )
    lora: dict[str, Any] = {
        "r": peft_config.r,
        "alpha": float(peft_config.lora_alpha),
        "dropout": peft_config.lora_dropout,
    }
    targets = peft_config.target_modules
    if targets is not None:
        lora["target_modules"] = targets if isinstance(targets, str) else sorted(targets)
    current = cfg.model.lora
    if current is not None:
        have = current.model_dump()
        if any(have.get(k) != v for k, v in lora.items()):
            raise ConfigError(
                f"peft_config (argument) and model.lora (config): both given, {lora} and "
                f"{ {k: have.get(k) for k in lora} }; give one"
            )
        return {}
    return {"model.lora": lora}


# --------------------------------------------------------------------------- objects made ready


def adopt_causal_lm(model: LM, dtype: str | torch.dtype, key: str) -> LM:
    """A causal-LM object as a loaded one is: in ``dtype`` (in place: the caller's object is the one trained),
    with ppomax's CPU attention, its weights finite."""
    from ppomax.models import check_finite, to_dtype
    from ppomax.models.attention import use_cpu_float32_attention

    model = model.to(to_dtype(dtype))
    check_finite(model, f"{key} ({record_of(model)})")
    return use_cpu_float32_attention(model)


def adopt_value_head(model: ValueHeadModel, dtype: str | torch.dtype, key: str) -> ValueHeadModel:
    """A ValueHeadModel object as a loaded one is: its backbone in ``dtype``, its head in float32."""
    adopt_causal_lm(model.backbone, dtype, key)
    return model


def copy_causal_lm(model: LM, dtype: str | torch.dtype, key: str) -> LM:
    """A copy of a (not yet trained) causal-LM object: what the PPO reference or an SFT-initialised critic starts
    from when the policy is an object."""
    return adopt_causal_lm(copy.deepcopy(model), dtype, key)


def random_causal_lm_like(model: CausalLM, dtype: str | torch.dtype, seed: int) -> TransformersLM:
    """A causal LM of ``model``'s architecture with fresh weights drawn from ``seed`` (the global RNG untouched):
    ``ppo.critic_init: random`` beside a policy object."""
    from transformers import AutoModelForCausalLM

    from ppomax.models import to_dtype
    from ppomax.models.attention import use_cpu_float32_attention

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = AutoModelForCausalLM.from_config(copy.deepcopy(model.config))
    return use_cpu_float32_attention(fresh.to(to_dtype(dtype)))


def adopt_tokenizer(tokenizer: PreTrainedTokenizerBase, key: str) -> PreTrainedTokenizerBase:
    """A copy of a tokenizer object, prepared as a loaded one is (pad token, left padding)."""
    from ppomax.models.loading import prepare_tokenizer

    return prepare_tokenizer(copy.deepcopy(tokenizer), record_of(tokenizer), key)


# --------------------------------------------------------------------------- the result


@dataclass
class TrainResult:
    """What ``train()`` returns: the run directory, the trained model's directory and the trained objects.

    ``model``: the trained model (SFT: the causal LM, a PEFT model under LoRA; RM: the ValueHeadModel; PPO: the
    policy), unwrapped from accelerate (under ZeRO-3/FSDP each process holds its shard: load ``model_dir`` for the
    whole model). ``metrics``: the newest value of every metric the run logged (``train/...``, ``eval/...``).
    ``step``: the last optimiser step (SFT, RM) or iteration (PPO). Under a launcher every process gets one; only
    the main process's ``metrics`` are filled."""

    out_dir: Path
    model_dir: Path | None
    model: CausalLM | ValueHeadModel
    tokenizer: PreTrainedTokenizerBase
    metrics: dict[str, Any]
    step: int
    critic: ValueHeadModel | None = None
    """PPO: the trained critic (None without one)."""
    collapse_stopped: bool = False
    """PPO: the collapse monitor stopped the run (``collapse.action: stop``); nothing was saved after it."""


__all__ = [
    "KEYS",
    "Callbacks",
    "Inputs",
    "TrainResult",
    "adopt_causal_lm",
    "adopt_tokenizer",
    "adopt_value_head",
    "bind",
    "copy_causal_lm",
    "is_record",
    "record_of",
]
