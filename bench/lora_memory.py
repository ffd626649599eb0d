"""Peak host memory (RSS) of PPO with LoRA against full fine-tuning, on the same random Llama (nothing downloaded).

Each mode runs in a fresh subprocess (so one's allocations cannot hide in the other's peak): it builds the
trainer (policy, reference, critic, reward model, both optimisers) with the ``ppo_max`` preset
(``critic_init: reward_model``), runs ``--iterations`` PPO iterations through ``PPOTrainer.iteration`` (the first
optimiser steps allocate AdamW's states), and reports ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` after
building and at the end. Full fine-tuning holds four copies of the weights plus gradients and two AdamW moments
for policy and critic; LoRA holds three (no reference copy: the policy's base with adapters off) and trains only
the adapters and the critic's value head. The weights load lazily (safetensors mappings), so the RSS after
building is the same in both modes; the peak, after the first updates, is where gradients and AdamW states show.
Peaks vary by ~10% from run to run (allocator high-water marks): compare several runs.

    python bench/lora_memory.py                            # ~38M-parameter Llama, CPU, markdown table
    python bench/lora_memory.py --hidden 512 --layers 8 --vocab 4096 --r 8
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(args: argparse.Namespace) -> int:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from transformers.utils import logging as hf_logging

    from ppomax.config import load_config
    from ppomax.models import model_summary
    from ppomax.trainers.ppo import PPOTrainer

    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    root = Path(args.root)
    b = args.batch
    over = [
        f"model.policy={root / 'policy'}",
        f"model.reward={root / 'rm'}",
        f"data.prompts={root / 'prompts.jsonl'}",
        f"generation.max_new_tokens={args.new_tokens}",
        "ppo.critic_pretrain_steps=0",
        f"ppo.iterations={args.iterations}",
        f"ppo.rollout_batch_size={b}",
        f"ppo.buffer_size={b}",
        f"ppo.minibatch_size={b}",
        "ppo.ppo_epochs=1",
        f"logging.out_dir={root / ('run-' + args.mode)}",
        "logging.tensorboard=false",
        "logging.progress=false",
    ]
    if args.mode == "lora":
        over.append(f"model.lora={{r: {args.r}}}")
    trainer = PPOTrainer(load_config("ppo", preset="ppo_max", overrides=over))
    built = _rss_mib()
    for step in range(1, args.iterations + 1):
        trainer.iteration(step)
    policy = model_summary(trainer.unwrapped(trainer.policy))
    critic = model_summary(trainer.unwrapped(trainer.critic))
    print(
        json.dumps(
            {
                "mode": args.mode,
                "rss_after_build_mib": built,
                "peak_rss_mib": _rss_mib(),
                "policy_trainable": policy["trainable_params"],
                "critic_trainable": critic["trainable_params"],
                "policy_params": policy["params"],
                "reference_loaded": type(trainer.models.reference).__name__ != "AdaptersOff",
            }
        )
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--r", type=int, default=8, help="LoRA rank (all-linear)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--iterations", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--mode", choices=["full", "lora"], help=argparse.SUPPRESS)  # the child's
    ap.add_argument("--root", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.mode:
        return child(args)

    os.environ["ACCELERATE_USE_CPU"] = "true"
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from _tiny import build  # bench/ is on sys.path when this file runs as a script

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        _policy, _rm, _prompts, n_params = build(Path(tmp), args.hidden, args.layers, args.vocab, seed=0)
        for mode in ("full", "lora"):
            cmd = [sys.executable, __file__, "--mode", mode, "--root", tmp]
            for key in ("r", "batch", "new_tokens", "iterations", "threads"):
                cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
    print(
        f"Llama {n_params / 1e6:.1f}M parameters (hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}), "
        f"batch {args.batch}, {args.new_tokens} new tokens, {args.iterations} iterations, CPU fp32"
    )
    print("| mode | reference loaded | trainable (policy / critic) | RSS after build MiB | peak RSS MiB |")
    print("|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['mode']} | {'yes' if r['reference_loaded'] else 'no'} | {r['policy_trainable']:,} / "
            f"{r['critic_trainable']:,} | {r['rss_after_build_mib']:.0f} | {r['peak_rss_mib']:.0f} |"
        )
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
