"""`ppomax train-ppo`: PPO against a reward model and/or programmatic rewards (PPO-max by default).

    ppomax train-ppo --preset ppo_max --set model.policy=SFT --set model.reward=RM --set data.prompts=P.jsonl
    ppomax train-ppo --config run.yaml [--set ppo.kl.coef=0.1]
    ppomax train-ppo --resume runs/ppo            # continue from the newest checkpoint, with the run's config

Exit status: 0 when done, 2 on a user error (bad config/data/model path, diverged run), 3 when the collapse
monitor stopped the run (collapse.action: stop), 75 when stopped by SIGINT/SIGTERM after saving a checkpoint
(the same for every training command, :data:`ppomax.errors.STOPPED_EXIT_CODE`).
"""

from __future__ import annotations

import argparse

from ppomax.commands.common import (
    add_config_args,
    add_run_args,
    print_result,
    run_config,
    run_epilog,
    run_options,
)
from ppomax.config import PPOConfig

COLLAPSE_EXIT_CODE = 3


def _run(args: argparse.Namespace) -> int:
    from ppomax.ppo import PPOTrainer

    cfg = run_config("ppo", args)
    assert isinstance(cfg, PPOConfig)
    trainer = PPOTrainer(cfg, **run_options(args))  # the Python API's trainer, from the config alone
    result = trainer.train()
    if result.collapse_stopped:
        last = trainer.run.last_checkpoint
        trainer.run.warn(
            f"stopped at step {trainer.step} by the collapse monitor (collapse.action=stop); the last "
            f"checkpoint before it is {last or 'none (set logging.checkpoint_every)'}"
        )
        return COLLAPSE_EXIT_CODE
    print_result(str(result.model_dir))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train-ppo",
        help="PPO (PPO-max by default) against a reward model or reward functions",
        description="PPO on a policy against a reward model and/or reward functions; prints the final policy "
        "directory. Exit status 3: stopped by the collapse monitor (collapse.action: stop).",
        epilog=run_epilog("ppo"),
    )
    add_config_args(p, presets=True)
    add_run_args(p)
    p.set_defaults(func=_run)
