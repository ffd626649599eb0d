"""Periodic evaluation during PPO on held-out prompts (``logging.eval_every``, ``eval_samples``, ``eval_greedy``).

The first ``eval_samples`` prompts of ``data.valid_prompts`` are answered greedily or with the training sampling
settings, then scored like a rollout: reward (raw, every source), policy perplexity on its own responses and the
reference's perplexity on the same responses (raw logits), KL to the reference per token and per sequence (same
estimator and logits as the training metric), response length and truncations. Sampling runs under a forked RNG
seeded by the step, so evaluating never changes the training trajectory. Each evaluation writes its responses to
``out_dir/samples/eval-step-N.jsonl``.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import torch

from ppomax.algos import kl_per_token
from ppomax.experience import Experience

if TYPE_CHECKING:
    from .ppo import PPOTrainer


@torch.no_grad()
def evaluate(trainer: PPOTrainer, step: int) -> dict[str, float]:
    """Evaluate the current policy; returns metrics (to be logged with the ``eval/`` prefix)."""
    cfg, acc = trainer.cfg, trainer.acc
    assert trainer.valid is not None
    n = min(cfg.logging.eval_samples, len(trainer.valid))
    mine = list(range(n))[acc.process_index :: acc.num_processes]
    size = cfg.ppo.rollout_batch_size
    batches: list[Experience] = []
    devices = [acc.device] if acc.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(cfg.seed + 7919 * (step + 1))
        for lo in range(0, len(mine), size):
            exp = trainer.generate(mine[lo : lo + size], trainer.valid, greedy=cfg.logging.eval_greedy)
            trainer.score(exp, values=False)
            batches.append(exp)

    rows: list[dict[str, Any]] = []
    sums = torch.zeros(8, dtype=torch.float64)
    for exp in batches:
        mask = exp.response_mask
        kl = torch.where(mask, kl_per_token(exp.logprobs, exp.ref_logprobs, cfg.ppo.kl_estimator), 0.0)
        nll = -torch.where(mask, exp.raw_logprobs, 0.0).sum(dim=1)
        ref_nll = -torch.where(mask, exp.ref_raw_logprobs, 0.0).sum(dim=1)
        lens = mask.sum(dim=1)
        scores = exp.scores
        sums += (
            torch.stack(
                [
                    scores.sum(),
                    scores.square().sum(),
                    torch.tensor(float(exp.batch_size)),
                    lens.sum(),
                    nll.sum(),
                    ref_nll.sum(),
                    kl.sum(),
                    exp.truncated.sum(),
                ]
            )
            .double()
            .cpu()
        )
        kl_rows, s_rows = kl.sum(dim=1).tolist(), scores.tolist()
        for i in range(exp.batch_size):
            rows.append(
                {
                    "prompt": exp.prompts[i],
                    "response": exp.responses[i],
                    "reward": s_rows[i],
                    **{f"reward_{k}": v[i].item() for k, v in exp.score_parts.items()},
                    "length": int(exp.response_lens[i]),
                    "truncated": bool(exp.truncated[i]),
                    "kl": kl_rows[i],
                }
            )
    if acc.num_processes > 1:
        from accelerate.utils import gather_object

        sums = acc.reduce(sums.to(acc.device), reduction="sum").cpu()
        rows = gather_object(rows)
    total, sq, count, tokens, nll, ref_nll, kl, trunc = sums.tolist()
    count, tokens = max(count, 1.0), max(tokens, 1.0)
    mean = total / count
    metrics = {
        "reward_mean": mean,
        "reward_std": max(sq / count - mean * mean, 0.0) ** 0.5,
        "ppl_policy": float(torch.exp(torch.tensor(nll / tokens))),
        "ppl_reference": float(torch.exp(torch.tensor(ref_nll / tokens))),
        "kl_per_token": kl / tokens,
        "kl_per_sequence": kl / count,
        "length_mean": tokens / count,
        "truncated_frac": trunc / count,
    }
    if acc.is_main_process:
        out = trainer.out_dir / "samples"
        out.mkdir(parents=True, exist_ok=True)
        with (out / f"eval-step-{step}.jsonl").open("w", encoding="utf-8") as fh:
            for r in rows:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    return metrics
