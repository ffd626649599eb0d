"""`ppomax train-rm`: reward-model training (paper eq. 2)."""

from __future__ import annotations

import argparse

from ppomax.commands.common import add_config_args, print_result
from ppomax.config import load_config


def _run(args: argparse.Namespace) -> int:
    from ppomax.trainers.reward import train_rm  # heavy imports only when the command runs

    cfg = load_config("rm", path=args.config, overrides=args.overrides)
    final = train_rm(cfg, resume=args.resume)
    print_result(str(final))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train-rm",
        help="train a reward model on preference pairs",
        description="Train a value-head reward model with the pairwise loss plus beta_rm * LM loss on the "
        "chosen response (paper eq. 2). Writes best/ and final/, metrics and a margin histogram; prints the "
        "final model directory.",
    )
    add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in out_dir")
    p.set_defaults(func=_run)
