"""torch's CPU scaled-dot-product attention in float32 against bfloat16, at a PPO batch's shapes: why ppomax
computes attention in float32 under bf16 on CPU (ppomax/models/attention.py).

    .venv/bin/python bench/attention.py                    # 1 thread, the 21.5M bench model's shapes
    .venv/bin/python bench/attention.py --threads 2 --batch 64 --tokens 256

Rows: a training step (forward, then backward of its sum) over [batch, heads, tokens, head_dim] with a causal
mask whose first rows are left padding, and one decode step (one query over a cache of ``tokens`` keys), each in
float32 and bf16 with the flash kernel (what SDPA picks on CPU) and the math kernel; medians of ``--reps``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def _median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def training_ms(b: int, h: int, t: int, d: int, dtype: torch.dtype, backend: SDPBackend, reps: int):
    """(forward ms, backward ms) of attention over a left-padded causal batch."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, t, d, generator=g, dtype=dtype, requires_grad=True) for _ in range(3))
    mask = torch.ones(t, t, dtype=torch.bool).tril().expand(b, 1, t, t).clone()
    mask[: b // 2, :, :, : t // 8] = False  # half the rows start with padding
    mask[: b // 2, :, : t // 8, 0] = True
    fwd, bwd = [], []
    for _ in range(reps + 1):
        with sdpa_kernel(backend):
            start = time.perf_counter()
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            mid = time.perf_counter()
            out.sum().backward()
            end = time.perf_counter()
        fwd.append(mid - start)
        bwd.append(end - mid)
    return 1e3 * statistics.median(fwd[1:]), 1e3 * statistics.median(bwd[1:])


def decode_ms(b: int, h: int, t: int, d: int, dtype: torch.dtype, backend: SDPBackend, reps: int) -> float:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, h, 1, d, generator=g, dtype=dtype)
    k, v = (torch.randn(b, h, t, d, generator=g, dtype=dtype) for _ in range(2))
    mask = torch.ones(b, 1, 1, t, dtype=torch.bool)
    mask[: b // 2, :, :, : t // 8] = False

    def step() -> None:
        with sdpa_kernel(backend), torch.no_grad():
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    return _median_ms(step, reps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument(
        "--tokens", type=int, default=106, help="prompt + response width (the decode step's cache)"
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shape = (args.batch, args.heads, args.tokens, args.head_dim)
    print(f"shape [B, H, T, D] = {list(shape)}, {args.threads} thread(s), torch {torch.__version__}")
    print("| dtype | kernel | train fwd ms | train bwd ms | decode step ms |")
    print("|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH):
            fwd, bwd = training_ms(*shape, dtype, backend, args.reps)
            dec = decode_ms(*shape, dtype, backend, 5 * args.reps)
            name = str(dtype).removeprefix("torch.")
            print(f"| {name} | {backend.name.lower()} | {fwd:.1f} | {bwd:.1f} | {dec:.2f} |")


if __name__ == "__main__":
    main()
