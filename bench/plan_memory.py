"""Check ``ppomax plan``'s numbers against measured host memory on CPU: a random Llama of ~20M parameters is built
from a config, saved and loaded back (nothing downloaded), then each phase runs in a fresh process that measures
its resident-set growth (Linux: VmRSS and the peak VmHWM of /proc/self/status, the peak reset through
/proc/self/clear_refs before each phase):

* load: the weights (plan: weights);
* one SFT-style forward/backward: peak growth = activations + gradients (plan: activations + grads), and what
  stays afterwards = the gradients;
* one AdamW step (ppomax.optim.build_optimizer): what stays = the optimiser states (plan: optim);
* one PPO-style policy forward/backward (logits of the R + 1 last positions, temperature-scaled log-probs):
  peak growth = activations + gradients;
* one generate() of a rollout batch: peak growth = KV cache + prefill working set (plan: kv cache).

    python bench/plan_memory.py                  # fp32, defaults below; prints a markdown table
    python bench/plan_memory.py --json out.json

CPU memory is what a CPU run needs; on a GPU the same components hold (the caching allocator adds its own
rounding and fragmentation on top).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

MIB = 1024**2


def _status() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: VmHWM := VmRSS


def _phase(fn) -> dict[str, int]:
    """Run ``fn``; resident growth at its peak and after it, in bytes."""
    import gc

    gc.collect()
    _reset_peak()
    before = _status()["VmRSS"]
    keep = fn()
    gc.collect()
    after = _status()
    return {"peak": after["VmHWM"] - before, "kept": after["VmRSS"] - before, "_keep": keep}


def _freed(fn) -> int:
    """Resident bytes returned to the system by ``fn`` (which releases something)."""
    import gc

    gc.collect()
    before = _status()["VmRSS"]
    fn()
    gc.collect()
    return before - _status()["VmRSS"]


def child(model_dir: str, mode: str, args: argparse.Namespace) -> dict[str, int]:
    """One measurement in this (fresh) process. Components that persist (weights, gradients, AdamW states) are
    measured as what their release gives back, so that one-time costs (the first call of a kernel, allocator
    and thread-pool buffers) do not count; transients as the peak growth of their phase."""
    import torch

    from ppomax.algos import lm_nll, logprobs_from_logits
    from ppomax.config import OptimConfig
    from ppomax.models import load_causal_lm
    from ppomax.optim import build_optimizer

    torch.set_num_threads(1)
    torch.manual_seed(0)
    res: dict[str, int] = {}

    def load_and_touch():
        m = load_causal_lm(model_dir)
        for p in m.parameters():  # safetensors weights are mapped lazily: fault every page in
            p.detach().sum()
        return m

    load_and_touch()  # the first load imports and sets up what later loads reuse
    load = _phase(load_and_touch)
    model = load.pop("_keep")
    res["load"] = load["kept"]
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (args.batch, args.prompt + args.response))

    def sft_step():
        logits = model(input_ids=ids, use_cache=False).logits
        lm_nll(logits[:, :-1], ids[:, 1:], torch.ones_like(ids[:, 1:], dtype=torch.bool)).backward()

    if mode == "train":
        sft_step()  # one-time costs of the first forward/backward of this shape
        model.zero_grad(set_to_none=True)
        res["sft_fwd_bwd_peak"] = _phase(sft_step)["peak"]
        res["grads"] = _freed(lambda: model.zero_grad(set_to_none=True))
        sft_step()
        opt = build_optimizer(model.parameters(), 1e-4, OptimConfig())
        opt.step()
        res["adam"] = _freed(opt.state.clear)
        opt.step()  # states again, and the gradients kept: the next phase's growth is its activations

        def ppo_step():
            r = args.response
            logits = model(input_ids=ids, use_cache=False, logits_to_keep=r + 1).logits[:, :-1]
            lp = logprobs_from_logits(logits, ids[:, -r:], temperature=0.8)
            (-lp.mean()).backward()

        ppo_step()
        res["ppo_fwd_bwd_peak"] = _phase(ppo_step)["peak"]
    elif mode == "generate":
        prompts = torch.randint(3, vocab, (args.rollout, args.prompt))

        def gen():
            with torch.no_grad():
                model.generate(
                    prompts,
                    attention_mask=torch.ones_like(prompts),
                    max_new_tokens=args.response,
                    min_new_tokens=args.response,
                    do_sample=True,
                    pad_token_id=0,
                )

        gen()  # one-time costs
        res["generate_peak"] = _phase(gen)["peak"]
    return res


def build_model(out: Path, args: argparse.Namespace) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads or args.heads,
        max_position_embeddings=args.prompt + args.response,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    return out


def planned(model_dir: Path, args: argparse.Namespace) -> dict[str, int]:
    """The plan's DDP numbers for the same model and batch shapes (SFT for the first backward, PPO for the
    policy's; fp32)."""
    from ppomax.commands.plan import _meta_model, shape_of
    from ppomax.plan import Workload, generation_bytes, state_bytes, train_activation_bytes

    s = shape_of(_meta_model(str(model_dir), False))
    seq = args.prompt + args.response
    states = state_bytes(s.params, s.params, "float32")
    sft = Workload("sft", "float32", False, args.batch, seq, seq - 1)
    ppo = Workload("ppo", "float32", False, args.batch, seq, args.response + 1, temperature_scaled=True)
    return {
        "params": s.params,
        "load": states["weights"],
        "grads": states["grads"],
        "adam": states["optim"],
        "sft_fwd_bwd_peak": train_activation_bytes(s, sft, True) + states["grads"],
        "ppo_fwd_bwd_peak": train_activation_bytes(s, ppo, True),  # gradients already allocated
        "generate_peak": generation_bytes(s, args.rollout, args.prompt, args.response, 4),
    }


ROWS = (
    ("load", "weights (load)"),
    ("grads", "gradients (freed by zero_grad)"),
    ("adam", "AdamW states (freed with the optimiser state)"),
    ("sft_fwd_bwd_peak", "SFT forward+backward peak (activations + grads)"),
    ("ppo_fwd_bwd_peak", "PPO policy forward+backward peak (activations)"),
    ("generate_peak", "generate() peak (KV cache + prefill)"),
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--intermediate", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--kv-heads", type=int, default=None, help="grouped-query attention (default: --heads)")
    ap.add_argument("--vocab", type=int, default=16000)
    ap.add_argument("--batch", type=int, default=4, help="training rows")
    ap.add_argument("--rollout", type=int, default=16, help="generation rows")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--response", type=int, default=128)
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--child", nargs=2, metavar=("MODEL_DIR", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp) / "llama", args)
        measured: dict[str, int] = {}
        # a fixed mmap threshold: every tensor of 128 KiB or more gets its own mapping, returned to the system
        # when freed, so that the resident set follows the live tensors (glibc would otherwise keep freed
        # activations in its heap and hand them to the next phase)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
        for mode in ("train", "generate"):
            cmd = [sys.executable, __file__, *(argv or sys.argv[1:]), "--child", str(model_dir), mode]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            if proc.returncode:
                sys.stderr.write(proc.stderr)
                return proc.returncode
            measured.update(json.loads(proc.stdout.strip().splitlines()[-1]))
        plan = planned(model_dir, args)
    print(
        f"Llama {plan['params']:,} params (hidden {args.hidden}, {args.layers} layers, {args.heads} heads, "
        f"{args.kv_heads or args.heads} kv heads, vocab {args.vocab}), fp32"
    )
    print(
        f"train batch {args.batch} x {args.prompt + args.response} tokens, "
        f"rollout {args.rollout} x ({args.prompt} + {args.response})\n"
    )
    print("| component | plan (MiB) | measured (MiB) | measured / plan |")
    print("|---|---:|---:|---:|")
    for key, title in ROWS:
        p, m = plan[key], measured[key]
        ratio = f"{m / p:.2f}" if p else "-"
        print(f"| {title} | {p / MIB:.1f} | {m / MIB:.1f} | {ratio} |")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"plan": plan, "measured": measured, "args": vars(args)}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
