"""``ppomax plan`` against the measured peak host memory of real runs on CPU: SmolLM2-135M-Instruct
(bench/real_model.py) on the real HH-RLHF harmless prompts and pairs, five cases, each a ppomax command in a fresh
process through the CLI (bench/_real_runs.py):

* full PPO and LoRA PPO (preset ppo_max; the reward model, and the critic it initialises, a value head on the
  real model), GRPO (preset grpo: no critic, 4 responses per prompt);
* full and LoRA reward-model training (train-rm, beta_rm 1: the LM term on the chosen responses).

Measured: the process's ``ru_maxrss`` (the resident set's high-water mark, the runtime included). Planned:
``ppomax plan --json``'s ``cpu_run.peak`` for the same config (the strategy a one-process CPU run uses, plus the
process's runtime). The check: every ratio within 0.8-1.2 (exit status 1 otherwise).

    python bench/plan_real.py                            # ~20 min on one core; a markdown table
    python bench/plan_real.py --cases ppo lora_ppo --buffer 16
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

from _real_runs import GIB, PPOShape, measure, planned, ppo_args, real_inputs, rm_args

CASES = ("ppo", "lora_ppo", "grpo", "rm", "lora_rm")
TOLERANCE = 0.2


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    ap.add_argument("--rollout", type=int, default=8, help="PPO rollout batch = minibatch (responses)")
    ap.add_argument("--buffer", type=int, default=8, help="PPO buffer (= rollout: one fused update)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument(
        "--prompt-tokens",
        type=int,
        default=128,
        help="data.max_prompt_tokens: a cap most batches of the HH prompts reach (median 92 tokens, 90th "
        "percentile 258), as the full-length batch plan assumes",
    )
    ap.add_argument("--iterations", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=8, help="reward-model pairs per step")
    ap.add_argument("--rm-epochs", type=float, default=0.01, help="of the 2,303 pairs (0.01: 3 steps)")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    shape = PPOShape(args.rollout, args.buffer, args.new_tokens, args.iterations, args.prompt_tokens)
    # GRPO's rows come 4 to a prompt: twice the rows, so that its batches hold 4 prompts and one of them most
    # likely reaches the cap (with 2, a batch of two short prompts is half the length plan assumes).
    grpo_shape = dataclasses.replace(shape, rollout=2 * shape.rollout, buffer=2 * shape.buffer)
    print(
        f"SmolLM2-135M-Instruct, CPU fp32, one thread; PPO: rollout {args.rollout} (GRPO {2 * args.rollout}), "
        f"buffer {args.buffer} (GRPO {2 * args.buffer}), {args.prompt_tokens} prompt + {args.new_tokens} new "
        f"tokens, {args.iterations} iterations; RM: {args.pairs} pairs per step\n"
    )
    print("| case | plan GiB (runtime included) | measured peak RSS GiB | measured / plan | CPU s |")
    print("|---|---:|---:|---:|---:|", flush=True)
    rows, ok = [], True
    with tempfile.TemporaryDirectory() as tmp:
        model, rm = real_inputs(Path(tmp))
        for case in args.cases:
            out = Path(tmp) / case
            if case.endswith("rm"):
                kind, cmd = "rm", rm_args(model, out, args.pairs, args.rm_epochs, lora=case == "lora_rm")
            else:
                grpo = case == "grpo"
                preset, case_shape = ("grpo", grpo_shape) if grpo else ("ppo_max", shape)
                kind, cmd = "ppo", ppo_args(model, rm, out, case_shape, preset, lora=case == "lora_ppo")
            r = {"case": case, **measure(cmd), "plan": planned(kind, cmd)}
            rows.append(r)
            p, m = r["plan"]["peak"], r["peak"]
            ok = ok and abs(m / p - 1) <= TOLERANCE
            cpu = r["user_s"] + r["sys_s"]
            print(f"| {case} | {p / GIB:.2f} | {m / GIB:.2f} | {m / p:.2f} | {cpu:.0f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
