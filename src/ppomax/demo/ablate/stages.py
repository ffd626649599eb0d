"""The ablation's stages of one seed, after the demo's base stages: a variant's PPO run and its evaluation
(:func:`run_variant`), and a method's memory probe (:func:`probe_stage`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ppomax.demo.ablate.numbers import iteration_costs
from ppomax.demo.ablate.variants import BY_NAME, STAGE_NAMES, Variant
from ppomax.demo.pipeline import Pipeline, base_stages, ppo_stage
from ppomax.demo.profiles import DemoProfile

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ppomax.models.adapter_dir import CausalLM

HELDOUT_TEXTS = {"full": 500, "ablate-quick": 100}  # held-out pretraining texts for the alignment tax


def heldout_texts(world: Path, n: int) -> list[str]:
    """``n`` pretraining texts of the world drawn from a stream the pre-training corpus never used."""
    from ppomax.demo.world import load_world
    from ppomax.demo.world.corpora import pretrain_texts

    return pretrain_texts(load_world(world), n=n, stream="pretrain-heldout")


def lm_loss(
    model: CausalLM,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    max_tokens: int,
    batch_size: int = 64,
) -> float:
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


def seed_pipeline(out: Path, seed: int, log: Callable[[str], None], total: int) -> Pipeline:
    """The stages of seed ``seed``, in ``out/seed-<seed>`` (the demo's layout)."""
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
    pipe = seed_pipeline(out, seed, lambda m: None, total)
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


PROBE_STAGE = "probe_{}"  # a method's memory probe, a stage of its seed's directory


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

    from ppomax.demo.stages import ppo_config
    from ppomax.monitor import read_metrics
    from ppomax.ppo import train_ppo

    one_thread()
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
    pipe = seed_pipeline(out, seed, lambda m: None, total)
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


def probe_memory(out: Path, seed: int, name: str) -> dict[str, Any] | None:
    """The memory probe of ``name`` on ``seed`` (:func:`probe_stage`), if it ran."""
    f = out / f"seed-{seed}" / PROBE_STAGE.format(name) / "memory.json"
    return json.loads(f.read_text()) if f.is_file() else None


def one_thread() -> None:
    """This process trains with one torch thread and no progress bars (a worker or probe process)."""
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()
