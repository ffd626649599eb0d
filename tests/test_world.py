"""hh-mini world: gold reward behaviour, annotators, corpora formats, splits, determinism, judge."""

from __future__ import annotations

import importlib
import json
import random
from itertools import pairwise
from pathlib import Path

import pytest

from ppomax.demo.world import (
    HARMLESS_KINDS,
    HELPFUL_KINDS,
    AnnotatorConfig,
    WorldConfig,
    build_world,
    lexicon,
    load_world,
    prefer_a_probability,
    write_world,
)
from ppomax.demo.world.corpora import pair_stats, preference_pairs
from ppomax.demo.world.responses import apply_pad, make_response
from ppomax.demo.world.text import fluency, sentences, words

SMALL = dict(
    n_pretrain=400,
    n_sft_train=200,
    n_sft_valid=50,
    n_prefs_train=300,
    n_prefs_valid=50,
    n_prefs_test=100,
    n_prompts_train=100,
    n_prompts_valid=40,
    n_prompts_test=120,
)


@pytest.fixture(scope="module")
def world():
    return build_world(WorldConfig(seed=3))


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("hhmini")
    w = build_world(WorldConfig(seed=5, **SMALL))
    write_world(w, out)
    return w, out


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _prompt(req) -> str:
    return f"\n\nHuman: {req.text}\n\nAssistant:"


def _requests(world, harmful: bool, n: int = 60, split: str = "train"):
    pool = [r for r in world.requests if r.harmful == harmful and r.split == split]
    rng = random.Random(0)
    # every task appears: take some of each
    by_task: dict[str, list] = {}
    for r in pool:
        by_task.setdefault(r.task, []).append(r)
    picked = [r for rs in by_task.values() for r in rng.sample(rs, min(len(rs), max(1, n // len(by_task))))]
    return picked


def _gold(world, req, text: str) -> float:
    return world.gold_reward([_prompt(req)], [text])[0]


# -- gold reward on each response kind ---------------------------------------------------------------------------


def test_gold_ranks_helpful_kinds(world):
    rng = random.Random(1)
    for req in _requests(world, harmful=False):
        g = {
            k: _gold(
                world,
                req,
                make_response(req, k, rng, n_pad=2 if k == "correct_verbose" else 0, paraphrase=0.0),
            )
            for k in HELPFUL_KINDS
        }
        assert g["correct_concise"] == pytest.approx(1.0), req.text
        assert g["correct_concise"] > g["correct_verbose"] > g["wrong"], (req.text, g)
        assert g["wrong"] < 0 and g["off_topic"] < 0, (req.text, g)
        assert g["over_refusal"] < 0 and g["over_refusal"] < g["correct_verbose"], (req.text, g)
        assert g["repetitive_filler"] < g["correct_concise"], (req.text, g)


def test_gold_ranks_harmless_kinds(world):
    rng = random.Random(2)
    for req in _requests(world, harmful=True):
        texts = {k: make_response(req, k, rng) for k in HARMLESS_KINDS}
        g = {k: _gold(world, req, t) for k, t in texts.items()}
        assert g["polite_refusal"] == pytest.approx(1.0) == max(g.values()), (req.text, g)
        assert g["harmful_compliance"] <= -1.0 and g["harmful_compliance"] == min(g.values()), (req.text, g)
        # compliance stays worst even against junk, and even when wrapped in a refusal
        assert _gold(world, req, "xq zzv blorp") > g["harmful_compliance"]
        assert _gold(world, req, lexicon.BARE_REFUSALS[0] + " " + req.compliance) <= -1.0
        assert _gold(world, req, lexicon.BARE_REFUSALS[0]) == pytest.approx(0.8)  # not polite


def test_repetition_is_penalised_beyond_length(world):
    """Same content, same number of words: a repeated pleasantry scores below distinct ones."""
    for req in _requests(world, harmful=False, n=20) + _requests(world, harmful=True, n=10):
        base = req.concise
        distinct = apply_pad(base, ("", list(lexicon.PAD_SUFFIXES[:3])))
        repeated = apply_pad(base, ("", [lexicon.PAD_SUFFIXES[0]] * 3))
        assert len(words(distinct)) >= len(words(repeated))
        assert _gold(world, req, repeated) < _gold(world, req, distinct) - 0.3
        echo = " ".join([base] * 4)
        assert _gold(world, req, echo) < _gold(world, req, base) - 0.8


@pytest.mark.parametrize("harmful", [False, True])
def test_longer_padding_is_monotonically_worse(world, harmful):
    for req in _requests(world, harmful=harmful, n=20):
        golds = [
            _gold(world, req, apply_pad(req.concise, ("", list(lexicon.PAD_SUFFIXES[:n])))) for n in range(7)
        ]
        assert all(a > b for a, b in pairwise(golds)), (req.text, golds)
        assert golds[0] == pytest.approx(1.0)


# -- gold reward on free text ---------------------------------------------------------------------------------


def test_gold_credits_paraphrases_and_rejects_junk(world):
    person = next(p for p in world.people if p.split == "test")
    q = f"\n\nHuman: Where does {person.name} live?\n\nAssistant:"
    other_town = next(t for t in world.towns if t != person.town)
    other_person = next(p for p in world.people if p.name != person.name)
    cases = {
        f"{person.first} lives in {person.town}.": 1.0,
        f"She lives in {person.town}.": 1.0,
        f"{person.town}.": 1.0,
        f"{person.name.lower()} lives in {person.town.lower()}": 0.9,  # unfinished sentence: -0.1
        f"{person.name} lives in the town of {person.town}.": 0.91,  # 3 needless words
    }
    for text, want in cases.items():
        assert world.gold_reward([q], [text])[0] == pytest.approx(want), text
    wrong = world.gold_reward([q], [f"{person.name} lives in {other_town}."])[0]
    hedge = world.gold_reward([q], [f"{person.name} lives in {person.town} or {other_town}."])[0]
    about_other = world.gold_reward([q], [f"{other_person.name} lives in {person.town}."])[0]
    assert wrong == pytest.approx(-0.4) and about_other == pytest.approx(-0.4)
    assert wrong < hedge < 0.5
    # junk, even junk that contains the answer word, scores below a wrong answer
    rng = random.Random(0)
    vocab = sorted({w for s in lexicon.PAD_SUFFIXES + lexicon.SMALL_TALK for w in words(s)})
    for _ in range(20):
        salad = " ".join(rng.choice(vocab) for _ in range(rng.randint(4, 12)))
        assert world.gold_reward([q], [salad])[0] < -0.5, salad
    assert world.gold_reward([q], [f"{person.town} {person.town} dog the seven"])[0] < wrong
    assert world.gold_reward([q], ["qzx vvlorp trask!!"])[0] < -1.0
    assert world.gold_reward([q], [""])[0] == -1.0


def test_gold_arithmetic_and_sequences_free_text(world):
    ask = "\n\nHuman: What is {}?\n\nAssistant:"
    assert world.gold_reward([ask.format("7 plus 5")], ["The answer is twelve."])[0] == pytest.approx(1.0)
    assert world.gold_reward([ask.format("7 plus 5")], ["7 plus 5 is 13."])[0] == pytest.approx(-0.4)
    # the answer may equal an operand; repeating the question is not a claim
    assert world.gold_reward([ask.format("2 minus 1")], ["2 minus 1 is 1."])[0] == pytest.approx(1.0)
    assert world.gold_reward([ask.format("2 minus 1")], ["1."])[0] == pytest.approx(1.0)
    assert world.gold_reward([ask.format("2 minus 1")], ["2 minus 1 is 0."])[0] == pytest.approx(-0.4)
    after = "\n\nHuman: What comes after Monday?\n\nAssistant:"
    assert world.gold_reward([after] * 3, ["It is Tuesday.", "Tuesday.", "After Monday comes Monday."]) == [
        pytest.approx(1.0),
        pytest.approx(1.0),
        pytest.approx(-0.4),
    ]
    lst = "\n\nHuman: List three colours.\n\nAssistant:"
    got = world.gold_reward([lst] * 3, ["Red, blue and green.", "Red and blue.", "Red, red and blue."])
    assert got[0] == pytest.approx(1.0) and got[1] < 0 and got[2] < 0


def test_unknown_prompt_gets_style_terms_only(world):
    q = "\n\nHuman: What is the capital of France?\n\nAssistant:"
    assert world.find(q) is None
    concise, padded = world.gold_reward([q, q], ["I like sunny days.", "I like sunny days. " * 5])
    assert concise == pytest.approx(0.0) and padded < -0.5


def test_world_text_is_fluent_and_markers_are_exclusive(world):
    rng = random.Random(4)
    for req in random.Random(0).sample(world.requests, 150):
        for kind in HARMLESS_KINDS if req.harmful else HELPFUL_KINDS:
            s, fin = sentences(world.response(req, kind, rng))
            assert fluency(s, fin, world.grammar, world.classes) == 1.0, (req.text, kind)
    markers = {m for h in lexicon.HARMFUL for m in h[3]}
    innocent = [
        *lexicon.POLITE_REFUSALS,
        *lexicon.BARE_REFUSALS,
        *lexicon.PAD_PREFIXES,
        *lexicon.PAD_SUFFIXES,
        *lexicon.SMALL_TALK,
        *(r.concise for r in world.requests),
    ]
    assert not markers & {w for t in innocent for w in words(t)}


# -- annotators -------------------------------------------------------------------------------------------------


def test_annotators_agree_with_gold_yet_prefer_length():
    w = build_world(WorldConfig(seed=11))
    _, labels = preference_pairs(w, "train", 4000)
    decided = [x for x in labels if x["gold_chosen"] != x["gold_rejected"]]
    agreement = sum(x["gold_agrees"] for x in decided) / len(decided)
    minimal = [x for x in decided if x["pair_type"] == "minimal"]
    assert 0.72 <= agreement <= 0.88, agreement
    assert sum(x["gold_agrees"] for x in minimal) / len(minimal) > 0.97
    # style pairs without repetition: same content, gold always prefers the shorter one ...
    style = [
        x
        for x in labels
        if x["pair_type"] == "style" and "repetitive_filler" not in (x["chosen_kind"], x["rejected_kind"])
    ]
    differ = [x for x in style if x["gold_chosen"] != x["gold_rejected"]]
    assert len(differ) > 0.9 * len(style)
    assert all(
        (x["gold_chosen"] > x["gold_rejected"]) == (x["chosen_words"] < x["rejected_words"]) for x in differ
    )
    # ... yet the annotators choose the longer one most of the time (the RM bias of paper 4.3)
    unequal = [x for x in style if x["chosen_words"] != x["rejected_words"]]
    longer = sum(x["chosen_words"] > x["rejected_words"] for x in unequal) / len(unequal)
    assert 0.53 <= longer <= 0.75, longer
    stats = pair_stats(labels)
    assert stats["padding_preferred"] == pytest.approx(longer, abs=1e-4)
    assert stats["gold_agreement"] == pytest.approx(agreement, abs=1e-4)
    assert stats["repetition_rejected"] > 0.7
    # no length bias -> they choose the shorter one
    w0 = build_world(WorldConfig(seed=11, annotator=AnnotatorConfig(length_bias=0.0)))
    _, labels0 = preference_pairs(w0, "train", 2000)
    style0 = [
        x
        for x in labels0
        if x["pair_type"] == "style" and "repetitive_filler" not in (x["chosen_kind"], x["rejected_kind"])
    ]
    assert sum(x["chosen_words"] > x["rejected_words"] for x in style0) / len(style0) < 0.3


def test_bradley_terry_probability():
    cfg = AnnotatorConfig(beta=2.0, noise=0.0, length_bias=0.5)
    # u_a - u_b = (1.0 - 0.4) + 0.5 * (10 - 10) / 10 = 0.6 -> sigmoid(1.2)
    assert prefer_a_probability(1.0, 10, 0.4, 10, cfg) == pytest.approx(1 / (1 + 2.718281828459045**-1.2))
    # 20 extra words buy 1.0 of utility
    assert prefer_a_probability(0.0, 30, 1.0, 10, cfg) == pytest.approx(0.5)


# -- files ---------------------------------------------------------------------------------------------------------


def test_files_are_hh_compatible(written):
    w, out = written
    for split in ("train", "valid", "test"):
        pairs = _rows(out / f"prefs_{split}.jsonl")
        labels = _rows(out / f"gold_labels_{split}.jsonl")
        assert len(pairs) == len(labels) == {"train": 300, "valid": 50, "test": 100}[split]
        for pair, lab in zip(pairs, labels, strict=True):
            assert set(pair) == {"chosen", "rejected"}
            cut_c = pair["chosen"].rindex("\n\nAssistant:") + len("\n\nAssistant:")
            cut_r = pair["rejected"].rindex("\n\nAssistant:") + len("\n\nAssistant:")
            prompt = pair["chosen"][:cut_c]
            assert prompt == pair["rejected"][:cut_r] and prompt.startswith("\n\nHuman: ")
            a, b = pair["chosen"][cut_c:], pair["rejected"][cut_r:]
            assert a.startswith(" ") and b.startswith(" ") and a != b
            ga, gb = w.gold_reward([prompt, prompt], [a[1:], b[1:]])
            assert ga == pytest.approx(lab["gold_chosen"], abs=1e-6) and gb == pytest.approx(
                lab["gold_rejected"], abs=1e-6
            )
            assert lab["gold_agrees"] == (ga > gb) and lab["subset"] in ("helpful", "harmless")
        prompts = _rows(out / f"prompts_{split}.jsonl")
        assert prompts and all(set(p) == {"prompt", "subset"} for p in prompts)
        assert all(
            p["prompt"].endswith("\n\nAssistant:") and p["prompt"].startswith("\n\nHuman: ") for p in prompts
        )
        assert all(w.find(p["prompt"]).subset == p["subset"] for p in prompts)
        assert {p["subset"] for p in prompts} == {"helpful", "harmless"}
    for split in ("train", "valid"):
        for ex in _rows(out / f"sft_{split}.jsonl"):
            assert set(ex) == {"prompt", "response"} and ex["prompt"].endswith("\n\nAssistant:")
            assert ex["response"].startswith(" ") and ex["response"].strip()
    pre = _rows(out / "pretrain.jsonl")
    assert len(pre) == 400 and all(set(r) == {"text"} and r["text"] for r in pre)
    meta = json.loads((out / "world.json").read_text())
    assert meta["format"] == "ppomax.hh-mini/1" and 0.5 < meta["stats"]["prefs_train"]["gold_agreement"] < 1


def test_sft_is_mostly_good(written):
    w, out = written
    rows = _rows(out / "sft_train.jsonl")
    labels = [w.gold_details(r["prompt"], r["response"])["label"] for r in rows]
    good = sum(lab in ("correct", "refusal") for lab in labels) / len(labels)
    assert 0.78 <= good <= 0.95, good


def test_splits_hold_out_test_entities(written):
    w, out = written
    test_people = [p for p in w.people if p.split == "test"]
    assert test_people
    test_prompts = [r["prompt"] for r in _rows(out / "prompts_test.jsonl")]
    reqs = [w.find(p) for p in test_prompts]
    assert all(r.split == "test" for r in reqs if r.task != "list")
    assert len({r.key for r in reqs}) >= 0.8 * len(reqs)  # mostly distinct requests
    train_text = "".join(
        (out / f).read_text() for f in ("sft_train.jsonl", "prefs_train.jsonl", "prompts_train.jsonl")
    )
    for p in test_people:
        assert p.name not in train_text
    assert any(p.name in (out / "pretrain.jsonl").read_text() for p in test_people)  # facts known to the LM
    test_arith = {r.text for r in reqs if r.task in ("plus", "minus")}
    assert test_arith and not any(t in train_text for t in test_arith)


def test_deterministic_bytes(tmp_path, written):
    _, out = written
    write_world(build_world(WorldConfig(seed=5, **SMALL)), tmp_path / "again")
    for f in sorted(out.iterdir()):
        assert (tmp_path / "again" / f.name).read_bytes() == f.read_bytes(), f.name
    write_world(build_world(WorldConfig(seed=6, **SMALL)), tmp_path / "other")
    assert (tmp_path / "other" / "sft_train.jsonl").read_bytes() != (out / "sft_train.jsonl").read_bytes()


def test_world_json_rebuilds_the_gold_reward(written, monkeypatch):
    w, out = written
    prompts = [r["prompt"] for r in _rows(out / "prompts_valid.jsonl")][:20]
    responses = [w.response(w.find(p), "correct_verbose", random.Random(i)) for i, p in enumerate(prompts)]
    expected = w.gold_reward(prompts, responses)
    assert load_world(out).gold_reward(prompts, responses) == expected
    # the programmatic PPO reward, found the way the trainer finds it ("module:function")
    fn = importlib.import_module("ppomax.demo.world.reward").gold
    assert fn(prompts, responses, world=str(out)) == expected
    assert fn(prompts, responses, world=str(out / "world.json")) == expected
    monkeypatch.setenv("PPOMAX_WORLD", str(out))
    assert fn(prompts, responses) == expected
    monkeypatch.delenv("PPOMAX_WORLD")
    monkeypatch.setenv("PPOMAX_WORLD_SEED", "5")  # same KB as seed 5 (corpus sizes do not matter)
    assert fn(prompts, responses) == expected
    with pytest.raises(TypeError, match="wrold"):
        fn(prompts, responses, wrold=str(out))
    with pytest.raises(FileNotFoundError, match=r"world\.json"):
        fn(prompts, responses, world=str(out / "missing"))


def test_invalid_kinds_and_config():
    w = build_world(WorldConfig(seed=0, n_people=10))
    helpful = next(r for r in w.requests if not r.harmful)
    harmful = next(r for r in w.requests if r.harmful)
    with pytest.raises(ValueError, match="harmful request"):
        make_response(helpful, "harmful_compliance", random.Random(0))
    with pytest.raises(ValueError, match="over_refusal"):
        make_response(harmful, "over_refusal", random.Random(0))
    with pytest.raises(ValueError, match="unknown response kind"):
        make_response(helpful, "sarcastic", random.Random(0))
    with pytest.raises(ValueError, match="harmful_fraction"):
        WorldConfig(harmful_fraction=1.5)
    assert WorldConfig.from_dict(WorldConfig(seed=9).to_dict()) == WorldConfig(seed=9)


# -- judge -----------------------------------------------------------------------------------------------------------


def test_gold_judge_counts_hand_made_case(world):
    """The gold judge is the one win/tie/lose of ppomax.evaluate applied to gold rewards (the world has no
    second implementation): subsets from the world's requests, ties within the margin."""
    from ppomax.evaluate import win_tie_lose

    h1, h2 = [r for r in world.requests if r.task == "kb_town" and r.split == "test"][:2]
    harm = [r for r in world.requests if r.harmful and r.split == "test"][:2]
    prompts = [_prompt(r) for r in (h1, h2, *harm)]
    subsets = [world.find(p).subset for p in prompts]
    assert subsets == ["helpful", "helpful", "harmless", "harmless"]
    wrong1 = make_response(h1, "wrong", random.Random(0), paraphrase=0.0)
    a = [h1.concise, h2.concise + " I hope this helps.", harm[0].concise, harm[1].compliance]
    b = [wrong1, h2.concise, harm[0].compliance, harm[1].concise]
    # gold A: 1, 0.88 (4 words of padding at 0.03), 1, -1 ; B: -0.4, 1, -1, 1
    ga, gb = world.gold_reward(prompts, a), world.gold_reward(prompts, b)
    assert ga == pytest.approx([1.0, 0.88, 1.0, -1.0])
    assert gb == pytest.approx([-0.4, 1.0, -1.0, 1.0])
    res = win_tie_lose(ga, gb, subsets, tie_margin=0.15)
    assert (res["overall"]["win"], res["overall"]["tie"], res["overall"]["lose"]) == (2, 1, 1)
    assert (res["helpful"]["win"], res["helpful"]["tie"], res["helpful"]["lose"]) == (1, 1, 0)
    assert (res["harmless"]["win"], res["harmless"]["tie"], res["harmless"]["lose"]) == (1, 0, 1)
    assert res["overall"]["win_rate"] == pytest.approx(0.5)
    assert res["helpful"]["tie_rate"] == pytest.approx(0.5)
    assert res["helpful"]["mean_a"] == pytest.approx((1.0 + 0.88) / 2)
    # a strict margin turns the padded tie into a loss
    strict = win_tie_lose(ga, gb, subsets, tie_margin=0.0)
    assert strict["helpful"]["lose"] == 1 and strict["helpful"]["tie"] == 0
