"""`ppomax demo --quick` end to end: every stage runs for real, the report exists and its numbers are finite.

Whether the paper's finding shows is a property of the full demo checked by bench/demo_seeds.py, not here.
"""

from __future__ import annotations

import json
import math

import pytest

from ppomax.cli import main
from ppomax.demo import STAGES, Pipeline


def _finite_numbers(obj, path="summary"):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _finite_numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _finite_numbers(v, f"{path}[{i}]")
    elif isinstance(obj, float):
        yield path, obj


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
    nums = dict(_finite_numbers({k: summary[k] for k in ("runs", "eval", "rm_accuracy")}))
    assert nums, "no numbers in the summary"
    bad = {k: v for k, v in nums.items() if not math.isfinite(v)}
    assert not bad, f"non-finite numbers: {bad}"
    for name in ("vanilla", "ppo_max"):
        for metric in ("rm", "gold", "kl", "ppl", "length"):
            assert summary["runs"][name][metric]["n"] > 0, (name, metric)
        wtl = summary["eval"][name]["win_tie_lose"]["overall"]
        assert sum(wtl) == json.loads((out / "eval" / f"{name}_vs_sft.json").read_text())["n_prompts"]
    assert isinstance(summary["ppo_max_beats_sft"], bool)

    # a second run reuses every stage but the report
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert printed.count(": cached") == len(STAGES) - 1


@pytest.mark.parametrize("bad", [["demo", "--out"]])
def test_demo_cli_usage(bad):
    with pytest.raises(SystemExit):
        main(bad)
