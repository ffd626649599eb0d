"""The corpora of an hh-mini world and the files :func:`write_world` produces.

Files (JSON lines, one object per line, UTF-8, keys in a fixed order):

* ``pretrain.jsonl``: ``{"text"}``. Plain statements about *every* entity of every split (bios, sums, sequences,
  lists) plus HH dialogues of all response kinds (good and bad alike, like Q&A on the web) on requests of every
  split (``pretrain_heldout_dialogues``; train requests only when False), so the base LM knows the language and
  the facts the test prompts ask about. SFT, preference pairs and PPO prompts never use valid/test requests.
* ``sft_train.jsonl`` / ``sft_valid.jsonl``: ``{"prompt", "response"}``; ``prompt`` ends in
  ``"\\n\\nAssistant:"`` and ``response`` starts with a space, so ``prompt + response`` is the HH dialogue.
  Mostly correct concise answers / polite refusals; ``sft_noise`` of them verbose, wrong, over-refusing or
  (harmful prompts) complying.
* ``prefs_{train,valid,test}.jsonl``: HH-RLHF pairs ``{"chosen", "rejected"}``, full dialogues sharing the prompt
  up to the last ``"\\n\\nAssistant:"``; chosen = the simulated annotators' choice (:mod:`.annotate`).
* ``gold_labels_{train,valid,test}.jsonl``: per pair, line-aligned with the prefs file: ``{"subset",
  "pair_type", "chosen_kind", "rejected_kind", "gold_chosen", "gold_rejected", "gold_agrees", "chosen_words",
  "rejected_words"}`` where ``gold_agrees`` says whether the gold reward also prefers the annotators' choice.
* ``prompts_{train,valid,test}.jsonl``: ``{"prompt", "subset"}`` with subset ``helpful`` or ``harmless``.
* ``world.json``: ``{"format", "config", "stats"}``; ``load_world(dir)`` rebuilds the world (and its gold reward).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from . import lexicon as lx
from .annotate import annotate
from .kb import SPLITS, Request, join_items
from .responses import apply_pad, correct_answer, pad, pad_parts, repetitive, wrong_answer
from .text import words
from .world import World

# Kind mixtures. Pretraining shows everything; preference pairs are built to teach a reward model correctness,
# harmlessness and (through the annotators) a taste for length.
PRETRAIN_KINDS = {
    "helpful": (
        ("correct_concise", 35),
        ("correct_verbose", 20),
        ("wrong", 15),
        ("off_topic", 10),
        ("over_refusal", 8),
        ("repetitive_filler", 12),
    ),
    "harmless": (
        ("polite_refusal", 35),
        ("correct_verbose", 10),
        ("harmful_compliance", 35),
        ("off_topic", 10),
        ("repetitive_filler", 10),
    ),
}
PAIR_KINDS = {  # for "mixed" pairs; padding is added independently of the kind (see _mixed_response)
    "helpful": (
        ("correct_concise", 3),
        ("wrong", 3),
        ("off_topic", 1),
        ("over_refusal", 1.5),
        ("repetitive_filler", 1),
    ),
    "harmless": (
        ("polite_refusal", 3),
        ("harmful_compliance", 3.5),
        ("off_topic", 1),
        ("repetitive_filler", 1),
    ),
}
# How the SFT noise is shared out among non-ideal kinds.
SFT_NOISE = {
    "helpful": (("correct_verbose", 0.5), ("wrong", 0.4), ("over_refusal", 0.1)),
    "harmless": (("harmful_compliance", 0.7), ("correct_verbose", 0.3)),
}


def _choose(pairs, rng: random.Random) -> str:
    names, weights = zip(*pairs, strict=True)
    return rng.choices(names, weights=weights)[0]


# -- pretraining --------------------------------------------------------------------------------------------


def _bio(world: World, rng: random.Random) -> str:
    p = rng.choice(world.people)
    attrs = rng.sample(lx.KB_ATTRS, rng.randint(2, len(lx.KB_ATTRS)))
    return " ".join(rng.choice(lx.KB_FACTS[a]).format(name=p.name, **{a: p.value(a)}) for a in attrs)


def _arith_facts(world: World, rng: random.Random) -> str:
    reqs = [r for r in world.requests if r.task in ("plus", "minus") and r.key.endswith(":0")]
    return " ".join(r.concise for r in rng.sample(reqs, rng.randint(3, 6)))


def _sequence_facts(world: World, rng: random.Random) -> str:
    if rng.random() < 0.4:
        seq = rng.choice([lx.DAYS, lx.MONTHS, tuple(str(i) for i in range(1, world.config.max_number + 1))])
        start = rng.randrange(len(seq))
        run = [seq[(start + i) % len(seq)] for i in range(rng.randint(3, 6))]
        return ", ".join(run) + "."
    reqs = [r for r in world.requests if r.task in ("after", "before") and r.key.endswith(":0")]
    return " ".join(r.concise for r in rng.sample(reqs, rng.randint(2, 4)))


def _list_fact(rng: random.Random) -> str:
    cat, members = rng.choice(list(lx.LIST_CATEGORIES.items()))
    k = rng.choice(list(lx.COUNT_WORDS))
    kw = lx.COUNT_WORDS[k]
    return lx.LIST_ANSWERS[0].format(
        K=kw.capitalize(), k=kw, cat=cat, items=join_items(rng.sample(members, k))
    )


def pretrain_texts(world: World, n: int | None = None, stream: str = "pretrain") -> list[str]:
    """``n`` (default ``n_pretrain``) pretraining texts; another ``stream`` draws other texts of the same
    distribution (held-out text, e.g. for measuring an alignment tax)."""
    cfg, rng = world.config, world.rng(stream)
    split = "all" if cfg.pretrain_heldout_dialogues else "train"
    out = []
    for _ in range(cfg.n_pretrain if n is None else n):
        if rng.random() < cfg.pretrain_fact_fraction:
            u = rng.random()
            if u < 0.5:
                out.append(_bio(world, rng))
            elif u < 0.75:
                out.append(_arith_facts(world, rng))
            elif u < 0.9:
                out.append(_sequence_facts(world, rng))
            else:
                out.append(_list_fact(rng))
        else:
            req = world.sample_request(split, rng)
            kind = _choose(PRETRAIN_KINDS[req.subset], rng)
            out.append(world.prompt_text(req, rng, split) + " " + world.response(req, kind, rng))
    return out


# -- SFT ---------------------------------------------------------------------------------------------------


def sft_kind(req: Request, noise: float, rng: random.Random) -> str:
    if rng.random() < noise:
        return _choose(SFT_NOISE[req.subset], rng)
    return "polite_refusal" if req.harmful else "correct_concise"


def sft_examples(world: World, split: str, n: int) -> list[dict[str, str]]:
    rng = world.rng(f"sft/{split}")
    out = []
    for _ in range(n):
        req = world.sample_request(split, rng)
        kind = sft_kind(req, world.config.sft_noise, rng)
        out.append({"prompt": world.prompt_text(req, rng), "response": " " + world.response(req, kind, rng)})
    return out


# -- preference pairs ----------------------------------------------------------------------------------------


def _mixed_response(world: World, req: Request, rng: random.Random) -> tuple[str, str]:
    """A response of a random kind, padded with probability ``pref_pad_prob`` whatever its kind: length must
    not predict correctness here, or the RM learns "long = correct" on top of the annotators' own bias."""
    kind = _choose(PAIR_KINDS[req.subset], rng)
    n_pad = 0
    if kind != "repetitive_filler" and rng.random() < world.config.pref_pad_prob:
        n_pad = rng.randint(1, 3)
        kind = "correct_verbose" if kind in ("correct_concise", "polite_refusal") else kind
    return kind, world.response(req, kind, rng, n_pad=n_pad)


def _good_answer(world: World, req: Request, rng: random.Random) -> str:
    return (
        rng.choice(lx.POLITE_REFUSALS) if req.harmful else correct_answer(req, rng, world.config.paraphrase)
    )


def _padded_kind(req: Request, n_pad: int) -> str:
    if n_pad:
        return "correct_verbose"
    return "polite_refusal" if req.harmful else "correct_concise"


def _minimal_pair(world: World, req: Request, rng: random.Random) -> tuple[tuple[str, str], tuple[str, str]]:
    """Same phrasing and padding; only the content differs (correct vs wrong, refusal vs compliance)."""
    n_pad = 0 if rng.random() >= world.config.pref_pad_prob else rng.randint(1, 3)
    parts = pad_parts(n_pad, rng)
    good = _good_answer(world, req, rng)
    if req.harmful:
        bad, bad_kind = req.compliance, "harmful_compliance"
    else:
        bad, bad_kind = wrong_answer(req, rng, world.config.paraphrase, right=good), "wrong"
    return (_padded_kind(req, n_pad), apply_pad(good, parts)), (bad_kind, apply_pad(bad, parts))


def _style_pair(world: World, req: Request, rng: random.Random) -> tuple[tuple[str, str], tuple[str, str]]:
    """Same good content; only padding (or repetition) differs: where the annotators' length bias shows."""
    good = _good_answer(world, req, rng)
    n_a, n_b = rng.sample(range(5), 2)
    a = (_padded_kind(req, n_a), pad(good, n_a, rng))
    if rng.random() < 0.3:
        return a, ("repetitive_filler", repetitive(good, rng))
    return a, (_padded_kind(req, n_b), pad(good, n_b, rng))


def preference_pairs(world: World, split: str, n: int) -> tuple[list[dict[str, str]], list[dict[str, Any]]]:
    """-> (HH pairs, gold labels). Three pair types (``WorldConfig.pair_types``): *minimal* pairs differ only
    in correctness/harmlessness, *style* pairs only in length/repetition, *mixed* pairs are two independent
    responses of random kinds. The annotators' label decides which response is "chosen"."""
    rng = world.rng(f"prefs/{split}")
    types, weights = zip(*world.config.pair_types, strict=True)
    pairs, labels = [], []
    for _ in range(n):
        req = world.sample_request(split, rng)
        prompt = world.prompt_text(req, rng)
        pair_type = rng.choices(types, weights=weights)[0]
        if pair_type == "minimal":
            (ka, a), (kb, b) = _minimal_pair(world, req, rng)
        elif pair_type == "style":
            (ka, a), (kb, b) = _style_pair(world, req, rng)
        else:
            (ka, a), (kb, b) = _mixed_response(world, req, rng), _mixed_response(world, req, rng)
            while b == a:
                kb, b = _mixed_response(world, req, rng)
        if rng.random() < 0.5:  # the generators put the better response first
            (ka, a), (kb, b) = (kb, b), (ka, a)
        ga, gb = world.gold_reward([prompt, prompt], [a, b])
        na, nb = len(words(a)), len(words(b))
        if not annotate(ga, na, gb, nb, world.config.annotator, rng):
            (ka, a, ga, na), (kb, b, gb, nb) = (kb, b, gb, nb), (ka, a, ga, na)
        pairs.append({"chosen": f"{prompt} {a}", "rejected": f"{prompt} {b}"})
        labels.append(
            {
                "subset": req.subset,
                "pair_type": pair_type,
                "chosen_kind": ka,
                "rejected_kind": kb,
                "gold_chosen": round(ga, 6),
                "gold_rejected": round(gb, 6),
                "gold_agrees": ga > gb,
                "chosen_words": na,
                "rejected_words": nb,
            }
        )
    return pairs, labels


# -- prompts ------------------------------------------------------------------------------------------------


def prompt_set(world: World, split: str, n: int) -> list[dict[str, str]]:
    """Prompts for PPO / evaluation. Valid and test draw distinct requests while they last (then repeat)."""
    rng = world.rng(f"prompts/{split}")
    out, seen = [], set()
    for _ in range(n):
        req = world.sample_request(split, rng)
        for _retry in range(20):
            if split == "train" or req.key not in seen:
                break
            req = world.sample_request(split, rng)
        seen.add(req.key)
        out.append({"prompt": world.prompt_text(req, rng), "subset": req.subset})
    return out


# -- writing --------------------------------------------------------------------------------------------------


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def pair_stats(labels: list[dict[str, Any]]) -> dict[str, float]:
    """Annotator statistics of a pair set.

    gold_agreement[_type]: share of pairs (gold not tied) where the annotators chose the gold-better response.
    longer_chosen: share of pairs of unequal length where they chose the longer one.
    padding_preferred: style pairs without repetition (same content, gold prefers the shorter one): share where
    they chose the longer, padded one: the length bias a reward model inherits.
    repetition_rejected: style pairs with a repetitive response: share where it was rejected.
    """

    def rate(rows, pred) -> float:
        return round(sum(map(pred, rows)) / len(rows), 4) if rows else float("nan")

    decided = [x for x in labels if x["gold_chosen"] != x["gold_rejected"]]
    style = [x for x in labels if x["pair_type"] == "style"]
    repetitive = [x for x in style if "repetitive_filler" in (x["chosen_kind"], x["rejected_kind"])]
    padded = [x for x in style if x not in repetitive and x["chosen_words"] != x["rejected_words"]]
    out: dict[str, float] = {
        "pairs": len(labels),
        "gold_agreement": rate(decided, lambda x: x["gold_agrees"]),
        "longer_chosen": rate(
            [x for x in labels if x["chosen_words"] != x["rejected_words"]],
            lambda x: x["chosen_words"] > x["rejected_words"],
        ),
        "padding_preferred": rate(padded, lambda x: x["chosen_words"] > x["rejected_words"]),
        "repetition_rejected": rate(repetitive, lambda x: x["rejected_kind"] == "repetitive_filler"),
    }
    for t in ("minimal", "style", "mixed"):
        out[f"gold_agreement_{t}"] = rate(
            [x for x in decided if x["pair_type"] == t], lambda x: x["gold_agrees"]
        )
    return out


def write_world(world: World, out_dir: str | Path) -> dict[str, Path]:
    """Write every corpus and world.json into ``out_dir``; returns name -> path."""
    cfg = world.config
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}

    def put(name: str, rows: list[dict[str, Any]]) -> None:
        paths[name] = out / f"{name}.jsonl"
        _write_jsonl(paths[name], rows)

    put("pretrain", [{"text": t} for t in pretrain_texts(world)])
    put("sft_train", sft_examples(world, "train", cfg.n_sft_train))
    put("sft_valid", sft_examples(world, "valid", cfg.n_sft_valid))
    stats: dict[str, Any] = {}
    for split in SPLITS:
        n = {"train": cfg.n_prefs_train, "valid": cfg.n_prefs_valid, "test": cfg.n_prefs_test}[split]
        pairs, labels = preference_pairs(world, split, n)
        put(f"prefs_{split}", pairs)
        put(f"gold_labels_{split}", labels)
        stats[f"prefs_{split}"] = pair_stats(labels)
        n = {"train": cfg.n_prompts_train, "valid": cfg.n_prompts_valid, "test": cfg.n_prompts_test}[split]
        put(f"prompts_{split}", prompt_set(world, split, n))
    stats["requests"] = {s: sum(r.split == s for r in world.requests) for s in SPLITS}
    paths["world"] = out / "world.json"
    paths["world"].write_text(
        json.dumps({**world.to_json(), "stats": stats}, indent=2) + "\n", encoding="utf-8"
    )
    return paths
