"""Steps 2-4 of the PPO iteration as one, the fused scoring: an iteration whose update's first forward is its
scoring pass.

Chosen once, when the trainer is built (:func:`fuses_scoring`), where the update is one epoch over one minibatch
that is the whole buffer, in one micro-batch (TRL's PPO setting: a rollout batch trained as one update). Then
the update's first forward runs on the weights the scoring pass would have used (nothing has stepped yet;
dropout is off), on the same rows, so its detached outputs are the old log-probs, entropy and values exactly (the
ratio is 1), and the policy and critic need not run twice. :class:`FusedScoring` is the iteration:

1. scoring (:meth:`FusedScoring.score`): the reward sources only (in critic pre-training, where the update runs
   no policy, the policy and the reference too, as a separate scoring pass would);
2. advantages (:meth:`FusedScoring.advantages`): the running moments and the final scores only
   (:func:`ppomax.ppo.advantages.score_targets`), which need no log-prob or value;
3. the update (:class:`FusedUpdater`): the policy's and the critic's forwards, the reference beside the policy
   (the exact KL needs both models' logits), then the KL penalty, token rewards and advantages from their
   detached outputs (:func:`ppomax.ppo.advantages.token_advantages`, filled into the buffer as a separate
   scoring pass would have), whitened, then the losses and one optimiser step per model.

Its cost: both models' activations are alive at once (their losses need the advantages, which need both
forwards), where the separate update holds one model's at a time (``ppomax plan`` counts it). With
micro-batches the whole minibatch's advantages, whitened together, would need every micro-batch's graph alive at
once: no fusion there.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ppomax.algos import RunningMoments
from ppomax.config import GenerationConfig, PPOSettings

from .advantages import score_targets, token_advantages, trainable_part
from .experience import Experience
from .scoring import Rollouts
from .update import Updater, fold_losses

if TYPE_CHECKING:
    from ppomax.models import AdaptersOff
    from ppomax.models.lm_head import ResponseLogits


def fuses_scoring(ppo: PPOSettings) -> bool:
    """Whether the update's own forwards give the scoring pass's old log-probs, entropy and values exactly: one
    epoch over one minibatch that is the whole buffer, in one micro-batch (see the module's docstring)."""
    return ppo.one_step_update


@dataclasses.dataclass
class FusedScoring:
    """The iteration of the fused scoring (the module's docstring): rewards, final scores, then the update that
    scores as it trains. The methods of :class:`ppomax.ppo.update.Scoring`."""

    rollouts: Rollouts
    updater: FusedUpdater
    moments: RunningMoments
    ppo: PPOSettings
    generation: GenerationConfig
    name = "fused"

    def score(self, exp: Experience, step: int, critic_only: bool) -> None:
        # policy iterations: the update's forward scores the policy and the reference; critic-only ones train
        # the critic alone, so both are scored here
        self.rollouts.score(exp, step, critic=False, forwards=critic_only)

    def advantages(self, exp: Experience, *, kl_coef: float) -> None:
        """The final scores only: the token rewards (with ``kl_coef``) and advantages come in the update."""
        score_targets(exp, self.ppo, self.generation, self.moments)

    def update(self, exp: Experience, step: int, critic_only: bool, *, kl_coef: float) -> dict[str, Tensor]:
        return self.updater.update(exp, step, critic_only, kl_coef=kl_coef, reference=self.rollouts.reference)


@dataclasses.dataclass
class FusedUpdater(Updater):
    """:class:`ppomax.ppo.update.Updater` for one epoch over one minibatch, the whole buffer, scored by
    its own first forward (the module's docstring)."""

    def update(
        self,
        exp: Experience,
        step: int,
        critic_only: bool,
        *,
        kl_coef: float,
        reference: torch.nn.Module | AdaptersOff | None = None,
    ) -> dict[str, Tensor]:
        """The update of ``exp``, which has final scores but none of the old log-probs, entropy and reference
        log-probs (unless ``critic_only``: then from the scoring pass; the log-probs and entropy also with
        ``generation.logprobs_from: generate``), values, token rewards and advantages: they come from the update's
        forward and are filled into ``exp`` in place, as :func:`ppomax.ppo.advantages.compute_advantages`
        would have. Rows without a finite score are left out of the losses as in the separate update; a buffer
        of them only is still scored (its metrics describe the rollout) and counts as one skipped update.
        ``kl_coef``: the iteration's KL coefficient, in the token rewards or in the loss (``ppo.kl.acts_in``).
        ``reference`` (unwrapped, frozen): runs beside the update's policy forward where ``exp`` has no reference
        log-probs yet (policy iterations)."""
        assert exp.batch_size <= self.ppo.minibatch_size, "one minibatch: the whole buffer"
        perm = self._epoch_order(exp.batch_size, step, epoch=0)
        mb = trainable_part(exp).select(perm)
        if not self._has_tokens(mb):  # no finite score in it: no step (Adam moves even on zero grads)
            with torch.no_grad():
                self._scored(exp, perm, *self._forward(mb, critic_only), kl_coef, reference)
            return self._summary([])
        self._measuring = self.measure_mismatch and not critic_only
        steps = [self._minibatch_scored(exp, perm, mb, critic_only, kl_coef, reference)]
        self._measuring = False
        return self._summary(steps)

    def _minibatch_scored(
        self,
        full: Experience,
        perm: Tensor,
        mb: Experience,
        critic_only: bool,
        kl_coef: float,
        reference: torch.nn.Module | AdaptersOff | None,
    ) -> tuple[dict[str, Tensor], bool]:
        """:meth:`Updater._minibatch` on ``mb`` (``full``'s trainable rows ``perm``, one micro-batch) with both
        models' forwards first, then the scoring pass's outputs and advantages from them (:meth:`_scored`),
        whitened, then each model's loss and backward: both graphs are alive until the policy's backward."""
        policy_weights, critic_weights = self._chunk_weights(mb, [list(range(mb.batch_size))])
        (ptx,) = self._ptx_chunks(1, critic_only)
        metrics: dict[str, Tensor] = {}
        total_loss = torch.zeros((), device=mb.sequences.device)
        if ptx is not None:
            total_loss = total_loss + self._ptx_backward(*ptx, metrics)
        logits, values = self._forward(mb, critic_only)
        mb = self._normalized(self._scored(full, perm, logits, values, kl_coef, reference))
        zero = torch.zeros((), device=mb.sequences.device)
        policy_loss, critic_loss = zero, zero
        policy_metrics: dict[str, Tensor] = {}
        critic_metrics: dict[str, Tensor] = {}
        if logits is not None:  # a policy iteration
            policy_loss, policy_metrics = self._policy_loss(mb, logits, kl_coef)
            self.policy.backward(policy_weights[0] * policy_loss)
            del logits
        if values is not None and self.critic is not None:  # a critic
            critic_loss, critic_metrics = self._critic_loss(mb, values)
            self.critic.backward(critic_weights[0] * critic_loss)
        losses = (policy_loss, critic_loss, policy_metrics, critic_metrics)
        total_loss = fold_losses(metrics, total_loss, losses, policy_weights[0], critic_weights[0])
        ok = self._step(total_loss, critic_only, metrics)
        metrics["loss/total"] = total_loss
        return metrics, ok

    def _forward(self, mb: Experience, critic_only: bool) -> tuple[ResponseLogits | None, Tensor | None]:
        """The trained models' forwards on ``mb``: (policy response logits, None if ``critic_only``; values,
        None without a critic)."""
        logits = None if critic_only else self.fwd.response_logits(self.policy.model, mb)
        values = None if self.critic is None else self.fwd.values(self.critic.model, mb)
        return logits, values

    @torch.no_grad()
    def _scored(
        self,
        full: Experience,
        perm: Tensor,
        logits: ResponseLogits | None,
        values: Tensor | None,
        kl_coef: float,
        reference: torch.nn.Module | AdaptersOff | None,
    ) -> Experience:
        """From the update's forward outputs on ``full``'s rows ``perm`` (policy ``logits``, critic ``values``),
        the old log-probs, entropy, values and token advantages of those rows, filled into ``full`` (in place, in
        its row order); returns the rows as the losses see them (:func:`trainable_part`). Without reference
        log-probs yet, it runs ``reference`` on the rows here, so that its logits meet the policy's for the exact
        KL."""
        rows = full.select(perm)  # all rows (the KL of a row left out of training is still monitored)
        names = ["values", "kl", "rewards", "advantages", "returns"]
        scored: list[str] = []
        ref = None
        if rows.ref_logprobs is None:
            assert logits is not None and reference is not None, "the reference runs beside the policy"
            scored += ["ref_logprobs", "ref_raw_logprobs", "exact_kl"]
            ref = self.fwd.response_logits(reference, rows)
        if rows.logprobs is None:  # else from the sampling pass (generation.logprobs_from: generate)
            assert logits is not None, "critic-only iterations score the policy in the scoring pass"
            scored += ["logprobs", "raw_logprobs", "entropy"]
        if scored:
            stats = self.fwd.scoring_stats(logits, ref, rows.responses_ids)
            for name in scored:
                setattr(rows, name, stats[name])
            names += scored
            del ref, stats
        if values is not None:
            rows.values = values.detach()
        else:  # no critic
            names.remove("values")
        token_advantages(rows, self.ppo, self.group_size, self.all_reduce, kl_coef=kl_coef)
        for name in names:
            part = getattr(rows, name)
            into = torch.zeros(full.response_mask.shape, dtype=part.dtype, device=part.device)
            into[perm.to(part.device), : part.shape[1]] = part
            setattr(full, name, into)
        return trainable_part(rows)
