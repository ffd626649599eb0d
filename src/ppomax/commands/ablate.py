"""`ppomax ablate`: the paper's ablations (fig. 6, 7, 8, 12) on hh-mini, with a verdict per claim, and the
critic-free advantage estimators against PPO-max."""

from __future__ import annotations

import argparse


def _run(args: argparse.Namespace) -> int:
    from ppomax.demo.ablate import run_ablate

    result = run_ablate(
        args.out,
        seeds=args.seeds,
        quick=args.quick,
        only=args.only,
        jobs=args.jobs,
        progress=not args.no_progress,
        report_only=args.report_only,
    )
    print()
    for v in result["summary"]["verdicts"]:
        print(f"{v['verdict']:>15}: {v['claim']} ({v['figure']})")
    cmp = result["summary"].get("estimators")
    if cmp:
        print()
        for v in cmp["verdicts"]:
            print(f"{v['question']}: {v['answer']}")
    print()
    print(f"report: {result['report']}")
    return 0


def _jobs(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def register(sub: argparse._SubParsersAction) -> None:
    from ppomax.demo.ablate import VARIANTS

    p = sub.add_parser(
        "ablate",
        help="the paper's PPO ablations (fig. 6, 7, 8, 12) and the critic-free estimators on hh-mini, judged by "
        "its gold reward",
        description="Run PPO variants (each a preset plus --set overrides) from the demo's cached stages for each "
        "seed, evaluate each against SFT by the gold judge, and write DIR/report/ablate.md with one verdict per "
        "claim of the paper, the collapse monitor judged against the gold reward, and (group estimators) GRPO, "
        "RLOO and REINFORCE++ against PPO-max: gold reward against KL spent, wall time and memory per iteration. "
        "Variants: " + ", ".join(f"{v.name} ({v.figure})" for v in VARIANTS) + ".",
    )
    p.add_argument("--out", default="runs/ablate", help="output directory (default: runs/ablate)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], metavar="SEED", help="default: 0 1 2")
    p.add_argument(
        "--quick",
        action="store_true",
        help="the quick profile, short runs, one variant per figure, the first seed",
    )
    p.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        help="only these variants (names, or figures: fig6 fig7 fig8 fig12, or the groups estimators (with "
        "ppo_max), causes (with grpo and rloo), whitening (with ppo_max) and monitor)",
    )
    p.add_argument(
        "--jobs",
        type=_jobs,
        default=1,
        metavar="N",
        help="variants trained at once, one torch thread each (default 1)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: write DIR/report from the runs already there (missing or unfinished ones are listed)",
    )
    p.set_defaults(func=_run)
