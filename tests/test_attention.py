"""Attention in float32 for CPU models computing in bf16 (ppomax.models.attention)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from ppomax.models import load_causal_lm
from ppomax.models.attention import NAME, _computes_in_bf16, cpu_float32_sdpa, use_cpu_float32_attention
from tiny_lm import make_tiny_lm, tiny_config


def _attention_loop(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d), over allowed keys) v, one query at a time in float64."""
    b, h, t, d = q.shape
    out = torch.zeros(b, h, t, d, dtype=torch.float64)
    for i in range(b):
        for j in range(h):
            for s in range(t):
                keys = [u for u in range(k.shape[2]) if allowed[i, s, u]]
                scores = [float(q[i, j, s].double() @ k[i, j, u].double()) / math.sqrt(d) for u in keys]
                top = max(scores)
                weights = [math.exp(x - top) for x in scores]
                total = sum(weights)
                for w, u in zip(weights, keys, strict=True):
                    out[i, j, s] += (w / total) * v[i, j, u].double()
    return out


def test_bf16_cases_are_recognised():
    x32 = torch.zeros(1, 1, 2, 4)
    x16 = x32.bfloat16()
    assert not _computes_in_bf16(x32, x32, x32)
    with torch.no_grad():
        assert not _computes_in_bf16(x16, x16, x16)  # a frozen bf16 model's forward: bf16's kernel is as fast
    assert _computes_in_bf16(x16, x32, x32)  # training bf16 weights (DeepSpeed's bf16 mode)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        assert _computes_in_bf16(x32, x32, x32)
    with torch.autocast("cpu", dtype=torch.float16):
        assert not _computes_in_bf16(x32, x32, x32)
    meta = torch.empty(1, 1, 2, 4, device="meta", dtype=torch.bfloat16)
    assert not _computes_in_bf16(meta, meta, meta)


def test_float32_attention_under_bf16_autocast_matches_a_loop_and_returns_bf16():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 5, 8, generator=g) for _ in range(3))
    allowed = torch.ones(2, 5, 5, dtype=torch.bool).tril()
    allowed[1, :, :2] = False  # a left-padded row: its first two keys are padding
    allowed[1, :2, 0] = True  # (the padding queries attend to something, as transformers' masks make them)
    module = torch.nn.Module()
    module.is_causal = False
    module.training = False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = cpu_float32_sdpa(module, q, k, v, allowed[:, None], scaling=1 / math.sqrt(8))
    assert out.dtype == torch.bfloat16
    want = _attention_loop(q, k, v, allowed).transpose(1, 2)  # transformers returns [B, T, H, D]
    torch.testing.assert_close(out.double(), want, atol=1e-2, rtol=1e-2)  # only the output's bf16 rounding


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    return make_tiny_lm(tmp_path_factory.mktemp("attn"))


def _padded_batch():
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [0, 0, 0, 8, 9, 10]])
    return ids, (ids != 0).long()


def test_loaded_models_use_it_and_a_left_padded_row_ignores_its_padding_in_bf16(lm_dir):
    """Fails if the padding mask is not built for the custom attention (transformers then builds none)."""
    model = load_causal_lm(lm_dir).eval()
    assert model.config._attn_implementation == NAME
    ids, mask = _padded_batch()
    alone = torch.tensor([[8, 9, 10]])
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask).logits[1, 3:].float()
        unpadded = model(input_ids=alone, attention_mask=torch.ones_like(alone)).logits[0].float()
    torch.testing.assert_close(padded, unpadded, atol=2e-2, rtol=0)


def test_float32_is_bit_identical_to_transformers_sdpa_and_bf16_training_tracks_float32(lm_dir):
    ours = load_causal_lm(lm_dir)
    plain = AutoModelForCausalLM.from_pretrained(lm_dir, attn_implementation="sdpa")
    assert plain.config._attn_implementation == "sdpa"
    ids, mask = _padded_batch()

    def grads(model, autocast):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=ids, attention_mask=mask).logits
        loss = logits.float().logsumexp(-1).mul(mask).sum()
        loss.backward()
        return logits.detach().float(), torch.cat([p.grad.flatten() for p in model.parameters()])

    logits_ours, grad_ours = grads(ours, False)
    logits_plain, grad_plain = grads(plain, False)
    assert torch.equal(logits_ours, logits_plain) and torch.equal(grad_ours, grad_plain)
    _, grad_bf16 = grads(ours, True)
    assert float((grad_bf16 - grad_plain).norm() / grad_plain.norm()) < 0.05


def test_the_choice_is_not_saved_and_other_attentions_are_left_alone(lm_dir, tmp_path):
    model = load_causal_lm(lm_dir)
    model.save_pretrained(tmp_path / "saved")
    assert NAME not in (tmp_path / "saved" / "config.json").read_text()
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "saved").config._attn_implementation == "sdpa"
    eager = AutoModelForCausalLM.from_config(tiny_config(300), attn_implementation="eager")
    assert use_cpu_float32_attention(eager).config._attn_implementation == "eager"
