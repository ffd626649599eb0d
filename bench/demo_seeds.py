"""Does the paper's central finding reproduce on hh-mini? Run `ppomax demo` for several seeds and print each seed's
outcome numbers.

    .venv/bin/python bench/demo_seeds.py                      # seeds 0 1 2, full profile, runs/demo_seeds/seed-N
    .venv/bin/python bench/demo_seeds.py --seeds 0 1 2 3 --quick --out /tmp/seeds

For every seed (a different world, tokenizer, model initialisation and sampling noise): PPO-max vs SFT
win/tie/lose by the gold judge (overall, helpful, harmless); the RM and gold reward trajectories of both PPO runs
(start / peak / end over the run, see ppomax.demo.outcome.trajectory); KL per token and response length; and the three
verdicts of ppomax.demo.outcome.outcome. Stages are cached per seed, so an interrupted sweep resumes where it stopped.
A JSON file with every seed's summary is written to OUT/seeds.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def _f(x: Any, spec: str = "+.2f") -> str:
    return format(x, spec) if isinstance(x, int | float) else "n/a"


def seed_lines(seed: int, s: dict[str, Any]) -> list[str]:
    out = [f"seed {seed}  ({s.get('profile')}, {s.get('wall_seconds', 0):.0f}s)"]
    for name in ("ppo_max", "vanilla"):
        e = s["eval"].get(name)
        if e:
            wtl = e["win_tie_lose"]
            parts = "  ".join(
                f"{k} {'/'.join(map(str, wtl[k]))}" for k in ("overall", "helpful", "harmless") if k in wtl
            )
            out.append(
                f"  {name:<8} vs SFT (gold judge, win/tie/lose): {parts}   mean gold {_f(e['gold_policy'])} "
                f"vs SFT {_f(e['gold_sft'])}"
            )
    for name, tr in s["runs"].items():
        cells = []
        for metric, spec in (
            ("rm", "+.2f"),
            ("gold", "+.2f"),
            ("kl", ".3f"),
            ("length", ".1f"),
            ("ppl", ".2f"),
        ):
            t = tr[metric]
            cells.append(f"{metric} {_f(t['start'], spec)}/{_f(t['peak'], spec)}/{_f(t['end'], spec)}")
        out.append(f"  {name:<8} start/peak/end: " + "  ".join(cells))
    rm = s.get("rm_accuracy", {})
    out.append(
        f"  RM accuracy: {_f(rm.get('accuracy_annotator'), '.1%')} vs annotators, "
        f"{_f(rm.get('accuracy_gold'), '.1%')} vs gold"
    )
    out.append(
        f"  PPO-max beats SFT: {s.get('ppo_max_beats_sft')}   PPO-max stable: {s.get('ppo_max_stable')}   "
        f"vanilla over-optimises: {s.get('vanilla_over_optimises')} "
        f"({', '.join(s.get('vanilla_signatures') or []) or 'no signature'})"
    )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="runs/demo_seeds")
    ap.add_argument("--progress", action="store_true", help="show the trainers' progress bars")
    args = ap.parse_args(argv)

    from ppomax.demo.pipeline import run_demo

    root = Path(args.out)
    summaries: dict[int, dict[str, Any]] = {}
    for seed in args.seeds:
        res = run_demo(
            root / f"seed-{seed}",
            quick=args.quick,
            seed=seed,
            progress=args.progress,
            log=lambda m, seed=seed: print(f"  [seed {seed}] {m}", file=sys.stderr),
        )
        s = res["summary"]
        summaries[seed] = s
        print("\n".join(seed_lines(seed, s)), flush=True)
    keys = ("ppo_max_beats_sft", "ppo_max_stable", "vanilla_over_optimises")
    print(
        "\nall seeds: "
        + "   ".join(f"{k}: {sum(bool(s.get(k)) for s in summaries.values())}/{len(summaries)}" for k in keys)
    )
    root.mkdir(parents=True, exist_ok=True)
    (root / "seeds.json").write_text(
        json.dumps({str(k): v for k, v in summaries.items()}, indent=1, default=str)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
