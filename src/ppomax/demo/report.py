"""The demo's report: PNG plots (matplotlib, Agg) and ``report.md``.

* ``training_curves.png``: the paper's fig. 4 panels for every PPO run on shared axes: RM reward, gold reward,
  KL to the reference, policy perplexity, response length over PPO steps (raw values faint, a moving average
  bold).
* ``win_tie_lose.png``: win/tie/lose of each PPO policy against SFT by the gold judge, helpful / harmless /
  overall, as horizontal stacked bars (the form of the paper's fig. 10).
* ``rm_margins.png``: the reward model's ``r(chosen) - r(rejected)`` on held-out pairs (paper fig. 2), split by
  whether the gold reward agrees with the annotators' label, with the RM's accuracy against both labels.
* ``report.md``: the outcome (does PPO-max beat SFT, does vanilla over-optimise), the tables, sample responses.

The outcome checks (:func:`trajectory`, :func:`outcome`) are plain functions of the runs' ``metrics.jsonl``
records and the evaluation results so the seed benchmark can apply exactly the same criteria.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# The name the demo's PPO runs give the gold reward function (stages.ppo_config), so it is logged as
# reward/gold_mean wherever it sits in reward.functions.
GOLD_REWARD = "gold"
# Fig. 4 panels: (title, candidate metric keys in a PPO run's metrics.jsonl; the first present is used).
PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("RM reward (raw)", ("reward/rm_mean", "reward/raw_mean")),
    ("gold reward (not optimised)", (f"reward/{GOLD_REWARD}_mean",)),
    ("KL(policy || reference) per token", ("kl/per_token",)),
    ("policy perplexity", ("ppl/policy",)),
    ("response length (tokens)", ("response/length_mean",)),
)
COLOURS = {"vanilla": "#d62728", "ppo_max": "#1f77b4", "sft": "#7f7f7f"}
# other runs (`ppomax ablate`'s variants), in order: matplotlib's tab10 without the colours above
OTHER_COLOURS = ("#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf", "#000000")


def run_colours(names: Sequence[str]) -> dict[str, str]:
    """A colour per run: the fixed ones of :data:`COLOURS`, the others from :data:`OTHER_COLOURS` in order."""
    others = iter(OTHER_COLOURS * (1 + len(names) // len(OTHER_COLOURS)))
    return {n: COLOURS[n] if n in COLOURS else next(others) for n in names}


WTL_COLOURS = ("#2ca02c", "#c7c7c7", "#d62728")


def policy_records(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The training records of policy iterations, renumbered from 1: critic pre-training iterations
    (``train/critic_only``, paper 5.3.3) and evaluation records are dropped, so runs with and without critic
    pre-training share the x axis (policy updates)."""
    out = []
    for r in records:
        if "reward/raw_mean" not in r or r.get("train/critic_only"):
            continue
        out.append({**r, "step": len(out) + 1})
    return out


def first_collapse_step(records: Sequence[dict[str, Any]]) -> int | None:
    """The first step at which the trainer's pattern-collapse monitor fired (``collapse/firing``), if any."""
    return next((int(r["step"]) for r in records if r.get("collapse/firing")), None)


def _num(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    return float(x) if math.isfinite(x) else None


def series(
    records: Sequence[dict[str, Any]], keys: Sequence[str] | str
) -> tuple[str | None, list[int], list[float]]:
    """``(key used, steps, values)`` of the first of ``keys`` present in the records (finite values only)."""
    keys = (keys,) if isinstance(keys, str) else tuple(keys)
    for key in keys:
        steps, vals = [], []
        for r in records:
            v = _num(r.get(key))
            if v is not None and "step" in r:
                steps.append(int(r["step"]))
                vals.append(v)
        if vals:
            return key, steps, vals
    return None, [], []


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` values (the first points average what exists so far)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def trajectory(values: Sequence[float], frac: float = 0.15) -> dict[str, float]:
    """Start / peak / end summary of a metric over a run: start and end are means over the first and last
    ``frac`` of the steps (at least one), peak is the maximum and trough the minimum of the moving average
    over the same window, ``peak_at`` the peak's position as a fraction of the run."""
    n = len(values)
    if n == 0:
        return {
            "start": float("nan"),
            "peak": float("nan"),
            "trough": float("nan"),
            "end": float("nan"),
            "peak_at": float("nan"),
            "n": 0,
        }
    w = max(1, round(frac * n))
    smooth = moving_average(values, w)[w - 1 :] or [sum(values) / n]
    peak = max(smooth)
    return {
        "start": sum(values[:w]) / w,
        "peak": peak,
        "trough": min(smooth),
        "end": sum(values[-w:]) / w,
        "peak_at": (smooth.index(peak) + w) / n,
        "n": n,
    }


def run_trajectories(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """:func:`trajectory` of each fig. 4 panel's metric, keyed ``rm``, ``gold``, ``kl``, ``ppl``, ``length``."""
    names = ("rm", "gold", "kl", "ppl", "length")
    out = {}
    for name, (_, keys) in zip(names, PANELS, strict=True):
        key, _, vals = series(records, keys)
        out[name] = {**trajectory(vals), "key": key}
    return out


def outcome(
    runs: dict[str, Sequence[dict[str, Any]]], evals: dict[str, dict[str, Any]], gold_judge: str = "gold"
) -> dict[str, Any]:
    """The paper's finding, checked on this world.

    * ``ppo_max_beats_sft``: more gold-judge wins than losses against SFT (overall) on held-out prompts.
    * ``ppo_max_stable``: its KL stays bounded (end KL at most 1.5x its mid-run level plus 0.02 nats, i.e. not
      growing without limit) and its gold reward does not collapse late (end >= peak - 0.15, within the
      noise of a batch mean on this world's -4.6..1 scale).
    * ``vanilla_over_optimises``: its RM reward rises (end - start > 0) while its gold reward ends below its
      start or at least 0.15 below its peak; ``vanilla_signatures`` lists which of the paper's 5.2 signatures
      moved: length up, perplexity down, KL above PPO-max's.
    """
    res: dict[str, Any] = {"runs": {}, "collapse_first_step": {}}
    for name, recs in runs.items():
        res["runs"][name] = run_trajectories(recs)
        res["collapse_first_step"][name] = first_collapse_step(recs)
    pm, va = res["runs"].get("ppo_max"), res["runs"].get("vanilla")
    ev = evals.get("ppo_max", {}).get("judges", {}).get(gold_judge)
    if ev is not None:
        o = ev["win_tie_lose"]["overall"]
        res["ppo_max_vs_sft"] = {k: o[k] for k in ("win", "tie", "lose", "n")}
        res["ppo_max_beats_sft"] = o["win"] > o["lose"]
    ev_va = evals.get("vanilla", {}).get("judges", {}).get(gold_judge)
    if ev_va is not None:
        o = ev_va["win_tie_lose"]["overall"]
        res["vanilla_vs_sft"] = {k: o[k] for k in ("win", "tie", "lose", "n")}
    if pm is not None and pm["kl"]["n"] and pm["gold"]["n"]:
        recs = runs["ppo_max"]
        _, _, kl = series(recs, PANELS[2][1])
        mid = trajectory(kl[: max(1, len(kl) // 2)])["end"]
        kl_ok = pm["kl"]["end"] <= 1.5 * max(mid, 0.0) + 0.02
        gold_ok = pm["gold"]["end"] >= pm["gold"]["peak"] - 0.15
        res["ppo_max_stable"] = bool(kl_ok and gold_ok)
        res["ppo_max_stability"] = {
            "kl_mid": mid,
            "kl_end": pm["kl"]["end"],
            "kl_bounded": bool(kl_ok),
            "gold_no_late_collapse": bool(gold_ok),
        }
    if va is not None and va["rm"]["n"] and va["gold"]["n"]:
        rm_up = va["rm"]["end"] - va["rm"]["start"] > 0
        gold_bad = va["gold"]["end"] < va["gold"]["start"] or va["gold"]["end"] < va["gold"]["peak"] - 0.15
        res["vanilla_over_optimises"] = bool(rm_up and gold_bad)
        sig = []
        if va["length"]["n"] and va["length"]["end"] > 1.1 * va["length"]["start"]:
            sig.append("length up")
        if va["ppl"]["n"] and va["ppl"]["end"] < 0.95 * va["ppl"]["start"]:
            sig.append("perplexity down")
        if va["kl"]["n"] and pm is not None and pm["kl"]["n"] and va["kl"]["end"] > 2 * pm["kl"]["end"]:
            sig.append("KL above PPO-max's")
        res["vanilla_signatures"] = sig
    return res


# ------------------------------------------------------------------------------------------------------- plots


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_training_curves(
    runs: dict[str, Sequence[dict[str, Any]]],
    path: str | os.PathLike[str],
    title: str = "PPO training dynamics on hh-mini (paper fig. 4 panels)",
) -> Path:
    """Fig. 4 panels for every run on shared axes (one PNG, 2x3 grid; the sixth cell holds the legend)."""
    plt = _plt()
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.2))
    flat = axes.ravel()
    colours = run_colours(list(runs))
    for ax, (panel, keys) in zip(flat, PANELS, strict=False):
        used = None
        for name, recs in runs.items():
            key, steps, vals = series(recs, keys)
            if not vals:
                continue
            used = key
            colour = colours[name]
            fired = first_collapse_step(recs)
            if fired is not None:
                ax.axvline(fired, color=colour, linestyle=":", linewidth=1.5)
            w = max(1, len(vals) // 12)
            ax.plot(steps, vals, color=colour, alpha=0.25, linewidth=1)
            ax.plot(steps, moving_average(vals, w), color=colour, linewidth=2.2, label=name)
        ax.set_title(panel if used else f"{panel}\n(not logged)", fontsize=11)
        ax.set_xlabel("PPO step")
        ax.grid(alpha=0.3)
    leg_ax = flat[-1]
    leg_ax.axis("off")
    handles = [plt.Line2D([0], [0], color=colours[n], linewidth=3) for n in runs]
    leg_ax.legend(handles, list(runs), loc="center", fontsize=13, frameon=False, title="PPO run")
    leg_ax.text(
        0.5,
        0.12,
        "faint: per step   bold: moving average\ndotted: the collapse monitor fires (paper 5.2)\n"
        "the gold reward is logged, never optimised",
        ha="center",
        va="center",
        fontsize=10,
        transform=leg_ax.transAxes,
    )
    fig.suptitle(title, fontsize=14)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    out = Path(path)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def plot_win_tie_lose(
    rows: Sequence[tuple[str, dict[str, Any]]], path: str | os.PathLike[str], title: str
) -> Path:
    """Horizontal stacked win/tie/lose bars (paper fig. 10). ``rows``: (label, wtl dict with *_rate keys)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(10, 0.55 * len(rows) + 1.6))
    labels = [r[0] for r in rows][::-1]
    data = [r[1] for r in rows][::-1]
    left = [0.0] * len(rows)
    for key, colour, name in zip(
        ("win_rate", "tie_rate", "lose_rate"), WTL_COLOURS, ("win", "tie", "lose"), strict=True
    ):
        vals = [d[key] * 100 for d in data]
        bars = ax.barh(labels, vals, left=left, color=colour, edgecolor="white", label=name)
        for b, v in zip(bars, vals, strict=True):
            if v >= 6:
                ax.text(
                    b.get_x() + b.get_width() / 2,
                    b.get_y() + b.get_height() / 2,
                    f"{v:.0f}%",
                    ha="center",
                    va="center",
                    fontsize=10,
                )
        left = [a + v for a, v in zip(left, vals, strict=True)]
    ax.set_xlim(0, 100)
    ax.set_xlabel("% of held-out prompts")
    ax.set_title(title)
    ax.legend(
        ncol=3,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.5 / (0.55 * len(rows) + 1.6) - 0.12),
        frameon=False,
    )
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def plot_rm_margins(
    margins: Sequence[float], gold_agrees: Sequence[bool], path: str | os.PathLike[str], title: str
) -> Path:
    """Histogram of r(chosen) - r(rejected) (paper fig. 2), split by whether gold agrees with the label."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.2))
    agree = [m for m, g in zip(margins, gold_agrees, strict=True) if g]
    disagree = [m for m, g in zip(margins, gold_agrees, strict=True) if not g]
    lo, hi = (min(margins), max(margins)) if margins else (-1.0, 1.0)
    bins = [lo + (hi - lo) * i / 30 for i in range(31)] if hi > lo else 10
    ax.hist(
        [agree, disagree],
        bins=bins,
        stacked=True,
        color=["#1f77b4", "#ff7f0e"],
        label=["gold agrees with the annotators' choice", "gold disagrees (noise / length bias)"],
    )
    ax.axvline(0, color="black", linewidth=1)
    ax.set_xlabel("r(chosen) - r(rejected)")
    ax.set_ylabel("pairs")
    ax.set_title(title)
    ax.legend(fontsize=9)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


# ----------------------------------------------------------------------------------------------------- markdown


def _f(x: Any, fmt: str = ".3f") -> str:
    v = _num(x)
    return "n/a" if v is None else format(v, fmt)


def _pct(x: Any) -> str:
    v = _num(x)
    return "n/a" if v is None else f"{100 * v:.0f}%"


def _md_text(s: str, limit: int = 220) -> str:
    s = " ".join(s.split())
    s = s if len(s) <= limit else s[: limit - 1] + "…"
    return s.replace("|", "\\|") or "*(empty)*"


def _wtl_table(evals: dict[str, dict[str, Any]], judge: str, baseline: str) -> list[str]:
    lines = [f"| policy vs {baseline} | subset | n | win | tie | lose |", "|---|---|---|---|---|---|"]
    for name, ev in evals.items():
        j = ev.get("judges", {}).get(judge)
        if j is None:
            continue
        for subset in ("helpful", "harmless", "overall"):
            r = j["win_tie_lose"].get(subset)
            if r is None:
                continue
            lines.append(
                f"| {name} | {subset} | {r['n']} | {r['win']} ({_pct(r['win_rate'])}) | "
                f"{r['tie']} ({_pct(r['tie_rate'])}) | {r['lose']} ({_pct(r['lose_rate'])}) |"
            )
    return lines


def _verdict(flag: Any) -> str:
    return "**yes**" if flag is True else ("**no**" if flag is False else "n/a")


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
    md: list[str] = ["# ppomax demo on hh-mini", ""]
    md += [
        "The whole RLHF pipeline on a generated world whose true preference (the *gold reward*) is known: a BPE",
        "tokenizer, a tiny Llama pre-trained from scratch, SFT, a reward model trained on noisy, length-biased",
        "annotator labels, then PPO with the paper's `vanilla` and `ppo_max` recipes. The gold reward is logged",
        "during PPO but never optimised; the final judge compares each PPO policy with SFT by gold reward.",
        "",
        "## Outcome",
        "",
    ]
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
            f"(KL per token mid-run {_f(s['kl_mid'], '.4f')} -> end {_f(s['kl_end'], '.4f')}; "
            f"no late gold collapse: {s['gold_no_late_collapse']})"
        )
    if "vanilla_over_optimises" in res:
        v = res["runs"]["vanilla"]
        md.append(
            f"- Vanilla PPO over-optimises the reward model: {_verdict(res['vanilla_over_optimises'])} "
            f"(RM reward {_f(v['rm']['start'])} -> {_f(v['rm']['end'])}; gold reward {_f(v['gold']['start'])}"
            f" -> peak {_f(v['gold']['peak'])} -> {_f(v['gold']['end'])}; signatures: "
            f"{', '.join(res.get('vanilla_signatures') or ['none'])})"
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

    if runs:
        plot_training_curves(runs, out / "training_curves.png")
        md += ["## Training dynamics (paper fig. 4)", "", "![training curves](training_curves.png)", ""]
        md += ["| run | metric | start | peak | end |", "|---|---|---|---|---|"]
        for name, tr in res["runs"].items():
            for metric, t in tr.items():
                if t["n"]:
                    md.append(
                        f"| {name} | {metric} (`{t['key']}`) | {_f(t['start'])} | {_f(t['peak'])} | {_f(t['end'])} |"
                    )
        md.append("")

    if evals:
        rows = []
        for name, ev in evals.items():
            j = ev.get("judges", {}).get(gold_judge)
            if j is not None:
                rows += [
                    (f"{name} · {s}", j["win_tie_lose"][s])
                    for s in ("helpful", "harmless", "overall")
                    if s in j["win_tie_lose"]
                ]
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
        md += ["## Evaluation on held-out prompts", ""]
        md += [
            "| model | mean gold reward | mean RM reward | KL to SFT / token | KL to SFT / response | perplexity | "
            "length (tokens) | length (words) | cut at max length |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        first = next(iter(evals.values()))
        bj, brm = first["judges"].get(gold_judge), first["judges"].get(rm_judge) if rm_judge else None
        b = first["baseline"]
        md.append(
            f"| {baseline} | {_f(bj and bj['mean_baseline'])} | {_f(brm and brm['mean_baseline'])} | 0 | 0 | "
            f"{_f(b['perplexity'])} | {_f(b['length_tokens'], '.1f')} | {_f(b['length_words'], '.1f')} | "
            f"{_pct(b['truncated_rate'])} |"
        )
        for name, ev in evals.items():
            p, g = ev["policy"], ev["judges"].get(gold_judge)
            r = ev["judges"].get(rm_judge) if rm_judge else None
            md.append(
                f"| {name} | {_f(g and g['mean_policy'])} | {_f(r and r['mean_policy'])} | "
                f"{_f(p['kl_per_token'], '.4f')} | {_f(p['kl_per_sequence'])} | {_f(p['perplexity'])} | "
                f"{_f(p['length_tokens'], '.1f')} | {_f(p['length_words'], '.1f')} | {_pct(p['truncated_rate'])} |"
            )
        md.append("")

    if rm_stats:
        md += ["## Reward model", ""]
        md.append(
            f"Held-out preference pairs: {rm_stats.get('n', 'n/a')}. Accuracy against the annotators' labels "
            f"(what it was trained on): {_pct(rm_stats.get('accuracy_annotator'))}; against the gold labels "
            f"(the true preference): {_pct(rm_stats.get('accuracy_gold'))}. The annotators prefer longer answers "
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
                f"| {k} | {v['n']} | {_pct(v['accuracy_annotator'])} | {_pct(v['accuracy_gold'])} |"
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

    if evals and n_samples > 0:
        md += ["## Sample responses", ""]
        first = next(iter(evals.values()))
        picks = _pick_samples(first["samples"], n_samples)
        for i in picks:
            s0 = first["samples"][i]
            md.append(f"**Prompt** ({s0.get('subset') or 'n/a'}): `{_md_text(s0['prompt'].strip())}`")
            md.append("")
            md.append("| model | response | gold | RM |")
            md.append("|---|---|---|---|")
            md.append(
                f"| {baseline} | {_md_text(s0['baseline'])} | {_sample_score(s0, gold_judge, 1)} | "
                f"{_sample_score(s0, rm_judge, 1)} |"
            )
            for name, ev in evals.items():
                s = ev["samples"][i]
                md.append(
                    f"| {name} | {_md_text(s['policy'])} | {_sample_score(s, gold_judge, 0)} | "
                    f"{_sample_score(s, rm_judge, 0)} |"
                )
            md.append("")

    if meta:
        md += ["## Settings", "", "| | |", "|---|---|"]
        md += [f"| {k} | {_md_text(str(v), 400)} |" for k, v in meta.items()]
        md.append("")
    path = out / "report.md"
    path.write_text("\n".join(md), encoding="utf-8")
    return path


def _sample_score(sample: dict[str, Any], judge: str | None, side: int) -> str:
    if not judge or judge not in sample.get("scores", {}):
        return "n/a"
    return _f(sample["scores"][judge][side], ".2f")


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
