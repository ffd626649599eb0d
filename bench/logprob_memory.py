"""Peak host memory (RSS) and CPU time of the vocabulary reductions of PPO's scoring pass: the policy's log-probs
at the sampling temperature and raw, its entropy, and the exact KL to the reference, from response logits
[rows, positions, vocab] (:mod:`ppomax.algos.vocab`). ``sliced`` is the library as it runs (without a gradient
the logits go through in slices of ``VOCAB_SLICE_ELEMENTS``); ``whole`` the same functions on the whole tensor at
once (the whole-tensor float32 copy, logsumexp's exp, softmax, log-softmaxes; ``--before`` measures older code). Each
measurement is a fresh process with one thread: the peak RSS (VmHWM, reset after the inputs are made) above
what the inputs (the two models' logits and the labels) take, and the CPU seconds (user + system) of the reductions,
with (on the CPU) the system seconds and the minor page faults among them.

``--grad`` measures the update's forward and backward instead (``Forward.logprobs``, and ``Forward.entropy``
with ``all``, of logits that require a gradient, then ``backward``; the peak includes the logits' gradient). The
log-probs save only the logits and logsumexp and recompute softmax per slice in the backward (``whole``: one
slice); the entropy runs in one go under autograd.

    python bench/logprob_memory.py                          # 8 x 256 x 49,152 (SmolLM2), float32 logits
    python bench/logprob_memory.py --dtype bfloat16 --vocab 128256
    python bench/logprob_memory.py --grad
    python bench/logprob_memory.py --ops scoring --before /path/to/older/checkout/src   # against older code
    python bench/logprob_memory.py --grad --before /path/to/older/checkout/src
    python bench/logprob_memory.py --device cuda --dtype bfloat16 --vocab 151936 [--grad]   # on a GPU, alone

``scoring`` makes the calls of the scoring pass: ``Forward.scoring_stats`` (one pass over both models' logits),
or in older versions ``Forward.logprobs`` at the temperature and raw, ``Forward.entropy`` and ``exact_kl``;
``all`` the separate reductions through :mod:`ppomax.algos` directly.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

MIB = 1 << 20


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def reset_peak_rss() -> int:
    """Start a new peak (Linux: writing 5 to clear_refs resets VmHWM); returns the resident size now."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


def peak_rss() -> int:
    return _status("VmHWM")


def forward(temperature: float):
    """This checkout's ``Forward`` (older ones take the unwrapped policy first)."""
    import inspect

    import torch

    from ppomax.ppo.models import Forward

    first = [torch.nn.Identity()] if "policy_unwrapped" in inspect.signature(Forward).parameters else []
    return Forward(*first, temperature=temperature)


def as_response_logits(logits):
    """``logits`` [rows, positions, vocab] as this checkout's ``Forward`` methods take them (older ones: the
    tensor itself)."""
    try:
        from ppomax.models.lm_head import ResponseLogits
    except ImportError:
        return logits
    return ResponseLogits(logits)


def measure(
    rows: int, positions: int, vocab: int, dtype: str, device: str, mode: str, op: str, grad: bool
) -> dict:
    import torch

    from ppomax.algos import entropy_from_logits, kl_from_logits, logprobs_from_logits

    torch.set_num_threads(1)
    if mode == "whole":  # (mode "before": the code on PYTHONPATH as it is)
        from ppomax.algos import vocab as reductions

        reductions.VOCAB_SLICE_ELEMENTS = 1 << 62
    g = torch.Generator(device).manual_seed(0)
    dt = getattr(torch, dtype)
    # filled in place: no temporary may raise the peak before the measurement starts
    logits = torch.empty(rows, positions, vocab, dtype=dt, device=device).normal_(0, 3, generator=g)
    ref = None
    if not grad:
        ref = torch.empty_like(logits).normal_(0, 0.1, generator=g).add_(logits)
    labels = torch.randint(0, vocab, (rows, positions), generator=g, device=device)
    if grad:
        logits.requires_grad_(True)
    t = 0.8
    fwd = forward(t)  # before the clock: its first call imports the trainer's modules (seconds of CPU)
    cuda = device.startswith("cuda")
    if cuda:  # the caching allocator's peak of live tensors; wall seconds of the synchronised work
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base, clock = torch.cuda.memory_allocated(), time.perf_counter
    else:
        base, clock = reset_peak_rss(), time.process_time
    start, usage = clock(), resource.getrusage(resource.RUSAGE_SELF)
    if grad:
        held = as_response_logits(logits)  # the update's calls (the same before the slicing)
        loss = fwd.logprobs(held, labels).sum()
        if op == "all":
            loss = loss + fwd.entropy(held).sum()
        loss.backward()
    else:
        with torch.no_grad():
            if op in ("logprobs", "all"):
                logprobs_from_logits(logits, labels, t)
                logprobs_from_logits(logits, labels)
            if op in ("entropy", "all"):
                entropy_from_logits(logits, t)
            if op in ("kl", "all"):
                kl_from_logits(logits, ref, t)
            if op == "scoring":  # as score_experience calls them (the same calls before the slicing)
                held = as_response_logits(logits)
                if hasattr(fwd, "scoring_stats"):  # one pass over both models' logits
                    fwd.scoring_stats(held, as_response_logits(ref), labels)
                else:
                    from ppomax.ppo.scoring import exact_kl

                    fwd.logprobs(held, labels)
                    fwd.logprobs(held, labels, raw=True)
                    fwd.entropy(held)
                    exact_kl(fwd, held, as_response_logits(ref))
    if cuda:
        torch.cuda.synchronize()
    seconds = clock() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    kernel = {"system_s": after.ru_stime - usage.ru_stime, "minor_faults": after.ru_minflt - usage.ru_minflt}
    peak = torch.cuda.max_memory_allocated() if cuda else peak_rss()
    return {"extra_peak_mib": (peak - base) / MIB, "inputs_mib": base / MIB, "seconds": seconds, **kernel}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--positions", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda: peak allocated GPU memory, wall seconds")
    ap.add_argument("--grad", action="store_true", help="the update's forward + backward instead")
    ap.add_argument("--ops", nargs="+", default=None, help="logprobs entropy kl all (--grad: logprobs all)")
    ap.add_argument(
        "--before",
        metavar="SRC",
        help="also run the scoring calls with ppomax from SRC (e.g. a checkout's src)",
    )
    ap.add_argument("--one", nargs=2, metavar=("MODE", "OP"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    shape = (args.rows, args.positions, args.vocab, args.dtype, args.device)
    if args.one:
        print(json.dumps(measure(*shape, args.one[0], args.one[1], args.grad)))
        return 0
    ops = args.ops or (["logprobs", "all"] if args.grad else ["logprobs", "entropy", "kl", "all", "scoring"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PPOMAX_THREADS": "1"}
    print(
        f"{args.rows} rows x {args.positions} positions x {args.vocab} vocabulary, {args.dtype} logits"
        f"{', with gradient' if args.grad else ', no gradient'}"
    )
    cpu = args.device == "cpu"
    memory, seconds = ("peak RSS", "CPU s (1 thread)") if cpu else ("peak allocated", "wall s")
    print(
        f"| reductions | mode | {memory} above inputs (MiB) | {seconds} | of them system s | minor page faults |"
    )
    print("|---|---|---|---|---|---|")
    for op in ops:
        runs = [("whole", env), ("sliced", env)]
        if args.before and (op == "scoring" or args.grad):
            runs.insert(0, ("before", {**env, "PYTHONPATH": args.before}))
        for mode, run_env in runs:
            cmd = [sys.executable, __file__, *(argv or sys.argv[1:]), "--one", mode, op]
            out = subprocess.run(cmd, env=run_env, check=True, capture_output=True, text=True).stdout
            r = json.loads(out.splitlines()[-1])
            print(
                f"| {op} | {mode} | {r['extra_peak_mib']:.0f} | {r['seconds']:.3f} | {r['system_s']:.2f} | "
                f"{r['minor_faults']} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
