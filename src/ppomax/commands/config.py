"""`ppomax config`: print a preset or config fully resolved, or every key with its documentation (``--explain``)."""

from __future__ import annotations

import argparse
import sys

from ppomax.commands.common import add_config_args
from ppomax.config import CONFIG_CLASSES, load_config, to_yaml
from ppomax.config_keys import explain

COMMANDS = {"sft": "train-sft", "rm": "train-rm", "ppo": "train-ppo"}


def _run(args: argparse.Namespace) -> int:
    if args.explain:
        sys.stdout.write(explain(CONFIG_CLASSES[args.kind], COMMANDS[args.kind]))
        return 0
    config = load_config(args.kind, path=args.config, preset=args.preset, overrides=args.overrides)
    sys.stdout.write(to_yaml(config))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="print a preset or config fully resolved, or every key explained")
    p.add_argument("--kind", choices=("ppo", "sft", "rm"), default="ppo", help="which command's config")
    p.add_argument(
        "--explain",
        action="store_true",
        help="list every key of the command's config with its default, allowed values and description",
    )
    add_config_args(p, presets=True)
    p.set_defaults(func=_run)
