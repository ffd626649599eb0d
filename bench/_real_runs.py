"""ppomax commands on the real model (SmolLM2-135M-Instruct, bench/real_model.py) and the real HH-RLHF harmless
data (../shared/data), each run through the CLI in a fresh process that reports its peak resident set and CPU
time: the shared part of bench/lora_memory.py and bench/plan_real.py.

    python bench/_real_runs.py train-ppo --set ...     # one run in this process: prints {rc, peak, user_s, sys_s}
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
HH = REPO.parent / "shared" / "data" / "hh-rlhf-harmless-test.jsonl.gz"
GIB = 1024**3
GLIBC_HEAP = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20)}
"""glibc's largest dynamic mmap threshold, fixed: tensors below 32 MiB come from (and stay in) its heap, as
without ppomax.allocator once the dynamic threshold has grown (the comparison of ``--glibc-heap``)."""


@dataclass
class PPOShape:
    rollout: int = 8
    buffer: int = 8
    new_tokens: int = 32
    iterations: int = 2


def real_inputs(tmp: Path) -> tuple[Path, Path]:
    """(the real model's directory, a reward model on it: a fresh value head, saved in ``tmp``)."""
    sys.path.insert(0, str(BENCH))
    from real_model import RealModelUnavailable, real_model_dir

    if not HH.exists():
        sys.exit(f"real data not found: {HH}")
    try:
        model = real_model_dir()
    except RealModelUnavailable as exc:
        sys.exit(f"real model unavailable: {exc}")
    rm = tmp / "rm"
    subprocess.run(
        [sys.executable, "-c", _MAKE_RM, str(model), str(rm)], check=True, env=_env(), capture_output=True
    )
    return model, rm


def ppo_args(model: Path, rm: Path, out: Path, shape: PPOShape, preset: str, lora: bool) -> list[str]:
    """``train-ppo`` on the HH prompts: minibatch = rollout batch; a buffer of one rollout is one fused update."""
    over = [
        f"model.policy={model}",
        f"model.reward={rm}",
        f"data.prompts={HH}",
        f"ppo.rollout_batch_size={shape.rollout}",
        f"ppo.buffer_size={shape.buffer}",
        f"ppo.minibatch_size={shape.rollout}",
        f"generation.max_new_tokens={shape.new_tokens}",
        f"ppo.iterations={shape.iterations}",
        "ppo.critic_pretrain_steps=0",
        "data.on_bad_line=skip",  # HH pairs whose shared prompt does not end with a human turn (line 1255: two
        # assistant turns in a row, a "Human:" without its blank line)
        *(["model.lora={r: 16}"] if lora else []),
        *_quiet(out),
    ]
    return ["train-ppo", "--preset", preset, *_sets(over)]


def rm_args(model: Path, out: Path, pairs: int, epochs: float, lora: bool) -> list[str]:
    """``train-rm`` on the HH pairs (beta_rm 1: the LM term on the chosen responses), at most 128 prompt and 64
    response tokens: lengths that most batches of the HH pairs fill (median prompt 92 tokens, 90th percentile
    258; responses 28 and 83), so that a few steps meet the full-length batch ``ppomax plan`` assumes."""
    over = [
        f"model.policy={model}",
        f"data.train={HH}",
        "data.max_prompt_tokens=128",
        "data.max_response_tokens=64",
        f"epochs={epochs}",
        f"batch_size={pairs}",
        "data.on_bad_line=skip",  # 9 of the 2,312 pairs (an empty chosen response, diverging dialogues)
        *(["model.lora={r: 16}"] if lora else []),
        *_quiet(out),
    ]
    return ["train-rm", *_sets(over)]


def _quiet(out: Path) -> list[str]:
    return [f"logging.out_dir={out}", "logging.tensorboard=false", "logging.progress=false"]


def _sets(overrides: list[str]) -> list[str]:
    return [x for o in overrides for x in ("--set", o)]


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    return {**env, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", **(extra or {})}


def measure(argv: list[str], env: dict[str, str] | None = None) -> dict:
    """Run ``ppomax argv`` in a fresh process; its peak RSS (bytes) and CPU seconds."""
    proc = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, env=_env(env))
    if proc.returncode:
        sys.exit(f"ppomax {' '.join(argv[:1])} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def planned(kind: str, argv: list[str]) -> dict:
    """``ppomax plan --json``'s ``cpu_run`` for the config of ``argv`` (a train command's arguments)."""
    cmd = [sys.executable, "-m", "ppomax", "plan", "--kind", kind, "--json", *argv[1:]]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=_env()).stdout
    return json.loads(out)["cpu_run"]


def _child(argv: list[str]) -> int:
    sys.path.insert(0, str(REPO / "src"))
    from ppomax.cli import main

    rc = main(["--threads", "1", *argv])
    ru = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"rc": rc, "peak": ru.ru_maxrss * 1024, "user_s": ru.ru_utime, "sys_s": ru.ru_stime}))
    return rc


_MAKE_RM = """
import sys
from transformers import AutoTokenizer
from ppomax.models import ValueHeadModel
ValueHeadModel.from_causal_lm(sys.argv[1]).save_pretrained(sys.argv[2])
AutoTokenizer.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2])
"""

if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
