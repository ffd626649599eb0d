"""The PPO trainer: rollout -> scoring -> advantages -> minibatch updates, repeated.

One iteration (:meth:`PPOTrainer.iteration`, ``step``)::

    for each rollout batch of the buffer:       generate (KV cache)           rollout.py (Rollouts.generate)
                                                score: policy/ref/critic/RM   scoring.py (Rollouts.score)
    merge the batches into one Experience                                    experience.py
    moments, score re-parameterisation, token rewards, GAE                   advantages.py
    ppo_epochs x minibatches: losses, clip, step                             update.py (Updater)
    metrics (paper 5.2), reduced over ranks                                  metrics.py

The scoring, advantages and update steps are those of a :class:`~ppomax.ppo.update.Scoring` chosen once,
when the trainer is built (``PPOTrainer.scoring``): ``separate`` (:class:`~ppomax.ppo.update.SeparateScoring`,
as above), or ``fused`` where one epoch over one minibatch (the whole buffer, one micro-batch) makes the
update's first forward an exact scoring pass (:mod:`ppomax.ppo.fused`: the policy and the critic run
once, their old log-probs, entropy and values are that forward's, detached, and the token rewards and GAE are
computed between that forward and its loss).

then (:meth:`PPOTrainer.train`) log; maybe evaluate (evaluation.py), checkpoint, stop, on the run engine
(:mod:`ppomax.trainers.run`).

The first ``ppo.critic_pretrain_steps`` iterations train the critic only (paper 5.3.3); ``ppo.iterations`` policy
iterations follow, so switching critic pre-training on does not shorten the policy's training. Learning-rate
schedules count optimiser steps of their own model (the policy's warmup starts with its first update).

A critic-free ``ppo.advantage_estimator`` (GRPO, RLOO, REINFORCE++) has no critic at all: none is built, prepared,
trained, checkpointed, saved or logged. Group sampling (``generation.samples_per_prompt`` n): each generate call
draws ``rollout_batch_size / n`` prompts (this rank's share of the global batch) and repeats each prompt's row n
times, so a prompt's n responses are n consecutive rows on one rank; the buffer keeps them so and the minibatch
shuffle moves whole groups (``Updater.group_size``).

The scoring pass's log-probs follow ``generation.logprobs_from`` (:mod:`ppomax.ppo.scoring`), a response cut at
``max_new_tokens`` gets its score as ``generation.truncated_response`` says (:mod:`ppomax.ppo.advantages`).

Dropout is off in policy and critic (a ratio must compare the same function); statistics that must be global
(running moments, whitening, metrics) are reduced over ranks; only the main process writes.

Python API: :class:`PPOTrainer` (``ppomax.PPOTrainer``), :func:`train_ppo`. CLI: ``ppomax train-ppo``
(:mod:`ppomax.commands.train_ppo`), through :class:`PPOTrainer` too.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ppomax.config import PPOConfig
from ppomax.trainers.common import TrainingError, data_files
from ppomax.trainers.inputs import TrainResult, bind
from ppomax.trainers.run import StopFlag, open_run

from .assembly import assemble
from .data import PromptSet
from .evaluation import evaluate
from .experience import Experience
from .metrics import Stopwatch, iteration_metrics
from .rollout import RolloutEngine
from .schedule import schedule_notes
from .update import Updater

if TYPE_CHECKING:
    from accelerate import Accelerator
    from peft import LoraConfig
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from ppomax.models import ValueHeadModel


class TrainingDiverged(TrainingError):
    """Too many consecutive non-finite updates: the run stops, its last good checkpoint is kept."""


class PPOTrainer:
    """PPO (PPO-max by default) from Python, as ``ppomax train-ppo`` runs it: builds everything on the run engine
    here, trains in :meth:`train`.

    ``config``: a :class:`PPOConfig`, a dict of its sections (``preset: NAME`` starts from a preset), a YAML file's
    path, or a preset's name. The other arguments stand for config keys (:mod:`ppomax.trainers.inputs`): ``model``
    (the policy: a causal LM object, or its directory / Hub id: ``model.policy``), ``ref_model``
    (``model.reference``; by default a frozen copy of the policy, or under LoRA the policy with its adapters
    off), ``reward_model`` (a ``ValueHeadModel``: ``model.reward``), ``value_model`` (the critic, a
    ``ValueHeadModel``: ``model.critic``; by default per ``ppo.critic_init``), ``processing_class``
    (``model.tokenizer``), ``train_dataset`` / ``eval_dataset`` / ``ptx_dataset`` (prompts, held-out prompts,
    PPO-ptx examples: ``data.prompts`` / ``data.valid_prompts`` / ``data.ptx``), ``reward_funcs`` (callables as
    :mod:`ppomax.ppo.reward_sources` calls them, ``module:function`` strings or mappings ``{function, name, weight,
    kwargs}``: ``reward.functions``), ``peft_config`` (``model.lora``), ``callbacks``; ``resume``, ``overwrite``,
    ``allow_data_change`` as :mod:`ppomax.trainers.run` reads them; ``engine``: the rollout engine (default:
    Hugging Face ``generate``).

    Collaborators (built by :func:`ppomax.ppo.assembly.assemble`): ``run`` (directory, metrics, checkpoints,
    signals; opened here), ``data`` (prompts and their streams),
    ``models`` (policy and critic as prepared by accelerate, reference, reward model, tokenizer), ``rollouts``
    (generation and the scoring pass), ``scoring`` (how an iteration scores, computes advantages and updates:
    ``separate`` or ``fused``, chosen once; its ``updater`` runs the minibatch updates, with both optimisers),
    ``moments`` (running reward moments) and ``collapse`` (the pattern-collapse monitor)."""

    def __init__(
        self,
        config: PPOConfig | dict[str, Any] | str | Path | None = None,
        *,
        model: str | Path | PreTrainedModel | None = None,
        ref_model: str | Path | PreTrainedModel | None = None,
        reward_model: str | Path | ValueHeadModel | None = None,
        value_model: str | Path | ValueHeadModel | None = None,
        processing_class: str | Path | PreTrainedTokenizerBase | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        ptx_dataset: Any = None,
        reward_funcs: Any = None,
        peft_config: LoraConfig | None = None,
        callbacks: list[Any] | None = None,
        resume: bool = False,
        overwrite: bool = False,
        allow_data_change: bool = False,
        engine: RolloutEngine | None = None,
    ):
        arguments = {
            "model": model,
            "ref_model": ref_model,
            "reward_model": reward_model,
            "value_model": value_model,
            "processing_class": processing_class,
            "train_dataset": train_dataset,
            "eval_dataset": eval_dataset,
            "ptx_dataset": ptx_dataset,
        }
        cfg, inputs = bind(
            "ppo", config, arguments, reward_funcs=reward_funcs, peft_config=peft_config, callbacks=callbacks
        )
        assert isinstance(cfg, PPOConfig)
        cfg.check_runnable()
        self.cfg, p, self.inputs = cfg, cfg.ppo, inputs
        # the run directory is checked (and a resumed run's config compared) before any model is loaded; it is
        # first written by run.restore(), once everything below has loaded
        trained = ("policy", "critic") if p.uses_critic else ("policy",)
        data = ("prompts", "valid_prompts", *(("ptx",) if p.ptx_coef > 0 else ()))
        self.run = run = open_run(
            cfg,
            "ppo",
            resume=resume,
            overwrite=overwrite,
            allow_data_change=allow_data_change,
            data=data_files(cfg, *data, inputs=inputs),
            trained=trained,
            frozen=True,
            callbacks=inputs.callbacks,
        )
        try:
            self._build(engine, allow_data_change)
        except BaseException:
            run.close()
            raise

    def _build(self, engine: RolloutEngine | None, allow_data_change: bool) -> None:
        run = self.run
        parts = assemble(self.cfg, self.inputs, run, engine, allow_data_change)
        self.kl_control, self.data, self.models = parts.kl_control, parts.data, parts.models
        self.rollouts, self.moments, self.collapse = parts.rollouts, parts.moments, parts.collapse
        self.scoring = parts.scoring
        self.collapse_stopped = False
        run.track(
            policy_schedule=parts.policy_schedule,
            critic_schedule=parts.critic_schedule,
            moments=self.moments,
            prompt_stream=self.data.prompt_stream,
            ptx_stream=self.data.ptx_stream,
            collapse=self.collapse,
            updater=self.updater,
            kl_control=self.kl_control,
        )
        self.step = run.restore()

    # ------------------------------------------------------------------ pieces

    @property
    def acc(self) -> Accelerator:
        return self.run.accelerator

    @property
    def updater(self) -> Updater:
        """The minibatch updates, with both optimisers (:attr:`scoring`'s)."""
        return self.scoring.updater

    @property
    def policy(self) -> torch.nn.Module:
        """The policy as prepared by accelerate (possibly wrapped)."""
        return self.models.policy

    @property
    def critic(self) -> torch.nn.Module | None:
        """The critic as prepared by accelerate; None without one (a critic-free advantage estimator)."""
        return self.models.critic

    @property
    def out_dir(self) -> Path:
        return self.run.out_dir

    @property
    def total_steps(self) -> int:
        return self.cfg.ppo.critic_pretrain_steps + self.cfg.ppo.iterations

    def unwrapped(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` as it was before accelerate prepared it."""
        return self.acc.unwrap_model(model)

    def generate(self, indices: list[int], prompts: PromptSet, greedy: bool = False) -> Experience:
        return self.rollouts.generate(prompts, indices, greedy=greedy)

    # ------------------------------------------------------------------ one iteration

    def iteration(self, step: int) -> dict[str, Any]:
        """Rollout, scoring, advantages and updates for iteration ``step`` (1-based); returns its metrics.

        With ``ppo.kl.target`` the iteration uses the adaptive KL coefficient as it stands (logged as
        ``ppo/kl_coef``), then updates it from the KL its rollout spent (``kl/per_sequence``: the mean over
        responses of the summed per-token estimate, as Ziegler et al.), after policy iterations only: in critic
        pre-training the policy cannot move its KL, and the coefficient would drift on an error nothing
        corrects."""
        p = self.cfg.ppo
        critic_only = step <= p.critic_pretrain_steps
        kl_coef = p.kl.coef if self.kl_control is None else self.kl_control.value
        clock = Stopwatch(self.acc.device)
        batches = []
        n = self.cfg.generation.samples_per_prompt
        for _ in range(p.buffer_size // p.rollout_batch_size):
            with clock("generation"):
                # this rank's prompts, then each one's n rows (its group stays on this rank, in order)
                prompts = self.data.prompt_stream.take(p.rollout_batch_size // n)
                exp = self.generate([i for i in prompts for _ in range(n)], self.data.prompts)
            with clock("scoring"):
                self.scoring.score(exp, step, critic_only)
            batches.append(exp)
        exp = Experience.cat(batches, self.data.pad_id)
        with clock("scoring"):
            self.scoring.advantages(exp, kl_coef=kl_coef)
        with clock("training"):
            train_metrics = self.scoring.update(exp, step, critic_only, kl_coef=kl_coef)
        metrics = self.iteration_metrics(exp, train_metrics, critic_only, clock)
        if self.kl_control is not None:
            metrics["ppo/kl_coef"] = kl_coef
            if not critic_only:
                self.kl_control.update(metrics["kl/per_sequence"], p.buffer_size * self.acc.num_processes)
        return metrics

    def iteration_metrics(
        self, exp: Experience, train_metrics: dict[str, Tensor], critic_only: bool, clock: Stopwatch
    ) -> dict[str, Any]:
        """The iteration's logged metrics (:func:`ppomax.ppo.metrics.iteration_metrics`)."""
        return iteration_metrics(
            exp,
            train_metrics,
            critic_only,
            clock,
            accelerator=self.acc,
            moments=self.moments,
            updater=self.updater,
            kl_clamp=self.cfg.ppo.kl.clamp,
        )

    def evaluate(self, step: int) -> dict[str, float]:
        """Held-out evaluation (:func:`ppomax.ppo.evaluation.evaluate`) of the current policy."""
        cfg = self.cfg
        assert self.data.valid is not None
        return evaluate(
            self.rollouts,
            self.data.valid,
            self.acc,
            step=step,
            samples=cfg.logging.eval_samples,
            batch_size=cfg.ppo.rollout_batch_size,
            greedy=cfg.logging.eval_greedy,
            seed=cfg.seed,
            samples_dir=self.out_dir / "samples" if self.acc.is_main_process else None,
            on_samples=lambda rows: self.run.metrics.log_table("eval/samples", rows, step),
        )

    # ------------------------------------------------------------------ the loop

    def train(self) -> TrainResult:
        """Run to ``critic_pretrain_steps + iterations``; the final policy is saved in ``out_dir/final/policy``, the
        critic in ``out_dir/final/critic``. Returns a :class:`~ppomax.trainers.inputs.TrainResult` (``model``: the
        policy; ``collapse_stopped`` when the collapse monitor stopped the run, which then saves no final models).
        A SIGINT/SIGTERM saves a checkpoint and raises :class:`ppomax.errors.RunStopped`."""
        cfg, log, run = self.cfg, self.cfg.logging, self.run
        for name, data in (
            ("prompts", self.data.prompts),
            ("valid prompts", self.data.valid),
            ("ptx", self.data.ptx),
        ):
            if data is not None:
                run.print(f"{name}: {data.stats.summary()}")
        schedule, too_short = schedule_notes(cfg)
        run.print(schedule)
        for warning in too_short:
            run.warn(warning)
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
                    run.callbacks.evaluate(0, run.metrics.log(0, self.evaluate(0), prefix="eval/"))
                while self.step < self.total_steps:
                    step = self.step + 1
                    metrics = self.iteration(step)
                    self.step = step
                    collapsed = self._check_collapse(step, metrics)
                    logged: dict[str, Any] = {}
                    if step % log.log_every == 0 or step == self.total_steps:
                        logged = run.metrics.log(step, metrics)
                    run.callbacks.step_end(step, logged)
                    bar.update(1)
                    bar.set_postfix(
                        reward=f"{metrics['reward/raw_mean']:.3g}",
                        kl=f"{metrics['kl/per_token']:.3g}",
                        len=f"{metrics['response/length_mean']:.3g}",
                        ppl=f"{metrics['ppl/policy']:.3g}",
                    )
                    if collapsed and cfg.collapse.action == "stop":
                        self.collapse_stopped = True  # the collapsing state is not checkpointed
                        return self._result(None)
                    if log.eval_every and step % log.eval_every == 0:
                        run.callbacks.evaluate(
                            step, run.metrics.log(step, self.evaluate(step), prefix="eval/")
                        )
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
            return self._result(self.out_dir / "final" / "policy")
        finally:
            bar.close()
            run.close()

    def _result(self, model_dir: Path | None) -> TrainResult:
        return TrainResult(
            self.out_dir,
            model_dir,
            self.rollouts.policy,  # the unwrapped models
            self.models.tokenizer,
            dict(self.run.metrics.latest),
            self.step,
            critic=self.rollouts.critic,
            collapse_stopped=self.collapse_stopped,
        )

    def _check_collapse(self, step: int, metrics: dict[str, Any]) -> bool:
        """Feed the collapse monitor (policy iterations only); warn on the main process when it fires."""
        if self.cfg.collapse.action == "off" or metrics["train/critic_only"]:
            return False
        signal = self.collapse.update(step, metrics)
        metrics["collapse/armed"] = int(self.collapse.armed)
        if self.collapse.armed:  # before, it cannot fire: a 0 would read as "no collapse seen"
            metrics["collapse/firing"] = int(self.collapse.firing)
        if signal is not None:
            self.run.warn(signal.message())
        return signal is not None

    def _diverged_message(self) -> str:
        k = self.cfg.ppo.max_nonfinite_in_row
        last = self.run.last_checkpoint
        where = f"last good checkpoint: {last}" if last else "no checkpoint was saved"
        return (
            f"stopped at step {self.step}: {k} updates in a row were skipped for a non-finite loss or gradient "
            f"or a buffer without one finite reward score (ppo.max_nonfinite_in_row = {k}; see "
            f"nonfinite/samples_count in metrics.jsonl); {where}. Look for NaN/inf reward scores or an "
            "overflowing dtype (try model.dtype: float32 or a lower learning rate), then resume from the checkpoint."
        )

    # ------------------------------------------------------------------ saving

    def save_final(self) -> None:
        """``out_dir/final/policy`` (loads with AutoModelForCausalLM) and ``final/critic`` (none without a critic),
        each with the tokenizer (the critic reads the policy's tokens), gathered under ZeRO-3/FSDP, written
        atomically as one directory."""
        tokenizer = self.models.tokenizer
        models: dict[str, tuple[torch.nn.Module, PreTrainedTokenizerBase | None]] = {
            "policy": (self.policy, tokenizer)
        }
        if self.critic is not None:
            models["critic"] = (self.critic, tokenizer)
        self.run.save_models(self.out_dir / "final", models)


def train_ppo(
    cfg: PPOConfig,
    resume: bool = False,
    overwrite: bool = False,
    engine: RolloutEngine | None = None,
    allow_data_change: bool = False,
) -> Path:
    """Train a policy with PPO as ``cfg`` says; returns the output directory (``cfg.logging.out_dir``).

    ``resume``: continue the run in ``logging.out_dir`` (``allow_data_change``: even if its data files changed);
    ``overwrite``: replace the run there (see :mod:`ppomax.trainers.run`). The final policy is in ``out_dir/final/policy``, the critic in
    ``out_dir/final/critic``, metrics in ``out_dir/metrics.jsonl``. A SIGINT/SIGTERM saves a checkpoint and
    raises :class:`ppomax.errors.RunStopped`. A critic-free ``ppo.advantage_estimator`` saves no critic.
    """
    trainer = PPOTrainer(
        cfg, resume=resume, overwrite=overwrite, engine=engine, allow_data_change=allow_data_change
    )
    return trainer.train().out_dir


__all__ = ["PPOTrainer", "TrainingDiverged", "train_ppo"]
