"""Config loading, presets, overrides and validation."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from ppomax.cli import main
from ppomax.config import (
    PRESET_NAMES,
    PPOConfig,
    RMConfig,
    SFTConfig,
    apply_overrides,
    load_config,
    parse_override,
    preset_path,
    to_yaml,
)
from ppomax.errors import ConfigError

TABLE_KEYS = [
    "kl",
    "importance_sampling",
    "entropy_coef",
    "entropy_clip",
    "reward_transform",
    "reward_clip",
    "advantage_norm",
    "advantage_clip",
    "value_clip",
    "critic_init",
    "critic_pretrain_steps",
    "gamma",
    "lam",
    "clip_ratio",
    "max_grad_norm",
    "ptx_coef",
    "rollout_batch_size",
    "buffer_size",
]


def test_every_design_table_key_exists():
    fields = PPOConfig.model_fields["ppo"].annotation.model_fields
    missing = [k for k in TABLE_KEYS if k not in fields]
    assert not missing


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_presets_load_and_every_number_is_commented(name):
    cfg = load_config("ppo", preset=name)
    assert cfg.preset == name
    for line in preset_path(name).read_text().splitlines():
        stripped = line.strip()
        if ":" in stripped and not stripped.startswith("#") and not stripped.endswith(":"):
            assert "#" in stripped, f"{name}: uncommented value: {line!r}"


def test_ppo_max_matches_the_paper_recipe():
    ppo = load_config("ppo", preset="ppo_max").ppo
    assert ppo.kl.coef == 0.05 and ppo.kl.estimator == "k1"
    assert ppo.importance_sampling and ppo.reward_transform == "normalize" and ppo.reward_clip is not None
    assert not ppo.advantage_norm and ppo.advantage_clip is None  # 5.4 lists it not; fig. 5 marks it not
    assert ppo.value_clip == 0.2 and ppo.clip_ratio == 0.2 and ppo.max_grad_norm == 1.0
    assert ppo.critic_init == "reward_model" and ppo.critic_pretrain_steps > 0
    assert ppo.entropy_coef == 0
    assert (ppo.gamma, ppo.lam) == (1.0, 0.95)


def test_vanilla_turns_the_tricks_off():
    ppo = load_config("ppo", preset="vanilla").ppo
    assert ppo.kl.coef == 0 and ppo.reward_transform == "none" and ppo.reward_clip is None
    assert not ppo.advantage_norm and ppo.value_clip is None and ppo.critic_pretrain_steps == 0
    assert ppo.clip_ratio == 0.2


def test_ppo_ptx_inherits_ppo_max():
    ptx = load_config("ppo", preset="ppo_ptx")
    base = load_config("ppo", preset="ppo_max")
    assert ptx.ppo.ptx_coef > 0
    assert ptx.ppo.model_copy(update={"ptx_coef": 0.0}) == base.ppo
    with pytest.raises(ConfigError, match=r"data\.ptx"):
        ptx.model_copy(
            update={"model": ptx.model.model_copy(update={"policy": "p", "reward": "r"})}
        ).check_runnable()


def test_overrides_are_typed_yaml_values():
    assert parse_override("ppo.reward_clip=null") == (["ppo", "reward_clip"], None)
    assert parse_override("ppo.kl.coef=0.1") == (["ppo", "kl", "coef"], 0.1)
    cfg = load_config("ppo", preset="ppo_max", overrides=["ppo.kl.coef=0.1", "ppo.value_clip=null", "seed=7"])
    assert cfg.ppo.kl.coef == 0.1 and cfg.ppo.value_clip is None and cfg.seed == 7
    assert apply_overrides({"a": {"b": 1}}, ["a.c=2"]) == {"a": {"b": 1, "c": 2}}


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("ppo.kl_cof=0.1", r"ppo\.kl_cof: unknown key"),
        ("ppo.kl.estimator=k4", r"ppo\.kl\.estimator: must be one of 'k1', 'k2' or 'k3'"),
        ("generation.top_p=1.5", r"generation\.top_p: .*less than or equal to 1"),
        ("ppo.kl.coef=-1", r"ppo\.kl\.coef: .*greater than or equal to 0"),
        ("ppo.buffer_size=100", r"multiple of rollout_batch_size"),
        ("nonsense", r"expected KEY=VALUE"),
    ],
)
def test_bad_values_name_the_key(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config("ppo", preset="ppo_max", overrides=[override])


def test_yaml_file_on_top_of_preset(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: vanilla\nppo:\n  kl:\n    coef: 0.01\nmodel:\n  policy: /models/sft\n")
    cfg = load_config("ppo", path=path)
    assert cfg.preset == "vanilla" and cfg.ppo.kl.coef == 0.01 and cfg.model.policy == "/models/sft"
    assert cfg.ppo.value_clip is None  # inherited from vanilla


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config("ppo", path=tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("ppo: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config("ppo", path=bad)
    with pytest.raises(ConfigError, match="presets are PPO configs"):
        load_config("sft", preset="ppo_max")


def test_resolved_yaml_round_trips(tmp_path):
    cfg = load_config("ppo", preset="ppo_max", overrides=["ppo.kl.coef=0.2"])
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config("ppo", path=path) == cfg
    for cls in (SFTConfig, RMConfig):
        assert cls.model_validate(yaml.safe_load(to_yaml(cls()))) == cls()


def test_check_runnable_names_missing_keys():
    with pytest.raises(ConfigError) as err:
        load_config("ppo", preset="ppo_max").check_runnable()
    assert "model.policy" in str(err.value) and "data.prompts" in str(err.value)


def test_cli_config_prints_resolved_preset(capsys):
    assert main(["config", "--preset", "ppo_max", "--set", "ppo.kl.coef=0.3"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["ppo"]["kl"]["coef"] == 0.3 and printed["preset"] == "ppo_max"
    assert main(["config", "--preset", "ppo_max", "--set", "ppo.nope=1"]) == 2
    assert "ppo.nope: unknown key" in capsys.readouterr().err


def test_console_script_entry_point():
    out = subprocess.run(
        [sys.executable, "-m", "ppomax.cli", "config", "--preset", "vanilla"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "  kl:\n    coef: 0.0\n" in out.stdout


# --------------------------------------------------------------------------- cross-key errors


@pytest.mark.parametrize(
    ("overrides", "line"),
    [
        (
            ["ppo.buffer_size=100", "ppo.minibatch_size=4"],
            "  ppo.buffer_size, ppo.rollout_batch_size: buffer_size (100) must be a multiple of rollout_batch_size (32)",
        ),
        (
            ["ppo.buffer_size=96", "ppo.rollout_batch_size=64"],
            "  ppo.buffer_size, ppo.rollout_batch_size: buffer_size (96) must be a multiple of rollout_batch_size (64)",
        ),
        (
            ["ppo.buffer_size=96", "ppo.minibatch_size=64"],
            "  ppo.buffer_size, ppo.minibatch_size: buffer_size (96) must be a multiple of minibatch_size (64)",
        ),
    ],
)
def test_cross_key_errors_name_exactly_the_keys_involved(overrides, line):
    with pytest.raises(ConfigError) as err:
        load_config("ppo", preset="ppo_max", overrides=overrides)
    lines = str(err.value).splitlines()
    assert lines == ["invalid config (preset ppo_max + --set):", line]


def test_cross_key_errors_are_all_reported_one_line_each(capsys):
    over = ["--set", "ppo.buffer_size=100", "--set", "ppo.minibatch_size=64"]
    assert main(["config", "--preset", "ppo_max", *over]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[1:] == [
        "  ppo.buffer_size, ppo.rollout_batch_size: buffer_size (100) must be a multiple of rollout_batch_size (32)",
        "  ppo.buffer_size, ppo.minibatch_size: buffer_size (100) must be a multiple of minibatch_size (64)",
    ]
    assert "importance_sampling" not in "\n".join(err)  # not the whole section


# --------------------------------------------------------------------------- score re-parameterisation


@pytest.mark.parametrize(
    ("overrides", "line"),
    [
        (
            ["ppo.reward_transform=none"],
            "  ppo.reward_clip, ppo.reward_transform: reward_clip is in running-std units and needs "
            "reward_transform normalize or scale; set reward_clip: null to use the raw score",
        ),
        (
            ["ppo.entropy_clip=30"],
            "  ppo.entropy_clip, ppo.entropy_coef: entropy_clip bounds the entropy bonus, which entropy_coef: 0 "
            "turns off; set entropy_coef > 0 or entropy_clip: null",
        ),
    ],
)
def test_conflicting_score_and_bonus_settings_are_errors_naming_both_keys(overrides, line):
    with pytest.raises(ConfigError) as err:
        load_config("ppo", preset="ppo_max", overrides=overrides)
    assert str(err.value).splitlines() == ["invalid config (preset ppo_max + --set):", line]


@pytest.mark.parametrize(
    ("overrides", "transform", "clip"),
    [
        ([], "normalize", 5.0),  # PPO-max
        (["ppo.reward_clip=0.3"], "normalize", 0.3),  # fig. 6 "reward normalize, delta = 0.3"
        # fig. 6 "reward scale"
        (["ppo.reward_transform=scale", "ppo.reward_clip=null"], "scale", None),
        (["ppo.reward_transform=scale"], "scale", 5.0),
        (["ppo.reward_transform=none", "ppo.reward_clip=null"], "none", None),
        (["ppo.entropy_coef=0.01", "ppo.entropy_clip=30"], "normalize", 5.0),  # app. B.3
    ],
)
def test_every_paper_variant_is_a_preset_plus_overrides(overrides, transform, clip):
    ppo = load_config("ppo", preset="ppo_max", overrides=overrides).ppo
    assert (ppo.reward_transform, ppo.reward_clip) == (transform, clip)
    fig6_adv = load_config(
        "ppo", preset="vanilla", overrides=["ppo.advantage_norm=true", "ppo.advantage_clip=0.5"]
    )
    assert fig6_adv.ppo.reward_transform == "none" and fig6_adv.ppo.advantage_clip == 0.5


# --------------------------------------------------------------------------- non-finite and boolean numbers


def _numeric_keys(cls, prefix: str = "") -> list[tuple[str, type]]:
    """Every dotted key whose field takes an int or a float (``int | None`` too), found independently of the
    config module: from the annotations pydantic resolved."""
    from typing import Union, get_args, get_origin

    from pydantic import BaseModel

    keys = []
    for name, info in cls.model_fields.items():
        ann = info.annotation
        args = get_args(ann) if get_origin(ann) in (Union, type(int | None)) else (ann,)
        sub = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        if sub:
            keys += _numeric_keys(sub[0], f"{prefix}{name}.")
        elif float in args or (int in args and bool not in args):
            keys.append((f"{prefix}{name}", float if float in args else int))
    return keys


NUMERIC = sorted(
    {
        (kind, key, t)
        for kind, cls in (("sft", SFTConfig), ("rm", RMConfig), ("ppo", PPOConfig))
        for key, t in _numeric_keys(cls)
    }
)


def test_the_numeric_keys_are_found():
    keys = {(kind, key) for kind, key, _ in NUMERIC}
    assert {("ppo", "ppo.iterations"), ("ppo", "ppo.kl.coef"), ("ppo", "generation.temperature")} <= keys
    assert {("sft", "epochs"), ("rm", "optim.lr"), ("ppo", "seed")} <= keys
    assert len(NUMERIC) > 60


@pytest.mark.parametrize(("kind", "key", "type_"), NUMERIC)
def test_non_finite_floats_and_booleans_for_numbers_are_errors_naming_the_key(kind, key, type_):
    """`ppo.iterations=true` was taken as 1, `ppo.kl.coef=.inf` died at step 1 with a misleading message and
    `generation.temperature=.inf` trained on uniform samples."""
    values = ["true", "false"] + ([".inf", "-.inf", ".nan", "1e999"] if type_ is float else [])
    for value in values:
        with pytest.raises(ConfigError) as err:
            load_config(kind, overrides=[f"{key}={value}"])
        line = next(ln for ln in str(err.value).splitlines() if ln.strip().startswith(f"{key}:"))
        expected = (
            "must be a number, not " if value in ("true", "false") else "Input should be a finite number"
        )
        assert expected in line, (key, value, str(err.value))


def test_booleans_stay_booleans_and_finite_numbers_stay_numbers():
    cfg = load_config(
        "ppo", overrides=["model.trust_remote_code=true", "ppo.kl.coef=1e-3", "ppo.iterations=3", "seed=0"]
    )
    assert cfg.model.trust_remote_code is True and cfg.ppo.kl.coef == 1e-3 and cfg.ppo.iterations == 3
    assert cfg.seed == 0 and type(cfg.seed) is int


def test_yaml_syntax_errors_are_one_line_with_the_line(tmp_path):
    """Found by tests/test_fuzz_config.py: PyYAML's messages span lines (a copy of the input with a caret)."""
    with pytest.raises(ConfigError) as err:
        load_config("ppo", overrides=["ppo.kl.coef=!!python/object/apply:os.system ['true']"])
    assert str(err.value) == (
        "--set \"ppo.kl.coef=!!python/object/apply:os.system ['true']\": value is not valid YAML: could not "
        "determine a constructor for the tag 'tag:yaml.org,2002:python/object/apply:os.system' (line 1, column 1)"
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text("ppo:\n  vf_coef: 0.1\n  iterations: [1\n")
    with pytest.raises(ConfigError) as err:
        load_config("ppo", path=bad)
    assert str(err.value) == (
        f"{bad}:4: not valid YAML: while parsing a flow sequence: expected ',' or ']', but got '<stream end>' "
        "(line 4, column 1)"
    )
    bad.write_bytes(b"ppo:\n  vf_coef: 0.1 # caf\xe9\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not UTF-8 text \(byte 0xe9\)$"):
        load_config("ppo", path=bad)


def test_odd_keys_are_one_line_errors():
    """Found by tests/test_fuzz_config.py: a key holding a line break printed on two lines, and `. .` was the
    blank key ' '."""
    with pytest.raises(ConfigError) as err:
        load_config("sft", overrides=["a\nb=1"])
    assert str(err.value) == "invalid config (--set):\n  'a\\nb': unknown key"
    with pytest.raises(ConfigError) as err:
        load_config("sft", overrides=[":x=1", "batch_size=true"])
    assert str(err.value).splitlines()[1:] == [
        "  batch_size: must be a number, not true (got True)",
        "  ':x': unknown key",
    ]
    with pytest.raises(ConfigError, match=r"^--set '\. \.=1': empty key$"):
        load_config("ppo", overrides=[". .=1"])
    for key in ("ppo..kl.coef", ".seed", "ppo. .kl.coef"):
        with pytest.raises(ConfigError) as err:
            load_config("ppo", overrides=[f"{key}=1"])
        assert str(err.value) == f"--set '{key}=1': empty part in the key {key!r}"


# --------------------------------------------------------------------------- dual clip, KL control


@pytest.mark.parametrize(
    ("overrides", "line"),
    [
        (
            ["ppo.dual_clip=3", "ppo.clip_ratio=null"],
            "  ppo.dual_clip, ppo.clip_ratio: the dual clip bounds the clipped surrogate, which clip_ratio: null "
            "turns off; set clip_ratio or dual_clip: null",
        ),
        (
            ["ppo.kl.target=6", "ppo.kl.coef=0"],
            "  ppo.kl.target, ppo.kl.coef: the adaptive KL coefficient starts from coef and multiplies it, so "
            "from 0 it stays 0; set coef > 0 (its initial value) or target: null",
        ),
        (
            ["ppo.kl.horizon=500"],
            "  ppo.kl.horizon, ppo.kl.target: horizon sets the speed of the adaptive KL coefficient, which "
            "target: null turns off; set target or leave horizon at its default",
        ),
        (
            ["ppo.kl.acts_in=loss"],
            "  ppo.kl.acts_in, ppo.kl.estimator: k1 as a loss has zero expected gradient (E[grad log pi] = 0): it "
            "would add noise, not a KL penalty; set estimator: k3 (GRPO) or k2",
        ),
    ],
)
def test_dual_clip_and_kl_control_conflicts_name_both_keys(overrides, line):
    with pytest.raises(ConfigError) as err:
        load_config("ppo", preset="ppo_max", overrides=overrides)
    assert str(err.value).splitlines() == ["invalid config (preset ppo_max + --set):", line]


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("ppo.dual_clip=1", r"ppo\.dual_clip: .*greater than 1"),
        ("ppo.kl.target=0", r"ppo\.kl\.target: .*greater than 0"),
        ("ppo.kl.horizon=0", r"ppo\.kl\.horizon: .*greater than 0"),
        ("ppo.kl.acts_in=both", r"ppo\.kl\.acts_in: must be one of 'reward' or 'loss'"),
    ],
)
def test_dual_clip_and_kl_control_bad_values_name_the_key(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config("ppo", preset="ppo_max", overrides=[override])


def test_dual_clip_and_kl_control_defaults_are_off_and_combine():
    ppo = load_config("ppo", preset="ppo_max").ppo
    assert (
        ppo.dual_clip is None
        and ppo.kl.target is None
        and ppo.kl.horizon == 10000
        and ppo.kl.acts_in == "reward"
    )
    ppo = load_config(
        "ppo",
        preset="ppo_max",
        overrides=[
            "ppo.dual_clip=3",
            "ppo.kl.target=6",
            "ppo.kl.horizon=500",
            "ppo.kl.acts_in=loss",
            "ppo.kl.estimator=k3",
        ],
    ).ppo
    assert (ppo.dual_clip, ppo.kl.target, ppo.kl.horizon, ppo.kl.acts_in, ppo.kl.estimator) == (
        3,
        6,
        500,
        "loss",
        "k3",
    )


@pytest.mark.parametrize(
    "overrides, one_step",
    [
        ([], False),  # PPO-max: 4 minibatches of 32
        (["ppo.buffer_size=32", "ppo.rollout_batch_size=32"], True),
        (["ppo.buffer_size=32", "ppo.rollout_batch_size=32", "ppo.ppo_epochs=2"], False),
        (["ppo.buffer_size=32", "ppo.rollout_batch_size=32", "ppo.micro_batch_size=16"], False),
        (["ppo.buffer_size=32", "ppo.rollout_batch_size=32", "ppo.micro_batch_size=32"], True),
    ],
)
def test_one_step_update_is_one_epoch_over_the_whole_buffer_in_one_forward(overrides, one_step):
    assert load_config("ppo", preset="ppo_max", overrides=overrides).ppo.one_step_update is one_step
