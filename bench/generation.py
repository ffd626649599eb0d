"""Generation of PPO rollouts with Hugging Face ``generate``: today's dynamic KV cache against a static cache and a
static cache with ``torch.compile`` (CPU inductor), on the same tiny Llama, prompts and sampling settings.

    .venv/bin/python bench/generation.py                       # 256x4 and 512x5 Llamas, fp32 and bf16, ~10 min
    .venv/bin/python bench/generation.py --sizes 256x4 --dtypes float32 --calls 4

Every call goes through ppomax's own engine (:class:`ppomax.ppo.rollout.HFGenerateEngine`: the ``ppo_max`` preset's
sampling, temperature 0.8, top-p 0.9, the response-only repetition penalty 1.1) with the HF generation config it
builds: ``dynamic`` (the default: ``DynamicCache``), ``static`` (the same plus ``cache_implementation="static"``)
and ``static+compile`` (``generation.compile: true``: a static cache and HF's ``CompileConfig``, which compiles the
decoding step's forward). bf16 is the trained policy's mixed precision as PPO runs it: float32 weights, each
forward wrapped in ``torch.autocast`` as accelerate wraps it, so every decode step casts the weights again. The
extra variant ``dynamic+call-autocast`` (``--variants dynamic,dynamic+call-autocast``) instead opens one autocast
region around each call, whose cast cache casts each weight once per call (not what the trainer does: the cache
would hold a bf16 copy of the policy through generation). As in PPO, successive calls get prompt batches of
different widths (left-padded to the longest prompt of the batch), so a compiled variant recompiles or reuses
graphs as a real run would. Each variant runs in its own fresh process with one torch thread and an empty
inductor cache; the first ``--warmup`` calls (a cold compilation included) are timed separately, then ``--calls``
timed calls; medians. Processes alternate variants over ``--rounds``. Response tokens are counted up to and
including the first EOS (``finish_rollout``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
VARIANTS = ("dynamic", "static", "static+compile")


def worker(a: argparse.Namespace) -> dict[str, Any]:
    """One variant in this process: ``--warmup`` + ``--calls`` generate calls; per call wall and CPU seconds."""
    import torch

    torch.set_num_threads(a.threads)
    sys.path.insert(0, str(REPO / "src"))

    from ppomax.config import GenerationConfig as PPOGeneration
    from ppomax.data import pad_left, tokenize_prompt
    from ppomax.models import load_causal_lm, load_tokenizer
    from ppomax.ppo.rollout import HFGenerateEngine, eos_ids_of, finish_rollout

    spec = json.loads(Path(a.spec).read_text())
    tok = load_tokenizer(spec["policy"])
    # as ppomax loads a trained policy (its attention choice included)
    model = load_causal_lm(spec["policy"]).eval()
    # the defaults are PPO-max's sampling; static+compile is ppomax's generation.compile
    gen = PPOGeneration(max_new_tokens=a.new_tokens, compile=a.variant == "static+compile")
    engine = HFGenerateEngine(gen, eos_ids_of(tok, model), tok.pad_token_id)
    if a.variant == "static":  # the static cache alone, not an option of ppomax's (it loses)
        base_config = engine.generation_config

        def static(greedy: bool, device_type: str = "cpu") -> Any:
            c = base_config(greedy, device_type)
            c.cache_implementation = "static"
            return c

        engine.generation_config = static  # type: ignore[method-assign]
    rng = random.Random(a.seed)
    prompts = spec["prompts"]
    rows = []
    bf16 = a.dtype == "bfloat16"
    per_call = bf16 and a.variant == "dynamic+call-autocast"
    if bf16 and not per_call:  # accelerate's wrapping of a trained model's forward, as the trainer generates
        model.forward = torch.autocast("cpu", dtype=torch.bfloat16)(model.forward)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=per_call)
    torch.manual_seed(a.seed)
    for _ in range(a.warmup + a.calls):
        ids, mask = pad_left(
            [tokenize_prompt(tok, p, None) for p in rng.sample(prompts, a.batch)], engine.pad_id
        )
        w0, c0 = time.perf_counter(), time.process_time()
        with autocast:
            out = engine.generate(model, ids, mask)
        w1, c1 = time.perf_counter(), time.process_time()
        lens = finish_rollout(ids, mask, out, engine.eos_ids, engine.pad_id)[4]
        rows.append({"wall": w1 - w0, "cpu": c1 - c0, "tokens": int(lens.sum())})
    return {"rows": rows}


def build(root: Path, hidden: int, layers: int, vocab: int, seed: int) -> dict[str, Any]:
    sys.path.insert(0, str(REPO / "src"))
    from _tiny import build as build_tiny

    policy, _rm, prompts, n_params = build_tiny(root, hidden, layers, vocab, seed)
    texts = [json.loads(line)["prompt"] for line in prompts.read_text().splitlines()]
    return {"policy": str(policy), "prompts": texts, "n_params": n_params}


def run_variant(spec_path: Path, variant: str, dtype: str, a: argparse.Namespace) -> dict[str, Any]:
    out = spec_path.with_name(f"gen-{variant}-{dtype}.json".replace("+", "_"))
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        variant,
        "--spec",
        str(spec_path),
        "--out",
        str(out),
        f"--dtype={dtype}",
        f"--batch={a.batch}",
        f"--new-tokens={a.new_tokens}",
        f"--calls={a.calls}",
        f"--warmup={a.warmup}",
        f"--threads={a.threads}",
        f"--seed={a.seed}",
    ]
    # a fresh inductor cache per process: the first calls' time is a cold compilation, as a new run's would be
    inductor = spec_path.with_name(f"inductor-{variant}-{dtype}-{time.monotonic_ns()}".replace("+", "_"))
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(a.threads),
        "TOKENIZERS_PARALLELISM": "false",
        "TORCHINDUCTOR_CACHE_DIR": str(inductor),
    }
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="256x4,512x5", help="comma-separated HIDDENxLAYERS tiny Llamas")
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--calls", type=int, default=5, help="timed generate calls per process")
    ap.add_argument("--warmup", type=int, default=2, help="untimed first calls (compilation happens here)")
    ap.add_argument("--rounds", type=int, default=2, help="processes per variant, alternating the order")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        a.variant = a.worker
        Path(a.out).write_text(json.dumps(worker(a)))
        return 0

    variants = a.variants.split(",")
    print(
        "| model (params) | dtype | cache | first calls s (compile) | s / call | tok/s | CPU s / call | vs dynamic |"
    )
    print("|---|---|---|---|---|---|---|---|")
    t_start = time.perf_counter()
    for size in a.sizes.split(","):
        hidden, layers = (int(x) for x in size.split("x"))
        with tempfile.TemporaryDirectory() as tmp:
            spec = build(Path(tmp), hidden, layers, a.vocab, a.seed)
            spec_path = Path(tmp) / "spec.json"
            spec_path.write_text(json.dumps(spec))
            for dtype in a.dtypes.split(","):
                got: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
                for r in range(a.rounds):
                    for v in variants if r % 2 == 0 else variants[::-1]:
                        got[v].append(run_variant(spec_path, v, dtype, a))
                base = None
                for v in variants:
                    errors = [g["error"] for g in got[v] if "error" in g]
                    if errors:
                        print(f"| {size} | {dtype} | {v} | failed: {errors[0]} | | | | |")
                        continue
                    first = [row["wall"] for g in got[v] for row in g["rows"][: a.warmup]]
                    timed = [row for g in got[v] for row in g["rows"][a.warmup :]]
                    wall = statistics.median(r["wall"] for r in timed)
                    cpu = statistics.median(r["cpu"] for r in timed)
                    tok_s = statistics.median(r["tokens"] / r["wall"] for r in timed)
                    base = wall if v == "dynamic" else base
                    rel = f"{base / wall:.2f}x" if base else ""
                    print(
                        f"| Llama {size} ({spec['n_params'] / 1e6:.2f}M) | {dtype} | {v} | "
                        f"{statistics.median(first):.2f} | {wall:.3f} | {tok_s:.0f} | {cpu:.3f} | {rel} |",
                        flush=True,
                    )
    cmd = " ".join([".venv/bin/python", "bench/generation.py", *(argv if argv is not None else sys.argv[1:])])
    print(
        f"\nCommand: `{cmd}`; batch {a.batch}, max_new_tokens {a.new_tokens}, {a.threads} torch thread(s), "
        f"{a.rounds} processes x {a.calls} timed calls after {a.warmup} per variant; date "
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}; total {time.perf_counter() - t_start:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
