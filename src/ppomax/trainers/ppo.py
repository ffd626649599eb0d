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

import signal
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ppomax.algos import RunningMoments, masked_mean
from ppomax.checkpoint import atomic_dir
from ppomax.collapse import CollapseMonitor
from ppomax.config import PPOConfig, to_yaml
from ppomax.errors import UserError
from ppomax.experience import Experience
from ppomax.monitor import MetricsLogger
from ppomax.optim import build_optimizer, build_scheduler
from ppomax.rewards import RewardSources, build_reward_functions
from ppomax.rollout import HFGenerateEngine, RolloutEngine, eos_ids_of, rollout

from .common import TrainingError, _cpu_distributed
from .ppo_data import IndexStream, load_prompt_set, load_ptx_set, pad_id_of
from .ppo_eval import evaluate
from .ppo_models import Forward, load_models
from .ppo_state import StopRequest, load_checkpoint, resolve_resume, rng_state, save_checkpoint, set_rng_state
from .ppo_step import Updater, compute_advantages, score_experience
from .reduce import reduce_metrics


class TrainingDiverged(TrainingError):
    """Too many consecutive non-finite updates: the run stops, its last good checkpoint is kept."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PPOTrainer:
    """Builds everything from a :class:`PPOConfig` (and optionally a checkpoint) and runs :meth:`train`."""

    def __init__(self, cfg: PPOConfig, resume: str | Path | None = None, engine: RolloutEngine | None = None):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        cfg.check_runnable()
        self.cfg = cfg
        p = cfg.ppo
        self.acc = acc = Accelerator(cpu=_cpu_distributed())  # CPU DDP (gloo) under `accelerate launch`
        # Statistics that define the training targets (running reward moments, advantage whitening) are global
        # through this hook: per-rank ones would make the objective depend on how the buffer is sharded. The
        # losses themselves are not all-reduced: DDP averages the gradients over ranks, and the Updater weights
        # each micro-batch by its share of all ranks' tokens (token_weights, through this hook), so that
        # average is the gradient of the token mean over every rank's minibatch; loss values are reduced for
        # logging only (reduce_metrics).
        self.all_reduce = None if acc.num_processes == 1 else (lambda t: acc.reduce(t, reduction="sum"))
        self._reduce = None if acc.num_processes == 1 else (lambda t, op: acc.reduce(t, reduction=op))
        self.out_dir = Path(cfg.logging.out_dir)
        self.ckpt = resolve_resume(resume) if resume else None
        if self.ckpt is None and (self.out_dir / "metrics.jsonl").exists():
            raise UserError(
                f"{self.out_dir} already holds a run (metrics.jsonl); continue it with --resume {self.out_dir} "
                "or set logging.out_dir to a new directory"
            )
        set_seed(cfg.seed)

        m = load_models(cfg, self.ckpt)
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
        self.step = 0
        self.stopped_by: int | None = None
        self.collapse_stopped = False
        self.last_checkpoint: Path | None = None
        self.logger = MetricsLogger(self.out_dir, cfg.logging.tensorboard, enabled=acc.is_main_process)
        if self.ckpt is not None:
            self._restore(self.ckpt)

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
        """Run to ``critic_pretrain_steps + iterations`` (or until a signal); returns the output directory."""
        from tqdm.auto import tqdm

        cfg, log = self.cfg, self.cfg.logging
        if self.acc.is_main_process:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.yaml").write_text(to_yaml(cfg), encoding="utf-8")
            for name, data in (("prompts", self.prompts), ("valid prompts", self.valid), ("ptx", self.ptx)):
                if data is not None:
                    tqdm.write(f"ppomax: {name}: {data.stats.summary()}")
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc="ppo",
            dynamic_ncols=True,
            disable=not (log.progress and self.acc.is_main_process),
        )
        try:
            with StopRequest().installed() as stop:
                if log.eval_every and self.step == 0:
                    self.logger.log(0, evaluate(self, 0), prefix="eval/")
                while self.step < self.total_steps:
                    step = self.step + 1
                    metrics = self.iteration(step)
                    self.step = step
                    collapsed = self._check_collapse(step, metrics)
                    if step % log.log_every == 0 or step == self.total_steps:
                        self.logger.log(step, metrics)
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
                        self.logger.log(step, evaluate(self, step), prefix="eval/")
                    if self.updater.nonfinite_in_row >= cfg.ppo.max_nonfinite_in_row:
                        raise TrainingDiverged(self._diverged_message())
                    healthy = self.updater.nonfinite_in_row == 0
                    if healthy and log.checkpoint_every and step % log.checkpoint_every == 0:
                        self.save_checkpoint()
                    if self._any_rank(stop.requested):
                        self.stopped_by = stop.signum or signal.SIGTERM
                        self.save_checkpoint()
                        return self.out_dir
            if self.updater.nonfinite_in_row == 0 and (
                self.last_checkpoint is None or self.last_checkpoint.name != f"step-{self.step}"
            ):
                self.save_checkpoint()
            self.save_final()
            return self.out_dir
        finally:
            bar.close()
            self.logger.close()

    def _check_collapse(self, step: int, metrics: dict[str, Any]) -> bool:
        """Feed the collapse monitor (policy iterations only); warn on the main process when it fires."""
        if self.cfg.collapse.action == "off" or metrics["train/critic_only"]:
            return False
        signal = self.collapse.update(step, metrics)
        metrics["collapse/firing"] = int(self.collapse.firing)
        if signal is not None and self.acc.is_main_process:
            from tqdm.auto import tqdm

            tqdm.write(f"ppomax: WARNING {signal.message()}")
        return signal is not None

    def _any_rank(self, flag: bool) -> bool:
        """True if ``flag`` is set on any process (a signal may reach only some ranks; all must stop together)."""
        if self.acc.num_processes == 1:
            return flag
        return bool(self.acc.reduce(torch.tensor([float(flag)], device=self.acc.device), reduction="sum") > 0)

    def _diverged_message(self) -> str:
        k = self.cfg.ppo.max_nonfinite_in_row
        where = (
            f"last good checkpoint: {self.last_checkpoint}"
            if self.last_checkpoint
            else "no checkpoint was saved"
        )
        return (
            f"stopped at step {self.step}: {k} updates in a row had a non-finite loss or gradient "
            f"(ppo.max_nonfinite_in_row = {k}); {where}. Look for NaN/inf reward scores or an overflowing dtype "
            "(try model.dtype: float32 or a lower learning rate), then resume from the checkpoint."
        )

    # ------------------------------------------------------------------ saving and resuming

    def save_checkpoint(self) -> Path | None:
        rngs = self._gather([rng_state()])
        path = None
        if self.acc.is_main_process:
            path = save_checkpoint(
                self.out_dir,
                self.step,
                policy=self.unwrapped(self.policy),
                critic=self.unwrapped(self.critic),
                tokenizer=self.tokenizer,
                rng_states=rngs,
                keep=self.cfg.logging.keep_checkpoints,
                optim={
                    "policy": self.policy_opt.state_dict(),
                    "critic": self.critic_opt.state_dict(),
                    "policy_sched": self.policy_sched.state_dict(),
                    "critic_sched": self.critic_sched.state_dict(),
                },
                state={
                    "moments": self.moments.state_dict(),
                    "prompt_stream": self.prompt_stream.state_dict(),
                    "ptx_stream": self.ptx_stream.state_dict() if self.ptx_stream else None,
                    "nonfinite_total": self.updater.nonfinite_total,
                    "world_size": self.acc.num_processes,
                    "collapse": self.collapse.state_dict(),
                },
            )
            (path / "config.yaml").write_text(to_yaml(self.cfg), encoding="utf-8")
        self.acc.wait_for_everyone()
        self.last_checkpoint = path or self.out_dir / "checkpoints" / f"step-{self.step}"
        return path

    def _gather(self, obj: list[Any]) -> list[Any]:
        if self.acc.num_processes == 1:
            return obj
        from accelerate.utils import gather_object

        return gather_object(obj)

    def _restore(self, ckpt: Path) -> None:
        state, optim, rngs = load_checkpoint(ckpt)
        self.step = int(state["step"])
        self.moments.load_state_dict(state["moments"])
        self.prompt_stream.load_state_dict(state["prompt_stream"])
        if self.ptx_stream is not None and state.get("ptx_stream"):
            self.ptx_stream.load_state_dict(state["ptx_stream"])
        self.updater.nonfinite_total = int(state.get("nonfinite_total", 0))
        if state.get("collapse"):
            self.collapse.load_state_dict(state["collapse"])
        self.policy_opt.load_state_dict(optim["policy"])
        self.critic_opt.load_state_dict(optim["critic"])
        self.policy_sched.load_state_dict(optim["policy_sched"])
        self.critic_sched.load_state_dict(optim["critic_sched"])
        set_rng_state(rngs[self.acc.process_index] if len(rngs) == self.acc.num_processes else rngs[0])
        self.logger.truncate_after(self.step)
        self.last_checkpoint = ckpt

    def save_final(self) -> None:
        """``out_dir/final/policy`` (with the tokenizer: loads with AutoModelForCausalLM) and ``final/critic``."""
        if self.acc.is_main_process:
            with atomic_dir(self.out_dir / "final") as tmp:
                self.unwrapped(self.policy).save_pretrained(tmp / "policy", safe_serialization=True)
                self.tokenizer.save_pretrained(tmp / "policy")
                self.unwrapped(self.critic).save_pretrained(tmp / "critic")
        self.acc.wait_for_everyone()


def train_ppo(cfg: PPOConfig, resume: str | Path | None = None, engine: RolloutEngine | None = None) -> Path:
    """Train a policy with PPO as ``cfg`` says; returns the output directory (``cfg.logging.out_dir``).

    ``resume``: a run directory or one of its ``checkpoints/step-N`` directories. The final policy is in
    ``out_dir/final/policy``, the critic in ``out_dir/final/critic``, metrics in ``out_dir/metrics.jsonl``. A
    SIGINT/SIGTERM saves a checkpoint and returns early (no ``final/``); use :class:`PPOTrainer` directly to
    tell (``trainer.stopped_by`` holds the signal), as the CLI does.
    """
    return PPOTrainer(cfg, resume=resume, engine=engine).train()


__all__ = ["PPOTrainer", "TrainingDiverged", "train_ppo"]
