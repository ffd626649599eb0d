"""The `ppomax` command line: subcommands are the modules of :mod:`ppomax.commands`."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import os
import pkgutil
import sys
from typing import TYPE_CHECKING

import ppomax
import ppomax.commands
from ppomax.allocator import pin_mmap_threshold
from ppomax.console import console
from ppomax.errors import STOPPED_EXIT_CODE, RunStopped, UserError
from ppomax.threads import command_threads

if TYPE_CHECKING:
    from ppomax.config import RunKind


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ppomax", description="RLHF for Hugging Face causal LMs: SFT, reward models and PPO-max."
    )
    parser.add_argument("--version", action="version", version=f"ppomax {_version()}")
    parser.add_argument("--threads", type=_thread_count, default=None, metavar="N", help=THREADS_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(ppomax.commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"ppomax.commands.{info.name}")
        if hasattr(module, "register"):
            module.register(sub)
    for command in sub.choices.values():  # also after the command: `ppomax demo --threads 1`
        command.add_argument(
            "--threads", type=_thread_count, default=argparse.SUPPRESS, metavar="N", help=THREADS_HELP
        )
    return parser


THREADS_HELP = (
    "torch threads (default: PPOMAX_THREADS, else OMP_NUM_THREADS, else the CPUs this process may use "
    "divided among a launch's local processes)"
)


def _thread_count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def _version() -> str:
    try:
        return importlib.metadata.version("ppomax")
    except importlib.metadata.PackageNotFoundError:  # a source tree on PYTHONPATH, not installed
        return ppomax.__version__


def main(argv: list[str] | None = None) -> int:
    # transformers' per-file "Loading weights" bars would interleave with ours; set to 0 to see them
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    pin_mmap_threshold()  # freed tensors go back to the system (ppomax.allocator)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        hint = _config_key_hint(args, extra)
        if hint is None:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        console().error("%s", hint)
        return 2
    try:
        with command_threads(args.threads):
            return int(args.func(args) or 0)
    except UserError as exc:
        if _reports_errors():
            console().error("%s", exc)
        return 2
    except RunStopped:  # the trainer said where it saved and how to resume
        return STOPPED_EXIT_CODE
    except KeyboardInterrupt:
        console().error("interrupted")
        return 130
    finally:
        locks = sys.modules.get("ppomax.trainers.run_lock")  # loaded by a command that opened a run
        if locks is not None:
            locks.release_run_locks()
        _close_process_group()


#: The commands that take a config, and its kind (``ppomax config`` says its own with --kind).
CONFIG_COMMANDS: dict[str, RunKind] = {
    "train-sft": "sft",
    "train-rm": "rm",
    "train-ppo": "ppo",
    "plan": "ppo",
    "config": "ppo",
}


def _config_key_hint(args: argparse.Namespace, extra: list[str]) -> str | None:
    """The one-line hint for a config key given as a flag (``--learning_rate 1e-5``) or as ``key=value``."""
    if args.command not in CONFIG_COMMANDS:
        return None
    from ppomax.config import CONFIG_CLASSES
    from ppomax.config_keys import flag_hint

    kind = getattr(args, "kind", None) or CONFIG_COMMANDS[args.command]
    return flag_hint(extra, CONFIG_CLASSES[kind], args.command, kind)


# A launcher's rank of this process: torchrun / accelerate, MPICH / Intel MPI, Open MPI, MVAPICH (the variables
# beside ppomax.trainers.launch.WORLD_SIZE_VARS).
RANK_VARS = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")


def _reports_errors() -> bool:
    """Whether this process prints the user error it exits with. Under a launcher every rank fails, mostly with
    the same error: once the ranks are connected, the first to fail prints (a counter in the process group's
    store); before that (a config error, found alike on every rank), rank 0. Every rank still exits 2."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        try:
            from datetime import timedelta

            store = dist.distributed_c10d._get_default_store()
            store.set_timeout(timedelta(seconds=10))  # a store whose host has exited: print rather than wait
            return store.add("ppomax/user_error", 1) == 1
        except Exception:  # no store to ask: print, twice rather than never
            return True
    rank = next((os.environ[v] for v in RANK_VARS if os.environ.get(v, "").strip().isdigit()), "0")
    return int(rank) == 0


def _close_process_group() -> None:
    """Under `accelerate launch`, tear the process group down before exit: left to interpreter shutdown, gloo's
    threads can abort a rank ("terminate called without an active exception")."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
