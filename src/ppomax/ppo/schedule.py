"""The start-up notes of a PPO run (:func:`schedule_notes`): its schedule in one line, and the warnings of a run
too short for it, printed before the first iteration."""

from __future__ import annotations

from ppomax.config import PPOConfig
from ppomax.optim import warmup_steps


def schedule_notes(cfg: PPOConfig) -> tuple[str, list[str]]:
    """The run's schedule in one start-up line, and warnings for a run too short for it: a policy that trains mostly
    or only at a warming-up learning rate, a collapse monitor that cannot fire before the run ends."""
    p, window = cfg.ppo, cfg.collapse.window
    updates = p.ppo_epochs * (p.buffer_size // p.minibatch_size)
    steps = p.iterations * updates
    warmup = warmup_steps(cfg.optim, steps)
    line = (
        f"schedule: {p.critic_pretrain_steps} critic-only iterations (ppo.critic_pretrain_steps), then "
        f"{p.iterations} policy iterations (ppo.iterations) of {updates} optimiser steps each: {steps} policy "
        f"steps, the first {min(warmup, steps)} warming up (optim.warmup_steps / warmup_ratio)"
    )
    warnings = []
    if warmup >= steps:
        warnings.append(
            f"the policy's learning rate warms up over {warmup} optimiser steps but the run makes {steps}: it never "
            "trains at optim.policy_lr; raise ppo.iterations or lower optim.warmup_steps"
        )
    elif 2 * warmup > steps:
        warnings.append(
            f"{warmup} of the policy's {steps} optimiser steps are warm-up (optim.warmup_steps): most of the run "
            "trains below optim.policy_lr; raise ppo.iterations or lower optim.warmup_steps"
        )
    if cfg.collapse.action != "off":
        line += f"; the collapse monitor can fire from policy iteration {2 * window} (2 x collapse.window)"
        if p.iterations < 2 * window:
            warnings.append(
                f"the collapse monitor needs {2 * window} policy iterations (2 x collapse.window) before it can "
                f"fire and this run has {p.iterations}: it is not armed in this run"
            )
    return line, warnings
