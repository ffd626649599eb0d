"""Where a config comes from: a YAML file, a preset (``inherit:`` resolved), ``--set`` overrides, a Python object
or dict (:func:`config_from`); keys of earlier versions read into the new ones (:mod:`ppomax.config_compat`);
and back to YAML (:func:`to_yaml`)."""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any, Literal, overload

import yaml
from pydantic import BaseModel

from ppomax.config.ppo import PPOSettings
from ppomax.config.runs import CONFIG_CLASSES, CommandConfig, PPOConfig, RMConfig, RunKind, SFTConfig
from ppomax.config.validation import validate_config
from ppomax.config_compat import OLD_PPO_KEYS, upgrade_ppo_keys, warn_deprecated
from ppomax.errors import ConfigError

PRESET_NAMES = ("vanilla", "ppo_max", "ppo_ptx", "grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")


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


@overload
def load_config(
    kind: Literal["sft"],
    path: str | Path | None = None,
    preset: str | None = None,
    overrides: list[str] | None = None,
) -> SFTConfig: ...


@overload
def load_config(
    kind: Literal["rm"],
    path: str | Path | None = None,
    preset: str | None = None,
    overrides: list[str] | None = None,
) -> RMConfig: ...


@overload
def load_config(
    kind: Literal["ppo"],
    path: str | Path | None = None,
    preset: str | None = None,
    overrides: list[str] | None = None,
) -> PPOConfig: ...


@overload
def load_config(
    kind: RunKind,
    path: str | Path | None = None,
    preset: str | None = None,
    overrides: list[str] | None = None,
) -> CommandConfig: ...


def load_config(
    kind: RunKind,
    path: str | Path | None = None,
    preset: str | None = None,
    overrides: list[str] | None = None,
) -> CommandConfig:
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


@overload
def config_from(kind: Literal["sft"], config: Any = None) -> SFTConfig: ...


@overload
def config_from(kind: Literal["rm"], config: Any = None) -> RMConfig: ...


@overload
def config_from(kind: Literal["ppo"], config: Any = None) -> PPOConfig: ...


@overload
def config_from(kind: RunKind, config: Any = None) -> CommandConfig: ...


def config_from(kind: RunKind, config: Any = None) -> CommandConfig:
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
    below = base.get("ppo")
    if not isinstance(below, dict):
        below = {}
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
