"""Does torch.compile of the trained models help a PPO iteration on CPU? Times ``PPOTrainer.iteration`` eager and
with every decoder layer of the policy and of the critic compiled in place (``nn.Module.compile(dynamic=True)``:
inductor fuses each layer's elementwise ops, RMSNorm, rotary, SiLU x up, around the matmuls), in fresh processes
with one torch thread and an empty inductor cache each.

    .venv/bin/python bench/compile_layers.py                   # 512x5 Llama (21.5M), ~6 min

Settings as bench/ppo_iteration.py (``ppo_max``, batch 32 = one minibatch, one epoch, 64 new tokens); medians over
the iterations after ``--warmup`` (compilation happens there). An experiment for the performance issue, not a
ppomax option: the layers stay compiled for generation and scoring too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PHASES = ("time/generation", "time/scoring", "time/training", "time/iteration")


def worker(a: argparse.Namespace) -> dict[str, float]:
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(HERE.parent / "src"))
    from _tiny import build, one_update_overrides

    from ppomax.config import load_config
    from ppomax.ppo import PPOTrainer

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        policy, rm, prompts, _ = build(root, a.hidden, a.layers, 512, seed=0)
        iterations = a.warmup + a.iterations
        overrides = one_update_overrides(policy, rm, prompts, root / "run", a.batch, 64, iterations)
        cfg = load_config("ppo", preset="ppo_max", overrides=overrides)
        trainer = PPOTrainer(cfg)
        if a.worker == "compiled":
            for model in (trainer.models.policy, trainer.models.critic):
                inner = getattr(model, "module", model)
                backbone = inner.model if hasattr(inner, "model") else inner.backbone.model
                for layer in backbone.layers:
                    layer.compile(dynamic=True)
        rows = [trainer.iteration(s) for s in range(1, iterations + 1)][a.warmup :]
    return {k: statistics.median(r[k] for r in rows) for k in PHASES}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--iterations", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--worker", choices=["eager", "compiled"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a)))
        return 0
    print("| layers | gen s | score s | train s | iter s |\n|---|---|---|---|---|")
    for variant in ("eager", "compiled"):
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "ACCELERATE_USE_CPU": "true", "TORCHINDUCTOR_CACHE_DIR": cache}
            args = [f"--hidden={a.hidden}", f"--layers={a.layers}", f"--batch={a.batch}"]
            args += [f"--iterations={a.iterations}", f"--warmup={a.warmup}", f"--worker={variant}"]
            out = subprocess.run(
                [sys.executable, __file__, *args], env=env, capture_output=True, text=True, check=True
            )
            m = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {variant} | " + " | ".join(f"{m[k]:.3f}" for k in PHASES) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
