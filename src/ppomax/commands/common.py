"""Arguments shared by the subcommands."""

from __future__ import annotations

import argparse
import math
from typing import TypedDict

from ppomax.config import PRESET_NAMES, CommandConfig, RunKind
from ppomax.errors import STOPPED_EXIT_CODE


def finite_float(text: str) -> float:
    """argparse type: a finite number (``inf``/``nan`` parse as floats but are never a usable setting)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, not {text!r}")
    return value


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
        help="override one key, e.g. --set ppo.kl.coef=0.1 (repeatable)",
    )


def print_result(text: str) -> None:
    """A command's result line (e.g. the final model directory, for scripts): once per run, not once per rank
    under ``accelerate launch``."""
    from accelerate import PartialState  # the trainer has set it up; a single process is the main one

    if PartialState().is_main_process:
        print(text)


def run_epilog(kind: str) -> str:
    """The help epilog of a training command: where its config keys are listed, and the run rules."""
    return (
        f"Config keys: `ppomax config --explain --kind {kind}` lists every key with its default, allowed values and "
        "description; set them in --config FILE (YAML) or with --set KEY=VALUE. "
        "A new run into a directory that holds one (a checkpoint or final/) is refused unless --overwrite, and so "
        "is any run into a directory another run is writing. --resume DIR continues the run in DIR from its newest "
        "checkpoint, with DIR's config.yaml (or --config, which may differ only in the run length) and the data it "
        "was trained on (--allow-data-change: continue on changed data files), and writes into DIR. SIGINT/SIGTERM "
        f"save a checkpoint and exit with status {STOPPED_EXIT_CODE}; 0 = done, 2 = a user error (one line on "
        "stderr)."
    )


def add_run_args(p: argparse.ArgumentParser) -> None:
    """``--resume DIR`` and ``--overwrite``, the same for every training command (:mod:`ppomax.trainers.run`)."""
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--resume",
        metavar="DIR",
        help="continue the run in DIR (its config.yaml unless --config; only the run length may change)",
    )
    group.add_argument(
        "--overwrite", action="store_true", help="replace the run already in logging.out_dir, if any"
    )
    p.add_argument(
        "--allow-data-change",
        action="store_true",
        help="with --resume: continue even though a data file changed since the checkpoint (named in a warning)",
    )


class RunOptions(TypedDict):
    resume: bool
    overwrite: bool
    allow_data_change: bool


def run_options(args: argparse.Namespace) -> RunOptions:
    """The trainers' run keywords (``resume``, ``overwrite``, ``allow_data_change``) from :func:`add_run_args`."""
    return {
        "resume": bool(args.resume),
        "overwrite": bool(args.overwrite),
        "allow_data_change": bool(args.allow_data_change),
    }


def run_config(kind: RunKind, args: argparse.Namespace) -> CommandConfig:
    """The config a training command runs: ``--config``/``--preset``/``--set``, or with ``--resume DIR`` the
    run's own config (see :func:`ppomax.trainers.run_dir.resume_config`)."""
    from ppomax.config import load_config

    preset = getattr(args, "preset", None)
    if args.resume:
        from ppomax.trainers.run_dir import resume_config

        return resume_config(kind, args.resume, args.config, preset, args.overrides)
    return load_config(kind, path=args.config, preset=preset, overrides=args.overrides)
