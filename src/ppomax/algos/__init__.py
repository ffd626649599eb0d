"""Pure PPO-max math: masked statistics, running moments, KL estimators, GAE and the losses.

Every function here is a function of tensors (plus two small stateful classes, `RunningMoments` and
`AdaptiveKLController`) and the package imports only torch, so each formula has a unit test against an
independent computation (tests/test_algos.py, tests/test_algos_estimators.py). Equation numbers refer to
"Secrets of RLHF in Large Language Models Part I: PPO" (arXiv 2307.04964). Modules: `stats` (masked statistics,
running moments, last-token index), `reward_shaping` (from raw scores to token-level rewards: score
re-parameterisation, KL estimators, the adaptive KL coefficient, token-level rewards), `estimators` (the advantage
estimators: GAE and the critic-free GRPO, RLOO and REINFORCE++; advantage normalisation), `losses` (PPO with its
dual clip, KL as a loss term, critic, entropy, LM, RM losses), `vocab` (per-token log-probs, entropy and exact KL
from logits, in bounded memory), `metrics` (the monitoring statistics of a batch of rollouts, paper 5.2).
`registry` holds the tables of the interchangeable parts (advantage estimators, policy-loss aggregations, KL
estimators) that the config validates against and the trainer looks up.
Import from `ppomax.algos` directly; the split is for reading, not for the API. The package loads its modules
(and torch) on first use of a name, so that `ppomax.algos.registry`, which the config reads, needs no torch.

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

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .estimators import (
        AdvantageInputs,
        advantages_of,
        discounted_returns,
        gae,
        grpo_advantages,
        normalize_advantages,
        reinforce_pp_advantages,
        reinforce_pp_baseline_advantages,
        rloo_advantages,
        sequence_rewards,
    )
    from .losses import (
        aggregate_loss,
        entropy_bonus_loss,
        kl_loss,
        lm_nll,
        pairwise_rm_loss,
        policy_loss,
        value_loss,
    )
    from .metrics import RESPONSE_SUMS, response_statistics, response_sums, rollout_statistics
    from .reward_shaping import (
        AdaptiveKLController,
        KLEstimator,
        ScoreTransform,
        kl_per_token,
        reparameterize_scores,
        token_level_rewards,
        trainable_rows,
    )
    from .stats import (
        AllReduce,
        RunningMoments,
        last_token_index,
        masked_max,
        masked_mean,
        masked_min,
        masked_sum,
        masked_whiten,
        score_token_index,
        token_weights,
    )
    from .vocab import entropy_from_logits, kl_from_logits, logprobs_from_logits, scoring_reductions

# name -> the module defining it
_MODULES = {
    "aggregate_loss": "losses",
    "AdvantageInputs": "estimators",
    "advantages_of": "estimators",
    "AdaptiveKLController": "reward_shaping",
    "AllReduce": "stats",
    "KLEstimator": "reward_shaping",
    "RESPONSE_SUMS": "metrics",
    "RunningMoments": "stats",
    "ScoreTransform": "reward_shaping",
    "discounted_returns": "estimators",
    "entropy_bonus_loss": "losses",
    "entropy_from_logits": "vocab",
    "gae": "estimators",
    "grpo_advantages": "estimators",
    "kl_from_logits": "vocab",
    "kl_loss": "losses",
    "kl_per_token": "reward_shaping",
    "last_token_index": "stats",
    "lm_nll": "losses",
    "logprobs_from_logits": "vocab",
    "scoring_reductions": "vocab",
    "masked_max": "stats",
    "masked_min": "stats",
    "masked_mean": "stats",
    "masked_sum": "stats",
    "masked_whiten": "stats",
    "normalize_advantages": "estimators",
    "pairwise_rm_loss": "losses",
    "policy_loss": "losses",
    "reinforce_pp_advantages": "estimators",
    "reinforce_pp_baseline_advantages": "estimators",
    "reparameterize_scores": "reward_shaping",
    "response_statistics": "metrics",
    "response_sums": "metrics",
    "rloo_advantages": "estimators",
    "rollout_statistics": "metrics",
    "score_token_index": "stats",
    "sequence_rewards": "estimators",
    "token_level_rewards": "reward_shaping",
    "token_weights": "stats",
    "trainable_rows": "reward_shaping",
    "value_loss": "losses",
}

__all__ = [
    "RESPONSE_SUMS",
    "AdaptiveKLController",
    "AdvantageInputs",
    "AllReduce",
    "KLEstimator",
    "RunningMoments",
    "ScoreTransform",
    "advantages_of",
    "aggregate_loss",
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
    "masked_max",
    "masked_mean",
    "masked_min",
    "masked_sum",
    "masked_whiten",
    "normalize_advantages",
    "pairwise_rm_loss",
    "policy_loss",
    "reinforce_pp_advantages",
    "reinforce_pp_baseline_advantages",
    "reparameterize_scores",
    "response_statistics",
    "response_sums",
    "rloo_advantages",
    "rollout_statistics",
    "score_token_index",
    "scoring_reductions",
    "sequence_rewards",
    "token_level_rewards",
    "token_weights",
    "trainable_rows",
    "value_loss",
]


def __getattr__(name: str) -> Any:
    """Load the module defining ``name`` on first use (PEP 562)."""
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_MODULES[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_MODULES))
