"""PPO (PPO-max by default): the trainer and the steps of its iteration, one module each, in the loop's order.

One iteration (:meth:`ppomax.ppo.trainer.PPOTrainer.iteration`)::

    data.py         the prompts it draws, from resumable streams (and PPO-ptx's examples)
    rollout.py      1. generation: responses sampled from the policy (KV cache), packed into an Experience
    scoring.py      2. the scoring pass: old log-probs, entropy, values, reference log-probs, raw scores
    advantages.py   3. score re-parameterisation, token-level rewards with the KL penalty, GAE or another estimator
    update.py       4. ppo_epochs x minibatches: losses, clip, one optimiser step per model
    fused.py        2-4 as one pass where the update's first forward is an exact scoring pass
    metrics.py      5. the iteration's metrics (paper 5.2), timings, throughput, reduced over ranks
    assembly.py     builds the run's parts once: models as the engine prepared them, data, rollouts, updater
    trainer.py      runs the iterations over them, logs, evaluates, checkpoints

and beside them: ``experience.py`` (the buffer), ``reward_sources.py`` (where raw scores come from: the reward
model and reward functions), ``models.py`` (policy, reference, critic, reward model, and their forwards),
``evaluation.py`` (held-out evaluation during training), ``collapse.py`` (the pattern-collapse monitor),
``schedule.py`` (the start-up notes on the run's schedule). The math is in :mod:`ppomax.algos`; the run engine
(directory, checkpoints, resume, signals) is :mod:`ppomax.trainers.run`.

Exports :class:`PPOTrainer` (``ppomax.PPOTrainer``) and :func:`train_ppo`, imported on first use: the step modules
(``ppomax.ppo.rollout``, used by ``ppomax eval``) load without the trainer.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__all__ = ["PPOTrainer", "train_ppo"]

if TYPE_CHECKING:
    from .trainer import PPOTrainer, train_ppo


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'ppomax.ppo' has no attribute {name!r}")
    return getattr(import_module("ppomax.ppo.trainer"), name)
