"""Keys of earlier versions: ``ppo.kl_coef`` ... ``ppo.kl_clamp`` are read into the ``ppo.kl`` group and
``ppo.reward_norm`` / ``ppo.reward_scaling`` into ``ppo.reward_transform``, each with one deprecation line; an old
key and its new key disagreeing in one source is an error naming both; a saved old-style ``config.yaml`` loads and
resumes; the repository itself (presets, demo and ablation variants) writes no old key."""

from __future__ import annotations

import pytest
import yaml

from helpers import assert_same_run
from ppo_helpers import config, make_setup
from ppomax import config_compat
from ppomax.config import PRESET_NAMES, PPOConfig, config_from, load_config, to_yaml
from ppomax.errors import ConfigError
from ppomax.monitor import read_metrics
from ppomax.ppo import train_ppo
from ppomax.trainers.run_dir import check_resumable, resume_config

#: old key -> its new key, written out here independently of ppomax.config_compat
OLD_KL = {
    "kl_coef": "coef",
    "kl_estimator": "estimator",
    "kl_in": "acts_in",
    "kl_target": "target",
    "kl_horizon": "horizon",
    "kl_clamp": "clamp",
}


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    """Each note is printed once per process; every test here starts with none printed."""
    monkeypatch.setattr(config_compat, "_warned", set())


def deprecations(capsys) -> list[str]:
    return [ln for ln in capsys.readouterr().err.splitlines() if "deprecated" in ln]


def old_style(cfg: PPOConfig) -> str:
    """``cfg`` as the config.yaml of a run made before the ``kl`` group and ``reward_transform``."""
    data = yaml.safe_load(to_yaml(cfg))
    ppo = data["ppo"]
    kl = ppo.pop("kl")
    for old, new in OLD_KL.items():
        ppo[old] = kl[new]
    transform = ppo.pop("reward_transform")
    ppo["reward_scaling"] = transform == "scale"
    ppo["reward_norm"] = transform == "normalize"
    return yaml.safe_dump(data, sort_keys=False)


def test_each_old_kl_key_is_read_into_the_group_with_one_line(capsys):
    values = {"kl_coef": 0.3, "kl_estimator": "k3", "kl_in": "loss", "kl_target": 2.0, "kl_horizon": 500}
    values["kl_clamp"] = 10.0
    cfg = load_config("ppo", overrides=[f"ppo.{k}={v}" for k, v in values.items()])
    assert {new: getattr(cfg.ppo.kl, new) for new in OLD_KL.values()} == {
        OLD_KL[k]: v for k, v in values.items()
    }
    lines = deprecations(capsys)
    assert lines == [
        f"ppomax: warning: ppo.{old} is deprecated: read as ppo.kl.{new}; write that instead"
        for old, new in OLD_KL.items()
    ]


@pytest.mark.parametrize(
    ("preset", "old", "transform"),
    [
        # true chooses its transform, whatever the config below had
        ("ppo_max", {"reward_scaling": True, "reward_norm": False}, "scale"),
        ("vanilla", {"reward_norm": True}, "normalize"),
        ("vanilla", {"reward_scaling": True}, "scale"),
        # false turns its own transform off and leaves the other
        ("ppo_max", {"reward_norm": False}, "none"),
        ("ppo_max", {"reward_scaling": False}, "normalize"),
        ("vanilla", {"reward_norm": False, "reward_scaling": False}, "none"),
        ("ppo_max", {"reward_norm": True, "reward_scaling": False}, "normalize"),
    ],
)
def test_the_reward_switches_read_as_they_meant(preset, old, transform, tmp_path, capsys):
    clip = [] if transform != "none" else ["ppo.reward_clip=null"]
    by_set = load_config(
        "ppo", preset=preset, overrides=[f"ppo.{k}={str(v).lower()}" for k, v in old.items()] + clip
    )
    path = tmp_path / "run.yaml"
    path.write_text(
        yaml.safe_dump({"preset": preset, "ppo": {**old, **({"reward_clip": None} if clip else {})}})
    )
    by_file = load_config("ppo", path=path)
    assert by_set.ppo.reward_transform == by_file.ppo.reward_transform == transform
    lines = deprecations(capsys)
    assert len(lines) == len(old), lines  # once per process, not once per source
    assert all(f"read as ppo.reward_transform: {transform}; write that instead" in ln for ln in lines)


def test_an_old_key_in_a_file_overrides_the_presets_new_key(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: grpo\nppo:\n  kl_coef: 0.1\n  reward_norm: true\n  reward_clip: 5\n")
    cfg = load_config("ppo", path=path)
    assert (cfg.ppo.kl.coef, cfg.ppo.kl.acts_in, cfg.ppo.reward_transform) == (0.1, "loss", "normalize")
    assert config_from("ppo", {"preset": "grpo", "ppo": {"kl_coef": 0.1}}).ppo.kl.coef == 0.1


@pytest.mark.parametrize(
    ("overrides", "line"),
    [
        (
            ["ppo.kl.coef=0.2", "ppo.kl_coef=0.3"],
            "  ppo.kl_coef, ppo.kl.coef: both set, to 0.3 and 0.2; keep kl.coef only",
        ),
        (
            ["ppo.reward_norm=true", "ppo.reward_transform=scale"],
            "  ppo.reward_norm, ppo.reward_transform: reward_norm: true asks for reward_transform normalize, not "
            "scale; keep reward_transform only",
        ),
        (
            ["ppo.reward_norm=true", "ppo.reward_scaling=true"],
            "  ppo.reward_norm, ppo.reward_scaling: choose one (normalisation divides by the running std too); "
            "write reward_transform: normalize or scale instead",
        ),
    ],
)
def test_an_old_and_a_new_key_that_disagree_are_an_error_naming_both(overrides, line, tmp_path, capsys):
    with pytest.raises(ConfigError) as err:
        load_config("ppo", preset="ppo_max", overrides=overrides)
    assert str(err.value).splitlines() == ["invalid config (--set):", line]
    ppo = {}
    for text in overrides:
        key, value = text.split("=")
        node = ppo
        *sections, leaf = key.split(".")[1:]
        for s in sections:
            node = node.setdefault(s, {})
        node[leaf] = yaml.safe_load(value)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"ppo": ppo}))
    with pytest.raises(ConfigError) as err:
        load_config("ppo", path=path)
    assert str(err.value).splitlines() == [f"invalid config ({path}):", line]
    with pytest.raises(ConfigError) as err:  # a dict built in Python: the section's own check
        config_from("ppo", {"ppo": ppo})
    assert str(err.value).splitlines() == ["invalid config (config dict):", line]
    assert deprecations(capsys) == []  # an error, not a warning and then an error


def test_old_and_new_keys_that_agree_are_read_once():
    cfg = load_config(
        "ppo",
        overrides=[
            "ppo.kl_coef=0.2",
            "ppo.kl.coef=0.2",
            "ppo.reward_norm=false",
            "ppo.reward_transform=none",
            "ppo.reward_clip=null",
        ],
    )
    assert cfg.ppo.kl.coef == 0.2 and cfg.ppo.reward_transform == "none"


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_a_saved_old_style_config_loads_as_the_same_config(preset, tmp_path, capsys):
    new = load_config("ppo", preset=preset)
    path = tmp_path / "config.yaml"
    path.write_text(old_style(new))
    assert "kl_coef" in path.read_text() and "reward_norm" in path.read_text()
    assert load_config("ppo", path=path) == new
    assert len(deprecations(capsys)) == 8


def test_the_repository_writes_no_old_key(capsys):
    from ppomax.demo.ablate import VARIANTS
    from ppomax.demo.profiles import FULL

    for name in PRESET_NAMES:
        load_config("ppo", preset=name)
    for v in VARIANTS:
        load_config("ppo", preset=v.preset, overrides=[o for o in v.overrides if o.startswith("ppo.")])
    for preset, overrides in FULL.ppo_overrides.items():
        load_config("ppo", preset=preset, overrides=list(overrides))
    assert deprecations(capsys) == []


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup(tmp_path_factory.mktemp("compat"))


@pytest.mark.usefixtures("one_thread")
def test_a_run_saved_with_old_keys_resumes_exactly(setup, tmp_path, capsys):
    """A run of 2 iterations whose config.yaml is then rewritten with the old keys (as an earlier version saved
    it) resumes to 3 iterations from it, as the same run resumed with its own config.yaml does."""
    for name, rewrite in (("new", False), ("old", True)):
        cfg = config(setup, "ppo.iterations=2", "ppo.kl.coef=0.2", out=str(tmp_path / name))
        train_ppo(cfg)
        run = tmp_path / name
        saved = run / "config.yaml"
        if rewrite:
            saved.write_text(old_style(load_config("ppo", path=saved)))
        resumed = resume_config("ppo", run, overrides=["ppo.iterations=3"])
        check_resumable(resumed, "ppo", saved)
        assert resumed.ppo.kl.coef == 0.2
        train_ppo(resumed, resume=True)
    assert [r["step"] for r in read_metrics(tmp_path / "old" / "metrics.jsonl")] == [1, 2, 3]
    assert_same_run(tmp_path / "new", tmp_path / "old")
    assert len(deprecations(capsys)) == 8  # the saved config is read twice, each note printed once
