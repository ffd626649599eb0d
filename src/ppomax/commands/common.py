"""Arguments shared by the subcommands."""

from __future__ import annotations

import argparse

from ppomax.config import PRESET_NAMES


def add_config_args(p: argparse.ArgumentParser, presets: bool = False) -> None:
    """``--config FILE``, optionally ``--preset NAME``, and repeatable ``--set KEY=VALUE``."""
    p.add_argument("--config", help="YAML config file")
    if presets:
        p.add_argument("--preset", choices=PRESET_NAMES, help="start from a shipped preset")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one key, e.g. --set ppo.kl_coef=0.1 (repeatable)",
    )


def print_result(text: str) -> None:
    """A command's result line (e.g. the final model directory, for scripts): once per run, not once per rank
    under ``accelerate launch``."""
    from accelerate import PartialState  # the trainer has set it up; a single process is the main one

    if PartialState().is_main_process:
        print(text)
