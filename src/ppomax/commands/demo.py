"""`ppomax demo`: the whole pipeline on the embedded hh-mini world, with a report."""

from __future__ import annotations

import argparse


def _run(args: argparse.Namespace) -> int:
    from ppomax.demo.pipeline import format_summary, run_demo

    result = run_demo(args.out, quick=args.quick, seed=args.seed, progress=not args.no_progress)
    print()
    print(format_summary(result["summary"]))
    print()
    print(f"report: {result['report']}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="tokenizer -> pre-training -> SFT -> RM -> PPO vanilla and PPO-max -> evaluation on hh-mini",
        description="Run the whole RLHF pipeline on the embedded hh-mini world (a generated helpful/harmless "
        "world with a known gold reward), then write a report comparing vanilla PPO and PPO-max against SFT. "
        "Stages are cached in --out and reused when run again with the same settings.",
    )
    p.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    p.add_argument("--quick", action="store_true", help="a smaller world and shorter runs (a few minutes)")
    p.add_argument("--seed", type=int, default=0, help="world and training seed (default: 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run)
