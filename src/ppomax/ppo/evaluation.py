"""Periodic evaluation during PPO on held-out prompts (``logging.eval_every``, ``eval_samples``, ``eval_greedy``).

The first ``eval_samples`` prompts of ``data.valid_prompts`` are answered greedily or with the training sampling
settings, then scored like a rollout: reward (raw, every source), policy perplexity on its own responses and the
reference's perplexity on the same responses (raw logits), KL to the reference per token and per sequence (same
estimator and logits as the training metric), response length and truncations
(:func:`ppomax.algos.response_statistics`). Sampling runs under a forked RNG seeded by the step, so evaluating
never changes the training trajectory. Each evaluation writes its responses to ``samples/eval-step-N.jsonl``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ppomax.algos import response_statistics, response_sums
from ppomax.data import rank_share

from .data import PromptSet
from .experience import Experience
from .scoring import Rollouts

if TYPE_CHECKING:
    from accelerate import Accelerator


@torch.no_grad()
def evaluate(
    rollouts: Rollouts,
    prompts: PromptSet,
    acc: Accelerator,
    *,
    step: int,
    samples: int,
    batch_size: int,
    greedy: bool,
    seed: int,
    samples_dir: Path | None,
    on_samples: Callable[[list[dict[str, Any]]], None] | None = None,
) -> dict[str, float]:
    """Evaluate the current policy on the first ``samples`` of ``prompts`` (shared among ranks); returns metrics
    (to be logged with the ``eval/`` prefix) and writes the responses under ``samples_dir`` (None: not this
    process), where ``on_samples(rows)`` also gets them (the trackers' table)."""
    n = min(samples, len(prompts))
    mine = rank_share(range(n), acc.process_index, acc.num_processes)
    batches: list[Experience] = []
    devices = [acc.device] if acc.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed + 7919 * (step + 1))
        for lo in range(0, len(mine), batch_size):
            exp = rollouts.generate(prompts, mine[lo : lo + batch_size], greedy=greedy)
            rollouts.score(exp, step, critic=False)
            batches.append(exp)

    rows: list[dict[str, Any]] = []
    sums = torch.zeros(8, dtype=torch.float64)
    for exp in batches:
        mask, scores, exact_kl = exp.response_mask, exp.scores, exp.exact_kl
        raw, ref_raw = exp.raw_logprobs, exp.ref_raw_logprobs
        assert scores is not None and exact_kl is not None and raw is not None and ref_raw is not None, (
            "scored"
        )
        # the exact KL over the vocabulary: greedy (or top-p) tokens are no sample of the policy, so an estimator
        # evaluated on them would not estimate the KL
        kl = torch.where(mask, exact_kl, 0.0)
        sums += response_sums(scores, kl, raw, ref_raw, mask, exp.truncated)
        rows += _sample_rows(exp, scores.tolist(), kl.sum(dim=1).tolist())
    if acc.num_processes > 1:
        from accelerate.utils import gather_object

        sums = acc.reduce(sums.to(acc.device), reduction="sum").cpu()
        rows = gather_object(rows)
    if samples_dir is not None:
        samples_dir.mkdir(parents=True, exist_ok=True)
        with (samples_dir / f"eval-step-{step}.jsonl").open("w", encoding="utf-8") as fh:
            for r in rows:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        if on_samples is not None:
            on_samples(rows)
    return response_statistics(sums.tolist())


def _sample_rows(exp: Experience, s_rows: list[float], kl_rows: list[float]) -> list[dict[str, Any]]:
    return [
        {
            "prompt": exp.prompts[i],
            "response": exp.responses[i],
            "reward": s_rows[i],
            **{f"reward_{k}": v[i].item() for k, v in exp.score_parts.items()},
            "length": int(exp.response_lens[i]),
            "truncated": bool(exp.truncated[i]),
            "kl": kl_rows[i],
        }
        for i in range(exp.batch_size)
    ]
