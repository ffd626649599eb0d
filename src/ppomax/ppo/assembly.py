"""The parts of a PPO run, built once before its first iteration (:func:`assemble`): the adaptive KL controller, the
data, the models as the run engine prepared them (policy and critic with their optimisers and schedules), the
rollouts (generation and the scoring pass), the running reward moments, the collapse monitor and the iteration's
scoring strategy with its updater. :class:`~ppomax.ppo.trainer.PPOTrainer` runs the loop over them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from ppomax.algos import AdaptiveKLController, RunningMoments
from ppomax.config import PPOConfig
from ppomax.errors import ConfigError
from ppomax.optim import build_optimizer, build_scheduler
from ppomax.trainers.common import log_chat_format
from ppomax.trainers.optimised import Optimised

from .collapse import CollapseMonitor
from .data import PPOData, load_data
from .fused import FusedScoring, FusedUpdater, fuses_scoring
from .models import Forward, PPOModels, check_packed_forwards, load_models
from .reward_sources import RewardSources, build_reward_functions, check_packed_scores
from .rollout import HFGenerateEngine, RolloutEngine, eos_ids_of
from .scoring import Rollouts
from .update import Scoring, SeparateScoring, Updater

if TYPE_CHECKING:
    from torch.optim.lr_scheduler import LRScheduler

    from ppomax.trainers.inputs import Inputs
    from ppomax.trainers.run import RunContext


@dataclass
class PPOParts:
    """What :func:`assemble` builds (see the module docstring)."""

    kl_control: AdaptiveKLController | None
    data: PPOData
    models: PPOModels
    rollouts: Rollouts
    moments: RunningMoments
    collapse: CollapseMonitor
    scoring: Scoring
    policy_schedule: LRScheduler
    critic_schedule: LRScheduler | None


def assemble(
    cfg: PPOConfig, inputs: Inputs, run: RunContext, engine: RolloutEngine | None, allow_data_change: bool
) -> PPOParts:
    """Build every part of a PPO run on ``run``'s engine (DDP, DeepSpeed or FSDP, :mod:`ppomax.trainers.launch`);
    ``engine``: the rollout engine (default: Hugging Face ``generate``)."""
    p = cfg.ppo
    acc = run.accelerator  # DDP, DeepSpeed or FSDP as `accelerate launch` configured (trainers/launch.py)
    launched = run.engine  # what differs between them (trainers/launch.py: Engine)
    # The adaptive KL coefficient (ppo.kl.target) counts the responses of all processes, as Ziegler et al.'s
    # code counts its batch; a step of n responses moves it by a factor in [1 - 0.2 n/h, 1 + 0.2 n/h].
    kl_control = None
    if p.kl.target is not None:
        if p.buffer_size * acc.num_processes >= 5 * p.kl.horizon:
            raise ConfigError(
                f"ppo.kl.horizon, ppo.buffer_size: kl.horizon ({p.kl.horizon}) must exceed a fifth of the "
                f"responses of one iteration (buffer_size {p.buffer_size} x {acc.num_processes} process(es)), "
                "or one step of the adaptive KL coefficient could take it to 0 or below"
            )
        kl_control = AdaptiveKLController(p.kl.coef, p.kl.target, p.kl.horizon)
    # Statistics that define the training targets (running reward moments, advantage whitening) are global
    # through this hook: per-rank ones would make the objective depend on how the buffer is sharded. The
    # losses themselves are not all-reduced: DDP averages the gradients over ranks, and the Updater weights
    # each micro-batch by its share of all ranks' tokens (token_weights, through this hook), so that
    # average is the gradient of the token mean over every rank's minibatch; loss values are reduced for
    # logging only (reduce_metrics).
    all_reduce = None if acc.num_processes == 1 else (lambda t: acc.reduce(t, reduction="sum"))
    m = load_models(cfg, inputs, launched)
    if m.critic is not None:
        m.critic.freeze_lm_head()
        run.layout.update(m.critic.match_checkpoint(run.resumed_layout()))
    log_chat_format(run, cfg.data.chat_format, m.tokenizer)
    data = load_data(
        cfg,
        m.tokenizer,
        acc.process_index,
        acc.num_processes,
        resizable=allow_data_change,
        sources=run.data.files,
    )

    updates = p.ppo_epochs * (p.buffer_size // p.minibatch_size)
    policy_opt = build_optimizer(m.policy.parameters(), cfg.optim.policy_lr, cfg.optim)
    models_to_train: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]] = {
        "policy": (m.policy, policy_opt)
    }
    policy_sched = build_scheduler(policy_opt, cfg.optim, p.iterations * updates)
    critic_sched = None
    if m.critic is not None:
        critic_opt = build_optimizer(m.critic.parameters(), cfg.optim.critic_lr, cfg.optim)
        models_to_train["critic"] = (m.critic, critic_opt)
        critic_sched = build_scheduler(
            critic_opt, cfg.optim, (p.iterations + p.critic_pretrain_steps) * updates
        )
    # one Accelerator for both trained models (save_state/load_state keep them in this order), each with its
    # own optimiser, learning rate and, under DeepSpeed, its own engine
    micro = p.micro_batch_size or p.minibatch_size
    prepared = launched.prepare_trained(acc, models_to_train, micro, p.max_grad_norm, "ppo.max_grad_norm")
    policy, policy_opt = prepared["policy"]
    critic, critic_opt = prepared.get("critic", (None, None))
    reward_model = launched.prepare_frozen(acc, m.reward_model, micro) if m.reward_model is not None else None
    models = replace(
        m,
        policy=policy,
        critic=critic,
        reference=launched.prepare_frozen(acc, m.reference, micro),
        reward_model=reward_model,
    )

    from_generate = cfg.generation.logprobs_from == "generate"
    temperature = cfg.generation.temperature if cfg.generation.logprobs_from != "raw" else 1.0
    fwd = Forward(temperature, pack=p.pack_sequences)
    if p.pack_sequences:
        # token ids of the tokenizer, which every model's embeddings hold (check_vocab)
        across_ranks = None if acc.num_processes == 1 else (lambda gap: acc.gather(gap.reshape(1)).max())
        check_packed_forwards(
            fwd,
            {
                "model.policy": acc.unwrap_model(policy),
                "model.reference": models.reference,
                "model.critic": acc.unwrap_model(critic) if critic is not None else None,
            },
            len(m.tokenizer),
            acc.device,
            across_ranks,
        )
        if reward_model is not None:
            check_packed_scores(reward_model, len(m.tokenizer), acc.device, across_ranks)
    eos_ids = eos_ids_of(m.tokenizer, m.policy)
    rollouts = Rollouts(
        engine=engine
        or HFGenerateEngine(cfg.generation, eos_ids, data.pad_id, synced=launched.sharded_forward),
        fwd=fwd,
        rewards=RewardSources(
            reward_model,
            cfg.reward.model_weight,
            build_reward_functions(cfg.reward, inputs.reward_functions),
            chunk_size=p.micro_batch_size,
            pack=p.pack_sequences,
        ),
        tokenizer=m.tokenizer,
        eos_ids=eos_ids,
        pad_id=data.pad_id,
        device=acc.device,
        policy=acc.unwrap_model(policy),
        reference=models.reference,
        critic=acc.unwrap_model(critic) if critic is not None else None,
        chunk_size=p.micro_batch_size,
        logprobs_from_generate=from_generate,
    )
    moments = RunningMoments(all_reduce)
    c = cfg.collapse
    collapse = CollapseMonitor(c.window, c.length_ratio, c.ppl_ratio, c.kl_per_token, c.drift_kl_per_token)
    updater: dict[str, Any] = dict(
        ppo=p,
        accelerator=acc,
        fwd=fwd,
        policy=Optimised(policy, policy_opt, policy_sched, acc, launched),
        critic=Optimised(critic, critic_opt, critic_sched, acc, launched)
        if critic_sched is not None
        else None,
        seed=cfg.seed,
        all_reduce=all_reduce,
        generation=cfg.generation,
        ptx_batch=(lambda k: data.next_ptx(k, acc.device)) if data.ptx else None,
        measure_mismatch=from_generate,
    )
    # the iteration's scoring and update, chosen once (the module's docstring)
    scoring: Scoring
    if fuses_scoring(p):
        scoring = FusedScoring(rollouts, FusedUpdater(**updater), moments, p, cfg.generation)
    else:
        scoring = SeparateScoring(rollouts, Updater(**updater), moments, p, cfg.generation)
    return PPOParts(
        kl_control=kl_control,
        data=data,
        models=models,
        rollouts=rollouts,
        moments=moments,
        collapse=collapse,
        scoring=scoring,
        policy_schedule=policy_sched,
        critic_schedule=critic_sched,
    )
