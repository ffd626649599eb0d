"""The loaders on the real data in ../shared/data (HH-RLHF harmless test split, MOSS-RLHF PPO sample)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from ppomax.data import (
    DataError,
    LoadStats,
    load_preference_pairs,
    load_prompts,
    load_sft_examples,
    tokenize_pair,
    tokenize_prompt,
)

DATA = (Path(__file__).parents[1] / ".." / "shared" / "data").resolve()
HH = DATA / "hh-rlhf-harmless-test.jsonl.gz"
MOSS = DATA / "moss-rlhf-ppo-sample"
A = "\n\nAssistant:"

needs_hh = pytest.mark.skipif(
    not HH.exists(), reason=f"real HH-RLHF sample not found at {HH} (shared/ not beside the repo)"
)
needs_moss = pytest.mark.skipif(
    not MOSS.exists(), reason=f"MOSS-RLHF sample not found at {MOSS} (shared/ not beside the repo)"
)

# Found by reading the file independently (see test_hh_skips_match_an_independent_scan): 4 pairs whose chosen
# response is empty and 5 whose chosen/rejected dialogues diverge before the last assistant turn (a response
# with an inline "Human:" or a doubled "\n\nAssistant:"). No pair has identical chosen and rejected responses.
HH_EMPTY_CHOSEN = [87, 517, 926, 1104]
HH_DIVERGING = [1255, 1689, 1951, 1953, 2037]


@needs_hh
def test_hh_pairs_load_in_skip_mode_with_every_skip_explained() -> None:
    stats = LoadStats()
    pairs = load_preference_pairs(HH, on_error="skip", stats=stats)
    assert stats.loaded + stats.skipped == 2312
    assert (stats.loaded, stats.skipped) == (2303, 9)
    assert dict(stats.skip_reasons) == {
        "empty chosen response": 4,
        "chosen and rejected differ before their last '\\n\\nAssistant:'": 5,
    }
    skipped_lines = sorted(int(m.split(":")[1]) for m in stats.examples)
    assert skipped_lines == sorted(HH_EMPTY_CHOSEN + HH_DIVERGING)
    for p in pairs:
        assert p.prompt.startswith("\n\nHuman:") and p.prompt.endswith(A)
        assert p.chosen.strip() and p.rejected.strip() and p.chosen.strip() != p.rejected.strip()
        assert p.chosen[:1].isspace() and p.rejected[:1].isspace()  # verbatim text after "Assistant:"


@needs_hh
def test_hh_pairs_round_trip_to_the_original_dialogues() -> None:
    with gzip.open(HH, "rt", encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh]
    pairs = load_preference_pairs(HH, on_error="skip")
    by_line = {int(p.where.rsplit(":", 1)[1]): p for p in pairs}
    for line, p in by_line.items():
        assert p.prompt + p.chosen == rows[line - 1]["chosen"]
        assert p.prompt + p.rejected == rows[line - 1]["rejected"]


@needs_hh
def test_hh_skips_match_an_independent_scan() -> None:
    empty, diverging, identical = [], [], 0
    with gzip.open(HH, "rt", encoding="utf-8") as fh:
        rows = [json.loads(raw) for raw in fh]
    for line, rec in enumerate(rows, start=1):
        c, r = rec["chosen"], rec["rejected"]
        ic, ir = c.rfind(A) + len(A), r.rfind(A) + len(A)
        if c[:ic] != r[:ir]:
            diverging.append(line)
        elif not c[ic:].strip():
            empty.append(line)
        elif c[ic:].strip() == r[ir:].strip():
            identical += 1
    assert (empty, diverging, identical) == (HH_EMPTY_CHOSEN, HH_DIVERGING, 0)


@needs_hh
def test_hh_fail_fast_stops_at_the_first_bad_record() -> None:
    with pytest.raises(DataError) as info:
        load_preference_pairs(HH)
    assert (
        str(info.value)
        == f"{HH}:87: empty chosen response (data.on_bad_line: skip skips and counts such records)"
    )


@needs_hh
def test_hh_as_prompts_and_sft() -> None:
    # PPO needs only the prompt: an empty chosen answer does not reject it, even fail-fast
    stats = LoadStats()
    prompts = load_prompts(HH, stats=stats)
    assert len(prompts) == 2312 and stats.skipped == 0 and all(p.prompt.endswith(A) for p in prompts)
    with gzip.open(HH, "rt", encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh]
    for line in HH_EMPTY_CHOSEN:  # the prompt is the dialogue up to its last assistant cue, verbatim
        chosen = rows[line - 1]["chosen"]
        assert prompts[line - 1].prompt == chosen[: chosen.rfind(A) + len(A)]
    sft_stats = LoadStats()
    sft = load_sft_examples(HH, on_error="skip", stats=sft_stats)
    assert len(sft) == 2312 - len(HH_EMPTY_CHOSEN)
    assert dict(sft_stats.skip_reasons) == {"empty chosen response": len(HH_EMPTY_CHOSEN)}
    for e in sft:
        assert "".join(s for s, _ in e.segments) == e.prompt + e.response
        assert e.segments[-1] == (e.response, True)


@needs_hh
def test_hh_tokenised_with_left_truncation(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from helpers import make_tiny_tokenizer

    tok = AutoTokenizer.from_pretrained(make_tiny_tokenizer(tmp_path))
    pairs = load_preference_pairs(HH, on_error="skip")[:300]
    stats = LoadStats()
    feats = [tokenize_pair(tok, p, 256, 128, stats) for p in pairs]
    n_long = sum(len(tok(p.prompt)["input_ids"]) > 256 for p in pairs)
    assert n_long > 0 and stats.truncated_prompts == n_long
    for p, f in zip(pairs, feats, strict=True):
        assert len(f["prompt_ids"]) <= 256 and len(f["chosen_ids"]) <= 128
        assert tok.decode(f["prompt_ids"]).endswith(A)  # the assistant cue survives truncation
        last_turn = p.prompt[p.prompt.rfind("\n\nHuman:") :]
        if len(tok(last_turn)["input_ids"]) <= 256:
            assert tok.decode(f["prompt_ids"]).endswith(last_turn)


@needs_moss
def test_moss_ppo_sample() -> None:
    train, valid = MOSS / "train.json", MOSS / "valid.json"
    # the shipped sample: 31 lists of strings; 20 are [instruction, answer] pairs, 11 end with a human turn
    raw = json.loads(train.read_text(encoding="utf-8"))
    assert len(raw) == 31 and all(isinstance(r, list) and all(isinstance(t, str) for t in r) for r in raw)
    assert raw == json.loads(valid.read_text(encoding="utf-8"))  # valid.json is a copy of train.json
    stats = LoadStats()
    prompts = load_prompts(train, stats=stats)
    assert len(prompts) == 31 and stats.skipped == 0
    assert stats.notes["turn list ends with an assistant turn: moved to meta['response']"] == 20
    assert all(p.prompt.startswith("\n\nHuman: ") and p.prompt.endswith(A) for p in prompts)
    assert prompts[0].prompt == "\n\nHuman: 列出两种沙漠生物群系的名称。\n\nAssistant:"
    assert prompts[0].meta["response"].startswith("1. 撒哈拉绿洲生物群系")
    assert prompts[30].prompt.count("\n\nHuman:") == 4 and prompts[30].prompt.count(A) == 4
    # MOSS-RLHF's own convention makes the last turn the human's, even for [instruction, answer] records
    moss = load_prompts(train, moss_roles="last_is_human")
    assert moss[0].prompt.startswith("\n\nAssistant: 列出两种沙漠生物群系的名称。\n\nHuman: 1. 撒哈拉")
    assert moss[30].prompt == prompts[30].prompt  # odd-length lists agree under both conventions
    sft_stats = LoadStats()
    sft = load_sft_examples(train, on_error="skip", stats=sft_stats)
    assert len(sft) == 20 and dict(sft_stats.skip_reasons) == {
        "dialogue does not end with an assistant turn": 11
    }


@needs_moss
def test_moss_prompts_tokenise(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from helpers import make_tiny_tokenizer

    texts = [t for r in json.loads((MOSS / "train.json").read_text(encoding="utf-8")) for t in r]
    tok = AutoTokenizer.from_pretrained(make_tiny_tokenizer(tmp_path, texts, vocab_size=600))
    for p in load_prompts(MOSS / "train.json"):
        ids = tokenize_prompt(tok, p.prompt, 64)
        assert len(ids) <= 64 and tok.decode(ids).endswith(A)
