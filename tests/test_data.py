"""Data layer: file formats, record shapes and `file:line: what is wrong` errors (README, Data section)."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest

from ppomax.data import (
    DataError,
    LoadStats,
    load_preference_pairs,
    load_prompts,
    load_sft_examples,
    read_records,
)
from ppomax.errors import ConfigError

A = "\n\nAssistant:"
H = "\n\nHuman:"
#: the end of the message of a record-level error when data.on_bad_line is fail
SKIP = " (data.on_bad_line: skip skips and counts such records)"

HH_PAIRS = [
    {"chosen": f"{H} Hi there{A} Hello! How can I help?", "rejected": f"{H} Hi there{A} Go away."},
    {
        "chosen": f"{H} What is 2+2?{A} Let me think.{H} Well?{A} 4",
        "rejected": f"{H} What is 2+2?{A} Let me think.{H} Well?{A} 5",
    },
]


def write_jsonl(path: Path, rows: list, gz: bool = False) -> Path:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------------------
# file formats


@pytest.mark.parametrize(
    "kind", ["jsonl", "jsonl.gz", "json", "json.gz", "json-columns", "json-as-jsonl", "datasets"]
)
def test_every_file_format_gives_the_same_pairs(tmp_path: Path, kind: str) -> None:
    if kind == "jsonl":
        path = write_jsonl(tmp_path / "p.jsonl", HH_PAIRS)
    elif kind == "jsonl.gz":
        path = write_jsonl(tmp_path / "p.jsonl.gz", HH_PAIRS, gz=True)
    elif kind == "json":
        path = tmp_path / "p.json"
        path.write_text(json.dumps(HH_PAIRS, indent=2))
    elif kind == "json-columns":
        path = tmp_path / "p.json"
        path.write_text(json.dumps({k: [r[k] for r in HH_PAIRS] for k in ("chosen", "rejected")}))
    elif kind == "json-as-jsonl":  # JSON Lines content under a .json name
        path = write_jsonl(tmp_path / "p.json", HH_PAIRS)
    elif kind == "json.gz":
        path = tmp_path / "p.json.gz"
        path.write_bytes(gzip.compress(json.dumps(HH_PAIRS).encode()))
    else:
        datasets = pytest.importorskip("datasets", reason="the optional 'datasets' package is not installed")
        path = tmp_path / "ds"
        datasets.Dataset.from_list(HH_PAIRS).save_to_disk(str(path))
    pairs = load_preference_pairs(path)
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [
        (f"{H} Hi there{A}", " Hello! How can I help?", " Go away."),
        (f"{H} What is 2+2?{A} Let me think.{H} Well?{A}", " 4", " 5"),
    ]
    assert pairs[1].where == (f"{path} row 2" if kind == "datasets" else f"{path}:2")


def test_jsonl_line_numbers_are_physical_lines_and_blank_lines_are_ignored(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "r.jsonl", ["", json.dumps({"a": 1}), "   ", json.dumps({"a": 2})])
    records = list(read_records(path))
    assert [(r.source, r.number, r.value, r.row) for r in records] == [
        (str(path), 2, {"a": 1}, False),
        (str(path), 4, {"a": 2}, False),
    ]
    assert records[1].where == f"{path}:4"


def test_a_dataset_dict_directory_is_read_at_its_train_split_or_the_named_one(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets", reason="the optional 'datasets' package is not installed")
    path = tmp_path / "dd"
    splits = {"train": HH_PAIRS, "test": HH_PAIRS[:1]}
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(
        str(path)
    )
    assert len(load_preference_pairs(path)) == 2
    assert len(load_preference_pairs(path / "train")) == 2  # one split's own directory
    test = load_preference_pairs({"path": str(path), "split": "test"})
    assert len(test) == 1 and test[0].where == f"{path}[test] row 1"
    with pytest.raises(DataError, match=r"dd: no split 'valid' \(splits: train, test\)$"):
        load_preference_pairs({"path": str(path), "split": "valid"})


def test_file_level_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file or directory$"):
        load_prompts(tmp_path / "nope.jsonl")
    (tmp_path / "x.txt").write_text("a,b\n")
    with pytest.raises(DataError, match=r"x\.txt: unsupported file type"):
        load_prompts(tmp_path / "x.txt")
    (tmp_path / "bad.json").write_text('[{"prompt": "a"},\n {"prompt": "b"\n]')
    # a .json that does not parse is fatal even in skip mode: nothing after the error can be read
    with pytest.raises(
        DataError, match=r"bad\.json:3: malformed JSON \(Expecting ',' delimiter at column 1\)"
    ):
        load_prompts(tmp_path / "bad.json", on_error="skip")
    (tmp_path / "obj.json").write_text('{"prompt": "a"}')
    with pytest.raises(DataError, match=r"obj\.json: unexpected JSON top level"):
        load_prompts(tmp_path / "obj.json")
    (tmp_path / "trunc.jsonl.gz").write_bytes(gzip.compress(b'{"prompt": "a"}\n' * 50)[:-12])
    with pytest.raises(DataError, match=r"trunc\.jsonl\.gz:\d+: unreadable data"):
        load_prompts(tmp_path / "trunc.jsonl.gz")
    write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(DataError, match=r"empty\.jsonl: no usable prompts \(loaded 0, skipped 0\)$"):
        load_prompts(tmp_path / "empty.jsonl")


# ---------------------------------------------------------------------------------------------------------------
# preference pair shapes


def test_prompt_chosen_rejected_records(tmp_path: Path) -> None:
    rows = [
        {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5", "subset": "math"},
        {"prompt": f"{H} Hi{A}", "chosen": "  Hello", "rejected": "Bye"},
        # the prompt repeated inside the responses (some dumps do this) is removed once
        {"prompt": f"{H} Hi{A}", "chosen": f"{H} Hi{A} Hello", "rejected": f"{H} Hi{A} Bye"},
    ]
    stats = LoadStats()
    pairs = load_preference_pairs(write_jsonl(tmp_path / "p.jsonl", rows), stats=stats)
    # plain-text prompts become one human turn; responses get exactly one leading space unless they have one
    assert (pairs[0].prompt, pairs[0].chosen, pairs[0].rejected) == (f"{H} What is 2+2?{A}", " 4", " 5")
    assert pairs[0].meta == {"subset": "math"}
    assert (pairs[1].chosen, pairs[1].rejected) == ("  Hello", " Bye")
    assert (pairs[2].prompt, pairs[2].chosen, pairs[2].rejected) == (f"{H} Hi{A}", " Hello", " Bye")
    assert stats.notes["prompt repeated inside chosen/rejected: removed"] == 1


def test_moss_turn_list_pairs_align_roles_from_the_end(tmp_path: Path) -> None:
    rows = [
        {"chosen": ["q1", "a1", "q2", "good"], "rejected": ["q1", "a1", "q2", "bad"]},
        {"chosen": ["q", "good"], "rejected": ["q", "bad"]},
        # a history truncated at the front starts with an assistant turn (MOSS-RLHF's convention)
        {"chosen": ["a0", "q", "good"], "rejected": ["a0", "q", "bad"]},
    ]
    pairs = load_preference_pairs(write_jsonl(tmp_path / "m.jsonl", rows))
    assert (pairs[0].prompt, pairs[0].chosen, pairs[0].rejected) == (
        f"{H} q1{A} a1{H} q2{A}",
        " good",
        " bad",
    )
    assert pairs[1].prompt == f"{H} q{A}"
    assert pairs[2].prompt == f"{A} a0{H} q{A}"


def test_message_pairs_full_conversations_and_trl_prompt_form(tmp_path: Path) -> None:
    u = {"role": "user", "content": "Hi"}
    rows = [
        {
            "chosen": [u, {"role": "assistant", "content": "Hello"}],
            "rejected": [u, {"role": "assistant", "content": "No"}],
        },
        {
            "prompt": [u],
            "chosen": [{"role": "assistant", "content": "Hello"}],
            "rejected": [{"role": "assistant", "content": "No"}],
        },
    ]
    pairs = load_preference_pairs(write_jsonl(tmp_path / "m.jsonl", rows))
    for p in pairs:
        assert (p.prompt, p.chosen, p.rejected) == (f"{H} Hi{A}", " Hello", " No")


# ---------------------------------------------------------------------------------------------------------------
# broken input: each message names file:line and the problem


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (
            '{"chosen": "x", ',
            "malformed JSON (Expecting property name enclosed in double quotes at column 17)",
        ),
        (json.dumps({"chosen": f"{H} a{A} b"}), "missing field 'rejected' (record has: chosen)"),
        (json.dumps({"chosen": "  ", "rejected": f"{H} a{A} b"}), "empty field 'chosen'"),
        (
            json.dumps({"chosen": f"{H} a{A} b", "rejected": f"{H} a{A}  b "}),
            "chosen and rejected responses are identical",
        ),
        (json.dumps({"chosen": f"{H} a{A} ", "rejected": f"{H} a{A} b"}), "empty chosen response"),
        (
            json.dumps({"chosen": f"{H} a{A} b", "rejected": f"{H} a"}),
            "no '\\n\\nAssistant:' turn in 'rejected'",
        ),
        (
            json.dumps({"chosen": f"{H} a{A} b{H} c", "rejected": f"{H} a{A} d"}),
            "'chosen' ends with a human turn, not an assistant response",
        ),
        (
            json.dumps({"chosen": f"{H} a{A} b{H} c{A} x", "rejected": f"{H} a{A} B{H} c{A} y"}),
            "chosen and rejected differ before their last '\\n\\nAssistant:' "
            "(different prompts; first difference at character 24, in turn 2)",
        ),
        (
            json.dumps({"prompt": "q", "chosen": 3, "rejected": "b"}),
            "fields 'chosen' and 'rejected' must both be strings or both be lists of turns (got int and str)",
        ),
        (
            json.dumps({"prompt": f"{H} q", "chosen": "a", "rejected": "b"}),
            "prompt does not end with '\\n\\nAssistant:' (it starts with '\\n\\nHuman:', so it is read as an HH "
            "dialogue, which must end with the assistant cue '\\n\\nAssistant:', every marker after a blank line; "
            "a prompt with no HH marker is taken literally as one human turn)",
        ),
        (
            json.dumps({"chosen": ["q", "a"], "rejected": ["q", "x", "b"]}),
            "chosen and rejected turn lists differ in length (2 vs 3 turns)",
        ),
        (json.dumps({"chosen": ["q", ""], "rejected": ["q", "b"]}), "empty turn 2 in 'chosen'"),
        (json.dumps(["q", "a"]), "record must be a JSON object with 'chosen' and 'rejected', got list"),
    ],
)
def test_broken_pair_records_name_file_line_and_problem(tmp_path: Path, line: str, expected: str) -> None:
    good = json.dumps(HH_PAIRS[0])
    path = write_lines(tmp_path / "broken.jsonl", [good, "", line, good])
    with pytest.raises(DataError) as info:
        load_preference_pairs(path)
    assert str(info.value) == f"{path}:3: {expected}{SKIP}"
    stats = LoadStats()
    pairs = load_preference_pairs(path, on_error="skip", stats=stats)
    assert len(pairs) == 2 and stats.loaded == 2 and stats.skipped == 1
    assert sum(stats.skip_reasons.values()) == 1 and stats.examples == [f"{path}:3: {expected}"]


def test_json_list_errors_use_the_record_index(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps([HH_PAIRS[0], HH_PAIRS[1], {"chosen": HH_PAIRS[0]["chosen"]}], indent=2))
    with pytest.raises(DataError, match=r"p\.json:3: missing field 'rejected'"):
        load_preference_pairs(path)


def test_skip_mode_counts_each_reason(tmp_path: Path) -> None:
    rows = [
        json.dumps(HH_PAIRS[0]),
        "{oops",
        json.dumps({"chosen": f"{H} a{A} b"}),
        json.dumps({"chosen": f"{H} a{A} b", "rejected": f"{H} a{A} b"}),
        json.dumps({"chosen": f"{H} a{A} b", "rejected": f"{H} a{A} b"}),
        json.dumps(HH_PAIRS[1]),
    ]
    stats = LoadStats()
    pairs = load_preference_pairs(write_lines(tmp_path / "s.jsonl", rows), on_error="skip", stats=stats)
    assert len(pairs) == 2
    assert (stats.loaded, stats.skipped) == (2, 4)
    assert dict(stats.skip_reasons) == {
        "malformed JSON": 1,
        "missing field 'rejected'": 1,
        "chosen and rejected responses are identical": 2,
    }
    assert "skipped 4" in stats.summary()
    with pytest.raises(ValueError, match="on_error must be 'fail' or 'skip'"):
        load_preference_pairs(tmp_path / "s.jsonl", on_error="ignore")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------------
# prompts


def test_prompt_shapes(tmp_path: Path) -> None:
    rows = [
        {"prompt": "  Plain question?\n", "subset": "helpful"},
        {"prompt": f"{H} a{A} b{H} c{A}  "},  # trailing spaces after the cue are dropped
        {"prompt": "Human: old style start\n\nAssistant:"},
        {"messages": [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "hey"}]},
        HH_PAIRS[1],
        "bare string prompt",
        ["q1", "a1", "q2"],
    ]
    prompts = load_prompts(write_jsonl(tmp_path / "p.jsonl", rows))
    assert [p.prompt for p in prompts] == [
        f"{H} Plain question?{A}",
        f"{H} a{A} b{H} c{A}",
        f"{H} old style start{A}",
        f"Be nice.{H} hey{A}",
        f"{H} What is 2+2?{A} Let me think.{H} Well?{A}",
        f"{H} bare string prompt{A}",
        f"{H} q1{A} a1{H} q2{A}",
    ]
    assert prompts[0].meta == {"subset": "helpful"} and prompts[4].meta == {}
    assert all(p.prompt.endswith(A) for p in prompts)


def test_prompt_errors(tmp_path: Path) -> None:
    rows = [
        json.dumps({"prompt": f"{H} a{A} b"}),
        json.dumps({"text": "x"}),
        json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}),
        json.dumps({"prompt": [{"role": "narrator", "content": "a"}]}),
    ]
    path = write_lines(tmp_path / "e.jsonl", rows)
    stats = LoadStats()
    with pytest.raises(DataError, match="no usable prompts"):
        load_prompts(path, on_error="skip", stats=stats)
    assert stats.examples == [
        f"{path}:1: prompt does not end with '\\n\\nAssistant:' (it starts with '\\n\\nHuman:', so it is read as "
        "an HH dialogue, which must end with the assistant cue '\\n\\nAssistant:', every marker after a blank "
        "line; a prompt with no HH marker is taken literally as one human turn)",
        f"{path}:2: missing field 'prompt' (record has: text)",
        f"{path}:3: prompt does not end with a human turn (the model must answer the last turn)",
        f"{path}:4: unknown role 'narrator' in turn 1 of 'prompt' (use user, assistant or system)",
    ]


def test_prompts_do_not_validate_the_response(tmp_path: Path) -> None:
    """PPO needs only the prompt: an empty answer rejects an SFT/RM record, never a prompt."""
    rows = [
        # an HH-RLHF pair whose chosen answer is empty
        {"chosen": f"{H} Hi{A}", "rejected": f"{H} Hi{A} Go away."},
        {"chosen": f"{H} a{A} b{H} Well?{A}  ", "rejected": f"{H} a{A} b{H} Well?{A} c"},
        ["instruction", ""],  # MOSS [instruction, answer] with an empty answer
    ]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    prompts = load_prompts(path)
    assert [p.prompt for p in prompts] == [f"{H} Hi{A}", f"{H} a{A} b{H} Well?{A}", f"{H} instruction{A}"]
    assert prompts[2].meta == {"response": ""}
    stats = LoadStats()
    with pytest.raises(DataError, match="no usable SFT examples"):
        load_sft_examples(path, on_error="skip", stats=stats)
    assert stats.examples == [
        f"{path}:1: empty chosen response",
        f"{path}:2: empty chosen response",
        f"{path}:3: empty turn 2 in 'turns'",
    ]
    with pytest.raises(DataError, match=rf"p\.jsonl:1: empty chosen response{re.escape(SKIP)}$"):
        load_preference_pairs(path)


def test_a_prompt_error_says_how_the_prompt_was_read(tmp_path: Path) -> None:
    """Plain text is one human turn; text with an HH marker is an HH dialogue. An HH look-alike without the blank
    lines is the second kind, and the message says which rule hit it."""
    rows = [
        {"prompt": "Human: hi Assistant:"},
        {"prompt": f"Context.{H} hi{A} hello"},
        {"prompt": "hi Assistant:"},
    ]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    stats = LoadStats()
    prompts = load_prompts(path, on_error="skip", stats=stats)
    rule = (
        "so it is read as an HH dialogue, which must end with the assistant cue '\\n\\nAssistant:', every "
        "marker after a blank line; a prompt with no HH marker is taken literally as one human turn"
    )
    assert stats.examples == [
        f"{path}:1: prompt does not end with '\\n\\nAssistant:' (it starts with 'Human:', {rule})",
        f"{path}:2: prompt does not end with '\\n\\nAssistant:' (it contains '\\n\\nHuman:', {rule})",
    ]
    assert [p.prompt for p in prompts] == [f"{H} hi Assistant:{A}"]  # no marker: literal text
    with pytest.raises(
        DataError, match=r"s\.jsonl:1: prompt does not end with .* \(it starts with 'Human:', so "
    ):
        load_sft_examples(
            write_jsonl(tmp_path / "s.jsonl", [{"prompt": "Human: hi Assistant:", "response": "x"}])
        )


def test_moss_prompt_roles(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "m.json", [["instruction", "answer"], ["q"], ["q1", "a1", "q2"]])
    stats = LoadStats()
    human_first = load_prompts(path, stats=stats)
    assert [p.prompt for p in human_first] == [f"{H} instruction{A}", f"{H} q{A}", f"{H} q1{A} a1{H} q2{A}"]
    assert human_first[0].meta == {"response": "answer"}
    assert stats.notes["turn list ends with an assistant turn: moved to meta['response']"] == 1
    moss = load_prompts(path, moss_roles="last_is_human")  # MOSS-RLHF's OnlyPromptDataset
    assert [p.prompt for p in moss] == [
        f"{A} instruction{H} answer{A}",
        f"{H} q{A}",
        f"{H} q1{A} a1{H} q2{A}",
    ]


# ---------------------------------------------------------------------------------------------------------------
# SFT


def test_sft_prompt_response_and_hh_dialogue_segments(tmp_path: Path) -> None:
    rows = [
        {"prompt": "Say hi", "response": "Hi!"},
        {"prompt": "Say hi", "completion": "Hi!"},
        {"text": f"{H} a{A} b{H} c{A}  d"},
        {"chosen": HH_PAIRS[0]["chosen"], "rejected": HH_PAIRS[0]["rejected"]},
        ["q1", "a1", "q2", "a2"],
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]},
    ]
    ex = load_sft_examples(write_jsonl(tmp_path / "s.jsonl", rows))
    assert (ex[0].prompt, ex[0].response, ex[0].segments) == (
        f"{H} Say hi{A}",
        " Hi!",
        [(f"{H} Say hi{A}", False), (" Hi!", True)],
    )
    assert (ex[1].prompt, ex[1].response) == (ex[0].prompt, ex[0].response)
    assert ex[2].segments == [(f"{H} a{A}", False), (" b", True), (f"{H} c{A}", False), ("  d", True)]
    assert (ex[2].prompt, ex[2].response) == (f"{H} a{A} b{H} c{A}", "  d")
    assert ex[3].response == " Hello! How can I help?"
    assert ex[4].segments == [(f"{H} q1{A}", False), (" a1", True), (f"{H} q2{A}", False), (" a2", True)]
    assert ex[5].segments == [(f"{H} q{A}", False), (" r", True)]
    for e in ex:
        assert "".join(s for s, _ in e.segments) == e.prompt + e.response
    last_only = load_sft_examples(tmp_path / "s.jsonl", assistant_turns="last")
    assert last_only[2].segments == [(f"{H} a{A} b{H} c{A}", False), ("  d", True)]


def test_sft_errors(tmp_path: Path) -> None:
    rows = [
        json.dumps({"prompt": "q"}),
        json.dumps(["q1", "a1", "q2"]),
        # plain text is language modelling in "text", not in "chosen"
        json.dumps({"chosen": "no markers here"}),
        json.dumps({"text": f"{H} a{A}"}),
    ]
    path = write_lines(tmp_path / "e.jsonl", rows)
    stats = LoadStats()
    with pytest.raises(DataError):
        load_sft_examples(path, on_error="skip", stats=stats)
    assert stats.examples == [
        f"{path}:1: missing field 'response' (record has: prompt)",
        f"{path}:2: dialogue does not end with an assistant turn (3 turns, human first; SFT needs the response last)",
        f"{path}:3: field 'chosen' is not an HH dialogue ('\\n\\nHuman: ...\\n\\nAssistant: ...')",
        f"{path}:4: empty text response",
    ]


# ---------------------------------------------------------------------------------------------------------------
# TRL's conversational formats (https://huggingface.co/docs/trl/dataset_formats)

SYSTEM = {"role": "system", "content": "Be brief."}
USER = {"role": "user", "content": "What color is the sky?"}
EARLIER = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
BLUE = {"role": "assistant", "content": "It is blue."}


@pytest.mark.parametrize("fmt", ["hh", "chat_template"])
def test_trl_conversational_formats_render_like_messages(tmp_path: Path, fmt: str) -> None:
    """TRL's prompt-completion (SFT), preference (RM) and prompt-only (PPO) records with message lists are read
    through the same chat path as ``{"messages": [...]}``."""
    from transformers import AutoTokenizer

    from helpers import CHATML_TEMPLATE, make_tiny_tokenizer

    tok = AutoTokenizer.from_pretrained(make_tiny_tokenizer(tmp_path, chat_template=CHATML_TEMPLATE))
    tok.eos_token = "<|im_end|>"
    kw = {"format": fmt, "tokenizer": tok}
    prompts = [[USER], [SYSTEM, *EARLIER, USER]]
    trl_sft = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": p, "completion": [BLUE]} for p in prompts])
    msgs = write_jsonl(tmp_path / "msgs.jsonl", [{"messages": [*p, BLUE]} for p in prompts])
    got = load_sft_examples(trl_sft, **kw)
    # loss on the completion only, as TRL's prompt-completion training: the messages form with its last turn
    want = load_sft_examples(msgs, assistant_turns="last", **kw)
    assert [(e.prompt, e.response) for e in got] == [(e.prompt, e.response) for e in want]
    assert [e.segments for e in got] == [e.segments for e in want]
    if fmt == "hh":
        assert (got[0].prompt, got[0].response) == (f"{H} What color is the sky?{A}", " It is blue.")
        assert got[1].prompt == f"Be brief.{H} Hi{A} Hello!{H} What color is the sky?{A}"
    else:
        assert got[0].response == "It is blue.<|im_end|>"
    green = {"role": "assistant", "content": "It is green."}
    trl_rm = write_jsonl(
        tmp_path / "rm.jsonl", [{"prompt": p, "chosen": [BLUE], "rejected": [green]} for p in prompts]
    )
    pairs = load_preference_pairs(trl_rm, **kw)
    assert [(p.prompt, p.chosen) for p in pairs] == [(e.prompt, e.response) for e in want]
    assert pairs[0].rejected == (" It is green." if fmt == "hh" else "It is green.<|im_end|>")
    trl_ppo = write_jsonl(tmp_path / "ppo.jsonl", [{"prompt": p} for p in prompts])
    assert [p.prompt for p in load_prompts(trl_ppo, **kw)] == [e.prompt for e in want]
    # the prompt file of TRL's prompt-completion SFT data is usable for PPO as it is
    assert [p.prompt for p in load_prompts(trl_sft, **kw)] == [e.prompt for e in want]


def test_trl_completion_errors(tmp_path: Path) -> None:
    rows = [
        {"prompt": [USER], "completion": [BLUE, USER]},
        {"prompt": [USER], "completion": [USER]},
        {"prompt": [USER], "completion": 3},
        {"prompt": [BLUE], "completion": [BLUE]},
    ]
    path = write_jsonl(tmp_path / "e.jsonl", rows)
    stats = LoadStats()
    with pytest.raises(DataError, match="no usable SFT examples"):
        load_sft_examples(path, on_error="skip", stats=stats)
    one = "'completion' must hold exactly one assistant message when 'prompt' is given"
    assert stats.examples == [
        f"{path}:1: {one}",
        f"{path}:2: {one}",
        f"{path}:3: field 'completion' must be a string or a list with one assistant message, got int",
        f"{path}:4: prompt does not end with a human turn (the model must answer the last turn)",
    ]


@pytest.mark.parametrize(
    ("chosen", "rejected", "prompt", "responses"),
    [
        # TRL's own example (dataset_formats): the space before the difference starts the responses
        ("The sky is blue.", "The sky is green.", "The sky is", (" blue.", " green.")),
        # the difference inside a word: the cut moves back to the last whitespace (TRL's would keep "bl")
        ("The sky is blue.", "The sky is black.", "The sky is", (" blue.", " black.")),
        ("Q: 2+2?\n\nA: 4", "Q: 2+2?\n\nA: 5", "Q: 2+2?\n\nA:", (" 4", " 5")),
        # no whitespace: cut where they differ (the hh format puts a space before a response)
        ("天空是蓝色的", "天空是绿色的", "天空是", (" 蓝色的", " 绿色的")),
        (
            "It is blue",
            "It is blue, really",
            "It is",
            (" blue", " blue, really"),
        ),  # one the other's beginning
    ],
)
def test_trl_implicit_prompt_is_the_common_beginning(
    tmp_path: Path, chosen, rejected, prompt, responses
) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [{"chosen": chosen, "rejected": rejected}])
    stats = LoadStats()
    (pair,) = load_preference_pairs(path, stats=stats)
    assert (pair.prompt, pair.chosen, pair.rejected) == (f"{H} {prompt}{A}", *responses)
    assert stats.notes == {"implicit prompt: the common beginning of chosen and rejected": 1}


def test_trl_implicit_prompt_errors(tmp_path: Path) -> None:
    rows = [
        {"chosen": "Blue sky.", "rejected": "Green sky."},
        {"chosen": "Same text.", "rejected": "Same text."},
        {"chosen": "Sky", "rejected": "Sky is blue."},
        {"chosen": f"{H} q{A} a", "rejected": "no markers"},  # one HH dialogue: read as HH, not implicitly
    ]
    path = write_jsonl(tmp_path / "e.jsonl", rows)
    stats = LoadStats()
    with pytest.raises(DataError, match="no usable preference pairs"):
        load_preference_pairs(path, on_error="skip", stats=stats)
    assert (
        stats.examples
        == [
            f"{path}:1: chosen and rejected have no common beginning to take as the prompt (TRL's implicit prompt; "
            "give 'prompt' with the responses, or HH dialogues)",
            f"{path}:2: chosen and rejected responses are identical",
            f"{path}:3: empty chosen response ('chosen' is the implicit prompt and nothing more)",  # no space to cut at
            f"{path}:4: no '\\n\\nAssistant:' turn in 'rejected'",
        ]
    )


def test_trl_conversational_implicit_prompt_is_the_shared_turns(tmp_path: Path) -> None:
    green = {"role": "assistant", "content": "It is green."}
    path = write_jsonl(tmp_path / "c.jsonl", [{"chosen": [USER, BLUE], "rejected": [USER, green]}])
    (pair,) = load_preference_pairs(path, format="hh")
    assert (pair.prompt, pair.chosen, pair.rejected) == (
        f"{H} What color is the sky?{A}",
        " It is blue.",
        " It is green.",
    )


def test_trl_language_modelling_text_trains_every_token(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from helpers import make_tiny_tokenizer
    from ppomax.data import IGNORE_INDEX, tokenize_sft

    tok = AutoTokenizer.from_pretrained(make_tiny_tokenizer(tmp_path))
    text = "The sky is blue. Grass is green."
    path = write_jsonl(tmp_path / "lm.jsonl", [{"text": text}, {"text": f"{H} Hi{A} Hello"}])
    stats = LoadStats()
    lm, hh = load_sft_examples(path, stats=stats, format="hh")
    assert (lm.prompt, lm.response, lm.segments) == ("", text, [(text, True)])
    assert hh.prompt == f"{H} Hi{A}"  # an HH dialogue in "text" still trains on the assistant turns only
    assert stats.notes == {"plain text ('text' without HH markers): loss on every token": 1}
    feats = tokenize_sft(tok, lm, 64, 64)
    assert IGNORE_INDEX not in feats["labels"] and feats["labels"] == feats["input_ids"]
    assert tok.decode(feats["input_ids"], skip_special_tokens=True) == text


@pytest.mark.parametrize(
    ("record", "what"),
    [
        ({"prompt": "Hi", "completion": " Hello", "label": True}, "unpaired preference record"),
        ({"prompt": "Hi", "completion": " Go away", "label": False}, "unpaired preference record"),
        ({"prompt": "2+2?", "completions": ["4"], "labels": [True]}, "stepwise supervision record"),
    ],
)
def test_other_trl_types_are_refused_not_trained_as_sft(tmp_path: Path, record, what) -> None:
    """A KTO row labelled false must not become an SFT demonstration; the message says what the record is. PPO
    reads its prompt (a prompt-only use of the data)."""
    path = write_jsonl(tmp_path / "k.jsonl", [record])
    for load in (load_sft_examples, load_preference_pairs):
        with pytest.raises(DataError) as err:
            load(path)
        assert str(err.value).startswith(f"{path}:1: {what}") and "has no" in str(err.value)
    (prompt,) = load_prompts(path, format="hh")
    assert prompt.prompt == f"{H} {record['prompt']}{A}"


# ---------------------------------------------------------------------------------------------------------------
# chat templates


def test_chat_template_format(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from helpers import CHATML_TEMPLATE, make_tiny_tokenizer

    tok = AutoTokenizer.from_pretrained(make_tiny_tokenizer(tmp_path, chat_template=CHATML_TEMPLATE))
    tok.eos_token = "<|im_end|>"
    path = write_jsonl(tmp_path / "p.jsonl", [HH_PAIRS[1], {"chosen": ["q", "a"], "rejected": ["q", "b"]}])
    pairs = load_preference_pairs(path, format="chat_template", tokenizer=tok)
    assert pairs[0].prompt == (
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\nLet me think.<|im_end|>\n"
        "<|im_start|>user\nWell?<|im_end|>\n<|im_start|>assistant\n"
    )
    # the response carries the end-of-turn marker; whitespace after the EOS string is dropped
    assert (pairs[0].chosen, pairs[0].rejected) == ("4<|im_end|>", "5<|im_end|>")
    assert pairs[1].prompt == "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"
    sft = load_sft_examples(tmp_path / "p.jsonl", format="chat_template", tokenizer=tok)
    assert sft[1].segments == [
        ("<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n", False),
        ("a<|im_end|>", True),
    ]
    assert [s for s, t in sft[0].segments if t] == ["Let me think.<|im_end|>", "4<|im_end|>"]
    prompts = load_prompts(tmp_path / "p.jsonl", format="chat_template", tokenizer=tok)
    assert prompts[0].prompt == pairs[0].prompt
    with pytest.raises(ValueError, match="needs the tokenizer"):
        load_prompts(path, format="chat_template")
    tok.chat_template = None
    with pytest.raises(
        ConfigError, match=r"^data\.chat_format: 'chat_template' but the tokenizer .* has no chat"
    ):
        load_prompts(path, format="chat_template", tokenizer=tok)
    with pytest.raises(
        ConfigError, match=r"^data\.chat_format: must be 'auto', 'hh' or 'chat_template', got 'chatml'"
    ):
        load_prompts(path, format="chatml")  # type: ignore[arg-type]


def test_the_default_chat_format_is_the_tokenizers_template_when_it_has_one(tmp_path: Path) -> None:
    """The default was hh: a chat model was trained on '\\n\\nHuman:' text without a word."""
    from transformers import AutoTokenizer

    from helpers import CHATML_TEMPLATE, make_tiny_tokenizer
    from ppomax.config import PPOConfig, RMConfig, SFTConfig

    chat = AutoTokenizer.from_pretrained(make_tiny_tokenizer(tmp_path, chat_template=CHATML_TEMPLATE))
    plain = AutoTokenizer.from_pretrained(make_tiny_tokenizer(tmp_path, name="plain"))
    assert {c().data.chat_format for c in (SFTConfig, RMConfig, PPOConfig)} == {"auto"}
    path = write_jsonl(tmp_path / "p.jsonl", [HH_PAIRS[1]])
    # an HH record parsed into turns and rendered with the template (what the template itself writes)
    turns = [("user", "What is 2+2?"), ("assistant", "Let me think."), ("user", "Well?")]
    templated = chat.apply_chat_template(
        [{"role": r, "content": c} for r, c in turns], tokenize=False, add_generation_prompt=True
    )
    assert load_prompts(path, tokenizer=chat)[0].prompt == templated
    assert load_preference_pairs(path, tokenizer=chat)[0].prompt == templated
    # without a template: HH, verbatim
    assert load_prompts(path, tokenizer=plain)[0].prompt == HH_PAIRS[1]["chosen"][: -len(" 4")]
    # the start-up lines of the trainers say which format was chosen and why
    from ppomax.data import resolve_chat_format

    assert resolve_chat_format("auto", chat) == (
        "chat_template",
        "the tokenizer has a chat template; data.chat_format: auto",
    )
    assert resolve_chat_format("auto", plain) == (
        "hh",
        "the tokenizer has no chat template; data.chat_format: auto",
    )
    assert resolve_chat_format("hh", chat) == ("hh", "data.chat_format: hh")


# ---------------------------------------------------------------------------------------------------------------
# text that is not Unicode, bytes that are not UTF-8, empty HH turns

LOADERS = {"sft": load_sft_examples, "pairs": load_preference_pairs, "prompts": load_prompts}
GOOD = {
    "sft": {"prompt": "Say hi.", "response": "hi"},
    "pairs": {"prompt": "Say hi.", "chosen": "hi", "rejected": "no"},
    "prompts": {"prompt": "Say hi."},
}


@pytest.mark.parametrize("kind", list(LOADERS))
@pytest.mark.parametrize("fmt", ["jsonl", "json"])
def test_a_lone_surrogate_is_an_error_at_its_line_or_a_counted_skip(
    tmp_path: Path, kind: str, fmt: str
) -> None:
    """JSON can write a lone UTF-16 surrogate ("\\ud800"), which is no Unicode text: the tokenizer raised a
    TypeError traceback on it, outside the loaders' error handling."""
    bad = {**GOOD[kind], "prompt": "Say \ud800 hi."}
    rows = [GOOD[kind], GOOD[kind], bad, GOOD[kind]]
    path = tmp_path / f"d.{fmt}"
    if fmt == "json":
        path.write_text(json.dumps(rows, indent=1), encoding="ascii")
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="ascii")
    with pytest.raises(DataError) as err:
        LOADERS[kind](path)
    assert str(err.value) == (
        f"{path}:3: lone surrogate in a string (not Unicode text) ('\\ud800' in field 'prompt'){SKIP}"
    )
    stats = LoadStats()
    assert len(LOADERS[kind](path, on_error="skip", stats=stats)) == 3
    assert stats.skip_reasons == {"lone surrogate in a string (not Unicode text)": 1}


def test_a_lone_surrogate_deep_in_a_record_is_found(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b\udfff"}]
    path.write_text(json.dumps({"messages": msgs}) + "\n", encoding="ascii")
    with pytest.raises(
        DataError,
        match=r"m\.jsonl:1: .* \('\\udfff' in field 'content' of item 2 of field 'messages'\)"
        + re.escape(SKIP),
    ):
        load_sft_examples(path)
    # a surrogate *pair* is one valid character
    (tmp_path / "ok.jsonl").write_text('{"prompt": "smile \\ud83d\\ude00", "response": "ok"}\n')
    assert load_sft_examples(tmp_path / "ok.jsonl")[0].prompt == f"{H} smile \U0001f600{A}"


@pytest.mark.parametrize("gz", [False, True])
def test_a_byte_that_is_not_utf8_is_reported_at_its_line_and_skip_skips_only_it(
    tmp_path: Path, gz: bool
) -> None:
    """The reader decoded in chunks: a bad byte on line 7 was reported at line 1 and failed the whole file even in
    skip mode."""
    lines = [json.dumps({"prompt": f"question {i}"}).encode() for i in range(1, 11)]
    lines[6] = lines[6].replace(b"question", b"qu\xe9stion")  # Latin-1, not UTF-8
    data = b"\n".join(lines) + b"\n"
    path = tmp_path / ("p.jsonl.gz" if gz else "p.jsonl")
    path.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(DataError) as err:
        load_prompts(path)
    assert str(err.value) == f"{path}:7: not UTF-8 text (byte 0xe9 at byte 15 of the line){SKIP}"
    stats = LoadStats()
    prompts = load_prompts(path, on_error="skip", stats=stats)
    assert [p.where for p in prompts] == [f"{path}:{i}" for i in (1, 2, 3, 4, 5, 6, 8, 9, 10)]
    assert stats.skip_reasons == {"not UTF-8 text": 1}


def test_a_byte_that_is_not_utf8_in_a_json_file_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_bytes(
        json.dumps([{"prompt": f"q{i}"} for i in range(5)], indent=1)
        .replace("q3", "q\xff3")
        .encode("latin-1")
    )
    with pytest.raises(DataError, match=r"p\.json:12: not UTF-8 text \(byte 0xff at byte 15 of the line\)"):
        load_prompts(path, on_error="skip")  # one JSON value: nothing after the bad byte can be trusted


def test_a_utf8_bom_is_not_an_error(tmp_path: Path) -> None:
    (tmp_path / "b.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": "hi"}).encode() + b"\n")
    (tmp_path / "b.json").write_bytes(b"\xef\xbb\xbf" + json.dumps([{"prompt": "hi"}]).encode())
    for name in ("b.jsonl", "b.json"):
        assert [p.prompt for p in load_prompts(tmp_path / name)] == [f"{H} hi{A}"]


@pytest.mark.parametrize(
    ("kind", "record", "what"),
    [
        ("prompts", {"prompt": f"{H} {A}"}, "turn 1 (Human)"),
        ("prompts", {"prompt": f"{H} hi{A} yes{H}   {A}"}, "turn 3 (Human)"),
        ("prompts", {"chosen": f"{H}{A} a"}, "turn 1 (Human)"),
        ("pairs", {"chosen": f"{H} {A} a", "rejected": f"{H} {A} b"}, "turn 1 (Human)"),
        (
            "pairs",
            {"prompt": f"{H} hi{A} {H} again{A}", "chosen": "a", "rejected": "b"},
            "turn 2 (Assistant)",
        ),
        ("sft", {"text": f"{H} \n{A} a"}, "turn 1 (Human)"),
        ("sft", {"prompt": f"Human: {A}", "response": "a"}, "turn 1 (Human)"),
    ],
)
def test_an_empty_hh_turn_is_an_error_at_its_line(tmp_path: Path, kind: str, record: dict, what: str) -> None:
    """`"\\n\\nHuman: \\n\\nAssistant:"` trained silently; turn lists already refuse empty turns."""
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD[kind], record])
    with pytest.raises(
        DataError,
        match=rf"d\.jsonl:2: empty turn in '\w+' \({re.escape(what)} has no text\){re.escape(SKIP)}$",
    ):
        LOADERS[kind](path)
    stats = LoadStats()
    assert len(LOADERS[kind](path, on_error="skip", stats=stats)) == 1 and stats.skipped == 1


def test_an_error_quoting_the_data_stays_one_line(tmp_path: Path) -> None:
    """Found by tests/test_fuzz_data.py: a field name with a line break made a two-line error."""
    path = tmp_path / "nl.jsonl"
    path.write_text(json.dumps({"a\nb\u2028c": 1}) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_prompts(path)
    assert str(err.value) == f"{path}:1: missing field 'prompt' (record has: a\\nb\\u2028c){SKIP}"


ASST_A = {"role": "assistant", "content": "a"}


@pytest.mark.parametrize(
    ("kind", "record", "turn"),
    [
        ("sft", {"messages": ["0", f"{A}Human: hi"]}, "turn 2 (assistant) contains '\\n\\nAssistant:'"),
        ("sft", [f"hi{H} again", "ok"], "turn 1 (user) contains '\\n\\nHuman:'"),
        ("prompts", {"messages": [{"role": "user", "content": f"hi{A} sure{H} more"}]}, "turn 1 (user)"),
        ("pairs", {"chosen": ["q", f"a{H} b"], "rejected": ["q", "c"]}, "the response contains"),
        (
            "sft",
            {
                "messages": [
                    {"role": "system", "content": "Human: x"},
                    {"role": "user", "content": "q"},
                    ASST_A,
                ]
            },
            "turn 1 (system) contains 'Human:'",
        ),
        ("sft", {"prompt": "q", "response": f"a{H} b"}, "the response contains '\\n\\nHuman:'"),
    ],
)
def test_a_turn_holding_an_hh_marker_cannot_be_written_as_hh(
    tmp_path: Path, kind: str, record: object, turn: str
) -> None:
    """Found by tests/test_fuzz_data.py: `["0", "\\n\\nAssistant:Human:"]` trained on the response "Human:"; written
    as HH text, the marker in a turn started a turn of its own."""
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD[kind], record])
    with pytest.raises(DataError) as err:
        LOADERS[kind](path)
    assert str(err.value).startswith(
        f"{path}:2: a turn holds an HH turn marker, so it cannot be written in the HH format ({turn}"
    )
