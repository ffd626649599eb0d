"""LoRA through PEFT (``model.lora``): config validation, the PPO reference as the policy's base with adapters
disabled (no second copy), dropout off, adapter and merged saves (the merged ones load with plain transformers),
exact resume, SFT and RM with adapters, and a LoRA PPO run that learns (tests/test_ppo_learning.py's setup).

Peak memory against full fine-tuning is measured by bench/lora_memory.py (a ~30M-parameter Llama); CI checks only
structural facts (trainable-parameter counts, one copy of the base weights)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from helpers import assert_same_run, set_args
from ppo_helpers import FAST, config, make_setup, reward_fn
from ppomax.config import load_config
from ppomax.errors import ConfigError
from ppomax.models import AdaptersOff, ValueHeadModel, load_causal_lm, model_summary
from ppomax.monitor import read_metrics
from ppomax.ppo import PPOTrainer, train_ppo
from ppomax.trainers.reward_model import train_rm
from ppomax.trainers.sft import train_sft
from test_ppo_learning import LEARN, mean
from tiny_lm import write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")

TARGET = reward_fn("ppo_helpers:target_tokens")
# every linear layer of the tiny Llama, the LM head included (see test_lora_ppo_learns)
WITH_HEAD = "[q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head]"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup(tmp_path_factory.mktemp("lora"), reference_seed=5)


def make(setup, tmp_path, *overrides: str, lora: str = "{r: 4}") -> PPOTrainer:
    cfg = config(setup, TARGET, f"model.lora={lora}", *overrides, out=str(tmp_path / "run"))
    return PPOTrainer(cfg)


def lora_params(model, r: int, names: set[str]) -> int:
    """r * (in + out) for every nn.Linear whose name ends in one of ``names`` (what LoRA adds)."""
    return sum(
        r * (m.in_features + m.out_features)
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in names
    )


ALL_LINEAR = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


# ------------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.lora={r: 0}", "model.lora.r: Input should be greater than 0"),
        ("model.lora={alpha: 0}", "model.lora.alpha: Input should be greater than 0"),
        ("model.lora={dropout: 1.0}", "model.lora.dropout: Input should be less than 1"),
        ("model.lora={target_modules: []}", "model.lora.target_modules: a non-empty list"),
        ("model.lora={target_modules: q_proj}", "model.lora.target_modules: a non-empty list"),
        ("model.lora={rank: 4}", "model.lora.rank: unknown key"),
        ("model.lora={}\nppo.critic_init=random", "model.lora.critic, ppo.critic_init: critic_init: random"),
    ],
)
def test_invalid_lora_settings_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config("ppo", preset="ppo_max", overrides=override.split("\n"))


def test_lora_settings_and_conflicts():
    lora = load_config("ppo", overrides=["model.lora={}"]).model.lora
    assert (lora.r, lora.alpha, lora.dropout, lora.target_modules) == (8, 16.0, 0.0, "all-linear")
    assert lora.critic and not lora.save_merged
    assert load_config("ppo").model.lora is None  # off by default
    ok = load_config("ppo", overrides=["model.lora={critic: false}", "ppo.critic_init=random"])
    assert ok.model.lora is not None and not ok.model.lora.critic
    with pytest.raises(ConfigError, match=r"init_from_config, model\.lora: adapters on random weights"):
        load_config("sft", overrides=["model.lora={}", "init_from_config=true"])


# ---------------------------------------------------------------------------------------- PPO structure


def test_ppo_reference_is_the_policy_base_with_adapters_off(setup, tmp_path):
    """No reference model is loaded: the reference is the policy itself with its adapters disabled, its logits
    are the SFT model's exactly, before and after an update (the base is frozen); only adapters (and the critic's
    value head) are trained, r * (in + out) per adapted linear layer."""
    tr = make(setup, tmp_path, "ppo.critic_init=sft", "ppo.buffer_size=4", "ppo.minibatch_size=4")
    ref, policy = tr.models.reference, tr.unwrapped(tr.policy)
    assert isinstance(ref, AdaptersOff) and ref.model is policy
    sft = load_causal_lm(setup.policy)
    assert model_summary(policy) == {
        "params": model_summary(sft)["params"] + lora_params(sft, 4, ALL_LINEAR),
        "trainable_params": lora_params(sft, 4, ALL_LINEAR),
    }
    critic = tr.unwrapped(tr.critic)
    head = sum(p.numel() for p in critic.value_head.parameters())
    assert model_summary(critic)["trainable_params"] == lora_params(sft, 4, ALL_LINEAR) + head
    assert all(p.requires_grad for p in critic.value_head.parameters())
    # one copy of the base weights between policy and reference; the critic has its own backbone
    assert {id(p) for p in policy.parameters()} >= {id(p) for p in policy.get_base_model().parameters()}
    ids = torch.tensor([[1, 5, 17, 42, 7, 99]])
    expected = logits(sft, ids)
    torch.testing.assert_close(logits(ref, ids), expected, rtol=0, atol=0)
    tr.iteration(1)
    assert not torch.equal(logits(policy, ids), expected)  # the adapters moved ...
    torch.testing.assert_close(logits(ref, ids), expected, rtol=0, atol=0)  # ... and the reference did not


def test_an_explicit_other_reference_is_loaded(setup, tmp_path):
    tr = make(setup, tmp_path, f"model.reference={setup.root / 'reference'}")
    assert not isinstance(tr.models.reference, AdaptersOff)
    assert not any(p.requires_grad for p in tr.models.reference.parameters())
    same = make(setup, tmp_path / "same", f"model.reference={setup.policy}")
    assert isinstance(same.models.reference, AdaptersOff)  # the policy's own path: no copy either


def test_the_reward_model_is_the_lora_critics_base_not_a_second_copy(setup, tmp_path, monkeypatch):
    """The critic starts from the reward model (critic_init reward_model) with adapters: the reward model's
    backbone is loaded once, as the critic's frozen base; the reward model reads it with the adapters off and its
    own head, so its scores stay those of the reward model, bit for bit, while the critic's adapters and head
    train. With LoRA off the critic (model.lora.critic false) the critic's weights move: two copies then."""
    loads = []
    real = ValueHeadModel.from_pretrained.__func__

    def counted(cls, path, **kw):
        loads.append(path)
        return real(cls, path, **kw)

    monkeypatch.setattr(ValueHeadModel, "from_pretrained", classmethod(counted))
    tr = make(setup, tmp_path, "ppo.critic_init=reward_model", "ppo.minibatch_size=4")
    assert loads == [str(setup.reward)]
    critic = tr.unwrapped(tr.critic)
    ids = torch.tensor([[1, 5, 17, 42, 7, 99], [0, 0, 3, 8, 250, 2]])
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    with torch.no_grad():
        expected = real(ValueHeadModel, setup.reward).score(ids, mask)
        before = critic(ids, mask).scores
        assert torch.equal(tr.models.reward_model.score(ids, mask), expected)
    tr.iteration(1)
    with torch.no_grad():
        assert not torch.equal(critic(ids, mask).scores, before)  # the critic trained ...
        assert torch.equal(tr.models.reward_model.score(ids, mask), expected)  # ... the reward model did not
    loads.clear()
    make(setup, tmp_path / "full-critic", "ppo.critic_init=reward_model", lora="{r: 4, critic: false}")
    assert loads == [str(setup.reward)] * 2


def test_adapter_dropout_is_off_so_the_first_ratio_is_one(setup, tmp_path):
    """LoRA dropout 0.5 in train mode (gradient checkpointing keeps the models in train mode): switched off like
    every dropout, so the first minibatch's ratio is 1 and its approximate KL 0."""
    tr = make(setup, tmp_path, "model.gradient_checkpointing=true", lora="{r: 4, dropout: 0.5}")
    policy = tr.unwrapped(tr.policy)
    drops = [m for n, m in policy.named_modules() if isinstance(m, torch.nn.Dropout) and "lora_dropout" in n]
    assert drops and all(m.p == 0.0 for m in drops) and policy.training
    m = tr.iteration(1)
    assert m["policy/ratio_mean"] == pytest.approx(1.0, abs=1e-6) and m["policy/approx_kl"] < 1e-9


def test_target_modules_that_match_nothing_is_one_config_error(setup, tmp_path):
    with pytest.raises(ConfigError, match=r"model.lora.target_modules: .*its linear layers: .*q_proj"):
        make(setup, tmp_path, lora="{target_modules: [nope]}")


# ------------------------------------------------------------------------------------------------ saving


def test_final_saves_adapters_and_merged_models_that_load_with_plain_transformers(setup, tmp_path):
    cfg = config(
        setup,
        TARGET,
        f"model.lora={{r: 4, target_modules: {WITH_HEAD}, save_merged: true}}",
        "ppo.critic_init=reward_model",
        out=str(tmp_path / "run"),
    )
    tr = PPOTrainer(cfg)
    out = tr.train().out_dir
    policy_dir, critic_dir = out / "final" / "policy", out / "final" / "critic"
    names = {p.name for p in policy_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= names
    assert "model.safetensors" not in names  # adapters only: the base is model.policy
    adapters = load_file(str(policy_dir / "adapter_model.safetensors"))
    # only adapters: no copy of the adapted LM head's frozen base weight (ppomax never resizes the vocabulary)
    assert adapters and all("lora_" in k for k in adapters)
    assert sum(v.numel() for v in adapters.values()) < model_summary(tr.unwrapped(tr.policy))["params"] // 2
    ids = torch.tensor([[1, 5, 17, 42, 7, 99], [1, 3, 3, 8, 250, 2]])
    mask = torch.ones_like(ids)
    trained = tr.unwrapped(tr.policy)
    merged = AutoModelForCausalLM.from_pretrained(policy_dir / "merged")
    assert not hasattr(merged, "peft_config")
    torch.testing.assert_close(logits(merged, ids), logits(trained, ids), rtol=1e-5, atol=1e-5)
    # ppomax loads an adapter directory as its base with the adapters merged in
    torch.testing.assert_close(logits(load_causal_lm(policy_dir), ids), logits(merged, ids))
    critic = tr.unwrapped(tr.critic)
    with torch.no_grad():
        values = critic(ids, mask).values
        for path in (critic_dir / "merged", critic_dir):
            again = ValueHeadModel.from_pretrained(path)
            torch.testing.assert_close(again(ids, mask).values, values, rtol=1e-5, atol=1e-5)


def test_resume_of_a_lora_run_is_exact(setup, tmp_path):
    """4 iterations in one go == 2, then resumed to 4: the same metrics and the same adapters, bit for bit."""

    def cfg(out, n):
        return config(
            setup,
            TARGET,
            "model.lora={r: 4, dropout: 0.1}",
            f"ppo.iterations={n}",
            "ppo.critic_pretrain_steps=1",
            "ppo.minibatch_size=4",
            out=str(tmp_path / out),
        )

    straight = train_ppo(cfg("a", 3))
    train_ppo(cfg("b", 1))
    resumed = train_ppo(cfg("b", 3), resume=True)
    assert [r["step"] for r in read_metrics(resumed / "metrics.jsonl")] == [1, 2, 3, 4]
    assert (resumed / "final" / "policy" / "adapter_model.safetensors").is_file()
    assert_same_run(straight, resumed)


# ------------------------------------------------------------------------------------------- SFT and RM


def test_sft_then_rm_with_lora_chain_through_adapter_directories(setup, tmp_path):
    """SFT with adapters saves adapters; an RM trained with adapters on that SFT directory (loaded as base +
    merged adapters) trains its adapters and its whole value head, and loads back as a ValueHeadModel."""
    sft_data = write_jsonl(
        tmp_path / "sft.jsonl",
        [{"prompt": f"Say {w}.", "response": f"{w} {w}"} for w in ("one", "two", "six")],
    )
    sft_cfg = load_config(
        "sft",
        overrides=[
            f"model.policy={setup.policy}",
            f"data.train={sft_data}",
            "model.lora={r: 2, save_merged: true}",
            "optim.lr=1e-2",
            "batch_size=3",
            "epochs=2",
            f"logging.out_dir={tmp_path / 'sft'}",
            "logging.progress=false",
        ],
    )
    sft_dir = train_sft(sft_cfg)
    assert (sft_dir / "adapter_config.json").is_file() and not (sft_dir / "model.safetensors").exists()
    base = load_causal_lm(setup.policy)
    ids = torch.tensor([[1, 5, 17, 42]])
    tuned = load_causal_lm(sft_dir)
    torch.testing.assert_close(
        logits(tuned, ids), logits(AutoModelForCausalLM.from_pretrained(sft_dir / "merged"), ids)
    )
    assert not torch.equal(logits(tuned, ids), logits(base, ids))
    pairs = [{"prompt": "Say one.", "chosen": "one one", "rejected": "two"}] * 4
    rm_cfg = load_config(
        "rm",
        overrides=[
            f"model.policy={sft_dir}",
            f"model.tokenizer={setup.policy}",
            f"data.train={write_jsonl(tmp_path / 'pairs.jsonl', pairs)}",
            "model.lora={r: 2}",
            "optim.lr=1e-2",
            "batch_size=2",
            f"logging.out_dir={tmp_path / 'rm'}",
            "logging.progress=false",
        ],
    )
    rm_dir = train_rm(rm_cfg)
    rm = ValueHeadModel.from_pretrained(rm_dir)
    fresh = ValueHeadModel.from_causal_lm(sft_dir, seed=rm_cfg.seed)
    assert not torch.equal(rm.value_head.weight, fresh.value_head.weight)  # the head trained
    assert (rm_dir / "adapter_model.safetensors").is_file()


# ------------------------------------------------------------------------------------------------ learning


def test_lora_ppo_learns(tmp_path):
    """tests/test_ppo_learning.py's ppo_max run with LoRA r=8 on every linear layer including the LM head, at the
    full run's learning rate (1e-3, not the usual 10x: the tiny random model has a frozen final norm and LM head
    of std 0.02, so without adapting the head its logits cannot leave ~[-0.6, 0.6], and with the head adapted
    the product B A grows fast once B leaves zero: 5e-4 hardly moves in 30 iterations, 3e-3 and 1e-2 overshoot
    to a KL of 2.2-2.5 nats/token). Observed (seed 42): reward 0.11 -> 0.72 in 30 iterations, max KL 1.6."""
    setup = make_setup(tmp_path / "setup")
    cfg = config(
        setup,
        TARGET,
        *LEARN,
        "ppo.iterations=28",
        f"model.lora={{r: 8, target_modules: {WITH_HEAD}}}",
        "optim.policy_lr=1e-3",
        "optim.critic_lr=1e-3",
        preset="ppo_max",
        rm=False,
        out=str(tmp_path / "run"),
    )
    rec = read_metrics(train_ppo(cfg) / "metrics.jsonl")
    before, after = mean(rec[:3], "reward/raw_mean"), mean(rec[-3:], "reward/raw_mean")
    assert before < 0.15
    assert after >= before + 0.3, (before, after)
    assert max(r["kl/per_token"] for r in rec) < 2.0
    assert all(r["nonfinite/total"] == 0 for r in rec)
    assert rec[-1]["ppl/policy"] < rec[0]["ppl/policy"]


@pytest.mark.slow
def test_two_process_cpu_ddp_lora_with_resume(setup, tmp_path):
    """`accelerate launch` with 2 CPU processes (gloo): DDP over the adapters (the frozen base has no gradient to
    synchronise), --resume continues, and the final merged policy loads with plain transformers."""
    import os
    import subprocess
    from pathlib import Path

    from launch_helpers import accelerate_launch

    out = tmp_path / "run"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), str(Path(__file__).parent)]),
        "OMP_NUM_THREADS": "1",
    }
    sets = [
        f"model.policy={setup.policy}",
        f"model.reward={setup.reward}",
        f"data.prompts={setup.prompts}",
        f"logging.out_dir={out}",
        *FAST,
        "model.lora={r: 4, save_merged: true}",
        "ppo.minibatch_size=4",
        TARGET,
    ]
    first = [*accelerate_launch(2), "train-ppo", *set_args(*sets)]
    proc = subprocess.run(first, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = [*accelerate_launch(2), "train-ppo", "--resume", str(out), "--set", "ppo.iterations=3"]
    proc = subprocess.run(again, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3]
    merged = AutoModelForCausalLM.from_pretrained(out / "final" / "policy" / "merged")
    ids = torch.tensor([[1, 5, 17, 42]])
    torch.testing.assert_close(logits(merged, ids), logits(load_causal_lm(out / "final" / "policy"), ids))
