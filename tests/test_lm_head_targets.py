"""Masked next-token losses (SFT, PPO-ptx, the reward model's LM term) run the LM head on the trained tokens'
positions only (ppomax.models.lm_head.logits_at_targets): the same loss and gradient as the full [B, T, V] logits,
the head on K positions instead of B * T."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ppomax.algos import lm_nll
from ppomax.data import SFTCollator, pad_id_of
from ppomax.data.tokenize import SFTExample, tokenize_sft
from ppomax.models.lm_head import TargetPositions
from ppomax.ppo.models import Forward
from ppomax.trainers.sft import sft_loss
from tiny_lm import make_tiny_lm

TEXTS = ["apple stone river tree bird", "Human: say apple. Assistant: apple apple"]


def test_target_positions_are_the_positions_before_each_trained_token():
    targets = torch.tensor([[0, 1, 1, 0], [1, 0, 0, 1]], dtype=torch.bool)  # [B, T-1]: token t + 1 trained
    ids = torch.arange(10).view(2, 5)
    pos = TargetPositions.of(targets)
    expected = [(b, t) for b in range(2) for t in range(4) if targets[b, t]]
    assert pos.source.tolist() == [b * 5 + t for b, t in expected]
    assert pos.labels(ids).tolist() == [[int(ids[b, t + 1]) for b, t in expected]]
    outputs = torch.randn(2, 5, 3)
    torch.testing.assert_close(pos.select(outputs), torch.stack([outputs[b, t] for b, t in expected])[None])


def _batch(tok):
    examples = [
        SFTExample("\n\nHuman: Repeat the word apple.\n\nAssistant:", " apple apple apple"),
        SFTExample("\n\nHuman: Say stone, please, say it.\n\nAssistant:", " stone"),
        SFTExample("\n\nHuman: Bird?\n\nAssistant:", " bird tree river stone"),
    ]
    return SFTCollator(pad_id_of(tok))([tokenize_sft(tok, e, 64, 64) for e in examples])


def _full_nll(model, batch):
    mask = batch["attention_mask"]
    out = model(input_ids=batch["input_ids"], attention_mask=mask, use_cache=False)
    labels = batch["labels"][:, 1:]
    trained = labels != -100
    logp = torch.log_softmax(out.logits[:, :-1].float(), -1)
    token = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return -(token * trained).sum() / trained.sum()


@pytest.mark.parametrize(
    "loss_of",
    [
        pytest.param(lambda model, batch: sft_loss(model, batch)[0], id="sft"),
        pytest.param(lambda model, batch: lm_nll(*Forward.lm_loss_inputs(model, batch)), id="ppo_ptx"),
    ],
)
def test_a_masked_lm_loss_runs_the_head_on_the_trained_tokens_only(tmp_path, loss_of):
    model_dir = make_tiny_lm(tmp_path, TEXTS)
    tok = AutoTokenizer.from_pretrained(model_dir)
    batch = _batch(tok)
    trained = int((batch["labels"][:, 1:] != -100).sum())
    assert trained < batch["input_ids"].numel() // 2  # prompts and padding would be most of the head's work

    seen: list[int] = []
    losses, grads = [], []
    for narrowed in (True, False):
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        if narrowed:
            model.get_output_embeddings().register_forward_hook(
                lambda _m, args, _o: seen.append(args[0].shape[:-1].numel())
            )
            loss = loss_of(model, batch)
        else:
            loss = _full_nll(model, batch)
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert seen == [trained]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
