"""`ppomax train-ppo`: PPO against a reward model and/or programmatic rewards (PPO-max by default).

    ppomax train-ppo --preset ppo_max --set model.policy=SFT --set model.reward=RM --set data.prompts=P.jsonl
    ppomax train-ppo --config run.yaml [--set ppo.kl_coef=0.1]
    ppomax train-ppo --resume runs/ppo            # continue from the newest checkpoint, with the run's config

Exit status: 0 when done, 2 on a user error (bad config/data/model path, diverged run), 130/143 when stopped by
SIGINT/SIGTERM after saving a checkpoint.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from ppomax.commands.common import add_config_args
from ppomax.config import PPOConfig, load_config


def _config(args: argparse.Namespace) -> PPOConfig:
    path = args.config
    if args.resume and not args.config and not args.preset:
        # The resolved config the run saved: in the checkpoint itself, else in the run directory.
        from ppomax.trainers.ppo_state import resolve_resume

        ckpt = resolve_resume(args.resume)
        for candidate in (ckpt / "config.yaml", ckpt.parent.parent / "config.yaml"):
            if candidate.is_file():
                path = str(candidate)
                break
    cfg = load_config("ppo", path=path, preset=args.preset, overrides=args.overrides)
    assert isinstance(cfg, PPOConfig)
    return cfg


def _run(args: argparse.Namespace) -> int:
    from ppomax.trainers.ppo import PPOTrainer

    cfg = _config(args)
    trainer = PPOTrainer(cfg, resume=args.resume)
    out = trainer.train()
    if trainer.collapse_stopped:
        print(
            f"ppomax: stopped at step {trainer.step} by the collapse monitor (collapse.action=stop); the last "
            f"checkpoint before it is {trainer.last_checkpoint or 'none (set logging.checkpoint_every)'}",
            file=sys.stderr,
        )
        return 3
    if trainer.stopped_by is not None:
        name = signal.Signals(trainer.stopped_by).name
        print(
            f"ppomax: {name} received: checkpoint saved at step {trainer.step} in {trainer.last_checkpoint}; "
            f"continue with: ppomax train-ppo --resume {out}",
            file=sys.stderr,
        )
        return 128 + int(trainer.stopped_by)
    if trainer.acc.is_main_process:
        print(
            f"ppomax: done: policy in {Path(out) / 'final' / 'policy'}, metrics in {Path(out) / 'metrics.jsonl'}"
        )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train-ppo", help="PPO (PPO-max by default) against a reward model or reward functions"
    )
    add_config_args(p, presets=True)
    p.add_argument("--resume", metavar="DIR", help="run directory or checkpoint to continue from")
    p.set_defaults(func=_run)
