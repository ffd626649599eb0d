"""What the SFT and reward-model trainers share: run setup, batching across ranks, checkpoints and resume
(the optimisation loop itself is :mod:`ppomax.trainers.loop`).

Layout of a run directory (``logging.out_dir``)::

    config.yaml            the resolved config (written by the main process)
    metrics.jsonl, tb/     one record per logged step (ppomax.monitor.MetricsLogger)
    checkpoints/step-N/    periodic resumable state (accelerate save_state + trainer_state.json), atomic
    final/                 the trained model: save_pretrained + tokenizer

Distributed runs (``accelerate launch``) shard the data themselves: every epoch the global list of batches is
built from ``seed + epoch`` identically on every rank and rank ``r`` takes every ``world``-th batch, so a resumed
run replays exactly the same order and skips what it has already seen. Metrics are reduced across ranks before
they are logged; only the main process writes files. Without a GPU, ``accelerate launch --multi_gpu
--num_processes N`` (or ``torchrun``, or mpirun) runs CPU DDP with gloo; ``accelerate launch --cpu --num_processes
N`` starts ONE process (its multi-CPU mode needs mpirun), which :func:`launch_mismatch` warns about.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import signal
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from tqdm.auto import tqdm

from ppomax.checkpoint import latest_checkpoint, prune_checkpoints
from ppomax.config import to_yaml
from ppomax.data import LoadStats
from ppomax.data.batching import global_batches
from ppomax.errors import UserError
from ppomax.monitor import MetricsLogger

logger = logging.getLogger("ppomax.train")


class TrainingError(UserError):
    """A run that cannot continue (e.g. repeated non-finite updates); the message says what to do."""


# --------------------------------------------------------------------------- setup


@dataclass
class RunContext:
    accelerator: Accelerator
    out_dir: Path
    metrics: MetricsLogger
    cfg: Any

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    def print(self, *args: Any) -> None:
        if self.is_main:
            tqdm.write(" ".join(str(a) for a in args))


# How many processes a launcher started: torchrun / accelerate (WORLD_SIZE), MPICH/Intel MPI, Open MPI, MVAPICH
# (the variables accelerate itself reads, accelerate.utils.environment.get_cpu_distributed_information).
WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
_warned: set[str] = set()


def _launched_world(env: Mapping[str, str]) -> int:
    for var in WORLD_SIZE_VARS:
        if env.get(var, "").strip().isdigit():
            return int(env[var])
    return 1


def launch_mismatch(env: Mapping[str, str]) -> str | None:
    """The one-line warning for a launch that asked for several processes but started only this one, else None.

    ``accelerate launch --cpu --num_processes N`` (or ``--num_machines N``, or an accelerate config with
    ``use_cpu``) takes accelerate's simple launcher: without ``--mpirun_hostfile`` it starts one process, handing it
    ``ACCELERATE_USE_CPU`` and a rendezvous address (``MASTER_ADDR``, set only when N > 1) but no world size, so
    torch.distributed sees one process and the run silently trains alone. ``--multi_gpu`` goes through torchrun,
    which sets ``WORLD_SIZE`` in every process; mpirun sets its own size variables.
    """
    use_cpu = env.get("ACCELERATE_USE_CPU", "").strip().lower() in ("1", "true", "yes", "y", "on")
    if use_cpu and env.get("MASTER_ADDR") and _launched_world(env) == 1:
        return (
            "`accelerate launch --cpu` with more than one process starts one process only (it needs mpirun, "
            "--mpirun_hostfile), so this run trains alone; for N processes on this machine's CPUs use "
            "`accelerate launch --multi_gpu --num_processes N -m ppomax ...` (gloo DDP, no GPU needed)"
        )
    return None


def _cpu_distributed() -> bool:
    """Whether to build the Accelerator with ``cpu=True``: a multi-process launch (torchrun, ``accelerate launch
    --multi_gpu``, mpirun) on a machine without CUDA, so accelerate runs DDP on CPU with gloo (it would otherwise
    start independent single processes). Every trainer builds its Accelerator from this, so this is also where a
    launch that started fewer processes than asked is reported (:func:`launch_mismatch`), once per process."""
    warning = launch_mismatch(os.environ)
    if warning is not None and warning not in _warned:
        _warned.add(warning)
        tqdm.write(f"ppomax: warning: {warning}", file=sys.stderr)
    launched = _launched_world(os.environ) > 1 or os.environ.get("LOCAL_RANK") is not None
    return launched and not torch.cuda.is_available()


def setup_run(cfg: Any, grad_accum: int = 1) -> RunContext:
    """Accelerator (CPU when there is no GPU, or what ``accelerate launch`` configured), seeds, run directory
    with the resolved ``config.yaml``, metrics logger."""
    accelerator = Accelerator(gradient_accumulation_steps=grad_accum, cpu=_cpu_distributed())
    set_seed(cfg.seed)
    out_dir = Path(cfg.logging.out_dir)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(to_yaml(cfg), encoding="utf-8")
    metrics = MetricsLogger(out_dir, tensorboard=cfg.logging.tensorboard, enabled=accelerator.is_main_process)
    return RunContext(accelerator, out_dir, metrics, cfg)


def log_load_stats(ctx: RunContext, name: str, stats: LoadStats) -> None:
    ctx.print(f"{name}: {stats.summary()}")


def load_features(
    ctx: RunContext, featurize: Any, path: str, tokenizer: Any, cfg: Any, name: str
) -> list[Any]:
    """``featurize(path, tokenizer, cfg, stats)`` with its load statistics printed as ``name path: ...``."""
    stats = LoadStats()
    features = featurize(path, tokenizer, cfg, stats)
    log_load_stats(ctx, f"{name} {path}", stats)
    return features


def load_train_valid(
    ctx: RunContext, featurize: Any, tokenizer: Any, cfg: Any, what: str
) -> tuple[list[Any], list[Any]]:
    """Featurised ``data.train`` and ``data.valid``, or a seeded ``data.valid_fraction`` of train when no valid."""
    train = load_features(ctx, featurize, cfg.data.train, tokenizer, cfg, f"train {what}")
    if cfg.data.valid:
        return train, load_features(ctx, featurize, cfg.data.valid, tokenizer, cfg, f"valid {what}")
    return split_validation(train, cfg.data.valid_fraction, cfg.seed)


def split_validation(items: list[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """Hold out ``fraction`` of ``items`` (at least one when fraction > 0) with a seeded shuffle."""
    if fraction <= 0 or len(items) < 2:
        return items, []
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_val = min(len(items) - 1, max(1, round(fraction * len(items))))
    val = set(order[:n_val])
    return [x for i, x in enumerate(items) if i not in val], [x for i, x in enumerate(items) if i in val]


# --------------------------------------------------------------------------- batching


def micro_batches(
    lengths: Sequence[int],
    ctx: RunContext,
    seed: int,
    batch_size: int | None = None,
    max_tokens: int | None = None,
    start_micro: int = 0,
) -> Iterator[tuple[int, list[int]]]:
    """Endless ``(epoch, indices)`` of this rank's micro-batches, epoch after epoch; skips ``start_micro``."""
    epoch, seen = 0, 0
    while True:
        steps = global_batches(lengths, ctx.world, epoch, seed, batch_size, max_tokens)
        if not steps:
            raise UserError(
                f"not enough training examples ({len(lengths)}) for one batch on {ctx.world} process(es)"
            )
        for parts in steps:
            if seen >= start_micro:
                yield epoch, parts[ctx.rank]
            seen += 1
        epoch += 1


def micro_batches_per_epoch(
    lengths: Sequence[int], world: int, seed: int, batch_size: int | None, max_tokens: int | None
) -> int:
    return len(global_batches(lengths, world, 0, seed, batch_size, max_tokens))


def eval_shards(n: int, batch_size: int, ctx: RunContext) -> list[tuple[list[int], bool]]:
    """This rank's evaluation batches ``(indices, real)``: every example once over all ranks, and the same number
    of batches on every rank (a rank short of data repeats a batch marked ``real=False``), because sharded
    models need every rank in every forward."""
    mine = list(range(ctx.rank, n, ctx.world))
    batches = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    most = math.ceil(math.ceil(n / ctx.world) / batch_size) if n else 0
    out = [(b, True) for b in batches]
    filler = batches[-1] if batches else [0]
    out += [(filler, False)] * (most - len(batches))
    return out


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
    }


# --------------------------------------------------------------------------- saving


def _distributed_weights(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)


@contextmanager
def atomic_run_dir(ctx: RunContext, final: Path) -> Iterator[Path]:
    """Like :func:`ppomax.checkpoint.atomic_dir`, but coordinated across ranks: every rank may write into the same
    temporary directory; the main process renames it into place when all are done."""
    acc = ctx.accelerator
    tmp = final.with_name(f"{final.name}.tmp")
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    yield tmp
    acc.wait_for_everyone()
    if ctx.is_main:
        old = final.with_name(f"{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()


def save_model(ctx: RunContext, model: torch.nn.Module, tokenizer: Any, final: Path) -> Path:
    """``save_pretrained`` of the unwrapped model (full weights gathered under ZeRO-3/FSDP) + tokenizer, atomic."""
    acc = ctx.accelerator
    state_dict = acc.get_state_dict(model) if _distributed_weights(acc) else None
    with atomic_run_dir(ctx, final) as tmp:
        if ctx.is_main:
            acc.unwrap_model(model).save_pretrained(tmp, state_dict=state_dict)
            tokenizer.save_pretrained(tmp)
    return final


class _TrainerState:
    """Counters that ride along in ``accelerator.save_state`` (registered for checkpointing)."""

    def __init__(self) -> None:
        self.step = 0
        self.extra: dict[str, Any] = {}

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "extra": json.dumps(self.extra)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.step = int(sd["step"])
        self.extra = json.loads(sd["extra"])


def save_checkpoint(ctx: RunContext, state: _TrainerState) -> Path:
    """Resumable state at ``checkpoints/step-N`` (model, optimiser, scheduler, RNG, step), then prune old ones."""
    root = ctx.out_dir / "checkpoints"
    final = root / f"step-{state.step}"
    with atomic_run_dir(ctx, final) as tmp:
        ctx.accelerator.save_state(str(tmp))
        if ctx.is_main:
            info = {"step": state.step, **state.extra}
            (tmp / "trainer_state.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    if ctx.is_main:
        prune_checkpoints(root, ctx.cfg.logging.keep_checkpoints)
    ctx.accelerator.wait_for_everyone()
    return final


def try_resume(ctx: RunContext, state: _TrainerState) -> bool:
    """Load the newest ``checkpoints/step-N`` if there is one; truncate metrics logged after it."""
    ckpt = latest_checkpoint(ctx.out_dir / "checkpoints")
    if ckpt is None:
        ctx.print(f"resume: no checkpoint under {ctx.out_dir / 'checkpoints'}; starting from scratch")
        return False
    ctx.accelerator.load_state(str(ckpt))
    ctx.metrics.truncate_after(state.step)
    ctx.print(f"resumed from {ckpt} (step {state.step})")
    return True


# --------------------------------------------------------------------------- signals


class StopFlag:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint at the next step boundary and stops cleanly."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            # not the main thread: no handlers, hence no graceful stop
            with contextlib.suppress(ValueError):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.requested:  # a second signal: stop now
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("signal %d: saving a checkpoint at the end of this step, then stopping", signum)

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def agreed(self, accelerator: Accelerator) -> bool:
        """True when any rank was asked to stop (all ranks must stop at the same step)."""
        if accelerator.num_processes == 1:
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0], device=accelerator.device)
        return bool(accelerator.gather(flag).max().item() > 0)


def reduce_sums(acc: Accelerator, values: dict[str, float]) -> dict[str, float]:
    """Sum float statistics over ranks (eval token counts, correct pairs...)."""
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], device=acc.device, dtype=torch.float64)
    if acc.num_processes > 1:
        t = acc.reduce(t, "sum")
    return dict(zip(keys, t.tolist(), strict=True))


def check_vocab(model: Any, tokenizer: Any, where: str) -> None:
    """The tokenizer's ids must fit the model's embedding table (else an index error deep in torch)."""
    emb = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > emb:
        raise UserError(
            f"{where}: the tokenizer has {len(tokenizer)} tokens but the model's embedding table has {emb}; "
            "use the tokenizer the model was trained with (model.tokenizer) or resize the model"
        )
