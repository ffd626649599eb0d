"""The monitoring statistics of a scored batch of rollouts (paper 5.2: reward, KL to the reference, perplexity,
response length), as pure functions of tensors.

:func:`rollout_statistics` is what PPO logs every iteration (global over ranks through ``all_reduce``, tensors,
no host sync); :func:`response_sums` and :func:`response_statistics` are the evaluation's: additive sums over
batches and ranks first, the statistics from the totals at the end.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from .stats import AllReduce, masked_max, masked_mean


def rollout_statistics(
    *,
    scores: Tensor,
    final_scores: Tensor,
    response_mask: Tensor,
    kl: Tensor,
    raw_logprobs: Tensor,
    ref_raw_logprobs: Tensor,
    entropy: Tensor,
    values: Tensor | None,
    returns: Tensor,
    advantages: Tensor,
    score_parts: Mapping[str, Tensor],
    running_mean: float,
    running_std: float,
    all_reduce: AllReduce | None = None,
    kl_clamp: float | None = None,
    exact_kl: Tensor | None = None,
) -> dict[str, Tensor]:
    """Paper 5.2's monitoring metrics of one PPO buffer (rows [B], tokens [B, R] under ``response_mask``).

    Rewards are means over rows with a finite score (``reward/raw_*``, and per reward source
    ``reward/<name>_mean``); ``reward/final_mean`` is the mean score actually added at the last token (eq. 18,
    19). Token means (``kl/per_token``, ``policy/entropy``, ``critic/value_mean``, ``returns/mean``,
    ``advantages/mean``) are over response tokens; ``kl/per_sequence`` sums a row's KL, then averages rows.
    Rows left out of training for a non-finite score (a NaN ``final_scores``) are counted by
    ``nonfinite/samples_count``; they enter the statistics of what was generated (KL, perplexity, entropy,
    length, values) but not those of what was trained on (``reward/final_mean``, returns, advantages).
    Perplexities are ``exp`` of the mean negative log-prob per response token under each model (raw logits).
    ``running_*``: the running moments of the raw scores (eq. 18), reported as they are. ``values=None`` (no
    critic: a critic-free advantage estimator) logs no ``critic/value_mean``.
    """
    ar, mask = all_reduce, response_mask
    rows = torch.ones_like(scores, dtype=torch.bool)
    trained = torch.isfinite(final_scores)
    train_mask = mask & trained.unsqueeze(1)
    finite = torch.isfinite(scores)
    raw_mean = masked_mean(scores, finite, all_reduce=ar)
    out = {
        "reward/raw_mean": raw_mean,
        "reward/raw_std": (masked_mean((scores - raw_mean).square(), finite, all_reduce=ar)).sqrt(),
        "reward/running_mean": torch.tensor(running_mean),
        "reward/running_std": torch.tensor(running_std),
        "reward/final_mean": masked_mean(final_scores, trained, all_reduce=ar),
        "kl/per_token": masked_mean(kl, mask, all_reduce=ar),
        "kl/per_sequence": masked_mean(kl.sum(dim=1), rows, all_reduce=ar),
        "kl/estimator_max": masked_max(kl, mask),
        "ppl/policy": torch.exp(-masked_mean(raw_logprobs, mask, all_reduce=ar)),
        "ppl/reference": torch.exp(-masked_mean(ref_raw_logprobs, mask, all_reduce=ar)),
        "response/length_mean": masked_mean(mask.sum(dim=1).float(), rows, all_reduce=ar),
        "policy/entropy": masked_mean(entropy, mask, all_reduce=ar),
        **({} if values is None else {"critic/value_mean": masked_mean(values, mask, all_reduce=ar)}),
        "returns/mean": masked_mean(returns, train_mask, all_reduce=ar),
        "advantages/mean": masked_mean(advantages, train_mask, all_reduce=ar),
        "nonfinite/samples_count": (~trained).sum().float(),
    }
    if exact_kl is not None:
        out["kl/exact_per_token"] = masked_mean(exact_kl, mask, all_reduce=ar)
        out["kl/exact_per_sequence"] = masked_mean(
            torch.where(mask, exact_kl, torch.zeros((), dtype=exact_kl.dtype)).sum(dim=1), rows, all_reduce=ar
        )
    if kl_clamp is not None:
        out["kl/estimator_clamped_count"] = (mask & (kl.abs() > kl_clamp)).sum().float()
    for name, s in score_parts.items():
        out[f"reward/{name}_mean"] = masked_mean(s, torch.isfinite(s), all_reduce=ar)
    return out


RESPONSE_SUMS = ("reward", "reward_sq", "count", "tokens", "nll", "ref_nll", "kl", "truncated")
"""What :func:`response_sums` adds up, in order."""


def response_sums(
    scores: Tensor,
    kl: Tensor,
    raw_logprobs: Tensor,
    ref_raw_logprobs: Tensor,
    response_mask: Tensor,
    truncated: Tensor,
) -> Tensor:
    """[8] float64 on the CPU: the :data:`RESPONSE_SUMS` of one batch (scores [B], ``kl`` [B, R] already zero
    off the mask, log-probs [B, R], truncated [B] bool). Sums add over batches and ranks; see
    :func:`response_statistics`."""
    mask = response_mask
    nll = -torch.where(mask, raw_logprobs, 0.0).sum(dim=1)
    ref_nll = -torch.where(mask, ref_raw_logprobs, 0.0).sum(dim=1)
    lens = mask.sum(dim=1)
    count = torch.tensor(float(scores.shape[0]))
    parts = [scores.sum(), scores.square().sum(), count, lens.sum(), nll.sum(), ref_nll.sum(), kl.sum()]
    return torch.stack([*parts, truncated.sum()]).double().cpu()


def response_statistics(sums: Sequence[float]) -> dict[str, float]:
    """Evaluation metrics from the totals of :func:`response_sums`: reward mean and (population) std over
    responses, perplexity of policy and reference per response token, KL per token and per response, mean
    length, fraction truncated (no EOS). Empty totals give finite values (counts floored at 1)."""
    total, sq, count, tokens, nll, ref_nll, kl, trunc = sums
    count, tokens = max(count, 1.0), max(tokens, 1.0)
    mean = total / count
    return {
        "reward_mean": mean,
        "reward_std": max(sq / count - mean * mean, 0.0) ** 0.5,
        # float64 like the totals; torch's exp gives inf where math.exp would raise
        "ppl_policy": float(torch.exp(torch.tensor(nll / tokens, dtype=torch.float64))),
        "ppl_reference": float(torch.exp(torch.tensor(ref_nll / tokens, dtype=torch.float64))),
        "kl_per_token": kl / tokens,
        "kl_per_sequence": kl / count,
        "length_mean": tokens / count,
        "truncated_frac": trunc / count,
    }
