"""The PPO trainer (DESIGN.md section 1): rollout -> scoring -> advantages -> minibatch updates, repeated.

One iteration (``step``)::

    for each rollout batch of the buffer:       generate (KV cache)           rollout.py
                                                score: policy/ref/critic/RM   ppo_step.score_experience
    merge the batches into one Experience                                    experience.py
    moments, score re-parameterisation, token rewards, GAE                   ppo_step.compute_advantages
    ppo_epochs x minibatches: losses, clip, step                             ppo_step.Updater
    log metrics; maybe evaluate, checkpoint, stop

The first ``ppo.critic_pretrain_steps`` iterations train the critic only (paper 5.3.3); ``ppo.iterations`` policy
iterations follow, so switching critic pre-training on does not shorten the policy's training. Learning-rate
schedules count optimiser steps of their own model (the policy's warmup starts with its first update).

Two decisions DESIGN.md asks to make explicit:

* ``generation.logprobs_from``: ``sampling`` (default) takes the log-probs of the ratio, the KL penalty and the
  entropy from ``logits / temperature``, the distribution the tokens were drawn from, so the first ratio of an
  iteration is exactly 1 and the KL compares the two distributions actually in play (the reference is scaled
  the same way). Top-p/top-k truncation and the repetition penalty are *not* applied: they are sampling-time
  heuristics whose truncated distributions have no gradient outside the nucleus. ``raw`` uses temperature-1
  logits (the model's own distribution), as some implementations do. Perplexities are always from raw logits.
* ``generation.truncated_response``: a response that hits ``max_new_tokens`` without EOS is ``score``-d as is
  (default: the RM sees a cut text, as in MOSS-RLHF), or gets ``truncated_penalty`` as its final score
  (``penalty``, in the units of the re-parameterised score; such scores stay out of the running moments).

Dropout is off in policy and critic (a ratio must compare the same function); statistics that must be global
(running moments, whitening, metrics) are reduced over ranks; only the main process writes.

Python API: :func:`train_ppo`. CLI: ``ppomax train-ppo`` (:mod:`ppomax.commands.train_ppo`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ppomax.algos import RunningMoments, masked_mean
from ppomax.collapse import CollapseMonitor
from ppomax.config import PPOConfig
from ppomax.experience import Experience
from ppomax.optim import build_optimizer, build_scheduler
from ppomax.rewards import RewardSources, build_reward_functions
from ppomax.rollout import HFGenerateEngine, RolloutEngine, eos_ids_of, rollout

from .common import TrainingError
from .ppo_data import IndexStream, load_prompt_set, load_ptx_set, pad_id_of
from .ppo_eval import evaluate
from .ppo_models import Forward, load_models
from .ppo_step import Updater, compute_advantages, score_experience
from .reduce import reduce_metrics
from .run import StopFlag, open_run


class TrainingDiverged(TrainingError):
    """Too many consecutive non-finite updates: the run stops, its last good checkpoint is kept."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PPOTrainer:
    """Builds everything from a :class:`PPOConfig` on the run engine and runs :meth:`train`."""

    def __init__(
        self,
        cfg: PPOConfig,
        resume: bool = False,
        overwrite: bool = False,
        engine: RolloutEngine | None = None,
    ):
        cfg.check_runnable()
        self.cfg = cfg
        p = cfg.ppo
        # the run directory is checked (and a resumed run's config compared) before any model is loaded
        self.run = run = open_run(cfg, "ppo", resume=resume, overwrite=overwrite)
        self.acc = acc = run.accelerator  # CPU DDP (gloo) under `accelerate launch`
        # Statistics that define the training targets (running reward moments, advantage whitening) are global
        # through this hook: per-rank ones would make the objective depend on how the buffer is sharded. The
        # losses themselves are not all-reduced: DDP averages the gradients over ranks, and the Updater weights
        # each micro-batch by its share of all ranks' tokens (token_weights, through this hook), so that
        # average is the gradient of the token mean over every rank's minibatch; loss values are reduced for
        # logging only (reduce_metrics).
        self.all_reduce = None if acc.num_processes == 1 else (lambda t: acc.reduce(t, reduction="sum"))
        self._reduce = None if acc.num_processes == 1 else (lambda t, op: acc.reduce(t, reduction=op))
        self.out_dir = run.out_dir

        m = load_models(cfg)
        self.tokenizer = m.tokenizer
        self.pad_id = pad_id_of(m.tokenizer)
        self.eos_ids = eos_ids_of(m.tokenizer, m.policy)
        m.critic.freeze_lm_head()

        d = cfg.data
        assert d.prompts
        self.prompts = load_prompt_set(d.prompts, cfg, m.tokenizer)
        self.valid = load_prompt_set(d.valid_prompts, cfg, m.tokenizer) if d.valid_prompts else None
        rank, world = acc.process_index, acc.num_processes
        self.prompt_stream = IndexStream(len(self.prompts), cfg.seed, rank=rank, world=world)
        self.ptx = load_ptx_set(d.ptx, cfg, m.tokenizer) if (p.ptx_coef > 0 and d.ptx) else None
        self.ptx_stream = (
            IndexStream(len(self.ptx), cfg.seed + 1, rank=rank, world=world) if self.ptx else None
        )

        updates = p.ppo_epochs * (p.buffer_size // p.minibatch_size)
        policy_opt = build_optimizer(m.policy.parameters(), cfg.optim.policy_lr, cfg.optim)
        critic_opt = build_optimizer(m.critic.parameters(), cfg.optim.critic_lr, cfg.optim)
        self.policy_sched = build_scheduler(policy_opt, cfg.optim, p.iterations * updates)
        self.critic_sched = build_scheduler(
            critic_opt, cfg.optim, (p.iterations + p.critic_pretrain_steps) * updates
        )
        # both models and both optimisers in one Accelerator: save_state/load_state keep them in this order
        self.policy, self.policy_opt, self.critic, self.critic_opt = acc.prepare(
            m.policy, policy_opt, m.critic, critic_opt
        )
        self.reference = m.reference.to(acc.device)
        self.reward_model = m.reward_model.to(acc.device) if m.reward_model is not None else None

        self.rewards = RewardSources(
            self.reward_model, cfg.reward.model_weight, build_reward_functions(cfg.reward)
        )
        temperature = cfg.generation.temperature if cfg.generation.logprobs_from == "sampling" else 1.0
        self.fwd = Forward(acc.unwrap_model(self.policy), temperature)
        self.engine = engine or HFGenerateEngine(cfg.generation, self.eos_ids, self.pad_id)
        self.moments = RunningMoments(self.all_reduce)
        c = cfg.collapse
        self.collapse = CollapseMonitor(c.window, c.length_ratio, c.ppl_ratio, c.kl_per_token)
        self.updater = Updater(
            ppo=p,
            accelerator=acc,
            fwd=self.fwd,
            policy=self.policy,
            critic=self.critic,
            policy_opt=self.policy_opt,
            critic_opt=self.critic_opt,
            policy_sched=self.policy_sched,
            critic_sched=self.critic_sched,
            seed=cfg.seed,
            all_reduce=self.all_reduce,
            ptx_batch=self._next_ptx if self.ptx else None,
        )
        self.collapse_stopped = False
        run.track(
            policy_schedule=self.policy_sched,
            critic_schedule=self.critic_sched,
            moments=self.moments,
            prompt_stream=self.prompt_stream,
            ptx_stream=self.ptx_stream,
            collapse=self.collapse,
            updater=self.updater,
        )
        self.step = run.restore()

    # ------------------------------------------------------------------ pieces

    @property
    def total_steps(self) -> int:
        return self.cfg.ppo.critic_pretrain_steps + self.cfg.ppo.iterations

    def unwrapped(self, model: Any) -> Any:
        return self.acc.unwrap_model(model)

    def _next_ptx(self, k: int) -> dict[str, Tensor]:
        assert self.ptx is not None and self.ptx_stream is not None
        return self.ptx.batch(self.ptx_stream.take(k), self.pad_id, self.acc.device)

    def generate(self, indices: list[int], prompts: Any, greedy: bool = False) -> Experience:
        batch = prompts.batch(indices, self.pad_id, self.acc.device)
        return rollout(
            self.engine,
            self.unwrapped(self.policy),
            self.tokenizer,
            batch["input_ids"],
            batch["attention_mask"],
            eos_ids=self.eos_ids,
            pad_id=self.pad_id,
            prompts=batch["prompts"],
            meta=batch["meta"],
            greedy=greedy,
        )

    def score(self, exp: Experience, values: bool = True) -> None:
        score_experience(
            exp,
            policy=self.unwrapped(self.policy),
            reference=self.reference,
            critic=self.unwrapped(self.critic) if values else None,
            fwd=self.fwd,
            rewards=self.rewards,
            eos_ids=self.eos_ids,
            chunk_size=self.cfg.ppo.micro_batch_size,
        )

    # ------------------------------------------------------------------ one iteration

    def iteration(self, step: int) -> dict[str, Any]:
        """Rollout, scoring, advantages and updates for iteration ``step`` (1-based); returns its metrics."""
        p, dev = self.cfg.ppo, self.acc.device
        critic_only = step <= p.critic_pretrain_steps
        t_start = time.perf_counter()
        t_gen = t_score = 0.0
        batches = []
        for _ in range(p.buffer_size // p.rollout_batch_size):
            t0 = time.perf_counter()
            exp = self.generate(self.prompt_stream.take(p.rollout_batch_size), self.prompts)
            _sync(dev)
            t1 = time.perf_counter()
            self.score(exp)
            _sync(dev)
            t_gen += t1 - t0
            t_score += time.perf_counter() - t1
            batches.append(exp)
        exp = Experience.cat(batches, self.pad_id)
        t0 = time.perf_counter()
        compute_advantages(exp, p, self.cfg.generation, self.moments)
        t_score += time.perf_counter() - t0
        t0 = time.perf_counter()
        train_metrics = self.updater.update(exp, step, critic_only)
        _sync(dev)
        t_train = time.perf_counter() - t0
        t_iter = time.perf_counter() - t_start

        metrics = {**self.rollout_metrics(exp), **train_metrics}
        world = self.acc.num_processes
        metrics["_tokens"] = exp.response_lens.sum().float()
        metrics["response/truncated"] = exp.truncated.sum().float()
        counts = ("_tokens", "response/truncated")
        metrics = reduce_metrics(metrics, self._reduce, self.acc.device, sums=counts)
        tokens = metrics.pop("_tokens")
        samples = exp.batch_size * world
        metrics.update(
            {
                "train/critic_only": int(critic_only),
                "lr/policy": self.policy_sched.get_last_lr()[0],
                "lr/critic": self.critic_sched.get_last_lr()[0],
                "nonfinite/total": self.updater.nonfinite_total,
                "time/generation": t_gen,
                "time/scoring": t_score,
                "time/training": t_train,
                "time/iteration": t_iter,
                "perf/samples_per_s": samples / t_iter,
                "perf/tokens_per_s": tokens / t_iter,
                "perf/generation_tokens_per_s": tokens / max(t_gen, 1e-9),
            }
        )
        return metrics

    def rollout_metrics(self, exp: Experience) -> dict[str, Tensor]:
        """Paper 5.2's monitoring metrics of a scored Experience, global over ranks (tensors, no host sync)."""
        ar, mask = self.all_reduce, exp.response_mask
        rows = torch.ones_like(exp.scores, dtype=torch.bool)
        finite = torch.isfinite(exp.scores)
        raw_mean = masked_mean(exp.scores, finite, all_reduce=ar)
        out = {
            "reward/raw_mean": raw_mean,
            "reward/raw_std": (masked_mean((exp.scores - raw_mean).square(), finite, all_reduce=ar)).sqrt(),
            "reward/running_mean": torch.tensor(self.moments.mean),
            "reward/running_std": torch.tensor(self.moments.std),
            "reward/final_mean": masked_mean(exp.final_scores, rows, all_reduce=ar),
            "kl/per_token": masked_mean(exp.kl, mask, all_reduce=ar),
            "kl/per_sequence": masked_mean(exp.kl.sum(dim=1), rows, all_reduce=ar),
            "ppl/policy": torch.exp(-masked_mean(exp.raw_logprobs, mask, all_reduce=ar)),
            "ppl/reference": torch.exp(-masked_mean(exp.ref_raw_logprobs, mask, all_reduce=ar)),
            "response/length_mean": masked_mean(mask.sum(dim=1).float(), rows, all_reduce=ar),
            "policy/entropy": masked_mean(exp.entropy, mask, all_reduce=ar),
            "critic/value_mean": masked_mean(exp.values, mask, all_reduce=ar),
            "returns/mean": masked_mean(exp.returns, mask, all_reduce=ar),
            "advantages/mean": masked_mean(exp.advantages, mask, all_reduce=ar),
        }
        for name, s in exp.score_parts.items():
            out[f"reward/{name}_mean"] = masked_mean(s, torch.isfinite(s), all_reduce=ar)
        return out

    # ------------------------------------------------------------------ the loop

    def train(self) -> Path:
        """Run to ``critic_pretrain_steps + iterations``; returns the output directory. A SIGINT/SIGTERM saves a
        checkpoint and raises :class:`ppomax.errors.RunStopped`."""
        cfg, log, run = self.cfg, self.cfg.logging, self.run
        for name, data in (("prompts", self.prompts), ("valid prompts", self.valid), ("ptx", self.ptx)):
            if data is not None:
                run.print(f"{name}: {data.stats.summary()}")
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc="ppo",
            dynamic_ncols=True,
            disable=not (log.progress and self.acc.is_main_process),
        )
        try:
            with StopFlag() as stop:
                if log.eval_every and self.step == 0:
                    run.metrics.log(0, evaluate(self, 0), prefix="eval/")
                while self.step < self.total_steps:
                    step = self.step + 1
                    metrics = self.iteration(step)
                    self.step = step
                    collapsed = self._check_collapse(step, metrics)
                    if step % log.log_every == 0 or step == self.total_steps:
                        run.metrics.log(step, metrics)
                    bar.update(1)
                    bar.set_postfix(
                        reward=f"{metrics['reward/raw_mean']:.3g}",
                        kl=f"{metrics['kl/per_token']:.3g}",
                        len=f"{metrics['response/length_mean']:.3g}",
                        ppl=f"{metrics['ppl/policy']:.3g}",
                    )
                    if collapsed and cfg.collapse.action == "stop":
                        self.collapse_stopped = True  # the collapsing state is not checkpointed
                        return self.out_dir
                    if log.eval_every and step % log.eval_every == 0:
                        run.metrics.log(step, evaluate(self, step), prefix="eval/")
                    if self.updater.nonfinite_in_row >= cfg.ppo.max_nonfinite_in_row:
                        raise TrainingDiverged(self._diverged_message())
                    healthy = self.updater.nonfinite_in_row == 0
                    signum = stop.agreed(self.acc)
                    if signum is not None or (
                        healthy and log.checkpoint_every and step % log.checkpoint_every == 0
                    ):
                        run.save_checkpoint(step)
                    if signum is not None:
                        raise run.stopped(signum, step)
            last = run.last_checkpoint
            if self.updater.nonfinite_in_row == 0 and (last is None or last.name != f"step-{self.step}"):
                run.save_checkpoint(self.step)
            self.save_final()
            return self.out_dir
        finally:
            bar.close()
            run.close()

    def _check_collapse(self, step: int, metrics: dict[str, Any]) -> bool:
        """Feed the collapse monitor (policy iterations only); warn on the main process when it fires."""
        if self.cfg.collapse.action == "off" or metrics["train/critic_only"]:
            return False
        signal = self.collapse.update(step, metrics)
        metrics["collapse/firing"] = int(self.collapse.firing)
        if signal is not None:
            self.run.warn(signal.message())
        return signal is not None

    def _diverged_message(self) -> str:
        k = self.cfg.ppo.max_nonfinite_in_row
        last = self.run.last_checkpoint
        where = f"last good checkpoint: {last}" if last else "no checkpoint was saved"
        return (
            f"stopped at step {self.step}: {k} updates in a row had a non-finite loss or gradient "
            f"(ppo.max_nonfinite_in_row = {k}); {where}. Look for NaN/inf reward scores or an overflowing dtype "
            "(try model.dtype: float32 or a lower learning rate), then resume from the checkpoint."
        )

    # ------------------------------------------------------------------ saving

    def save_final(self) -> None:
        """``out_dir/final/policy`` (with the tokenizer: loads with AutoModelForCausalLM) and ``final/critic``,
        gathered under ZeRO-3/FSDP, written atomically as one directory."""
        self.run.save_models(
            self.out_dir / "final", {"policy": (self.policy, self.tokenizer), "critic": (self.critic, None)}
        )


def train_ppo(
    cfg: PPOConfig, resume: bool = False, overwrite: bool = False, engine: RolloutEngine | None = None
) -> Path:
    """Train a policy with PPO as ``cfg`` says; returns the output directory (``cfg.logging.out_dir``).

    ``resume``: continue the run in ``logging.out_dir``; ``overwrite``: replace the run there (see
    :mod:`ppomax.trainers.run`). The final policy is in ``out_dir/final/policy``, the critic in
    ``out_dir/final/critic``, metrics in ``out_dir/metrics.jsonl``. A SIGINT/SIGTERM saves a checkpoint and
    raises :class:`ppomax.errors.RunStopped`.
    """
    return PPOTrainer(cfg, resume=resume, overwrite=overwrite, engine=engine).train()


__all__ = ["PPOTrainer", "TrainingDiverged", "train_ppo"]
