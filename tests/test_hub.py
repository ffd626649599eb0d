"""Hub ids everywhere: every model path takes a local directory or ``org/name[@revision]``, loaded from the Hugging
Face cache (downloaded there when missing, unless HF_HUB_OFFLINE is set). Nothing downloads here: a hand-made Hub
cache (huggingface_hub's layout: ``models--org--name/snapshots/<commit>/...`` and ``refs/<branch>``) under a
temporary HF_HUB_CACHE, with HF_HUB_OFFLINE=1."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from ppo_helpers import TEXTS, config
from ppomax.cli import main
from ppomax.errors import ModelPathError
from ppomax.models import (
    ValueHeadModel,
    load_causal_lm,
    load_tokenizer,
    parse_hub_id,
    with_adapters,
)
from ppomax.models.hub import HubId
from tiny_lm import make_tiny_lm

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = torch.tensor([[1, 5, 17, 42, 7, 99], [1, 3, 3, 8, 250, 2]])
MASK = torch.ones_like(IDS)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty Hub cache, offline; returns a function that puts a local model directory into it as
    ``repo_id`` at a commit (and a branch or tag pointing at it)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(cache.parent))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # huggingface_hub reads these at import
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def put(repo_id: str, source: Path, commit: str = "a" * 40, ref: str = "main") -> Path:
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        snapshot = repo / "snapshots" / commit
        shutil.copytree(source, snapshot)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
        return snapshot

    return put


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_parse_hub_id():
    assert parse_hub_id("org/name") == HubId("org/name", None)
    assert parse_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct@v1.0") == HubId(
        "HuggingFaceTB/SmolLM2-135M-Instruct", "v1.0"
    )
    assert parse_hub_id("org/name@refs/pr/3") == HubId("org/name", "refs/pr/3")
    for local in ("./org/name", "/abs/name", "runs/sft/final", "name", "org/na--me", "org/name.git", "org/"):
        assert parse_hub_id(local) is None, local


def test_policy_tokenizer_reward_model_and_critic_load_from_the_hub_cache(tmp_path, hub):
    policy = make_tiny_lm(tmp_path, TEXTS, name="policy", seed=0)
    ValueHeadModel.from_causal_lm(policy, seed=1).save_pretrained(tmp_path / "rm")
    load_tokenizer(policy).save_pretrained(tmp_path / "rm")
    hub("org/policy", policy)
    hub("org/rm", tmp_path / "rm")
    torch.testing.assert_close(logits(load_causal_lm("org/policy")), logits(load_causal_lm(policy)))
    assert load_tokenizer("org/policy").get_vocab() == load_tokenizer(policy).get_vocab()
    with torch.no_grad():
        expected = ValueHeadModel.from_pretrained(tmp_path / "rm")(IDS, MASK).values
        torch.testing.assert_close(ValueHeadModel.from_pretrained("org/rm")(IDS, MASK).values, expected)
    # and the PPO trainer's models, all four named by Hub ids
    from ppo_helpers import PPOSetup
    from ppomax.ppo.models import load_models

    setup = PPOSetup(tmp_path, Path("org/policy"), Path("org/rm"), tmp_path / "p.jsonl", None, None)
    cfg = config(setup, "model.critic=org/rm", "model.reference=org/policy")
    models = load_models(cfg)
    with torch.no_grad():
        torch.testing.assert_close(models.reward_model(IDS, MASK).values, expected)
        torch.testing.assert_close(models.critic(IDS, MASK).values, expected)
    torch.testing.assert_close(logits(models.policy), logits(models.reference))


def test_a_revision_picks_its_snapshot(tmp_path, hub):
    first = make_tiny_lm(tmp_path, TEXTS, name="first", seed=0)
    second = make_tiny_lm(tmp_path, TEXTS, name="second", seed=1)
    hub("org/tiny", first, commit="1" * 40, ref="main")
    hub("org/tiny", second, commit="2" * 40, ref="v2")
    main_logits, second_logits = logits(load_causal_lm(first)), logits(load_causal_lm(second))
    torch.testing.assert_close(logits(load_causal_lm("org/tiny")), main_logits)
    torch.testing.assert_close(logits(load_causal_lm("org/tiny@v2")), second_logits)
    torch.testing.assert_close(logits(load_causal_lm(f"org/tiny@{'2' * 40}")), second_logits)
    with pytest.raises(ModelPathError, match="org/tiny@v3 is not in the Hub cache"):
        load_causal_lm("org/tiny@v3", key="model.policy")


def test_a_model_missing_offline_is_one_line_naming_the_key(tmp_path, hub):
    for load, key in (
        (lambda p, k: load_causal_lm(p, key=k), "model.policy"),
        (lambda p, k: load_tokenizer(p, key=k), "model.tokenizer"),
        (lambda p, k: ValueHeadModel.from_pretrained(p, key=k), "model.reward"),
    ):
        with pytest.raises(ModelPathError) as err:
            load("org/absent", key)
        message = str(err.value)
        assert message.startswith(f"{key}: org/absent is not in the Hub cache and HF_HUB_OFFLINE is set")
        assert "hf download org/absent" in message and "\n" not in message
    # a local path that does not exist is never looked up on the Hub (transformers would try a bare name there)
    with pytest.raises(ModelPathError, match=r"model.policy: .*nope not found"):
        load_causal_lm(tmp_path / "nope", key="model.policy")


def test_lora_adapters_on_a_hub_base_record_its_id_and_revision(tmp_path, hub):
    pytest.importorskip("peft")
    from ppomax.config import LoraSettings

    base = make_tiny_lm(tmp_path, TEXTS, name="base", seed=0)
    hub("org/base", make_tiny_lm(tmp_path, TEXTS, name="other", seed=3), commit="1" * 40)
    hub("org/base", base, commit="2" * 40, ref="v2")
    model = with_adapters(load_causal_lm("org/base@v2"), LoraSettings(r=4), "org/base@v2")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    model.save_pretrained(tmp_path / "adapters", save_embedding_layers=False)
    settings = json.loads((tmp_path / "adapters" / "adapter_config.json").read_text())
    assert (settings["base_model_name_or_path"], settings["revision"]) == ("org/base", "v2")
    torch.testing.assert_close(
        logits(load_causal_lm(tmp_path / "adapters")), logits(model), rtol=1e-5, atol=1e-5
    )


def test_plan_and_eval_take_hub_ids(tmp_path, hub, capsys):
    policy = make_tiny_lm(tmp_path, TEXTS, name="policy", seed=0)
    hub("org/policy", policy)
    assert main(["plan", "--model", "org/policy", "--kind", "sft", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["model"] == "org/policy" and plan["roles"]["model"]["params"] > 0

    from ppomax.commands.eval import parse_judge

    assert parse_judge("reward-model:org/rm@v1") == ("reward-model", "org/rm@v1")


def test_a_reward_model_of_another_tokenizer_is_one_line(tmp_path):
    """A Hub reward model is often of another model family: same-sized embeddings do not make the ids mean the
    same tokens; the tokenizer saved with it must agree with the policy's."""
    from ppo_helpers import make_setup
    from ppomax.ppo.models import load_models

    setup = make_setup(tmp_path / "a")
    other = make_tiny_lm(
        tmp_path, ["a completely different corpus of words, numbers 123 and symbols #@!"], name="o"
    )
    ValueHeadModel.from_causal_lm(other).save_pretrained(tmp_path / "other-rm")
    load_tokenizer(other).save_pretrained(tmp_path / "other-rm")
    assert len(load_tokenizer(other)) == len(load_tokenizer(setup.policy))  # the size check cannot tell
    with pytest.raises(ModelPathError) as err:
        load_models(config(setup, f"model.reward={tmp_path / 'other-rm'}"))
    assert str(err.value).startswith("model.reward: its tokenizer is not the one of model.policy: ")
    # the policy's own tokenizer beside the reward model: accepted
    load_tokenizer(setup.policy).save_pretrained(setup.reward)
    assert load_models(config(setup)).reward_model is not None
