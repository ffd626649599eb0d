"""The tables of interchangeable parts (ppomax.algos.registry): every declared entry has its function, the config
accepts exactly the declared names and checks combinations from the specs, the update dispatches through the
table (an unknown name is an error, never another estimator), and a new entry needs no other file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest
import torch

from ppo_helpers import synthetic_experience
from ppomax.algos import RunningMoments
from ppomax.algos.estimators import AdvantageInputs, advantages_of, grpo_advantages, rloo_advantages
from ppomax.algos.registry import ADVANTAGE_ESTIMATORS, KL_ESTIMATORS, AdvantageEstimatorSpec, Table
from ppomax.config import PPOSettings, load_config
from ppomax.errors import ConfigError
from ppomax.ppo.advantages import compute_advantages

SRC = Path(__file__).resolve().parents[1] / "src"
TABLES = (ADVANTAGE_ESTIMATORS, KL_ESTIMATORS)


@pytest.mark.parametrize("table", TABLES, ids=lambda t: t.kind)
def test_every_declared_entry_has_its_function(table):
    assert table.names()
    for name in table.names():
        assert callable(table.function(name))


@pytest.mark.parametrize("table", TABLES, ids=lambda t: t.kind)
def test_the_config_accepts_exactly_the_declared_names(table):
    *group, key = table.kind.split(".")  # kl.estimator: the key `estimator` of the section ppo.kl
    section = PPOSettings.model_fields[group[0]].annotation if group else PPOSettings
    assert set(get_args(section.model_fields[key].annotation)) == set(table.names())

    def settings(name):
        return PPOSettings(**({group[0]: {key: name}} if group else {key: name}))

    for name in table.names():
        try:
            settings(name)
        except ValueError as err:  # a combination error is fine; an unknown name is not
            assert "Input should be" not in str(err)
    with pytest.raises(ValueError, match="Input should be"):
        settings("nonexistent")


@pytest.mark.parametrize("table", TABLES, ids=lambda t: t.kind)
def test_an_unknown_name_is_an_error_listing_the_declared_ones(table):
    with pytest.raises(ValueError, match=f"unknown {table.kind} 'nonexistent'; expected one of: "):
        table.function("nonexistent")


def test_the_config_reads_the_tables_without_torch():
    code = "import sys, ppomax.config; sys.exit(int('torch' in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(SRC)}).returncode == 0


def test_the_update_never_sends_an_unknown_estimator_to_another():
    """A name that passed no validation (a settings object built without it) reaches the update: an error naming
    the table's entries, not RLOO's advantages."""
    cfg = load_config("ppo", preset="rloo")
    ppo = PPOSettings.model_construct(**{**dict(cfg.ppo), "advantage_estimator": "rloo_typo"})
    with pytest.raises(ValueError, match="unknown advantage_estimator 'rloo_typo'"):
        compute_advantages(
            synthetic_experience([1.5, -0.5, 2.0, 0.25]),
            ppo,
            cfg.generation,
            RunningMoments(),
            kl_coef=ppo.kl.coef,
        )


@pytest.mark.parametrize("name", ["grpo", "rloo"])
def test_the_update_dispatches_through_the_table(name):
    cfg = load_config("ppo", preset=name)
    exp = synthetic_experience([1.5, -0.5, 2.0, 0.25])
    compute_advantages(exp, cfg.ppo, cfg.generation, RunningMoments(), kl_coef=cfg.ppo.kl.coef)
    fn = grpo_advantages if name == "grpo" else rloo_advantages
    train = exp.response_mask & torch.isfinite(exp.final_scores).unsqueeze(1)
    torch.testing.assert_close(exp.advantages, fn(exp.rewards, train, cfg.generation.samples_per_prompt))


def test_the_specs_decide_the_config_checks():
    """Critic and groups come from the spec: a critic-free estimator refuses critic keys, a group estimator
    refuses one sample per prompt, both naming the keys."""
    for name in ADVANTAGE_ESTIMATORS.names():
        spec = ADVANTAGE_ESTIMATORS.spec(name)
        assert PPOSettings(advantage_estimator=name, critic_pretrain_steps=0).uses_critic is spec.critic
        if spec.groups == "required":
            with pytest.raises(
                ConfigError, match=r"ppo\.advantage_estimator, generation\.samples_per_prompt"
            ):
                load_config(
                    "ppo", overrides=[f"ppo.advantage_estimator={name}", "ppo.critic_pretrain_steps=0"]
                )
    for name in KL_ESTIMATORS.names():
        over = [f"ppo.kl.estimator={name}", "ppo.kl.acts_in=loss"]
        if KL_ESTIMATORS.spec(name).as_loss:
            load_config("ppo", overrides=over)
        else:
            with pytest.raises(ConfigError, match=r"ppo\.kl\.acts_in, ppo\.kl\.estimator"):
                load_config("ppo", overrides=over)


def test_a_table_entry_is_one_spec_and_one_decorated_function():
    table: Table[AdvantageEstimatorSpec] = Table(
        "advantage_estimator", (AdvantageEstimatorSpec("zero", False, "any", "test"),), __name__
    )

    @table.implements("zero")
    def _zero(x: AdvantageInputs):
        return torch.zeros_like(x.rewards), torch.zeros_like(x.rewards)

    assert table.function("zero") is _zero
    with pytest.raises(ValueError, match="implemented twice"):
        table.implements("zero")(_zero)
    with pytest.raises(ValueError, match="unknown advantage_estimator 'other'"):
        table.implements("other")


def test_advantages_of_gae_needs_values():
    x = AdvantageInputs(torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="needs the critic's values"):
        advantages_of("gae", x)
