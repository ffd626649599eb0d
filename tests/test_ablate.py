"""`ppomax ablate`: the variant table is valid config, the gold-truth criteria, and `--quick` end to end (a complete
report, not its verdicts: those are a property of the full run)."""

from __future__ import annotations

import json
import math

import pytest

from helpers import float_leaves
from ppomax.cli import main
from ppomax.config import PPOConfig, read_preset
from ppomax.demo import stages as demo_stages
from ppomax.demo.ablate import BY_NAME, QUICK, STAGE_NAMES, VARIANTS, select
from ppomax.demo.ablate.monitor import OUT_OF_SAMPLE, replay_monitor
from ppomax.demo.ablate.numbers import gold_fall_step, over_optimised
from ppomax.demo.profiles import PROFILES
from ppomax.errors import UserError


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_every_variant_is_its_preset_plus_valid_overrides(tmp_path, variant):
    cfg = demo_stages.ppo_config(
        tmp_path,
        variant.preset,
        tmp_path / "world",
        tmp_path / "sft",
        tmp_path / "rm",
        PROFILES["full"],
        0,
        False,
        variant.overrides,
        tmp_path / "pretrain",
    )
    assert isinstance(cfg, PPOConfig)
    base = demo_stages.ppo_config(
        tmp_path,
        variant.preset,
        tmp_path / "world",
        tmp_path / "sft",
        tmp_path / "rm",
        PROFILES["full"],
        0,
        False,
    )

    def dotted(ppo):  # the kl group's keys as kl.coef, ...
        out = ppo.model_dump()
        return {**{k: v for k, v in out.items() if k != "kl"}, **{f"kl.{k}": v for k, v in out["kl"].items()}}

    changed = {k for k, v in dotted(cfg.ppo).items() if dotted(base.ppo)[k] != v}
    named = {o.split("=")[0].split(".", 1)[1] for o in variant.overrides if o.startswith("ppo.")}
    assert changed <= named, (variant.name, changed - named)  # nothing else moves
    if variant.name == "policy_pretrained":
        assert cfg.model.policy == str(tmp_path / "pretrain" / "final")
    if variant.name == "ppo_ptx":
        assert cfg.ppo.ptx_coef > 0 and cfg.data.ptx == f"{tmp_path / 'world'}/sft_train.jsonl"
        assert (
            cfg.ppo.kl.coef
            == demo_stages.ppo_config(
                tmp_path,
                "ppo_max",
                tmp_path / "world",
                tmp_path / "sft",
                tmp_path / "rm",
                PROFILES["full"],
                0,
                False,
            ).ppo.kl.coef
        )  # PPO-ptx differs from PPO-max by the ptx term only
    assert read_preset(variant.preset)  # a shipped preset


def test_variant_table_and_selection():
    figures = {v.figure for v in VARIANTS}
    assert {"fig. 6", "fig. 7", "fig. 8", "fig. 12"} <= figures
    assert len({v.name for v in VARIANTS}) == len(VARIANTS)
    assert STAGE_NAMES["vanilla"] == "ppo_vanilla" and STAGE_NAMES["ppo_max"] == "ppo_max"  # the demo's runs
    assert [v.name for v in select(["fig7"], False)] == [v.name for v in VARIANTS if v.figure == "fig. 7"]
    assert {v.figure for v in select(None, True)} >= {"fig. 6", "fig. 7", "fig. 8", "fig. 12"}
    with pytest.raises(UserError, match="--only nope: unknown variant"):
        select(["nope"], False)


def _recs(gold, rm, kl=None):
    n = len(gold)
    kl = kl or [0.01] * n
    return [
        {
            "step": i + 1,
            "reward/raw_mean": rm[i],
            "reward/rm_mean": rm[i],
            "reward/gold_mean": gold[i],
            "kl/per_token": kl[i],
            "ppl/policy": 1.3,
            "response/length_mean": 9.0,
        }
        for i in range(n)
    ]


def test_over_optimisation_is_gold_falling_while_rm_rises():
    n = 40
    rise_then_fall = [0.5 + 0.02 * i for i in range(10)] + [0.7 - 0.03 * i for i in range(30)]
    rm_up = [1.0 + 0.05 * i for i in range(n)]
    res = over_optimised(_recs(rise_then_fall, rm_up))
    assert res["over_optimised"] is True and res["gold_fall"] > 0.1
    assert gold_fall_step(_recs(rise_then_fall, rm_up)) is not None
    # the same gold curve with the RM reward falling too is not over-optimisation of the RM
    assert over_optimised(_recs(rise_then_fall, rm_up[::-1]))["over_optimised"] is False
    flat = [0.7 + (0.05 if i % 2 else -0.05) for i in range(n)]  # noise around a level
    assert over_optimised(_recs(flat, rm_up))["over_optimised"] is False
    assert gold_fall_step(_recs(flat, rm_up)) is None


def test_replayed_monitor_before_and_after():
    n = 40
    kl = [0.02 * i for i in range(n)]  # drifting from the reference, length and perplexity flat
    recs = _recs([0.5] * n, [1.0 + 0.05 * i for i in range(n)], kl)
    assert replay_monitor(recs, drift=False) is None
    assert replay_monitor(recs, drift=True) is not None


@pytest.mark.slow
def test_quick_ablate_end_to_end(tmp_path, capsys):
    out = tmp_path / "ablate"
    assert main(["ablate", "--quick", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    rep = out / "report"
    assert f"report: {rep / 'ablate.md'}" in printed
    md = (rep / "ablate.md").read_text()
    summary = json.loads((rep / "summary.json").read_text())
    quick = [v for v in VARIANTS if v.quick]
    assert summary["variants"] == [v.name for v in quick] and summary["profile"] == QUICK.name
    # a verdict line per claim: (a)-(d) and the demo's two
    claims = [v["claim"] for v in summary["verdicts"]]
    assert [c[:3] for c in claims[:4]] == ["(a)", "(b)", "(c)", "(d)"] and len(claims) == 6
    for v in summary["verdicts"]:
        assert v["verdict"].split(" (")[0] in ("reproduced", "not reproduced", "not run", "within noise")
        assert v["numbers"]
        assert f"| {v['claim']} |" in md
    for v in quick:
        run = summary["runs"][v.name]["0"]
        assert run["n_steps"] == QUICK.ppo_iterations
        assert isinstance(run["over_optimised"], bool) and isinstance(run["collapsed"], bool)
        assert sum(run["win_tie_lose"]) == QUICK.eval_prompts
        assert f"| {v.name} | 0 |" in md
    bad = {k: x for k, x in float_leaves(summary["runs"]) if not math.isfinite(x)}
    assert not bad, bad
    for png in ("fig6.png", "fig7.png", "fig8.png", "fig12.png", "win_tie_lose.png", "alignment_tax.png"):
        assert (rep / png).read_bytes()[:4] == b"\x89PNG", png
        assert f"]({png})" in md
    for rule in ("before", "after"):
        assert sum(summary["collapse_monitor"][rule].values()) == len(quick)
    # every monitor rule's confusion row: over all runs, and out of sample (the quick set's GRPO run)
    outside = [v for v in quick if v.figure in OUT_OF_SAMPLE]
    assert [v.name for v in outside] == ["grpo"]
    for sample, n in (("all", len(quick)), ("out of sample", len(outside))):
        for name, t in summary["collapse_monitor_rules"][sample].items():
            counts = [t[k] for k in ("fired_oo", "fired_ok", "silent_oo", "silent_ok", "not_replayable")]
            assert sum(counts) == n and t["not_replayable"] == 0 and f"| {name} |" in md
    # the estimators comparison: PPO-max against the quick set's critic-free method, memory probed
    cmp = summary["estimators"]
    assert list(cmp["methods"]) == ["ppo_max", "grpo"] and math.isfinite(cmp["budget"])
    for name, m in cmp["methods"].items():
        r = m["seeds"]["0"]
        assert r["gold_at_budget"] is not None and r["peak_rss_mib"] > 0 and r["seconds_per_iteration"] > 0
        assert f"| {name} | {m['settings']['advantage_estimator']} |" in md
    assert cmp["methods"]["grpo"]["settings"]["samples_per_prompt"] == 4
    assert len(cmp["verdicts"]) == 5 and all(v["answer"] and v["numbers"] for v in cmp["verdicts"])
    for png in ("estimators.png", "estimators_frontier.png"):
        assert (rep / png).read_bytes()[:4] == b"\x89PNG", png
        assert f"]({png})" in md
    for name in ("ppo_max", "grpo"):
        probe = json.loads((out / "seed-0" / f"probe_{name}" / "memory.json").read_text())
        assert probe["policy_iterations"] == 3 and probe["critic_only_iterations"] == 0, probe
    assert not (out / "seed-0" / "probe_grpo" / "run" / "final").exists()  # only the probe's metrics stay


def test_every_claim_gets_a_verdict_with_its_numbers():
    """verdicts() on synthetic per-run numbers for every variant and two seeds (the quick run leaves most claims
    "not run", so this is where their comparisons and formatting are exercised)."""
    from ppomax.demo.ablate.verdicts import verdicts

    def run(i: int) -> dict:
        t = {
            k: {"start": 0.1 * i, "peak": 0.2 * i, "end": 0.15 * i}
            for k in ("rm", "gold", "kl", "ppl", "length")
        }
        return {
            "trajectories": t,
            "kl_mid": 0.01 * i,
            "gold_drop_early": 0.02 * i,
            "rm_roughness_early": 0.03 * i,
            "gold_fall": 0.04 * i,
            "gold_end": 0.15 * i,
            "over_optimised": i % 2 == 0,
            "eval_gold_policy": 0.05 * i,
            "win_tie_lose": [i, 10, 5],
            "heldout_loss": 1.0 + 0.01 * i,
            "heldout_loss_sft": 1.0,
        }

    nums = {v.name: {s: run(i + s) for s in (0, 1)} for i, v in enumerate(VARIANTS)}
    out = verdicts(nums)
    assert [v["claim"][:3] for v in out[:4]] == ["(a)", "(b)", "(c)", "(d)"] and len(out) == 7
    assert out[-1]["claim"].startswith("(ours) advantage whitening")
    for v in out:
        assert v["verdict"] in ("reproduced", "not reproduced", "within noise (run --seeds 0 1 2 3 4)"), v
        assert "seeds 0/1" in v["numbers"] or "/" in v["numbers"]
        assert (v["verdict"] != "not reproduced") == (v["explanation"] == "")


# ------------------------------------------------------------------ critic-free estimators vs PPO-max


def _est_recs(gold, rm, kl_seq, seconds=1.0, critic_only=0):
    """Training records of a run: ``critic_only`` critic-only iterations first, then one per gold value."""
    head = [
        {"step": i + 1, "reward/raw_mean": 0.0, "train/critic_only": 1, "time/iteration": 2 * seconds}
        for i in range(critic_only)
    ]
    body = _recs(gold, rm)
    for r, k in zip(body, kl_seq, strict=True):
        r.update({"kl/per_sequence": k, "train/critic_only": 0, "time/iteration": seconds})
    return head + body


def test_gold_at_kl_interpolates_at_the_first_crossing():
    from ppomax.demo.ablate.estimators import gold_at_kl

    kl, gold = [0.0, 0.5, 1.0, 2.0, 1.5, 3.0], [0.0, 1.0, 2.0, 3.0, 9.0, 4.0]
    assert gold_at_kl(kl, gold, 0.75) == pytest.approx(1.5)
    assert gold_at_kl(kl, gold, 1.75) == pytest.approx(2.75)  # the first time, not the later 1.5 -> 3.0 pass
    assert gold_at_kl(kl, gold, -1.0) == 0.0
    assert gold_at_kl(kl, gold, 3.5) is None  # never spent that much


def test_frontier_and_costs_from_records():
    from ppomax.demo.ablate.estimators import frontier
    from ppomax.demo.ablate.numbers import iteration_costs, method_settings

    recs = _est_recs([0.1 * i for i in range(20)], [1.0] * 20, [0.2 * i for i in range(20)], critic_only=3)
    del recs[5]["kl/per_sequence"]  # a step without KL drops out of the frontier
    kl, gold = frontier(recs[3:])
    assert len(kl) == len(gold) == 19 and kl[0] == 0.0 and kl == sorted(kl)
    costs = iteration_costs(recs)
    assert costs == {"seconds_per_iteration": 1.0, "train_seconds": 26.0, "critic_only_iterations": 3}
    st = method_settings({"ppo": {"kl_coef": 0.5, "kl_estimator": "k1"}})  # a run made before the switches
    assert (st["kl_coef"], st["kl_estimator"]) == (0.5, "k1")  # and before the kl group
    assert st["advantage_estimator"] == "gae" and st["samples_per_prompt"] == 1 and st["kl_in"] == "reward"


def _method_recs(fast: bool, over: bool, seconds: float, seed: int) -> list[dict]:
    """A synthetic run of a method: ``fast``: it spends KL twice as fast and its gold rises four times as fast
    (twice as much gold per unit of KL); ``over``: its gold falls back in the second half while the RM reward keeps
    rising (over-optimisation)."""
    n = 40
    kl = [(0.1 if fast else 0.05) * i for i in range(n)]
    slope = (0.04 if fast else 0.01) + 0.001 * seed
    gold = [0.3 + slope * i for i in range(n)]
    if over:
        gold = gold[:20] + [gold[19] - 0.05 * (i - 19) for i in range(20, n)]
    return _est_recs(gold, [1.0 + 0.05 * i for i in range(n)], kl, seconds)


def _eval_result(wtl=(5, 3, 2)) -> dict:
    overall = {"win": wtl[0], "tie": wtl[1], "lose": wtl[2], "n": sum(wtl)}
    gold = {"win_tie_lose": {"overall": overall}, "mean_policy": 0.5, "mean_baseline": 0.4}
    return {"judges": {"gold": gold}, "policy": {"kl_per_token": 0.01}}


def _method_runs(fast: bool, over: bool, seconds: float, seeds=(0, 1)):
    """:func:`_method_recs` per seed, as the report's frontier curves and per-run numbers."""
    from ppomax.demo.ablate.estimators import frontier
    from ppomax.demo.ablate.numbers import iteration_costs, run_numbers

    out_curves, out_nums = {}, {}
    for s in seeds:
        recs = _method_recs(fast, over, seconds, s)
        out_curves[s] = frontier(recs)
        out_nums[s] = {
            **run_numbers(recs, _eval_result(), {"policy": 1.0, "sft": 1.0}),
            **iteration_costs(recs),
        }
    return out_curves, out_nums


@pytest.mark.parametrize("winner", ["ppo_max", "grpo"])
def test_estimator_verdicts_name_whichever_method_wins(winner):
    """The same synthetic world both ways round: the method whose gold rises faster per KL wins at equal KL
    even when it over-optimises later (and then loses at the end); nothing about a method's name decides."""
    from ppomax.demo.ablate.estimators import compare_estimators

    loser = "grpo" if winner == "ppo_max" else "ppo_max"
    curves, nums = {}, {}
    curves[winner], nums[winner] = _method_runs(fast=True, over=True, seconds=2.0)
    curves[loser], nums[loser] = _method_runs(fast=False, over=False, seconds=1.0)
    memory = {
        winner: {0: {"peak_rss_mib": 500.0, "policy_iterations": 3}},
        loser: {0: {"peak_rss_mib": 600.0, "policy_iterations": 3}},
    }
    names = ["ppo_max", "grpo"]
    cmp = compare_estimators(names, {n: curves[n] for n in names}, nums, memory)
    assert cmp["budget"] == pytest.approx(max(curves[loser][0][0]))  # the smaller of the runs' largest KL
    v = {x["question"].split(" (")[0]: x for x in cmp["verdicts"]}
    at_kl = v["most gold reward at equal KL"]
    assert at_kl["answer"] == winner and at_kl["holds"] is True
    assert f"{winner} " in at_kl["numbers"] and f"{loser} " in at_kl["numbers"]
    assert v["most gold reward at the end of training"]["answer"] == loser
    assert v["over-optimises"]["answer"] == winner
    assert v["least wall time per policy iteration"]["answer"] == loser
    # one probed seed: the lower mean, not a verdict
    assert v["least memory"]["answer"] == f"{winner} on the mean, within the seeds' noise against {loser}"
    m = cmp["methods"][winner]["seeds"][0]
    assert m["gold_at_budget"] > cmp["methods"][loser]["seeds"][0]["gold_at_budget"]
    assert cmp["methods"][loser]["seeds"][1]["peak_rss_mib"] is None  # no probe on that seed: n/a, not 0


def test_a_win_on_the_mean_only_is_reported_as_such():
    from ppomax.demo.ablate.estimators import estimator_verdicts

    def seeds_of(golds):
        keys = ("gold_end", "over_optimised", "gold_fall", "seconds_per_iteration", "peak_rss_mib")
        return {s: {"gold_at_budget": g, **dict.fromkeys(keys)} for s, g in enumerate(golds)}

    methods = {"a": {"seeds": seeds_of([1.0, 0.1, 0.1])}, "b": {"seeds": seeds_of([0.2, 0.2, 0.2])}}
    out = estimator_verdicts({"budget": 1.0, "methods": methods})
    assert out[0]["answer"] == "a on the mean, within the seeds' noise against b" and out[0]["holds"] is False
    assert "a ahead on 1/3 seeds against b" in out[0]["numbers"]
    assert out[1]["answer"] == "n/a"  # no end gold logged


def test_memory_of_this_process():
    from ppomax.demo.ablate.stages import memory_mib

    m = memory_mib()
    assert m["peak"] > 0 and (m["rss"] is None or m["peak"] >= m["rss"] > 0)


def test_report_has_the_estimators_section(tmp_path):
    """write_ablate_report on synthetic run directories (no training): the comparison's table, verdicts, frontier
    PNG and summary entry, with the memory probes' numbers and the runs' settings."""
    from ppomax.demo.ablate import Variant
    from ppomax.demo.ablate.report import write_ablate_report
    from ppomax.demo.ablate.stages import PROBE_STAGE
    from ppomax.demo.ablate.variants import ESTIMATORS
    from ppomax.demo.profiles import PROFILES

    variants = [
        Variant("ppo_max", "fig. 5", "ppo_max", (), "PPO-max"),
        Variant("grpo", ESTIMATORS, "grpo", ("ppo.kl.coef=0.5",), "GRPO"),
    ]
    stages = {"ppo_max": "ppo_max", "grpo": "ppo_grpo"}
    settings = {"ppo_max": ("gae", 1), "grpo": ("grpo", 4)}
    for s in (0, 1):
        for name in ("ppo_max", "grpo"):
            d = tmp_path / f"seed-{s}"
            run = d / stages[name]
            run.mkdir(parents=True)
            fast = name == "grpo"  # grpo: more gold per KL, then over-optimises
            recs = _method_recs(fast, over=fast, seconds=0.8 if fast else 1.0, seed=s)
            (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
            est, spp = settings[name]
            (run / "config.yaml").write_text(
                f"ppo:\n  advantage_estimator: {est}\n  kl:\n    coef: 0.5\n    estimator: k1\n"
                f"generation:\n  samples_per_prompt: {spp}\n"
            )
            ev = d / f"eval_{name}"
            ev.mkdir()
            (ev / "vs_sft.json").write_text(json.dumps(_eval_result((6, 3, 1))))
            (ev / "heldout_lm.json").write_text(json.dumps({"policy": 1.1, "sft": 1.0, "n_texts": 5}))
            probe = d / PROBE_STAGE.format(name)
            probe.mkdir()
            mem = {
                "peak_rss_mib": 600.0 if fast else 650.0,
                "policy_iterations": 3,
                "seconds_per_iteration": 0.5,
            }
            (probe / "memory.json").write_text(json.dumps(mem))
    timings = {f"{s}/{v.name}": {"world": 1.0, stages[v.name]: 2.0} for s in (0, 1) for v in variants}
    rep = write_ablate_report(
        tmp_path, [0, 1], variants, stages, PROFILES["full"], timings, 1.0, ["ppo_max", "grpo"], 2
    )
    md = (rep / "ablate.md").read_text()
    summary = json.loads((rep / "summary.json").read_text())
    assert "## Critic-free estimators against PPO-max" in md and "](estimators_frontier.png)" in md
    assert (rep / "estimators_frontier.png").read_bytes()[:4] == b"\x89PNG"
    assert (rep / "estimators.png").read_bytes()[:4] == b"\x89PNG"  # the group's training curves
    assert "| grpo | grpo | 4 | 0.5 (reward, k1) |" in md and "| ppo_max | gae | 1 |" in md
    cmp = summary["estimators"]
    assert list(cmp["methods"]) == ["ppo_max", "grpo"]
    answers = {v["question"].split(" (")[0]: v["answer"] for v in cmp["verdicts"]}
    assert answers["most gold reward at equal KL"] == "grpo" and answers["over-optimises"] == "grpo"
    assert answers["least memory"] == "grpo" and "| **grpo** |" in md
    assert cmp["methods"]["grpo"]["seeds"]["1"]["peak_rss_mib"] == 600.0
    assert "2 at once" in md and "3 policy iterations" in md


def test_no_estimators_section_without_the_group(tmp_path):
    from ppomax.demo.ablate import comparison, select

    assert comparison(select(["fig7"], False)) == []


def test_estimators_group_is_ppo_max_and_the_critic_free_presets_at_equal_samples(tmp_path):
    from ppomax.demo.ablate import BY_NAME, comparison

    chosen = select(["estimators"], False)
    methods = ["ppo_max", "grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"]
    assert [v.name for v in chosen] == methods
    assert comparison(chosen) == methods
    assert comparison(select(None, True))[:2] == [
        "ppo_max",
        "grpo",
    ]  # --quick compares one critic-free method

    def cfg(name):
        v = BY_NAME[name]
        dirs = [tmp_path / x for x in ("world", "sft", "rm")]
        return demo_stages.ppo_config(
            tmp_path, v.preset, *dirs, PROFILES["full"], 0, False, v.overrides, tmp_path / "pretrain"
        )

    base = cfg("ppo_max")
    assert base.ppo.uses_critic
    for name in ("grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"):
        c = cfg(name)
        assert (
            not c.ppo.uses_critic and c.ppo.critic_pretrain_steps == 0 and c.ppo.advantage_estimator == name
        )
        for key in (
            "rollout_batch_size",
            "buffer_size",
            "minibatch_size",
            "ppo_epochs",
            "iterations",
        ):
            assert getattr(c.ppo, key) == getattr(base.ppo, key), (
                name,
                key,
            )  # equal samples
        assert c.ppo.kl.coef == base.ppo.kl.coef, name  # and KL coefficient
        assert c.optim.policy_lr == base.optim.policy_lr
    assert (
        cfg("grpo").generation.samples_per_prompt == 4
        and cfg("reinforce_pp").generation.samples_per_prompt == 1
        and cfg("reinforce_pp_baseline").generation.samples_per_prompt == 4
    )


def test_report_only_writes_a_report_from_a_partial_ablation(tmp_path):
    """An interrupted ablation (one evaluation never written, one PPO run never started) still gets its report
    with `--report-only`: the runs present are reported, the others listed as missing; nothing is trained."""
    from ppomax.demo.ablate import run_ablate

    variants = ["ppo_max", "vanilla", "kl_penalty", "grpo", "rloo"]  # no estimator run at all
    for s in (0, 1):
        d = tmp_path / f"seed-{s}"
        for name, stage in (
            ("ppo_max", "ppo_max"),
            ("vanilla", "ppo_vanilla"),
            ("kl_penalty", "ppo_kl_penalty"),
        ):
            if (name, s) == ("kl_penalty", 1):
                continue  # never started
            run = d / stage
            run.mkdir(parents=True)
            recs = _method_recs(fast=name == "vanilla", over=name == "vanilla", seconds=1.0, seed=s)
            (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
            (run / "config.yaml").write_text("ppo:\n  advantage_estimator: gae\n  kl:\n    coef: 0.0\n")
            if (name, s) == ("vanilla", 1):
                continue  # trained, evaluation interrupted
            ev = d / f"eval_{name}"
            ev.mkdir()
            (ev / "vs_sft.json").write_text(json.dumps(_eval_result((6, 3, 1))))
            (ev / "heldout_lm.json").write_text(json.dumps({"policy": 1.1, "sft": 1.0, "n_texts": 5}))
    res = run_ablate(
        tmp_path, seeds=[0, 1], only=variants, report_only=True, progress=False, log=lambda m: None
    )
    md = res["report"].read_text()
    missing = ["vanilla/1", "kl_penalty/1", "grpo/0", "grpo/1", "rloo/0", "rloo/1"]
    assert f"Runs not in this report (not trained or not finished): {', '.join(missing)}." in md
    assert res["summary"]["missing_runs"] == missing and res["summary"]["estimators"] is None
    assert set(res["summary"]["runs"]["ppo_max"]) == {"0", "1"} and set(
        res["summary"]["runs"]["vanilla"]
    ) == {"0"}
    assert not (tmp_path / "seed-0" / "world").exists()  # nothing trained


def test_report_only_without_runs_lists_them_in_one_line(tmp_path, capsys):
    """`ablate --report-only` on a directory without one finished run: one line listing the missing runs and how to
    train them, exit 2 (it crashed in a plot's mean of no values); a directory that does not exist is one line too."""
    from ppomax.cli import main

    assert main(["ablate", "--report-only", "--out", str(tmp_path), "--only", "ppo_max", "vanilla"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "missing: ppo_max/0, ppo_max/1, ppo_max/2, vanilla/0, vanilla/1, vanilla/2" in err
    assert f"ppomax ablate --out {tmp_path}" in err
    assert main(["ablate", "--report-only", "--out", str(tmp_path / "nope")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert not (tmp_path / "nope").exists()


def _record(events, name, wait_for=None):
    """A job for :func:`run_seeds_in_parallel` on threads: logs its start and end; ``wait_for`` blocks it until
    that event is set (a timeout fails the test instead of hanging it)."""
    events.append(("start", name))
    if wait_for is not None:
        assert wait_for.wait(timeout=10), f"{name} waited for a job that never started"
    events.append(("end", name))
    return name


def test_parallel_seeds_start_a_seeds_variants_while_another_seed_builds_its_base():
    import functools
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from ppomax.demo.ablate.run import run_seeds_in_parallel

    events: list[tuple[str, str]] = []
    variant_of_seed_1_started = threading.Event()

    def base(s):
        # seed 3's base ends only once a variant of seed 1 runs: with two workers, that happens only if seed 1's
        # variants go to the worker that finished seed 1's base, not after every seed's base
        return functools.partial(
            _record, events, wait_for=variant_of_seed_1_started if s == 3 else None
        ), f"base{s}"

    def variant(s, i, v):
        def job(name):
            if s == 1:
                variant_of_seed_1_started.set()
            return _record(events, name)

        return job, f"{v.name}@{s}"

    vs = [BY_NAME["ppo_max"], BY_NAME["vanilla"]]
    tasks = [(s, i, v) for s in (1, 2, 3) for i, v in enumerate(vs, 6)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = run_seeds_in_parallel(pool, [1, 2, 3], tasks, base, variant)
    assert results == [f"{v.name}@{s}" for s, _, v in tasks]  # task order, whatever order they finished in
    for s, _, v in tasks:  # a variant starts after its own seed's base stages end
        assert events.index(("end", f"base{s}")) < events.index(("start", f"{v.name}@{s}"))
    assert events.index(("start", "ppo_max@1")) < events.index(("end", "base3"))


def test_parallel_seeds_raise_a_failure_and_cancel_what_has_not_started():
    from concurrent.futures import ThreadPoolExecutor

    from ppomax.demo.ablate.run import run_seeds_in_parallel

    ran: list[str] = []

    def broken(name):
        raise UserError(f"{name}: broken")

    def base(s):
        return (broken, f"base{s}") if s == 1 else (ran.append, f"base{s}")

    tasks = [(s, 6, BY_NAME["ppo_max"]) for s in (1, 2)]
    with ThreadPoolExecutor(max_workers=1) as pool, pytest.raises(UserError, match="base1: broken"):
        run_seeds_in_parallel(pool, [1, 2], tasks, base, lambda s, i, v: (ran.append, f"run{s}"))
    assert "run1" not in ran and "run2" not in ran


# ------------------------------------------------------------------ verdicts beyond the seeds' noise


def test_paired_test_decides_beyond_the_seeds_noise_only():
    from ppomax.demo.ablate.verdicts import FAILS, HOLDS, NOISE, combine, paired, unanimous

    p = paired([0.6, 0.7, 0.8], [0.5, 0.6, 0.7])  # +0.1 on every seed, no spread
    assert p["decision"] == HOLDS and p["mean"] == pytest.approx(0.1)
    p = paired([0.51, 0.9, 0.505], [0.5, 0.7, 0.5])  # ahead on 3/3 seeds, but by 0.01, 0.2, 0.005
    assert p["decision"] == NOISE and p["t"] == pytest.approx(1.117, abs=0.001)
    assert paired([1.0, 1.1, 0.9], [2.0, 2.2, 2.1])["decision"] == FAILS
    assert paired([0.3, 0.2, 0.4], [0.5, 0.5, 0.5], "lower")["decision"] == HOLDS
    assert paired([1.0, None], [0.0, 0.5])["decision"] == NOISE  # one seed decides nothing
    assert unanimous([True, True, True]) == HOLDS and unanimous([True, True, False]) == NOISE
    assert unanimous([False, False, True]) == FAILS
    assert combine([HOLDS, HOLDS, "context"]) == "reproduced"
    assert combine([HOLDS, NOISE]).startswith("within noise") and combine([NOISE, FAILS]) == "not reproduced"
    # with 5 seeds behind it, a verdict within the noise does not ask for 5 seeds again
    assert combine([NOISE], 3) == "within noise (run --seeds 0 1 2 3 4)"
    assert combine([NOISE], 5) == "within noise (5 seeds)"


def test_a_sign_on_three_seeds_is_no_verdict():
    """fig. 12's claim where PPO-ptx's tax is lower on all 3 seeds, once by 0.02 and twice by a hair: within the
    noise (a majority of signs would have called it reproduced), and reproduced with a consistent margin."""
    from ppomax.demo.ablate.verdicts import verdicts

    def nums_of(ptx):
        base = {"heldout_loss_sft": 1.0, "win_tie_lose": [3, 5, 2]}
        return {
            "ppo_max": {s: {**base, "heldout_loss": 1.05} for s in (1, 2, 3)},
            "ppo_ptx": {s: {**base, "heldout_loss": 1.0 + x} for s, x in zip((1, 2, 3), ptx, strict=True)},
        }

    (d,) = [v for v in verdicts(nums_of([0.03, 0.049, 0.0495])) if v["claim"].startswith("(d)")]
    assert d["verdict"] == "within noise (run --seeds 0 1 2 3 4)" and "within noise" in d["numbers"]
    (d,) = [v for v in verdicts(nums_of([0.03, 0.031, 0.029])) if v["claim"].startswith("(d)")]
    assert d["verdict"] == "reproduced"


def test_fig6_and_fig7_use_the_papers_settings():
    """fig. 6's advantage normalisation is judged with the paper's clips (0.5 and 0.12), fig. 7's entropy half
    with fig. 16's coefficient and clip."""
    from ppomax.demo.ablate.verdicts import verdicts

    assert BY_NAME["adv_norm_0.5"].overrides == ("ppo.advantage_norm=true", "ppo.advantage_clip=0.5")
    assert BY_NAME["entropy_bonus"].overrides == ("ppo.entropy_coef=0.01", "ppo.entropy_clip=30")
    run = {
        "trajectories": {
            k: {"start": 0.0, "peak": 1.0, "end": 0.5} for k in ("rm", "gold", "kl", "ppl", "length")
        },
        "kl_mid": 0.1,
        "gold_drop_early": 0.1,
        "gold_fall": 0.1,
        "over_optimised": False,
    }
    nums = {
        n: {s: dict(run) for s in (1, 2)}
        for n in (
            "vanilla",
            "reward_norm_0.3",
            "reward_norm_0.8",
            "adv_norm_0.5",
            "adv_norm_0.12",
            "kl_penalty",
            "entropy_bonus",
            "kl_reference_as_old",
        )
    }
    out = {v["claim"][:3]: v for v in verdicts(nums)}
    assert "adv_norm_0.5" in out["(a)"]["numbers"] and "adv_norm_0.12" in out["(a)"]["numbers"]
    assert "entropy_bonus" in out["(b)"]["numbers"]
    del nums["adv_norm_0.5"]
    assert {v["claim"][:3]: v for v in verdicts(nums)}["(a)"]["verdict"] == "not run"


def test_new_groups_select_their_baselines():
    from ppomax.demo.ablate import comparison, probed

    names = [v.name for v in select(["causes"], False)]
    assert names[:2] == ["grpo", "rloo"] and "grpo_kl_reward_k1" in names and "rloo_kl_loss_k3" in names
    assert [v.name for v in select(["whitening"], False)] == ["ppo_max", "ppo_max_adv_norm"]
    mon = select(["monitor"], False)
    assert len(mon) >= 8 and {v.figure for v in mon} == {"monitor"}
    chosen = select(["estimators", "causes"], False)
    compare = comparison(chosen)
    assert compare[0] == "ppo_max" and "reinforce_pp_baseline" in compare and "grpo_no_std" in compare
    assert "grpo_no_std" not in probed(compare) and "rloo" in probed(compare)


def test_causes_table_shows_each_sides_over_optimisation():
    """The causes table's last column: the variant's and its preset's over-optimisation flags per seed (they read
    n/a when formatted as numbers)."""
    from ppomax.demo.ablate.report import causes_markdown

    effect = {"diffs": [0.1, -0.2], "mean": -0.05, "sd": 0.2, "decision": "within noise"}
    row = {
        "variant": "grpo_no_std",
        "base": "grpo",
        "seeds": [0, 1],
        "effects": dict.fromkeys(("gold_at_budget", "gold_end", "gold_fall", "kl_end"), effect),
        "over_optimised": [False, False],
        "base_over_optimised": [False, True],
    }
    line = next(ln for ln in causes_markdown([row]) if ln.startswith("| grpo_no_std"))
    assert line.endswith("| no/no / no/yes |") and "n/a" not in line


def _mon_recs(n, kl_token, kl_seq, gold, rm):
    recs = _recs(gold, rm, kl_token)
    for r, k in zip(recs, kl_seq, strict=True):
        r["kl/exact_per_token"], r["kl/exact_per_sequence"] = r["kl/per_token"], k
    return recs


def test_monitor_rules_replay_and_their_evidence():
    """Every rule on a drifting run (exact KL logged) and on a run made before the exact KL (the rules that need
    it: not replayable); the confusion counts with the lead on gold's fall, in and out of sample."""
    from ppomax.demo.ablate.monitor import MONITOR_RULES, NA, monitor_evidence
    from ppomax.demo.ablate.numbers import run_numbers

    n = 40
    gold = [0.5 + 0.02 * i for i in range(10)] + [0.7 - 0.03 * i for i in range(30)]
    rm = [1.0 + 0.05 * i for i in range(n)]
    drifting = _mon_recs(n, [0.01 * i for i in range(n)], [0.1 * i for i in range(n)], gold, rm)
    old = [{k: v for k, v in r.items() if not k.startswith("kl/exact")} for r in drifting]
    fired = {name: rule(drifting) for name, rule in MONITOR_RULES.items()}
    assert all(isinstance(x, int) for k, x in fired.items() if "signature" not in k), fired
    assert fired["drift 0.03/token on the exact KL"] < fired["drift 0.15/token on the exact KL"]
    before = {name: rule(old) for name, rule in MONITOR_RULES.items()}
    assert (
        before["drift 0.15/token on the exact KL"] == NA
        and before["trend: exact KL rising over 3 windows, >= 0.02/token"] == NA
    )
    assert (
        before["drift 0.15/token on the estimator's KL (as first chosen)"]
        == fired["drift 0.15/token on the exact KL"]
    )
    ev = _eval_result()
    nums = {
        "mon_kl_0.1": {1: run_numbers(drifting, ev, {"policy": 1.0, "sft": 1.0})},
        "vanilla": {1: run_numbers(old, ev, {"policy": 1.0, "sft": 1.0})},
    }
    evidence = monitor_evidence(nums, {"mon_kl_0.1": "monitor", "vanilla": "fig. 4"})
    rule = "drift 0.15/token on the exact KL"
    out, everything = evidence["out of sample"][rule], evidence["all"][rule]
    assert out["fired_oo"] == 1 and out["not_replayable"] == 0 and everything["not_replayable"] == 1
    step = nums["mon_kl_0.1"][1]["gold_fall_step"]
    assert out["leads"] == [step - fired[rule]]


def test_cause_effects_are_paired_differences_to_the_preset():
    from ppomax.demo.ablate.estimators import cause_effects

    def seeds(gold, fall):
        return {
            s: {"gold_at_budget": g, "gold_end": g, "gold_fall": f, "kl_end": 1.0, "over_optimised": f > 0.1}
            for s, (g, f) in enumerate(zip(gold, fall, strict=True))
        }

    cmp = {
        "methods": {
            "grpo": {"seeds": seeds([0.5, 0.6, 0.7], [0.2, 0.2, 0.2])},
            "grpo_no_std": {"seeds": seeds([0.55, 0.65, 0.75], [0.05, 0.06, 0.04])},
        }
    }
    (row,) = cause_effects(cmp, {"grpo_no_std": "grpo", "rloo_kl_loss_k3": "rloo"})
    e = row["effects"]
    assert e["gold_end"]["mean"] == pytest.approx(0.05) and e["gold_end"]["decision"] == "holds"
    assert e["gold_fall"]["mean"] == pytest.approx(-0.15) and e["gold_fall"]["decision"] == "holds"
    assert e["kl_end"]["decision"] == "within noise"
    assert row["over_optimised"] == [False] * 3 and row["base_over_optimised"] == [True] * 3


def _fig7_nums(entropy_oo, ref_rm_end=(0.5, 0.6, 0.7)):
    """Hand-made fig. 7 runs on seeds 1-3: vanilla over-optimises with a large gold fall, the KL penalty never;
    the entropy bonus over-optimises on the seeds ``entropy_oo`` says; the reference as old policy ends at
    ``ref_rm_end`` RM reward (the KL penalty at 1.0) with less KL."""

    def run(rm_end, oo, fall, kl_mid):
        traj = {k: {"start": 0.0, "peak": 1.0, "end": 0.5} for k in ("gold", "kl", "ppl", "length")}
        return {
            "trajectories": {**traj, "rm": {"start": 0.0, "peak": rm_end, "end": rm_end}},
            "over_optimised": oo,
            "gold_fall": fall,
            "kl_mid": kl_mid,
        }

    seeds = (1, 2, 3)
    return {
        "vanilla": {s: run(2.0, True, 0.8 + 0.1 * s, 0.3) for s in seeds},
        "kl_penalty": {s: run(1.0, False, 0.02 * s, 0.05 + 0.01 * s) for s in seeds},
        "entropy_bonus": {
            s: run(1.5, oo, (0.5 if oo else 0.03) + 0.01 * s, 0.2)
            for s, oo in zip(seeds, entropy_oo, strict=True)
        },
        "kl_reference_as_old": {
            s: run(x, False, 0.01, 0.01 + 0.005 * s) for s, x in zip(seeds, ref_rm_end, strict=True)
        },
    }


def test_fig7_entropy_half_needs_every_seed():
    """The entropy bonus over-optimising on one seed of three leaves fig. 7's claim within the noise (a majority
    of seeds would have called it stable); on none of them, the claim is reproduced; on most, not reproduced."""
    from ppomax.demo.ablate.verdicts import verdicts

    def fig7(entropy_oo):
        (b,) = [v for v in verdicts(_fig7_nums(entropy_oo)) if v["claim"].startswith("(b)")]
        return b

    assert fig7([False, False, False])["verdict"] == "reproduced"
    b = fig7([False, True, False])
    assert b["verdict"] == "within noise (run --seeds 0 1 2 3 4)" and b["explanation"] == ""
    assert "over-optimised: entropy_bonus False/True/False" in b["numbers"]
    b = fig7([True, True, False])
    assert b["verdict"] == "not reproduced" and "entropy bonus" in b["explanation"]


def test_whitening_is_judged_against_ppo_max_on_paired_seeds():
    from ppomax.demo.ablate.verdicts import verdicts

    def nums(gold_end, fall):
        def run(g, f):
            return {"gold_end": g, "gold_fall": f, "win_tie_lose": [5, 3, 2]}

        return {
            "ppo_max": {s: run(0.7, 0.05) for s in (1, 2, 3)},
            "ppo_max_adv_norm": {s: run(g, f) for s, g, f in zip((1, 2, 3), gold_end, fall, strict=True)},
        }

    def whitening(*a):
        (w,) = [v for v in verdicts(nums(*a)) if v["figure"] == "whitening"]
        return w

    assert whitening([0.75, 0.76, 0.74], [0.01, 0.02, 0.0])["verdict"] == "reproduced"
    assert whitening([0.75, 0.6, 0.72], [0.01, 0.02, 0.0])["verdict"].startswith("within noise")
    w = whitening([0.6, 0.62, 0.61], [0.2, 0.25, 0.22])
    assert w["verdict"] == "not reproduced" and "stays off" in w["explanation"]
    assert [v["figure"] for v in verdicts({"ppo_max": nums([0.7] * 3, [0.0] * 3)["ppo_max"]})].count(
        "whitening"
    ) == 0


def test_trend_rule_fires_on_a_rising_kl_not_a_flat_one():
    """The candidate trend rule (replayed only): a KL that keeps rising past its floor fires, one that settles at
    a high level with a rising reward does not, a run without the exact KL cannot be judged."""
    from ppomax.demo.ablate.monitor import NA, _trend_rule

    n = 40
    rm = [1.0 + 0.05 * i for i in range(n)]
    rising = _mon_recs(n, [0.005 * i for i in range(n)], [0.0] * n, [0.5] * n, rm)
    flat = _mon_recs(n, [0.3] * n, [0.0] * n, [0.5] * n, rm)
    fired = _trend_rule(rising)
    assert isinstance(fired, int) and 0.005 * (fired - 1) >= 0.02
    assert _trend_rule(flat) is None
    assert _trend_rule(_recs([0.5] * n, rm)) == NA
