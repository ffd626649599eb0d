"""`ppomax train-sft`: supervised fine-tuning (or pretraining with objective: pretrain)."""

from __future__ import annotations

import argparse

from ppomax.commands.common import add_config_args, print_result
from ppomax.config import load_config


def _run(args: argparse.Namespace) -> int:
    from ppomax.trainers.sft import train_sft  # heavy imports only when the command runs

    cfg = load_config("sft", path=args.config, overrides=args.overrides)
    final = train_sft(cfg, resume=args.resume)
    print_result(str(final))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train-sft",
        help="supervised fine-tuning on responses only (or pretraining on plain text)",
        description="Fine-tune a causal LM on SFT examples (loss on response / assistant tokens only), or "
        "pretrain on {'text'} records with --set objective=pretrain. Prints the final model directory.",
    )
    add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in out_dir")
    p.set_defaults(func=_run)
