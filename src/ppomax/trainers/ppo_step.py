"""One PPO iteration's work: generation and the scoring pass (:class:`Rollouts`), advantages, and the minibatch
updates (:class:`Updater`, each model with its optimiser and schedule as an :class:`Optimised`).

The math is in :mod:`ppomax.algos`; this module only decides which tensors go where, following the paper's
PPO (section 3.2, fig. 5) and the switches of ``ppo``:

1. scoring (no gradient): old log-probs, entropy and values from the policy and critic, reference log-probs,
   raw scores from the reward sources; each computed once per iteration and reused by every epoch;
2. advantages: running reward moments updated with the raw scores (eq. 18), the score re-parameterised
   (``reward_transform``, then ``reward_clip``; a truncated response may get
   ``truncated_penalty``),
   token-level rewards ``-kl_coef * KL_t`` + score at the last token (eq. 19), GAE (eq. 9-11), or a critic-free
   estimator (``advantage_estimator``: GRPO, RLOO, REINFORCE++; :mod:`ppomax.algos.estimators`), which
   then needs no values (no critic exists);
3. updates: ``ppo_epochs`` passes over shuffled minibatches; advantages whitened/clipped per minibatch; clipped
   surrogate (eq. 15) against the sampling policy, or the reference when ``importance_sampling`` is off, with
   the ``dual_clip`` bound; the KL term ``kl_coef * KL`` here instead of in the rewards with ``kl.acts_in: loss``;
   entropy bonus with clip; PPO-ptx LM loss (eq. 17); clipped value loss; global gradient clipping per model; a
   non-finite loss or gradient skips the step. ``micro_batch_size`` chunks are weighted by their token share, so
   they give the whole minibatch's gradient. Each model's backward follows its own forward, so one model's
   activations are held at a time.

:class:`SeparateScoring` runs these three steps in this order; where one epoch over one minibatch makes the
update's first forward an exact scoring pass, :mod:`ppomax.trainers.ppo_fused` folds step 1 into step 3 instead
(the trainer chooses between them once, :class:`Scoring`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from ppomax.algos import (
    AdvantageInputs,
    AllReduce,
    RunningMoments,
    advantages_of,
    entropy_bonus_loss,
    kl_from_logits,
    kl_loss,
    kl_per_token,
    lm_nll,
    normalize_advantages,
    policy_loss,
    reparameterize_scores,
    token_level_rewards,
    token_weights,
    trainable_rows,
    value_loss,
)
from ppomax.algos.registry import LOSS_AGGREGATIONS
from ppomax.config import GenerationConfig, PPOSettings
from ppomax.data import IGNORE_INDEX
from ppomax.experience import Experience
from ppomax.rewards import RewardError, RewardSources
from ppomax.rollout import RolloutEngine, rollout

from .optimised import Optimised, step_together
from .ppo_data import PromptSet
from .ppo_models import Forward
from .reduce import reduction_of


@torch.no_grad()
def score_experience(
    exp: Experience,
    *,
    policy: Any | None,
    reference: Any | None,
    critic: Any | None,
    fwd: Forward,
    rewards: RewardSources,
    eos_ids: list[int],
    chunk_size: int | None = None,
) -> None:
    """Fill the scoring-pass fields of ``exp`` in place (see :class:`Experience`). ``critic=None`` skips values
    (evaluation), ``policy=None`` the policy's log-probs and entropy (they come from the sampling pass) and
    ``reference=None`` the reference's. Where both models run, their logits of a chunk are held together for the
    exact KL (:func:`exact_kl`). Models are used as given (pass unwrapped ones: no gradient, no DDP
    synchronisation).
    ``chunk_size`` rows per forward bound the [rows, R, V] logits in memory (``ppo.micro_batch_size``)."""
    n, r_all = exp.batch_size, exp.response_width
    step = chunk_size or n
    out: dict[str, list[Tensor]] = {}
    for lo in range(0, n, step):
        # A chunk drops the columns that are padding in all its rows (Experience.select): position ids come
        # from the mask, so a row's outputs are those of the whole batch (to float rounding); its per-token
        # outputs are padded back to the batch's R with zeros (off the response mask, never read).
        chunk = exp if step >= n else exp.select(list(range(lo, min(lo + step, n))))
        seqs, mask, width = chunk.sequences, chunk.attention_mask, chunk.prompt_width
        labels = seqs[:, width:]
        held = None
        for name, model in (("", policy), ("ref_", reference)):
            if model is None:
                continue
            logits = fwd.response_logits(model, seqs, mask, width)
            lp = fwd.logprobs(logits, labels)
            out.setdefault(f"{name}logprobs", []).append(lp)
            out.setdefault(f"{name}raw_logprobs", []).append(
                lp if fwd.temperature == 1.0 else fwd.logprobs(logits, labels, raw=True)
            )
            if model is policy:
                out.setdefault("entropy", []).append(fwd.entropy(logits))
                held = logits if reference is not None else None
            elif held is not None:
                out.setdefault("exact_kl", []).append(exact_kl(fwd, held, logits))
                held = None
            del logits
        if critic is not None:
            out.setdefault("values", []).append(fwd.values(critic, seqs, mask, width))
    for name, parts in out.items():
        setattr(exp, name, torch.cat([_pad_right(t, r_all) for t in parts]))
    exp.scores, exp.score_parts = rewards(exp, eos_ids)


def exact_kl(fwd: Forward, logits: Tensor, ref_logits: Tensor) -> Tensor:
    """[rows, R] exact KL(pi || ref) over the vocabulary (:func:`ppomax.algos.kl_from_logits`) from the policy's
    and the reference's response logits [rows, R, V], under the convention of ``fwd.logprobs``
    (temperature-scaled unless ``generation.logprobs_from: raw``): the quantity the sampled KL estimators
    estimate, without their noise and without the bias of tokens drawn with top-p and a repetition penalty
    rather than from the policy. Its float32 temporaries are bounded by :func:`kl_from_logits`'s slices."""
    return kl_from_logits(logits.detach(), ref_logits.detach(), fwd.temperature)


def _pad_right(t: Tensor, width: int) -> Tensor:
    """[B, r] -> [B, width], zeros on the right (the tensor itself when it is that wide already)."""
    return t if t.shape[1] == width else F.pad(t, (0, width - t.shape[1]))


def final_scores(
    raw: Tensor, truncated: Tensor, ppo: PPOSettings, gen: GenerationConfig, moments: RunningMoments
) -> Tensor:
    """The score added at the last token, from raw scores [B] and running moments already updated with this batch:
    re-parameterised as ``ppo`` asks (paper 5.3.1, :func:`ppomax.algos.reparameterize_scores`); with
    ``truncated_response: penalty`` a response without EOS gets ``truncated_penalty`` instead."""
    out = reparameterize_scores(raw, moments.mean, moments.std, ppo.reward_transform, ppo.reward_clip)
    if gen.truncated_response == "penalty":
        out = torch.where(truncated, torch.full_like(out, gen.truncated_penalty), out)
    return out


@torch.no_grad()
def compute_advantages(
    exp: Experience,
    ppo: PPOSettings,
    gen: GenerationConfig,
    moments: RunningMoments,
    all_reduce: AllReduce | None = None,
    *,
    kl_coef: float,
) -> None:
    """Fill ``final_scores``, ``kl``, ``rewards``, ``advantages``, ``returns`` of ``exp`` in place.

    The running moments always track the raw scores (so they can be monitored), but are *used* only by the
    switches that ask for them. A sample whose score is NaN or +-inf is left out of training as if it were not
    in the buffer (:func:`ppomax.algos.trainable_rows`): it enters neither the moments nor the token rewards and
    advantages (zero), its final score is NaN (none was added), and :func:`trainable_part` drops it from the
    updates. Its KL and the rest of the scoring pass still describe what the policy generated. With
    ``truncated_response: penalty`` the truncated responses' raw scores stay out of the moments too, since
    those are replaced. ``all_reduce``: the estimators' global statistics (REINFORCE++'s whitening) over ranks.
    ``kl_coef``: the iteration's KL coefficient (``ppo.kl.coef``, or the adaptive one of ``ppo.kl.target``),
    resolved once per iteration by the trainer.
    """
    score_targets(exp, ppo, gen, moments)
    token_advantages(exp, ppo, gen.samples_per_prompt, all_reduce, kl_coef=kl_coef)


@torch.no_grad()
def score_targets(exp: Experience, ppo: PPOSettings, gen: GenerationConfig, moments: RunningMoments) -> None:
    """The first half of :func:`compute_advantages`, which needs no log-prob or value: the running moments
    updated with the raw scores and ``final_scores`` filled (NaN for a row left out of training)."""
    raw = exp.scores
    penalised = exp.truncated if gen.truncated_response == "penalty" else None
    keep = trainable_rows(raw, penalised)
    moments.update(raw, mask=keep if penalised is None else keep & ~penalised)
    scores = final_scores(torch.where(keep, raw, torch.zeros_like(raw)), exp.truncated, ppo, gen, moments)
    exp.final_scores = torch.where(keep, scores, torch.full_like(scores, float("nan")))


@torch.no_grad()
def token_advantages(
    exp: Experience,
    ppo: PPOSettings,
    group_size: int = 1,
    all_reduce: AllReduce | None = None,
    *,
    kl_coef: float,
) -> None:
    """The second half of :func:`compute_advantages`, from ``final_scores`` and the scoring pass's log-probs and
    values: ``kl``, ``rewards``, ``advantages``, ``returns``. GAE works row by row (any selection of rows gives
    the same rows' values); GRPO and RLOO group by group (the ``group_size`` responses to a prompt are
    consecutive rows, as :class:`Updater`'s shuffle keeps them); REINFORCE++ whitens over the whole batch, all
    ranks through ``all_reduce``. Without a critic ``returns`` is the reward-to-go (``gamma``-discounted).
    With ``kl.acts_in: loss`` the rewards carry no KL term (the policy loss does, :func:`kl_loss`); ``kl`` is filled
    either way (it is what the rollout spent, and what the adaptive coefficient measures), unclamped: ``kl.clamp``
    bounds the penalty only."""
    mask = exp.response_mask
    kl = kl_per_token(exp.logprobs, exp.ref_logprobs, ppo.kl.estimator)
    exp.kl = torch.where(mask, kl, torch.zeros((), dtype=kl.dtype, device=kl.device))
    if exp.exact_kl is not None:
        exp.exact_kl = torch.where(mask, exp.exact_kl, torch.zeros((), dtype=kl.dtype, device=kl.device))
    train = mask & torch.isfinite(exp.final_scores).unsqueeze(1)
    if ppo.kl.acts_in == "loss":
        penalised = torch.zeros_like(exp.kl)
    elif ppo.kl.clamp is None:
        penalised = exp.kl
    else:
        penalised = kl_per_token(exp.logprobs, exp.ref_logprobs, ppo.kl.estimator, ppo.kl.clamp)
    exp.rewards = token_level_rewards(exp.final_scores, penalised, train, kl_coef)
    exp.advantages, exp.returns = advantages_of(
        ppo.advantage_estimator,
        AdvantageInputs(
            exp.rewards,
            train,
            exp.values,
            ppo.gamma,
            ppo.lam,
            group_size=group_size,
            all_reduce=all_reduce,
            group_std_norm=ppo.group_std_norm,
            scores=exp.final_scores,
        ),
    )


def trainable_part(exp: Experience) -> Experience:
    """``exp`` as the updates see it: the response mask of the rows left out of training (a NaN final score,
    see :func:`compute_advantages`) zeroed, so they weigh nothing in the whitening and the losses."""
    keep = torch.isfinite(exp.final_scores)
    return dataclasses.replace(exp, response_mask=exp.response_mask & keep.unsqueeze(1))


@dataclasses.dataclass
class Rollouts:
    """Generation and the scoring pass of the PPO buffer (and of evaluation), on unwrapped models: no gradient,
    no DDP synchronisation."""

    engine: RolloutEngine
    fwd: Forward
    rewards: RewardSources
    tokenizer: Any
    eos_ids: list[int]
    pad_id: int
    device: torch.device
    policy: Any
    reference: Any
    critic: Any
    """None without a critic (a critic-free ``ppo.advantage_estimator``)."""
    chunk_size: int | None = None
    """Rows per scoring forward (``ppo.micro_batch_size``): bounds the [rows, R, V] logits in memory."""
    logprobs_from_generate: bool = False
    """``generation.logprobs_from: generate``: sampled rollouts carry the policy's log-probs and entropy from
    the sampling pass's logits, and the scoring pass does not run the policy on them."""

    def generate(self, prompts: PromptSet, indices: list[int], greedy: bool = False) -> Experience:
        """Responses to ``prompts[indices]`` (sampled as ``generation`` says, or greedy)."""
        batch = prompts.batch(indices, self.pad_id, self.device)
        return rollout(
            self.engine,
            self.policy,
            self.tokenizer,
            batch["input_ids"],
            batch["attention_mask"],
            eos_ids=self.eos_ids,
            pad_id=self.pad_id,
            prompts=batch["prompts"],
            meta=batch["meta"],
            greedy=greedy,
            # evaluation (greedy) recomputes: its KL and perplexity stay comparable across settings
            logprobs_temperature=self.fwd.temperature if self.logprobs_from_generate and not greedy else None,
        )

    def score(self, exp: Experience, step: int | None = None, *, critic: bool = True) -> None:
        """The scoring pass (:func:`score_experience`): policy (unless ``exp`` has its log-probs from the sampling
        pass), reference, critic (``critic=False``: no values, as evaluation needs none) and reward sources. A
        reward function's error names the iteration ``step``."""
        with _naming_step(step):
            score_experience(
                exp,
                policy=self.policy if exp.logprobs is None else None,
                reference=self.reference,
                critic=self.critic if critic else None,
                fwd=self.fwd,
                rewards=self.rewards,
                eos_ids=self.eos_ids,
                chunk_size=self.chunk_size,
            )

    def score_rewards(self, exp: Experience, step: int | None = None) -> None:
        """The reward sources only: ``exp.scores`` and ``exp.score_parts`` (the models' outputs come from
        elsewhere, :class:`ppomax.trainers.ppo_fused.FusedScoring`). Errors as in :meth:`score`."""
        with _naming_step(step):
            exp.scores, exp.score_parts = self.rewards(exp, self.eos_ids)


@contextlib.contextmanager
def _naming_step(step: int | None) -> Iterator[None]:
    """A reward function's error (:class:`RewardError`) raised again with the iteration ``step`` in front."""
    try:
        yield
    except RewardError as exc:
        if step is None:
            raise
        raise RewardError(f"step {step}: {exc}") from exc.__cause__


@dataclasses.dataclass
class Updater:
    """Minibatch updates of policy and critic (one optimiser step per minibatch, per model); ``critic`` None
    without a critic (a critic-free ``ppo.advantage_estimator``: no values, no value loss)."""

    ppo: PPOSettings
    accelerator: Any
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
        size = self.ppo.micro_batch_size or mb.batch_size
        chunks = [list(range(i, min(i + size, mb.batch_size))) for i in range(0, mb.batch_size, size)]
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
                mb.advantages, mb.response_mask, p.advantage_norm, p.advantage_clip, self.all_reduce
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
        seqs, attn, width = mb.sequences, mb.attention_mask, mb.prompt_width
        zero = torch.zeros((), device=seqs.device)
        policy_loss, critic_loss = zero, zero
        policy_metrics: dict[str, Tensor] = {}
        critic_metrics: dict[str, Tensor] = {}
        # one backward per model (the two graphs share nothing): each engine owns its own gradients
        if not critic_only:
            logits = self.fwd.response_logits(self.policy.model, seqs, attn, width)
            policy_loss, policy_metrics = self._policy_loss(mb, logits, kl_coef)
            self.policy.backward(policy_weight * policy_loss)
            del logits
        if self.critic is not None:
            values = self.fwd.values(self.critic.model, seqs, attn, width)
            critic_loss, critic_metrics = self._critic_loss(mb, values)
            self.critic.backward(critic_weight * critic_loss)
        return policy_loss, critic_loss, policy_metrics, critic_metrics

    def _policy_loss(
        self, mb: Experience, logits: Tensor, kl_coef: float
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """(clipped surrogate (dual-clipped with ``dual_clip``) + the KL term with ``kl.acts_in: loss`` + entropy bonus,
        metrics) from the policy's response ``logits`` on ``mb``. The KL term compares the policy with the
        reference log-probs of the scoring pass, on the rollout's tokens, as the reward penalty would."""
        p = self.ppo
        mask = mb.response_mask
        metrics: dict[str, Tensor] = {}
        logprobs = self.fwd.logprobs(logits, mb.responses_ids)
        old = mb.logprobs if p.importance_sampling else mb.ref_logprobs
        agg = {"aggregation": p.loss_aggregation, "horizon": self.generation.max_new_tokens}
        pg, pm = policy_loss(logprobs, old, mb.advantages, mask, p.clip_ratio, dual_clip=p.dual_clip, **agg)
        if self._measuring:
            gap = torch.where(mask, (logprobs.detach() - mb.logprobs).abs(), 0.0)
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
                f"policy/ratio{vs}_max": pm["ratio_max"],
                f"policy/ratio{vs}_clamped_count": pm["ratio_clamped"],
            }
        )
        if p.dual_clip is not None:
            metrics[f"policy/dual_clip_frac{vs}"] = pm["dual_clip_frac"]
        if p.kl.acts_in == "loss" and kl_coef > 0:
            kl, km = kl_loss(logprobs, mb.ref_logprobs, mask, kl_coef, p.kl.estimator, p.kl.clamp, **agg)
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
        vf, vm = value_loss(values, mb.values, mb.returns, mb.response_mask, p.value_clip)
        metrics = {"loss/vf": vm["vf_loss"], "critic/vf_clipfrac": vm["vf_clipfrac"]}
        return p.vf_coef * vf, metrics

    def _step(self, loss: Tensor, critic_only: bool, metrics: dict[str, Tensor]) -> bool:
        """One optimiser step of the models trained on this minibatch, or none (:func:`step_together`: clip,
        the finiteness check over all ranks, step or skip); returns whether it stepped."""
        models = {"policy": self.policy} if not critic_only else {}
        if self.critic is not None:
            models["critic"] = self.critic
        ok, norms = step_together(models, loss, self.ppo.max_grad_norm, self.all_reduce)
        if ok:
            self.nonfinite_in_row = 0
        else:
            self.nonfinite_in_row += 1
            self.nonfinite_total += 1
        for name, norm in norms.items():
            metrics[f"grad_norm/{name}"] = norm
        return ok

    def _no_sync(self, skip_sync: bool) -> contextlib.AbstractContextManager[Any]:
        """The trained models' gradient all-reduce deferred on all but a minibatch's last micro-batch."""
        if not skip_sync:
            return contextlib.nullcontext()
        models = [self.policy.model] + ([self.critic.model] if self.critic is not None else [])
        return self.policy.engine.no_sync(self.accelerator, *models)


class Scoring(Protocol):
    """How an iteration gets what its update trains on (the old log-probs, entropy, values, reference log-probs
    and advantages), chosen once when the trainer is built: :class:`SeparateScoring`, the scoring pass before
    the update (the default), or :class:`ppomax.trainers.ppo_fused.FusedScoring`, the update's first forward as
    the scoring pass where that is exact. :meth:`ppomax.trainers.ppo.PPOTrainer.iteration` calls, for each
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
    """Fold one micro-batch's metrics into the minibatch's by :func:`reduction_of`: ``*_max`` by max,
    ``*_count`` by sum, token means by their ``weight`` (token_weights: the weighted sum is the minibatch's
    token mean)."""
    for k, v in metrics.items():
        op = reduction_of(k)
        if k not in into:
            into[k] = v if op != "mean" else weight * v
        elif op == "max":
            into[k] = torch.maximum(into[k], v)
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
    return t.max() if op == "max" else t.sum() if op == "sum" else t.mean()
