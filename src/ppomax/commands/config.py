"""`ppomax config`: print a preset or config fully resolved."""

from __future__ import annotations

import argparse
import sys

from ppomax.commands.common import add_config_args
from ppomax.config import load_config, to_yaml


def _run(args: argparse.Namespace) -> int:
    config = load_config(args.kind, path=args.config, preset=args.preset, overrides=args.overrides)
    sys.stdout.write(to_yaml(config))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="print a preset or config fully resolved")
    p.add_argument("--kind", choices=("ppo", "sft", "rm"), default="ppo", help="which command's config")
    add_config_args(p, presets=True)
    p.set_defaults(func=_run)
