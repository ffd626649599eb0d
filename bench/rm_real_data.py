"""Reward model on real HH-RLHF data, measured: train and held-out accuracy, tokens/s.

    .venv/bin/python bench/rm_real_data.py [--out DIR] [--epochs 2] [--sft-epochs 0] [--hidden 64] [--layers 2]

Steps (all on CPU, a few minutes on 2 cores):
1. Split ../shared/data/hh-rlhf-harmless-test.jsonl.gz (2,312 pairs, relative to the repository root) into train
   and held-out pairs with a fixed seed.
2. Train a byte-level BPE tokenizer (``ppomax.demo.tokenizer``) on the train split's dialogues only.
3. Build a tiny Llama (``LlamaConfig``, random weights; its size is printed) and, optionally, pretrain it on the
   train split's chosen dialogues (``train_sft`` with ``objective: pretrain``).
4. Train the RM with ``train_rm`` (eq. 2, beta_rm = 1 by default), then score the train and held-out pairs.

Prints a JSON summary (also written to ``DIR/summary.json``). The RM starts from a model that has seen only
these ~2k dialogues, so held-out accuracy near chance is expected; train accuracy shows that the pipeline learns.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "hh-rlhf-harmless-test.jsonl.gz"


def build_tokenizer(texts: list[str], out: Path, vocab_size: int) -> Path:
    from ppomax.demo.tokenizer import train_bpe_tokenizer

    train_bpe_tokenizer(texts, vocab_size).save_pretrained(out)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="/tmp/ppomax-bench-rm")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--heldout", type=int, default=312, help="held-out pairs (the rest trains)")
    ap.add_argument("--vocab", type=int, default=2000)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument(
        "--sft-epochs", type=float, default=0.0, help="pretrain on chosen dialogues first (0 = skip)"
    )
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--beta-rm", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument(
        "--max-tokens-per-batch", type=int, default=0, help="token-balanced batches (0 = fixed size)"
    )
    ap.add_argument("--max-prompt-tokens", type=int, default=96)
    ap.add_argument("--max-response-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from ppomax.config import RMConfig, SFTConfig
    from ppomax.data import PreferenceCollator, load_preference_pairs, pad_id_of, tokenize_pair
    from ppomax.models import ValueHeadModel, load_tokenizer
    from ppomax.monitor import read_metrics
    from ppomax.trainers import train_rm, train_sft
    from ppomax.trainers.reward_model_report import margin_summary

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    with gzip.open(args.data, "rt", encoding="utf-8") as fh:
        records = [json.loads(line) for line in fh if line.strip()]
    random.Random(args.seed).shuffle(records)
    held, train = records[: args.heldout], records[args.heldout :]
    for name, recs in (("train", train), ("heldout", held)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")

    base = out / "base"
    build_tokenizer([r["chosen"] for r in train] + [r["rejected"] for r in train], base, args.vocab)
    tok = load_tokenizer(base)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(base)
    print(
        f"tiny Llama: {n_params:,} parameters (hidden {args.hidden}, {args.layers} layers, vocab {len(tok)})"
    )

    policy = base
    sft_seconds = 0.0
    if args.sft_epochs > 0:
        (out / "pretrain.jsonl").write_text(
            "".join(json.dumps({"text": r["chosen"]}) + "\n" for r in train), encoding="utf-8"
        )
        sft_cfg = SFTConfig.model_validate(
            {
                "seed": args.seed,
                "model": {"policy": str(base)},
                "data": {
                    "train": str(out / "pretrain.jsonl"),
                    "max_prompt_tokens": 128,
                    "max_response_tokens": 128,
                },
                "objective": "pretrain",
                "epochs": args.sft_epochs,
                "batch_size": 16,
                "optim": {"lr": 2e-3, "schedule": "cosine", "warmup_ratio": 0.05},
                "logging": {"out_dir": str(out / "sft"), "log_every": 10},
            }
        )
        t = time.perf_counter()
        policy = train_sft(sft_cfg)
        sft_seconds = time.perf_counter() - t

    rm_cfg = RMConfig.model_validate(
        {
            "seed": args.seed,
            "model": {"policy": str(policy)},
            "data": {
                "train": str(out / "train.jsonl"),
                "valid": str(out / "heldout.jsonl"),
                "max_prompt_tokens": args.max_prompt_tokens,
                "max_response_tokens": args.max_response_tokens,
                "on_bad_line": "skip",  # the sample has a few pairs with an empty response
            },
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "max_tokens_per_batch": args.max_tokens_per_batch or None,
            "beta_rm": args.beta_rm,
            "optim": {"lr": args.lr, "warmup_ratio": 0.1, "schedule": "cosine"},
            "logging": {"out_dir": str(out / "rm"), "log_every": 10, "eval_every": 0},
        }
    )
    t = time.perf_counter()
    final = train_rm(rm_cfg)
    rm_seconds = time.perf_counter() - t

    # accuracy of the final RM on the train pairs and the held-out pairs, scored the same way
    rm = ValueHeadModel.from_pretrained(final).eval()
    collate = PreferenceCollator(pad_id_of(tok))

    def accuracy(path: Path) -> dict[str, float]:
        feats = [
            tokenize_pair(tok, p, args.max_prompt_tokens, args.max_response_tokens)
            for p in load_preference_pairs(path, on_error="skip")
        ]
        margins: list[float] = []
        with torch.no_grad():
            for i in range(0, len(feats), 32):
                b = collate(feats[i : i + 32])
                s = rm.score(b["input_ids"], b["attention_mask"])
                n = b["num_pairs"]
                margins += (s[:n] - s[n:]).tolist()
        return margin_summary(margins)

    def longer_wins(path: Path) -> float:
        """Baseline without any model: the longer response (in characters) is the preferred one."""
        pairs = load_preference_pairs(path, on_error="skip")
        return sum(len(p.chosen) > len(p.rejected) for p in pairs) / len(pairs)

    records_rm = read_metrics(out / "rm" / "metrics.jsonl")
    tps = [r["train/tokens_per_s"] for r in records_rm if "train/tokens_per_s" in r]
    summary = {
        "data": str(args.data),
        "train_pairs": len(train),
        "heldout_pairs": len(held),
        "model_params": n_params,
        "hidden": args.hidden,
        "layers": args.layers,
        "vocab": len(tok),
        "sft_epochs": args.sft_epochs,
        "rm_epochs": args.epochs,
        "beta_rm": args.beta_rm,
        "rm_steps": max(r["step"] for r in records_rm),
        "train": accuracy(out / "train.jsonl"),
        "heldout": accuracy(out / "heldout.jsonl"),
        "longer_wins_baseline": {
            "train": longer_wins(out / "train.jsonl"),
            "heldout": longer_wins(out / "heldout.jsonl"),
        },
        "rm_train_tokens_per_s_mean": sum(tps) / len(tps) if tps else None,
        "rm_seconds": round(rm_seconds, 1),
        "sft_seconds": round(sft_seconds, 1),
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "threads": args.threads,
        "command": " ".join(sys.argv),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
