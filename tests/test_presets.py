"""The shipped presets against the Python defaults, and their citations."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from ppomax.config import (
    OptimConfig,
    PPOConfig,
    RMConfig,
    SFTConfig,
    deep_merge,
    load_config,
    preset_path,
    read_preset,
    read_yaml,
)


def _leaves(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_python_defaults_are_ppo_max_on_every_key():
    """One source of truth: a PPO config without a preset is PPO-max, key by key."""
    plain = _leaves(load_config("ppo").model_dump(mode="json"))
    preset = _leaves(load_config("ppo", preset="ppo_max").model_dump(mode="json"))
    assert plain.keys() == preset.keys()
    differ = {k: (plain[k], preset[k]) for k in plain if k != "preset" and plain[k] != preset[k]}
    assert not differ, f"Python default != ppo_max preset: {differ}"
    assert PPOConfig().model_dump(exclude={"preset"}) == load_config("ppo").model_dump(exclude={"preset"})


def test_ppo_max_preset_sets_nothing_the_defaults_do_not():
    """The recipe lives in ppomax.config (with its sources); the preset file only names it."""
    assert read_yaml(preset_path("ppo_max")) == {}


@pytest.mark.parametrize(
    "name", ["vanilla", "ppo_ptx", "grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"]
)
def test_presets_inherit_ppo_max_and_set_only_what_differs(name):
    own = read_yaml(preset_path(name))
    assert own.pop("inherit") == "ppo_max"
    base = _leaves(load_config("ppo", preset="ppo_max").model_dump(mode="json"))
    same = {k: v for k, v in _leaves(own).items() if base[k] == v}
    assert not same, f"{name} repeats ppo_max's values: {same}"
    resolved = PPOConfig.model_validate(deep_merge(read_preset("ppo_max"), own))
    assert resolved.model_dump(exclude={"preset"}) == load_config("ppo", preset=name).model_dump(
        exclude={"preset"}
    )


def test_ppo_defaults_do_not_change_sft_and_rm():
    """SFT/RM share OptimConfig; PPO-max's optimiser defaults (Adam eps 1e-6, 10 warmup steps) are PPO's own."""
    for cls in (SFTConfig, RMConfig):
        optim = cls().optim
        assert type(optim) is OptimConfig
        assert optim.adam_eps == 1e-8 and optim.warmup_steps is None and optim.warmup_ratio == 0.0
    ppo = PPOConfig().optim
    assert ppo.adam_eps == 1e-6 and ppo.warmup_steps == 10


def test_cli_prints_the_resolved_ppo_max(capsys):
    from ppomax.cli import main

    assert main(["config", "--preset", "ppo_max"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["ppo"]["kl"]["coef"] == 0.05 and printed["optim"]["adam_eps"] == 1e-6
    assert printed["ppo"]["critic_pretrain_steps"] == 10 and printed["preset"] == "ppo_max"
    assert re.search(r"\bgamma\b", yaml.safe_dump(printed))


# --------------------------------------------------------------------------- item 9: every value names a source

SOURCE = re.compile(r"\b(paper|MOSS-RLHF code|ours)\b", re.IGNORECASE)


def _recipe_fields():
    from ppomax.config import GenerationConfig, KLSettings, PPOOptimConfig, PPOSettings

    for cls in (GenerationConfig, PPOOptimConfig, PPOSettings, KLSettings):
        for name, field in cls.model_fields.items():
            if cls is PPOOptimConfig and name == "lr":  # SFT/RM's; not used by PPO
                continue
            yield f"{cls.__name__}.{name}", field.description or ""


def test_every_ppo_default_names_its_source():
    """The mechanical half of item 9: every PPO-max value (the Python defaults) says where it comes from."""
    missing = [name for name, desc in _recipe_fields() if not SOURCE.search(desc)]
    assert not missing, f"no source (paper / MOSS-RLHF code / ours) in the description of: {missing}"


@pytest.mark.parametrize("name", ["vanilla", "ppo_ptx"])
def test_every_preset_value_names_its_source(name):
    for line in preset_path(name).read_text().splitlines():
        code, _, comment = line.partition("#")
        if code.strip() and not code.strip().endswith(":") and not code.startswith("inherit:"):
            assert SOURCE.search(comment), f"{name}: no source in the comment of {line!r}"


BEYOND = {  # the critic-free presets cite their own papers
    "grpo": re.compile(r"\b(Shao et al\.|ours)"),
    "rloo": re.compile(r"\b(Ahmadian et al\.|ours)"),
    "reinforce_pp": re.compile(r"\b(Hu 2025|ours)"),
    "reinforce_pp_baseline": re.compile(r"\b(Hu 2025|ours)"),
}


@pytest.mark.parametrize("name", sorted(BEYOND))
def test_every_critic_free_preset_value_names_its_source(name):
    text = preset_path(name).read_text()
    assert re.search(r"arXiv|DeepSeekMath|Back to Basics", text)  # the header names the paper
    for line in text.splitlines():
        code, _, comment = line.partition("#")
        if code.strip() and not code.strip().endswith(":") and not code.startswith("inherit:"):
            assert BEYOND[name].search(comment), f"{name}: no source in the comment of {line!r}"


@pytest.mark.parametrize("name", sorted(BEYOND))
def test_cli_prints_the_resolved_critic_free_presets(name, capsys):
    from ppomax.cli import main

    assert main(["config", "--preset", name]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["preset"] == name and printed["ppo"]["advantage_estimator"] == name
    assert printed["ppo"]["critic_pretrain_steps"] == 0
    assert printed["generation"]["samples_per_prompt"] == (1 if name == "reinforce_pp" else 4)
    assert printed["optim"]["adam_eps"] == 1e-6  # inherited from ppo_max


def test_citations_checked_against_the_paper_text():
    """Citations that were wrong once, against the paper's text: app. C.3 uses lambda 0.9 (0.95 is
    MOSS-RLHF's), the sampling settings are given in section 6.1, eq. 15 gives no epsilon, app. C.3 no gamma."""
    desc = dict(_recipe_fields())
    for key in ("temperature", "top_p", "repetition_penalty"):
        assert "6.1" in desc[f"GenerationConfig.{key}"] and "5.1" not in desc[f"GenerationConfig.{key}"]
    assert desc["PPOSettings.lam"].startswith("MOSS-RLHF code") and "0.9" in desc["PPOSettings.lam"]
    assert desc["PPOSettings.gamma"].startswith("MOSS-RLHF code")
    assert "MOSS-RLHF code" in desc["PPOSettings.clip_ratio"]
    assert "Importance Sample" in desc["PPOSettings.importance_sampling"]  # item 3: fig. 7's curve is `false`
