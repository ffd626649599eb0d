"""How prompts are cut to ``data.max_prompt_tokens`` on a real chat model and real HH-RLHF pairs (tokenisation only).

    .venv/bin/python bench/prompt_truncation.py [--model DIR] [--pairs 1200] [--max-prompt-tokens 96] [--show 3]

Loads the first ``--pairs`` HH-RLHF pairs of ../shared/data/hh-rlhf-harmless-test.jsonl.gz (relative to the
repository root) in the ``chat_template`` format of the model's tokenizer (SmolLM2-135M-Instruct by default, built
by ``bench/real_model.py``), tokenises them as ``ppomax train-rm`` does (``tokenize_pair``) and prints the load
statistics (how many prompts were cut, and how), how many of the cut prompts would fit as [system turn + latest
user turn] (an independent count from the template itself), and the first ``--show`` cut prompts decoded.
Uses only API that older versions have too, so the same command measures any checkout (``PYTHONPATH=.../src``).
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "hh-rlhf-harmless-test.jsonl.gz"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model directory (default: bench/real_model.py's)")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--pairs", type=int, default=1200)
    ap.add_argument("--max-prompt-tokens", type=int, default=96)
    ap.add_argument("--show", type=int, default=3)
    args = ap.parse_args()

    from ppomax.data import LoadStats, encode, load_preference_pairs, parse_hh, tokenize_pair
    from ppomax.models import load_tokenizer

    if args.model is None:
        sys.path.insert(0, str(REPO / "bench"))
        from real_model import real_model_dir

        args.model = str(real_model_dir())
    tok = load_tokenizer(args.model)
    with gzip.open(args.data, "rt", encoding="utf-8") as fh:
        lines = [line for _, line in zip(range(args.pairs), fh, strict=False)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pairs.jsonl"
        path.write_text("".join(lines), encoding="utf-8")
        stats = LoadStats()
        pairs = load_preference_pairs(path, "skip", stats, format="chat_template", tokenizer=tok)
    cut, fits_as_last_turn, shown = 0, 0, []
    for pair in pairs:
        line = lines[int(pair.where.rsplit(":", 1)[1]) - 1]
        ids = tokenize_pair(tok, pair, args.max_prompt_tokens, None, stats)["prompt_ids"]
        if len(ids) == len(encode(tok, pair.prompt)):
            continue
        cut += 1
        # independent of ppomax's truncation: the template's rendering of the latest human turn alone
        human = [c for r, c in parse_hh(json.loads(line)["chosen"]) if r == "user"][-1]
        last = tok.apply_chat_template(
            [{"role": "user", "content": human}], tokenize=False, add_generation_prompt=True
        )
        fits_as_last_turn += len(encode(tok, last)) <= args.max_prompt_tokens
        if len(shown) < args.show:
            shown.append(tok.decode(ids))
    print(f"model {args.model}; {len(pairs)} pairs; max_prompt_tokens {args.max_prompt_tokens}")
    print(f"stats: {stats.summary()}")
    print(f"prompts cut: {cut}; of them, [system + latest user turn] fits the budget: {fits_as_last_turn}")
    for k, text in enumerate(shown, start=1):
        print(f"--- cut prompt {k} ({len(encode(tok, text))} tokens) ---\n{text}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
