"""`ppomax demo --quick` end to end: every stage runs for real, the report exists and its numbers are finite.

Whether the paper's finding shows is a property of the full demo checked by bench/demo_seeds.py, not here.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from helpers import float_leaves
from ppomax.cli import main
from ppomax.demo import stages as demo_stages
from ppomax.demo.pipeline import STAGES, Pipeline, files_digest, run_demo


def test_pipeline_caches_by_fingerprint(tmp_path):
    calls = []
    pipe = Pipeline(tmp_path, log=lambda m: None)

    def stage(d):
        calls.append(d.name)
        (d / "artefact").write_text("x")

    pipe.run(1, "a", {"lr": 1}, (), stage)
    pipe.run(2, "b", {}, ("a",), stage)
    again = Pipeline(tmp_path, log=lambda m: None)
    again.run(1, "a", {"lr": 1}, (), stage)
    again.run(2, "b", {}, ("a",), stage)
    assert calls == ["a", "b"]  # both cached
    changed = Pipeline(tmp_path, log=lambda m: None)
    changed.run(1, "a", {"lr": 2}, (), stage)
    changed.run(2, "b", {}, ("a",), stage)  # upstream changed: re-run
    assert calls == ["a", "b", "a", "b"]


@pytest.fixture
def stub_stages(monkeypatch):
    """Every demo stage replaced by a stub writing a token output (the pipeline's wiring without training)."""
    ran = []

    def stub(name, write):
        def fn(d, *args, **kwargs):
            ran.append(name)
            write(d)

        monkeypatch.setattr(demo_stages, name, fn)

    for name in ("make_world", "train_tokenizer", "pretrain", "sft", "reward_model"):
        stub(name, lambda d: (d / "out.txt").write_text("x"))
    stub("ppo", lambda d: (d / "metrics.jsonl").write_text('{"step": 1}\n'))
    evals = ("vanilla_vs_sft.json", "ppo_max_vs_sft.json", "rm_accuracy.json")
    stub("evaluate_all", lambda d: [(d / f).write_text("{}") for f in evals])
    stub("write_demo_report", lambda d: (d / "summary.json").write_text("{}"))
    return ran


def test_demo_rerun_hits_every_cache_and_leaves_torch_threads_alone(tmp_path, stub_stages):
    """The report's cache key is its inputs (the eval and PPO outputs it reads, its settings, the report code),
    not the clock; and run_demo, library code, does not change the process's torch thread count."""
    n = torch.get_num_threads()
    torch.set_num_threads(6)
    try:
        run_demo(tmp_path, quick=True, progress=False, log=lambda m: None)
        assert torch.get_num_threads() == 6
    finally:
        torch.set_num_threads(n)
    assert stub_stages == [
        "make_world",
        "train_tokenizer",
        "pretrain",
        "sft",
        "reward_model",
        "ppo",
        "ppo",
        "evaluate_all",
        "write_demo_report",
    ]
    logged = []
    run_demo(tmp_path, quick=True, progress=False, log=logged.append)
    assert len(stub_stages) == len(STAGES)  # nothing ran again
    assert sum(": cached" in m for m in logged) == len(STAGES)
    # an input of the report changed behind the pipeline's back (e.g. an eval file rewritten): the report is stale
    (tmp_path / "eval" / "vanilla_vs_sft.json").write_text('{"changed": 1}')
    run_demo(tmp_path, quick=True, progress=False, log=lambda m: None)
    assert stub_stages[len(STAGES) :] == ["write_demo_report"]


def test_files_digest(tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("x = 1\n")
    b.write_text("y = 2\n")
    first = files_digest([a, b])
    assert files_digest([a, b]) == first
    a.write_text("x = 3\n")  # the report code changed: its cached output is stale
    assert files_digest([a, b]) != first
    assert files_digest([b, a]) != files_digest([a, b])  # names are part of it: swapped contents are a change


def test_ppo_config_takes_the_profiles_overrides_as_set_overrides(tmp_path):
    """The profile's per-preset overrides go through ppomax.config.apply_overrides, as `--set` does, and the
    gold reward is logged under its name with weight 0."""
    from ppomax.config import PPOConfig, read_preset
    from ppomax.demo.profiles import PROFILES

    def cfg(preset):
        return demo_stages.ppo_config(
            tmp_path,
            preset,
            tmp_path / "world",
            tmp_path / "sft",
            tmp_path / "rm",
            PROFILES["quick"],
            0,
            False,
        )

    assert cfg("ppo_max").ppo.kl.coef == 0.5
    assert cfg("vanilla").ppo.kl.coef == PPOConfig.model_validate(read_preset("vanilla")).ppo.kl.coef
    gold = cfg("ppo_max").reward.functions[0]
    assert (gold.name, gold.weight, gold.kwargs) == ("gold", 0.0, {"world": str(tmp_path / "world")})


def test_quick_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    report = out / "report" / "report.md"
    assert report.is_file()
    assert f"report: {report}" in printed
    assert "PPO-max beats SFT (gold judge):" in printed
    for stage in STAGES:
        assert (out / stage / "done.json").is_file(), stage
    for png in ("training_curves.png", "win_tie_lose.png", "rm_margins.png"):
        assert (out / "report" / png).read_bytes()[:4] == b"\x89PNG"
    md = report.read_text()
    assert "![training curves](training_curves.png)" in md and "| ppo_max | overall |" in md

    summary = json.loads((out / "report" / "summary.json").read_text())
    nums = dict(float_leaves({k: summary[k] for k in ("runs", "eval", "rm_accuracy")}))
    assert nums, "no numbers in the summary"
    bad = {k: v for k, v in nums.items() if not math.isfinite(v)}
    assert not bad, f"non-finite numbers: {bad}"
    for name in ("vanilla", "ppo_max"):
        for metric in ("rm", "gold", "kl", "ppl", "length"):
            assert summary["runs"][name][metric]["n"] > 0, (name, metric)
        wtl = summary["eval"][name]["win_tie_lose"]["overall"]
        assert sum(wtl) == json.loads((out / "eval" / f"{name}_vs_sft.json").read_text())["n_prompts"]
    assert isinstance(summary["ppo_max_beats_sft"], bool)

    # a second run with nothing changed reuses every stage, the report too
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert printed.count(": cached") == len(STAGES)


@pytest.mark.parametrize("bad", [["demo", "--out"]])
def test_demo_cli_usage(bad):
    with pytest.raises(SystemExit):
        main(bad)
