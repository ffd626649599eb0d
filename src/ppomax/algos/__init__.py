"""Pure PPO-max math: masked statistics, running moments, KL estimators, GAE and the losses.

Every function here is a function of tensors (plus two small stateful classes, `RunningMoments` and
`AdaptiveKLController`) and the package imports only torch, so each formula has a unit test against an
independent computation (tests/test_algos.py, tests/test_algos_estimators.py). Equation numbers refer to
"Secrets of RLHF in Large Language Models Part I: PPO" (arXiv 2307.04964). Modules: `stats` (masked
statistics, running moments, last-token index), `rewards` (KL estimators, token-level rewards, the adaptive KL
coefficient, GAE, score re-parameterisation, advantage normalisation), `estimators` (the critic-free advantage
estimators GRPO, RLOO and REINFORCE++), `losses` (PPO with its dual clip, KL as a loss term, critic, entropy,
LM, RM losses; per-token log-probs, entropy and exact KL from logits), `metrics` (the monitoring statistics of
a batch of rollouts, paper 5.2).
Import from `ppomax.algos` directly; the split is for reading, not for the API.

Conventions:
- Shapes: B = batch, T = time (response tokens, or the full sequence with a mask), V = vocabulary.
- Masks are float or bool tensors of shape [B, T]; 1 / True = a real response token. Padding may sit
  left, right, or both (even holes); no function assumes a contiguous response.
- Losses return `(loss, metrics)`; metrics are detached scalar tensors (no `.item()`, hence no device
  sync here; the trainer converts them when it logs).
- `all_reduce` hooks sum a tensor across data-parallel ranks and return the result (identity on one
  process). They receive a fresh detached tensor, so an in-place collective such as
  `lambda t: (dist.all_reduce(t), t)[1]` is safe. Gradients never flow through a hook: where a global
  statistic is used in a differentiable mean, only the local rank's terms carry gradient.
"""

from .estimators import (
    discounted_returns,
    grpo_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
    sequence_rewards,
)
from .losses import (
    entropy_bonus_loss,
    entropy_from_logits,
    kl_from_logits,
    kl_loss,
    lm_nll,
    logprobs_from_logits,
    pairwise_rm_loss,
    policy_loss,
    value_loss,
)
from .metrics import RESPONSE_SUMS, response_statistics, response_sums, rollout_statistics
from .rewards import (
    AdaptiveKLController,
    KLEstimator,
    ScoreTransform,
    gae,
    kl_per_token,
    normalize_advantages,
    reparameterize_scores,
    token_level_rewards,
    trainable_rows,
)
from .stats import (
    AllReduce,
    RunningMoments,
    last_token_index,
    masked_mean,
    masked_sum,
    masked_whiten,
    score_token_index,
    token_weights,
)

__all__ = [
    "RESPONSE_SUMS",
    "AdaptiveKLController",
    "AllReduce",
    "KLEstimator",
    "RunningMoments",
    "ScoreTransform",
    "discounted_returns",
    "entropy_bonus_loss",
    "entropy_from_logits",
    "gae",
    "grpo_advantages",
    "kl_from_logits",
    "kl_loss",
    "kl_per_token",
    "last_token_index",
    "lm_nll",
    "logprobs_from_logits",
    "masked_mean",
    "masked_sum",
    "masked_whiten",
    "normalize_advantages",
    "pairwise_rm_loss",
    "policy_loss",
    "reinforce_pp_advantages",
    "reparameterize_scores",
    "response_statistics",
    "response_sums",
    "rloo_advantages",
    "rollout_statistics",
    "score_token_index",
    "sequence_rewards",
    "token_level_rewards",
    "token_weights",
    "trainable_rows",
    "value_loss",
]
