"""Time PPO iterations of ppomax's trainer on a tiny model: generation, scoring (policy, reference, critic and reward
model forwards plus advantages) and training, with samples/s and tokens/s.

Everything is built in a temporary directory (nothing downloaded): a BPE tokenizer trained on synthetic text, a
random Llama of the requested size saved with ``save_pretrained``, a value-head reward model on the same backbone
(the critic is a copy of it: ``critic_init: reward_model``), and synthetic HH-style prompts. The iterations run
through the real code path (``PPOTrainer.iteration``) with the ``ppo_max`` preset; the first ``--warmup``
iterations are not timed.

    python bench/ppo_iteration.py                         # defaults below, CPU, prints a markdown table
    python bench/ppo_iteration.py --hidden 256 --layers 4 --batch 64 --new-tokens 128 --device cuda

Rows: one per run; ``tokens/s`` counts generated response tokens per second of the whole iteration, ``gen tok/s``
per second of generation only; ``scoring`` is the trainer's scoring strategy: ``fused`` at the default setting
here (one epoch over one minibatch: the policy's and the critic's scoring forwards are the update's first, so they
count as training), ``separate`` with ``--scoring separate`` (forced) or any setting with several minibatches or
epochs.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _tiny import build, one_update_overrides  # bench/ is on sys.path when run as a script


def profiled_iteration(trainer: Any, step: int, top: int) -> dict[str, float]:
    """``trainer.iteration(step)`` under torch.profiler; prints the ``top`` ops by self CPU time, with a
    ``phase::*`` row per phase (generation, scoring, training: the trainer's ``generate`` and its scoring
    strategy's methods wrapped in record_function)
    whose CPU total is that phase's, then each phase's own breakdown (:func:`phase_breakdown`)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    def labelled(name: str, fn: Any) -> Any:
        def run(*a: Any, **kw: Any) -> Any:
            with record_function(f"phase::{name}"):
                return fn(*a, **kw)

        return run

    s = trainer.scoring
    saved = trainer.generate, s.score, s.advantages, s.update
    trainer.generate = labelled("generation", trainer.generate)
    s.score = labelled("scoring", s.score)
    s.advantages = labelled("scoring_advantages", s.advantages)
    s.update = labelled("training", s.update)
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            m = trainer.iteration(step)
    finally:
        trainer.generate, s.score, s.advantages, s.update = saved
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=60)
    print(
        f"profile of iteration {step} (self CPU time; phase::* rows are the phases' totals)", file=sys.stderr
    )
    print(table, file=sys.stderr)
    print(phase_breakdown(prof.events(), share=0.02), file=sys.stderr)
    return m


def phase_breakdown(events: Any, share: float) -> str:
    """Self CPU time per phase and, within each, every op taking at least ``share`` of it: an op belongs to the
    innermost ``phase::*`` record_function above it (scoring_advantages counts as scoring)."""
    import collections

    per_op: dict[tuple[str, str], float] = collections.defaultdict(float)
    per_phase: dict[str, float] = collections.defaultdict(float)
    calls: dict[tuple[str, str], int] = collections.Counter()
    for e in events:
        parent, phase = e, "other"
        while parent is not None:
            if parent.name.startswith("phase::"):
                phase = parent.name.removeprefix("phase::").removesuffix("_advantages")
                break
            parent = parent.cpu_parent
        per_op[phase, e.name] += e.self_cpu_time_total / 1e6
        per_phase[phase] += e.self_cpu_time_total / 1e6
        calls[phase, e.name] += 1
    lines = []
    for phase in ("generation", "scoring", "training"):
        lines.append(f"{phase}: {per_phase[phase]:.3f} s self CPU")
        ops = sorted(((t, op) for (p, op), t in per_op.items() if p == phase), reverse=True)
        for t, op in ops:
            if t >= share * per_phase[phase]:
                pct = 100 * t / per_phase[phase]
                lines.append(f"  {op[:60]:60s} {t:7.3f} s {pct:4.0f}%  {calls[phase, op]} calls")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--batch", type=int, default=32, help="rollout batch = buffer = minibatch (one update)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--iterations", type=int, default=5, help="timed iterations")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (sets ACCELERATE_USE_CPU for cpu)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument(
        "--scoring",
        choices=["chosen", "separate"],
        default="chosen",
        help="chosen: the scoring strategy the trainer picks (fused at one epoch over one minibatch, as by "
        "default here); separate: a scoring pass before the update, forced (the path of every other setting)",
    )
    ap.add_argument("--header", action="store_true", help="print the table header too")
    ap.add_argument("--json", action="store_true", help="also print the raw numbers as JSON")
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="a config override (repeatable)"
    )
    ap.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="profile the last iteration with torch.profiler and print its N most expensive ops to stderr",
    )
    args = ap.parse_args(argv)

    import os

    if args.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"
    if args.threads:
        torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from transformers.utils import logging as hf_logging

    import ppomax.ppo.assembly as ppo_mod  # where PPOTrainer chooses its scoring strategy
    from ppomax.config import load_config
    from ppomax.ppo import PPOTrainer

    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        policy, rm, prompts, n_params = build(root, args.hidden, args.layers, args.vocab, seed=0)
        b = args.batch
        iterations = args.warmup + args.iterations
        overrides = one_update_overrides(policy, rm, prompts, root / "run", b, args.new_tokens, iterations)
        cfg = load_config(
            "ppo", preset="ppo_max", overrides=[*overrides, f"model.dtype={args.dtype}", *args.set]
        )
        if args.scoring == "separate":  # PPOTrainer chooses its strategy when built
            ppo_mod.fuses_scoring = lambda ppo: False
        trainer = PPOTrainer(cfg)
        scoring = trainer.scoring.name
        rows = []
        last = args.warmup + args.iterations
        for step in range(1, last + 1):
            if args.profile and step == last:
                m = profiled_iteration(trainer, step, args.profile)
            else:
                m = trainer.iteration(step)
            if step > args.warmup:
                rows.append(m)

    def med(key: str) -> float:
        return statistics.median(r[key] for r in rows)

    length = med("response/length_mean")
    device = (
        torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor() or "cpu"
    )
    threads = torch.get_num_threads() if args.device == "cpu" else "-"
    header = (
        "| model | params | layers | hidden | vocab | device | threads | batch | new tokens (mean len) | "
        "gen s | score s | train s | iter s | samples/s | tokens/s | gen tok/s | scoring |"
    )
    if args.header:
        print(header)
        print("|" + "---|" * (header.count("|") - 1))
    print(
        f"| tiny Llama | {n_params / 1e6:.2f}M | {args.layers} | {args.hidden} | {args.vocab} | {device} | {threads} "
        f"| {b} | {args.new_tokens} ({length:.0f}) | {med('time/generation'):.3f} | {med('time/scoring'):.3f} "
        f"| {med('time/training'):.3f} | {med('time/iteration'):.3f} | {med('perf/samples_per_s'):.1f} "
        f"| {med('perf/tokens_per_s'):.0f} | {med('perf/generation_tokens_per_s'):.0f} | {scoring} |"
    )
    if args.json:
        print(
            json.dumps(
                {
                    "params": n_params,
                    "scoring": scoring,
                    "args": vars(args),
                    "median": {k: med(k) for k in rows[0] if k.startswith(("time/", "perf/"))},
                    "max": {k: max(r[k] for r in rows) for k in rows[0] if "mismatch" in k},
                    "when": time.strftime("%Y-%m-%d %H:%M"),
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
