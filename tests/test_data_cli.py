"""Data problems reached through the commands users run: one line naming the config key or `file:line`, exit code 2,
no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import set_args
from ppo_helpers import FAST, make_setup
from ppomax.cli import main
from tiny_lm import make_tiny_lm, write_jsonl

RECORDS = [{"prompt": f"Repeat {w}.", "response": f"{w} {w}"} for w in ("apple", "river", "stone", "cloud")]
PAIRS = [{"prompt": f"Say {w}.", "chosen": w, "rejected": "no"} for w in ("apple", "river", "stone", "cloud")]


@pytest.fixture(autouse=True)
def _no_progress_bars():
    """In a fresh interpreter the CLI hides transformers' weight bars; here transformers is already imported."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    yield
    hf_logging.enable_progress_bar()


def _one_line_error(err: str, *needles: str) -> None:
    """The error is the last line on stderr, and every line is one of ppomax's own (progress lines such as the
    model's size may precede it): a message spanning lines or a traceback would show lines without the prefix."""
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines and all(ln.startswith("ppomax: ") for ln in lines), err
    for n in needles:
        assert n in lines[-1], lines[-1]


def test_chat_template_without_template_train_sft_subprocess(tmp_path: Path) -> None:
    """The real command line (a fresh interpreter, as a user runs it): exit code 2 and one line on stderr."""
    model = make_tiny_lm(tmp_path)  # its tokenizer has no chat template
    train = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    cmd = [
        sys.executable,
        "-m",
        "ppomax.cli",
        "train-sft",
        "--set",
        f"model.policy={model}",
        "--set",
        f"data.train={train}",
        "--set",
        f"logging.out_dir={tmp_path / 'run'}",
        "--set",
        "logging.progress=false",
        "--set",
        "data.chat_format=chat_template",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr
    _one_line_error(proc.stderr, "data.chat_format", "no chat template", str(model))


def test_chat_template_without_template_train_rm(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = make_tiny_lm(tmp_path)
    train = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    capsys.readouterr()  # the setup's own output (transformers' save bars)
    rc = main(
        [
            "train-rm",
            "--set",
            f"model.policy={model}",
            "--set",
            f"data.train={train}",
            "--set",
            f"logging.out_dir={tmp_path / 'run'}",
            "--set",
            "logging.progress=false",
            "--set",
            "data.chat_format=chat_template",
        ]
    )
    assert rc == 2
    _one_line_error(capsys.readouterr().err, "data.chat_format", "no chat template")


def test_chat_template_without_template_train_ppo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    s = make_setup(tmp_path)
    sets = [
        f"model.policy={s.policy}",
        f"model.reward={s.reward}",
        f"data.prompts={s.prompts}",
        f"logging.out_dir={tmp_path / 'run'}",
        *FAST,
        "data.chat_format=chat_template",
    ]
    capsys.readouterr()  # the setup's own output (transformers' save bars)
    rc = main(["train-ppo", "--preset", "ppo_max", *set_args(*sets)])
    assert rc == 2
    _one_line_error(capsys.readouterr().err, "data.chat_format", "no chat template")


def test_prompt_budget_below_the_special_prefix_names_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A tokenizer that puts BOS in front of every text leaves no room in a 1-token prompt budget."""
    from transformers import AutoTokenizer

    from helpers import make_tiny_tokenizer

    model = make_tiny_lm(tmp_path)
    AutoTokenizer.from_pretrained(
        make_tiny_tokenizer(tmp_path, add_bos=True, vocab_size=300)
    ).save_pretrained(model)
    train = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    capsys.readouterr()  # the setup's own output (transformers' save bars)
    rc = main(
        [
            "train-sft",
            "--set",
            f"model.policy={model}",
            "--set",
            f"data.train={train}",
            "--set",
            f"logging.out_dir={tmp_path / 'run'}",
            "--set",
            "logging.progress=false",
            "--set",
            "data.max_prompt_tokens=1",
        ]
    )
    assert rc == 2
    _one_line_error(capsys.readouterr().err, "data.max_prompt_tokens", "at least 2")


@pytest.mark.parametrize("on_bad_line", ["fail", "skip"])
def test_a_lone_surrogate_in_the_data_is_one_line_or_a_counted_skip(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], on_bad_line: str
) -> None:
    """A JSON lone surrogate reached the tokenizer, outside the loader's error handling: a TypeError traceback."""
    model = make_tiny_lm(tmp_path)
    train = tmp_path / "train.jsonl"
    rows = [*RECORDS[:2], {"prompt": "Repeat \ud800.", "response": "x"}, *RECORDS[2:]]
    train.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="ascii")
    capsys.readouterr()  # the setup's own output (transformers' save bars)
    sets = [f"model.policy={model}", f"data.train={train}", f"logging.out_dir={tmp_path / 'run'}"]
    sets += ["logging.progress=false", "logging.tensorboard=false", f"data.on_bad_line={on_bad_line}"]
    rc = main(["train-sft", *set_args(*sets)])
    err = capsys.readouterr().err
    if on_bad_line == "fail":
        assert rc == 2
        _one_line_error(err, f"{train}:3: lone surrogate in a string (not Unicode text)")
    else:
        assert rc == 0, err
        assert "loaded 4, skipped 1; skip reasons: lone surrogate in a string (not Unicode text) x1" in err


def _train_rm(tmp_path: Path, model: Path, pairs: Path) -> int:
    sets = [f"model.policy={model}", f"data.train={pairs}", f"logging.out_dir={tmp_path / 'run'}"]
    sets += ["logging.progress=false", "logging.tensorboard=false"]
    return main(["train-rm", *set_args(*sets)])


HH_EMPTY_CHOSEN = [
    {
        "chosen": "\n\nHuman: Say apple.\n\nAssistant: apple",
        "rejected": "\n\nHuman: Say apple.\n\nAssistant: no",
    },
    {"chosen": "\n\nHuman: Say river.\n\nAssistant:", "rejected": "\n\nHuman: Say river.\n\nAssistant: no"},
]


def test_a_bad_record_that_stops_train_rm_says_how_to_skip_such_records(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Real HH-RLHF has pairs whose chosen answer is empty: the run stopped with a clear line, which did not say
    that data.on_bad_line: skip would skip and count them."""
    model = make_tiny_lm(tmp_path)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", HH_EMPTY_CHOSEN)
    capsys.readouterr()  # the setup's own output (transformers' save bars)
    assert _train_rm(tmp_path, model, pairs) == 2
    err = capsys.readouterr().err
    _one_line_error(err, f"{pairs}:2: empty chosen response")
    assert err.rstrip().endswith("(data.on_bad_line: skip skips and counts such records)")


def test_train_rm_says_which_chat_format_it_chose(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """data.chat_format: auto (the default) takes the tokenizer's chat template, and the start-up line says so."""
    from transformers import AutoTokenizer

    from helpers import CHATML_TEMPLATE

    model = make_tiny_lm(tmp_path)
    tok = AutoTokenizer.from_pretrained(model)
    tok.chat_template = CHATML_TEMPLATE
    tok.save_pretrained(model)
    pairs = write_jsonl(
        tmp_path / "pairs.jsonl", HH_EMPTY_CHOSEN
    )  # the bad record ends the run after start-up
    capsys.readouterr()
    assert _train_rm(tmp_path, model, pairs) == 2
    err = capsys.readouterr().err
    line = "ppomax: chat format: chat_template (the tokenizer has a chat template; data.chat_format: auto)"
    assert line in err.splitlines(), err
