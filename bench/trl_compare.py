"""ppomax's PPO next to Hugging Face TRL's (``trl.experimental.ppo``), in one run, on identical models and
settings, at the update schedules users run.

    .venv/bin/python bench/trl_compare.py        # 256x4 and 512x5 Llamas, fp32 and bf16, the three settings, 1 thread
    .venv/bin/python bench/trl_compare.py --sizes smollm2-135m --setting ppo_max_defaults --dtypes bfloat16
    .venv/bin/python bench/trl_compare.py --sizes 128x2 --setting one_epoch --rollout 16 --new-tokens 32

TRL is never installed into the project's virtualenv: the first run creates ``bench/.venv-trl`` with
``python3.11 -m venv`` and installs ``torch==2.13.0`` first (the local CPU wheel; a plain ``torch`` would pull a
CUDA build), then ``trl==1.12.*`` (or, if that cannot be installed, the newest 1.x; the table says which) with
transformers and accelerate pinned to this venv's versions. Later runs reuse it (``--reinstall`` rebuilds it).

Models (``--sizes``): tiny random Llamas ``HIDDENxLAYERS`` (heads of 32, MLP 4x) with a ``--vocab`` of 512 by
default, or a real model's shape by name with random weights (``smollm2-135m``: SmolLM2-135M-Instruct's 576 x
30 layers, 9 heads / 3 key-value heads, MLP 1536, 49,152 tokens, tied embeddings; bench/_tiny.py ``SHAPES``).

What is shared, built once here (bench/_tiny.py): the tokenizer, the random policy (also the reference), the
reward model (also the critic's initial weights, ``critic_init: reward_model`` on both sides; ppomax saves it as a
``LlamaForSequenceClassification``, which TRL loads as it is, checked to give the same scores), and the prompts:
token ids computed once by ppomax's prompt tokenizer, all prompts of the same length, so neither side pads them,
and more of them than the run takes (TRL steps its optimiser at every micro-batch of the iteration that takes
its dataset's last batch). Each side runs in its own fresh process with ``torch.set_num_threads(--threads)``:
ppomax with this interpreter, TRL with the one in ``bench/.venv-trl``.

The update schedule (bench/ppo_schedule.py), one per ``--setting`` (several, comma-separated, run in turn):
``ppo_max_defaults`` (ppomax's ``ppo_max`` preset: 128 rollouts per iteration generated 32 at a time, four
minibatches of 32, one epoch), ``trl_defaults`` (TRL's PPOConfig: 8 rollouts, one minibatch, 4 epochs) and
``one_epoch`` (32 rollouts = one minibatch, one epoch: the case where ppomax's update gives the scoring pass's
policy and critic forwards, "fused" scoring; otherwise "separate"). ``--rollout``, ``--minibatch``, ``--epochs``,
``--micro-batch`` and ``--gen-batch`` override a setting's numbers. ppomax takes them as ``ppo.buffer_size``,
``minibatch_size``, ``ppo_epochs``, ``micro_batch_size`` and ``rollout_batch_size``; TRL as
``per_device_train_batch_size``, ``gradient_accumulation_steps``, ``num_mini_batches``, ``num_ppo_epochs`` and
``local_rollout_forward_batch_size`` (:func:`ppo_schedule.trl_fields`: TRL steps its optimiser once every
``gradient_accumulation_steps`` micro-batches, so a schedule with several minibatches per epoch and micro-batches
smaller than a minibatch is refused, with the reason). Both sides count, per iteration, the optimiser steps of
the policy and of the critic and the rows each was taken on (a forward pre-hook on each trained model counts
rows forwarded with gradients; a step post-hook on each torch optimiser closes a step); the bench exits non-zero
with one line if either side's counts differ from the schedule's (one step per minibatch per epoch).

Other settings on both sides: ``max_new_tokens`` N, sampling at temperature 0.8 with no
top-p/top-k/repetition penalty (TRL's generation has none of them, so ppomax's ``ppo_max`` preset is overridden
to match), stop at EOS, no gradient checkpointing (TRL's default, switched off), each ``--dtypes`` precision on
both sides: float32, or bfloat16 mixed precision (float32 trained models under autocast: ppomax's ``model.dtype:
bfloat16``, which also stores its frozen reference and reward model in bf16; TRL's ``bf16=True`` plus
``ACCELERATE_MIXED_PRECISION=bf16``, without which its PPOTrainer stays in float32: accelerate's autocast), KL
coefficient 0.05 (k1), clip 0.2, value clip 0.2, gamma 1, lambda 0.95, vf coefficient 1, AdamW (non-fused) with
betas (0.9, 0.95), no critic pre-training. ppomax runs the rest of ``ppo_max`` (reward normalisation and
clipping, gradient clipping; no advantage whitening, which PPO-max leaves off); TRL whitens its advantages.
``--set KEY=VALUE`` (repeatable) adds a ppomax config override on top of all that (e.g.
``generation.logprobs_from=generate``, which takes the policy's old log-probs from the sampling pass as TRL does);
the printed command shows it, and the optimiser-step check still holds both sides to the schedule.

Timing, in two clocks (two tables): wall time, and the process's CPU time (one thread: close to the wall time
on an idle machine and far less disturbed by other processes on a shared one). ppomax: its trainer's
``generate``, ``score``, ``compute_advantages`` and ``updater.update`` are wrapped (the wall numbers agree with
``PPOTrainer.iteration``'s own ``time/*`` metrics, kept in the JSON as ``own``). TRL's ``train()`` is one loop,
so the bench wraps two of its module functions: ``batch_generation`` (generation) and ``masked_whiten`` (the last
call before the updates: generation end -> its return = scoring and advantages); a callback's ``on_step_end``
closes the iteration (training = the rest, metric logging included). ``other`` is the rest of the iteration
(TRL: fetching the prompt batch and the ``gc.collect()`` it runs after each iteration; ppomax: merging batches and
reducing metrics). TRL also calls ``gc.collect()`` at the end of scoring: the bench times both calls and prints
their share. ``tokens/s`` counts response tokens up to and including the first EOS per second of the iteration,
``gen tok/s`` per second of generation. Medians over the timed iterations after ``--warmup`` in each process;
``--rounds`` processes per side, size, precision and setting, rotating which side goes first.

Where ppomax fuses its scoring (one epoch over one minibatch that is the whole rollout, ppo/fused.py:
the update's first forward is the scoring pass), a third side ``ppomax-separate`` runs ppomax with the separate
scoring forced (a scoring pass of the policy, reference and critic before the update: the path of every other
schedule), so that the default path's number stands next to the fused one's (``--no-separate`` skips it).

Also per side: its process's peak resident memory (VmHWM), and each phase's utilisation of this machine's measured
dense matmul FLOP/s at the run's precision (bench/hardware.py, measured first on the same thread count): the
model FLOPs the phase needs at the schedule (its epochs; the policy's and critic's scoring forwards unless
ppomax fused them) over its wall time x that bound.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from hardware import bounds, model_shape, phase_flops, utilisation  # noqa: E402
from ppo_schedule import (  # noqa: E402
    SETTINGS,
    TRL_DEFAULTS,
    Schedule,
    ScheduleError,
    prompts_needed,
    setting,
    trl_fields,
    trl_steps,
)

TRL_VENV = HERE / ".venv-trl"
TRL_SPEC = "trl==1.12.*"
TRL_FALLBACK = "trl>=1.0,<2"
TORCH_SPEC = "torch==2.13.0"  # the local CPU wheel; must go in before trl, which would pull a CUDA torch
TEMPERATURE = 0.8


def _pin_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)
    torch.set_num_interop_threads(n)


def _thread_env(n: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env.update(
        OMP_NUM_THREADS=str(n),
        MKL_NUM_THREADS=str(n),
        TOKENIZERS_PARALLELISM="false",
        ACCELERATE_USE_CPU="true",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONWARNINGS="ignore",
    )
    return env


# ---------------------------------------------------------------------------------------------- the TRL venv


def _pip(py: Path, *args: str) -> bool:
    cmd = [str(py), "-m", "pip", "install", "-q", *args]
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    return subprocess.run(cmd, stdout=sys.stderr).returncode == 0


def ensure_trl_venv(venv: Path, reinstall: bool) -> Path:
    """The TRL interpreter, creating and filling ``venv`` if needed (never touches this interpreter's venv)."""
    from importlib.metadata import version

    py = venv / "bin" / "python"
    probe = [str(py), "-c", "import trl, torch; print(trl.__version__)"]
    if not reinstall and py.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return py
    if reinstall or not py.exists():
        subprocess.run(["python3.11", "-m", "venv", "--clear", str(venv)], check=True)
    if not _pip(py, TORCH_SPEC):
        raise SystemExit(f"cannot install {TORCH_SPEC} into {venv}")
    pins = [f"transformers=={version('transformers')}", f"accelerate=={version('accelerate')}"]
    for spec in ([TRL_SPEC, *pins], [TRL_FALLBACK, *pins], [TRL_FALLBACK]):
        if _pip(py, *spec):
            break
    else:
        raise SystemExit(f"cannot install TRL into {venv} (tried {TRL_SPEC} and {TRL_FALLBACK})")
    subprocess.run(probe, check=True, capture_output=True)
    return py


# ---------------------------------------------------------------------------------------------- shared inputs


def model_spec(size: str, vocab: int | None) -> tuple[str, dict[str, Any], int]:
    """(label, LlamaConfig shape fields, vocabulary) of a ``--sizes`` entry: ``HIDDENxLAYERS`` (a tiny Llama,
    vocabulary ``vocab`` or 512) or a name in bench/_tiny.py ``SHAPES`` (its vocabulary unless ``vocab``)."""
    from _tiny import SHAPES, tiny_shape

    if size in SHAPES:
        shape = SHAPES[size]
        return f"{size} shape", shape, vocab or shape["vocab_size"]
    try:
        hidden, layers = (int(x) for x in size.lower().split("x"))
    except ValueError:
        raise SystemExit(
            f"--sizes: {size!r} is neither HIDDENxLAYERS nor one of {', '.join(SHAPES)}"
        ) from None
    return f"Llama {hidden}x{layers}", tiny_shape(hidden, layers), vocab or 512


def prepare(root: Path, shape: dict[str, Any], vocab: int, seed: int, n_prompts: int) -> dict[str, Any]:
    """Models and ``n_prompts`` equal-length prompts in ``root``; returns the spec both sides read."""
    import torch
    from _tiny import build_models, random_prompt, write_prompts

    from ppomax.data import tokenize_prompt
    from ppomax.models import ValueHeadModel, load_tokenizer

    rng = random.Random(seed)
    policy, rm, n_params = build_models(root, shape, vocab, seed, rng)
    tok = load_tokenizer(str(policy))
    # Prompts of one token length: no padding on either side, so both see the same [B, P] work every iteration.
    by_length: dict[int, list[tuple[str, list[int]]]] = {}
    while max((len(v) for v in by_length.values()), default=0) < n_prompts:
        for _ in range(4 * n_prompts):
            p = random_prompt(rng, 12)
            ids = tokenize_prompt(tok, p, None)
            by_length.setdefault(len(ids), []).append((p, ids))
    length, rows = max(by_length.items(), key=lambda kv: len(kv[1]))
    keep = rows[:n_prompts]
    prompts = write_prompts(root / "prompts.jsonl", [p for p, _ in keep])

    # TRL's reward/value model is ppomax's saved one (a sequence classifier).
    vh = ValueHeadModel.from_pretrained(rm).eval()
    # Check rows for the TRL side: the same sequences must score the same there (padding after the response).
    g = torch.Generator().manual_seed(seed)
    resp = torch.randint(3, len(tok), (4, 10), generator=g)
    resp[1, 6:] = tok.pad_token_id
    seqs = torch.cat([torch.tensor([i for _, i in keep[:4]]), resp], dim=1)
    with torch.no_grad():
        scores = vh.score(seqs, (seqs != tok.pad_token_id).long()).tolist()
    return {
        "policy": str(policy),
        "rm": str(rm),
        "prompts": str(prompts),
        "prompt_ids": [i for _, i in keep],
        "prompt_len": length,
        "n_params": n_params,
        "shape": model_shape(policy),  # for the FLOP counts (the model directory is gone by report time)
        "check_seqs": seqs.tolist(),
        "check_scores": scores,
    }


# ---------------------------------------------------------------------------------------------- the two sides


PHASES = ("gen", "score", "train", "other", "iter")


def peak_rss_mib() -> float:
    """This process's peak resident memory (Linux VmHWM; ru_maxrss elsewhere), MiB: each side runs in a fresh
    process, so it is that side's whole run (models, optimisers, generation, activations). The TRL side cannot
    import ppomax, so this is not ``ppomax.demo.ablate.stages.memory_mib``."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def now() -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds)."""
    return time.perf_counter(), time.process_time()


def split(marks: dict[str, tuple[float, float]], start: str) -> dict[str, dict[str, float]]:
    """Phase durations in both clocks from the marks of one iteration (``start`` = the previous iteration's end)."""
    out = {}
    for c, clock in enumerate(("wall", "cpu")):
        m = {k: v[c] for k, v in marks.items()}
        d = {
            "gen": m["gen_end"] - m["gen_start"],
            "score": m["score_end"] - m["gen_end"],
            "train": m["end"] - m["score_end"],
            "iter": m["end"] - m[start],
        }
        d["other"] = d["iter"] - d["gen"] - d["score"] - d["train"]
        out[clock] = d
    return out


class Phases:
    """Adds up both clocks over calls of wrapped functions, per phase, between :meth:`take` calls."""

    def __init__(self) -> None:
        self.acc: dict[str, list[float]] = {}

    def wrap(self, key: str, fn: Any) -> Any:
        def timed(*args: Any, **kw: Any) -> Any:
            w0, c0 = now()
            try:
                return fn(*args, **kw)
            finally:
                w1, c1 = now()
                tot = self.acc.setdefault(key, [0.0, 0.0])
                tot[0] += w1 - w0
                tot[1] += c1 - c0

        return timed

    def take(self, start: tuple[float, float], end: tuple[float, float]) -> dict[str, dict[str, float]]:
        out = {}
        for c, clock in enumerate(("wall", "cpu")):
            d = {k: self.acc.get(k, [0.0, 0.0])[c] for k in ("gen", "score", "train")}
            d["iter"] = end[c] - start[c]
            d["other"] = d["iter"] - d["gen"] - d["score"] - d["train"]
            out[clock] = d
        self.acc = {}
        return out

    def total(self) -> dict[str, float]:
        """Both clocks summed over every phase since the last call, then reset."""
        out = {c: sum(v[i] for v in self.acc.values()) for i, c in enumerate(("wall", "cpu"))}
        self.acc = {}
        return out


class StepCounter:
    """Optimiser steps of each trained model and the rows each step was taken on, counted the same way on both
    sides: a forward pre-hook on each trained model adds the rows of its forwards run with gradients (training;
    generation and scoring run without), and a step post-hook on each torch optimiser (under accelerate's
    wrapper, which skips the inner step while it accumulates) closes a step of the models it trains."""

    def __init__(self) -> None:
        self.pending: dict[str, int] = {}
        self.steps: dict[str, list[int]] = {}

    def model(self, name: str, module: Any) -> None:
        import torch

        self.pending[name], self.steps[name] = 0, []

        def count(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if torch.is_grad_enabled():
                ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
                self.pending[name] += int(ids.shape[0])

        module.register_forward_pre_hook(count, with_kwargs=True)

    def optimizer(self, names: tuple[str, ...], optimizer: Any) -> None:
        while hasattr(optimizer, "optimizer"):  # accelerate's AcceleratedOptimizer -> the torch one
            optimizer = optimizer.optimizer

        def closed(*_: Any) -> None:
            for name in names:
                self.steps[name].append(self.pending[name])
                self.pending[name] = 0

        optimizer.register_step_post_hook(closed)

    def take(self) -> dict[str, list[int]]:
        """Each model's steps (rows per step) since the last call."""
        out, self.steps = self.steps, {name: [] for name in self.steps}
        return out


def fuses(schedule: Schedule) -> bool:
    """Whether ppomax chooses its fused scoring at this schedule (``PPOSettings.one_step_update``, ppo/fused.py):
    one epoch over one minibatch that is the whole rollout, in one micro-batch. There the bench also runs ppomax
    with the separate scoring forced (side ``ppomax-separate``): the default path's number next to the fused one's."""
    from ppomax.config import load_config

    return load_config("ppo", preset="ppo_max", overrides=schedule.ppomax_overrides()).ppo.one_step_update


def run_ppomax(spec: dict[str, Any], a: argparse.Namespace) -> dict[str, Any]:
    """``PPOTrainer.iteration`` with the ppo_max preset, the schedule and the shared settings (its scoring strategy
    forced to the separate one with ``a.scoring == "separate"``), its phases timed in both clocks by wrapping the
    trainer's ``generate`` and its strategy's ``score``, ``advantages`` (scoring) and ``update`` (training), its
    optimiser steps counted (:class:`StepCounter`)."""
    import accelerate
    import torch
    import transformers

    import ppomax.ppo.assembly as ppo_mod  # where PPOTrainer chooses its scoring strategy
    from ppomax.config import load_config
    from ppomax.ppo import PPOTrainer

    total = a.warmup + a.iterations
    cfg = load_config(
        "ppo",
        preset="ppo_max",
        overrides=[
            f"model.policy={spec['policy']}",
            f"model.reward={spec['rm']}",
            f"data.prompts={spec['prompts']}",
            f"model.dtype={a.dtype}",  # bfloat16: mixed precision (float32 masters under autocast)
            f"generation.max_new_tokens={a.new_tokens}",
            f"generation.temperature={TEMPERATURE}",
            "generation.top_p=1.0",
            "generation.top_k=0",
            "generation.repetition_penalty=1.0",
            "ppo.critic_pretrain_steps=0",
            f"ppo.iterations={total}",
            *a.schedule.ppomax_overrides(),
            "ppo.vf_coef=1.0",
            "ppo.kl.coef=0.05",
            "ppo.kl.estimator=k1",
            "ppo.clip_ratio=0.2",
            "ppo.value_clip=0.2",
            f"logging.out_dir={Path(a.out).with_suffix('.run')}",
            "logging.tensorboard=false",
            "logging.progress=false",
            *a.set,  # last: they win over the bench's own keys
        ],
    )
    if a.scoring == "separate":  # the strategy every other schedule gets (PPOTrainer chooses it when built)
        ppo_mod.fuses_scoring = lambda ppo: False
    trainer = PPOTrainer(cfg)
    clock = Phases()
    trainer.generate = clock.wrap("gen", trainer.generate)  # type: ignore[method-assign]
    # fused, the update's first forward scores the policy and the critic: those forwards count as training
    strategy = trainer.scoring
    strategy.score = clock.wrap("score", strategy.score)  # type: ignore[method-assign]
    strategy.advantages = clock.wrap("score", strategy.advantages)  # type: ignore[method-assign]
    strategy.update = clock.wrap("train", strategy.update)  # type: ignore[method-assign]
    counter = StepCounter()
    unwrap = trainer.acc.unwrap_model
    counter.model("policy", unwrap(trainer.updater.policy.model))
    counter.optimizer(("policy",), trainer.updater.policy.optimizer)
    assert trainer.updater.critic is not None  # GAE: ppo_max trains a critic
    counter.model("critic", unwrap(trainer.updater.critic.model))
    counter.optimizer(("critic",), trainer.updater.critic.optimizer)
    rows, steps = [], []
    for step in range(1, total + 1):
        t0 = now()
        m = trainer.iteration(step)
        row: dict[str, Any] = clock.take(t0, now())
        steps.append(counter.take())
        it = m["time/iteration"]
        row.update(
            tokens=m["perf/tokens_per_s"] * it,
            len=m["response/length_mean"],
            width=a.new_tokens,
            own={k: m[f"time/{k}"] for k in ("generation", "scoring", "training", "iteration")},
        )
        rows.append(row)
    return {
        "rows": rows,
        "steps": steps,
        "scoring": trainer.scoring.name,
        "peak_rss_mib": peak_rss_mib(),
        "threads": torch.get_num_threads(),
        "mixed_precision": trainer.acc.mixed_precision,
        "versions": {
            "ppomax": "src",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "accelerate": accelerate.__version__,
        },
    }


def run_trl(spec: dict[str, Any], a: argparse.Namespace) -> dict[str, Any]:
    """TRL's ``PPOTrainer.train`` for warmup + iterations updates at the schedule's PPOConfig fields
    (:func:`ppo_schedule.trl_fields`), timed through two wrapped functions, its optimiser steps counted."""
    import accelerate
    import torch
    import transformers
    import trl
    import trl.experimental.ppo.ppo_trainer as pt
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.trainer_callback import PrinterCallback, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.utils import get_reward

    tok = AutoTokenizer.from_pretrained(spec["policy"], padding_side="left")
    load_lm = lambda: AutoModelForCausalLM.from_pretrained(spec["policy"], dtype=torch.float32)  # noqa: E731

    def load_rm() -> Any:
        return AutoModelForSequenceClassification.from_pretrained(spec["rm"], dtype=torch.float32).eval()

    policy, ref, rm, value = load_lm(), load_lm(), load_rm(), load_rm()
    seqs = torch.tensor(spec["check_seqs"])
    with torch.no_grad():
        _, got, _ = get_reward(rm, seqs, tok.pad_token_id, spec["prompt_len"])
    score_err = (got - torch.tensor(spec["check_scores"])).abs().max().item()

    total = a.warmup + a.iterations
    fields = trl_fields(a.schedule)
    stock = {f.name: f.default for f in dataclasses.fields(PPOConfig)}
    changed = {k: (v, stock[k]) for k, v in TRL_DEFAULTS.items() if stock[k] != v}
    if changed:  # the trl_defaults setting would no longer be TRL's defaults
        raise SystemExit(f"this TRL's PPOConfig defaults differ from ppo_schedule.TRL_DEFAULTS: {changed}")
    ds = Dataset.from_dict({"input_ids": spec["prompt_ids"]})
    if a.dtype == "bfloat16":
        # TRL's PPOTrainer builds Accelerator() without mixed_precision and transformers 5 no longer exports
        # bf16=True to the environment, so the flag alone leaves TRL in float32 (measured: mixed_precision "no");
        # accelerate reads this variable, which gives TRL the bf16 autocast it asks for.
        os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16"
    args = PPOConfig(
        output_dir=str(Path(a.out).with_suffix(".run")),
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        use_cpu=True,
        bf16=a.dtype == "bfloat16",  # mixed precision: accelerate's autocast over the float32 models
        fp16=False,
        gradient_checkpointing=False,
        seed=42,
        **fields,
        total_episodes=a.schedule.rollout * total,
        response_length=a.new_tokens,
        stop_token="eos",
        temperature=TEMPERATURE,
        num_sample_generations=0,
        kl_coef=0.05,
        kl_estimator="k1",
        cliprange=0.2,
        cliprange_value=0.2,
        vf_coef=1.0,
        gamma=1.0,
        lam=0.95,
        optim="adamw_torch",
        learning_rate=5e-7,
        adam_beta1=0.9,
        adam_beta2=0.95,
        adam_epsilon=1e-6,
        lr_scheduler_type="constant",
        dataloader_num_workers=0,
    )
    marks: list[dict[str, Any]] = []
    gc = Phases()  # TRL calls gc.collect() twice per iteration: report how much of its time that is
    eos = tok.eos_token_id
    orig_gen, orig_whiten = pt.batch_generation, pt.masked_whiten

    def timed_gen(model: Any, queries: Any, *args: Any, **kw: Any) -> Any:
        t0 = now()
        out = orig_gen(model, queries, *args, **kw)
        t1 = now()
        resp = out[0][:, queries.shape[1] :]
        is_eos = resp == eos
        first = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, resp.shape[1])  # up to and incl. EOS
        marks.append(
            {
                "gen_start": t0,
                "gen_end": t1,
                "tokens": float(first.sum()),
                "len": float(first.float().mean()),
                "width": resp.shape[1],
            }
        )
        return out

    def timed_whiten(*args: Any, **kw: Any) -> Any:  # the advantages' whitening ends the scoring phase
        out = orig_whiten(*args, **kw)
        marks[-1]["score_end"] = now()
        return out

    class Clock(TrainerCallback):
        def on_train_begin(self, *_: Any, **__: Any) -> None:
            marks.append({"end": now()})

        def on_step_end(self, *_: Any, **__: Any) -> None:
            marks[-1]["end"] = now()
            marks[-1]["gc"] = gc.total()  # both calls inside this iteration's window (see below)
            steps.append(counter.take())

    pt.batch_generation, pt.masked_whiten = timed_gen, timed_whiten
    # The trainer module's `gc` name only (the gc module itself is untouched).
    pt.gc = types.SimpleNamespace(collect=gc.wrap("collect", pt.gc.collect))
    trainer = PPOTrainer(
        args=args,
        processing_class=tok,
        model=policy,
        ref_model=ref,
        reward_model=rm,
        value_model=value,
        train_dataset=ds,
        eval_dataset=ds.select(range(a.schedule.rollout)),
    )
    # One optimiser over the policy and the value model (PolicyAndValueWrapper): each step is both models'.
    counter, steps = StepCounter(), []
    wrapper = trainer.accelerator.unwrap_model(trainer.model)
    counter.model("policy", wrapper.policy)
    counter.model("critic", wrapper.critic_backbone)
    counter.optimizer(("policy", "critic"), trainer.optimizer)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(Clock())
    trainer.train()
    rows = []
    for prev, m in itertools.pairwise(marks):
        # An iteration runs from the previous on_step_end to its own: its window holds the previous iteration's
        # trailing gc.collect() (TRL calls it after on_step_end) and its own one at the end of scoring.
        times = {k: m[k] for k in ("gen_start", "gen_end", "score_end", "end")}
        row: dict[str, Any] = split({**times, "start": prev["end"]}, "start")
        row.update(tokens=m["tokens"], len=m["len"], width=m["width"], gc=m["gc"])
        rows.append(row)
    return {
        "rows": rows,
        "steps": steps,
        "scoring": "separate",
        "trl_fields": fields,
        "peak_rss_mib": peak_rss_mib(),
        "threads": torch.get_num_threads(),
        "score_check_max_abs_err": score_err,
        "mixed_precision": trainer.accelerator.mixed_precision,
        "gradient_checkpointing": bool(policy.is_gradient_checkpointing),
        "versions": {
            "trl": trl.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "accelerate": accelerate.__version__,
        },
    }


# ---------------------------------------------------------------------------------------------- driver


def summarise(rows: list[dict[str, Any]], batch: int, clock: str) -> dict[str, float]:
    """Medians over the timed iterations in ``clock`` (``wall`` or ``cpu``); rates are per-iteration medians."""
    med = {k: statistics.median(r[clock][k] for r in rows) for k in PHASES}
    med["len"] = statistics.median(r["len"] for r in rows)
    med["samples_s"] = statistics.median(batch / r[clock]["iter"] for r in rows)
    med["tok_s"] = statistics.median(r["tokens"] / r[clock]["iter"] for r in rows)
    med["gen_tok_s"] = statistics.median(r["tokens"] / r[clock]["gen"] for r in rows)
    if "gc" in rows[0]:
        med["gc"] = statistics.median(r["gc"][clock] for r in rows)
        med["iter_no_gc"] = statistics.median(r[clock]["iter"] - r["gc"][clock] for r in rows)
    return med


@dataclasses.dataclass
class Result:
    model: str  # "Llama 256x4" or "smollm2-135m shape"
    dtype: str
    setting: str
    schedule: Schedule
    spec: dict[str, Any]
    sides: dict[str, dict[str, Any]]


def step_problems(schedule: Schedule, side: str, steps: list[dict[str, list[int]]]) -> list[str]:
    """Where a side's measured optimiser steps (per iteration: each model's rows per step) differ from the
    schedule's: one step per minibatch per epoch, of ``minibatch`` rows, for the policy and for the critic."""
    want = schedule.steps()
    out = []
    for i, got in enumerate(steps, 1):
        for model in ("policy", "critic"):
            if got.get(model) != want:
                out.append(
                    f"{side} iteration {i}: {model} took {len(got.get(model, []))} optimiser step(s) on "
                    f"{got.get(model)} rows; the schedule ({schedule.label()}) is {len(want)} on {want}"
                )
    return out


def needs(r: Result, side: str, s: dict[str, float]) -> dict[str, float]:
    """The model FLOPs each phase of one iteration needs (bench/hardware.py) at the side's median length: the
    schedule's epochs, and the policy's and critic's scoring forwards unless ppomax's update gave them (then
    ppomax runs the reference in its update too: that forward is its training's need, TRL's scoring's)."""
    fused = r.sides[side].get("scoring") == "fused"
    return phase_flops(
        r.spec["shape"],
        r.schedule.rollout,
        r.spec["prompt_len"],
        s["len"],
        r.schedule.epochs,
        fused_scoring=fused,
        reference_in_update=fused,
    )


def table(results: list[Result], a: argparse.Namespace, clock: str, bound: dict[str, Any]) -> list[str]:
    """Markdown rows, ppomax then TRL for each setting, model and precision; utilisation of the measured 2048^3
    matmul FLOP/s of that precision (wall clock only: the bound is a wall-clock rate)."""
    util = clock == "wall"
    lines = [
        "| setting | trainer (scoring) | dtype | model, vocabulary (params) | resp len (of N) | gen s | score s | train s "
        "| other s | iter s | samples/s | tokens/s | gen tok/s |"
        + (" util gen / score / train | peak RSS MiB |" if util else ""),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if util else ""),
    ]
    for r in results:
        for name, res in r.sides.items():
            s = summarise(res["rows"], r.schedule.rollout, clock)
            label = (
                "ppomax ppo_max" if name.startswith("ppomax") else f"TRL {res['versions']['trl']} PPOTrainer"
            )
            row = (
                f"| {r.setting} | {label} ({res['scoring']}{', forced' if name == 'ppomax-separate' else ''}) | {r.dtype} | {r.model}, vocab {r.spec['shape']['V']} "
                f"({r.spec['n_params'] / 1e6:.2f}M) | {s['len']:.1f} ({a.new_tokens}) | {s['gen']:.3f} "
                f"| {s['score']:.3f} | {s['train']:.3f} | {s['other']:.3f} | {s['iter']:.3f} "
                f"| {s['samples_s']:.1f} | {s['tok_s']:.0f} | {s['gen_tok_s']:.0f} |"
            )
            if util:
                u = utilisation(needs(r, name, s), s, bound[r.dtype])
                row += f" {u['gen']:.0%} / {u['score']:.0%} / {u['train']:.0%} | {res['peak_rss_mib']:.0f} |"
            lines.append(row)
    return lines


def ratios(results: list[Result]) -> list[str]:
    """Each ppomax side's samples/s over TRL's (wall clock) per setting and model: at equal precision, and each
    side at its fastest."""
    by_case: dict[tuple[str, str], dict[str, dict[str, float]]] = {}
    for r in results:
        for name, res in r.sides.items():
            rate = summarise(res["rows"], r.schedule.rollout, "wall")["samples_s"]
            by_case.setdefault((r.setting, r.model), {}).setdefault(name, {})[r.dtype] = rate
    out = []
    for (setting_name, model), q in by_case.items():
        t = q["trl"]
        for side in (n for n in q if n != "trl"):
            pm = q[side]
            same = ", ".join(f"{d} {pm[d] / t[d]:.2f}x" for d in pm if d in t)
            bp, bt = max(pm, key=pm.get), max(t, key=t.get)  # type: ignore[arg-type]
            out.append(
                f"- {setting_name}, {model}: {side} / TRL samples/s at equal precision: {same}; each at its "
                f"fastest ({side} {bp}, TRL {bt}): {pm[bp] / t[bt]:.2f}x"
            )
    return out


def run_side(
    side: str, py: Path, spec_path: Path, a: argparse.Namespace, schedule: Schedule, tag: str
) -> dict[str, Any]:
    """One side (``ppomax``, ``ppomax-separate`` or ``trl``) in a fresh process (``py``: its venv's
    interpreter); its JSON result plus ``wall_s``."""
    out = spec_path.with_name(f"result-{tag}.json")
    worker, _, scoring = side.partition("-")
    cmd = [
        str(py),
        str(Path(__file__).resolve()),
        "--worker",
        worker,
        *([f"--scoring={scoring}"] if scoring else []),
        "--spec",
        str(spec_path),
        "--out",
        str(out),
        *a.passthrough,
        f"--dtype={a.dtype}",
        f"--schedule={json.dumps(dataclasses.asdict(schedule))}",
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=_thread_env(a.threads), cwd=str(REPO), capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"the {side} side failed (exit {proc.returncode}); its output is above")
    res = json.loads(out.read_text())
    res["wall_s"] = time.perf_counter() - t0
    return res


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return f"{model}, {os.cpu_count()} cores"


def schedules(a: argparse.Namespace) -> dict[str, Schedule]:
    """The ``--setting`` names' schedules with the explicit flags on top, each checked to be one TRL can run
    (:func:`ppo_schedule.trl_fields`) and whose TRL fields replay to the schedule's optimiser steps."""
    from ppomax.config import load_config

    ppo = load_config("ppo", preset="ppo_max").ppo
    flags = {k: getattr(a, k) for k in ("rollout", "minibatch", "epochs", "micro_batch", "gen_batch")}
    out = {}
    for name in a.setting.split(","):
        try:
            s = setting(name, ppo, **flags)
            fields = trl_fields(s)
        except ScheduleError as exc:
            raise SystemExit(f"--setting {name}: {exc}") from None
        total = a.warmup + a.iterations
        replay = trl_steps(fields, total, prompts_needed(s, total))
        if any(steps != s.steps() for steps in replay):
            raise SystemExit(
                f"--setting {name}: TRL's fields {fields} replay to steps {replay}, not {s.steps()}"
            )
        out[name] = s
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--sizes",
        default="256x4,512x5",
        help="comma-separated models: HIDDENxLAYERS tiny Llamas, or smollm2-135m (that real model's shape)",
    )
    ap.add_argument(
        "--dtypes",
        default="float32,bfloat16",
        help="precisions, each on both sides: float32, or bfloat16 mixed precision (float32 masters, autocast)",
    )
    ap.add_argument(
        "--setting",
        default=",".join(SETTINGS),
        help=f"comma-separated update schedules, each run in turn: {', '.join(SETTINGS)}",
    )
    ap.add_argument("--rollout", "--batch", type=int, help="rollouts per iteration (overrides the setting's)")
    ap.add_argument("--minibatch", type=int, help="rollouts per optimiser step (overrides the setting's)")
    ap.add_argument("--epochs", type=int, help="PPO epochs over each rollout (overrides the setting's)")
    ap.add_argument("--micro-batch", type=int, help="rows per forward/backward (overrides the setting's)")
    ap.add_argument(
        "--gen-batch", type=int, help="rows per generate()/scoring call (overrides the setting's)"
    )
    ap.add_argument("--vocab", type=int, help="vocabulary size (default: 512, or the named shape's)")
    ap.add_argument("--new-tokens", type=int, default=64, help="max_new_tokens (both stop at EOS)")
    ap.add_argument("--iterations", type=int, default=4, help="timed iterations per process")
    ap.add_argument("--warmup", type=int, default=2, help="untimed iterations at the start of every process")
    ap.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="processes per side, model, precision and setting, rotating which side goes first; rows pooled",
    )
    ap.add_argument("--threads", type=int, default=1, help="torch threads on both sides")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a ppomax config override on top of the bench's (repeatable), e.g. generation.logprobs_from=generate",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reinstall", action="store_true", help="rebuild bench/.venv-trl")
    ap.add_argument("--json", action="store_true", help="also print every per-iteration number as JSON")
    ap.add_argument(
        "--no-separate",
        action="store_true",
        help="where ppomax fuses its scoring (one epoch over one minibatch), do not also run its separate scoring",
    )
    ap.add_argument("--worker", choices=["ppomax", "trl"], help=argparse.SUPPRESS)
    ap.add_argument(
        "--scoring", default="chosen", help=argparse.SUPPRESS
    )  # a ppomax worker's: chosen, separate
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)  # a worker's precision
    ap.add_argument("--schedule", help=argparse.SUPPRESS)  # a worker's schedule (JSON of Schedule's fields)
    a = ap.parse_args(argv)
    a.passthrough = [
        f"--new-tokens={a.new_tokens}",
        f"--iterations={a.iterations}",
        f"--warmup={a.warmup}",
        f"--threads={a.threads}",
        *(f"--set={kv}" for kv in a.set),
    ]

    if a.worker:  # inside a side's own process (the TRL one cannot import ppomax)
        _pin_threads(a.threads)
        if a.worker == "ppomax":
            sys.path.insert(0, str(REPO / "src"))
        spec = json.loads(Path(a.spec).read_text())
        a.schedule = Schedule(**json.loads(a.schedule))
        res = (run_ppomax if a.worker == "ppomax" else run_trl)(spec, a)
        Path(a.out).write_text(json.dumps(res))
        return 0

    t_start = time.perf_counter()
    sys.path.insert(0, str(REPO / "src"))
    plan = schedules(a)  # before anything slow: a schedule TRL cannot run is refused at once
    trl_py = ensure_trl_venv(TRL_VENV, a.reinstall)
    _pin_threads(a.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    bound = bounds(a.threads, dtypes=tuple(a.dtypes.split(",")))  # before the sides, same thread count
    pythons = {"ppomax": Path(sys.executable), "trl": trl_py}
    results: list[Result] = []
    problems: list[str] = []
    n_prompts = max(prompts_needed(s, a.warmup + a.iterations) for s in plan.values())
    for size in a.sizes.split(","):
        model, shape, vocab = model_spec(size, a.vocab)
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            spec = prepare(root, shape, vocab, a.seed, n_prompts)
            spec["root"] = str(root)
            spec_path = root / "spec.json"
            spec_path.write_text(json.dumps(spec))
            for name, schedule in plan.items():
                for dtype in a.dtypes.split(","):
                    a.dtype = dtype
                    sides: dict[str, dict[str, Any]] = {}
                    names = ["ppomax", "trl"] + (
                        ["ppomax-separate"] if fuses(schedule) and not a.no_separate else []
                    )
                    # rotate who goes first: the other workers' load drifts over time
                    for r in range(a.rounds):
                        turn = (len(results) + r) % len(names)
                        for side in names[turn:] + names[:turn]:
                            tag = f"{side}-{name}-{dtype}-{r}"
                            py = pythons[side.partition("-")[0]]
                            res = run_side(side, py, spec_path, a, schedule, tag)
                            problems += step_problems(
                                schedule, f"{side} ({name}, {size}, {dtype})", res["steps"]
                            )
                            merged = sides.setdefault(side, {"rows": [], "wall_s": 0.0, "peak_rss_mib": 0.0})
                            merged["rows"] += res.pop("rows")[a.warmup :]
                            merged["wall_s"] += res.pop("wall_s")
                            merged["peak_rss_mib"] = max(merged["peak_rss_mib"], res.pop("peak_rss_mib"))
                            merged.update(res)
                    results.append(Result(model, dtype, name, schedule, spec, sides))
                    print(
                        f"done {size} {name} {dtype}: "
                        + ", ".join(f"{k} {v['wall_s']:.0f} s" for k, v in sides.items()),
                        file=sys.stderr,
                    )

    trl_v, pm_v = results[0].sides["trl"]["versions"], results[0].sides["ppomax"]["versions"]
    diff = [f"{k} {pm_v[k]}" for k in ("torch", "transformers", "accelerate") if pm_v[k] != trl_v[k]]
    same = "same versions" if not diff else ", ".join(diff)
    cmd = " ".join(
        [".venv/bin/python", "bench/trl_compare.py", *(argv if argv is not None else sys.argv[1:])]
    )
    print(
        f"\nCommand: `{cmd}`  \nMachine: {machine()}; torch threads {a.threads} on both sides; "
        f"date {time.strftime('%Y-%m-%d %H:%M %Z')}; total {time.perf_counter() - t_start:.0f} s  \n"
        f"Versions: TRL {trl_v['trl']} (bench/.venv-trl), torch {trl_v['torch']}, transformers "
        f"{trl_v['transformers']}, accelerate {trl_v['accelerate']}; ppomax's venv: {same}  \n"
        f"Settings: max_new_tokens {a.new_tokens}, stop at EOS, temperature {TEMPERATURE}, CPU; {a.rounds} "
        f"process(es) per side x {a.iterations} timed iterations after {a.warmup} warmup  \n"
        f"Bound: dense 2048^3 matmul with {a.threads} thread(s): "
        + ", ".join(f"{d} {bound[d] / 1e9:.1f} GFLOP/s" for d in a.dtypes.split(","))
        + " (bench/hardware.py; utilisation = a phase's needed "
        "model FLOPs / (its wall time x the bound of its precision))"
    )
    print("\nUpdate schedules (optimiser steps per iteration checked on both sides, policy and critic):\n")
    for name, schedule in plan.items():
        fields = ", ".join(f"{k} {v}" for k, v in trl_fields(schedule).items())
        print(f"- {name}: {schedule.label()}; {len(schedule.steps())} step(s) per iteration; TRL {fields}")
    for clock, title in (
        ("wall", "Wall clock"),
        ("cpu", "CPU time of the process (1 thread: robust to other load)"),
    ):
        print(f"\n{title}, medians per PPO iteration:\n")
        print("\n".join(table(results, a, clock, bound)))
    print()
    print("\n".join(ratios(results)))
    for r in results:
        t, p = r.sides["trl"], r.sides["ppomax"]
        w, c = (
            summarise(t["rows"], r.schedule.rollout, "wall"),
            summarise(t["rows"], r.schedule.rollout, "cpu"),
        )
        print(
            f"- {r.setting}, {r.model}, {r.dtype}: TRL's two gc.collect() per iteration: {w['gc']:.3f} s wall / "
            f"{c['gc']:.3f} s CPU (its iteration without them: {w['iter_no_gc']:.3f} s wall / "
            f"{c['iter_no_gc']:.3f} s CPU). TRL reward model vs ppomax value head: max |score diff| "
            f"{t['score_check_max_abs_err']:.1e}. Mixed precision: ppomax {p['mixed_precision']}, TRL "
            f"{t['mixed_precision']}; TRL gradient checkpointing {t['gradient_checkpointing']}; torch threads "
            f"ppomax {p['threads']}, TRL {t['threads']}."
        )
    if a.json:
        print(
            json.dumps(
                {
                    "bound": bound,
                    "results": [
                        {
                            "model": r.model,
                            "dtype": r.dtype,
                            "setting": r.setting,
                            "schedule": dataclasses.asdict(r.schedule),
                            "sides": r.sides,
                        }
                        for r in results
                    ],
                }
            )
        )
    if problems:
        print("\n".join(problems), file=sys.stderr)
        print(
            f"FAILED: the two sides did not take the schedule's optimiser steps ({len(problems)} case(s) above)"
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
