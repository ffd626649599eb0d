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
from ppomax.demo.ablate import QUICK, STAGE_NAMES, VARIANTS, select
from ppomax.demo.ablate_report import gold_fall_step, over_optimised, replay_monitor
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
    changed = {k for k, v in cfg.ppo.model_dump().items() if base.ppo.model_dump()[k] != v}
    named = {o.split("=")[0].split(".", 1)[1] for o in variant.overrides if o.startswith("ppo.")}
    assert changed <= named, (variant.name, changed - named)  # nothing else moves
    if variant.name == "policy_pretrained":
        assert cfg.model.policy == str(tmp_path / "pretrain" / "final")
    if variant.name == "ppo_ptx":
        assert cfg.ppo.ptx_coef > 0 and cfg.data.ptx == f"{tmp_path / 'world'}/sft_train.jsonl"
        assert (
            cfg.ppo.kl_coef
            == demo_stages.ppo_config(
                tmp_path,
                "ppo_max",
                tmp_path / "world",
                tmp_path / "sft",
                tmp_path / "rm",
                PROFILES["full"],
                0,
                False,
            ).ppo.kl_coef
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
        assert v["verdict"] in ("reproduced", "not reproduced", "not run") and v["numbers"]
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
        t = summary["collapse_monitor"][rule]
        assert sum(t.values()) == len(quick) and f"| {rule} |" in md


def test_every_claim_gets_a_verdict_with_its_numbers():
    """verdicts() on synthetic per-run numbers for every variant and two seeds (the quick run leaves most claims
    "not run", so this is where their comparisons and formatting are exercised)."""
    from ppomax.demo.ablate_report import verdicts

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
            "over_optimised": i % 2 == 0,
            "eval_gold_policy": 0.05 * i,
            "win_tie_lose": [i, 10, 5],
            "heldout_loss": 1.0 + 0.01 * i,
            "heldout_loss_sft": 1.0,
        }

    nums = {v.name: {s: run(i + s) for s in (0, 1)} for i, v in enumerate(VARIANTS)}
    out = verdicts(nums)
    assert [v["claim"][:3] for v in out[:4]] == ["(a)", "(b)", "(c)", "(d)"] and len(out) == 6
    for v in out:
        assert v["verdict"] in ("reproduced", "not reproduced"), v
        assert "seeds 0/1" in v["numbers"] or "/" in v["numbers"]
        assert (v["verdict"] == "reproduced") == (v["explanation"] == "")
