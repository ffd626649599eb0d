"""Reward shaping, from a response's raw score to the token-level rewards GAE and the other advantage estimators
(:mod:`ppomax.algos.estimators`) take: which scores can be trained on, the score re-parameterisations of paper
5.3.1 (eq. 18), the KL estimators and the adaptive KL coefficient, the token-level rewards of eq. 19."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from .registry import KL_ESTIMATORS
from .stats import _bool_mask, last_token_index

KLEstimator = str  # a name of KL_ESTIMATORS


# verl's low_var_kl bounds the log-ratio before its exp: k3 and its gradient stay finite in float32 (exp
# overflows past 88.7) wherever a clamp is asked for.
CLAMP_LOG_RATIO = 20.0


def kl_per_token(
    logprobs: Tensor, ref_logprobs: Tensor, estimator: KLEstimator = "k1", clamp: float | None = None
) -> Tensor:
    """Per-token estimate of KL(pi || ref) from tokens sampled from pi (paper eq. 3 / 19).

    logprobs, ref_logprobs: [B, T] log pi(y_t) and log ref(y_t) of the sampled tokens -> [B, T].
    Schulman's estimators ("Approximating KL divergence", 2020) with r = ref(y) / pi(y), y ~ pi, i.e.
    log r = ref_logprobs - logprobs, each registered in :data:`ppomax.algos.registry.KL_ESTIMATORS`:

    - k1 = -log r = logprobs - ref_logprobs      (unbiased, high variance, can be negative per token)
    - k2 = (log r)^2 / 2                          (biased, low variance, >= 0; exact to second order)
    - k3 = (r - 1) - log r                        (unbiased, low variance, >= 0)

    E_pi[k1] = E_pi[k3] = KL(pi || ref). ``clamp=None`` (ours, as paper eq. 19): no clamping; with k3 a token
    where ref is far more likely than pi gives a large (exp) value, the honest estimate: 142 at log r = 5, and
    inf in float32 past log r = 88.7. ``clamp=c`` bounds the estimate to [-c, c] after bounding log r to
    +-:data:`CLAMP_LOG_RATIO`, as verl's ``low_var_kl`` (c = 10 there): biased, finite, and a clamped token
    carries no gradient.
    """
    log_r = ref_logprobs - logprobs
    if clamp is None:
        return KL_ESTIMATORS.function(estimator)(log_r)
    est = KL_ESTIMATORS.function(estimator)(log_r.clamp(-CLAMP_LOG_RATIO, CLAMP_LOG_RATIO))
    return est.clamp(-clamp, clamp)


@KL_ESTIMATORS.implements("k1")
def _k1(log_r: Tensor) -> Tensor:
    return -log_r


@KL_ESTIMATORS.implements("k2")
def _k2(log_r: Tensor) -> Tensor:
    return 0.5 * log_r.square()


@KL_ESTIMATORS.implements("k3")
def _k3(log_r: Tensor) -> Tensor:
    return torch.expm1(log_r) - log_r


def token_level_rewards(scores: Tensor, kl: Tensor, response_mask: Tensor, kl_coef: float) -> Tensor:
    """Token-level reward with KL penalty (paper eq. 3 / 19).

    scores: [B] sequence score (already re-parameterised: scaled or normalised/clipped);
    kl: [B, T] per-token KL estimate; response_mask: [B, T] -> rewards [B, T] with
    ``r_t = -kl_coef * kl_t`` on every response token and the score added at the last response token of
    each row (wherever padding sits). Padding gets 0; a row with an empty response gets all zeros.
    """
    m = _bool_mask(response_mask)
    zero = torch.zeros((), dtype=kl.dtype, device=kl.device)
    rewards = torch.where(m, -kl_coef * kl, zero)
    last = last_token_index(m)
    bonus = torch.where(m.any(dim=1), scores.to(rewards.dtype), zero)
    return rewards.scatter_add(1, last.unsqueeze(1), bonus.unsqueeze(1))


class AdaptiveKLController:
    """The adaptive KL coefficient of Ziegler et al. 2019 ("Fine-Tuning Language Models from Human
    Preferences", sec. 2.2), as in their code (lm-human-preferences, ``train_policy.AdaptiveKLController``).

    A proportional controller in log space that moves beta towards the value at which the policy's KL to
    the reference is ``target``::

        e_t = clip(KL_t / target - 1, -0.2, 0.2)
        beta_{t+1} = beta_t * (1 + K_beta * e_t),   K_beta = n_steps / horizon

    with ``n_steps`` the responses (episodes) of the iteration and ``horizon`` in responses, so that the
    speed of the controller does not depend on the batch size. KL_t is what the iteration's rollout spent:
    the mean over responses of the summed per-token KL estimate (Ziegler: ``mean(sum_t (log pi - log
    ref))``); beta_t is the value its rewards (or loss) used, and :meth:`update` gives beta_{t+1} after the
    iteration. The error clip bounds each step to a factor in [1 - 0.2 K_beta, 1 + 0.2 K_beta]; K_beta must
    be below 5 so that beta stays positive. A NaN KL (nothing measured) leaves beta unchanged.
    """

    def __init__(self, init: float, target: float, horizon: int) -> None:
        if not (init > 0 and target > 0 and horizon > 0):
            raise ValueError(f"need init, target, horizon > 0; got {init=}, {target=}, {horizon=}")
        self.value, self.target, self.horizon = float(init), float(target), int(horizon)

    def update(self, current: float, n_steps: int) -> float:
        """beta after an iteration of ``n_steps`` responses whose KL was ``current``; returns it."""
        gain = n_steps / self.horizon
        if not 0 <= gain < 5:
            raise ValueError(f"n_steps / horizon = {n_steps}/{self.horizon} must be in [0, 5)")
        if current == current:  # not NaN
            error = min(max(current / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + gain * error
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


def trainable_rows(scores: Tensor, replaced: Tensor | None = None) -> Tensor:
    """Rows whose raw score r(x, y) can enter eq. 18 and eq. 19: scores [B] -> [B] bool.

    NaN, +inf and -inf are no reward: a clip would turn +inf into the best possible score, and one of them in
    the running moments or in a whitened minibatch would poison every other row. Such a row is left out of
    training (the caller zeroes its response mask). ``replaced`` [B] bool marks rows whose score is replaced
    anyway (``truncated_penalty``): those stay, whatever their raw score.
    """
    ok = torch.isfinite(scores)
    return ok if replaced is None else ok | replaced


ScoreTransform = Literal["none", "scale", "normalize"]


def reparameterize_scores(
    scores: Tensor,
    mean: float | Tensor,
    std: float | Tensor,
    transform: ScoreTransform,
    clip: float | None,
    eps: float = 1e-8,
) -> Tensor:
    """Score re-parameterisation of the RM score (paper 5.3.1): the one place it is computed.

    scores: [B] -> [B]; mean/std: running statistics of the raw scores seen so far, this batch included
    (`RunningMoments.mean/.std`, updated by the caller first).

    - ``"none"``: the raw score.
    - ``"scale"`` (reward scaling): ``r / sigma``. The paper's "std of a rolling discounted sum" is the std of
      the scores here: one reward per episode, gamma = 1 at the sequence level.
    - ``"normalize"`` (reward normalisation, eq. 18): ``(r - mean) / sigma``.

    ``clip`` then bounds the result to [-clip, clip] (eq. 18's delta; None = no clip). It acts on the
    re-parameterised score, so it is in running-std units; a clip on the raw score (RM units) is refused,
    since the same number would then mean something else.
    """
    if transform == "none":
        if clip is not None:
            raise ValueError("clip is in running-std units: it needs transform 'scale' or 'normalize'")
        return scores
    if transform == "scale":
        out = scores / (std + eps)
    elif transform == "normalize":
        out = (scores - mean) / (std + eps)
    else:
        raise ValueError(f"unknown transform {transform!r}; expected 'none', 'scale' or 'normalize'")
    return out if clip is None else out.clamp(-clip, clip)
