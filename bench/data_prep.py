"""How long `ppomax train-rm` takes to prepare its data: real HH-RLHF pairs read, rendered in a chat template and
tokenised, with ``data.num_proc`` processes.

    .venv/bin/python bench/data_prep.py [--pairs 20000] [--num-proc 1,2] [--model DIR] [--baseline]

Repeats the 2,312 pairs of ../shared/data/hh-rlhf-harmless-test.jsonl.gz (relative to the repository root) up to
``--pairs`` records in a temporary .jsonl, then prepares them as ``train-rm`` does (``data.max_prompt_tokens`` and
``data.max_response_tokens`` 256, the chat template of SmolLM2-135M-Instruct, built by ``bench/real_model.py``),
once per ``--num-proc`` value. Prints, per run, the wall time, the CPU time of this process and of its workers, and
a hash of the features (the same for every num_proc). ``--baseline`` times the older path instead (the loader, then
``tokenize_pair`` on each pair: API every version has), to compare checkouts (``PYTHONPATH=.../src``). Tokenizers
run with one thread (RAYON_NUM_THREADS=1); wall times mean something only on a quiet machine.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "hh-rlhf-harmless-test.jsonl.gz"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model directory (default: bench/real_model.py's)")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--pairs", type=int, default=20000)
    ap.add_argument("--num-proc", default="1,2", help="comma-separated values of data.num_proc")
    ap.add_argument("--baseline", action="store_true", help="time the loader + tokenize_pair path instead")
    args = ap.parse_args()
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from ppomax.models import load_tokenizer

    if args.model is None:
        sys.path.insert(0, str(REPO / "bench"))
        from real_model import real_model_dir

        args.model = str(real_model_dir())
    tok = load_tokenizer(args.model)
    with gzip.open(args.data, "rt", encoding="utf-8") as fh:
        lines = [line for line in fh if line.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pairs.jsonl"
        path.write_text("".join(lines[i % len(lines)] for i in range(args.pairs)), encoding="utf-8")
        for n in [1] if args.baseline else [int(v) for v in args.num_proc.split(",")]:
            wall, cpu, children = time.perf_counter(), time.process_time(), _children_cpu()
            feats, summary = _baseline(path, tok) if args.baseline else _prepare(path, tok, n)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            digest = hashlib.sha256(json.dumps(feats).encode()).hexdigest()[:12]
            what = "loader + tokenize_pair" if args.baseline else f"num_proc={n}"
            print(
                f"{what}: {len(feats)} pairs, wall {wall:.1f} s, cpu {cpu:.1f} s here + "
                f"{_children_cpu() - children:.1f} s in workers, features {digest}; {summary}"
            )
    return 0


def _prepare(path: Path, tok, num_proc: int):
    from ppomax.data import LoadStats, pair_features

    stats = LoadStats()
    feats = pair_features(
        path,
        tok,
        format="chat_template",
        max_prompt_tokens=256,
        max_response_tokens=256,
        on_error="skip",
        stats=stats,
        num_proc=num_proc,
    )
    return feats, stats.summary()


def _baseline(path: Path, tok):
    from ppomax.data import LoadStats, load_preference_pairs, tokenize_pair

    stats = LoadStats()
    pairs = load_preference_pairs(path, "skip", stats, format="chat_template", tokenizer=tok)
    return [tokenize_pair(tok, p, 256, 256, stats) for p in pairs], stats.summary()


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


if __name__ == "__main__":
    sys.exit(main())
