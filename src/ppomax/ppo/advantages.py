"""Step 3 of the PPO iteration, the advantages (no gradient), on the merged buffer: the running reward moments
updated with the raw scores (eq. 18), the score re-parameterised (``ppo.reward_transform``, then
``ppo.reward_clip``; a truncated response may get ``generation.truncated_penalty``), the token-level rewards
``-kl_coef * KL_t`` + score at the last token (eq. 19), then GAE (eq. 9-11) or a critic-free estimator
(``ppo.advantage_estimator``: GRPO, RLOO, REINFORCE++; :mod:`ppomax.algos.estimators`), which then needs no
values (no critic exists). The math is in :mod:`ppomax.algos`; this module decides which tensors go where.

``generation.truncated_response``: a response that hits ``max_new_tokens`` without EOS is ``score``-d as is
(default: the RM sees a cut text, as in MOSS-RLHF), or gets ``truncated_penalty`` as its final score
(``penalty``, in the units of the re-parameterised score; such scores stay out of the running moments).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ppomax.algos import (
    AdvantageInputs,
    AllReduce,
    RunningMoments,
    advantages_of,
    kl_per_token,
    reparameterize_scores,
    token_level_rewards,
    trainable_rows,
)
from ppomax.config import GenerationConfig, PPOSettings

from .experience import Experience


def final_scores(
    raw: Tensor, truncated: Tensor, ppo: PPOSettings, gen: GenerationConfig, moments: RunningMoments
) -> Tensor:
    """The score added at the last token, from raw scores [B] and running moments already updated with this batch:
    re-parameterised as ``ppo`` asks (paper 5.3.1, :func:`ppomax.algos.reparameterize_scores`); with
    ``truncated_response: penalty`` a response without EOS gets ``truncated_penalty`` instead."""
    out = reparameterize_scores(raw, moments.mean, moments.std, ppo.reward_transform, ppo.reward_clip)
    if gen.truncated_response == "penalty":
        out = torch.where(truncated, torch.full_like(out, gen.truncated_penalty), out)
    return out


@torch.no_grad()
def compute_advantages(
    exp: Experience,
    ppo: PPOSettings,
    gen: GenerationConfig,
    moments: RunningMoments,
    all_reduce: AllReduce | None = None,
    *,
    kl_coef: float,
) -> None:
    """Fill ``final_scores``, ``kl``, ``rewards``, ``advantages``, ``returns`` of ``exp`` in place.

    The running moments always track the raw scores (so they can be monitored), but are *used* only by the
    switches that ask for them. A sample whose score is NaN or +-inf is left out of training as if it were not
    in the buffer (:func:`ppomax.algos.trainable_rows`): it enters neither the moments nor the token rewards and
    advantages (zero), its final score is NaN (none was added), and :func:`trainable_part` drops it from the
    updates. Its KL and the rest of the scoring pass still describe what the policy generated. With
    ``truncated_response: penalty`` the truncated responses' raw scores stay out of the moments too, since
    those are replaced. ``all_reduce``: the estimators' global statistics (REINFORCE++'s whitening) over ranks.
    ``kl_coef``: the iteration's KL coefficient (``ppo.kl.coef``, or the adaptive one of ``ppo.kl.target``),
    resolved once per iteration by the trainer.
    """
    score_targets(exp, ppo, gen, moments)
    token_advantages(exp, ppo, gen.samples_per_prompt, all_reduce, kl_coef=kl_coef)


@torch.no_grad()
def score_targets(exp: Experience, ppo: PPOSettings, gen: GenerationConfig, moments: RunningMoments) -> None:
    """The first half of :func:`compute_advantages`, which needs no log-prob or value: the running moments
    updated with the raw scores and ``final_scores`` filled (NaN for a row left out of training)."""
    raw = exp.computed("scores")
    penalised = exp.truncated if gen.truncated_response == "penalty" else None
    keep = trainable_rows(raw, penalised)
    moments.update(raw, mask=keep if penalised is None else keep & ~penalised)
    scores = final_scores(torch.where(keep, raw, torch.zeros_like(raw)), exp.truncated, ppo, gen, moments)
    exp.final_scores = torch.where(keep, scores, torch.full_like(scores, float("nan")))


@torch.no_grad()
def token_advantages(
    exp: Experience,
    ppo: PPOSettings,
    group_size: int = 1,
    all_reduce: AllReduce | None = None,
    *,
    kl_coef: float,
) -> None:
    """The second half of :func:`compute_advantages`, from ``final_scores`` and the scoring pass's log-probs and
    values: ``kl``, ``rewards``, ``advantages``, ``returns``. GAE works row by row (any selection of rows gives
    the same rows' values); GRPO and RLOO group by group (the ``group_size`` responses to a prompt are
    consecutive rows, as :class:`Updater`'s shuffle keeps them); REINFORCE++ whitens over the whole batch, all
    ranks through ``all_reduce``. Without a critic ``returns`` is the reward-to-go (``gamma``-discounted).
    With ``kl.acts_in: loss`` the rewards carry no KL term (the policy loss does, :func:`kl_loss`); ``kl`` is filled
    either way (it is what the rollout spent, and what the adaptive coefficient measures), unclamped: ``kl.clamp``
    bounds the penalty only."""
    mask, final = exp.response_mask, exp.computed("final_scores")
    logprobs, ref_logprobs = exp.computed("logprobs"), exp.computed("ref_logprobs")
    kl = kl_per_token(logprobs, ref_logprobs, ppo.kl.estimator)
    exp.kl = kl = torch.where(mask, kl, torch.zeros((), dtype=kl.dtype, device=kl.device))
    if exp.exact_kl is not None:
        exp.exact_kl = torch.where(mask, exp.exact_kl, torch.zeros((), dtype=kl.dtype, device=kl.device))
    train = mask & torch.isfinite(final).unsqueeze(1)
    if ppo.kl.acts_in == "loss":
        penalised = torch.zeros_like(kl)
    elif ppo.kl.clamp is None:
        penalised = kl
    else:
        penalised = kl_per_token(logprobs, ref_logprobs, ppo.kl.estimator, ppo.kl.clamp)
    exp.rewards = rewards = token_level_rewards(final, penalised, train, kl_coef)
    exp.advantages, exp.returns = advantages_of(
        ppo.advantage_estimator,
        AdvantageInputs(
            rewards,
            train,
            exp.values,
            ppo.gamma,
            ppo.lam,
            group_size=group_size,
            all_reduce=all_reduce,
            group_std_norm=ppo.group_std_norm,
            scores=final,
        ),
    )


def trainable_part(exp: Experience) -> Experience:
    """``exp`` as the updates see it: the response mask of the rows left out of training (a NaN final score,
    see :func:`compute_advantages`) zeroed, so they weigh nothing in the whitening and the losses."""
    keep = torch.isfinite(exp.computed("final_scores"))
    return dataclasses.replace(exp, response_mask=exp.response_mask & keep.unsqueeze(1))
