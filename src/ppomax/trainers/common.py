"""What the trainers share besides the run engine (:mod:`ppomax.trainers.run`) and the launch
(:mod:`ppomax.trainers.launch`): loading the training data, batching across ranks and evaluation shards (the SFT/RM optimisation loop itself is
:mod:`ppomax.trainers.loop`).

Distributed runs (``accelerate launch``) shard the data themselves: every epoch the global list of batches is
built from ``seed + epoch`` identically on every rank and rank ``r`` takes every ``world``-th batch, so a resumed
run replays exactly the same order and skips what it has already seen. Metrics are reduced across ranks before
they are logged; only the main process writes files. Without a GPU, ``accelerate launch --multi_gpu
--num_processes N`` (or ``torchrun``, or mpirun) runs CPU DDP with gloo; ``accelerate launch --cpu --num_processes
N`` starts ONE process (its multi-CPU mode needs mpirun), which :func:`~ppomax.trainers.launch.launch_mismatch`
warns about.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from accelerate import Accelerator

from ppomax.data import LoadStats, Source, resolve_chat_format
from ppomax.data.batching import global_batches, rank_share
from ppomax.errors import UserError
from ppomax.models import load_tokenizer

from .inputs import Inputs, adopt_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ppomax.config import CommandConfig, RMConfig, SFTConfig

    from .run import RunContext

    C = TypeVar("C", bound=CommandConfig)
    TrainConfig = TypeVar("TrainConfig", SFTConfig, RMConfig)
    Featurize = Callable[[Source, PreTrainedTokenizerBase, C, LoadStats, str | None], list[Any]]
    """``featurize(source, tokenizer, cfg, stats, progress)``: the features of one data source."""


class TrainingError(UserError):
    """A run that cannot continue (e.g. repeated non-finite updates); the message says what to do."""


#: the data keys of held-out sets: a Hub dataset (or a source with several splits) there must name its split
HELD_OUT_KEYS = ("valid", "test", "valid_prompts")


def data_source(cfg: CommandConfig, name: str, inputs: Inputs | None = None) -> Source:
    """The source ``cfg.data.NAME`` as the data layer reads it (the data object given for it, if any), with its
    key (for messages)."""
    key = f"data.{name}"
    spec = getattr(cfg.data, name) if inputs is None else inputs.source(key, getattr(cfg.data, name))
    return Source(spec, key=key, held_out=name in HELD_OUT_KEYS)


def data_files(cfg: CommandConfig, *names: str, inputs: Inputs | None = None) -> dict[str, Source]:
    """``{"data.NAME": source}`` of the data sources (``cfg.data.NAME``, those set) a run reads: what its
    checkpoints fingerprint (:func:`~ppomax.trainers.run.open_run`) and its loaders read (:func:`load_features`)."""
    return {f"data.{name}": data_source(cfg, name, inputs) for name in names if getattr(cfg.data, name)}


def log_load_stats(ctx: RunContext, name: str, stats: LoadStats) -> None:
    ctx.print(f"{name}: {stats.summary()}")


def log_chat_format(ctx: RunContext, setting: str, tokenizer: PreTrainedTokenizerBase) -> None:
    """The start-up line saying which chat format the prompts are rendered in, and why."""
    fmt, why = resolve_chat_format(setting, tokenizer)
    ctx.print(f"chat format: {fmt} ({why})")


def load_run_tokenizer(cfg: CommandConfig, inputs: Inputs) -> tuple[PreTrainedTokenizerBase, str]:
    """The run's tokenizer (the object given, a copy prepared as a loaded one; else ``model.tokenizer`` or the
    policy's) and the config key it comes from."""
    m = cfg.model
    key = "model.tokenizer" if m.tokenizer else "model.policy"
    given = inputs.get("model.tokenizer")
    if given is not None:
        return adopt_tokenizer(given, key), key
    path = m.tokenizer or m.policy
    assert path is not None  # every trainer refuses a config without model.policy before it loads anything
    return load_tokenizer(path, m.trust_remote_code, key=key), key


def load_features(
    ctx: RunContext,
    featurize: Featurize[C],
    name: str,
    tokenizer: PreTrainedTokenizerBase,
    cfg: C,
    what: str,
) -> list[Any]:
    """``featurize(source, tokenizer, cfg, stats, progress)`` of the source ``cfg.data.NAME``, with a progress bar
    labelled ``what`` (main process, ``logging.progress``) and its load statistics printed as ``what SOURCE: ...``.
    The source is the run's (``ctx.data``: a data object given from Python included)."""
    source = ctx.data.files.get(f"data.{name}") or data_source(cfg, name)
    stats = LoadStats()
    progress = what if ctx.is_main and cfg.logging.progress else None
    features = featurize(source, tokenizer, cfg, stats, progress)
    log_load_stats(ctx, f"{what} {source.name}", stats)
    return features


def load_train_valid(
    ctx: RunContext,
    featurize: Featurize[TrainConfig],
    tokenizer: PreTrainedTokenizerBase,
    cfg: TrainConfig,
    what: str,
) -> tuple[list[Any], list[Any]]:
    """Featurised ``data.train`` and ``data.valid``, or a seeded ``data.valid_fraction`` of train when no valid."""
    train = load_features(ctx, featurize, "train", tokenizer, cfg, f"train {what}")
    if cfg.data.valid:
        return train, load_features(ctx, featurize, "valid", tokenizer, cfg, f"valid {what}")
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
    mine = rank_share(range(n), ctx.rank, ctx.world)
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


def reduce_sums(acc: Accelerator, values: dict[str, float]) -> dict[str, float]:
    """Sum float statistics over ranks (eval token counts, correct pairs...)."""
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], device=acc.device, dtype=torch.float64)
    if acc.num_processes > 1:
        t = acc.reduce(t, "sum")
    return dict(zip(keys, t.tolist(), strict=True))
