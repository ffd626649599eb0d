"""Tokenisation: left truncation of prompts keeping the latest turns, response truncation, special tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from helpers import CHATML_TEMPLATE, make_tiny_tokenizer
from ppomax.data import (
    IGNORE_INDEX,
    LoadStats,
    PreferencePair,
    SFTExample,
    encode,
    special_prefix,
    tokenize_pair,
    tokenize_prompt,
    tokenize_response,
    tokenize_sft,
)
from ppomax.errors import ConfigError, UserError

A = "\n\nAssistant:"
H = "\n\nHuman:"


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory):
    return AutoTokenizer.from_pretrained(make_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def bos_tok(tmp_path_factory: pytest.TempPathFactory):
    return AutoTokenizer.from_pretrained(make_tiny_tokenizer(tmp_path_factory.mktemp("bos"), add_bos=True))


def dialogue(n_turns: int) -> str:
    return "".join(
        f"{H} question number {k} about bread{A} answer number {k} about France" for k in range(n_turns)
    )


def test_short_prompt_is_untouched(tok) -> None:
    stats = LoadStats()
    p = f"{H} Hi{A}"
    assert tokenize_prompt(tok, p, 100, stats) == encode(tok, p)
    assert stats.truncated_prompts == 0
    assert tokenize_prompt(tok, p, None) == encode(tok, p)


def test_left_truncation_drops_the_fewest_oldest_whole_turns(tok) -> None:
    prompt = dialogue(6) + f"{H} the final question{A}"
    turns = [prompt[i:] for i in range(1, len(prompt)) if prompt.startswith(H, i)]
    budget = len(encode(tok, turns[2])) + 1  # room for the last 4 turns (3 exchanges + final) and a bit
    stats = LoadStats()
    ids = tokenize_prompt(tok, prompt, budget, stats)
    # an independent search: the longest suffix starting at a human turn that fits
    expected = next(t for t in [prompt, *turns] if len(encode(tok, t)) <= budget)
    assert expected == turns[2]
    assert ids == encode(tok, expected)
    assert tok.decode(ids).endswith(f"{H} the final question{A}")
    assert stats.truncated_prompts == 1 and not stats.notes


def test_left_truncation_cuts_tokens_inside_the_latest_turn_when_it_alone_is_too_long(tok) -> None:
    long_q = " ".join(["bread"] * 200)
    prompt = f"{H} old{A} old answer{H} {long_q}{A}"
    stats = LoadStats()
    ids = tokenize_prompt(tok, prompt, 50, stats)
    last = encode(tok, f"{H} {long_q}{A}")
    assert ids == last[-50:]  # the most recent tokens, the assistant cue included
    assert tok.decode(ids).endswith(A)
    assert stats.truncated_prompts == 1
    assert stats.notes["prompt cut inside its latest turn (no whole-turn cut fits)"] == 1


def test_bos_is_kept_in_front_and_counted_in_the_budget(bos_tok) -> None:
    bos = bos_tok.bos_token_id
    assert special_prefix(bos_tok) == [bos]
    prompt = dialogue(5) + f"{H} last{A}"
    ids = tokenize_prompt(bos_tok, prompt, 30)
    assert ids[0] == bos and ids.count(bos) == 1 and len(ids) <= 30
    # a text that already starts with the BOS string (chat templates write it) gets no second one
    assert tokenize_prompt(bos_tok, "<s>" + f"{H} a{A}", 100).count(bos) == 1
    # a user error naming the config key the budget comes from (issue 9 item 11)
    with pytest.raises(
        ConfigError, match=r"^data\.max_prompt_tokens: must be at least 2 \(the tokenizer puts 1 "
    ):
        tokenize_prompt(bos_tok, prompt, 1)


def test_response_truncation_and_eos(tok) -> None:
    eos = tok.eos_token_id
    ids, truncated = tokenize_response(tok, " Paris.", 100, context=f"{H} q{A}")
    assert ids == [*encode(tok, " Paris."), eos] and not truncated
    long = " " + " ".join(["bread"] * 50)
    ids, truncated = tokenize_response(tok, long, 10)
    assert ids == encode(tok, long)[:10] and truncated and eos not in ids  # truncated: no EOS
    n = len(encode(tok, " Paris."))
    ids, truncated = tokenize_response(tok, " Paris.", n)  # no room for EOS: counts as truncated
    assert ids == encode(tok, " Paris.") and truncated
    ids, _ = tokenize_response(tok, " Paris.", 100, add_eos=False)
    assert ids == encode(tok, " Paris.")


def test_a_tokenizer_without_eos_is_a_user_error(tmp_path: Path) -> None:
    no_eos = AutoTokenizer.from_pretrained(make_tiny_tokenizer(tmp_path))
    no_eos.eos_token = None
    with pytest.raises(
        UserError, match=r"^the tokenizer .*tiny-tokenizer has no EOS token to end responses with; add "
    ):
        tokenize_response(no_eos, " Paris.", 100)
    assert tokenize_response(no_eos, " Paris.", 100, add_eos=False)[0] == encode(no_eos, " Paris.")


def test_tokenize_pair(tok) -> None:
    pair = PreferencePair(dialogue(4) + f"{H} last{A}", " Paris.", " " + " ".join(["bread"] * 60))
    stats = LoadStats()
    f = tokenize_pair(tok, pair, 40, 20, stats)
    assert len(f["prompt_ids"]) <= 40 and tok.decode(f["prompt_ids"]).endswith(f"{H} last{A}")
    assert f["chosen_ids"] == [*encode(tok, " Paris."), tok.eos_token_id] and not f["chosen_truncated"]
    assert len(f["rejected_ids"]) == 20 and f["rejected_truncated"]
    assert (stats.truncated_prompts, stats.truncated_responses) == (1, 1)
    # untruncated, prompt + response ids are the ids of the whole dialogue (byte-level BPE, no boundary merge)
    g = tokenize_pair(tok, PreferencePair(f"{H} q{A}", " Paris.", " Rome."), None, None)
    assert g["prompt_ids"] + g["chosen_ids"][:-1] == encode(tok, f"{H} q{A} Paris.")


def test_tokenize_sft_labels_only_on_assistant_turns(tok) -> None:
    segs = [(f"{H} a{A}", False), (" b", True), (f"{H} c{A}", False), (" d", True)]
    ex = SFTExample(f"{H} a{A} b{H} c{A}", " d", segs)
    out = tokenize_sft(tok, ex, None, None)
    pieces = [encode(tok, s) for s, _ in segs]
    assert out["input_ids"] == [t for p in pieces for t in p] + [tok.eos_token_id]
    expected_labels = []
    for p, (_, flag) in zip(pieces, segs, strict=True):
        expected_labels += p if flag else [IGNORE_INDEX] * len(p)
    assert out["labels"] == [*expected_labels, tok.eos_token_id]
    assert out["prompt_length"] == len(out["input_ids"]) - len(pieces[3]) - 1


def test_tokenize_sft_truncates_context_at_turn_starts_then_tokens(tok) -> None:
    segs = []
    for k in range(5):
        segs += [
            (f"{H} question number {k} about bread{A}", False),
            (f" answer number {k} about France", True),
        ]
    ex = SFTExample("".join(s for s, _ in segs[:-1]), segs[-1][0], segs)
    ctx_pieces = [encode(tok, s) for s, _ in segs[:-1]]
    budget = sum(len(p) for p in ctx_pieces[-3:])  # the last human-assistant-human triple fits exactly
    stats = LoadStats()
    out = tokenize_sft(tok, ex, budget, 100, stats)
    ids, labels = out["input_ids"], out["labels"]
    assert out["prompt_length"] == budget and stats.truncated_prompts == 1
    assert ids[:budget] == [t for p in ctx_pieces[-3:] for t in p]
    assert labels[: len(ctx_pieces[-3])] == [IGNORE_INDEX] * len(ctx_pieces[-3])
    assert labels[len(ctx_pieces[-3]) : len(ctx_pieces[-3]) + len(ctx_pieces[-2])] == ctx_pieces[-2]
    # a budget smaller than the last human turn: token cut from the left, flags kept per token
    out = tokenize_sft(tok, ex, 5, 100, stats)
    assert out["input_ids"][:5] == ctx_pieces[-1][-5:] and out["labels"][:5] == [IGNORE_INDEX] * 5
    assert stats.notes["prompt cut inside its latest turn (no whole-turn cut fits)"] == 1


def test_sentencepiece_style_tokenizer_gets_no_spurious_word_start_at_boundaries(tmp_path: Path) -> None:
    tok = AutoTokenizer.from_pretrained(make_tiny_tokenizer(tmp_path, style="metaspace"))
    segs = [(f"{H} a{A}", False), (" b", True), (f"{H} c{A}", False), (" d", True)]
    ex = SFTExample(f"{H} a{A} b{H} c{A}", " d", segs)
    whole = encode(tok, "".join(s for s, _ in segs))
    naive = [t for s, _ in segs for t in encode(tok, s)]
    assert naive != whole  # the tokenizer prepends a word-start marker to every string it encodes
    out = tokenize_sft(tok, ex, None, None, add_eos=False)
    assert out["input_ids"] == whole
    pair = tokenize_pair(tok, PreferencePair(f"{H} q{A}", "Paris", " Rome"), None, None, add_eos=False)
    assert pair["prompt_ids"] + pair["chosen_ids"] == encode(tok, f"{H} q{A}Paris")
    assert pair["prompt_ids"] + pair["rejected_ids"] == encode(tok, f"{H} q{A} Rome")


def test_chat_template_text_is_tokenised_with_its_special_tokens(tmp_path: Path) -> None:
    tok = AutoTokenizer.from_pretrained(make_tiny_tokenizer(tmp_path, chat_template=CHATML_TEMPLATE))
    tok.eos_token = "<|im_end|>"
    prompt = "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"
    f = tokenize_pair(tok, PreferencePair(prompt, "yes<|im_end|>", "no<|im_end|>"), None, None)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    start = tok.convert_tokens_to_ids("<|im_start|>")
    assert f["prompt_ids"][0] == start and f["prompt_ids"].count(end) == 1
    # the response already ends with the EOS string: no second EOS appended
    assert f["chosen_ids"][-1] == end and f["chosen_ids"].count(end) == 1
    ids = tokenize_prompt(tok, prompt * 6, 20, turn_marker="<|im_start|>user")
    assert ids == encode(tok, prompt)
