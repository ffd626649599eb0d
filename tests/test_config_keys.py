"""Keys a user can discover: `ppomax config --explain`, the nearest key to an unknown one, hints for TRL-style flags
and Hydra-style overrides, quoting hints for YAML's booleans and numbers, and keys a command never reads refused."""

from __future__ import annotations

import pytest

from ppomax.cli import main
from ppomax.config import CONFIG_CLASSES, load_config, to_yaml
from ppomax.config_keys import all_keys, key_docs, nearest_keys
from ppomax.errors import ConfigError


def _error(kind: str, *overrides: str) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(kind, overrides=list(overrides))  # type: ignore[arg-type]
    return str(err.value)


@pytest.mark.parametrize(
    ("kind", "unknown", "expected"),
    [
        ("sft", "lr", "optim.lr"),
        ("ppo", "lr", "optim.policy_lr or optim.critic_lr"),
        ("ppo", "learning_rate", "optim.policy_lr or optim.critic_lr"),
        ("ppo", "kl_coef", "ppo.kl.coef"),
        ("ppo", "generation.temprature", "generation.temperature"),
        ("sft", "num_train_epochs", "epochs"),
    ],
)
def test_an_unknown_key_suggests_the_nearest(kind, unknown, expected):
    assert f"{unknown}: unknown key; did you mean {expected}?" in _error(kind, f"{unknown}=1")


def test_nothing_close_is_just_unknown():
    assert "zzzz: unknown key\n" in _error("sft", "zzzz=1") + "\n"
    assert nearest_keys("zzzz", CONFIG_CLASSES["sft"]) == []


@pytest.mark.parametrize(("value", "what"), [("off", "the boolean false"), ("2024", "the number 2024")])
def test_text_that_yaml_reads_as_bool_or_number_says_to_quote_it(value, what):
    text = _error("sft", f"model.policy={value}")
    assert (
        f"model.policy: must be text, but YAML read the unquoted value as {what}" in text
        and "quote it" in text
    )
    assert load_config("sft", overrides=[f'model.policy="{value}"']).model.policy == value  # quoted: taken


@pytest.mark.parametrize(
    ("kind", "override", "key"),
    [
        ("ppo", "optim.lr=3e-4", "optim.lr"),  # PPO trains with policy_lr / critic_lr
        ("sft", "model.reward=rm", "model.reward"),
        ("rm", "model.critic=c", "model.critic"),
        ("sft", "model.lora.critic=false", "model.lora.critic"),
        ("sft", "data.test=t.jsonl", "data.test"),  # train-rm's
        ("rm", "logging.eval_samples=8", "logging.eval_samples"),
    ],
)
def test_keys_a_command_never_reads_are_errors(kind, override, key):
    assert f"{key}: " in _error(kind, override)


def test_configs_written_by_earlier_versions_still_load():
    """An earlier config.yaml holds every key of the shared sections at its default (PPO's unused optim.lr, SFT's
    model.reward: null...): those values load (they never had an effect) and are not written again."""
    old_sft = {
        "model": {
            "policy": "p",
            "reward": None,
            "critic": None,
            "reference": None,
            "lora": {"r": 4, "critic": True},
        },
        "data": {"test": None},
        "logging": {"eval_samples": 32, "eval_greedy": True},
    }
    sft = CONFIG_CLASSES["sft"].model_validate(old_sft)
    assert sft.model.lora is not None and sft.model.lora.r == 4
    assert "reward" not in to_yaml(sft) and "eval_samples" not in to_yaml(sft)
    ppo = CONFIG_CLASSES["ppo"].model_validate({"optim": {"lr": 1e-5, "policy_lr": 1e-6}})
    assert ppo.optim.policy_lr == 1e-6 and "lr" not in ppo.optim.model_dump()


def test_two_warmups_are_an_error_naming_both():
    assert "optim.warmup_steps, optim.warmup_ratio: two warmups" in _error("ppo", "optim.warmup_ratio=0.1")
    assert load_config(
        "ppo", overrides=["optim.warmup_ratio=0.1", "optim.warmup_steps=null"]
    ).optim.warmup_ratio


def test_explain_lists_every_key_with_default_allowed_values_and_description(capsys):
    for kind in ("sft", "rm", "ppo"):
        assert main(["config", "--explain", "--kind", kind]) == 0
        out = capsys.readouterr().out
        for doc in key_docs(CONFIG_CLASSES[kind]):
            assert f"{doc.key} = {doc.default}    [{doc.allowed}]" in out
            assert doc.description, f"{kind}: {doc.key} has no description"
    assert main(["config", "--explain"]) == 0
    assert "ppo.kl.coef = 0.05    [number (>= 0)]" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["train-sft", "--learning_rate", "1e-5"], "--set optim.lr=1e-5"),
        (["train-ppo", "--learning_rate=1e-5"], "--set optim.policy_lr=1e-5 or --set optim.critic_lr=1e-5"),
        (["train-ppo", "ppo.kl.coef=0.1"], "--set ppo.kl.coef=0.1"),
        (["train-rm", "--beta", "0.5"], "--set beta_rm=0.5"),
    ],
)
def test_config_keys_as_flags_get_a_one_line_hint(argv, expected, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err and "ppomax config --explain" in err, err


def test_training_help_says_where_the_keys_are(capsys):
    with pytest.raises(SystemExit):
        main(["train-ppo", "--help"])
    assert "ppomax config --explain --kind ppo" in " ".join(capsys.readouterr().out.split())


def test_every_key_is_reachable_by_set():
    for kind, cls in CONFIG_CLASSES.items():
        for key in all_keys(cls):
            if key in ("model.lora", "reward.functions"):  # a section / a list, set as a whole
                continue
            default = next(d.default for d in key_docs(cls) if d.key == key)
            load_config(kind, overrides=[f"{key}={default}"])  # type: ignore[arg-type]


def test_a_data_source_is_a_path_a_list_or_a_mapping_of_load_dataset_arguments(tmp_path, capsys):
    hub = "{path: Anthropic/hh-rlhf, data_dir: harmless-base, split: test}"
    cfg = load_config(
        "rm",
        overrides=["data.train=Anthropic/hh-rlhf", f"data.valid={hub}", "data.test=[a.jsonl, 'b-*.parquet']"],
    )
    assert cfg.data.train == "Anthropic/hh-rlhf" and cfg.data.test == ["a.jsonl", "b-*.parquet"]
    assert cfg.data.valid.model_dump(exclude_none=True) == {  # type: ignore[union-attr]
        "path": "Anthropic/hh-rlhf",
        "data_dir": "harmless-base",
        "split": "test",
    }
    saved = tmp_path / "saved.yaml"
    saved.write_text(to_yaml(cfg))
    assert (
        load_config("rm", path=saved) == cfg
    )  # what a run saves reads back the same (a resume compares them)
    mapping = "a mapping has path, name, data_dir, data_files, split, revision"
    assert f"data.train: splits: unknown key ({mapping})" in _error(
        "rm", "data.train={path: x, splits: test}"
    )
    assert f"data.train: path: Field required ({mapping})" in _error("sft", "data.train={split: test}")
    assert "data.prompts: must be a path, a list of paths or a mapping {path, " in _error(
        "ppo", "data.prompts=3"
    )
    assert "data.valid_prompts: a list source holds file paths or globs" in _error(
        "ppo", "data.valid_prompts=[]"
    )
    assert main(["config", "--explain", "--kind", "ppo"]) == 0
    out = capsys.readouterr().out
    allowed = (
        "[text or a list of text or a mapping {path, name, data_dir, data_files, split, revision} or null]"
    )
    assert f"data.prompts = null    {allowed}" in out
    assert "data.prompts.path" not in out and "data.num_proc = 1    [integer (> 0)]" in out
    assert nearest_keys("dataset_name", CONFIG_CLASSES["rm"]) == ["data.train"]
