"""PPO, critic, entropy, language-model and reward-model losses."""

from __future__ import annotations

from typing import Literal, TypedDict

import torch
from torch import Tensor
from torch.nn import functional as F

from .registry import LOSS_AGGREGATIONS
from .reward_shaping import KLEstimator, kl_per_token
from .stats import _bool_mask, masked_max, masked_mean, masked_min, masked_sum
from .vocab import logprobs_from_logits


class Aggregation(TypedDict):
    """The keywords of :func:`aggregate_loss` that the policy-side losses (:func:`policy_loss`, :func:`kl_loss`,
    :func:`entropy_bonus_loss`) take alike, to pass them once as ``**``."""

    aggregation: str
    horizon: int | None


def aggregate_loss(
    per_token: Tensor, mask: Tensor, aggregation: str = "token_mean", horizon: int | None = None
) -> Tensor:
    """A per-token loss [B, T] reduced to a scalar over ``mask``'s tokens as ``aggregation`` (a name of
    :data:`ppomax.algos.registry.LOSS_AGGREGATIONS`; verl's ``agg_loss`` spells them with dashes):

    - ``token_mean``: ``sum_{i,t} l_it / sum_i |o_i|``, every token of the batch alike (MOSS-RLHF code's PPO;
      DAPO's "token-level policy gradient loss");
    - ``seq_mean_token_mean``: ``1/G sum_i 1/|o_i| sum_t l_it``, each response alike whatever its length
      (DeepSeekMath eq. 3's GRPO objective);
    - ``seq_mean_token_sum_norm``: ``1/G sum_i 1/L sum_t l_it`` with the constant ``L = horizon`` (the
      generation's max_new_tokens): Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"), which
      removes eq. 3's length normalisation. (verl divides the batch's sum by the response width instead: the
      same direction, G times larger.)

    G counts the rows with at least one masked token: a row without any is in no mean.
    """
    return LOSS_AGGREGATIONS.function(aggregation)(per_token, mask, horizon)


@LOSS_AGGREGATIONS.implements("token_mean")
def _token_mean(per_token: Tensor, mask: Tensor, horizon: int | None) -> Tensor:
    return masked_mean(per_token, mask)


def _mean_over_responses(per_response: Tensor, mask: Tensor) -> Tensor:
    return masked_mean(per_response, _bool_mask(mask).any(dim=1))


@LOSS_AGGREGATIONS.implements("seq_mean_token_mean")
def _seq_mean_token_mean(per_token: Tensor, mask: Tensor, horizon: int | None) -> Tensor:
    return _mean_over_responses(masked_mean(per_token, mask, dim=1), mask)


@LOSS_AGGREGATIONS.implements("seq_mean_token_sum_norm")
def _seq_mean_token_sum_norm(per_token: Tensor, mask: Tensor, horizon: int | None) -> Tensor:
    if horizon is None or horizon < 1:
        raise ValueError(f"seq_mean_token_sum_norm needs the constant length it divides by; got {horizon!r}")
    return _mean_over_responses(masked_sum(per_token, mask, dim=1) / horizon, mask)


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_ratio: float | None,
    max_log_ratio: float = 20.0,
    dual_clip: float | None = None,
    aggregation: str = "token_mean",
    horizon: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate (paper eq. 15, app. C.1), negated for minimisation, optionally dual-clipped.

    logprobs: [B, T] log pi_theta(a_t|s_t) with gradient; old_logprobs: [B, T] of the sampling policy
    (or the reference when importance sampling is off); advantages: [B, T]; mask: [B, T].
    ratio = exp(clamp(logprobs - old_logprobs, -max_log_ratio, max_log_ratio)): without the clamp a
    log-ratio above ~88 overflows float32 ``exp`` to inf before the clip can act, and inf * 0 in the
    backward makes the whole gradient NaN (even from a padded position). The bound (e^20 ~ 5e8) is far
    outside any ratio the clip lets through, so the objective is exact wherever it was finite; a clamped
    token carries no gradient and is counted in ``ratio_clamped``.
    ``loss = mean_t max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - eps, 1 + eps))`` over masked tokens, the mean
    being ``aggregation``'s (:func:`aggregate_loss`; ``horizon`` its constant length).
    clip_ratio=None gives the unclipped surrogate ``mean_t -A_t * ratio_t``. old_logprobs and advantages
    are detached: no gradient flows into them.

    Dual clip (Ye et al. 2020, "Mastering Complex Control in MOBA Games with Deep Reinforcement Learning",
    dual-clip PPO), ``dual_clip`` = c > 1, needs a clip_ratio. For A_t < 0 the objective is
    ``max(min(r_t A_t, clip(r_t, 1 - eps, 1 + eps) A_t), c A_t)``: the clipped surrogate alone is
    unbounded below in r_t (a token the sampling policy found unlikely and the new one likely, with a
    negative advantage, could dominate the minibatch), the bound c A_t caps it, and it binds exactly where
    r_t > c (its gradient is then 0). For A_t >= 0 it is the ordinary clipped surrogate. Negated here:
    ``loss_t = min(max(-A_t r_t, -A_t clip(r_t)), -c A_t)`` where A_t < 0.

    Metrics: pg_loss; pg_clipfrac = fraction of tokens where the clipped branch is strictly larger (the
    token's gradient is zeroed by the clip); dual_clip_frac = fraction of tokens where the dual clip binds
    (A_t < 0 and the bound strictly smaller; disjoint from pg_clipfrac; 0 without dual_clip); approx_kl = KL(old || new) by the k3 estimator with samples
    from old: mean((ratio - 1) - log ratio) (>= 0, unbiased); ratio_mean, ratio_min, ratio_max (masked, of
    the clamped ratio); ratio_clamped = number of masked tokens whose log-ratio was clamped (a count, not a mean).
    """
    raw_log_ratio = logprobs - old_logprobs.detach()
    log_ratio = raw_log_ratio.clamp(-max_log_ratio, max_log_ratio)
    ratio = torch.exp(log_ratio)
    adv = advantages.detach()
    unclipped = -adv * ratio
    if clip_ratio is None:
        per_token = unclipped
        clipfrac = torch.zeros((), dtype=ratio.dtype, device=ratio.device)
    else:
        clipped = -adv * ratio.clamp(1.0 - clip_ratio, 1.0 + clip_ratio)
        per_token = torch.maximum(unclipped, clipped)
        clipfrac = masked_mean((clipped > unclipped).to(ratio.dtype), mask).detach()
    dual_frac = torch.zeros((), dtype=ratio.dtype, device=ratio.device)
    if dual_clip is not None:
        if clip_ratio is None or not dual_clip > 1:
            raise ValueError(f"dual_clip needs a clip_ratio and c > 1; got {dual_clip=}, {clip_ratio=}")
        negative = adv < 0
        bound = -dual_clip * adv
        binds = negative & (bound < per_token)
        per_token = torch.where(negative, torch.minimum(per_token, bound), per_token)
        dual_frac = masked_mean(binds.to(ratio.dtype), mask).detach()
    loss = aggregate_loss(per_token, mask, aggregation, horizon)
    with torch.no_grad():
        metrics = {
            "pg_loss": loss.detach(),
            "pg_clipfrac": clipfrac,
            "dual_clip_frac": dual_frac,
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
            "ratio_min": masked_min(ratio, mask),
            "ratio_max": masked_max(ratio, mask),
            "ratio_clamped": masked_sum((raw_log_ratio.abs() > max_log_ratio).to(ratio.dtype), mask),
        }
    return loss, metrics


def kl_loss(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    kl_coef: float,
    estimator: KLEstimator,
    clamp: float | None = None,
    aggregation: str = "token_mean",
    horizon: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """KL to the reference as a loss term instead of a reward penalty (``ppo.kl.acts_in: loss``).

    logprobs: [B, T] log pi_theta(y_t) with gradient, of tokens sampled from the rollout's policy;
    ref_logprobs: [B, T] of the reference (detached); mask: [B, T].
    ``loss = kl_coef * mean_t k(logprobs, ref_logprobs)`` with the per-token estimator k of
    :func:`ppomax.algos.kl_per_token` (Schulman 2020, "Approximating KL divergence"), the mean being the
    surrogate's (``aggregation``, :func:`aggregate_loss`: eq. 3 puts the KL inside GRPO's per-response mean). GRPO (Shao et al. 2024, "DeepSeekMath", eq. 3-4) subtracts ``beta * D_KL`` from its
    objective per token, with eq. 4's k3 ``ref/pi - log(ref/pi) - 1`` between the current policy and the
    reference on tokens from the old policy (no importance weight on this term).

    What each estimator's gradient is as a loss, per token (prefix held fixed), y ~ pi_theta, r = ref/pi:

    - k1 = log pi - log ref: gradient grad log pi, whose expectation E_pi[grad log pi] is 0. As a loss it
      only adds noise (on-policy), so ``ppo.kl.acts_in: loss`` refuses it (a config error naming both keys).
    - k2 = (log r)^2 / 2: gradient (log pi - log ref) grad log pi, whose expectation is grad KL(pi || ref),
      the gradient of the reverse KL that the reward penalty targets.
    - k3 = (r - 1) - log r (GRPO's): gradient (1 - r) grad log pi, whose expectation is
      -sum_y ref(y) grad log pi(y) = grad KL(ref || pi), the forward KL's. The two KLs agree to second order
      near the reference, so their gradients agree to first order there; far from it k3 pulls towards
      covering the reference's mass.

    Off the sampling policy (later epochs or minibatches) these hold approximately. A token the reference
    finds far likelier than the policy gives k3 an exponentially large value (no clamp, as in the reward, unless
    ``clamp``: see :func:`ppomax.algos.kl_per_token`); a non-finite loss skips the step like any other.

    Metrics: kl_loss (the term, kl_coef included), kl_mean (the token mean of the estimator).
    """
    per_token = kl_per_token(logprobs, ref_logprobs.detach(), estimator, clamp)
    loss = kl_coef * aggregate_loss(per_token, mask, aggregation, horizon)
    return loss, {"kl_loss": loss.detach(), "kl_mean": masked_mean(per_token.detach(), mask)}


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    value_clip: float | None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Critic loss (paper eq. 16), optionally clipped around the old values (app. B.1).

    values: [B, T] V_phi(s_t) with gradient; old_values: [B, T] values at rollout time; returns: [B, T]
    GAE targets; mask: [B, T]. Unclipped: ``0.5 * mean_t (V_t - R_t)^2``. With value_clip = c:
    ``V_clip = old_V + clip(V - old_V, -c, c)`` and ``0.5 * mean_t max((V - R)^2, (V_clip - R)^2)``
    (the pessimistic max, as in PPO2 / MOSS-RLHF). old_values and returns are detached.

    Metrics: vf_loss; vf_clipfrac = fraction of tokens where the clipped term is strictly larger;
    value_mean (masked mean of V).
    """
    old_values = old_values.detach()
    returns = returns.detach()
    unclipped = (values - returns).square()
    if value_clip is None:
        per_token = unclipped
        clipfrac = torch.zeros((), dtype=values.dtype, device=values.device)
    else:
        v_clipped = old_values + (values - old_values).clamp(-value_clip, value_clip)
        clipped = (v_clipped - returns).square()
        per_token = torch.maximum(unclipped, clipped)
        clipfrac = masked_mean((clipped > unclipped).to(values.dtype), mask).detach()
    loss = 0.5 * masked_mean(per_token, mask)
    metrics = {
        "vf_loss": loss.detach(),
        "vf_clipfrac": clipfrac,
        "value_mean": masked_mean(values.detach(), mask),
    }
    return loss, metrics


def entropy_bonus_loss(
    entropy: Tensor,
    mask: Tensor,
    coef: float,
    clip: float | None,
    aggregation: str = "token_mean",
    horizon: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Entropy bonus with a clip region (paper 5.3.2, app. B.3).

    entropy: [B, T] per-token entropy (with gradient); mask: [B, T].
    ``loss = -coef * mean_t clamp(entropy, max=clip)`` (the surrogate's mean, ``aggregation``). Minimising it raises entropy, but once a
    token's entropy exceeds `clip` the clamp stops its gradient, so the bonus cannot blow the entropy
    up (the failure mode of fig. 16). The clip is per token (not on the mean) so that high-entropy tokens
    cannot pay for collapsed ones. clip=None is the plain, unbounded bonus; coef=0 turns it off.

    Metrics: entropy (masked mean of the raw entropy), entropy_loss, entropy_clipfrac (fraction of tokens
    above the clip).
    """
    clipped = entropy if clip is None else entropy.clamp(max=clip)
    loss = -coef * aggregate_loss(clipped, mask, aggregation, horizon)
    with torch.no_grad():
        frac = (
            torch.zeros((), dtype=entropy.dtype, device=entropy.device)
            if clip is None
            else masked_mean((entropy > clip).to(entropy.dtype), mask)
        )
        metrics = {
            "entropy": masked_mean(entropy.detach(), mask),
            "entropy_loss": loss.detach(),
            "entropy_clipfrac": frac,
        }
    return loss, metrics


def lm_nll(
    logits: Tensor, labels: Tensor, mask: Tensor, reduction: Literal["mean", "sum"] = "mean"
) -> Tensor:
    """Masked token negative log-likelihood: -mean_t log p(y_t) (scalar), or -sum_t with ``reduction="sum"``
    (for a mean over several batches: add the sums, divide by the total count of masked tokens).

    logits: [B, T, V] aligned with labels: [B, T]; mask: [B, T]. Used for the SFT loss and its validation
    loss, the reward model's LM term (eq. 2, beta_rm) and the PPO-ptx pretraining loss (eq. 17, which the
    paper writes as a log-likelihood to maximise; this is its negation, to minimise).
    """
    logprobs = logprobs_from_logits(logits, labels)
    if reduction == "sum":
        return -masked_sum(logprobs, mask)
    return -masked_mean(logprobs, mask)


def pairwise_rm_loss(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    chosen_lm_nll: Tensor | None = None,
    beta_rm: float = 1.0,
    lam: float = 1.0,
    pair_weight: Tensor | float = 1.0,
    lm_weight: Tensor | float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Reward-model loss (paper eq. 1-2): -lam * mean log sigmoid(r_w - r_l) + beta_rm * NLL(y_w | x).

    Under gradient accumulation the two means are over different units, so each has its own weight:
    ``pair_weight * lam * ranking + lm_weight * beta_rm * NLL`` (the micro-batch's share of the step's pairs
    and of its chosen-response tokens, :func:`ppomax.algos.token_weights`; 1 for a batch on its own).
    The metrics are the batch's own, unweighted.

    chosen_rewards, rejected_rewards: [B] scalar rewards of the preferred / dispreferred answers;
    chosen_lm_nll: scalar masked-mean NLL of the chosen response tokens (see `lm_nll`), or None.
    beta_rm = 0 or chosen_lm_nll = None drops the LM term. (Eq. 2 prints "+ beta_rm E[log r'(x, y_w)]";
    the imitation term of [27] is the negative log-likelihood, which is what is minimised here.)
    log sigmoid is computed stably (F.logsigmoid), so large margins neither overflow nor give NaN.

    Metrics: rm_loss (the unweighted pairwise term), lm_loss (the NLL whenever given, even with
    beta_rm = 0, so it can be monitored; 0 when absent), accuracy (fraction with
    r_w > r_l strictly; ties count as wrong), margin_mean (mean r_w - r_l).
    """
    margin = chosen_rewards - rejected_rewards
    rm = -F.logsigmoid(margin).mean()
    loss = pair_weight * lam * rm
    if chosen_lm_nll is not None and beta_rm != 0:
        loss = loss + lm_weight * beta_rm * chosen_lm_nll
    with torch.no_grad():
        metrics = {
            "rm_loss": rm.detach(),
            "lm_loss": (
                chosen_lm_nll.detach() if chosen_lm_nll is not None else torch.zeros((), device=rm.device)
            ),
            "accuracy": (margin > 0).to(rm.dtype).mean(),
            "margin_mean": margin.detach().mean(),
        }
    return loss, metrics
