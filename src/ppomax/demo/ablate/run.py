"""``ppomax ablate``: every seed's base stages, then its variants (in this process, or ``--jobs`` worker processes
with one torch thread each), the memory probes, and the report (:mod:`.report`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Executor, Future, wait
from pathlib import Path
from typing import Any

from ppomax.demo.ablate.report import write_ablate_report
from ppomax.demo.ablate.stages import one_thread, probe_stage, recorded_timings, run_variant, seed_pipeline
from ppomax.demo.ablate.variants import BY_NAME, QUICK, STAGE_NAMES, Variant, comparison, probed, select
from ppomax.demo.pipeline import base_stages
from ppomax.demo.profiles import PROFILES, DemoProfile
from ppomax.errors import UserError


def _base_worker(args: tuple[Any, ...]) -> None:
    """A ``--jobs`` worker process building one seed's base stages with one torch thread."""
    one_thread()
    out, seed, prof, total = args
    base_stages(seed_pipeline(Path(out), seed, print, total), prof, seed, False)


def _worker(args: tuple[Any, ...]) -> dict[str, Any]:
    """A ``--jobs`` worker process: one torch thread (two one-thread runs beat one two-thread run of a model this
    small on two cores), one variant."""
    one_thread()
    out, seed, name, prof, index, total = args
    return run_variant(Path(out), seed, BY_NAME[name], prof, False, print, index, total)


Job = tuple[Callable[..., Any], Any]  # a picklable function and its one argument, for an executor


def _submit(pool: Executor, job: Job) -> Future[Any]:
    fn, arg = job
    return pool.submit(fn, arg)


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
    bases = {_submit(pool, base_job(s)): s for s in seeds}
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
                            run = _submit(pool, variant_job(s, i, v))
                            order[run] = k
                            pending.add(run)
    except BaseException:
        for fut in pending:
            fut.cancel()
        raise
    return [fut.result() for fut in sorted(order, key=order.__getitem__)]


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
            base_stages(seed_pipeline(out, seed, log, total), prof, seed, progress)
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
