"""`ppomax plan`: the memory arithmetic of ppomax.plan against hand-computed cases, the meta-device shape and LoRA
counts against real models, and one CLI run on a tiny saved model directory."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from ppomax.cli import main
from ppomax.commands.plan import lora_params, shape_of, workload_of
from ppomax.config import load_config
from ppomax.plan import (
    Lora,
    Role,
    Shape,
    StrategyMemory,
    Workload,
    generation_bytes,
    inference_bytes,
    kv_cache_bytes,
    layer_saved_elements,
    logits_bytes,
    plan,
    role_memory,
    state_bytes,
    train_activation_bytes,
    trunk_activation_bytes,
    zero3_working_set,
)

# A made-up shape with round numbers, so that every expected value below is computed by hand.
SHAPE = Shape(
    params=1000,
    layers=2,
    hidden=8,
    intermediate=16,
    heads=2,
    kv_heads=1,
    head_dim=4,
    vocab=50,
    gated_mlp=True,
    lm_head_params=400,
    largest_module_params=400,
    small_params=40,
)
WORK = Workload(
    kind="ppo",
    dtype="bfloat16",
    gradient_checkpointing=False,
    train_rows=2,
    train_seq=10,
    logit_positions=5,
    rollout_rows=4,
    prompt_tokens=6,
    response_tokens=4,
    score_rows=4,
)


def test_state_bytes_follow_the_zero_paper():
    """ZeRO paper 3.1: 2 + 2 + 12 bytes per trained parameter in mixed precision; fp32: 4 + 4 + 8."""
    assert state_bytes(1000, 600, "bfloat16") == {"weights": 2000, "grads": 1200, "optim": 7200}
    assert state_bytes(1000, 600, "float16") == {"weights": 2000, "grads": 1200, "optim": 7200}
    assert state_bytes(1000, 600, "float32") == {"weights": 4000, "grads": 2400, "optim": 4800}
    assert state_bytes(1000, 0, "bfloat16") == {"weights": 2000, "grads": 0, "optim": 0}


def test_kv_cache_bytes():
    # 2 (K, V) * 3 layers * 4 kv heads * 8 head dim * 10 tokens * 2 bytes
    assert kv_cache_bytes(3, 4, 8, 10, 2) == 2 * 3 * 4 * 8 * 10 * 2 == 3840
    # Llama-2-7B, one 4096-token sequence in fp16: the well-known 2 GiB
    assert kv_cache_bytes(32, 32, 128, 4096, 2) == 2 * 1024**3


def test_generation_peak_by_hand():
    # full cache: 2 * 2 layers * 1 kv head * 4 head dim * 4 rows * 10 tokens * 2 bytes = 1280, plus one layer's
    # K and V during DynamicCache's concatenation (640)
    assert kv_cache_bytes(2, 1, 4, 40, 2) == 1280
    # prefill: the prompt's cache (768) + one layer's working set 4 * 6 tokens * (2 * 8 + max(16 + 8, 3 * 16)) * 2
    # + the last position's logits 4 * 50 * (2 + 4: bf16 and its float32 copy) + 6 float32 slice temporaries,
    # each the whole 200 logits here (fewer than a slice)
    assert inference_bytes(SHAPE, 4, 6, 1, 2) == 4 * 6 * 64 * 2 + 4 * 50 * 6 + 6 * 200 * 4 == 9072
    assert generation_bytes(SHAPE, 4, 6, 4, 2) == max(1280 + 640, 768 + 9072) == 9840
    assert (
        generation_bytes(SHAPE, 4, 6, 400, 2) == 2 * 2 * 4 * 4 * 406 * 2 * 3 // 2
    )  # long responses: the cache
    # generation.logprobs_from: generate: plus every step's float32 logits twice (the tuple and its stack),
    # 2 * 4 rows * 400 steps * 50 vocabulary * 4 bytes
    assert generation_bytes(SHAPE, 4, 6, 400, 2, sampling_logits=True) == (
        generation_bytes(SHAPE, 4, 6, 400, 2) + 2 * 4 * 400 * 50 * 4
    )


def test_activation_counts_by_hand():
    # norms 2 * 3 * 8 = 48; attention q 8 + SDPA out 8 + o_proj input 8 + k, v 2 * 4 = 32; gated MLP 4 * 16 = 64
    assert layer_saved_elements(SHAPE) == 48 + 32 + 64 == 144
    ungated = Shape(**{**SHAPE.__dict__, "gated_mlp": False})
    assert layer_saved_elements(ungated) == 48 + 32 + 32
    # 2 layers * 144 + 4 * 8 (embedding output, final norm) elements per token, 20 tokens, 2 bytes
    assert trunk_activation_bytes(SHAPE, 20, 2, False) == 20 * (2 * 144 + 32) * 2
    # checkpointing: layer inputs (2 * 8) + one layer recomputed (144) + 32
    assert trunk_activation_bytes(SHAPE, 20, 2, True) == 20 * (16 + 144 + 32) * 2
    # bf16 logits 2, their float32 copy 4, backward: float32 gradient 4 + bf16 gradient 2; plus 2 float32 slice
    # temporaries of the log-probs, each the whole 750 logits here (fewer than a slice)
    assert logits_bytes(3, 5, 50, 2) == 3 * 5 * 50 * 12 + 2 * 750 * 4
    assert logits_bytes(3, 5, 50, 4) == 3 * 5 * 50 * 8 + 2 * 750 * 4  # fp32: no copy, one gradient
    big = 4096 * 8192  # twice a slice: the temporaries stay a slice each
    assert logits_bytes(1, 4096, 8192, 4) == big * 8 + 2 * (1 << 24) * 4


def _policy(lora: Lora | None = None) -> Role:
    return Role("policy", SHAPE, True, SHAPE.params, True, lora=lora)


def test_role_memory_per_strategy():
    n = 4
    ddp = role_memory(_policy(), "ddp", n, WORK)
    # bf16 under DDP is autocast over float32 parameters: 4 + 4 + 8 bytes per trained parameter
    assert (ddp.weights, ddp.grads, ddp.optim) == (4000, 4000, 8000)
    z2 = role_memory(_policy(), "zero2", n, WORK)
    assert (z2.weights, z2.grads, z2.optim) == (2000, 500, 3000)
    z3 = role_memory(_policy(), "zero3", n, WORK)
    # (1000 - 40 small) * 2 / 4 sharded + working set (40 small + 400 largest + int(0.9 * 64) = 57) * 2
    assert zero3_working_set(SHAPE, 2) == (40 + 400 + 57) * 2
    assert (z3.weights, z3.grads, z3.optim) == (480 + 994, 500, 3000)
    off = role_memory(_policy(), "zero3_offload", n, WORK)
    assert (off.weights, off.grads, off.optim) == (994, 64 * 2, 0)
    # host: (960 bf16 weights * 2 + fp32 gradients 4 * 1000 + optimiser 12 * 1000) / 4
    assert off.cpu == (1920 + 4000 + 12000) // 4
    lora = role_memory(_policy(Lora(2, ("q_proj",), 30)), "lora", n, WORK)
    # frozen bf16 base + 30 fp32 adapter parameters: 4 + 4 + 8 bytes each
    assert (lora.weights, lora.grads, lora.optim) == (2000 + 120, 120, 240)
    # the same activations and KV cache under every strategy: the per-device batch does not shrink with N
    assert {m.activations for m in (ddp, z2, z3, off, lora)} == {ddp.activations}
    assert ddp.kv_cache > kv_cache_bytes(2, 1, 4, 4 * 10, 2)  # plus the prefill's working set


def test_frozen_roles_and_the_lora_reference():
    ref = Role("reference", SHAPE, False, 0, True, shares_policy_base=True, phase="score")
    for st in ("ddp", "zero2"):
        m = role_memory(ref, st, 4, WORK)
        assert (m.weights, m.grads, m.optim) == (2000, 0, 0)
    z3 = role_memory(ref, "zero3", 4, WORK)
    assert (z3.weights, z3.grads, z3.optim) == (480 + 994, 0, 0)
    off = role_memory(ref, "zero3_offload", 4, WORK)
    assert (off.grads, off.cpu) == (0, 1920 // 4)
    lora = role_memory(ref, "lora", 4, WORK)
    assert (lora.weights, lora.grads, lora.optim) == (0, 0, 0)
    assert lora.activations == role_memory(ref, "ddp", 4, WORK).activations > 0  # it still runs a forward


def test_peak_is_all_states_plus_the_largest_transient():
    plans = plan([_policy(), Role("reference", SHAPE, False, 0, True, phase="score")], WORK, 2)
    ddp: StrategyMemory = plans["ddp"]
    pol, ref = ddp.roles
    assert ddp.states == pol.states + ref.states
    largest = max(pol.activations, pol.kv_cache, ref.activations)
    assert ddp.peak == ddp.states + largest
    assert pol.total == pol.states + max(pol.activations, pol.kv_cache)
    with pytest.raises(ValueError):
        plan([_policy()], WORK, 0)


def _llama(tie: bool = False) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=120,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
    )


@pytest.mark.parametrize(
    "config", [_llama(), _llama(tie=True), GPT2Config(vocab_size=90, n_embd=16, n_layer=2, n_head=2)]
)
def test_meta_shape_counts_the_real_models_parameters(config):
    real = AutoModelForCausalLM.from_config(config)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    s = shape_of(meta)
    assert s.params == sum(p.numel() for p in real.parameters())
    emb = real.get_input_embeddings().weight
    untied = real.get_output_embeddings().weight is not emb
    assert s.lm_head_params == (emb.numel() if untied else 0)
    # the embedding, or GPT-2's 1024 learned positions
    assert s.largest_module_params == max(emb.numel(), getattr(config, "n_positions", 0) * config.hidden_size)
    assert s.gated_mlp == (config.model_type == "llama")
    if config.model_type == "llama":
        assert (s.heads, s.kv_heads, s.head_dim, s.intermediate) == (4, 2, 8, 48)


def test_lora_params_match_peft():
    peft = pytest.importorskip("peft")
    config = _llama()
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    for targets in (["q_proj", "v_proj"], "all-linear"):
        model = peft.get_peft_model(
            AutoModelForCausalLM.from_config(config), peft.LoraConfig(r=4, target_modules=targets)
        )
        expected = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert lora_params(meta, 4, targets, "--lora-targets") == expected


def test_the_policys_lm_head_runs_on_the_response_tokens_padded_or_packed():
    """PPO's forwards run the policy's LM head on the response tokens only, R per row at their longest, padded or
    packed (ppo.pack_sequences), and no copy of their logits is made: packing changes nothing in the plan (rows
    at their longest, the case it bounds, fill a packed row each). It added a float32 [rows, R, vocab] copy when
    the packed logits were scattered into the padded layout."""
    packed = workload_of(load_config("ppo", overrides=["ppo.pack_sequences=true"]), "ppo")
    padded = workload_of(load_config("ppo"), "ppo")
    assert packed == padded and padded.logit_positions == padded.response_tokens
    rows, r, act = WORK.train_rows, WORK.response_tokens, 2
    policy = _policy()
    trunk = train_activation_bytes(SHAPE, WORK, False)
    assert train_activation_bytes(SHAPE, WORK, True) - trunk == logits_bytes(
        rows, WORK.logit_positions, 50, act
    )
    seq = WORK.prompt_tokens + r
    reference = Role("reference", SHAPE, False, 0, True)  # scored only
    assert role_memory(reference, "ddp", 1, WORK).activations == inference_bytes(SHAPE, 4, seq, r, act)
    assert role_memory(policy, "ddp", 1, WORK).activations >= inference_bytes(SHAPE, 4, seq, r, act)


def test_workload_reads_the_config():
    cfg = load_config(
        "ppo", overrides=["ppo.micro_batch_size=8", "ppo.ptx_coef=0.5", "generation.temperature=1.0"]
    )
    w = workload_of(cfg, "ppo")
    # defaults: minibatch 32, rollout 32, 256 prompt + 128 new tokens; ptx batch 8 over 4 micro-batches
    assert (w.train_rows, w.train_seq, w.logit_positions, w.score_rows) == (8, 384, 128, 8)
    assert (w.rollout_rows, w.ptx_rows, w.ptx_seq) == (32, 2, 512)
    assert not w.sampling_logits
    assert workload_of(
        load_config("ppo", overrides=["generation.logprobs_from=generate"]), "ppo"
    ).sampling_logits
    rm = workload_of(load_config("rm", overrides=["beta_rm=0", "batch_size=3"]), "rm")
    assert (rm.train_rows, rm.train_seq, rm.logit_positions) == (6, 512, 0)


def _tiny_dir(tmp_path: Path) -> Path:
    """A model directory as a user has one (config.json; plan reads nothing else)."""
    out = tmp_path / "tiny"
    _llama().save_pretrained(out)
    return out


def test_cli_json_and_table(tmp_path, capsys, one_thread):
    model = _tiny_dir(tmp_path)
    capsys.readouterr()
    args = ["plan", "--model", str(model), "--set", "model.reward=" + str(model), "--devices", "2"]
    assert main([*args, "--gpu-memory", "0.5", "--json", "--lora-r", "4"]) == 0
    doc = json.loads(capsys.readouterr().out)
    params = doc["roles"]["policy"]["params"]
    assert params == sum(p.numel() for p in AutoModelForCausalLM.from_config(_llama()).parameters())
    ddp, z2 = doc["strategies"]["ddp"], doc["strategies"]["zero2"]
    assert ddp["roles"]["policy"]["weights"] == 4 * params  # fp32 by default
    assert ddp["roles"]["policy"]["optim"] == 8 * params
    assert z2["roles"]["policy"]["optim"] == 8 * params // 2
    assert set(ddp["roles"]) == {"policy", "reference", "critic", "reward"}
    assert doc["lora"]["policy"]["params"] == 4 * 2 * ((32 + 32) + (32 + 16))  # q_proj 32->32, v_proj 32->16
    assert doc["strategies"]["lora"]["roles"]["reference"]["weights"] == 0
    assert all(isinstance(s["fits"], bool) for s in doc["strategies"].values())

    config = tmp_path / "sft.yaml"  # the model from the config's model.policy
    config.write_text(f"model:\n  policy: {model}\nbatch_size: 2\n", encoding="utf-8")
    assert main(["plan", "--kind", "sft", "--config", str(config), "--gpu-memory", "80"]) == 0
    text = capsys.readouterr().out
    assert "DeepSpeed ZeRO-3 with CPU offload" in text and "fits in 80 GiB" in text
    assert "2 rows x 512 tokens" in text
    assert "model " in text and "critic" not in text


def test_cli_errors_are_one_line(tmp_path, capsys, one_thread):
    model = _tiny_dir(tmp_path)
    capsys.readouterr()
    assert main(["plan", "--model", str(model), "--lora-targets", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--lora-targets" in err[0] and "q_proj" in err[0]
    assert main(["plan", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config.json" in err[0]
    assert main(["plan"]) == 2
    assert "--model PATH or model.policy" in capsys.readouterr().err


def test_lora_settings_from_flags_over_model_lora():
    """model.lora (r, target_modules) when the config has it; --lora-r / --lora-targets win."""
    from types import SimpleNamespace

    from ppomax.commands.plan import DEFAULT_LORA_R, _lora_settings

    flags = SimpleNamespace(lora_r=None, lora_targets=None)
    bare = SimpleNamespace(model=SimpleNamespace())  # a config from before model.lora existed
    assert _lora_settings(bare, flags) == (DEFAULT_LORA_R, None, "defaults")
    cfg = SimpleNamespace(
        model=SimpleNamespace(lora=SimpleNamespace(r=16, target_modules=["q_proj", "k_proj"]))
    )
    assert _lora_settings(cfg, flags) == (16, ["q_proj", "k_proj"], "model.lora")
    both = SimpleNamespace(lora_r=4, lora_targets="all-linear")
    assert _lora_settings(cfg, both) == (4, "all-linear", "flags")


def test_a_lora_run_directory_is_read_as_its_base_with_its_adapter_settings(tmp_path, capsys, one_thread):
    """A LoRA run's model directory holds PEFT adapters, no config.json: plan reads its base's config.json (the
    model the adapters load onto) and, unless flags or model.lora say otherwise, its rank and target modules."""
    from ppomax.config import LoraSettings
    from ppomax.models import ValueHeadModel, with_adapters

    base = tmp_path / "base"
    AutoModelForCausalLM.from_config(_llama()).save_pretrained(base)
    sft = tmp_path / "sft-lora"
    lora = LoraSettings(r=2, target_modules=["q_proj", "v_proj"])
    with_adapters(AutoModelForCausalLM.from_pretrained(base), lora, base).save_pretrained(sft)
    rm = tmp_path / "rm-lora"  # a value-head model trained with LoRA: adapters and the head
    with_adapters(ValueHeadModel.from_causal_lm(base), lora, base).save_pretrained(rm)
    capsys.readouterr()
    assert main(["plan", "--model", str(sft), "--set", f"model.reward={rm}", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    params = sum(p.numel() for p in AutoModelForCausalLM.from_config(_llama()).parameters())
    assert doc["roles"]["policy"]["params"] == params
    assert doc["roles"]["reward"]["params"] == params + 33  # the reward model's base too, plus its head
    assert doc["lora"]["policy"] == {
        "r": 2,
        "targets": ["q_proj", "v_proj"],
        "params": 2 * ((32 + 32) + (32 + 16)) * 2,
    }
    assert main(["plan", "--model", str(sft), "--lora-r", "4"]) == 0
    text = capsys.readouterr().out
    assert f"run of {sft} (LoRA adapters on {base})" in text and "LoRA r=4" in text
    assert "LoRA settings from flags" in text
    assert main(["plan", "--model", str(sft)]) == 0
    assert f"LoRA settings from {sft}/adapter_config.json" in capsys.readouterr().out


def test_a_fused_ppo_update_holds_the_policys_and_the_critics_activations_at_once():
    """One epoch over one minibatch in one micro-batch (ppo/fused.py: fuses_scoring): both forwards run before either
    backward, so the transient is the sum of both models' activations; otherwise the larger of the two."""
    critic = Role("critic", SHAPE, True, SHAPE.params, False, 9)
    apart = plan([_policy(), critic], WORK, 1)["ddp"]
    fused = plan([_policy(), critic], dataclasses.replace(WORK, fused_update=True), 1)["ddp"]
    pol, cri = fused.roles
    assert apart.transient == (max(pol.activations, cri.activations, pol.kv_cache), "policy activations")
    assert fused.transient == (pol.activations + cri.activations, "policy + critic activations")
    small = ["ppo.rollout_batch_size=8", "ppo.buffer_size=8", "ppo.minibatch_size=8"]
    assert workload_of(load_config("ppo", overrides=small), "ppo").fused_update
    assert not workload_of(
        load_config("ppo", overrides=[*small, "ppo.micro_batch_size=4"]), "ppo"
    ).fused_update
    assert not workload_of(load_config("ppo", overrides=[*small, "ppo.ppo_epochs=2"]), "ppo").fused_update
    assert not workload_of(load_config("ppo"), "ppo").fused_update  # PPO-max: 4 minibatches a buffer
    assert not workload_of(
        load_config("ppo", preset="grpo", overrides=small), "ppo"
    ).fused_update  # no critic


def test_the_reference_is_held_as_the_policy_reads_its_weights():
    """bf16 under DDP: the policy's float32 masters run under autocast, and so does the reference (4 bytes per
    parameter); the DeepSpeed engines hold bf16 weights, the reference too (2 bytes)."""
    ref = Role("reference", SHAPE, False, 0, True, policy_precision=True, phase="score")
    assert role_memory(ref, "ddp", 1, WORK).weights == 4 * SHAPE.params
    assert role_memory(ref, "zero2", 1, WORK).weights == 2 * SHAPE.params
    assert role_memory(dataclasses.replace(ref, policy_precision=False), "ddp", 1, WORK).weights == 2000


def test_under_lora_the_reward_model_is_the_critics_base_when_the_critic_starts_from_it(tmp_path):
    from ppomax.commands.plan import build_roles

    model = _tiny_dir(tmp_path)
    base = [f"model.policy={model}", f"model.reward={model}", "model.lora={r: 4}"]

    def reward_role(*over):
        roles, _ = build_roles(
            load_config("ppo", overrides=[*base, *over]), "ppo", str(model), 4, "all-linear"
        )
        return next(r for r in roles if r.name == "reward")

    shared = reward_role()
    assert shared.shares_critic_base
    lora = role_memory(shared, "lora", 1, WORK)
    assert lora.weights == 0 and "critic's base" in lora.note
    assert role_memory(shared, "ddp", 1, WORK).weights > 0  # a full critic trains away from it
    assert not reward_role("model.lora={r: 4, critic: false}", "ppo.critic_init=sft").shares_critic_base
    assert not reward_role("ppo.critic_init=sft").shares_critic_base


def test_the_cpu_run_adds_the_processs_runtime_to_its_strategys_peak(tmp_path, capsys, one_thread):
    from ppomax.plan import CPU_RUNTIME

    model = _tiny_dir(tmp_path)
    capsys.readouterr()
    for over, strategy in (([], "ddp"), (["--set", "model.lora={r: 4}"], "lora")):
        assert main(["plan", "--model", str(model), *over, "--json"]) == 0
        doc = json.loads(capsys.readouterr().out)
        run = doc["cpu_run"]
        assert run["strategy"] == strategy and run["runtime"] == CPU_RUNTIME
        assert run["peak"] == doc["strategies"][strategy]["peak"] + CPU_RUNTIME
    assert main(["plan", "--model", str(model)]) == 0
    assert "CPU run of this config (one process, ddp as above)" in capsys.readouterr().out
