"""Step 5 of the PPO iteration, its metrics: the rollout's statistics (paper 5.2,
:func:`ppomax.algos.rollout_statistics`), the update's losses and clip fractions, the learning rates, and the time
of each phase (:class:`Stopwatch`) with the throughput it gives, global over ranks (one collective per kind of
reduction, :mod:`ppomax.trainers.reduce`).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ppomax.algos import RunningMoments, rollout_statistics
from ppomax.trainers.reduce import reduce_metrics

from .experience import Experience
from .update import Updater

if TYPE_CHECKING:
    from accelerate import Accelerator


class Stopwatch:
    """Wall-clock time per phase of an iteration; each phase ends with a device sync, so GPU work is counted
    where it was launched."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds[phase] += time.perf_counter() - t0

    def total(self) -> float:
        return time.perf_counter() - self.start


def iteration_metrics(
    exp: Experience,
    train_metrics: dict[str, Tensor],
    critic_only: bool,
    clock: Stopwatch,
    *,
    accelerator: Accelerator,
    moments: RunningMoments,
    updater: Updater,
    kl_clamp: float | None,
) -> dict[str, float]:
    """The iteration's logged metrics from its buffer ``exp`` and its update's ``train_metrics``, global over
    ranks."""
    acc = accelerator
    stats = rollout_statistics(
        scores=exp.computed("scores"),
        final_scores=exp.computed("final_scores"),
        response_mask=exp.response_mask,
        kl=exp.computed("kl"),
        exact_kl=exp.exact_kl,
        raw_logprobs=exp.computed("raw_logprobs"),
        ref_raw_logprobs=exp.computed("ref_raw_logprobs"),
        entropy=exp.computed("entropy"),
        values=exp.values,
        returns=exp.computed("returns"),
        advantages=exp.computed("advantages"),
        score_parts=exp.score_parts,
        running_mean=moments.mean,
        running_std=moments.std,
        all_reduce=moments.all_reduce,
        kl_clamp=kl_clamp,
    )
    local = {**stats, **train_metrics}
    local["_tokens"] = exp.response_lens.sum().float()
    local["response/truncated"] = exp.truncated.sum().float()
    reduce = None if acc.num_processes == 1 else (lambda t, op: acc.reduce(t, reduction=op))
    metrics = reduce_metrics(local, reduce, acc.device, sums=("_tokens", "response/truncated"))
    tokens = metrics.pop("_tokens")
    t_iter, t_gen = clock.total(), clock.seconds["generation"]
    critic = updater.critic
    metrics.update(
        {
            "train/critic_only": int(critic_only),
            "lr/policy": float(updater.policy.schedule.get_last_lr()[0]),
            **({} if critic is None else {"lr/critic": float(critic.schedule.get_last_lr()[0])}),
            "nonfinite/total": updater.nonfinite_total,
            "time/generation": t_gen,
            "time/scoring": clock.seconds["scoring"],
            "time/training": clock.seconds["training"],
            "time/iteration": t_iter,
            "perf/samples_per_s": exp.batch_size * acc.num_processes / t_iter,
            "perf/tokens_per_s": tokens / t_iter,
            "perf/generation_tokens_per_s": tokens / max(t_gen, 1e-9),
        }
    )
    if acc.device.type == "cuda":  # this process's peak since the start (what `ppomax plan` estimates)
        metrics["perf/peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(acc.device) / 2**30
    return metrics
