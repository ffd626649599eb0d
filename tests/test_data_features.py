"""What the trainers load (ppomax.data.features): parse + tokenise in one pass, in `data.num_proc` processes with a
progress bar. The result is that of the loaders followed by the tokenisers, whatever num_proc."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ppomax.data import (
    DataError,
    LoadStats,
    load_preference_pairs,
    load_prompts,
    load_sft_examples,
    pair_features,
    prompt_features,
    sft_features,
    tokenize_pair,
    tokenize_prompt,
    tokenize_sft,
)
from ppomax.errors import ConfigError

H, A = "\n\nHuman:", "\n\nAssistant:"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    from helpers import CHATML_TEMPLATE, make_tiny_tokenizer

    tok = AutoTokenizer.from_pretrained(
        make_tiny_tokenizer(tmp_path_factory.mktemp("tok"), chat_template=CHATML_TEMPLATE)
    )
    tok.eos_token = "<|im_end|>"
    return tok


def records(n: int) -> list:
    """Pairs of several shapes (long ones get truncated), with a bad record every 37th."""
    out: list = []
    for i in range(n):
        long = " and so on" * (i % 7) * 5
        if i % 37 == 36:
            out.append({"chosen": f"{H} q{i}{A} same", "rejected": f"{H} q{i}{A} same"})
        elif i % 4 == 3:  # TRL's implicit prompt
            out.append({"chosen": f"The number {i} is even", "rejected": f"The number {i} is odd{long}"})
        elif i % 3 == 0:
            out.append(
                {"chosen": f"{H} question {i}{long}{A} yes {i}", "rejected": f"{H} question {i}{long}{A} no"}
            )
        elif i % 3 == 1:
            out.append({"prompt": f"Say {i}.", "chosen": f"{i}", "rejected": f"{i + 1}{long}"})
        else:
            user = {"role": "user", "content": f"Is {i} even?{long}"}
            out.append(
                {
                    "chosen": [user, {"role": "assistant", "content": "yes" if i % 2 == 0 else "no"}],
                    "rejected": [user, {"role": "assistant", "content": "no" if i % 2 == 0 else "yes"}],
                }
            )
    return out


def write(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("fmt", ["hh", "chat_template"])
def test_pair_features_are_the_loader_then_the_tokeniser_for_any_num_proc(tmp_path, tok, fmt):
    path = write(tmp_path / "p.jsonl", records(300))
    want_stats = LoadStats()
    pairs = load_preference_pairs(path, "skip", want_stats, format=fmt, tokenizer=tok)
    want = [tokenize_pair(tok, p, 24, 8, want_stats) for p in pairs]
    assert want_stats.skipped == 8 and want_stats.truncated_prompts > 0 and want_stats.truncated_responses > 0
    for num_proc in (1, 3):
        stats = LoadStats()
        got = pair_features(
            path, tok, format=fmt, max_prompt_tokens=24, max_response_tokens=8,
            on_error="skip", stats=stats, num_proc=num_proc,
        )  # fmt: skip
        assert got == want, num_proc
        assert stats == want_stats, num_proc


def test_sft_and_prompt_features_for_any_num_proc(tmp_path, tok):
    rows = [{"prompt": f"Count to {i}.", "response": " ".join(map(str, range(i)))} for i in range(1, 150)]
    rows[40] = {"prompt": "q", "completion": "a", "label": False}  # KTO: refused, counted
    path = write(tmp_path / "s.jsonl", rows)
    want_stats = LoadStats()
    want = [
        tokenize_sft(tok, e, 16, 16, want_stats)
        for e in load_sft_examples(path, "skip", want_stats, tokenizer=tok)
    ]
    prompt_stats = LoadStats()
    want_prompts = [
        (tokenize_prompt(tok, e.dialogue or e.prompt, 20, prompt_stats), e.prompt, e.meta)
        for e in load_prompts(path, "skip", prompt_stats, tokenizer=tok)
    ]
    for num_proc in (1, 2):
        stats = LoadStats()
        got = sft_features(
            path,
            tok,
            max_prompt_tokens=16,
            max_response_tokens=16,
            on_error="skip",
            stats=stats,
            num_proc=num_proc,
        )
        assert (got, stats) == (want, want_stats)
        stats = LoadStats()
        got_prompts = prompt_features(
            path, tok, max_prompt_tokens=20, on_error="skip", stats=stats, num_proc=num_proc
        )
        assert (got_prompts, stats) == (want_prompts, prompt_stats)


def test_the_first_bad_record_fails_the_load_for_any_num_proc(tmp_path, tok):
    rows = records(300)
    path = write(tmp_path / "p.jsonl", rows)
    messages = set()
    for num_proc in (1, 2):
        with pytest.raises(DataError) as err:
            pair_features(
                path, tok, format="hh", max_prompt_tokens=24, max_response_tokens=8, num_proc=num_proc
            )
        messages.add(str(err.value))
    assert messages == {
        f"{path}:37: chosen and rejected responses are identical (data.on_bad_line: skip skips and counts such records)"
    }
    # a budget that cannot be met is the user's setting, not a record: it stops the load in a worker too
    with pytest.raises(ConfigError, match=r"data\.max_prompt_tokens: 1 is too small"):
        pair_features(
            path, tok, format="chat_template", max_prompt_tokens=1, max_response_tokens=8, num_proc=2
        )


def test_the_progress_bar_counts_records_on_stderr(tmp_path, tok, capsys):
    path = write(tmp_path / "p.jsonl", records(40))
    pair_features(path, tok, format="hh", max_prompt_tokens=24, max_response_tokens=8, on_error="skip")
    assert capsys.readouterr().err == ""
    pair_features(
        path,
        tok,
        format="hh",
        max_prompt_tokens=24,
        max_response_tokens=8,
        on_error="skip",
        progress="train pairs",
    )
    err = capsys.readouterr().err
    assert "train pairs" in err and "40" in err and "loaded=39" in err and "skipped=1" in err, err
