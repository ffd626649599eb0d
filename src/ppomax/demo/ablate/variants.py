"""The ablation's variants (:data:`VARIANTS`): each a preset plus ``--set`` overrides, in report order, grouped by
the paper's figure it reproduces a curve of (or a group beyond the paper), and which of them a run selects.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from ppomax.demo.pipeline import PPO_RUNS
from ppomax.demo.profiles import PROFILES
from ppomax.errors import UserError

# Groups of variants beyond the paper's figures (Variant.figure)
ESTIMATORS = "estimators"  # the variant group (Variant.figure) of the comparison
CAUSES = "causes"  # variants that move one of GRPO's differences from RLOO to the other side
WHITENING = "whitening"  # PPO-max with advantage whitening (ours)
MONITOR = "monitor"  # hard runs for the collapse monitor, out of the sample its thresholds were chosen on


@dataclass(frozen=True)
class Variant:
    """One PPO run of the ablation: a preset plus ``--set`` overrides (after the profile's own for the preset,
    :func:`ppomax.demo.stages.ppo_config`; ``{pretrain}``, ``{sft}``, ``{rm}``, ``{world}`` in a value are those
    stages' paths)."""

    name: str
    figure: str  # the paper's figure it reproduces a curve of
    preset: str
    overrides: tuple[str, ...]
    what: str
    quick: bool = False  # part of `--quick`


# The KL coefficient of every KL-penalised run is the demo profile's PPO-max value (profiles.FULL: 0.5, measured for
# this learning rate; the paper's 0.05 of fig. 7 is tuned for lr 5e-7), so "KL penalty" here means PPO-max's.
KL_ON = "ppo.kl.coef=0.5"

# The variants, in report order. Fig. 6 and fig. 7 vary vanilla PPO (the paper compares each trick "to vanilla
# PPO" and fig. 7's constraints against fig. 6), fig. 8's critic pre-training too ("conducted on the basis of
# vanilla PPO setup"), fig. 8's initialisations vary PPO-max, and fig. 12 compares PPO-ptx with PPO-max.
VARIANTS: tuple[Variant, ...] = (
    Variant("ppo_max", "fig. 5", "ppo_max", (), "PPO-max (paper 5.4), the demo's run", quick=True),
    Variant(
        "vanilla",
        "fig. 4",
        "vanilla",
        (),
        "vanilla PPO (paper 5.2), the demo's run; 'none' of fig. 6-8",
        True,
    ),
    # fig. 6: score reparameterisation (paper 5.3.1)
    Variant(
        "reward_scale", "fig. 6", "vanilla", ("ppo.reward_transform=scale",), "reward scaling (running std)"
    ),
    Variant(
        "reward_norm_0.3",
        "fig. 6",
        "vanilla",
        ("ppo.reward_transform=normalize", "ppo.reward_clip=0.3"),
        "reward normalisation + clipping, tight bound delta = 0.3 (eq. 18)",
        quick=True,
    ),
    Variant(
        "reward_norm_0.8",
        "fig. 6",
        "vanilla",
        ("ppo.reward_transform=normalize", "ppo.reward_clip=0.8"),
        "reward normalisation + clipping, relaxed bound delta = 0.8 (eq. 18)",
    ),
    Variant(
        "adv_norm",
        "fig. 6",
        "vanilla",
        ("ppo.advantage_norm=true",),
        "advantage normalisation (minibatch) without a clip (ours: not one of fig. 6's curves)",
    ),
    Variant(
        "adv_norm_0.5",
        "fig. 6",
        "vanilla",
        ("ppo.advantage_norm=true", "ppo.advantage_clip=0.5"),
        "advantage normalisation + clipping at delta = 0.5 (fig. 6)",
    ),
    Variant(
        "adv_norm_0.12",
        "fig. 6",
        "vanilla",
        ("ppo.advantage_norm=true", "ppo.advantage_clip=0.12"),
        "advantage normalisation + clipping at delta = 0.12 (fig. 6)",
    ),
    # fig. 7: policy constraints (paper 5.3.2)
    Variant("kl_penalty", "fig. 7", "vanilla", (KL_ON,), "token-level KL penalty (eq. 19)", quick=True),
    Variant(
        "entropy_bonus",
        "fig. 7",
        "vanilla",
        ("ppo.entropy_coef=0.01", "ppo.entropy_clip=30"),
        "entropy bonus with the paper's coefficient 0.01 and clip delta = 30 (fig. 16's caption and legend; a "
        "token's entropy is at most ln 1024 = 6.9 nats here, so the clip never binds)",
    ),
    Variant(
        "reference_as_old",
        "fig. 7",
        "vanilla",
        ("ppo.importance_sampling=false",),
        "'Importance Sample': the ratio against the reference (an infinite buffer)",
    ),
    Variant(
        "kl_reference_as_old",
        "fig. 7",
        "vanilla",
        (KL_ON, "ppo.importance_sampling=false"),
        "'KL Penalty + Importance Sample'",
    ),
    # fig. 8: initialisation (paper 5.3.3)
    Variant(
        "critic_pretrain",
        "fig. 8",
        "vanilla",
        ("ppo.critic_pretrain_steps=10",),
        "vanilla PPO with 10 critic-only iterations first (PPO-max's)",
    ),
    Variant(
        "critic_from_sft", "fig. 8", "ppo_max", ("ppo.critic_init=sft",), "PPO-max, critic from the SFT model"
    ),
    Variant(
        "critic_random",
        "fig. 8",
        "ppo_max",
        ("ppo.critic_init=random",),
        "PPO-max, critic randomly initialised",
    ),
    Variant(
        "policy_pretrained",
        "fig. 8",
        "ppo_max",
        ("model.policy={pretrain}",),
        "PPO-max from the pre-trained model without SFT (policy and reference)",
        quick=True,
    ),
    # fig. 12: alignment tax (paper 6.4)
    Variant(
        "ppo_ptx",
        "fig. 12",
        "ppo_ptx",
        (KL_ON, "data.ptx={world}/sft_train.jsonl"),
        "PPO-ptx: PPO-max plus the LM loss of eq. 17 on the SFT demonstrations",
        quick=True,
    ),
    # beyond the paper: the critic-free advantage estimators against PPO-max (ppo_max above is the comparison's
    # baseline, its run reused). Each is its shipped preset, which inherits ppo_max and changes the estimator and
    # what the estimator's paper sets with it (see its yaml). The profile gives every preset the same sizes,
    # learning rate and iterations (stages.ppo_config): 80 policy iterations of 64 responses (two rollouts of 32,
    # minibatches of 32), counted in responses, so a 4-sample group preset trains on 16 prompts x 4 per
    # iteration where PPO-max does 64 x 1: equal samples, the generation cost that dominates here. The profile's
    # per-preset overrides (profiles.FULL) name only ppo_max, so a critic-free preset gets no critic setting
    # (the presets set critic_pretrain_steps: 0; PPO-max's 10 critic-only iterations are its own cost, counted
    # in its wall time). KL coefficient: PPO-max's demo value, 0.5, for all, instead of each paper's (GRPO's
    # 0.04, the 0.05 the others inherit): those are tuned for learning rates ~100x smaller than the demo's
    # (profiles.py measured 0.05 letting PPO-max drift at this one). One coefficient still constrains each
    # method differently (in the reward or as a loss, k1 or k3), which is why the report compares gold at equal
    # KL rather than at equal coefficient.
    Variant(
        "grpo",
        ESTIMATORS,
        "grpo",
        (KL_ON,),
        "GRPO (Shao et al. 2024): group-normalised sequence reward, 4 samples per prompt, no critic",
        quick=True,
    ),
    Variant(
        "rloo",
        ESTIMATORS,
        "rloo",
        (KL_ON,),
        "RLOO (Ahmadian et al. 2024): leave-one-out baseline over 4 samples per prompt, no critic",
    ),
    Variant(
        "reinforce_pp",
        ESTIMATORS,
        "reinforce_pp",
        (KL_ON,),
        "REINFORCE++ (Hu 2025): token-level KL reward, global-batch advantage normalisation, no critic",
    ),
    Variant(
        "reinforce_pp_baseline",
        ESTIMATORS,
        "reinforce_pp_baseline",
        (KL_ON,),
        "REINFORCE++ w/ baseline (Hu 2025): the group's mean score subtracted, then REINFORCE++, 4 samples",
    ),
    # beyond the paper: what makes GRPO differ from RLOO. GRPO's preset differs from RLOO's in the division by the
    # group's std, where the KL acts (a loss) and by which estimator (k3), the reward normalisation (off) and the
    # loss aggregation (per response); each variant moves one of them to the other side, so that the paired
    # difference to its preset (same seed) is that cause's effect.
    Variant(
        "grpo_kl_reward_k1",
        CAUSES,
        "grpo",
        (KL_ON, "ppo.kl.acts_in=reward", "ppo.kl.estimator=k1"),
        "GRPO with RLOO's KL: in the reward, by k1",
    ),
    Variant(
        "rloo_kl_loss_k3",
        CAUSES,
        "rloo",
        (KL_ON, "ppo.kl.acts_in=loss", "ppo.kl.estimator=k3"),
        "RLOO with GRPO's KL: a k3 loss term",
    ),
    Variant(
        "grpo_no_std",
        CAUSES,
        "grpo",
        (KL_ON, "ppo.group_std_norm=false"),
        "GRPO without the division by the group's std (Dr. GRPO's advantage)",
    ),
    Variant(
        "grpo_token_mean",
        CAUSES,
        "grpo",
        (KL_ON, "ppo.loss_aggregation=token_mean"),
        "GRPO with RLOO's (and the earlier runs') token-mean loss instead of eq. 3's per-response mean",
    ),
    Variant(
        "grpo_reward_norm",
        CAUSES,
        "grpo",
        (KL_ON, "ppo.reward_transform=normalize", "ppo.reward_clip=5"),
        "GRPO with RLOO's (PPO-max's) reward normalisation and clip",
    ),
    # ours: PPO-max with minibatch advantage whitening, which the paper's PPO-max does not use (ppo_max above is
    # the comparison's baseline)
    Variant(
        "ppo_max_adv_norm",
        WHITENING,
        "ppo_max",
        ("ppo.advantage_norm=true",),
        "PPO-max plus minibatch advantage whitening (ours, not the paper's PPO-max)",
    ),
    # The collapse monitor out of sample: hard runs its thresholds were not chosen on. KL-penalised runs that may
    # still over-optimise at the demo's learning rate (profiles.py: 0.05 and 0.2 let PPO-max drift into the RM's
    # length bias), shorter and longer answers, slower and faster learning. Judged by
    # `monitor.monitor_evidence` with the estimators' runs, the other out-of-sample set.
    Variant(
        "mon_kl_0.05", MONITOR, "ppo_max", ("ppo.kl.coef=0.05",), "PPO-max with the paper's KL coefficient"
    ),
    Variant("mon_kl_0.1", MONITOR, "ppo_max", ("ppo.kl.coef=0.1",), "PPO-max with KL coefficient 0.1"),
    Variant("mon_kl_0.2", MONITOR, "ppo_max", ("ppo.kl.coef=0.2",), "PPO-max with KL coefficient 0.2"),
    Variant(
        "mon_short",
        MONITOR,
        "vanilla",
        ("generation.max_new_tokens=20",),
        "vanilla PPO, answers of <= 20 tokens",
    ),
    Variant(
        "mon_long",
        MONITOR,
        "vanilla",
        ("generation.max_new_tokens=80",),
        "vanilla PPO, answers of <= 80 tokens",
    ),
    Variant(
        "mon_long_kl_0.1",
        MONITOR,
        "ppo_max",
        ("ppo.kl.coef=0.1", "generation.max_new_tokens=80"),
        "PPO-max with KL coefficient 0.1, answers of <= 80 tokens",
    ),
    Variant(
        "mon_slow_lr",
        MONITOR,
        "vanilla",
        ("optim.policy_lr=3e-5",),
        "vanilla PPO at a third of the learning rate",
    ),
    Variant(
        "mon_fast_lr",
        MONITOR,
        "ppo_max",
        ("optim.policy_lr=3e-4",),
        "PPO-max (KL coefficient 0.5) at three times the learning rate",
    ),
)


BY_NAME = {v.name: v for v in VARIANTS}
# What a group of variants is compared against: `--only GROUP` runs it too (the group's report needs it).
COMPARED_WITH = {ESTIMATORS: ("ppo_max",), CAUSES: ("grpo", "rloo"), WHITENING: ("ppo_max",)}
# the demo's own stage names for its two runs: an ablation into a demo's directory reuses them
STAGE_NAMES = {v.name: PPO_RUNS.get(v.name, f"ppo_{v.name}") for v in VARIANTS}

# `--quick`: the quick demo's profile with shorter PPO runs (10 policy iterations after 3 critic-only ones instead
# of PPO-max's 10) and a smaller evaluation: a smoke run of the whole machinery, not evidence for the verdicts.
QUICK = replace(
    PROFILES["quick"],
    name="ablate-quick",
    ppo_iterations=10,
    eval_prompts=60,
    ppo_overrides={
        "ppo_max": (*PROFILES["quick"].ppo_overrides["ppo_max"], "ppo.critic_pretrain_steps=3"),
        "ppo_ptx": ("ppo.critic_pretrain_steps=3",),
    },
)


def select(only: Sequence[str] | None, quick: bool) -> list[Variant]:
    """The variants to run: ``only`` (names, or figures such as ``fig. 6`` / ``fig6``), else all (``--quick``: the
    quick ones). Unknown names are a one-line error."""
    pool = [v for v in VARIANTS if v.quick] if quick and not only else list(VARIANTS)
    if not only:
        return pool
    figures = {v.figure.replace(" ", "").replace(".", ""): v.figure for v in VARIANTS}
    chosen: list[Variant] = []
    for item in only:
        key = item.replace(" ", "").replace(".", "")
        if item in BY_NAME:
            picked = [BY_NAME[item]]
        elif key in figures:
            picked = [BY_NAME[b] for b in COMPARED_WITH.get(figures[key], ())]
            picked += [v for v in VARIANTS if v.figure == figures[key]]
        else:
            raise UserError(
                f"--only {item}: unknown variant; choose from {', '.join(BY_NAME)} or a figure "
                f"({', '.join(sorted(set(figures.values())))})"
            )
        chosen += [v for v in picked if v not in chosen]
    return [v for v in VARIANTS if v in chosen]  # table order


def comparison(variants: Sequence[Variant]) -> list[str]:
    """The methods of the estimators comparison among ``variants``, baseline first: none unless an estimator (or
    one of the causes' variants) is among them (then its baseline too, when it is)."""
    group = [v.name for v in variants if v.figure in (ESTIMATORS, CAUSES)]
    if not group:
        return []
    chosen = {v.name for v in variants}
    return [b for b in COMPARED_WITH[ESTIMATORS] if b in chosen] + group


def probed(compare: Sequence[str]) -> list[str]:
    """The methods of the comparison whose memory is probed: the shipped presets (a cause's variant costs what its
    preset does)."""
    return [n for n in compare if BY_NAME[n].figure != CAUSES]
