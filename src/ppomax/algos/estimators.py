"""Advantage estimators: GAE (the paper's, eq. 8-11, with the critic's values), the critic-free ones (beyond the
paper: GRPO, RLOO and REINFORCE++), and the advantage normalisation of a minibatch (paper 5.3.1).

Each critic-free estimator takes the token-level rewards of :func:`ppomax.algos.token_level_rewards` (``-kl_coef * KL_t`` on every
response token, the re-parameterised score added at the last one) and the response mask, and returns token
advantages [B, T] (zero off the mask) for the same clipped surrogate as GAE's (:func:`ppomax.algos.policy_loss`).

The sequence reward of a response is the sum of its token rewards, ``R_i = score_i - kl_coef * sum_t KL_t``:
the score plus the response's KL penalty (with ``kl.coef: 0``, or the KL moved out of the rewards, the score
alone). With the k1 estimator ``sum_t KL_t`` is the log-ratio ``log pi(y|x) / pi_ref(y|x)`` of the whole
response, the KL-penalised sequence reward of RLOO (Ahmadian et al. 2024).

Every estimator of :data:`ppomax.algos.registry.ADVANTAGE_ESTIMATORS` is implemented here as a function of
:class:`AdvantageInputs` returning ``(advantages, returns)`` (:func:`advantages_of` looks it up by name).

Groups (GRPO, RLOO): the ``n`` responses to one prompt are ``n`` consecutive rows, so rows ``g*n .. g*n+n-1`` form
group ``g`` (the trainer keeps them so through the buffer and the minibatches). A row without a masked token
(a response left out of training, or an empty one) is no member of its group: the group's statistics are over
its other rows, and its own advantage is 0. A group with fewer than two members has no baseline, and one whose
members' rewards are all equal no signal: all its advantages are 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .registry import ADVANTAGE_ESTIMATORS
from .stats import AllReduce, _bool_mask, last_token_index, masked_whiten


@torch.no_grad()
def gae(
    rewards: Tensor, values: Tensor, response_mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over a padded batch (paper eq. 8-11, app. C.3).

    rewards, values, response_mask: [B, T] -> (advantages, returns), both [B, T], float32 or wider, no
    gradient. With delta_t = r_t + gamma * V(s_{t+1}) - V(s_t):
    ``A_t = sum_l (gamma * lam)^l * delta_{t+l} = delta_t + gamma * lam * A_{t+1}``, and
    ``returns_t = A_t + V(s_t)`` (the critic's target).

    The recursion runs over each row's real tokens only, in order: "t + 1" is the next masked position,
    so left/right padding and holes inside a row are skipped exactly as if the row were compacted. The
    value after the last real token is 0 (the episode ends). Padded positions get advantage and return 0
    and their rewards/values (even NaN) never enter the computation. One Python loop over T for the
    whole batch.
    """
    m = _bool_mask(response_mask)
    dtype = torch.promote_types(torch.promote_types(rewards.dtype, values.dtype), torch.float32)
    zero = torch.zeros((), dtype=dtype, device=rewards.device)
    r = torch.where(m, rewards.to(dtype), zero)
    v = torch.where(m, values.to(dtype), zero)
    advantages = torch.zeros_like(r)
    next_value = torch.zeros(r.shape[0], dtype=dtype, device=r.device)
    next_adv = torch.zeros_like(next_value)
    for t in range(r.shape[1] - 1, -1, -1):
        delta = r[:, t] + gamma * next_value - v[:, t]
        adv = delta + gamma * lam * next_adv
        real = m[:, t]
        advantages[:, t] = torch.where(real, adv, zero)
        next_value = torch.where(real, v[:, t], next_value)
        next_adv = torch.where(real, adv, next_adv)
    returns = torch.where(m, advantages + v, zero)
    return advantages, returns


def normalize_advantages(
    advantages: Tensor,
    mask: Tensor,
    normalize: bool,
    clip: float | None,
    all_reduce: AllReduce | None = None,
) -> Tensor:
    """Advantage normalisation (minibatch whitening) then clipping (paper 5.3.1).

    advantages, mask: [B, T] -> [B, T], zero outside the mask. normalize=True whitens to mean 0 / var 1
    over the minibatch's masked tokens (all ranks with `all_reduce`); clip then clamps to [-clip, clip]
    (None = no clip). Both off returns the advantages unchanged apart from zeroed padding.
    """
    out = masked_whiten(advantages, mask, shift_mean=True, all_reduce=all_reduce) if normalize else advantages
    if clip is not None:
        out = out.clamp(-clip, clip)
    return torch.where(_bool_mask(mask), out, torch.zeros((), dtype=out.dtype, device=out.device))


def sequence_rewards(rewards: Tensor, mask: Tensor) -> Tensor:
    """``R_i = sum_t r_{i,t}`` over each row's masked tokens: rewards, mask [B, T] -> [B] (float32 or wider)."""
    m = _bool_mask(mask)
    dtype = torch.promote_types(rewards.dtype, torch.float32)
    return torch.where(m, rewards.to(dtype), torch.zeros((), dtype=dtype, device=rewards.device)).sum(dim=1)


def _groups(rewards: Tensor, mask: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(R [G, n], member [G, n] bool, members per group [G, 1], whether the group compares anything [G, 1]) of a
    batch of ``G * n`` rows. A group compares when it has two members whose rewards differ: a mean of equal
    values need not round back to them, so "all equal" is tested exactly, not through a std that rounding
    leaves a hair above 0."""
    b = rewards.shape[0]
    if group_size < 1 or b % group_size:
        raise ValueError(f"{b} rows do not split into groups of {group_size}")
    m = _bool_mask(mask)
    member = m.any(dim=1).view(-1, group_size)
    seq = sequence_rewards(rewards, m).view(-1, group_size)
    seq = torch.where(member, seq, torch.zeros((), dtype=seq.dtype, device=seq.device))
    inf = torch.full((), math.inf, dtype=seq.dtype, device=seq.device)
    spread = torch.where(member, seq, -inf).amax(dim=1, keepdim=True) > torch.where(member, seq, inf).amin(
        dim=1, keepdim=True
    )
    return seq, member, member.sum(dim=1, keepdim=True).to(seq.dtype), spread


def _on_tokens(advantages: Tensor, member: Tensor, mask: Tensor) -> Tensor:
    """Row advantages [G, n] (0 for non-members) on every masked token of their row: [B, T]."""
    adv = torch.where(member, advantages, torch.zeros((), dtype=advantages.dtype, device=advantages.device))
    m = _bool_mask(mask)
    return torch.where(m, adv.reshape(-1, 1), torch.zeros((), dtype=adv.dtype, device=adv.device))


@torch.no_grad()
def grpo_advantages(
    rewards: Tensor, mask: Tensor, group_size: int, eps: float = 1e-4, scale: bool = True
) -> Tensor:
    """GRPO's outcome-supervised advantage (Shao et al. 2024, "DeepSeekMath", sec. 4.1.2).

    rewards, mask: [B, T] token-level rewards and response mask, B = G groups x ``group_size`` rows -> [B, T]
    advantages, no gradient. With ``R_i`` the sequence reward (:func:`sequence_rewards`: the score plus the
    response's KL penalty, see the module docstring) of the group's members 1..n:
    ``A_i = (R_i - mean(R)) / (std(R) + eps)`` on every response token of row i ("the advantages of all tokens
    in the output" are the normalised reward). ``std`` is the sample standard deviation (n - 1), as TRL's
    GRPOTrainer computes it, and ``eps = 1e-4`` as there: the paper says neither. The division makes every
    group's advantages unit-scale whatever its spread: rewards spanning 0.003 (ties up to rounding) get
    +-1.08 like rewards spanning 3. ``scale=False`` drops it, ``A_i = R_i - mean(R)``: Dr. GRPO (Liu et al.
    2025, "Understanding R1-Zero-Like Training", sec. 3.1: the std favours groups whose rewards barely differ),
    verl's ``norm_adv_by_std_in_grpo: false``, TRL's ``scale_rewards: none``. A group whose rewards are all
    equal gets advantage 0 exactly (no comparison, no signal; std 0 never divides), and so does one with fewer
    than two members.
    """
    seq, member, count, spread = _groups(rewards, mask, group_size)
    mean = seq.sum(dim=1, keepdim=True) / count.clamp(min=1)
    dev = torch.where(member, seq - mean, torch.zeros((), dtype=seq.dtype, device=seq.device))
    if scale:
        std = (dev.square().sum(dim=1, keepdim=True) / (count - 1).clamp(min=1)).sqrt()
        dev = dev / (std + eps)
    adv = torch.where(spread, dev, torch.zeros((), dtype=seq.dtype, device=seq.device))
    return _on_tokens(adv, member, mask)


@torch.no_grad()
def rloo_advantages(rewards: Tensor, mask: Tensor, group_size: int) -> Tensor:
    """RLOO's leave-one-out advantage (Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style
    Optimization for Learning from Human Feedback in LLMs", the RLOO estimator).

    rewards, mask: [B, T], B = G groups x ``group_size`` rows -> [B, T] advantages, no gradient. Each response's
    baseline is the mean sequence reward of the other members of its group (:func:`sequence_rewards`: the
    score plus the response's KL penalty, the paper's KL-shaped sequence reward with kl_estimator k1):
    ``A_i = R_i - 1/(n-1) * sum_{j != i} R_j`` (= ``n/(n-1) * (R_i - mean(R))``) on every response token of row
    i. A group with fewer than two members has no baseline, and one whose rewards are all equal no signal:
    advantage 0 (exactly, whatever the rounding of the sums).
    """
    seq, member, count, spread = _groups(rewards, mask, group_size)
    others = (seq.sum(dim=1, keepdim=True) - seq) / (count - 1).clamp(min=1)
    adv = torch.where(spread, seq - others, torch.zeros((), dtype=seq.dtype, device=seq.device))
    return _on_tokens(adv, member, mask)


@torch.no_grad()
def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """Reward-to-go ``G_t = sum_{s >= t} gamma^(s - t) r_s`` over each row's masked tokens (padding skipped, as in
    :func:`ppomax.algos.gae`, which this is with values 0 and lambda 1): rewards, mask [B, T] -> [B, T]."""
    return gae(rewards, torch.zeros_like(rewards), mask, gamma, 1.0)[0]


@torch.no_grad()
def reinforce_pp_advantages(
    rewards: Tensor, mask: Tensor, gamma: float, all_reduce: AllReduce | None = None
) -> tuple[Tensor, Tensor]:
    """REINFORCE++ (Hu 2025, "REINFORCE++: Stabilizing Critic-Free Policy Optimization with Global Advantage
    Normalization", arXiv 2501.03262): (advantages, returns), both [B, T], no gradient.

    rewards, mask: [B, T]: the token-level rewards ``r_t = 1[t = last] * score - kl_coef * KL_t``, the paper's
    token-level KL penalty. The return ``G_t = sum_{s >= t} gamma^(s - t) r_s`` (:func:`discounted_returns`) is
    whitened over every masked token of the global batch, all ranks through ``all_reduce``:
    ``A_t = (G_t - mean(G)) / std(G)`` (:func:`ppomax.algos.masked_whiten`), with no critic and no per-prompt
    baseline. Returns ``(A, G)``.
    """
    returns = discounted_returns(rewards, mask, gamma)
    return masked_whiten(returns, mask, shift_mean=True, all_reduce=all_reduce), returns


@torch.no_grad()
def reinforce_pp_baseline_advantages(
    rewards: Tensor,
    mask: Tensor,
    scores: Tensor,
    group_size: int,
    gamma: float,
    all_reduce: AllReduce | None = None,
) -> tuple[Tensor, Tensor]:
    """REINFORCE++ with a baseline (Hu 2025, "REINFORCE++", arXiv 2501.03262 v9: the "w/ Baseline" variant for
    k > 1 responses per prompt): (advantages, returns), both [B, T], no gradient.

    rewards, mask: [B, T] token-level rewards (the score at the last token, ``-kl_coef * KL_t`` on every token);
    scores: [B] the score each row's rewards carry at its last token (``final_scores``); B = G groups x
    ``group_size`` rows. Each score is replaced by its deviation from the mean score of its group's members
    (``s_i - mean_g(s)``), then REINFORCE++ runs on the result (:func:`reinforce_pp_advantages`: the
    ``gamma``-discounted return whitened over every masked token of the global batch): the group mean is the
    baseline, the global whitening the only normalisation, no division by the group's std (GRPO's). As
    OpenRLHF's ``reinforce_baseline`` (by the paper's author), which subtracts the group mean from the reward
    model's score before adding the per-token KL penalty; verl's ``reinforce_plus_plus_baseline`` subtracts it
    from the whole sequence reward (score plus KL) and puts that on every token, without the return. A row
    without a masked token is no member (its score, NaN or not, enters no mean).
    """
    m = _bool_mask(mask)
    member = m.any(dim=1)
    if group_size < 1 or member.shape[0] % group_size:
        raise ValueError(f"{member.shape[0]} rows do not split into groups of {group_size}")
    dtype = torch.promote_types(rewards.dtype, torch.float32)
    s = torch.where(member, scores.to(dtype), torch.zeros((), dtype=dtype, device=scores.device))
    grouped, members = s.view(-1, group_size), member.view(-1, group_size)
    mean = grouped.sum(dim=1, keepdim=True) / members.sum(dim=1, keepdim=True).clamp(min=1)
    baseline = torch.where(member, mean.expand_as(grouped).reshape(-1), torch.zeros_like(s))
    shifted = rewards.to(dtype).scatter_add(1, last_token_index(m).unsqueeze(1), -baseline.unsqueeze(1))
    return reinforce_pp_advantages(shifted, m, gamma, all_reduce)


# ------------------------------------------------------------------------------------------ the registered table


@dataclass(frozen=True)
class AdvantageInputs:
    """What an advantage estimator may use (each takes what it needs): token-level rewards and the response mask
    [B, T] (:func:`ppomax.algos.token_level_rewards`), the critic's values [B, T] (None without a critic), the
    discount ``gamma`` and GAE's ``lam``, the responses per prompt ``group_size`` (consecutive rows), and the
    hook that sums a statistic over ranks, and the estimators' own switches."""

    rewards: Tensor
    mask: Tensor
    values: Tensor | None = None
    gamma: float = 1.0
    lam: float = 1.0
    group_size: int = 1
    all_reduce: AllReduce | None = None
    group_std_norm: bool = True
    """GRPO: divide by the group's std (``ppo.group_std_norm``)."""
    scores: Tensor | None = None
    """[B] the score each row's rewards carry at its last token (REINFORCE++ w/ baseline centres it)."""


def advantages_of(name: str, inputs: AdvantageInputs) -> tuple[Tensor, Tensor]:
    """``(advantages, returns)`` [B, T] of the registered estimator ``name`` (an unknown name is an error)."""
    return ADVANTAGE_ESTIMATORS.function(name)(inputs)


@ADVANTAGE_ESTIMATORS.implements("gae")
def _gae(x: AdvantageInputs) -> tuple[Tensor, Tensor]:
    if x.values is None:
        raise ValueError("gae needs the critic's values")
    return gae(x.rewards, x.values, x.mask, x.gamma, x.lam)


@ADVANTAGE_ESTIMATORS.implements("grpo")
def _grpo(x: AdvantageInputs) -> tuple[Tensor, Tensor]:
    adv = grpo_advantages(x.rewards, x.mask, x.group_size, scale=x.group_std_norm)
    return adv, discounted_returns(x.rewards, x.mask, x.gamma)


@ADVANTAGE_ESTIMATORS.implements("rloo")
def _rloo(x: AdvantageInputs) -> tuple[Tensor, Tensor]:
    return rloo_advantages(x.rewards, x.mask, x.group_size), discounted_returns(x.rewards, x.mask, x.gamma)


@ADVANTAGE_ESTIMATORS.implements("reinforce_pp")
def _reinforce_pp(x: AdvantageInputs) -> tuple[Tensor, Tensor]:
    return reinforce_pp_advantages(x.rewards, x.mask, x.gamma, x.all_reduce)


@ADVANTAGE_ESTIMATORS.implements("reinforce_pp_baseline")
def _reinforce_pp_baseline(x: AdvantageInputs) -> tuple[Tensor, Tensor]:
    if x.scores is None:
        raise ValueError("reinforce_pp_baseline needs the scores at the last token")
    return reinforce_pp_baseline_advantages(x.rewards, x.mask, x.scores, x.group_size, x.gamma, x.all_reduce)
