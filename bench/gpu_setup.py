"""Models and prompts for bench/gpu_check.sh: a ~130M-parameter Llama (hidden 768, 12 layers, vocabulary 32000),
a value-head reward model on it and 512 prompts, built from scratch in the given directory (nothing downloaded)."""

from __future__ import annotations

import sys
from pathlib import Path

from _tiny import build  # bench/ is on sys.path when this file runs as a script

if __name__ == "__main__":
    root = Path(sys.argv[1])
    root.mkdir(parents=True, exist_ok=True)
    policy, rm, prompts, n_params = build(root, hidden=768, layers=12, vocab=32000, seed=0)
    print(f"{policy} ({n_params / 1e6:.0f}M parameters), {rm}, {prompts}")
