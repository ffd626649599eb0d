"""The benches' FLOP counts (bench/hardware.py) against torch's own FLOP counter on a real HF Llama forward."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from hardware import forward_flops, phase_flops


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_forward_flops_match_torchs_counter(kv_heads):
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import LlamaConfig, LlamaForCausalLM

    h, layers, inter, vocab, heads = 64, 3, 160, 97, 4
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=h,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(cfg).eval()
    b, t, keep = 3, 11, 4
    ids = torch.randint(0, vocab, (b, t))
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(input_ids=ids, logits_to_keep=keep)
    shape = {"h": h, "L": layers, "I": inter, "V": vocab, "d_kv": h // heads * kv_heads}
    # eager attention scores every query against all t keys (the causal mask is applied after): context t
    want = forward_flops(shape, b * t, b * t * t, b * keep)
    assert counter.get_total_flops() == pytest.approx(want, rel=1e-9)


def test_phase_flops_are_forwards_of_the_right_models():
    s = {"h": 8, "L": 2, "I": 32, "V": 50, "d_kv": 8}
    got = phase_flops(s, batch=2, prompt_len=3, response_len=4)
    ctx = 2 * sum(range(1, 8))  # contexts 1..7 per row
    lm = forward_flops(s, 14, ctx, 8)
    value = forward_flops(s, 14, ctx, 0)
    assert got == {"gen": lm, "score": lm + value, "train": 3 * (lm + value)}
    assert lm - value == 2 * 8 * 50 * 8  # the LM head on the 8 response tokens only


def test_phase_flops_at_a_schedule():
    s = {"h": 8, "L": 2, "I": 32, "V": 50, "d_kv": 8}
    fused = phase_flops(s, batch=2, prompt_len=3, response_len=4)
    got = phase_flops(s, batch=2, prompt_len=3, response_len=4, epochs=3, fused_scoring=False)
    lm = forward_flops(s, 14, 2 * sum(range(1, 8)), 8)
    value = forward_flops(s, 14, 2 * sum(range(1, 8)), 0)
    assert got["gen"] == fused["gen"]
    # scoring: the reference and the reward model, plus the policy's old log-probs and the critic's values
    assert got["score"] == 2 * (lm + value)
    assert got["train"] == 3 * 3 * (lm + value)  # forward + backward of policy and critic, 3 epochs
    # fused, with the reference run beside the update's first forward: its forward moves to training
    moved = phase_flops(s, batch=2, prompt_len=3, response_len=4, reference_in_update=True)
    assert moved == {"gen": lm, "score": value, "train": 3 * (lm + value) + lm}
