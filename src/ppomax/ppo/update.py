"""Step 4 of the PPO iteration, the minibatch updates (:class:`Updater`, each model with its optimiser and schedule
as an :class:`~ppomax.trainers.optimised.Optimised`), and how an iteration strings its steps together
(:class:`Scoring`).

The math is in :mod:`ppomax.algos`; this module only decides which tensors go where, following the paper's
PPO (section 3.2, fig. 5) and the switches of ``ppo``: ``ppo_epochs`` passes over shuffled minibatches;
advantages whitened/clipped per minibatch; clipped surrogate (eq. 15) against the sampling policy, or the
reference when ``importance_sampling`` is off, with the ``dual_clip`` bound; the KL term ``kl_coef * KL`` here
instead of in the rewards with ``kl.acts_in: loss``; entropy bonus with clip; PPO-ptx LM loss (eq. 17); clipped
value loss; global gradient clipping per model; a non-finite loss or gradient skips the step.
``micro_batch_size`` chunks (rows of similar length together, :meth:`Experience.micro_batches`) are weighted by
their token share, so they give the whole minibatch's gradient. Each model's backward follows its own forward, so
one model's activations are held at a time.

:class:`SeparateScoring` runs the scoring pass (:mod:`ppomax.ppo.scoring`), the advantages
(:mod:`ppomax.ppo.advantages`) and the updates in this order; where one epoch over one minibatch makes the
update's first forward an exact scoring pass, :mod:`ppomax.ppo.fused` folds the scoring into the update instead
(the trainer chooses between them once, :class:`Scoring`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor

from ppomax.algos import (
    AllReduce,
    RunningMoments,
    entropy_bonus_loss,
    kl_loss,
    lm_nll,
    normalize_advantages,
    policy_loss,
    token_weights,
    value_loss,
)
from ppomax.algos.registry import LOSS_AGGREGATIONS
from ppomax.config import GenerationConfig, PPOSettings
from ppomax.data import IGNORE_INDEX
from ppomax.trainers.optimised import Optimised, step_together
from ppomax.trainers.reduce import reduction_of

from .advantages import compute_advantages, trainable_part
from .experience import Experience
from .models import Forward
from .scoring import Rollouts

if TYPE_CHECKING:
    from accelerate import Accelerator

    from ppomax.algos.losses import Aggregation
    from ppomax.models.lm_head import ResponseLogits


@dataclasses.dataclass
class Updater:
    """Minibatch updates of policy and critic (one optimiser step per minibatch, per model); ``critic`` None
    without a critic (a critic-free ``ppo.advantage_estimator``: no values, no value loss)."""

    ppo: PPOSettings
    accelerator: Accelerator
    fwd: Forward
    policy: Optimised
    critic: Optimised | None
    seed: int
    all_reduce: AllReduce | None = None
    generation: GenerationConfig = dataclasses.field(default_factory=GenerationConfig)
    """The sampling settings the updates depend on: ``samples_per_prompt`` responses to one prompt are that many
    consecutive rows of the buffer (the minibatch shuffle moves whole groups, :attr:`group_size`), and
    ``max_new_tokens`` is the constant length of ``ppo.loss_aggregation: seq_mean_token_sum_norm``."""
    ptx_batch: Callable[[int], dict[str, Tensor]] | None = None
    measure_mismatch: bool = False
    """Log ``policy/logprob_mismatch_{max,mean}``: |old log-prob - the update's first forward's| over the first
    minibatch's response tokens (before any step: the old log-probs' error, e.g. from the sampling pass)."""
    nonfinite_in_row: int = 0
    _measuring: bool = dataclasses.field(default=False, init=False, repr=False)
    nonfinite_total: int = 0

    @property
    def group_size(self) -> int:
        return self.generation.samples_per_prompt

    def state_dict(self) -> dict[str, int]:
        """The counter a checkpoint keeps (a checkpoint is only taken after a good update: none in a row)."""
        return {"nonfinite_total": self.nonfinite_total}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.nonfinite_total = int(state["nonfinite_total"])

    def update(self, exp: Experience, step: int, critic_only: bool, *, kl_coef: float) -> dict[str, Tensor]:
        """``ppo_epochs`` passes over shuffled minibatches of ``exp``, one optimiser step per model and minibatch;
        returns the minibatches' metrics combined (:func:`_combine`). Stops early once ``max_nonfinite_in_row``
        updates in a row were skipped. Rows without a finite score are left out (:func:`trainable_part`); a
        minibatch of such rows only is passed over, and a buffer of them only counts as one skipped update.
        ``kl_coef``: the iteration's KL coefficient (:func:`compute_advantages`), in the loss with
        ``ppo.kl.acts_in: loss``."""
        p = self.ppo
        exp = trainable_part(exp)
        steps: list[tuple[dict[str, Tensor], bool]] = []
        for epoch in range(p.ppo_epochs):
            perm = self._epoch_order(exp.batch_size, step, epoch)
            for start in range(0, exp.batch_size, p.minibatch_size):
                mb = exp.select(perm[start : start + p.minibatch_size])
                if not self._has_tokens(mb):  # no finite score in it: no step (Adam moves even on zero grads)
                    continue
                self._measuring = self.measure_mismatch and not steps and not critic_only
                steps.append(self._minibatch(mb, critic_only, kl_coef=kl_coef))
                self._measuring = False
                if self.nonfinite_in_row >= p.max_nonfinite_in_row:
                    break
            if self.nonfinite_in_row >= p.max_nonfinite_in_row:
                break
        return self._summary(steps)

    def _epoch_order(self, rows: int, step: int, epoch: int) -> Tensor:
        """The buffer's rows in the order of ``epoch`` of iteration ``step`` (:meth:`_shuffle`), seeded by
        (seed, step, epoch), not by the global RNG: resuming needs no extra state."""
        return self._shuffle(
            rows, torch.Generator().manual_seed(self.seed * 1_000_003 + step * 1_009 + epoch)
        )

    def _shuffle(self, rows: int, g: torch.Generator) -> Tensor:
        """A seeded permutation of the buffer's rows that keeps each group (``group_size`` consecutive rows, one
        prompt's responses) together and in order: the groups are shuffled, not the rows, so a minibatch (a
        multiple of the group size) holds whole groups. Group size 1: ``randperm(rows)`` itself."""
        n = self.group_size
        perm = torch.randperm(rows // n, generator=g)
        return perm if n == 1 else (perm.unsqueeze(1) * n + torch.arange(n)).flatten()

    def _has_tokens(self, mb: Experience) -> bool:
        """Whether the minibatch has a response token to train on, on any rank (all ranks decide alike)."""
        n = mb.response_mask.sum().float()
        return bool((self.all_reduce(n) if self.all_reduce is not None else n) > 0)

    def _summary(self, steps: list[tuple[dict[str, Tensor], bool]]) -> dict[str, Tensor]:
        """An update's metrics from its minibatches' (metrics, stepped): each metric combined over them
        (:func:`_combine`: ``*_max`` maxed, ``*_count`` summed, the rest averaged), and ``nonfinite/skipped``
        the skipped steps. An update without a minibatch to train on (not one finite score in the buffer)
        counts as one skipped update, towards ``max_nonfinite_in_row``."""
        skipped = sum(not ok for _, ok in steps)
        if not steps:
            skipped = 1
            self.nonfinite_in_row += 1
            self.nonfinite_total += 1
        by_name: dict[str, list[Tensor]] = {}
        for metrics, _ in steps:
            for k, v in metrics.items():
                by_name.setdefault(k, []).append(v)
        out = {k: _combine(k, v) for k, v in by_name.items()}
        out["nonfinite/skipped"] = torch.tensor(float(skipped))
        return out

    def _minibatch(
        self, mb: Experience, critic_only: bool, *, kl_coef: float
    ) -> tuple[dict[str, Tensor], bool]:
        """One optimiser step per model on minibatch ``mb``: its advantages whitened, then each micro-batch's
        PPO-ptx backward and the trained models' forward, loss and backward (:meth:`_losses`), then the step;
        returns (metrics, whether it stepped). ``kl_coef``: as in :meth:`update`."""
        mb = self._normalized(mb)
        chunks = mb.micro_batches(self.ppo.micro_batch_size)
        policy_weights, critic_weights = self._chunk_weights(mb, chunks)
        ptx = self._ptx_chunks(len(chunks), critic_only)
        metrics: dict[str, Tensor] = {}
        total_loss = torch.zeros((), device=mb.sequences.device)
        for i, rows in enumerate(chunks):
            chunk = mb if len(chunks) == 1 else mb.select(rows)
            part = ptx[i]
            if part is not None:
                total_loss = total_loss + self._ptx_backward(*part, metrics)
            with self._no_sync(i < len(chunks) - 1):
                losses = self._losses(chunk, critic_only, kl_coef, policy_weights[i], critic_weights[i])
            total_loss = fold_losses(metrics, total_loss, losses, policy_weights[i], critic_weights[i])
        ok = self._step(total_loss, critic_only, metrics)
        metrics["loss/total"] = total_loss
        return metrics, ok

    def _normalized(self, mb: Experience) -> Experience:
        """``mb`` with its advantages whitened/clipped as ``ppo`` asks (per minibatch, over all ranks)."""
        p = self.ppo
        return dataclasses.replace(
            mb,
            advantages=normalize_advantages(
                mb.computed("advantages"),
                mb.response_mask,
                p.advantage_norm,
                p.advantage_clip,
                self.all_reduce,
            ),
        )

    def _chunk_weights(self, mb: Experience, chunks: list[list[int]]) -> tuple[Tensor, Tensor]:
        """(policy loss weights, critic loss weights) of the micro-batches ``chunks`` of ``mb``.

        Micro-batches (gradient accumulation) change memory, not the update: each chunk's token means are
        weighted by its share of the minibatch's response tokens, over all ranks (token_weights), so the
        accumulated gradient is that of the whole minibatch's token means and DDP's average over ranks that
        of the token means over every rank's minibatch (the ranks' tokens weigh alike, however the buffer was
        sharded). The policy loss's mean (``ppo.loss_aggregation``) may be over responses rather than tokens:
        its chunks are then weighted by their share of the minibatch's responses (those with a token to train
        on)."""
        tokens = torch.stack([mb.response_mask[rows].sum() for rows in chunks])
        responses = torch.stack([mb.response_mask[rows].any(dim=1).sum() for rows in chunks])
        by_token, by_response = token_weights(torch.stack([tokens, responses]), self.all_reduce)
        per_response = LOSS_AGGREGATIONS.spec(self.ppo.loss_aggregation).unit == "sequence"
        return (by_response if per_response else by_token), by_token

    def _ptx_chunks(self, n_chunks: int, critic_only: bool) -> list[tuple[dict[str, Tensor], Tensor] | None]:
        """A minibatch's PPO-ptx examples (``ptx_batch_size`` of them) split over its ``n_chunks`` micro-batches,
        each part with its weight: its share of the examples' target tokens over all ranks, as the
        micro-batches' own (:meth:`_chunk_weights`). None for a micro-batch without examples, and for all of them
        without PPO-ptx or in critic-only iterations."""
        p = self.ppo
        if critic_only or not (p.ptx_coef > 0 and self.ptx_batch is not None):
            return [None] * n_chunks
        ptx = self.ptx_batch(p.ptx_batch_size)
        n_ptx = len(ptx["input_ids"])
        bounds = [(i * n_ptx // n_chunks, (i + 1) * n_ptx // n_chunks) for i in range(n_chunks)]
        targets = ptx["labels"][:, 1:] != IGNORE_INDEX
        weights = token_weights(torch.stack([targets[lo:hi].sum() for lo, hi in bounds]), self.all_reduce)
        return [
            ({k: v[lo:hi] for k, v in ptx.items()}, weights[i]) if hi > lo else None
            for i, (lo, hi) in enumerate(bounds)
        ]

    def _ptx_backward(self, batch: dict[str, Tensor], weight: Tensor, metrics: dict[str, Tensor]) -> Tensor:
        """PPO-ptx's LM loss (paper eq. 17) on ``batch``, times ``ptx_coef`` and its ``weight``, backward through
        the policy; returns it detached and folds it into ``metrics``. Its own backward, before the main one:
        DDP allows one forward per backward, and the last backward of a minibatch (the one that synchronises
        gradients) must involve both models."""
        coef = self.ppo.ptx_coef
        with self._no_sync(True):
            logits, labels, lmask = self.fwd.lm_loss_inputs(self.policy.model, batch)
            loss = coef * weight * lm_nll(logits, labels, lmask)
            self.policy.backward(loss)
        _accumulate(metrics, {"loss/ptx": loss.detach() / coef}, 1.0)
        return loss.detach()

    def _losses(
        self, mb: Experience, critic_only: bool, kl_coef: float, policy_weight: Tensor, critic_weight: Tensor
    ) -> tuple[Tensor, Tensor, dict[str, Tensor], dict[str, Tensor]]:
        """Forward, loss and backward (of the loss times its weight) of each trained model on the micro-batch
        ``mb``: (policy loss, 0 if ``critic_only``; critic loss, 0 without a critic; the policy's metrics; the
        critic's). The models go one after the other, each backward right after its forward, which frees that
        model's graph: the activations of one model are held at a time, not of both."""
        zero = torch.zeros((), device=mb.sequences.device)
        policy_loss, critic_loss = zero, zero
        policy_metrics: dict[str, Tensor] = {}
        critic_metrics: dict[str, Tensor] = {}
        # one backward per model (the two graphs share nothing): each engine owns its own gradients
        if not critic_only:
            logits = self.fwd.response_logits(self.policy.model, mb)
            policy_loss, policy_metrics = self._policy_loss(mb, logits, kl_coef)
            self.policy.backward(policy_weight * policy_loss)
            del logits
        if self.critic is not None:
            values = self.fwd.values(self.critic.model, mb)
            critic_loss, critic_metrics = self._critic_loss(mb, values)
            self.critic.backward(critic_weight * critic_loss)
        return policy_loss, critic_loss, policy_metrics, critic_metrics

    def _policy_loss(
        self, mb: Experience, logits: ResponseLogits, kl_coef: float
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """(clipped surrogate (dual-clipped with ``dual_clip``) + the KL term with ``kl.acts_in: loss`` + entropy bonus,
        metrics) from the policy's response ``logits`` on ``mb``. The KL term compares the policy with the
        reference log-probs of the scoring pass, on the rollout's tokens, as the reward penalty would."""
        p = self.ppo
        mask = mb.response_mask
        metrics: dict[str, Tensor] = {}
        logprobs = self.fwd.logprobs(logits, mb.responses_ids)
        old = mb.computed("logprobs" if p.importance_sampling else "ref_logprobs")
        agg: Aggregation = {"aggregation": p.loss_aggregation, "horizon": self.generation.max_new_tokens}
        pg, pm = policy_loss(
            logprobs, old, mb.computed("advantages"), mask, p.clip_ratio, dual_clip=p.dual_clip, **agg
        )
        if self._measuring:
            gap = torch.where(mask, (logprobs.detach() - mb.computed("logprobs")).abs(), 0.0)
            n = mask.sum().clamp(min=1)
            metrics.update(
                {"policy/logprob_mismatch_max": gap.max(), "policy/logprob_mismatch_mean": gap.sum() / n}
            )
        loss = pg
        # Without importance sampling the ratio is pi/pi_ref: its metrics measure the distance to the
        # reference, so they carry "_vs_ref" and never the names of the distance to the sampling policy.
        vs = "" if p.importance_sampling else "_vs_ref"
        metrics.update(
            {
                "loss/pg": pm["pg_loss"],
                f"policy/pg_clipfrac{vs}": pm["pg_clipfrac"],
                f"policy/approx_kl{vs}": pm["approx_kl"],
                f"policy/ratio{vs}_mean": pm["ratio_mean"],
                f"policy/ratio{vs}_min": pm["ratio_min"],
                f"policy/ratio{vs}_max": pm["ratio_max"],
                f"policy/ratio{vs}_clamped_count": pm["ratio_clamped"],
            }
        )
        if p.dual_clip is not None:
            metrics[f"policy/dual_clip_frac{vs}"] = pm["dual_clip_frac"]
        if p.kl.acts_in == "loss" and kl_coef > 0:
            kl, km = kl_loss(
                logprobs, mb.computed("ref_logprobs"), mask, kl_coef, p.kl.estimator, p.kl.clamp, **agg
            )
            loss = loss + kl
            metrics["loss/kl"] = km["kl_loss"]
        if p.entropy_coef > 0:
            ent, em = entropy_bonus_loss(
                self.fwd.entropy(logits), mask, p.entropy_coef, p.entropy_clip, **agg
            )
            loss = loss + ent
            metrics.update(
                {"loss/entropy": em["entropy_loss"], "policy/entropy_clipfrac": em["entropy_clipfrac"]}
            )
        return loss, metrics

    def _critic_loss(self, mb: Experience, values: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """(vf_coef x value loss, metrics) from the critic's ``values`` on ``mb``."""
        p = self.ppo
        vf, vm = value_loss(
            values, mb.computed("values"), mb.computed("returns"), mb.response_mask, p.value_clip
        )
        metrics = {"loss/vf": vm["vf_loss"], "critic/vf_clipfrac": vm["vf_clipfrac"]}
        return p.vf_coef * vf, metrics

    def _step(self, loss: Tensor, critic_only: bool, metrics: dict[str, Tensor]) -> bool:
        """One optimiser step of the models trained on this minibatch, or none (:func:`step_together`: clip,
        the finiteness check over all ranks, step or skip); returns whether it stepped."""
        models = {"policy": self.policy} if not critic_only else {}
        if self.critic is not None:
            models["critic"] = self.critic
        result = step_together(models, loss, self.ppo.max_grad_norm, self.all_reduce)
        if result.stepped:
            self.nonfinite_in_row = 0
        else:
            self.nonfinite_total += 1
            if not result.loss_scale_overflow:  # a float16 scale settling is no step towards stopping
                self.nonfinite_in_row += 1
        for name, norm in result.norms.items():
            metrics[f"grad_norm/{name}"] = norm
        return result.stepped

    def _no_sync(self, skip_sync: bool) -> contextlib.AbstractContextManager[Any]:
        """The trained models' gradient all-reduce deferred on all but a minibatch's last micro-batch."""
        if not skip_sync:
            return contextlib.nullcontext()
        models = [self.policy.model] + ([self.critic.model] if self.critic is not None else [])
        return self.policy.engine.no_sync(self.accelerator, *models)


class Scoring(Protocol):
    """How an iteration gets what its update trains on (the old log-probs, entropy, values, reference log-probs
    and advantages), chosen once when the trainer is built: :class:`SeparateScoring`, the scoring pass before
    the update (the default), or :class:`ppomax.ppo.fused.FusedScoring`, the update's first forward as
    the scoring pass where that is exact. :meth:`ppomax.ppo.trainer.PPOTrainer.iteration` calls, for each
    rollout batch, :meth:`score`; on the merged buffer, :meth:`advantages` then :meth:`update`."""

    @property
    def name(self) -> str: ...

    @property
    def updater(self) -> Updater: ...

    def score(self, exp: Experience, step: int, critic_only: bool) -> None: ...

    def advantages(self, exp: Experience, *, kl_coef: float) -> None: ...

    def update(
        self, exp: Experience, step: int, critic_only: bool, *, kl_coef: float
    ) -> dict[str, Tensor]: ...


@dataclasses.dataclass
class SeparateScoring:
    """The scoring pass (policy, reference, critic, reward sources: :meth:`Rollouts.score`) on each rollout batch,
    the advantages on the buffer (:func:`compute_advantages`), then the updates (:meth:`Updater.update`)."""

    rollouts: Rollouts
    updater: Updater
    moments: RunningMoments
    ppo: PPOSettings
    generation: GenerationConfig
    name = "separate"

    def score(self, exp: Experience, step: int, critic_only: bool) -> None:
        self.rollouts.score(exp, step)

    def advantages(self, exp: Experience, *, kl_coef: float) -> None:
        compute_advantages(
            exp, self.ppo, self.generation, self.moments, self.moments.all_reduce, kl_coef=kl_coef
        )

    def update(self, exp: Experience, step: int, critic_only: bool, *, kl_coef: float) -> dict[str, Tensor]:
        return self.updater.update(exp, step, critic_only, kl_coef=kl_coef)


def _accumulate(into: dict[str, Tensor], metrics: dict[str, Tensor], weight: Tensor | float) -> None:
    """Fold one micro-batch's metrics into the minibatch's by :func:`reduction_of`: ``*_max`` by max, ``*_min``
    by min, ``*_count`` by sum, token means by their ``weight`` (token_weights: the weighted sum is the minibatch's
    token mean)."""
    for k, v in metrics.items():
        op = reduction_of(k)
        if k not in into:
            into[k] = v if op != "mean" else weight * v
        elif op == "max":
            into[k] = torch.maximum(into[k], v)
        elif op == "min":
            into[k] = torch.minimum(into[k], v)
        else:
            into[k] = into[k] + (v if op == "sum" else weight * v)


def fold_losses(
    metrics: dict[str, Tensor],
    total: Tensor,
    losses: tuple[Tensor, Tensor, dict[str, Tensor], dict[str, Tensor]],
    policy_weight: Tensor,
    critic_weight: Tensor,
) -> Tensor:
    """``total`` plus one micro-batch's weighted losses (:meth:`Updater._losses`, detached); its metrics folded
    into ``metrics``: the policy's losses are means by its aggregation (``policy_weight``), every other metric a
    token mean (``critic_weight``, the token weight)."""
    policy_loss, critic_loss, policy_metrics, critic_metrics = losses
    total = total + policy_weight * policy_loss.detach()
    total = total + critic_weight * critic_loss.detach()
    _accumulate(metrics, {k: v for k, v in policy_metrics.items() if k.startswith("loss/")}, policy_weight)
    _accumulate(
        metrics, {k: v for k, v in policy_metrics.items() if not k.startswith("loss/")}, critic_weight
    )
    _accumulate(metrics, critic_metrics, critic_weight)
    return total


def _combine(name: str, values: list[Tensor]) -> Tensor:
    """One value of a metric seen several times (minibatches, epochs) by :func:`reduction_of`; events
    (``*_count``) are counted over the whole iteration."""
    t = torch.stack(values)
    op = reduction_of(name)
    if op == "max":
        return t.amax()
    if op == "min":
        return t.amin()
    return t.sum() if op == "sum" else t.mean()
