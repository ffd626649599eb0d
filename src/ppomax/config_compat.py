"""PPO keys of earlier ppomax versions, read into the current ones so that saved configs (a run's
``config.yaml``, ``--resume``) and old ``--set`` overrides keep working.

Each old key is translated with one deprecation line on the ``ppomax`` logger naming the old key and its new one,
never silently. An old key and its new key in the same source (one YAML file, one dict, one ``--set``) that
disagree are an error naming both. Sources are translated one at a time before they are merged, so an old key in
a file overrides a preset's new key as any key does.

* ``kl_coef``, ``kl_estimator``, ``kl_in``, ``kl_target``, ``kl_horizon``, ``kl_clamp`` -> the ``kl`` group
  (``kl.coef``, ``kl.estimator``, ``kl.acts_in``, ``kl.target``, ``kl.horizon``, ``kl.clamp``);
* ``reward_norm`` and ``reward_scaling`` (two switches, at most one on) -> ``reward_transform``:
  ``true`` asks for ``normalize`` / ``scale``; ``false`` turns its own transform off (``none``) and leaves the
  other one as it is, which is what the switch meant on top of the config below it.
"""

from __future__ import annotations

from typing import Any

from ppomax.console import console

#: old ppo key -> its key in the ``ppo.kl`` group
KL_KEYS = {
    "kl_coef": "coef",
    "kl_estimator": "estimator",
    "kl_in": "acts_in",
    "kl_target": "target",
    "kl_horizon": "horizon",
    "kl_clamp": "clamp",
}
#: old ppo switch -> the ``ppo.reward_transform`` it turned on
REWARD_SWITCHES = {"reward_norm": "normalize", "reward_scaling": "scale"}
OLD_PPO_KEYS = (*KL_KEYS, *REWARD_SWITCHES)

Problems = list[tuple[tuple[str, ...], str]]

_warned: set[str] = set()


def upgrade_ppo_keys(
    section: dict[str, Any], transform_below: str
) -> tuple[dict[str, Any], list[str], Problems]:
    """``section`` (one source's ``ppo`` mapping) with its old keys translated, the deprecation notes (one per old
    key) and the conflicts (keys relative to ``ppo``). ``transform_below``: the ``reward_transform`` of what this
    source sits on (the default, or the preset's), which a ``false`` switch is relative to."""
    out = dict(section)
    notes: list[str] = []
    problems: Problems = []
    for old, new in KL_KEYS.items():
        if old not in out:
            continue
        value = out.pop(old)
        notes.append(f"ppo.{old} is deprecated: read as ppo.kl.{new}; write that instead")
        group = out.get("kl", {})
        if hasattr(group, "model_dump"):  # an attribute assigned on a validated config
            group = group.model_dump()
        if not isinstance(group, dict):
            problems.append(((old, "kl"), f"ppo.kl is a section and {old} goes into it as kl.{new}"))
            continue
        if new in group and group[new] != value:
            problems.append(
                ((old, f"kl.{new}"), f"both set, to {value!r} and {group[new]!r}; keep kl.{new} only")
            )
            continue
        out["kl"] = {**group, new: value}

    switches = {old: out.pop(old) for old in REWARD_SWITCHES if old in out}
    if not switches:
        return out, notes, problems
    for old, value in switches.items():
        if not isinstance(value, bool):
            problems.append(
                ((old,), f"must be true or false (got {value!r}); write reward_transform instead")
            )
    if all(switches.get(old) is True for old in REWARD_SWITCHES):
        problems.append(
            (
                ("reward_norm", "reward_scaling"),
                "choose one (normalisation divides by the running std too); write reward_transform: normalize "
                "or scale instead",
            )
        )
    if problems:
        return out, notes, problems
    written = out.get("reward_transform")
    transform = _switched(switches, transform_below if written is None else written)
    for old in switches:
        notes.append(
            f"ppo.{old} is deprecated: read as ppo.reward_transform: {transform}; write that instead"
        )
    if written is not None and transform != written:
        problems.extend(
            (
                (old, "reward_transform"),
                f"{old}: {str(value).lower()} asks for reward_transform {transform}, not {written}; "
                "keep reward_transform only",
            )
            for old, value in switches.items()
        )
    out["reward_transform"] = transform
    return out, notes, problems


def _switched(switches: dict[str, bool], transform: str) -> str:
    for old, value in switches.items():
        if value:
            return REWARD_SWITCHES[old]
        if transform == REWARD_SWITCHES[old]:
            transform = "none"
    return transform


def warn_deprecated(notes: list[str]) -> None:
    """Each note once per process (a resumed run reads its saved config twice)."""
    for note in notes:
        if note not in _warned:
            _warned.add(note)
            console().warning("warning: %s", note)
