"""What a user can find out about config keys: every key of a command with its default, allowed values and
description (``ppomax config --explain``), the nearest keys to one that does not exist, and the hint for a config
key written as a flag (TRL's ``--learning_rate 1e-5``) or as a bare ``key=value`` (Hydra's).

It reads the pydantic models of :mod:`ppomax.config` (their fields, constraints and descriptions); nothing here is
written twice."""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from types import NoneType, UnionType
from typing import Any, Literal, Union, get_args, get_origin

from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

#: Names other tools use for what ppomax calls differently (TRL's and transformers' TrainingArguments), and
#: short names: key -> the ppomax keys it may mean (only those the command has are suggested).
ALIASES: dict[str, tuple[str, ...]] = {
    "lr": ("optim.lr", "optim.policy_lr", "optim.critic_lr"),
    "learning_rate": ("optim.lr", "optim.policy_lr", "optim.critic_lr"),
    "num_train_epochs": ("epochs",),
    "per_device_train_batch_size": ("batch_size", "ppo.minibatch_size"),
    "gradient_accumulation_steps": ("grad_accum", "ppo.micro_batch_size"),
    "output_dir": ("logging.out_dir",),
    "model_name_or_path": ("model.policy",),
    "sft_model_path": ("model.policy",),
    "reward_model_path": ("model.reward",),
    "lr_scheduler_type": ("optim.schedule",),
    "num_ppo_epochs": ("ppo.ppo_epochs",),
    "beta": ("ppo.kl.coef", "beta_rm"),
    "kl_coef": ("ppo.kl.coef",),
    "kl_estimator": ("ppo.kl.estimator",),
    "cliprange": ("ppo.clip_ratio",),
    "cliprange_value": ("ppo.value_clip",),
    "response_length": ("generation.max_new_tokens",),
    "max_completion_length": ("generation.max_new_tokens",),
    "num_generations": ("generation.samples_per_prompt",),
    "max_prompt_length": ("data.max_prompt_tokens",),
    "dataset_name": ("data.train", "data.prompts"),
    "dataset_config": ("data.train", "data.prompts"),
    "dataset_train_split": ("data.train", "data.prompts"),
    "dataset_test_split": ("data.valid", "data.test", "data.valid_prompts"),
    "dataset_num_proc": ("data.num_proc",),
    "logging_steps": ("logging.log_every",),
    "save_steps": ("logging.checkpoint_every",),
    "eval_steps": ("logging.eval_every",),
    "save_total_limit": ("logging.keep_checkpoints",),
    "bf16": ("model.dtype",),
    "fp16": ("model.dtype",),
    "gradient_checkpointing": ("model.gradient_checkpointing",),
}


@dataclass(frozen=True)
class KeyDoc:
    """One config key: its dotted name, default (JSON), allowed values and description."""

    key: str
    default: str
    allowed: str
    description: str


def _sections(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation admits (``LoraSettings | None`` -> ``[LoraSettings]``); not lists, and not
    a union that admits other values too (a data source: a path, a list or a mapping), which is one key."""
    if get_origin(annotation) is list:
        return []
    args = get_args(annotation) if get_origin(annotation) in (Union, UnionType) else (annotation,)
    models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
    return models if len(models) == len([a for a in args if a is not NoneType]) else []


def _type_name(annotation: Any) -> str:
    if get_origin(annotation) is Literal:
        return "one of " + ", ".join(str(a) for a in get_args(annotation))
    if get_origin(annotation) in (Union, UnionType):
        parts = [_type_name(a) for a in get_args(annotation) if a is not NoneType]
        return " or ".join(parts) + (" or null" if NoneType in get_args(annotation) else "")
    if get_origin(annotation) is list:
        (item,) = get_args(annotation) or (Any,)
        return f"a list of {_type_name(item)}" if not _sections(item) else "a list of mappings"
    if get_origin(annotation) is dict:
        return "a mapping"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"a mapping {{{', '.join(annotation.model_fields)}}}"
    names = {bool: "true/false", int: "integer", float: "number", str: "text"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _allowed(field: FieldInfo) -> str:
    bounds = []
    for m in field.metadata:
        for cls, attr, op in ((Gt, "gt", ">"), (Ge, "ge", ">="), (Lt, "lt", "<"), (Le, "le", "<=")):
            if isinstance(m, cls):
                bounds.append(f"{op} {getattr(m, attr)}")
    text = _type_name(field.annotation)
    return f"{text} ({', '.join(bounds)})" if bounds else text


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    return json.dumps(value.model_dump(mode="json") if isinstance(value, BaseModel) else value)


def key_docs(model: type[BaseModel], prefix: str = "") -> list[KeyDoc]:
    """Every key of ``model`` (a config class), sections expanded: a section that may be null (``model.lora``) is
    listed itself and then its keys."""
    out: list[KeyDoc] = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        sections = _sections(field.annotation)
        if sections:
            if NoneType in get_args(field.annotation):
                out.append(KeyDoc(key, _default(field), "a section or null", field.description or ""))
            out.extend(key_docs(sections[0], f"{key}."))
        else:
            out.append(KeyDoc(key, _default(field), _allowed(field), field.description or ""))
    return out


def all_keys(model: type[BaseModel]) -> list[str]:
    return [d.key for d in key_docs(model)]


def nearest_keys(unknown: str, model: type[BaseModel], n: int = 3) -> list[str]:
    """The keys of ``model`` a user most likely meant by ``unknown`` (dotted or not; ``-`` read as ``_``): the same
    last name in another section, another tool's name for it (:data:`ALIASES`), then close spellings."""
    keys = all_keys(model)
    wanted = unknown.strip().lstrip("-").replace("-", "_").lower()
    leaf = wanted.rsplit(".", 1)[-1]
    found = [k for k in keys if k.rsplit(".", 1)[-1] == leaf and k != wanted]
    found += [k for k in ALIASES.get(leaf, ()) if k in keys]
    if not found:
        leaves: dict[str, list[str]] = {}
        for k in keys:
            leaves.setdefault(k.rsplit(".", 1)[-1], []).append(k)
        for close in difflib.get_close_matches(leaf, list(leaves), n=n, cutoff=0.75):
            found += leaves[close]
        found += difflib.get_close_matches(wanted, keys, n=n, cutoff=0.75)
    return list(dict.fromkeys(found))[:n]


def did_you_mean(unknown: str, model: type[BaseModel]) -> str:
    """``"; did you mean a or b?"``, or ``""`` when nothing is close."""
    near = nearest_keys(unknown, model)
    return f"; did you mean {' or '.join(near)}?" if near else ""


def explain(model: type[BaseModel], command: str) -> str:
    """``ppomax config --explain``: every key with its default, allowed values and description (its source)."""
    lines = [
        f"Keys of `ppomax {command}` (set in a YAML file, or with --set KEY=VALUE; values are read as YAML):",
        "",
    ]
    for d in key_docs(model):
        lines.append(f"{d.key} = {d.default}    [{d.allowed}]")
        if d.description:
            lines.append(f"    {d.description}")
    return "\n".join(lines) + "\n"


def flag_hint(extra: list[str], model: type[BaseModel], command: str, kind: str) -> str | None:
    """The one-line hint for arguments argparse did not know that look like config keys: ``--learning_rate 1e-5``
    (TRL, transformers) or ``ppo.kl.coef=0.1`` (Hydra); None if the first one does not look like a key."""
    first = extra[0]
    if first.startswith("--"):
        name, _, value = first[2:].partition("=")
        if not value and len(extra) > 1 and not extra[1].startswith("-"):
            value = extra[1]
    elif "=" in first and not first.startswith("-"):
        name, _, value = first.partition("=")
    else:
        return None
    name = name.replace("-", "_")
    keys = all_keys(model)
    targets = [name] if name in keys else nearest_keys(name, model)
    if not targets:
        return None
    shown = " or ".join(f"--set {k}={value or 'VALUE'}" for k in targets)
    return (
        f"{command}: {first} is not a flag; config keys are set with --set KEY=VALUE: {shown} "
        f"(`ppomax config --explain --kind {kind}` lists every key)"
    )
