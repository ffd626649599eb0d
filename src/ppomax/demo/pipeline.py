"""`ppomax demo`: the whole RLHF pipeline on the embedded hh-mini world, judged against its gold reward.

Stages, each in its own directory under ``--out`` and skipped when its ``done.json`` marker is there and was
written for the same settings (a fingerprint of the ppomax version, the stage's settings and everything upstream;
the report's also covers the files it reads and the report code, :func:`report_inputs`)::

    world/        the hh-mini corpora (ppomax.demo.world)
    tokenizer/    a byte-level BPE tokenizer trained with `tokenizers` on the world's pretraining text
    pretrain/     a tiny Llama (transformers LlamaConfig) pre-trained from scratch on that text
    sft/          supervised fine-tuning on the world's demonstrations
    rm/           the reward model, from the SFT model, on the annotators' (noisy, length-biased) preferences
    ppo_vanilla/  PPO with the paper's vanilla recipe (preset `vanilla`)
    ppo_max/      PPO-max (preset `ppo_max`)
    eval/         both PPO policies against SFT on held-out prompts (gold judge and RM), RM accuracy
    report/       report.md + PNGs (ppomax.demo.report)

Both PPO runs log the gold reward of every rollout as a programmatic reward of weight 0 (logged, never
optimised), which is how the report can draw gold reward against RM reward over steps.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ppomax import __version__
from ppomax.demo.profiles import PROFILES, DemoProfile

STAGES = ("world", "tokenizer", "pretrain", "sft", "rm", "ppo_vanilla", "ppo_max", "eval", "report")
PPO_RUNS = {"vanilla": "ppo_vanilla", "ppo_max": "ppo_max"}
MARKER = "done.json"
# The code that turns the eval and PPO outputs into report/: a change to it makes a cached report stale even
# within one ppomax version (the other stages are keyed by the version and their settings).
REPORT_CODE = (
    "ppomax.demo.report",
    "ppomax.demo.outcome",
    "ppomax.demo.plots",
    "ppomax.demo.markdown",
    "ppomax.monitor",
    "ppomax.demo.stages",
)


def _fingerprint(*parts: Any) -> str:
    # the version too: a stage cached by another ppomax release may have been computed differently
    blob = json.dumps([__version__, *parts], sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def files_digest(paths: Iterable[Path]) -> str:
    """sha256 of the files' names and contents, in order (a missing file counts as empty)."""
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode() + b"\0")
        h.update(p.read_bytes() if p.is_file() else b"")
        h.update(b"\0")
    return h.hexdigest()[:16]


def _module_file(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.origin is not None, name
    return Path(spec.origin)


def report_inputs(ev: Path, ppo_dirs: dict[str, Path]) -> dict[str, str]:
    """What the report is computed from, as digests: the eval stage's outputs, the PPO runs' metrics (the
    training curves) and the report code. The stage timings it also shows are deliberately not in it: they
    describe the runs that made the inputs, and a re-run with nothing changed must reuse the report."""
    metrics = [ppo_dirs[name] / "metrics.jsonl" for name in sorted(ppo_dirs)]
    return {
        "eval": files_digest(sorted(p for p in ev.iterdir() if p.name != MARKER)),
        "metrics": files_digest(metrics),
        "code": files_digest(_module_file(m) for m in REPORT_CODE),
    }


class Pipeline:
    """Runs stages in order, caching each under ``out/<stage>/`` with a done marker."""

    def __init__(self, out: Path, log: Callable[[str], None] = print, total: int = len(STAGES)) -> None:
        self.out = out
        self.log = log
        self.total = total  # stages in the progress heading "[i/total]"
        self.prints: dict[str, str] = {}
        self.timings: dict[str, float] = {}

    def run(
        self, i: int, name: str, settings: Any, upstream: tuple[str, ...], fn: Callable[[Path], Any]
    ) -> Path:
        d = self.out / name
        fp = _fingerprint(name, settings, [self.prints[u] for u in upstream])
        self.prints[name] = fp
        marker = d / MARKER
        head = f"[{i}/{self.total}] {name}"
        if marker.is_file():
            try:
                done = json.loads(marker.read_text())
            except json.JSONDecodeError:
                done = {}
            if done.get("fingerprint") == fp:
                self.timings[name] = float(done.get("seconds", 0.0))
                self.log(f"{head}: cached ({d})")
                return d
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        self.log(f"{head} ...")
        t0 = time.perf_counter()
        fn(d)
        dt = time.perf_counter() - t0
        self.timings[name] = dt
        marker.write_text(json.dumps({"fingerprint": fp, "seconds": dt, "finished": time.time()}, indent=1))
        self.log(f"{head}: done in {dt:.0f}s")
        return d


def run_demo(
    out: str | Path = "runs/demo",
    quick: bool = False,
    seed: int = 0,
    profile: DemoProfile | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run (or resume) the demo; returns ``{"report": path, "summary": outcome dict, "timings": ...}``.

    Runs with the caller's torch thread count (``ppomax demo`` sets it, see :mod:`ppomax.threads`)."""
    from transformers.utils import logging as hf_logging

    from ppomax.demo import stages as st

    hf_logging.disable_progress_bar()  # per-file weight-loading bars would drown the stage bars

    prof = profile or PROFILES["quick" if quick else "full"]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = Pipeline(out, log)
    t0 = time.perf_counter()
    dirs = base_stages(pipe, prof, seed, progress)
    world, sft, rm = dirs["world"], dirs["sft"], dirs["rm"]
    ppo_dirs = {
        preset: ppo_stage(pipe, 6 + i, stage, preset, dirs, prof, seed, progress)
        for i, (preset, stage) in enumerate(PPO_RUNS.items())
    }
    eval_settings = (prof.eval_prompts, prof.eval_max_new_tokens, prof.tie_margin, prof.max_prompt_tokens)
    ev = pipe.run(
        8,
        "eval",
        (seed, eval_settings),
        tuple(PPO_RUNS.values()),
        lambda d: st.evaluate_all(d, world, sft, rm, ppo_dirs, prof, seed, progress),
    )
    timings = dict(pipe.timings)
    report_settings = (seed, prof.to_dict(), str(out), report_inputs(ev, ppo_dirs))
    rep = pipe.run(
        9,
        "report",
        report_settings,
        ("eval",),
        lambda d: st.write_demo_report(d, world, ppo_dirs, ev, prof, seed, timings, out),
    )
    summary = json.loads((rep / "summary.json").read_text())
    summary["wall_seconds"] = time.perf_counter() - t0
    return {"report": rep / "report.md", "summary": summary, "timings": pipe.timings}


def format_summary(summary: dict[str, Any]) -> str:
    """The short table `ppomax demo` prints at the end (numbers from ``report/summary.json``)."""

    def f(x: Any, spec: str = ".3f") -> str:
        return format(x, spec) if isinstance(x, int | float) else "n/a"

    lines = [
        f"{'model':<9} {'gold':>7} {'RM':>7} {'KL/tok':>7} {'ppl':>6} {'len':>5}   gold judge vs SFT (win/tie/lose)"
    ]
    ev = summary.get("eval", {})
    first = next(iter(ev.values()), None)
    if first:
        lines.append(
            f"{'sft':<9} {f(first['gold_sft']):>7} {f(first['rm_sft']):>7} {'0':>7} {'':>6} "
            f"{f(first['sft_length_tokens'], '.1f'):>5}"
        )
    for name, e in ev.items():
        wtl = e["win_tie_lose"]
        parts = [
            f"{s} {'/'.join(str(x) for x in wtl[s])}" for s in ("overall", "helpful", "harmless") if s in wtl
        ]
        lines.append(
            f"{name:<9} {f(e['gold_policy']):>7} {f(e['rm_policy']):>7} {f(e['kl_per_token'], '.4f'):>7} "
            f"{f(e['perplexity'], '.2f'):>6} {f(e['length_tokens'], '.1f'):>5}   {'; '.join(parts)}"
        )
    rm = summary.get("rm_accuracy")
    if rm:
        lines.append(
            f"reward model accuracy on held-out pairs: {rm['accuracy_annotator']:.1%} vs annotator labels, "
            f"{rm['accuracy_gold']:.1%} vs gold labels"
        )
    verdicts = [
        ("PPO-max beats SFT (gold judge)", summary.get("ppo_max_beats_sft")),
        ("PPO-max stable to the end", summary.get("ppo_max_stable")),
        ("vanilla over-optimises the RM", summary.get("vanilla_over_optimises")),
    ]
    for text, flag in verdicts:
        lines.append(f"{text}: {'yes' if flag else 'no' if flag is False else 'n/a'}")
    if summary.get("vanilla_signatures"):
        lines.append("vanilla's collapse signatures: " + ", ".join(summary["vanilla_signatures"]))
    return "\n".join(lines)


def base_stages(pipe: Pipeline, prof: DemoProfile, seed: int, progress: bool) -> dict[str, Path]:
    """Stages 1-5 (world, tokenizer, pre-training, SFT, RM) in ``pipe``: what every PPO run of the demo and of
    `ppomax ablate` starts from. Returns their directories by stage name."""
    from ppomax.demo import stages as st

    world = pipe.run(1, "world", (seed, prof.world), (), lambda d: st.make_world(d, seed, prof))
    tok = pipe.run(2, "tokenizer", prof.vocab_size, ("world",), lambda d: st.train_tokenizer(d, world, prof))
    model_settings = (
        prof.hidden_size,
        prof.intermediate_size,
        prof.num_layers,
        prof.num_heads,
        prof.max_positions,
        prof.pretrain_epochs,
        prof.pretrain_lr,
        prof.pretrain_batch,
    )
    pre = pipe.run(
        3,
        "pretrain",
        (seed, model_settings),
        ("tokenizer",),
        lambda d: st.pretrain(d, world, tok, prof, seed, progress),
    )
    lengths = (prof.max_prompt_tokens, prof.max_new_tokens)
    sft = pipe.run(
        4,
        "sft",
        (seed, prof.sft_epochs, prof.sft_lr, prof.sft_batch, lengths),
        ("pretrain",),
        lambda d: st.sft(d, world, pre, prof, seed, progress),
    )
    rm = pipe.run(
        5,
        "rm",
        (seed, prof.rm_epochs, prof.rm_lr, prof.rm_batch, lengths),
        ("sft",),
        lambda d: st.reward_model(d, world, sft, prof, seed, progress),
    )
    return {"world": world, "tokenizer": tok, "pretrain": pre, "sft": sft, "rm": rm}


def ppo_stage(
    pipe: Pipeline,
    i: int,
    stage: str,
    preset: str,
    dirs: dict[str, Path],
    prof: DemoProfile,
    seed: int,
    progress: bool,
    overrides: tuple[str, ...] = (),
) -> Path:
    """One PPO run of ``preset`` (plus ``overrides``, see :func:`ppomax.demo.stages.ppo_config`) from the base
    stages' ``dirs``, cached as stage ``stage``. Without overrides the key is the demo's, so `ppomax ablate` into
    a demo's directory reuses its two PPO runs."""
    from ppomax.demo import stages as st

    settings = {
        k: v
        for k, v in prof.to_dict().items()
        if k.startswith(("ppo_", "policy_", "critic_"))
        or k in ("rollout_batch", "buffer_size", "minibatch_size", "max_new_tokens", "max_prompt_tokens")
    }
    # the gold reward function is in the key: its spec and name decide the metric the report reads
    key: tuple[Any, ...] = (seed, preset, settings, st.GOLD_FUNCTION)
    if overrides:
        key += (list(overrides),)
    return pipe.run(
        i,
        stage,
        key,
        ("rm",),
        lambda d: st.ppo(
            d,
            preset,
            dirs["world"],
            dirs["sft"],
            dirs["rm"],
            prof,
            seed,
            progress,
            overrides,
            dirs["pretrain"],
        ),
    )
