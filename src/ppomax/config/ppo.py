"""``ppo``: the paper's implementation details, one field per trick (PPO-max's defaults, each naming its source),
with the KL to the reference as one group, ``ppo.kl`` (:class:`KLSettings`), and the rules between its keys.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, TypeAlias

from pydantic import Field, model_validator

from ppomax.algos.registry import ADVANTAGE_ESTIMATORS, KL_ESTIMATORS, LOSS_AGGREGATIONS
from ppomax.config.section import KeyConflicts, Section
from ppomax.config_compat import OLD_PPO_KEYS, upgrade_ppo_keys, warn_deprecated

# The names of ppomax.algos.registry's tables: the config accepts what the update can look up, and nothing else.
# The tables are built at import, so a static checker sees a name of one as a str (what their lookups take).
if TYPE_CHECKING:
    AdvantageEstimatorName: TypeAlias = str
    KLEstimatorName: TypeAlias = str
    LossAggregationName: TypeAlias = str
else:
    AdvantageEstimatorName = Literal[ADVANTAGE_ESTIMATORS.names()]
    KLEstimatorName = Literal[KL_ESTIMATORS.names()]
    LossAggregationName = Literal[LOSS_AGGREGATIONS.names()]


class KLSettings(Section):
    """``ppo.kl``: the KL to the reference policy, one group (as verl's KLControlConfig): how much (``coef``, or
    an adaptive coefficient toward ``target`` over ``horizon``), which per-token estimate (``estimator``, bounded
    by ``clamp``) and where it acts (``acts_in``: the token rewards, paper eq. 19, or the policy loss)."""

    coef: float = Field(
        0.05,
        ge=0,
        description='0 = no KL penalty. Paper 5.3.2 / fig. 7 ("setting lambda to 0.05"; eta of eq. 19).',
    )
    estimator: KLEstimatorName = Field(
        "k1",
        description="Paper eq. 19 (an empirical per-token KL); k1 = log pi_RL - log pi_SFT, as MOSS-RLHF code.",
    )
    acts_in: Literal["reward", "loss"] = Field(
        "reward",
        description="Where the KL to the reference acts. reward: -coef * KL_t in the token rewards (paper eq. "
        "19). loss: coef * the token mean of the estimator is added to the policy loss instead (GRPO: Shao et "
        'al. 2024 "DeepSeekMath" eq. 3-4, with k3); needs estimator k2 or k3 (k1 as a loss has zero expected '
        "gradient). Ours: reward, as the paper.",
    )
    clamp: float | None = Field(
        None,
        gt=0,
        description="Bound on the per-token KL estimate in the penalty (or the KL loss), [-c, c], after bounding "
        "the log-ratio to +-20; null = unclamped. Ours: null, as paper eq. 19 and MOSS-RLHF code (k3 then reads 142 "
        "at a log-ratio of 5 and inf in float32 past 88.7: kl/estimator_max logs the largest value); verl's "
        "low_var_kl clamps k3 to 10.",
    )
    target: float | None = Field(
        None,
        gt=0,
        description="Target KL per response (nats, the logged kl/per_sequence) of the adaptive KL coefficient of "
        'Ziegler et al. 2019 ("Fine-Tuning Language Models from Human Preferences", sec. 2.2), which starts from '
        "coef and is updated after every iteration (logged as ppo/kl_coef). null = a fixed coef: ours, as the "
        "paper (5.3.2 fixes it).",
    )
    horizon: int = Field(
        10000,
        gt=0,
        description="Responses over which the adaptive coefficient responds: it moves by a factor 1 + e * n / "
        "horizon per iteration of n responses (all processes), e in [-0.2, 0.2]; needs target. Ziegler et al. "
        "2019's code (horizon 10000 episodes); ours: the same.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> KLSettings:
        problems: list[tuple[tuple[str, ...], str]] = []
        if self.target is not None and self.coef == 0:
            problems.append(
                (
                    ("target", "coef"),
                    "the adaptive KL coefficient starts from coef and multiplies it, so from 0 it stays 0; "
                    "set coef > 0 (its initial value) or target: null",
                )
            )
        if self.target is None and self.horizon != type(self).model_fields["horizon"].default:
            problems.append(
                (
                    ("horizon", "target"),
                    "horizon sets the speed of the adaptive KL coefficient, which target: null turns off; "
                    "set target or leave horizon at its default",
                )
            )
        if self.acts_in == "loss" and not KL_ESTIMATORS.spec(self.estimator).as_loss:
            problems.append(
                (
                    ("acts_in", "estimator"),
                    f"{self.estimator} as a loss has zero expected gradient (E[grad log pi] = 0): it would add "
                    "noise, not a KL penalty; set estimator: k3 (GRPO) or k2",
                )
            )
        if problems:
            raise KeyConflicts(problems)
        return self


class PPOSettings(Section):
    """The paper's implementation details (fig. 5), one field per trick. Defaults are PPO-max (paper 5.4); each
    description names the value's source: a paper section, the MOSS-RLHF code released with the paper, or "ours".

    Score re-parameterisation (paper 5.3.1) is one choice, ``reward_transform`` (fig. 5's trick 4, scaling, or
    trick 5, normalisation, eq. 18: never both, since normalisation divides by the running std too), applied by
    :func:`ppomax.algos.reparameterize_scores`; ``reward_clip`` (eq. 18's delta) stays its own key, a number whose
    null is "off" like every other clip here, because it bounds the score under either transform. The KL to the
    reference is one group, ``kl`` (:class:`KLSettings`). The combinations that have no single meaning are errors
    naming both keys, never a silent precedence: ``reward_clip`` with ``reward_transform: none`` (the clip acts on
    the re-parameterised score, in units of the running std of the raw scores, so with the raw score it would
    silently change units to the RM's); ``entropy_clip`` with ``entropy_coef: 0`` (a clip on a bonus that is
    off). Keys of earlier versions (``kl_coef``, ``reward_norm``, ...) are read with a deprecation line
    (:mod:`ppomax.config_compat`).
    """

    # 1. token-level KL penalty (5.3.2), with the beyond-the-paper KL controls grouped beside it
    kl: KLSettings = Field(
        default_factory=KLSettings,
        description="The KL to the reference policy (paper 5.3.2, eq. 19), one group as verl's KLControlConfig: "
        "its coefficient, estimator, where it acts, bound and adaptive target (see KLSettings).",
    )
    # 2. importance sampling against the sampling policy; false = ratio against the reference
    importance_sampling: bool = Field(
        True,
        description="true: ratio against the sampling (old) policy, standard PPO (MOSS-RLHF code). false: against "
        'the reference, paper 5.3.2\'s "fixing the policy distribution to observations of reference model" (an '
        'infinite buffer), which is the curve fig. 7 calls "Importance Sample" (with kl.coef > 0: "KL '
        'Penalty+Importance Sample"). Paper 5.3.2: more stable, lower final performance; so true here.',
    )
    # 3. entropy bonus with clip (5.3.2, app. B.3)
    entropy_coef: float = Field(
        0.0,
        ge=0,
        description="0 = no entropy bonus. Paper 5.3.2 / app. B.3: not recommended, off (MOSS-RLHF code: 0).",
    )
    entropy_clip: float | None = Field(
        None,
        gt=0,
        description="Entropy above this earns no bonus; null = no clip; needs entropy_coef > 0. Paper app. B.3 "
        "(fig. 16: delta = 30; MOSS-RLHF code default 35).",
    )
    # 4./5. reward scaling or normalisation (5.3.1, eq. 18), and clipping
    reward_transform: Literal["none", "scale", "normalize"] = Field(
        "normalize",
        description="What the RM score becomes before the KL is added (fig. 5's tricks 4 and 5, one choice since "
        "normalisation divides by the running std too). normalize: minus the historical (running) mean, over the "
        'running std (paper 5.4 / eq. 18; PPO-max). scale: over the running std only (paper 5.3.1: "reward '
        "scaling doesn't guide proper policy optimization\"). none: the raw score (vanilla PPO).",
    )
    reward_clip: float | None = Field(
        5.0,
        gt=0,
        description="Bound on the re-parameterised score, in running-std units (eq. 18's delta); needs "
        "reward_transform normalize or scale; null = no clip. "
        'Paper 5.3.1 advises "a relaxed clipping strategy" without a number (fig. 6 tries 0.3 and 0.8; even 0.3 '
        "only delays collapse); ours: 5, which clips outliers only (MOSS-RLHF code default 10).",
    )
    # 6. advantage normalisation and clipping (5.3.1)
    advantage_norm: bool = Field(
        False,
        description="Minibatch whitening of the advantages (paper 5.3.1, fig. 6; app. B.1). Paper: off in PPO-max: "
        "5.4 lists reward normalisation and clipping, the KL penalty, the critic's initialisation from the RM and "
        "its pre-training, global gradient clipping, a small buffer, value-loss clipping and the LM loss, not this; "
        "fig. 5 marks no pentagram on it; fig. 14's caption finds the operations on the advantage and on the value "
        "loss in conflict. MOSS-RLHF code: off unless --use_advantage_norm. True is ours to offer, not the paper's.",
    )
    advantage_clip: float | None = Field(
        None, gt=0, description='null = no clip. Paper 5.3.1: "constraining ... on the reward level" instead.'
    )
    # 7. value-function loss clipping (app. B.1)
    value_clip: float | None = Field(
        0.2,
        gt=0,
        description="null = unclipped value loss. Paper 5.4 (clipped), app. B.1 (fig. 14: 0.2) / MOSS-RLHF code.",
    )
    # 8. critic initialisation (5.3.3)
    critic_init: Literal["reward_model", "sft", "random"] = Field(
        "reward_model", description="Paper 5.1 / 5.4 (critic initialised from the reward model)."
    )
    critic_pretrain_steps: int = Field(
        10,
        ge=0,
        description="Critic-only iterations before policy updates. Paper 5.3.3 / 5.4 pre-trains the critic and gives "
        "no length; ours: 10.",
    )
    # 10. GAE (app. C.3)
    gamma: float = Field(1.0, ge=0, le=1, description="MOSS-RLHF code (gamma 1); the paper gives no gamma.")
    lam: float = Field(
        0.95, ge=0, le=1, description="MOSS-RLHF code (lam 0.95); paper app. C.3 uses 0.9 in its experiments."
    )
    # advantage estimator (beyond the paper): GAE with a critic, or a critic-free estimator
    advantage_estimator: AdvantageEstimatorName = Field(
        "gae",
        description="gae: GAE with a critic (paper eq. 9-11 / app. C.3; PPO-max). The others train no critic "
        "(ppomax.algos.estimators): grpo, the group-normalised sequence reward (Shao et al. 2024, DeepSeekMath "
        "4.1.2); rloo, the leave-one-out baseline (Ahmadian et al. 2024); both need "
        "generation.samples_per_prompt >= 2; reinforce_pp, the return of the token-level rewards whitened over "
        "the global batch (Hu 2025, REINFORCE++), one response per prompt; reinforce_pp_baseline, the same after "
        "subtracting the mean score of the prompt's responses (REINFORCE++ w/ baseline), needs samples_per_prompt >= "
        "2. Each is an entry of ppomax.algos.registry.ADVANTAGE_ESTIMATORS. Ours: gae.",
    )

    group_std_norm: bool = Field(
        True,
        description="grpo only: divide each group's centred rewards by their std (Shao et al. 2024, DeepSeekMath "
        "4.1.2), which gives a group of near-ties (rewards spanning 0.003) advantages of +-1.08; false: the centred "
        "reward alone (Liu et al. 2025, Dr. GRPO; verl norm_adv_by_std_in_grpo, TRL scale_rewards: none). Ours: "
        "true, GRPO as published.",
    )
    loss_aggregation: LossAggregationName = Field(
        "token_mean",
        description="How the policy loss (surrogate, KL loss, entropy bonus) averages its tokens. token_mean: over "
        "every response token of the minibatch (MOSS-RLHF code; DAPO); seq_mean_token_mean: each response's token "
        "mean, then the mean over responses (Shao et al. 2024, DeepSeekMath eq. 3); seq_mean_token_sum_norm: each "
        "response's token sum / generation.max_new_tokens, then the mean over responses (Liu et al. 2025, Dr. "
        "GRPO). verl's loss_agg_mode names. The value loss stays a token mean.",
    )

    @property
    def uses_critic(self) -> bool:
        """Whether a critic is built, trained and saved: only GAE needs values."""
        return ADVANTAGE_ESTIMATORS.spec(self.advantage_estimator).critic

    @property
    def one_step_update(self) -> bool:
        """Whether each iteration's update is one optimiser step on the whole buffer in one forward: one epoch over
        one minibatch that is the whole buffer, in one micro-batch (where the update's own forward can be the
        scoring pass: ppo/fused.py)."""
        one_chunk = self.micro_batch_size is None or self.micro_batch_size >= self.minibatch_size
        return self.ppo_epochs == 1 and self.minibatch_size >= self.buffer_size and one_chunk

    # 11. clipped surrogate (app. C.1)
    clip_ratio: float | None = Field(
        0.2,
        gt=0,
        description="null = unclipped surrogate. Paper eq. 15 / app. C.1 give no epsilon; 0.2: MOSS-RLHF code.",
    )
    # Beyond the paper: dual clip (the KL controls are in KLSettings)
    dual_clip: float | None = Field(
        None,
        gt=1,
        description="c > 1: for negative advantages the clipped objective is bounded below by c * A (dual-clip PPO, "
        'Ye et al. 2020 "Mastering Complex Control in MOBA Games with Deep Reinforcement Learning"; they use '
        "c = 3); needs clip_ratio. null = off: ours, as the paper (fig. 5 has no dual clip).",
    )
    # 12. global gradient clipping (app. C.2)
    max_grad_norm: float | None = Field(
        1.0,
        gt=0,
        description="null = no clipping. Paper app. C.2 (on in PPO-max; fig. 18 compares 0, 0.5, 1.0) / MOSS-RLHF code "
        "(accelerate config gradient_clipping 1.0).",
    )
    # PPO-ptx (eq. 17)
    ptx_coef: float = Field(
        0.0,
        ge=0,
        description="0 = no pretraining loss. Ours: off, since it needs data.ptx (preset ppo_ptx turns it on); paper "
        "5.4 adds it to PPO-max without a number, MOSS-RLHF code default 0.",
    )
    ptx_batch_size: int = Field(8, gt=0, description="Ours: ptx sequences mixed into each minibatch update.")
    vf_coef: float = Field(1.0, ge=0, description="MOSS-RLHF code (vf_loss_weight 1).")
    # Experience and updates (5.4: a small buffer)
    iterations: int = Field(100, gt=0, description="Rollout + update cycles. Ours.")
    rollout_batch_size: int = Field(
        32, gt=0, description="Prompts per generate() call. MOSS-RLHF code (rollout_batch_size 32)."
    )
    buffer_size: int = Field(
        128,
        gt=0,
        description='Samples collected per iteration before updating. Paper 5.1 ("a batch size of 128 for sampling") '
        "and 5.4 (a small experience buffer) / MOSS-RLHF code (num_rollouts 128).",
    )
    minibatch_size: int = Field(
        32,
        gt=0,
        description='Paper 5.1 ("a batch size of 32 for training") / MOSS-RLHF code (batch_size 32).',
    )
    micro_batch_size: int | None = Field(
        None,
        gt=0,
        description="Rows per forward/backward inside a minibatch (gradient accumulation, to bound memory); "
        "null = the whole minibatch at once. One optimiser step per minibatch either way. Ours.",
    )
    pack_sequences: bool = Field(
        False,
        description="Forwards of the scoring pass and the update over packed sequences (each row's prompt + "
        "response laid end to end, rows as wide as the longest) instead of padded rows; the same outputs. Needs "
        "an attention that honours packed position ids (transformers' sdpa, eager, flash), checked at start-up. "
        "Ours.",
    )
    ppo_epochs: int = Field(
        1, gt=0, description="One pass over a small buffer keeps updates on-policy: ours, as MOSS-RLHF code."
    )
    max_nonfinite_in_row: int = Field(
        3,
        gt=0,
        description="Consecutive skipped updates (a non-finite loss or gradient, or a buffer without one finite "
        "reward score) that stop the run; its last good checkpoint is kept. Ours.",
    )

    @model_validator(mode="before")
    @classmethod
    def _read_old_keys(cls, data: Any) -> Any:
        """Keys of earlier versions (a saved run's ``config.yaml``, a dict): see :mod:`ppomax.config_compat`."""
        if not isinstance(data, dict) or not any(k in data for k in OLD_PPO_KEYS):
            return data
        default = cls.model_fields["reward_transform"].default
        data, notes, problems = upgrade_ppo_keys(data, default)
        if problems:
            raise KeyConflicts(problems)
        warn_deprecated(notes)
        return data

    @model_validator(mode="after")
    def _consistent(self) -> PPOSettings:
        problems: list[tuple[tuple[str, ...], str]] = []
        if self.reward_clip is not None and self.reward_transform == "none":
            problems.append(
                (
                    ("reward_clip", "reward_transform"),
                    "reward_clip is in running-std units and needs reward_transform normalize or scale; "
                    "set reward_clip: null to use the raw score",
                )
            )
        if self.entropy_clip is not None and self.entropy_coef == 0:
            problems.append(
                (
                    ("entropy_clip", "entropy_coef"),
                    "entropy_clip bounds the entropy bonus, which entropy_coef: 0 turns off; "
                    "set entropy_coef > 0 or entropy_clip: null",
                )
            )
        if self.dual_clip is not None and self.clip_ratio is None:
            problems.append(
                (
                    ("dual_clip", "clip_ratio"),
                    "the dual clip bounds the clipped surrogate, which clip_ratio: null turns off; "
                    "set clip_ratio or dual_clip: null",
                )
            )
        spec = ADVANTAGE_ESTIMATORS.spec(self.advantage_estimator)
        for key in sorted(
            {k for n in ADVANTAGE_ESTIMATORS.names() for k in ADVANTAGE_ESTIMATORS.spec(n).reads}
        ):
            if key not in spec.reads and getattr(self, key) != type(self).model_fields[key].default:
                readers = [
                    n for n in ADVANTAGE_ESTIMATORS.names() if key in ADVANTAGE_ESTIMATORS.spec(n).reads
                ]
                problems.append(
                    (
                        (key, "advantage_estimator"),
                        f"{key} is read by advantage_estimator {' / '.join(readers)} only, not by "
                        f"{self.advantage_estimator}; leave it at its default or change the estimator",
                    )
                )
        for size in ("rollout_batch_size", "minibatch_size"):
            if self.buffer_size % getattr(self, size):
                problems.append(
                    (
                        ("buffer_size", size),
                        f"buffer_size ({self.buffer_size}) must be a multiple of {size} ({getattr(self, size)})",
                    )
                )
        if problems:
            raise KeyConflicts(problems)
        return self
