"""`ppomax train-sft`: supervised fine-tuning (or pretraining with objective: pretrain)."""

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
from ppomax.config import SFTConfig


def _run(args: argparse.Namespace) -> int:
    from ppomax.trainers.sft import SFTTrainer  # heavy imports only when the command runs

    cfg = run_config("sft", args)
    assert isinstance(cfg, SFTConfig)
    result = SFTTrainer(cfg, **run_options(args)).train()  # the Python API's trainer, from the config alone
    print_result(str(result.model_dir))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train-sft",
        help="supervised fine-tuning on responses only (or pretraining on plain text)",
        description="Fine-tune a causal LM on SFT examples (loss on response / assistant tokens only), or "
        "pretrain on {'text'} records with --set objective=pretrain. Prints the final model directory.",
        epilog=run_epilog("sft"),
    )
    add_config_args(p)
    add_run_args(p)
    p.set_defaults(func=_run)
