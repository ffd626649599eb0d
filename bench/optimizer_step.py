"""One AdamW step over a model's parameters: torch's default on CPU (a loop of elementwise ops per tensor),
its ``foreach`` variant, and its fused kernel (what ``ppomax.optim.build_optimizer`` takes on CPU and CUDA).

    .venv/bin/python bench/optimizer_step.py --size smollm2-135m --threads 1
    .venv/bin/python bench/optimizer_step.py --size 512x5 --threads 2

Random weights of the shape (bench/_tiny.py), random gradients, PPO-max's betas; each variant keeps its own state
and steps ``--rounds`` times, the variants in turn (the order reversed every other round); the first round is not
counted. Prints medians of wall and CPU seconds per step, and the largest difference between the parameters each
variant's step gives from the same start (the kernels round differently, they compute the same update).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

VARIANTS = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--size", default="smollm2-135m", help="HIDDENxLAYERS (a tiny Llama, vocab 512) or a SHAPES name"
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=6)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from _tiny import SHAPES, tiny_shape
    from transformers import LlamaConfig, LlamaForCausalLM

    if a.size in SHAPES:
        shape = dict(SHAPES[a.size])
    else:
        hidden, layers = (int(x) for x in a.size.lower().split("x"))
        shape = {**tiny_shape(hidden, layers), "vocab_size": 512}
    torch.manual_seed(0)
    start = [p.detach().clone() for p in LlamaForCausalLM(LlamaConfig(**shape)).parameters()]
    grads = [torch.randn_like(p) * 1e-3 for p in start]
    n = sum(p.numel() for p in start)

    def params() -> list[torch.nn.Parameter]:
        out = [torch.nn.Parameter(p.clone()) for p in start]
        for p, g in zip(out, grads, strict=True):
            p.grad = g
        return out

    models = {k: params() for k in VARIANTS}
    opts = {k: torch.optim.AdamW(models[k], lr=1e-5, betas=(0.9, 0.95), **kw) for k, kw in VARIANTS.items()}
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in VARIANTS}
    for r in range(a.rounds):
        order = list(VARIANTS) if r % 2 == 0 else list(reversed(VARIANTS))
        for k in order:
            w0, c0 = time.perf_counter(), time.process_time()
            opts[k].step()
            if r:
                times[k].append((time.perf_counter() - w0, time.process_time() - c0))
    ref = models["default"]
    print(
        f"AdamW step over {n / 1e6:.1f}M parameters in {len(start)} tensors ({a.size}, float32), {a.threads} "
        f"thread(s), medians of {a.rounds - 1} steps:"
    )
    print("| variant | wall s | CPU s | max abs diff from default after the steps |")
    print("|---|---|---|---|")
    for k, t in times.items():
        diff = max(float((p - q).detach().abs().max()) for p, q in zip(models[k], ref, strict=True))
        wall, cpu = statistics.median(x[0] for x in t), statistics.median(x[1] for x in t)
        print(f"| {k} | {wall:.3f} | {cpu:.3f} | {diff:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
