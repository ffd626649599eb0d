"""The hardware bound of a PPO iteration: this machine's measured dense matmul FLOP/s, and the model FLOPs each phase
of an iteration needs, so that a bench can report each phase's utilisation of the bound.

    .venv/bin/python bench/hardware.py                # fp32 and bf16 matmul FLOP/s, 1 and 2 threads

FLOPs counted (multiply-adds x 2) for a decoder-only Llama-style model with hidden ``h``, ``L`` layers, MLP width
``I``, ``V`` vocabulary: per token, a forward through the backbone's matmuls costs ``2 L (2 h^2 + 2 h d_kv + 3 h
I)`` (q and o projections, k and v at the key/value width, gate/up/down) plus attention ``4 L h c`` at context
``c`` (scores and weighted sum); the LM head ``2 h V`` only where logits are needed (the response tokens); a value
model (critic, reward model) has no LM head. A backward costs twice a forward. The input embedding is a lookup,
not counted. What each phase needs, for B rows with prompt P and responses of mean length n (real tokens only:
padding is waste, not need):

- generation: one KV-cached forward of the policy per prompt and response token, the LM head per response token;
- scoring: a forward of the reference and of the reward model over prompt + response, plus one of the policy (old
  log-probs) and of the critic (values) unless the schedule is one epoch over one minibatch, where the update's
  first forward gives them, so they are not needed work (and where a trainer runs the reference beside that
  forward, its forward counts in training);
- training: forward + backward (3 forwards) of the policy and of the critic over prompt + response, per epoch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any


def matmul_flops(dtype: str, m: int = 2048, k: int = 2048, n: int = 2048, seconds: float = 1.0) -> float:
    """Measured FLOP/s of ``[m, k] @ [k, n]`` in ``dtype`` (float32 / bfloat16) with the current torch thread
    count: the median of 5 timings of as many products as fill about ``seconds`` / 5, after a warmup."""
    import torch

    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g).to(dt)
    w = torch.randn(k, n, generator=g).to(dt)
    t0 = time.perf_counter()
    x @ w
    one = max(time.perf_counter() - t0, 1e-6)
    reps = max(1, int(seconds / 5 / one))
    rates = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            x @ w
        rates.append(2 * m * k * n * reps / (time.perf_counter() - t0))
    return statistics.median(rates)


def model_shape(model_dir: str | Path) -> dict[str, int]:
    """``h, L, I, V, d_kv`` of a saved Llama-style model (its config.json)."""
    c = json.loads((Path(model_dir) / "config.json").read_text())
    heads = c["num_attention_heads"]
    kv = c.get("num_key_value_heads") or heads
    return {
        "h": c["hidden_size"],
        "L": c["num_hidden_layers"],
        "I": c["intermediate_size"],
        "V": c["vocab_size"],
        "d_kv": c["hidden_size"] // heads * kv,
    }


def forward_flops(s: dict[str, int], tokens: float, context_sum: float, head_tokens: float) -> float:
    """A forward over ``tokens`` tokens whose contexts sum to ``context_sum``, with the LM head at
    ``head_tokens`` of them (0 for a value model)."""
    h, L = s["h"], s["L"]
    per_token = 2 * L * (2 * h * h + 2 * h * s["d_kv"] + 3 * h * s["I"])
    return per_token * tokens + 4 * L * h * context_sum + 2 * h * s["V"] * head_tokens


def phase_flops(
    s: dict[str, int],
    batch: int,
    prompt_len: float,
    response_len: float,
    epochs: int = 1,
    fused_scoring: bool = True,
    reference_in_update: bool = False,
) -> dict[str, float]:
    """Model FLOPs an iteration needs per phase (module docstring) for ``batch`` rows of ``prompt_len`` prompt
    and mean ``response_len`` response tokens (contexts from the mean length), trained for ``epochs`` passes.
    ``fused_scoring``: the schedule lets the update's first forward give the old log-probs and values (one epoch
    over one minibatch), so scoring needs only the reference and the reward model; otherwise it also needs a
    forward of the policy and of the critic. ``reference_in_update`` (fused only): the trainer runs the
    reference beside that first forward (ppomax does, for the exact KL), so its forward is training's need."""
    p, n = prompt_len, response_len
    tokens = batch * (p + n)
    # row contexts: 1..P for the prompt, P+1..P+n for the response
    context = batch * ((p + n) * (p + n + 1) / 2)
    resp = batch * n
    fwd_lm = forward_flops(s, tokens, context, resp)
    fwd_value = forward_flops(s, tokens, context, 0)
    train = epochs * 3 * (fwd_lm + fwd_value)  # policy + critic, forward and backward, each epoch
    if not fused_scoring:  # reference + reward model, then the policy's and the critic's scoring forwards
        return {"gen": fwd_lm, "score": 2 * (fwd_lm + fwd_value), "train": train}
    if reference_in_update:
        return {"gen": fwd_lm, "score": fwd_value, "train": train + fwd_lm}
    return {"gen": fwd_lm, "score": fwd_lm + fwd_value, "train": train}


def utilisation(need: dict[str, float], seconds: dict[str, float], bound: float) -> dict[str, float]:
    """Fraction of ``bound`` FLOP/s each phase reached: its needed FLOPs over its time x the bound."""
    return {k: need[k] / (seconds[k] * bound) for k in need if seconds.get(k)}


def bounds(threads: int, dtypes: tuple[str, ...] = ("float32", "bfloat16")) -> dict[str, Any]:
    """FLOP/s of a 2048^3 matmul in each of ``dtypes`` with ``threads`` torch threads."""
    import torch

    torch.set_num_threads(threads)
    out: dict[str, Any] = {"threads": threads}
    for dtype in dtypes:
        out[dtype] = matmul_flops(dtype)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,2")
    a = ap.parse_args(argv)
    print("| threads | fp32 GFLOP/s | bf16 GFLOP/s | bf16 / fp32 |\n|---|---|---|---|")
    for t in (int(x) for x in a.threads.split(",")):
        b = bounds(t)
        print(
            f"| {t} | {b['float32'] / 1e9:.1f} | {b['bfloat16'] / 1e9:.2f} | {b['bfloat16'] / b['float32']:.3f} |"
        )
    print(f"\n2048 x 2048 x 2048 matmuls, median of 5; date {time.strftime('%Y-%m-%d %H:%M %Z')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
