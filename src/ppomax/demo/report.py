"""The demo's report, ``report.md`` with its PNGs (:mod:`ppomax.demo.plots`), one function per section.

* ``training_curves.png``: the paper's fig. 4 panels for every PPO run on shared axes: RM reward, gold reward,
  KL to the reference, policy perplexity, response length over PPO steps (raw values faint, a moving average
  bold).
* ``win_tie_lose.png``: win/tie/lose of each PPO policy against SFT by the gold judge, helpful / harmless /
  overall, as horizontal stacked bars (the form of the paper's fig. 10).
* ``rm_margins.png``: the reward model's ``r(chosen) - r(rejected)`` on held-out pairs (paper fig. 2), split by
  whether the gold reward agrees with the annotators' label, with the RM's accuracy against both labels.
* ``report.md``: the outcome (does PPO-max beat SFT, does vanilla over-optimise: :func:`ppomax.demo.outcome.outcome`),
  the tables, sample responses.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ppomax.demo.markdown import fmt_num, fmt_pct, md_cell
from ppomax.demo.outcome import outcome
from ppomax.demo.plots import plot_rm_margins, plot_training_curves, plot_win_tie_lose

SUBSETS = ("helpful", "harmless", "overall")


def write_report(
    out_dir: str | os.PathLike[str],
    runs: dict[str, Sequence[dict[str, Any]]],
    evals: dict[str, dict[str, Any]],
    rm_stats: dict[str, Any] | None = None,
    baseline: str = "sft",
    gold_judge: str = "gold",
    rm_judge: str | None = None,
    n_samples: int = 4,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write the PNGs and ``report.md`` into ``out_dir``; returns the report's path.

    ``runs``: run name -> metrics.jsonl records. ``evals``: run name -> :func:`ppomax.evaluate.evaluate_models`
    result against the baseline. ``rm_stats``: ``{"accuracy_gold", "accuracy_annotator", "n", "margins",
    "gold_agrees"}`` on held-out pairs. ``meta``: free key/values for the settings section (e.g. timings).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    res = outcome(runs, evals, gold_judge)
    md = [*_introduction(), *_outcome_section(res)]
    if runs:
        md += _training_section(runs, res, out)
    if evals:
        md += _judge_section(evals, baseline, gold_judge, rm_judge, out)
        md += _evaluation_section(evals, baseline, gold_judge, rm_judge)
    if rm_stats:
        md += _reward_model_section(rm_stats, out)
    if evals and n_samples > 0:
        md += _samples_section(evals, baseline, gold_judge, rm_judge, n_samples)
    if meta:
        md += _settings_section(meta)
    path = out / "report.md"
    path.write_text("\n".join(md), encoding="utf-8")
    return path


def _introduction() -> list[str]:
    return [
        "# ppomax demo on hh-mini",
        "",
        "The whole RLHF pipeline on a generated world whose true preference (the *gold reward*) is known: a BPE",
        "tokenizer, a tiny Llama pre-trained from scratch, SFT, a reward model trained on noisy, length-biased",
        "annotator labels, then PPO with the paper's `vanilla` and `ppo_max` recipes. The gold reward is logged",
        "during PPO but never optimised; the final judge compares each PPO policy with SFT by gold reward.",
        "",
    ]


def _verdict(flag: Any) -> str:
    return "**yes**" if flag is True else ("**no**" if flag is False else "n/a")


def _outcome_section(res: dict[str, Any]) -> list[str]:
    """The paper's finding on this world, one line per check of :func:`ppomax.demo.outcome.outcome`."""
    md = ["## Outcome", ""]
    pm_wtl, va_wtl = res.get("ppo_max_vs_sft"), res.get("vanilla_vs_sft")
    if pm_wtl:
        md.append(
            f"- PPO-max beats SFT by the gold judge (more wins than losses): {_verdict(res.get('ppo_max_beats_sft'))}"
            f" (win {pm_wtl['win']} / tie {pm_wtl['tie']} / lose {pm_wtl['lose']} of {pm_wtl['n']})"
        )
    if "ppo_max_stable" in res:
        s = res["ppo_max_stability"]
        md.append(
            f"- PPO-max stays stable to the end of its run: {_verdict(res['ppo_max_stable'])} "
            f"(KL per token mid-run {fmt_num(s['kl_mid'], '.4f')} -> end {fmt_num(s['kl_end'], '.4f')}; "
            f"no late gold collapse: {s['gold_no_late_collapse']})"
        )
    if "vanilla_over_optimises" in res:
        v = res["runs"]["vanilla"]
        md.append(
            f"- Vanilla PPO over-optimises the reward model: {_verdict(res['vanilla_over_optimises'])} "
            f"(RM reward {fmt_num(v['rm']['start'])} -> {fmt_num(v['rm']['end'])}; gold reward "
            f"{fmt_num(v['gold']['start'])} -> peak {fmt_num(v['gold']['peak'])} -> {fmt_num(v['gold']['end'])}; "
            f"signatures: {', '.join(res.get('vanilla_signatures') or ['none'])})"
        )
    for name, step in res["collapse_first_step"].items():
        if step is not None:
            md.append(
                f"- The collapse monitor (paper 5.2's length up, perplexity down, KL up; or KL still rising past "
                f"collapse.drift_kl_per_token while the reward rises) fired for {name} at policy step {step}."
            )
    if va_wtl:
        md.append(
            f"- Vanilla vs SFT by the gold judge: win {va_wtl['win']} / tie {va_wtl['tie']} / lose "
            f"{va_wtl['lose']} of {va_wtl['n']}"
        )
    md.append("")
    return md


def _training_section(runs: dict[str, Sequence[dict[str, Any]]], res: dict[str, Any], out: Path) -> list[str]:
    """Fig. 4's panels (``training_curves.png``) and each run's start / peak / end of them."""
    plot_training_curves(runs, out / "training_curves.png")
    md = ["## Training dynamics (paper fig. 4)", "", "![training curves](training_curves.png)", ""]
    md += ["| run | metric | start | peak | end |", "|---|---|---|---|---|"]
    for name, tr in res["runs"].items():
        for metric, t in tr.items():
            if t["n"]:
                md.append(
                    f"| {name} | {metric} (`{t['key']}`) | {fmt_num(t['start'])} | {fmt_num(t['peak'])} | "
                    f"{fmt_num(t['end'])} |"
                )
    md.append("")
    return md


def _wtl_table(evals: dict[str, dict[str, Any]], judge: str, baseline: str) -> list[str]:
    lines = [f"| policy vs {baseline} | subset | n | win | tie | lose |", "|---|---|---|---|---|---|"]
    for name, ev in evals.items():
        j = ev.get("judges", {}).get(judge)
        if j is None:
            continue
        for subset in SUBSETS:
            r = j["win_tie_lose"].get(subset)
            if r is None:
                continue
            lines.append(
                f"| {name} | {subset} | {r['n']} | {r['win']} ({fmt_pct(r['win_rate'])}) | "
                f"{r['tie']} ({fmt_pct(r['tie_rate'])}) | {r['lose']} ({fmt_pct(r['lose_rate'])}) |"
            )
    return lines


def _judge_section(
    evals: dict[str, dict[str, Any]], baseline: str, gold_judge: str, rm_judge: str | None, out: Path
) -> list[str]:
    """Win/tie/lose against the baseline by the gold judge (``win_tie_lose.png`` and its table; paper fig. 10),
    then by the reward model."""
    md: list[str] = []
    rows = []
    for name, ev in evals.items():
        j = ev.get("judges", {}).get(gold_judge)
        if j is not None:
            rows += [(f"{name} · {s}", j["win_tie_lose"][s]) for s in SUBSETS if s in j["win_tie_lose"]]
    if rows:
        margin = next(iter(evals.values()))["settings"]["tie_margin"]
        plot_win_tie_lose(
            rows,
            out / "win_tie_lose.png",
            f"PPO policy vs {baseline.upper()} by the gold judge (tie margin {margin})",
        )
        md += [
            f"## Preference against {baseline.upper()} by the gold judge (paper fig. 10)",
            "",
            "![win/tie/lose](win_tie_lose.png)",
            "",
        ]
        md += [*_wtl_table(evals, gold_judge, baseline), ""]
    if rm_judge:
        md += ["By the reward model instead of the gold judge (what PPO optimised):", ""]
        md += [*_wtl_table(evals, rm_judge, baseline), ""]
    return md


def _evaluation_section(
    evals: dict[str, dict[str, Any]], baseline: str, gold_judge: str, rm_judge: str | None
) -> list[str]:
    """The baseline's and each policy's held-out numbers: rewards, KL to SFT, perplexity, lengths."""
    md = ["## Evaluation on held-out prompts", ""]
    md += [
        "| model | mean gold reward | mean RM reward | KL to SFT / token | KL to SFT / response | perplexity | "
        "length (tokens) | length (words) | cut at max length |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    first = next(iter(evals.values()))
    bj, brm = first["judges"].get(gold_judge), first["judges"].get(rm_judge) if rm_judge else None
    b = first["baseline"]
    md.append(
        f"| {baseline} | {fmt_num(bj and bj['mean_baseline'])} | {fmt_num(brm and brm['mean_baseline'])} | 0 | 0 | "
        f"{fmt_num(b['perplexity'])} | {fmt_num(b['length_tokens'], '.1f')} | {fmt_num(b['length_words'], '.1f')} | "
        f"{fmt_pct(b['truncated_rate'])} |"
    )
    for name, ev in evals.items():
        p, g = ev["policy"], ev["judges"].get(gold_judge)
        r = ev["judges"].get(rm_judge) if rm_judge else None
        md.append(
            f"| {name} | {fmt_num(g and g['mean_policy'])} | {fmt_num(r and r['mean_policy'])} | "
            f"{fmt_num(p['kl_per_token'], '.4f')} | {fmt_num(p['kl_per_sequence'])} | {fmt_num(p['perplexity'])} | "
            f"{fmt_num(p['length_tokens'], '.1f')} | {fmt_num(p['length_words'], '.1f')} | "
            f"{fmt_pct(p['truncated_rate'])} |"
        )
    md.append("")
    return md


def _reward_model_section(rm_stats: dict[str, Any], out: Path) -> list[str]:
    """The reward model's accuracy against both labels, per pair type, and its margins (``rm_margins.png``)."""
    md = ["## Reward model", ""]
    md.append(
        f"Held-out preference pairs: {rm_stats.get('n', 'n/a')}. Accuracy against the annotators' labels "
        f"(what it was trained on): {fmt_pct(rm_stats.get('accuracy_annotator'))}; against the gold labels "
        f"(the true preference): {fmt_pct(rm_stats.get('accuracy_gold'))}. The annotators prefer longer answers "
        f"and are noisy, so the RM inherits an exploitable length bias (paper 4.3)."
    )
    by_type = rm_stats.get("by_pair_type") or {}
    if len(by_type) > 1:
        md += [
            "",
            "| pair type | pairs | accuracy vs annotators | accuracy vs gold |",
            "|---|---|---|---|",
        ]
        md += [
            f"| {k} | {v['n']} | {fmt_pct(v['accuracy_annotator'])} | {fmt_pct(v['accuracy_gold'])} |"
            for k, v in by_type.items()
        ]
        md += [
            "",
            "(*minimal* pairs differ only in correctness, *style* pairs only in length or repetition, "
            "*mixed* pairs are two independent answers; pairs the gold reward scores equally are left out of "
            "the gold accuracy.)",
        ]
    if rm_stats.get("margins"):
        plot_rm_margins(
            rm_stats["margins"],
            rm_stats["gold_agrees"],
            out / "rm_margins.png",
            "Reward-model margins on held-out pairs (paper fig. 2)",
        )
        md += ["", "![reward model margins](rm_margins.png)"]
    md.append("")
    return md


def _samples_section(
    evals: dict[str, dict[str, Any]], baseline: str, gold_judge: str, rm_judge: str | None, n_samples: int
) -> list[str]:
    """A few held-out prompts (:func:`_pick_samples`) with every model's answer and its scores."""
    md = ["## Sample responses", ""]
    first = next(iter(evals.values()))
    for i in _pick_samples(first["samples"], n_samples):
        s0 = first["samples"][i]
        md.append(f"**Prompt** ({s0.get('subset') or 'n/a'}): `{md_cell(s0['prompt'].strip())}`")
        md.append("")
        md.append("| model | response | gold | RM |")
        md.append("|---|---|---|---|")
        md.append(
            f"| {baseline} | {md_cell(s0['baseline'])} | {_sample_score(s0, gold_judge, 1)} | "
            f"{_sample_score(s0, rm_judge, 1)} |"
        )
        for name, ev in evals.items():
            s = ev["samples"][i]
            md.append(
                f"| {name} | {md_cell(s['policy'])} | {_sample_score(s, gold_judge, 0)} | "
                f"{_sample_score(s, rm_judge, 0)} |"
            )
        md.append("")
    return md


def _settings_section(meta: dict[str, Any]) -> list[str]:
    md = ["## Settings", "", "| | |", "|---|---|"]
    md += [f"| {k} | {md_cell(str(v), 400)} |" for k, v in meta.items()]
    md.append("")
    return md


def _sample_score(sample: dict[str, Any], judge: str | None, side: int) -> str:
    if not judge or judge not in sample.get("scores", {}):
        return "n/a"
    return fmt_num(sample["scores"][judge][side], ".2f")


def _pick_samples(samples: Sequence[dict[str, Any]], n: int) -> list[int]:
    """The first prompts of each subset, alternating helpful/harmless, so both kinds are shown."""
    by: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        by.setdefault(s.get("subset") or "all", []).append(i)
    picks: list[int] = []
    queues = list(by.values())
    while len(picks) < n and any(queues):
        for q in queues:
            if q and len(picks) < n:
                picks.append(q.pop(0))
    return picks
