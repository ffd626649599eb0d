"""Peak host memory (RSS) and CPU time of PPO with LoRA against full fine-tuning, on a real model: SmolLM2-135M-Instruct
(bench/real_model.py) with the real HH-RLHF harmless prompts, the ppo_max preset, a reward model (and the critic it
initialises) that is a value head on the same model. Each run is ``ppomax train-ppo`` in a fresh process
(bench/_real_runs.py), so the allocator is set up as for a user (ppomax.allocator), and reports its peak RSS and
CPU seconds (user and system: one thread).

Two update shapes: a buffer of one rollout batch is one fused update (the policy's and the critic's activations
held at once), a buffer of two is two minibatches (one model's activations at a time). Full fine-tuning holds four
copies of the weights (policy, reference, critic, reward model), gradients and two AdamW moments for policy and
critic; LoRA holds two (the reference is the policy's base, the reward model the critic's, with the adapters off)
and trains only the adapters and the critic's value head. The activations are the same in both modes: on this
model they, not the weights, are most of the peak.

    python bench/lora_memory.py                    # 4 runs, ~15 min on one core; a markdown table
    python bench/lora_memory.py --glibc-heap       # the same with glibc's heap for tensors below 32 MiB
    python bench/lora_memory.py --rollout 4 --iterations 1
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from _real_runs import GIB, GLIBC_HEAP, PPOShape, measure, ppo_args, real_inputs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rollout", type=int, default=8, help="rollout batch = minibatch (responses)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--iterations", type=int, default=2)
    ap.add_argument("--updates", nargs="+", choices=("fused", "two"), default=["fused", "two"])
    ap.add_argument(
        "--glibc-heap", action="store_true", help="MALLOC_MMAP_THRESHOLD_=32 MiB (see _real_runs)"
    )
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model, rm = real_inputs(Path(tmp))
        for update in args.updates:
            buffer = args.rollout * (1 if update == "fused" else 2)
            shape = PPOShape(args.rollout, buffer, args.new_tokens, args.iterations)
            for mode in ("full", "lora"):
                out = Path(tmp) / f"{update}-{mode}"
                cmd = ppo_args(model, rm, out, shape, "ppo_max", lora=mode == "lora")
                rows.append(
                    {"update": update, "mode": mode, **measure(cmd, GLIBC_HEAP if args.glibc_heap else None)}
                )
    heap = "glibc's heap below 32 MiB" if args.glibc_heap else "ppomax.allocator (1 MiB mmap threshold)"
    print(
        f"SmolLM2-135M-Instruct, PPO-max, CPU fp32, one thread, {heap}: rollout {args.rollout} (= minibatch), "
        f"{args.new_tokens} new tokens, {args.iterations} iterations, LoRA r=16 on every linear layer\n"
    )
    print("| update | mode | peak RSS GiB | CPU user s | CPU sys s |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        update = "fused (buffer = minibatch)" if r["update"] == "fused" else "two minibatches"
        print(f"| {update} | {r['mode']} | {r['peak'] / GIB:.2f} | {r['user_s']:.0f} | {r['sys_s']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
