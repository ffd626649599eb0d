"""Text utilities shared by the world's generators and its gold reward: words, sentences, numbers, grammar.

The gold reward must judge free text a policy generates, so nothing here assumes the text came from a
template. Words are lower-cased alphanumeric runs (apostrophes kept inside words: "can't", "dog's");
sentences end at ``.``, ``!`` or ``?``. Fluency is measured against *class-level sentence bigrams*: every
response template of :mod:`ppomax.demo.world.lexicon` is rewritten with word classes (``<first> <last> lives in
<town>``) and its bigrams, with sentence-start/end marks, form the grammar. A response bigram is valid when the
raw words or their classes form a grammar bigram.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from itertools import pairwise, product

from . import lexicon as lx

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_SENT_END = re.compile(r"[.!?]+")
BOS, EOS = "<s>", "</s>"
NUM = "<num>"

NUMBER_VALUE: dict[str, int] = {w: i for i, w in enumerate(lx.NUMBER_WORDS)}


def words(text: str) -> list[str]:
    """Lower-cased word tokens of ``text`` (punctuation dropped, apostrophes inside words kept)."""
    return _WORD.findall(text.lower().replace("’", "'"))


def norm(text: str) -> str:
    """Canonical form used to look questions up: the words joined by single spaces."""
    return " ".join(words(text))


def sentences(text: str) -> tuple[list[list[str]], bool]:
    """Split into sentences of words -> (sentences, finished): finished is False when the text does not end
    with sentence punctuation (e.g. generation cut off at ``max_new_tokens``)."""
    parts = _SENT_END.split(text)
    stripped = text.rstrip()
    finished = bool(stripped) and stripped[-1] in ".!?"
    out = [w for w in (words(p) for p in parts) if w]
    return out, finished


def number_of(word: str) -> int | None:
    """Integer value of a digit string or an English number word ("twelve"), else None."""
    if word.isdigit():
        return int(word)
    return NUMBER_VALUE.get(word)


def repetition(ws: list[str], n: int = 3) -> float:
    """seq-rep-n: 1 - distinct n-grams / n-grams, in [0, 1). 0 for texts shorter than n + 1 words."""
    grams = [tuple(ws[i : i + n]) for i in range(len(ws) - n + 1)]
    if len(grams) < 2:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


# -- grammar ------------------------------------------------------------------------------------------------


def word_classes(kb_values: Mapping[str, Iterable[str]]) -> dict[str, str]:
    """word -> class token, for the open classes (names, towns, jobs, pets, colours, days, months, numbers).

    kb_values: ``{"first": [...], "last": [...], "town": [...]}`` from the generated knowledge base.
    """
    classes: dict[str, str] = {}
    for cls, values in kb_values.items():
        for v in values:
            classes[v.lower()] = f"<{cls}>"
    for cls, values in (
        ("job", lx.JOBS),
        ("pet", lx.PETS),
        ("colour", lx.COLOURS),
        ("day", lx.DAYS),
        ("month", lx.MONTHS),
    ):
        for v in values:
            classes[v.lower()] = f"<{cls}>"
    for w in lx.NUMBER_WORDS:
        classes[w] = NUM
    return classes


def class_of(word: str, classes: Mapping[str, str]) -> str:
    if word.isdigit():
        return NUM
    return classes.get(word, word)


_SLOT_CLASS = {
    "{name}": "<first> <last>",
    "{first}": "<first>",
    "{town}": "<town>",
    "{job}": "<job>",
    "{pet}": "<pet>",
    "{colour}": "<colour>",
    "{a}": NUM,
    "{b}": NUM,
    "{c}": NUM,
    "{k}": NUM,
    "{K}": NUM,
}
_SEQ_CLASSES = ("<day>", "<month>", NUM)
_LIST_CLASSES = {"colours": "<colour>", "animals": "<pet>", "days": "<day>", "jobs": "<job>"}


def _class_templates() -> list[str]:
    """Every response template with its slots replaced by class tokens (lists expanded for 2-4 items)."""
    out: list[str] = []
    kb = [t for ts in lx.KB_ANSWERS.values() for t in ts] + [t for ts in lx.KB_FACTS.values() for t in ts]
    arith = [t for ts in lx.ARITH_ANSWERS.values() for t in ts]
    simple = (
        kb
        + arith
        + list(lx.POLITE_REFUSALS)
        + list(lx.BARE_REFUSALS)
        + list(lx.PAD_PREFIXES)
        + list(lx.PAD_SUFFIXES)
        + list(lx.SMALL_TALK)
        + [g[1] for g in lx.GREETINGS]
        + [h[2] for h in lx.HARMFUL]
        + list(lx.GRAMMAR_ONLY)
    )
    for t in simple:
        for slot, cls in _SLOT_CLASS.items():
            t = t.replace(slot, cls)
        out.append(t)
    for t in (*(t for ts in lx.SEQ_ANSWERS.values() for t in ts), "{y}."):
        for cls in _SEQ_CLASSES:
            out.append(t.replace("{x}", cls).replace("{y}", cls))
    for t in lx.LIST_ANSWERS:
        # Items of any class in any order: a wrong list ("red, potter and grey") is wrong, not ungrammatical.
        for cat in _LIST_CLASSES:
            for c1, c2 in product(_LIST_CLASSES.values(), repeat=2):
                for items in (f"{c1} and {c2}", f"{c1} {c2} and {c2}"):
                    out.append(
                        t.replace("{K}", NUM)
                        .replace("{k}", NUM)
                        .replace("{cat}", cat)
                        .replace("{items}", items)
                    )
    # Bare sequences ("Monday, Tuesday, Wednesday.") and counting lines appear in pretraining text.
    out += [" ".join([cls] * 4) for cls in _SEQ_CLASSES]
    return out


def grammar_bigrams() -> frozenset[tuple[str, str]]:
    """The set of valid class-level sentence bigrams (with <s>/</s> marks) of the world's language."""
    grams: set[tuple[str, str]] = set()
    for t in _class_templates():
        for sent in _SENT_END.split(t):
            toks = [tok for tok in re.findall(r"<[a-z]+>|[a-z0-9]+(?:'[a-z]+)?", sent.lower())]
            if not toks:
                continue
            seq = [BOS, *toks, EOS]
            grams.update(pairwise(seq))
    return frozenset(grams)


def fluency(
    sents: list[list[str]], finished: bool, grammar: frozenset[tuple[str, str]], classes: Mapping[str, str]
) -> float:
    """Fraction of the response's sentence bigrams that are grammatical (1.0 = every bigram is one the world's
    templates can produce). The last sentence of an unfinished text gets no end mark."""
    total = valid = 0
    for i, sent in enumerate(sents):
        seq = [BOS, *sent] + ([EOS] if finished or i < len(sents) - 1 else [])
        for u, v in pairwise(seq):
            total += 1
            cu, cv = class_of(u, classes), class_of(v, classes)
            if (u, v) in grammar or (cu, v) in grammar or (u, cv) in grammar or (cu, cv) in grammar:
                valid += 1
    return valid / total if total else 0.0
