"""The report of `ppomax ablate`: ``report/ablate.md``, ``summary.json`` and the PNGs (:mod:`.figures`), from the
run directories (:func:`load_runs`), one function per section of ``ablate.md``.

The numbers are :mod:`.numbers` (per run), :mod:`.verdicts` (the paper's claims), :mod:`.estimators` (the
critic-free estimators against PPO-max) and :mod:`.monitor` (the collapse monitor against the gold truth).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from statistics import fmean
from typing import Any

from ppomax.demo.ablate.estimators import (
    CAUSE_KEYS,
    cause_effects,
    compare_estimators,
    frontier,
    frontier_metric,
)
from ppomax.demo.ablate.figures import (
    plot_alignment_tax,
    plot_frontier,
    plot_variant_figures,
    plot_variants_vs_sft,
)
from ppomax.demo.ablate.monitor import MONITOR_RULES, OUT_OF_SAMPLE, confusion, monitor_evidence
from ppomax.demo.ablate.numbers import GOLD_NOISE, iteration_costs, method_settings, run_numbers
from ppomax.demo.ablate.stages import probe_memory
from ppomax.demo.ablate.variants import CAUSES
from ppomax.demo.ablate.verdicts import MORE_SEEDS, verdicts
from ppomax.demo.markdown import fmt_list, fmt_num, fmt_spread
from ppomax.demo.outcome import policy_records
from ppomax.errors import UserError

Nums = dict[str, dict[int, dict[str, Any]]]  # variant -> seed -> run_numbers (+ costs, settings)


def write_ablate_report(
    out: Path,
    seeds: Sequence[int],
    variants: Sequence[Any],
    stage_names: dict[str, str],
    prof: Any,
    timings: dict[str, Any],
    wall: float,
    compare: Sequence[str] = (),
    jobs: int = 1,
) -> Path:
    """``out/report/``: ablate.md, summary.json and the PNGs; returns the report directory. ``compare``: the
    methods of the estimators comparison (:func:`ppomax.demo.ablate.variants.comparison`), none: no such section."""
    rep = out / "report"
    rep.mkdir(parents=True, exist_ok=True)
    records, nums, missing = load_runs(out, seeds, variants, stage_names)
    if not nums:  # nothing to judge or draw: say what a report would need instead of an empty one
        raise UserError(
            f"{out}: no finished ablation run to report (each needs its PPO run and its evaluation); missing: "
            f"{', '.join(missing)}; train them with `ppomax ablate --out {out}` (the same --seeds and --only)"
        )
    pngs = plot_variant_figures(records, variants, rep)
    ran = {v.name: sorted(nums.get(v.name, {})) for v in variants}  # the seeds each variant has runs of
    plot_variants_vs_sft(nums, variants, ran, rep / "win_tie_lose.png")
    plot_alignment_tax(nums, variants, ran, rep / "alignment_tax.png")
    vs = verdicts(nums)
    cmp = _estimators(out, seeds, variants, compare, records, nums, rep)
    evidence = monitor_evidence(nums, {v.name: v.figure for v in variants})
    md = [
        *_introduction(prof, seeds, variants, wall, missing),
        *_verdicts_section(vs),
        *(
            estimators_markdown(cmp, "estimators_frontier.png", _conditions(cmp, jobs))
            if cmp is not None
            else []
        ),
        *_variants_section(variants),
        *_per_run_section(variants, ran, nums),
        *_figures_section(pngs),
        *_monitor_section(variants, ran, nums, evidence),
        *_timings_section(timings),
    ]
    (rep / "ablate.md").write_text("\n".join(md), encoding="utf-8")
    summary = {
        "profile": prof.name,
        "seeds": list(seeds),
        "variants": [v.name for v in variants],
        "missing_runs": missing,
        "verdicts": vs,
        "collapse_monitor": {k: confusion(nums, f"monitor_{k}") for k in ("before", "after")},
        "collapse_monitor_rules": evidence,
        "estimators": cmp,
        "runs": {k: {str(s): r for s, r in v.items()} for k, v in nums.items()},
        "timings": timings,
        "wall_seconds": wall,
    }
    (rep / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return rep


def load_runs(
    out: Path, seeds: Sequence[int], variants: Sequence[Any], stage_names: dict[str, str]
) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """The runs' metrics and numbers, and the ``variant/seed`` runs left out because their PPO run or its
    evaluation is not there (never trained, or interrupted): a partial ablation still gets a report."""
    import yaml

    from ppomax.monitor import read_metrics

    records: dict[str, dict[int, list[dict[str, Any]]]] = {}
    nums: dict[str, dict[int, dict[str, Any]]] = {}
    missing: list[str] = []
    for v in variants:
        for s in seeds:
            d = out / f"seed-{s}"
            needed = (
                d / stage_names[v.name] / "metrics.jsonl",
                d / stage_names[v.name] / "config.yaml",
                d / f"eval_{v.name}" / "vs_sft.json",
                d / f"eval_{v.name}" / "heldout_lm.json",
            )
            if not all(f.is_file() for f in needed):
                missing.append(f"{v.name}/{s}")
                continue
            raw = read_metrics(d / stage_names[v.name] / "metrics.jsonl")
            recs = policy_records(raw)
            ev = json.loads((d / f"eval_{v.name}" / "vs_sft.json").read_text())
            held = json.loads((d / f"eval_{v.name}" / "heldout_lm.json").read_text())
            config = yaml.safe_load((d / stage_names[v.name] / "config.yaml").read_text()) or {}
            records.setdefault(v.name, {})[s] = recs
            nums.setdefault(v.name, {})[s] = {
                **run_numbers(recs, ev, held),
                **iteration_costs(raw),
                "settings": method_settings(config),
            }
    return records, nums, missing


def _estimators(
    out: Path,
    seeds: Sequence[int],
    variants: Sequence[Any],
    compare: Sequence[str],
    records: dict[str, dict[int, list[dict[str, Any]]]],
    nums: Nums,
    rep: Path,
) -> dict[str, Any] | None:
    """The estimators comparison of the methods in ``compare`` that have a run (none with fewer than two), its
    frontier PNG and the causes' effects."""
    compare = [n for n in compare if records.get(n)]  # methods with at least one run
    if len(compare) < 2:
        return None
    curves = {n: {s: frontier(r) for s, r in records[n].items()} for n in compare}
    metrics = sorted({frontier_metric(r) for n in compare for r in records[n].values()})
    cmp = compare_estimators(
        compare,
        curves,
        nums,
        {n: {s: probe_memory(out, s, n) for s in seeds} for n in compare},
        " and ".join(metrics) + (" (runs of different versions: not one axis)" if len(metrics) > 1 else ""),
    )
    plot_frontier(curves, cmp["budget"], rep / "estimators_frontier.png", cmp["kl_metric"])
    cmp["causes"] = cause_effects(cmp, {v.name: v.preset for v in variants if v.figure == CAUSES})
    return cmp


def _introduction(
    prof: Any, seeds: Sequence[int], variants: Sequence[Any], wall: float, missing: Sequence[str]
) -> list[str]:
    return [
        "# `ppomax ablate`: the paper's ablations on hh-mini",
        "",
        f"Profile `{prof.name}` ({prof.ppo_iterations} PPO iterations per run), seeds {', '.join(map(str, seeds))}, "
        f"{len(variants)} variants; wall time of this invocation {wall:.0f} s (cached stages count 0)."
        + (
            f" Runs not in this report (not trained or not finished): {', '.join(missing)}."
            if missing
            else ""
        ),
        "Each variant is a preset plus `--set` overrides (`ppomax.demo.ablate.VARIANTS`); the gold reward is logged "
        "during PPO, never optimised. Numbers per run are in `summary.json`.",
        "",
    ]


def _verdicts_section(vs: Sequence[dict[str, Any]]) -> list[str]:
    """One row per claim (:func:`ppomax.demo.ablate.verdicts.verdicts`), then the criteria they were decided by."""
    md = [
        "## Verdicts",
        "",
        "| claim | paper | verdict | numbers | likely explanation (when not reproduced) |",
        "|---|---|---|---|---|",
    ]
    md += [
        f"| {v['claim']} | {v['figure']} | **{v['verdict']}** | {v['numbers']} | {v['explanation']} |"
        for v in vs
    ]
    md += [
        "",
        "Criteria: *early* = the first half of a run; `kl_mid` = KL per token at its end, `gold_drop_early` = gold's "
        "fall from its peak within it, `rm_roughness_early` = sd of the RM reward's step-to-step changes in it; "
        f"*over-optimised* = gold fell from its peak by >= 10% of its rise and >= {GOLD_NOISE} while the RM reward "
        "ended above its value at gold's peak; *collapsed* = loses to SFT on more than half the held-out prompts. "
        "A comparison of two variants is decided by the paired t-test of their per-seed difference (one-sided, "
        "95%: with 3 seeds the mean difference must be 2.92 standard errors from 0), a yes/no one (over-optimised) "
        "when every seed agrees; a claim is reproduced when all its comparisons hold, not reproduced when one "
        f"fails, and within noise otherwise: with fewer than 5 seeds, rerun it with `{MORE_SEEDS}`.",
        "",
    ]
    return md


def estimators_markdown(cmp: dict[str, Any], png: str, jobs_note: str) -> list[str]:
    """The report's section of the comparison (its tables and figure)."""
    methods = cmp["methods"]
    md = [
        "## Critic-free estimators against PPO-max (beyond the paper)",
        "",
        "Every method is its preset (`ppomax.demo.ablate.VARIANTS`) on the same seeds and base stages, with equal "
        "samples (responses) per iteration, learning rate and iterations. *Gold at equal KL*: each run's gold "
        f"reward when its KL first reached the budget, the smallest of the runs' largest KL ({fmt_num(cmp['budget'])} "
        f"nats per response, `{cmp['kl_metric']}`), interpolated on the 15% moving averages; mean [min, max] over "
        f"seeds. {jobs_note}",
        "",
        f"![gold against KL]({png})",
        "",
        "| method | estimator | samples/prompt | KL coef (in) | gold at equal KL | max KL | end gold | end KL | "
        "gold vs SFT w/t/l | over-optimised | s / policy iteration | training s | probe s / iteration | "
        "peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n, m in methods.items():
        rs = [r for _, r in sorted(m["seeds"].items())]
        st = m.get("settings") or {}
        wtl = [sum(r["win_tie_lose"][i] for r in rs) for i in range(3)]
        md.append(
            f"| {n} | {st.get('advantage_estimator', 'n/a')} | {st.get('samples_per_prompt', 'n/a')} | "
            f"{fmt_num(st.get('kl_coef'), 'g')} ({st.get('kl_in', 'n/a')}, {st.get('kl_estimator', 'n/a')}) | "
            f"{fmt_spread([r['gold_at_budget'] for r in rs])} | {fmt_spread([r['kl_max'] for r in rs], '.2f')} | "
            f"{fmt_spread([r['gold_end'] for r in rs])} | {fmt_spread([r['kl_end'] for r in rs], '.2f')} | "
            f"{'/'.join(map(str, wtl))} | {'/'.join('yes' if r['over_optimised'] else 'no' for r in rs)} | "
            f"{fmt_spread([r['seconds_per_iteration'] for r in rs], '.2f')} | "
            f"{fmt_spread([r['train_seconds'] for r in rs], '.0f')} | "
            f"{fmt_spread([r['probe_seconds_per_iteration'] for r in rs], '.2f')} | "
            f"{fmt_spread([r['peak_rss_mib'] for r in rs], '.0f')} |"
        )
    md += ["", "| question | answer | numbers |", "|---|---|---|"]
    md += [f"| {v['question']} | **{v['answer']}** | {v['numbers']} |" for v in cmp["verdicts"]]
    md.append("")
    if cmp.get("causes"):
        md += causes_markdown(cmp["causes"])
    return md


def causes_markdown(rows: Sequence[dict[str, Any]]) -> list[str]:
    md = [
        "### What makes GRPO differ from RLOO (paired over seeds)",
        "",
        "Each variant moves one of the presets' differences to the other side; its effect is its difference to its "
        "preset on the same seeds (variant - preset): mean ± sd over seeds [per seed], and the paired t-test's "
        "decision (for gold: *holds* = better, *fails* = worse, beyond the seeds' noise). Gold at equal KL uses the "
        "comparison's budget.",
        "",
        "| variant | vs | gold at equal KL | end gold | gold fall | end KL (nats/response) | over-optimised (variant / preset) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = []
        for key, _ in CAUSE_KEYS:
            e = r["effects"][key]
            cells.append(
                f"{fmt_num(e['mean'], '+.3f')} ± {fmt_num(e['sd'], '.3f')} [{fmt_list(e['diffs'], '+.3f')}] {e['decision']}"
            )
        flags = " / ".join(
            "/".join("yes" if x else "no" for x in r[key])
            for key in ("over_optimised", "base_over_optimised")
        )
        md.append(f"| {r['variant']} | {r['base']} | {' | '.join(cells)} | {flags} |")
    md.append("")
    return md


def _conditions(cmp: dict[str, Any], jobs: int) -> str:
    """How the wall times and memory were measured (the table's last three columns)."""
    probed = [m["probe_policy_iterations"] for m in cmp["methods"].values() if m["probe_policy_iterations"]]
    text = (
        "Wall time: the runs' `time/iteration` (policy iterations; training s also counts critic-only ones), "
        f"{'one run per process with one torch thread, ' + str(jobs) + ' at once' if jobs > 1 else 'one run at a time'} "
        "when they were trained (a cached run keeps the time of the invocation that trained it)."
    )
    if probed:
        text += (
            f" Probe: a separate short run of each method and seed ({probed[0]} policy iterations, no critic-only "
            "ones) in a fresh process, one at a time, with one torch thread; peak RSS is that training process's "
            "peak resident memory (Linux VmHWM: Python, torch and the method's models included), at the response "
            "lengths of the start of training."
        )
    return text


def _variants_section(variants: Sequence[Any]) -> list[str]:
    md = [
        "## Variants",
        "",
        "| variant | paper | preset | overrides | what |",
        "|---|---|---|---|---|",
    ]
    md += [
        f"| {v.name} | {v.figure} | {v.preset} | {' '.join(f'`{o}`' for o in v.overrides) or '-'} | {v.what} |"
        for v in variants
    ]
    md.append("")
    return md


def _per_run_section(variants: Sequence[Any], ran: dict[str, list[int]], nums: Nums) -> list[str]:
    """Each run's fig. 4 numbers, its over-optimisation and collapse, and its evaluation."""
    md = ["## Per run", ""]
    md += [
        "| variant | seed | RM start/peak/end | gold start/peak/end | KL/token end | ppl end | length end | "
        "over-optimised | collapsed | gold vs SFT w/t/l | held-out loss (SFT) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v in variants:
        for s in ran[v.name]:
            r = nums[v.name][s]
            t = r["trajectories"]
            md.append(
                f"| {v.name} | {s} | {_start_peak_end(t['rm'])} | {_start_peak_end(t['gold'])} | "
                f"{fmt_num(t['kl']['end'], '.3f')} | {fmt_num(t['ppl']['end'], '.3f')} | "
                f"{fmt_num(t['length']['end'], '.1f')} | "
                f"{'yes' if r['over_optimised'] else 'no'} | {'yes' if r['collapsed'] else 'no'} | "
                f"{'/'.join(map(str, r['win_tie_lose']))} | {fmt_num(r['heldout_loss'], '.4f')} "
                f"({fmt_num(r['heldout_loss_sft'], '.4f')}) |"
            )
    md.append("")
    return md


def _start_peak_end(t: dict[str, Any]) -> str:
    return "/".join(fmt_num(t[k], ".2f") for k in ("start", "peak", "end"))


def _figures_section(pngs: dict[str, str]) -> list[str]:
    md = ["## Training curves (paper fig. 4's panels, one figure per paper figure)", ""]
    md += [f"### {k}\n\n![{k}]({p})\n" for k, p in pngs.items()]
    md += ["## Against SFT by the gold judge", "", "![win/tie/lose](win_tie_lose.png)", ""]
    md += ["## Alignment tax (fig. 12)", "", "![alignment tax](alignment_tax.png)", ""]
    return md


def _step(x: Any) -> str:
    return "never" if x is None else str(x)


def _monitor_section(
    variants: Sequence[Any], ran: dict[str, list[int]], nums: Nums, evidence: dict[str, Any]
) -> list[str]:
    """Per run, when gold started to fall and when each monitor rule fired; then each rule's evidence
    (:func:`ppomax.demo.ablate.monitor.monitor_evidence`)."""
    md = [
        "## The collapse monitor against the gold truth",
        "",
        "Per run: the step gold started to fall (its moving average 0.1 below its peak so far) and the first step "
        "the monitor fires, replayed on the run's metrics: with the library's rule (drift: KL per token >= "
        "`collapse.drift_kl_per_token` and still rising while the reward is above its baseline, or the paper's "
        "joint signature; on the exact KL where the run logged it), with the paper's signature alone (length up, "
        "perplexity down, KL up), and as the run itself logged it. *Out of sample*: the runs of groups "
        f"{', '.join(OUT_OF_SAMPLE)}, which no threshold was chosen on. Lead = gold's fall step minus the firing "
        "step (negative: after).",
        "",
        "| variant | seed | sample | over-optimised | gold starts falling | library rule | lead | signature only | logged |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    library = next(iter(MONITOR_RULES))
    for v in variants:
        for s in ran[v.name]:
            r = nums[v.name][s]
            fired = r.get("monitor_rules", {}).get(library, r.get("monitor_after"))
            lead = (
                f"{r['gold_fall_step'] - fired:+d}"
                if r["over_optimised"] and isinstance(fired, int) and r["gold_fall_step"] is not None
                else ""
            )
            sample = "out" if v.figure in OUT_OF_SAMPLE else "in"
            md.append(
                f"| {v.name} | {s} | {sample} | {'yes' if r['over_optimised'] else 'no'} | "
                f"{_step(r['gold_fall_step'])} | {_step(fired)} | {lead} | {_step(r['monitor_before'])} | "
                f"{_step(r['monitor_logged'])} |"
            )
    md += monitor_markdown(evidence)
    md.append("")
    return md


def _timings_section(timings: dict[str, Any]) -> list[str]:
    """Stage seconds as each stage's done.json recorded them when it ran (a cached stage keeps its old time)."""
    base = ("world", "tokenizer", "pretrain", "sft", "rm")
    md = ["", "## Timings", "", "| seed | run | stage seconds |", "|---|---|---|"]
    seen: set[str] = set()
    for k, v in timings.items():
        seed = k.split("/")[0]
        if seed not in seen:
            seen.add(seed)
            md.append(f"| {seed} | base stages | {', '.join(f'{n} {v[n]:.0f}' for n in base if n in v)} |")
        md.append(
            f"| {seed} | {k.split('/', 1)[1]} | {', '.join(f'{n} {t:.0f}' for n, t in v.items() if n not in base)} |"
        )
    md.append("")
    return md


def monitor_markdown(evidence: dict[str, Any]) -> list[str]:
    md = []
    for sample, rows in evidence.items():
        md += [
            "",
            f"Rules against the gold truth, runs {sample}:",
            "",
            "| rule | fired & over-optimised | fired & healthy (false alarms) | silent & over-optimised (misses) | "
            "silent & healthy | not replayable | lead in steps: mean [min, max] (negative: after gold fell) |",
            "|---|---|---|---|---|---|---|",
        ]
        for rule, t in rows.items():
            leads = t["leads"]
            lead = f"{fmt_num(fmean(leads), '+.1f')} [{min(leads):+d}, {max(leads):+d}]" if leads else "n/a"
            md.append(
                f"| {rule} | {t['fired_oo']} | {t['fired_ok']} | {t['silent_oo']} | {t['silent_ok']} | "
                f"{t['not_replayable']} | {lead} |"
            )
    return md
