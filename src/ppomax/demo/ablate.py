"""`ppomax ablate`: the paper's ablations (fig. 6, 7, 8 and 12) reproduced on hh-mini, judged by its gold reward.

Per seed, the demo's cached base stages (world, tokenizer, pre-training, SFT, RM: :func:`ppomax.demo.pipeline.
base_stages`) are built or reused, then every variant of :data:`VARIANTS` is a PPO run from them, followed by its
evaluation against SFT on held-out prompts (the demo's gold judge and RM judge) and its language-modelling loss on
held-out pretraining text (the alignment tax of fig. 12). The layout of one seed is the demo's, so `ppomax demo
--out DIR/seed-0` and `ppomax ablate --out DIR` share the base stages and the two runs ``ppo_max`` and
``ppo_vanilla``::

    DIR/seed-N/{world,tokenizer,pretrain,sft,rm}/   the demo's stages
    DIR/seed-N/ppo_vanilla/, ppo_max/                the demo's two PPO runs (variants vanilla and ppo_max)
    DIR/seed-N/ppo_<variant>/                        the other variants' PPO runs
    DIR/seed-N/eval_<variant>/                       vs_sft.json (ppomax.evaluate) and heldout_lm.json
    DIR/seed-N/probe_<variant>/                      memory.json: the estimators comparison's memory probes
    DIR/report/                                      ablate.md, summary.json, one PNG per figure

The report and its verdicts are :mod:`ppomax.demo.ablate_report`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Executor, Future, wait
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ppomax.demo.ablate_report import CAUSES, ESTIMATORS, MONITOR, PROBE_STAGE, WHITENING
from ppomax.demo.pipeline import PPO_RUNS, Pipeline, base_stages, ppo_stage
from ppomax.demo.profiles import PROFILES, DemoProfile
from ppomax.errors import UserError


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
    # length bias), shorter and longer answers, slower and faster learning. Judged by `ablate_report.
    # monitor_evidence` with the estimators' runs, the other out-of-sample set.
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
HELDOUT_TEXTS = {"full": 500, "ablate-quick": 100}  # held-out pretraining texts for the alignment tax


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


def heldout_texts(world: Path, n: int) -> list[str]:
    """``n`` pretraining texts of the world drawn from a stream the pre-training corpus never used."""
    from ppomax.demo.world import load_world
    from ppomax.demo.world.corpora import pretrain_texts

    return pretrain_texts(load_world(world), n=n, stream="pretrain-heldout")


def lm_loss(model: Any, tokenizer: Any, texts: Sequence[str], max_tokens: int, batch_size: int = 64) -> float:
    """Mean negative log-likelihood per token (nats) of ``texts`` (each after BOS, with EOS) under ``model``:
    the pre-training objective on held-out text, through :func:`ppomax.evaluate.token_logits_stats`."""
    from ppomax.data import pad_id_of
    from ppomax.evaluate import token_logits_stats

    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    rows = [[*x[: max_tokens - 2], tokenizer.eos_token_id] for x in ids]
    st = token_logits_stats(
        model, [[bos]] * len(rows), rows, pad_id=pad_id_of(tokenizer), batch_size=batch_size
    )
    return float(-(st.logp.double() * st.mask).sum() / st.mask.sum())


def evaluate_variant(
    d: Path,
    dirs: dict[str, Path],
    ppo_dir: Path,
    prof: DemoProfile,
    seed: int,
    progress: bool,
    cache: dict[str, Any],
) -> None:
    """The variant's policy against SFT on held-out prompts (the demo's judges and settings) and the held-out
    pretraining-text loss of both (``cache``: SFT's side, computed once per process and seed)."""
    from ppomax.demo.world.reward import gold_judge
    from ppomax.evaluate import EvalSettings, evaluate_models, load_eval_prompts, write_json
    from ppomax.models import ValueHeadModel, load_causal_lm, load_tokenizer

    world, sft = dirs["world"], dirs["sft"] / "final"
    prompts, subsets = load_eval_prompts(world / "prompts_test.jsonl", prof.eval_prompts)
    tok = load_tokenizer(sft)
    if "sft" not in cache:
        cache["sft"] = load_causal_lm(sft)
        cache["rm"] = ValueHeadModel.from_pretrained(dirs["rm"] / "final")
        cache["texts"] = heldout_texts(world, HELDOUT_TEXTS.get(prof.name, 500))
        cache["sft_loss"] = lm_loss(cache["sft"], tok, cache["texts"], prof.max_positions)
        cache["baseline"] = {}
    judges = {"gold": ("gold", gold_judge(str(world))), "rm": ("reward-model", cache["rm"])}
    settings = EvalSettings(
        max_new_tokens=prof.eval_max_new_tokens,
        max_prompt_tokens=prof.max_prompt_tokens,
        tie_margin=prof.tie_margin,
        seed=seed,
    )
    policy = load_causal_lm(ppo_dir / "final" / "policy")
    res = evaluate_models(
        policy,
        cache["sft"],
        tok,
        prompts,
        subsets,
        judges,
        settings,
        progress=progress,
        baseline_cache=cache["baseline"],
    )
    res["samples"] = res["samples"][:8]  # the report shows none; keep a few for reading
    write_json(res, d / "vs_sft.json")
    heldout = {
        "n_texts": len(cache["texts"]),
        "sft": cache["sft_loss"],
        "policy": lm_loss(policy, tok, cache["texts"], prof.max_positions),
    }
    (d / "heldout_lm.json").write_text(json.dumps(heldout, indent=1))


def _seed_pipeline(out: Path, seed: int, log: Callable[[str], None], total: int) -> Pipeline:
    return Pipeline(out / f"seed-{seed}", log, total=total)


def run_variant(
    out: Path,
    seed: int,
    variant: Variant,
    prof: DemoProfile,
    progress: bool,
    log: Callable[[str], None],
    index: int = 6,
    total: int = 6,
    cache: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train (or reuse) one variant of one seed and evaluate it; the base stages must be done (they are reused,
    never rebuilt here, so that parallel workers never race on them). Returns its directories and timings."""
    pipe = _seed_pipeline(out, seed, lambda m: None, total)
    dirs = base_stages(pipe, prof, seed, progress)
    pipe.log = log
    stage = STAGE_NAMES[variant.name]
    ppo_dir = ppo_stage(pipe, index, stage, variant.preset, dirs, prof, seed, progress, variant.overrides)
    ev = pipe.run(
        index,
        f"eval_{variant.name}",
        (
            seed,
            prof.eval_prompts,
            prof.eval_max_new_tokens,
            prof.tie_margin,
            HELDOUT_TEXTS.get(prof.name, 500),
        ),
        (stage,),
        lambda d: evaluate_variant(
            d, dirs, ppo_dir, prof, seed, progress, cache if cache is not None else {}
        ),
    )
    return {
        "seed": seed,
        "variant": variant.name,
        "ppo": str(ppo_dir),
        "eval": str(ev),
        "timings": pipe.timings,
    }


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


# Policy iterations of a memory probe: enough for the first updates to allocate the optimisers' states (each later
# iteration allocates and frees buffers of the same sizes), few enough to cost little. It measures at the response
# lengths of the start of training, the same for every method; a run whose answers grow peaks higher later.
PROBE_ITERATIONS = 3


def probe_overrides(variant: Variant) -> tuple[str, ...]:
    """The variant's overrides for its memory probe: :data:`PROBE_ITERATIONS` policy iterations and no critic-only
    ones (they hold the same models and optimisers and update less, so they do not set the peak; a no-op for a
    critic-free preset, which has none)."""
    return (*variant.overrides, f"ppo.iterations={PROBE_ITERATIONS}", "ppo.critic_pretrain_steps=0")


def memory_mib() -> dict[str, float | None]:
    """This process's resident memory now and its peak (MiB): Linux's VmRSS and VmHWM. The peak is the process's
    own since its start, so a fresh process measures one run."""
    status = Path("/proc/self/status")
    if not status.is_file():  # not Linux: ru_maxrss (KiB on Linux, bytes on macOS) is the peak, no current
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (
            2**20 if sys.platform == "darwin" else 2**10
        )
        return {"rss": None, "peak": peak}
    out: dict[str, float | None] = {}
    for line in status.read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out["rss" if key == "VmRSS" else "peak"] = int(value.split()[0]) / 1024  # kB
    return out


def _probe_child(d: str, dirs: dict[str, str], prof: DemoProfile, seed: int, name: str) -> None:
    """The memory probe's run, in a fresh process (see :func:`probe_stage`)."""
    import shutil

    from ppomax.demo.ablate_report import iteration_costs
    from ppomax.demo.stages import ppo_config
    from ppomax.monitor import read_metrics
    from ppomax.trainers.ppo import train_ppo

    _one_thread()
    v, run = BY_NAME[name], Path(d) / "run"
    p = {k: Path(x) for k, x in dirs.items()}
    extra = probe_overrides(v)
    cfg = ppo_config(run, v.preset, p["world"], p["sft"], p["rm"], prof, seed, False, extra, p["pretrain"])
    start = memory_mib()
    train_ppo(cfg)
    peak = memory_mib()["peak"]
    costs = iteration_costs(read_metrics(run / "metrics.jsonl"))
    for sub in ("final", "checkpoints"):  # the probe's models are not used: only its metrics stay
        shutil.rmtree(run / sub, ignore_errors=True)
    res = {
        "peak_rss_mib": peak,
        "start_rss_mib": start["rss"],
        "policy_iterations": PROBE_ITERATIONS,
        "critic_only_iterations": costs["critic_only_iterations"],
        "seconds_per_iteration": costs["seconds_per_iteration"],
    }
    (Path(d) / "memory.json").write_text(json.dumps(res, indent=1))


def _in_fresh_process(fn: Callable[..., Any], *args: Any) -> Any:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def probe_stage(
    out: Path,
    seed: int,
    variant: Variant,
    prof: DemoProfile,
    log: Callable[[str], None],
    index: int,
    total: int,
) -> Path:
    """A short run of ``variant`` (:func:`probe_overrides`: :data:`PROBE_ITERATIONS` policy iterations, its
    settings otherwise) in a fresh process with one torch thread, cached as stage ``probe_<variant>``; its
    ``memory.json`` holds the process's peak resident memory. A process of its own, because a process's peak
    counts everything it ever held (an earlier run in the same `--jobs` worker, the evaluation's models), and a
    short run of its own, because a cached run (PPO-max's, reused from an earlier invocation) has no such number.
    Probes run one at a time, so that their wall times are uncontended too."""
    pipe = _seed_pipeline(out, seed, lambda m: None, total)
    dirs = base_stages(pipe, prof, seed, False)
    pipe.log = log
    key = (seed, variant.preset, list(probe_overrides(variant)), prof.to_dict())
    return pipe.run(
        index,
        PROBE_STAGE.format(variant.name),
        key,
        ("rm",),
        lambda d: _in_fresh_process(
            _probe_child, str(d), {k: str(x) for k, x in dirs.items()}, prof, seed, variant.name
        ),
    )


def _one_thread() -> None:
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()


def _base_worker(args: tuple[Any, ...]) -> None:
    """A ``--jobs`` worker process building one seed's base stages with one torch thread."""
    _one_thread()
    out, seed, prof, total = args
    base_stages(_seed_pipeline(Path(out), seed, print, total), prof, seed, False)


def _worker(args: tuple[Any, ...]) -> dict[str, Any]:
    """A ``--jobs`` worker process: one torch thread (two one-thread runs beat one two-thread run of a model this
    small on two cores), one variant."""
    _one_thread()
    out, seed, name, prof, index, total = args
    return run_variant(Path(out), seed, BY_NAME[name], prof, False, print, index, total)


Job = tuple[Callable[..., Any], Any]  # a picklable function and its one argument, for an executor


def run_seeds_in_parallel(
    pool: Executor,
    seeds: Sequence[int],
    tasks: Sequence[tuple[int, int, Variant]],
    base_job: Callable[[int], Job],
    variant_job: Callable[[int, int, Variant], Job],
) -> list[Any]:
    """Run every seed's base stages and every task ``(seed, index, variant)`` on ``pool``; returns the tasks'
    results in task order. A seed's variants are submitted as soon as its own base stages are done, not after
    every seed's: with more seeds than workers, a worker that finished a seed's base trains its variants while
    another seed's base is still being built, instead of idling. A failure cancels what has not started and is
    raised."""
    bases = {pool.submit(*base_job(s)): s for s in seeds}
    order: dict[Future[Any], int] = {}
    pending: set[Future[Any]] = set(bases)
    try:
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                fut.result()  # a failure first, before anything new is submitted
            for fut in finished:
                if fut in bases:
                    for k, (s, i, v) in enumerate(tasks):
                        if s == bases[fut]:
                            run = pool.submit(*variant_job(s, i, v))
                            order[run] = k
                            pending.add(run)
    except BaseException:
        for fut in pending:
            fut.cancel()
        raise
    return [fut.result() for fut in sorted(order, key=order.__getitem__)]


def recorded_timings(out: Path, seed: int, variant: Variant) -> dict[str, Any]:
    """What :func:`run_variant` returns, from the stages' markers alone (no training): the seconds each finished
    stage of ``variant`` on ``seed`` recorded when it ran."""
    from ppomax.demo.pipeline import MARKER

    d = out / f"seed-{seed}"
    stage = STAGE_NAMES[variant.name]
    timings: dict[str, float] = {}
    for name in ("world", "tokenizer", "pretrain", "sft", "rm", stage, f"eval_{variant.name}"):
        marker = d / name / MARKER
        if marker.is_file():
            timings[name] = float(json.loads(marker.read_text()).get("seconds", 0.0))
    return {
        "seed": seed,
        "variant": variant.name,
        "ppo": str(d / stage),
        "eval": str(d / f"eval_{variant.name}"),
        "timings": timings,
    }


def run_ablate(
    out: str | Path = "runs/ablate",
    seeds: Sequence[int] = (0, 1, 2),
    quick: bool = False,
    only: Sequence[str] | None = None,
    jobs: int = 1,
    progress: bool = True,
    log: Callable[[str], None] = print,
    profile: DemoProfile | None = None,
    report_only: bool = False,
) -> dict[str, Any]:
    """Run (or resume) the ablation and write ``out/report``; returns ``{"report": path, "summary": dict}``.

    ``jobs`` > 1 runs that many stages at once, each in a worker process with one torch thread: a seed's base
    stages first, then its variants (:func:`run_seeds_in_parallel`); ``jobs`` 1 runs everything in this process
    with the caller's thread count. The memory probes run after, one at a time. ``report_only``: train nothing,
    write the report from the runs already in ``out`` (a run not there, or not finished, is listed as missing;
    timings are the ones the stages recorded)."""
    from transformers.utils import logging as hf_logging

    from ppomax.demo.ablate_report import write_ablate_report

    hf_logging.disable_progress_bar()
    prof = profile or (QUICK if quick else PROFILES["full"])
    seeds = list(seeds[:1] if quick and len(seeds) > 1 and not profile else seeds)
    variants = select(only, quick)
    compare = comparison(variants)
    out = Path(out)
    if report_only and not out.is_dir():
        raise UserError(f"--report-only --out {out}: no such directory (the ablation's output directory)")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    total = 5 + len(variants) + len(probed(compare))
    tasks = [(seed, i, v) for seed in seeds for i, v in enumerate(variants, 6)]
    done: list[dict[str, Any]] = []
    if report_only:
        done = [recorded_timings(out, seed, v) for seed, _, v in tasks]
    elif jobs > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
            done = run_seeds_in_parallel(
                pool,
                seeds,
                tasks,
                lambda s: (_base_worker, (str(out), s, prof, total)),
                lambda s, i, v: (_worker, (str(out), s, v.name, prof, i, total)),
            )
    else:
        for seed in seeds:
            log(f"seed {seed}: base stages")
            base_stages(_seed_pipeline(out, seed, log, total), prof, seed, progress)
        caches: dict[int, dict[str, Any]] = {}
        for seed, i, v in tasks:
            log(f"seed {seed}: variant {v.name} ({v.figure}: {v.what})")
            done.append(run_variant(out, seed, v, prof, progress, log, i, total, caches.setdefault(seed, {})))
    for seed in [] if report_only else seeds:
        for i, name in enumerate(probed(compare), 6 + len(variants)):
            log(f"seed {seed}: memory probe of {name}")
            probe_stage(out, seed, BY_NAME[name], prof, log, i, total)
    wall = time.perf_counter() - t0
    timings = {f"{r['seed']}/{r['variant']}": r["timings"] for r in done}
    rep = write_ablate_report(out, seeds, variants, STAGE_NAMES, prof, timings, wall, compare, jobs)
    summary = json.loads((rep / "summary.json").read_text())
    return {"report": rep / "ablate.md", "summary": summary, "wall_seconds": wall}
