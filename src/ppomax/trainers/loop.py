"""The optimisation loop shared by the SFT and reward-model trainers, on the run engine
(:mod:`ppomax.trainers.run`: directory, checkpoints, signals) and the batching of :mod:`ppomax.trainers.common`."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from ppomax.algos import AllReduce, token_weights
from ppomax.config import RMConfig, SFTConfig
from ppomax.errors import UserError
from ppomax.optim import build_optimizer, build_scheduler

from .common import TrainingError, micro_batches, micro_batches_per_epoch
from .optimised import Optimised, step_together
from .reduce import reduce_metrics
from .run import DictState, RunContext, StopFlag

# --------------------------------------------------------------------------- the loop


LossFn = Callable[
    [torch.nn.Module, dict[str, Any], dict[str, torch.Tensor] | None],
    tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor],
]


@dataclass
class LoopSpec:
    """What a trainer plugs into :func:`train_loop`.

    ``counts(batch) -> {unit: count}``: how many units (target tokens, pairs...) each of the loss's means is
    over; ``loss_fn(model, batch, weights) -> (loss, metrics, n_tokens)``: each mean over a unit multiplied by
    ``weights[unit]``, the micro-batch's share of that unit in the optimiser step (:func:`accumulate`; the unit
    ``batches`` counts micro-batches, for plain averages), and the metrics as such weighted, detached scalar
    contributions (summed over the step's micro-batches, averaged over steps and ranks when logged);
    ``weights=None`` means the batch alone. ``make_batch(indices) -> batch on device``; ``evaluate(model) ->
    metrics`` (called on every rank under no_grad, returns already-reduced numbers, may be None);
    ``on_eval(step, metrics, model)`` runs after each evaluation (e.g. to keep the best model). ``model`` is
    the prepared (possibly wrapped) model. The run's own settings (``epochs``, ``grad_accum``, ``max_grad_norm``,
    ``max_nonfinite_in_row``, ``logging.eval_every``) are read from the run's config (``ctx.cfg``).
    """

    lengths: Sequence[int]
    make_batch: Callable[[list[int]], dict[str, Any]]
    loss_fn: LossFn
    counts: Callable[[dict[str, Any]], dict[str, torch.Tensor]]
    batch_size: int | None
    max_tokens: int | None
    evaluate: Callable[[torch.nn.Module], dict[str, float] | None] | None = None
    on_eval: Callable[[int, dict[str, float], torch.nn.Module], None] | None = None
    extra_state: dict[str, Any] = field(default_factory=dict)


def total_optimizer_steps(spec: LoopSpec, cfg: SFTConfig | RMConfig, world: int) -> int:
    per_epoch = micro_batches_per_epoch(spec.lengths, world, cfg.seed, spec.batch_size, spec.max_tokens)
    if per_epoch == 0:
        raise UserError(
            f"not enough training examples ({len(spec.lengths)}) for one batch on {world} process(es)"
        )
    return max(1, math.ceil(cfg.epochs * per_epoch / cfg.grad_accum))


def train_loop(ctx: RunContext, model: torch.nn.Module, spec: LoopSpec) -> tuple[torch.nn.Module, int]:
    """Optimise ``model`` (not yet prepared) with AdamW and the configured schedule, from the run's checkpoint
    when it resumes (:meth:`RunContext.restore`).

    Returns the prepared model (pass it to :meth:`RunContext.save_model`) and the last step.

    One optimiser step = ``grad_accum`` micro-batches per rank (:mod:`ppomax.trainers.optimised`). A step whose
    loss or gradient norm is not finite on any rank is skipped (weights, optimiser state and schedule unchanged)
    and counted; ``max_nonfinite_in_row`` such steps in a row stop the run with the last checkpoint intact.
    Metrics are logged every ``logging.log_every`` steps, evaluation runs every ``eval_every`` steps and at the
    end, checkpoints every ``logging.checkpoint_every`` steps, at the last step and on SIGINT/SIGTERM (which then
    raises :class:`ppomax.errors.RunStopped`).
    """
    cfg, acc = ctx.cfg, ctx.accelerator
    assert isinstance(cfg, SFTConfig | RMConfig)  # PPO has its own loop
    total = total_optimizer_steps(spec, cfg, ctx.world)
    optimizer = build_optimizer(model.parameters(), cfg.optim.lr, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, total)
    # token-balanced batches vary in size: DeepSpeed's micro-batch size is bookkeeping only
    prepared = ctx.engine.prepare_trained(
        acc, {"model": (model, optimizer)}, spec.batch_size or 1, cfg.max_grad_norm, "max_grad_norm"
    )
    model, optimizer = prepared["model"]
    trained = Optimised(model, optimizer, scheduler, acc, ctx.engine)
    # Not prepared: accelerate would step it once per process; this schedule counts optimiser steps.
    ctx.track(schedule=scheduler, extra=DictState(spec.extra_state))
    step = ctx.restore()
    if step >= total:  # a run resumed after its last checkpoint: only its end is left
        ctx.print(f"already trained for {step} of {total} steps")
        if spec.evaluate:
            _run_eval(ctx, model, spec, step)
        return model, step

    log_every = cfg.logging.log_every
    ckpt_every = cfg.logging.checkpoint_every
    bar = tqdm(total=total, initial=step, disable=not (ctx.is_main and cfg.logging.progress), desc="train")
    sums: dict[str, torch.Tensor] = {}
    n_steps = 0
    all_reduce = None if ctx.world == 1 else (lambda t: acc.reduce(t, "sum"))
    tokens = torch.zeros((), device=ctx.device)
    t_log = time.perf_counter()
    nonfinite_in_row, skipped_total = 0, 0
    grad_norms: list[float] = []
    batches = micro_batches(
        spec.lengths,
        ctx,
        cfg.seed,
        spec.batch_size,
        spec.max_tokens,
        start_micro=step * cfg.grad_accum,
    )
    model.train()
    with StopFlag() as stop:
        while step < total:
            step_batches = []
            for _ in range(cfg.grad_accum):
                epoch, idx = next(batches)
                step_batches.append(spec.make_batch(idx))
            metrics, n_tok, loss = accumulate(trained, step_batches, spec.loss_fn, spec.counts, all_reduce)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0) + v
            tokens += n_tok
            n_steps += 1
            lr = optimizer.param_groups[0]["lr"]  # the rate this step uses
            result = step_together({"model": trained}, loss, cfg.max_grad_norm, all_reduce)
            norms = result.norms
            if result.loss_scale_overflow:  # a float16 scale settling: no step towards stopping
                skipped_total += 1
                ctx.warn(
                    f"step {step + 1}: float16 gradient overflow; update skipped, the loss scale backs off"
                )
            elif not result.stepped:
                nonfinite_in_row += 1
                skipped_total += 1
                ctx.warn(f"step {step + 1}: non-finite loss or gradient norm; update skipped")
                if nonfinite_in_row >= cfg.max_nonfinite_in_row:
                    raise TrainingError(
                        f"{nonfinite_in_row} non-finite updates in a row at step {step + 1}: lower optim.lr, "
                        "check the data, or use float32; the last checkpoint under "
                        f"{ctx.out_dir / 'checkpoints'} is intact"
                    )
            else:
                nonfinite_in_row = 0
                if "model" in norms:
                    grad_norms.append(float(norms["model"]))
            step += 1
            bar.update(1)

            logged: dict[str, Any] = {}
            if step % log_every == 0 or step == total:
                reduce = None if ctx.world == 1 else (lambda t, op: acc.reduce(t, op))
                record = reduce_metrics({k: v / n_steps for k, v in sums.items()}, reduce, acc.device)
                elapsed = max(time.perf_counter() - t_log, 1e-9)
                all_tokens = acc.reduce(tokens.clone(), "sum").item() if ctx.world > 1 else tokens.item()
                record.update(
                    lr=lr,
                    epoch=epoch,
                    tokens_per_s=all_tokens / elapsed,
                    skipped_updates=skipped_total,
                )
                if grad_norms:
                    record["grad_norm"] = sum(grad_norms) / len(grad_norms)
                logged = ctx.metrics.log(step, record, prefix="train/")
                bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}")
                sums, n_steps, grad_norms = {}, 0, []
                tokens.zero_()
                t_log = time.perf_counter()

            # callbacks, evaluation and checkpoints do not count against tokens/s
            t_pause = time.perf_counter()
            ctx.callbacks.step_end(step, logged)
            if (
                spec.evaluate
                and cfg.logging.eval_every
                and step % cfg.logging.eval_every == 0
                and step < total
            ):
                _run_eval(ctx, model, spec, step)
            signum = stop.agreed(acc)
            if (ckpt_every and step % ckpt_every == 0) or step == total or signum is not None:
                ctx.save_checkpoint(step)
            t_log += time.perf_counter() - t_pause
            if signum is not None:
                bar.close()
                raise ctx.stopped(signum, step)
    bar.close()
    if spec.evaluate:
        _run_eval(ctx, model, spec, step)
    return model, step


def accumulate(
    trained: Optimised,
    batches: Sequence[dict[str, Any]],
    loss_fn: LossFn,
    counts: Callable[[dict[str, Any]], dict[str, torch.Tensor]],
    all_reduce: AllReduce | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Forward and backward of one optimiser step's micro-batches (this rank's); returns the summed metric
    contributions, the number of input tokens and the step's loss (detached).

    Accumulation changes memory, not the update: each mean in the loss is weighted by the micro-batch's share
    of its units in the whole step over all ranks (:func:`ppomax.algos.token_weights` on ``counts``), so the
    accumulated gradient is that of the step's batches at once, and DDP's average over ranks that of every
    rank's units together (token-balanced batches with varying pair or token counts weigh each unit alike).
    """
    device = trained.accelerator.device
    per = [{**counts(b), "batches": 1} for b in batches]
    units = sorted(per[0])
    table = torch.stack(
        [torch.stack([torch.as_tensor(c[u], dtype=torch.float32, device=device) for c in per]) for u in units]
    )
    weights = token_weights(table, all_reduce)
    sums: dict[str, torch.Tensor] = {}
    tokens = torch.zeros((), device=device)
    total = torch.zeros((), device=device)
    for i, batch in enumerate(batches):
        with trained.no_sync() if i < len(batches) - 1 else contextlib.nullcontext():
            loss, metrics, n_tok = loss_fn(
                trained.model, batch, {u: weights[j, i] for j, u in enumerate(units)}
            )
            trained.backward(loss)
        total += loss.detach().float()
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0) + v.detach().float()
        tokens += n_tok
    return sums, tokens, total


def _run_eval(ctx: RunContext, model: torch.nn.Module, spec: LoopSpec, step: int) -> None:
    model.eval()
    try:
        with torch.no_grad():
            result = spec.evaluate(model) if spec.evaluate else None
    finally:
        model.train()
    if result:
        ctx.callbacks.evaluate(step, ctx.metrics.log(step, result, prefix="eval/"))
        ctx.print("step " + str(step) + ": " + ", ".join(f"{k}={v:.4g}" for k, v in result.items()))
        if spec.on_eval:
            spec.on_eval(step, result, model)
