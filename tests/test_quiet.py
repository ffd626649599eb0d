"""A command prints ppomax's lines and real warnings, not the libraries' known-harmless notices: DeepSpeed's
accelerator guess (imported by accelerate even without DeepSpeed), accelerate's "Removed shared tensor" for tied
weights, transformers' deprecation FutureWarnings, PEFT's lookup of an adapter directory's config.

The commands run in a fresh interpreter: DeepSpeed speaks when it is first imported."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_lm import make_tiny_lm, write_jsonl, write_yaml

TESTS = Path(__file__).parent
NOISE = (
    "Setting accelerator to CPU",
    "Removed shared tensor",
    "FutureWarning",
    "Could not find a config file",
)
# after the commands: one warning of the user's own and one from accelerate's logger must still show
SCRIPT = """
import logging, sys, warnings
from ppomax.cli import main
codes = [main(args) for args in {commands!r}]
warnings.warn("a warning of the user's own", FutureWarning)
logging.getLogger("accelerate.utils.other").warning("another accelerate warning")
sys.exit(max(codes))
"""


@pytest.mark.slow
def test_commands_print_no_known_library_noise_but_real_warnings(tmp_path):
    records = [{"prompt": f"Say {w}.", "response": f"{w} {w}"} for w in ("one", "two", "six", "ten")]
    base = make_tiny_lm(tmp_path, [f"Say {r['prompt']} {r['response']}" for r in records], tie=True)
    sft = write_jsonl(tmp_path / "sft.jsonl", records)
    pairs = write_jsonl(
        tmp_path / "pairs.jsonl",
        [{"prompt": r["prompt"], "chosen": r["response"], "rejected": "no"} for r in records],
    )

    def run_config(name: str, policy: Path, data: Path, **extra) -> str:
        cfg = {
            "model": {"policy": str(policy), "gradient_checkpointing": True, **extra},
            "data": {"train": str(data)},
            "batch_size": 2,
            "epochs": 1,
            "logging": {"out_dir": str(tmp_path / name), "progress": False, "tensorboard": False},
        }
        return str(write_yaml(tmp_path / f"{name}.yaml", cfg))

    lora = {"lora": {"r": 2, "save_merged": True}}
    commands = [
        ["train-sft", "--config", run_config("sft", base, sft, **lora)],
        # adapters on an adapter directory (PEFT would look its config up)
        ["train-sft", "--config", run_config("sft2", tmp_path / "sft" / "final", sft, **lora)],
        ["train-rm", "--config", run_config("rm", base, pairs)],
    ]
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}  # as a user's shell has it
    env.update(PYTHONPATH=os.pathsep.join([str(TESTS.parent / "src"), str(TESTS)]), OMP_NUM_THREADS="1")
    env["PPOMAX_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(commands=commands)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert proc.stdout.splitlines() == [str(tmp_path / d / "final") for d in ("sft", "sft2", "rm")]
    noise = [line for line in output.splitlines() if any(n in line for n in NOISE)]
    assert len(noise) == 1 and "a warning of the user's own" in noise[0], noise
    assert "another accelerate warning" in proc.stderr
