"""`ppomax train-rm`: reward-model training (paper eq. 2)."""

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
from ppomax.config import RMConfig


def _run(args: argparse.Namespace) -> int:
    from ppomax.trainers.reward_model import RewardTrainer  # heavy imports only when the command runs

    cfg = run_config("rm", args)
    assert isinstance(cfg, RMConfig)
    # the Python API's trainer, from the config alone
    result = RewardTrainer(cfg, **run_options(args)).train()
    print_result(str(result.model_dir))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train-rm",
        help="train a reward model on preference pairs",
        description="Train a value-head reward model with the pairwise loss plus beta_rm * LM loss on the "
        "chosen response (paper eq. 2). Writes best/ and final/, metrics and a margin histogram; prints the "
        "final model directory.",
        epilog=run_epilog("rm"),
    )
    add_config_args(p)
    add_run_args(p)
    p.set_defaults(func=_run)
