"""What a run saves: the weights exactly as trained (bf16 runs write their float32 masters), tied weights once, and
every saved directory with the tokenizer and the base model's generation config, so that plain transformers
reloads the trained model and generates as it did."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from ppo_helpers import config, make_setup, reward_fn
from ppomax.cli import main
from ppomax.models import ValueHeadModel, load_causal_lm, load_tokenizer, save_trained
from ppomax.ppo import PPOTrainer
from tiny_lm import make_tiny_lm, write_jsonl, write_yaml

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = torch.tensor([[1, 5, 17, 42, 7, 99], [1, 3, 3, 8, 250, 2]])
LENGTH = reward_fn("ppo_helpers:response_length")


def saved_keys(directory) -> set[str]:
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        return set(f.keys())


def config_dtype(directory) -> str:
    return json.loads((directory / "config.json").read_text())["dtype"]


@torch.no_grad()
def assert_same_model(saved, trained) -> None:
    """Equal logits and equal greedy continuations (float32, no autocast)."""
    mask = torch.ones_like(IDS)
    assert torch.equal(
        saved(input_ids=IDS, attention_mask=mask).logits, trained(input_ids=IDS, attention_mask=mask).logits
    )
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(saved.generate(IDS, **kw), trained.generate(IDS, **kw))


def assert_complete(directory, tok) -> None:
    """A saved model directory carries the tokenizer and a generation config with the base's special ids."""
    assert AutoTokenizer.from_pretrained(directory).get_vocab() == tok.get_vocab()
    gen = GenerationConfig.from_pretrained(directory)
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (1, 2, 0), directory


# ------------------------------------------------------------------------------------------- bf16 and ties


def test_bf16_sft_saves_its_float32_masters(tmp_path):
    """A bf16 run trains float32 masters under autocast; final/ holds exactly them (not a bf16 rounding, which
    changes the model's answers), config.json says float32, and the tied LM head is stored once."""
    records = [
        {"prompt": f"Repeat {w}.", "response": f"{w} {w}"} for w in ("apple", "river", "stone", "cloud")
    ]
    base = make_tiny_lm(tmp_path, [f"Repeat {r['prompt']} {r['response']}" for r in records], tie=True)
    cfg = {
        "model": {"policy": str(base), "dtype": "bfloat16"},
        "data": {"train": str(write_jsonl(tmp_path / "train.jsonl", records))},
        "optim": {"lr": 3e-3},
        "epochs": 2,
        "batch_size": 2,
        "logging": {"out_dir": str(tmp_path / "run"), "progress": False, "tensorboard": False},
    }
    assert main(["train-sft", "--config", str(write_yaml(tmp_path / "sft.yaml", cfg))]) == 0
    final = tmp_path / "run" / "final"
    assert config_dtype(final) == "float32"
    assert "lm_head.weight" not in saved_keys(final)
    # the last checkpoint holds the run's live parameters (accelerate's save_state)
    (ckpt,) = (tmp_path / "run" / "checkpoints").glob("step-*")
    masters = load_file(str(ckpt / "model.safetensors"))
    saved = AutoModelForCausalLM.from_pretrained(final)
    assert saved.dtype == torch.float32
    weights = saved.state_dict()
    assert all(torch.equal(weights[k], v) for k, v in masters.items())
    trained = AutoModelForCausalLM.from_pretrained(base)
    trained.load_state_dict(masters, strict=False)
    trained.tie_weights()
    assert not torch.equal(trained.lm_head.weight, load_causal_lm(base).lm_head.weight)  # it did train
    assert_same_model(saved, trained)
    assert_complete(final, load_tokenizer(base))


def test_bf16_ppo_saves_policy_and_critic_as_trained(tmp_path):
    """final/policy reloads with plain transformers as the trainer's own policy (float32 masters, same greedy
    generations), final/critic as its critic; both directories carry the tokenizer and generation config."""
    setup = make_setup(tmp_path, tie=True)
    tr = PPOTrainer(config(setup, LENGTH, "model.dtype=bfloat16", "ppo.critic_init=reward_model"))
    out = tr.train().out_dir
    policy_dir, critic_dir = out / "final" / "policy", out / "final" / "critic"
    assert config_dtype(policy_dir) == config_dtype(critic_dir) == "float32"
    assert "lm_head.weight" not in saved_keys(policy_dir)
    # in float32, without the autocast accelerate wraps the forward in (as the reloaded model computes)
    trained = tr.acc.unwrap_model(tr.policy, keep_fp32_wrapper=False)
    critic = tr.acc.unwrap_model(tr.critic, keep_fp32_wrapper=False)
    assert not torch.equal(trained.lm_head.weight, load_causal_lm(setup.policy).lm_head.weight)
    assert_same_model(AutoModelForCausalLM.from_pretrained(policy_dir), trained)
    mask = torch.ones_like(IDS)
    with torch.no_grad():
        values = ValueHeadModel.from_pretrained(critic_dir)(IDS, mask).values
        assert torch.equal(values, critic(IDS, mask).values)
    tok = load_tokenizer(setup.policy)
    for directory in (policy_dir, critic_dir):
        assert_complete(directory, tok)


@pytest.mark.parametrize("value_head", [False, True])
def test_a_gathered_state_dict_of_a_tied_model_stores_the_tie_once(tmp_path, value_head):
    """Under ZeRO-2/FSDP the gathered state dict holds a separate copy of each tied weight; it is saved once
    and reloads tied, with the same outputs."""
    base = make_tiny_lm(tmp_path, tie=True)
    model = ValueHeadModel.from_causal_lm(base) if value_head else load_causal_lm(base)
    gathered = {k: v.detach().clone() for k, v in model.state_dict().items()}
    prefix = "backbone." if value_head else ""
    assert f"{prefix}lm_head.weight" in gathered
    save_trained(model, tmp_path / "saved", gathered, load_tokenizer(base), None)
    assert "lm_head.weight" not in saved_keys(tmp_path / "saved")
    if value_head:
        again = ValueHeadModel.from_pretrained(tmp_path / "saved")
        mask = torch.ones_like(IDS)
        with torch.no_grad():
            assert torch.equal(again(IDS, mask).values, model(IDS, mask).values)
        again, model = again.backbone, model.backbone
    else:
        again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert again.lm_head.weight is again.get_input_embeddings().weight
    assert_same_model(again, model)


# ------------------------------------------------------------------------------------- generation configs


def test_lora_saves_keep_the_base_generation_config_and_tokenizer(tmp_path):
    """PPO's rollouts must not leave their blank generation config on a LoRA policy's base: the merged export
    keeps the base's (its EOS, so plain ``generate`` stops there, and its own sampling settings). Adapter
    directories and merged models, policy and critic, all carry the tokenizer and their base's generation
    config."""
    setup = make_setup(tmp_path)
    policy_gen = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0, do_sample=True, top_p=0.9)
    policy_gen.save_pretrained(setup.policy)
    critic_gen = GenerationConfig.from_pretrained(setup.reward)
    lora = "model.lora={r: 4, save_merged: true}"
    tr = PPOTrainer(config(setup, LENGTH, lora, "ppo.critic_init=reward_model"))
    final = tr.train().out_dir / "final"
    tok = load_tokenizer(setup.policy)
    for directory, base_gen in [
        ("policy", policy_gen),
        ("policy/merged", policy_gen),
        ("critic", critic_gen),
        ("critic/merged", critic_gen),
    ]:
        assert_complete(final / directory, tok)
        assert GenerationConfig.from_pretrained(final / directory).to_diff_dict() == base_gen.to_diff_dict()
    merged = AutoModelForCausalLM.from_pretrained(final / "policy" / "merged")
    assert merged.generation_config.eos_token_id == tok.eos_token_id


def test_a_base_without_special_ids_gets_the_tokenizers(tmp_path):
    base = make_tiny_lm(tmp_path)
    model, tok = load_causal_lm(base), load_tokenizer(base)
    model.generation_config = GenerationConfig()
    save_trained(model, tmp_path / "saved", None, tok, None)
    gen = GenerationConfig.from_pretrained(tmp_path / "saved")
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (1, 2, 0)


def test_a_bf16_lora_merged_export_keeps_the_update_in_float32(tmp_path):
    """Under model.dtype bfloat16 the LoRA base is frozen in bf16 and the adapters train in float32: the merged
    export is W + scaling * B A in float32 (config.json says so); cast back to bf16, the sum loses most of the
    adapters' update (the same rounding as a bf16 final/ of full training)."""
    setup = make_setup(tmp_path)
    lora = "model.lora={r: 4, save_merged: true}"
    tr = PPOTrainer(config(setup, LENGTH, lora, "model.dtype=bfloat16", "optim.policy_lr=1e-2"))
    final = tr.train().out_dir / "final" / "policy" / "merged"
    assert config_dtype(final) == "float32"
    saved = load_file(str(final / "model.safetensors"))
    policy = tr.unwrapped(tr.policy)
    layer = policy.get_base_model().model.layers[0].self_attn.q_proj
    base_w = layer.base_layer.weight
    assert base_w.dtype == torch.bfloat16
    delta = (layer.lora_B["default"].weight.float() @ layer.lora_A["default"].weight.float()) * layer.scaling[
        "default"
    ]
    assert delta.abs().max() > 0
    expected = base_w.float() + delta
    assert torch.equal(saved["model.layers.0.self_attn.q_proj.weight"], expected)
    assert all(t.dtype == torch.float32 for t in saved.values())
    assert AutoModelForCausalLM.from_pretrained(final).dtype == torch.float32


@pytest.mark.parametrize("value_head", [False, True])
def test_saved_configs_carry_no_loading_flags(tmp_path, value_head):
    """How ppomax (or transformers) loaded a model is not what the saved model is: tokenizer_config.json and
    config.json hold no local_files_only, is_local or trust_remote_code."""
    base = make_tiny_lm(tmp_path)
    model = ValueHeadModel.from_causal_lm(base) if value_head else load_causal_lm(base)
    save_trained(model, tmp_path / "saved", None, load_tokenizer(base, trust_remote_code=False), None)
    for name in ("tokenizer_config.json", "config.json"):
        saved = json.loads((tmp_path / "saved" / name).read_text())
        assert not {"local_files_only", "is_local", "trust_remote_code"} & set(saved), name
