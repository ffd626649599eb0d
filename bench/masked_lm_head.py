"""CPU time and peak RSS of SFT and reward-model training steps on the real model, where the LM head runs on the
trained tokens' positions only (SFT's NLL, eq. 2's LM term on the chosen answer): this checkout against an older
one (``--before OLD/src``), A/B alternated, each run a fresh process with one thread.

    python bench/masked_lm_head.py --loss sft --rows 8 --steps 2 --rounds 2 --before /path/to/older/checkout/src
    python bench/masked_lm_head.py --loss rm --rows 4 --steps 2 --rounds 2 --before /path/to/older/checkout/src

The model is SmolLM2-135M-Instruct (``bench/real_model.py``), the data HH-RLHF harmless pairs beside the repository
(SFT: each chosen dialogue's last answer after its prompt; the reward model: the pairs, prompts 256 and answers 128
tokens), bf16 autocast over float32 weights as ``model.dtype: bfloat16`` runs, AdamW. Each step's loss is printed:
both versions must print the same.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"


def measure(loss: str, rows: int, steps: int) -> dict[str, object]:
    """In this process: ``steps`` training steps of ``rows`` examples (pairs for the reward model)."""
    import torch

    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ppomax.data import PreferenceCollator, SFTCollator, load_preference_pairs, pad_id_of, tokenize_pair
    from ppomax.data.tokenize import SFTExample, tokenize_sft

    sys.path.insert(0, str(HERE))
    from real_model import HH_HARMLESS, real_model_dir

    model_dir = real_model_dir()
    tok = AutoTokenizer.from_pretrained(model_dir)
    with gzip.open(HH_HARMLESS, "rt", encoding="utf-8") as fh:
        records = [json.loads(line) for line in fh if line.strip()]
    random.Random(0).shuffle(records)
    if loss == "sft":
        from ppomax.trainers.sft import sft_loss as loss_fn

        marker = "\n\nAssistant:"
        feats = []
        for r in records:
            cut = r["chosen"].rfind(marker) + len(marker)
            if cut >= len(marker):
                feats.append(tokenize_sft(tok, SFTExample(r["chosen"][:cut], r["chosen"][cut:]), 256, 128))
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        collate = SFTCollator(pad_id_of(tok))
    else:
        from ppomax.models import ValueHeadModel
        from ppomax.trainers.reward_model import make_rm_loss

        path = Path(tempfile.mkdtemp()) / "pairs.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records[: rows * steps + 20]), encoding="utf-8")
        feats = [tokenize_pair(tok, p, 256, 128) for p in load_preference_pairs(path, on_error="skip")]
        model = ValueHeadModel.from_causal_lm(str(model_dir), seed=0)
        collate = PreferenceCollator(pad_id_of(tok))
        loss_fn = make_rm_loss(1.0, 1.0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    losses = []
    t0 = time.process_time()
    for s in range(steps):
        batch = collate(feats[s * rows : (s + 1) * rows])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            value = loss_fn(model, batch)[0]
        value.backward()
        opt.step()
        opt.zero_grad()
        losses.append(round(value.item(), 5))
    return {
        "cpu_s": round(time.process_time() - t0, 1),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "losses": losses,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--loss", choices=("sft", "rm"), default="sft")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="A/B pairs, alternated")
    ap.add_argument("--before", help="an older checkout's src directory to compare with")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.loss, args.rows, args.steps)))
        return 0
    versions = {"this": str(SRC), **({"before": args.before} if args.before else {})}
    results: dict[str, list[dict[str, object]]] = {name: [] for name in versions}
    for _ in range(args.rounds):
        for name, src in versions.items():
            env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1"}
            cmd = [sys.executable, __file__, "--child", "--loss", args.loss]
            cmd += ["--rows", str(args.rows), "--steps", str(args.steps)]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            results[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(name, results[name][-1], flush=True)
    for name, runs in results.items():
        cpu = statistics.median(float(str(r["cpu_s"])) for r in runs)
        rss = statistics.median(float(str(r["peak_rss_gib"])) for r in runs)
        print(f"{name}: median CPU {cpu:.1f} s, median peak RSS {rss:.2f} GiB, losses {runs[0]['losses']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
