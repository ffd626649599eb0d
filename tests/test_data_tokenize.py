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
    load_preference_pairs,
    load_sft_examples,
    special_prefix,
    tokenize_pair,
    tokenize_prompt,
    tokenize_response,
    tokenize_sft,
)
from ppomax.errors import ConfigError, UserError
from tiny_lm import write_jsonl

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


def test_left_truncation_cuts_inside_the_latest_turn_under_its_marker_when_it_alone_is_too_long(tok) -> None:
    prompt = f"{H} old{A} old answer{H} {' '.join(['bread'] * 200)}{A}"
    stats = LoadStats()
    ids = tokenize_prompt(tok, prompt, 50, stats)
    # an independent search: the most words of the latest turn that fit under its markers
    k = max(k for k in range(200) if len(encode(tok, f"{H} {' '.join(['bread'] * k)}{A}")) <= 50)
    assert k > 10 and ids == encode(tok, f"{H} {' '.join(['bread'] * k)}{A}")
    assert stats.truncated_prompts == 1 and stats.dropped_turns == 2
    assert stats.prompt_cuts == {"lost their oldest turns": 1, "cut inside their latest user turn": 1}


def test_hh_text_before_the_first_turn_is_kept_when_old_turns_are_dropped(tok) -> None:
    """The system text of an HH prompt (before its first marker) was dropped with the oldest turn."""
    prompt = "Be brief." + dialogue(4) + f"{H} last{A}"
    kept = "Be brief." + dialogue(4)[dialogue(4).index(f"{H} question number 3") :] + f"{H} last{A}"
    stats = LoadStats()
    assert tokenize_prompt(tok, prompt, len(encode(tok, kept)), stats) == encode(tok, kept)
    assert (stats.dropped_turns, stats.prompt_cuts) == (6, {"lost their oldest turns": 1})


def test_bos_is_kept_in_front_and_counted_in_the_budget(bos_tok) -> None:
    bos = bos_tok.bos_token_id
    assert special_prefix(bos_tok) == [bos]
    prompt = dialogue(5) + f"{H} last{A}"
    ids = tokenize_prompt(bos_tok, prompt, 30)
    assert ids[0] == bos and ids.count(bos) == 1 and len(ids) <= 30
    # a text that already starts with the BOS string (chat templates write it) gets no second one
    assert tokenize_prompt(bos_tok, "<s>" + f"{H} a{A}", 100).count(bos) == 1
    # a user error naming the config key the budget comes from
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
    assert stats.prompt_cuts == {"lost their oldest turns": 1} and stats.dropped_turns == 6
    # a budget smaller than the last human turn: its text is cut from the left, under its markers
    stats = LoadStats()
    budget = len(encode(tok, f"{H} about bread{A}"))
    out = tokenize_sft(tok, ex, budget, 100, stats)
    assert out["input_ids"][: out["prompt_length"]] == encode(tok, f"{H} about bread{A}")
    assert out["labels"][: out["prompt_length"]] == [IGNORE_INDEX] * budget
    assert stats.prompt_cuts == {"lost their oldest turns": 1, "cut inside their latest user turn": 1}
    # a budget that does not hold the markers themselves is a config error
    with pytest.raises(
        ConfigError,
        match=r"^data\.max_prompt_tokens: 5 is too small for the chat format's role headers and assistant cue: a "
        r"prompt cut to the last character of its latest turn takes \d+ tokens$",
    ):
        tokenize_sft(tok, ex, 5, 100)


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
    # text given as a string that is not an HH dialogue has no turns to drop: its latest tokens are kept
    stats = LoadStats()
    assert tokenize_prompt(tok, prompt * 6, 20, stats) == encode(tok, prompt * 6)[-20:]
    assert stats.prompt_cuts == {"cut by tokens (not a dialogue)": 1}


# ---------------------------------------------------------------------------------------------------------------
# prompts in a chat template are cut at its turns, re-rendered, system turn and role headers kept

SYSTEM = "You are brief."


@pytest.fixture(scope="module")
def chat_tok(tmp_path_factory: pytest.TempPathFactory):
    tok = AutoTokenizer.from_pretrained(
        make_tiny_tokenizer(tmp_path_factory.mktemp("chat"), chat_template=CHATML_TEMPLATE)
    )
    tok.eos_token = "<|im_end|>"
    return tok


def chat(system: str | None = SYSTEM, exchanges: int = 3, last: str = "the final question") -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system is not None else []
    for k in range(exchanges):
        msgs += [
            {"role": "user", "content": f"question number {k} about bread"},
            {"role": "assistant", "content": f"answer number {k} about France"},
        ]
    return [*msgs, {"role": "user", "content": last}]


def render(tok, msgs: list[dict]) -> str:
    """The template's own rendering, independent of ppomax."""
    return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def chat_pair(tok, tmp_path: Path, msgs: list[dict]) -> PreferencePair:
    record = {"prompt": msgs, "chosen": [{"role": "assistant", "content": "yes"}], "rejected": [ASST_NO]}
    (pair,) = load_preference_pairs(
        write_jsonl(tmp_path / "p.jsonl", [record]), format="chat_template", tokenizer=tok
    )
    return pair


ASST_NO = {"role": "assistant", "content": "no"}


def test_chat_template_prompts_lose_their_oldest_turns_and_keep_the_system_turn(chat_tok, tmp_path) -> None:
    msgs = chat()
    keep = [msgs[0], *msgs[-3:]]  # the system turn, the last exchange, the final question
    budget = len(encode(chat_tok, render(chat_tok, keep)))
    assert len(encode(chat_tok, render(chat_tok, [msgs[0], *msgs[-5:]]))) > budget  # no room for one more
    stats = LoadStats()
    f = tokenize_pair(chat_tok, chat_pair(chat_tok, tmp_path, msgs), budget, None, stats)
    assert f["prompt_ids"] == encode(chat_tok, render(chat_tok, keep))
    assert (stats.truncated_prompts, stats.dropped_turns) == (1, 4)
    assert stats.prompt_cuts == {"lost their oldest turns": 1}
    assert "truncated prompts 1 (1 lost their oldest turns, 4 turns dropped in all)" in stats.summary()


def test_a_chat_template_turn_too_long_alone_is_cut_inside_its_content(chat_tok, tmp_path) -> None:
    msgs = chat(exchanges=1, last=" ".join(["bread"] * 100))
    budget = 60
    stats = LoadStats()
    f = tokenize_pair(chat_tok, chat_pair(chat_tok, tmp_path, msgs), budget, None, stats)

    def kept(k: int) -> list[int]:  # the system turn and k words of the latest turn, rendered by the template
        return encode(
            chat_tok, render(chat_tok, [msgs[0], {"role": "user", "content": " ".join(["bread"] * k)}])
        )

    k = max(k for k in range(100) if len(kept(k)) <= budget)
    assert k > 5 and f["prompt_ids"] == kept(k)
    assert stats.prompt_cuts == {"lost their oldest turns": 1, "cut inside their latest user turn": 1}
    assert "1 cut inside their latest user turn" in stats.summary()


def test_a_system_turn_too_long_alone_is_cut_from_its_left(chat_tok, tmp_path) -> None:
    msgs = chat(system=" ".join(["France"] * 100), exchanges=1, last="bread")
    stats = LoadStats()
    f = tokenize_pair(chat_tok, chat_pair(chat_tok, tmp_path, msgs), 50, None, stats)

    def kept(k: int) -> list[int]:  # k words of the system turn and the whole latest turn
        system = {"role": "system", "content": " ".join(["France"] * k)}
        return encode(chat_tok, render(chat_tok, [system, msgs[-1]]))

    k = max(k for k in range(100) if len(kept(k)) <= 50)
    assert k > 5 and f["prompt_ids"] == kept(k)
    assert stats.prompt_cuts == {"lost their oldest turns": 1, "cut inside their system turn": 1}
    # the latest turn too long as well: the system turn is emptied and the latest turn cut
    msgs = chat(system=" ".join(["France"] * 100), exchanges=0, last=" ".join(["bread"] * 100))
    stats = LoadStats()
    f = tokenize_pair(chat_tok, chat_pair(chat_tok, tmp_path, msgs), 50, None, stats)

    def latest(k: int) -> list[int]:
        user = {"role": "user", "content": " ".join(["bread"] * k)}
        return encode(chat_tok, render(chat_tok, [{"role": "system", "content": ""}, user]))

    k = max(k for k in range(100) if len(latest(k)) <= 50)
    assert k > 5 and f["prompt_ids"] == latest(k)
    assert stats.prompt_cuts == {"cut inside their system turn": 1, "cut inside their latest user turn": 1}


def test_sft_chat_context_loses_its_oldest_turns_and_trains_on_the_kept_assistant_turns(
    chat_tok, tmp_path
) -> None:
    msgs = [*chat(), {"role": "assistant", "content": "the final answer"}]
    path = write_jsonl(tmp_path / "sft.jsonl", [{"messages": msgs}])
    (ex,) = load_sft_examples(path, format="chat_template", tokenizer=chat_tok)
    keep = [msgs[0], *msgs[-4:-1]]  # the system turn, the last exchange, the final question
    budget = len(encode(chat_tok, render(chat_tok, keep)))
    stats = LoadStats()
    out = tokenize_sft(chat_tok, ex, budget, None, stats)
    assert out["input_ids"][: out["prompt_length"]] == encode(chat_tok, render(chat_tok, keep))
    trained = [t for t, label in zip(out["input_ids"], out["labels"], strict=True) if label != IGNORE_INDEX]
    assert chat_tok.decode(trained) == "answer number 2 about France<|im_end|>the final answer<|im_end|>"
    assert (stats.dropped_turns, stats.prompt_cuts) == (4, {"lost their oldest turns": 1})
