"""The knowledge base and the finite set of requests (questions) of the hh-mini world.

A :class:`Request` is one question text with everything needed to judge an answer to it: the expected answer
words, the distractor words whose presence makes an answer wrong, the canonical concise answer (whose length
is the "needed" length), and for harmful requests the compliance marker words. Every request belongs to one
split: people, arithmetic pairs, sequence items and some harmful templates are divided between train / valid /
test, so test prompts ask about entities whose facts the pretraining corpus states but no dialogue ever uses.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from itertools import product

from . import lexicon as lx
from .text import norm

SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class Person:
    first: str
    last: str
    town: str
    job: str
    pet: str
    colour: str
    split: str

    @property
    def name(self) -> str:
        return f"{self.first} {self.last}"

    def value(self, attr: str) -> str:
        return getattr(self, attr)


@dataclass(frozen=True)
class Request:
    """One question of the world and the facts needed to judge any answer to it.

    task: kb_town | kb_job | kb_pet | kb_colour | plus | minus | after | before | list | harmful.
    subset: "helpful" or "harmless" (harmful requests form the harmless subset, as in HH-RLHF).
    expected: answer words of which one must appear (lower case; numbers as digit strings).
    distractors: words whose presence makes the answer wrong (other towns, other numbers, ...).
    n_items / category: list tasks: how many distinct members of ``category`` the answer must name.
    subject: the person's name words (KB and targeted harmful requests); others: every other person's name words
    (an answer about someone else is wrong even when it names the right town).
    operands: values the question itself mentions ("7 plus 5", "after Tuesday"); an answer may repeat them once
    each, any further mention counts as a claim (so "2 minus 1 is 1" is right and "After Monday comes Monday"
    wrong).
    markers: harmful requests: words that only a complying answer contains.
    slots: template values used to build responses.
    """

    key: str
    text: str
    task: str
    subset: str
    split: str
    concise: str
    answers: tuple[str, ...] = ()
    expected: frozenset[str] = frozenset()
    distractors: frozenset[str] = frozenset()
    n_items: int = 0
    category: frozenset[str] = frozenset()
    subject: frozenset[str] = frozenset()
    others: frozenset[str] = frozenset()
    operands: tuple[str, ...] = ()
    markers: frozenset[str] = frozenset()
    compliance: str = ""
    slots: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    @property
    def harmful(self) -> bool:
        return self.subset == "harmless"


def make_names(rng: random.Random, n: int, syllables: int, taken: set[str]) -> list[str]:
    """``n`` distinct invented capitalised words of ``syllables`` syllables, avoiding ``taken`` (updated)."""
    out: list[str] = []
    while len(out) < n:
        parts = [rng.choice(lx.ONSETS) + rng.choice(lx.VOWELS) for _ in range(syllables)]
        word = ("".join(parts) + rng.choice(lx.CODAS)).capitalize()
        if len(word) >= 3 and word.lower() not in taken:
            taken.add(word.lower())
            out.append(word)
    return out


def _split_of(i: int, n: int, fractions: tuple[float, float]) -> str:
    """Deterministic split of item ``i`` of ``n`` (already shuffled): first train, then valid, then test."""
    n_valid = max(1, round(n * fractions[0]))
    n_test = max(1, round(n * fractions[1]))
    if i < n - n_valid - n_test:
        return "train"
    return "valid" if i < n - n_test else "test"


def _assign(items: list, rng: random.Random, fractions: tuple[float, float]) -> dict:
    order = list(items)
    rng.shuffle(order)
    return {item: _split_of(i, len(order), fractions) for i, item in enumerate(order)}


def make_people(rng: random.Random, n_people: int, n_towns: int, fractions: tuple[float, float]):
    """-> (people, towns). Each person gets a unique first and last name and random attribute values."""
    taken = {w.lower() for w in (*lx.JOBS, *lx.PETS, *lx.COLOURS, *lx.DAYS, *lx.MONTHS, *lx.NUMBER_WORDS)}
    towns = make_names(rng, n_towns, 1, taken)
    firsts = make_names(rng, n_people, 2, taken)
    lasts = make_names(rng, n_people, 2, taken)
    split = _assign(list(range(n_people)), rng, fractions)
    people = [
        Person(
            firsts[i],
            lasts[i],
            rng.choice(towns),
            rng.choice(lx.JOBS),
            rng.choice(lx.PETS),
            rng.choice(lx.COLOURS),
            split[i],
        )
        for i in range(n_people)
    ]
    return people, towns


def _fill(template: str, **slots: str) -> str:
    return template.format(**slots)


def kb_requests(people: list[Person], towns: list[str]) -> list[Request]:
    values = {"town": tuple(towns), **lx.KB_VALUES}
    all_name_words = {w.lower() for p in people for w in (p.first, p.last)}
    out = []
    for p in people:
        subject = frozenset({p.first.lower(), p.last.lower()})
        for attr in lx.KB_ATTRS:
            v = p.value(attr)
            slots = {"name": p.name, "first": p.first, attr: v}
            answers = tuple(_fill(t, **slots) for t in lx.KB_ANSWERS[attr])
            for qi, q in enumerate(lx.KB_QUESTIONS[attr]):
                out.append(
                    Request(
                        key=f"kb_{attr}:{p.name}:{qi}",
                        text=_fill(q, name=p.name),
                        task=f"kb_{attr}",
                        subset="helpful",
                        split=p.split,
                        concise=answers[0],
                        answers=answers,
                        expected=frozenset({v.lower()}),
                        distractors=frozenset(x.lower() for x in values[attr] if x != v),
                        subject=subject,
                        others=frozenset(all_name_words - subject),
                        slots=slots,
                    )
                )
    return out


def arith_requests(max_operand: int, rng: random.Random, fractions: tuple[float, float]) -> list[Request]:
    pairs = [("plus", a, b) for a, b in product(range(1, max_operand + 1), repeat=2)]
    pairs += [("minus", a, b) for a, b in product(range(1, max_operand + 1), repeat=2) if a >= b]
    split = _assign(pairs, rng, fractions)
    all_numbers = {str(n) for n in range(0, 2 * max_operand + 10)}
    out = []
    for op, a, b in pairs:
        c = a + b if op == "plus" else a - b
        slots = {"a": str(a), "b": str(b), "c": str(c)}
        answers = tuple(_fill(t, **slots) for t in lx.ARITH_ANSWERS[op])
        for qi, q in enumerate(lx.ARITH_QUESTIONS[op]):
            out.append(
                Request(
                    key=f"{op}:{a}:{b}:{qi}",
                    text=_fill(q, **slots),
                    task=op,
                    subset="helpful",
                    split=split[(op, a, b)],
                    concise=answers[0],
                    answers=answers,
                    expected=frozenset({str(c)}),
                    distractors=frozenset(all_numbers - {str(c)}),
                    operands=(str(a), str(b)),
                    slots=slots,
                )
            )
    return out


def _sequences(max_number: int) -> list[tuple[str, ...]]:
    return [lx.DAYS, lx.MONTHS, tuple(str(i) for i in range(1, max_number + 1))]


def seq_requests(max_number: int, rng: random.Random, fractions: tuple[float, float]) -> list[Request]:
    items = []
    for seq in _sequences(max_number):
        cyclic = not seq[0].isdigit()
        for i, x in enumerate(seq):
            if cyclic or i + 1 < len(seq):
                items.append(("after", seq, x, seq[(i + 1) % len(seq)]))
            if cyclic or i > 0:
                items.append(("before", seq, x, seq[i - 1]))
    split = _assign([(d, x) for d, _, x, _ in items], rng, fractions)
    out = []
    for direction, seq, x, y in items:
        slots = {"x": x, "y": y}
        answers = tuple(_fill(t, **slots) for t in lx.SEQ_ANSWERS[direction])
        members = {s.lower() for s in seq}  # numbers as digits: the gold reward maps number words to digits
        for qi, q in enumerate(lx.SEQ_QUESTIONS[direction]):
            out.append(
                Request(
                    key=f"{direction}:{x}:{qi}",
                    text=_fill(q, **slots),
                    task=direction,
                    subset="helpful",
                    split=split[(direction, x)],
                    concise=answers[0],
                    answers=answers,
                    expected=frozenset({y.lower()}),
                    distractors=frozenset(members - {y.lower()}),
                    operands=(x.lower(),),
                    slots=slots,
                )
            )
    return out


def list_requests() -> list[Request]:
    """List tasks have many right answers and no held-out entity: every split gets all of them."""
    out = []
    for (cat, members), (k, kw), (qi, q) in product(
        lx.LIST_CATEGORIES.items(), lx.COUNT_WORDS.items(), enumerate(lx.LIST_QUESTIONS)
    ):
        slots = {"k": kw, "K": kw.capitalize(), "cat": cat}
        answers = tuple(_fill(t, items=join_items(members[:k]), **slots) for t in lx.LIST_ANSWERS)
        for split in SPLITS:
            out.append(
                Request(
                    key=f"list:{cat}:{k}:{qi}:{split}",
                    text=_fill(q, **slots),
                    task="list",
                    subset="helpful",
                    split=split,
                    concise=answers[0],
                    answers=answers,
                    n_items=k,
                    category=frozenset(m.lower() for m in members),
                    slots=slots,
                )
            )
    return out


def join_items(items) -> str:
    items = list(items)
    return ", ".join(items[:-1]) + " and " + items[-1] if len(items) > 1 else items[0]


def harmful_requests(
    people: list[Person], rng: random.Random, fractions: tuple[float, float]
) -> list[Request]:
    """Targeted templates ("How do I hurt {name}?") follow the person's split; untargeted ones are themselves
    divided between splits so that test has refusal-worthy phrasings never seen in training."""
    untargeted = [h[0] for h in lx.HARMFUL if "{name}" not in h[1]]
    split_of_template = _assign(untargeted, rng, fractions)
    concise = lx.POLITE_REFUSALS[0]
    out = []
    for hid, q, comply, markers in lx.HARMFUL:
        targets = people if "{name}" in q else [None]
        for p in targets:
            slots = {"name": p.name, "first": p.first} if p else {}
            out.append(
                Request(
                    key=f"harmful:{hid}:{p.name if p else ''}",
                    text=_fill(q, **slots),
                    task="harmful",
                    subset="harmless",
                    split=p.split if p else split_of_template[hid],
                    concise=concise,
                    answers=lx.POLITE_REFUSALS,
                    markers=frozenset(markers),
                    compliance=_fill(comply, **slots),
                    subject=frozenset({p.first.lower(), p.last.lower()}) if p else frozenset(),
                    slots=slots,
                )
            )
    return out


def request_index(requests: list[Request]) -> dict[str, Request]:
    """Normalised question text -> request. List questions exist once per split; the train copy wins (they
    are the same question and are judged identically)."""
    index: dict[str, Request] = {}
    for r in requests:
        key = norm(r.text)
        if key not in index or r.split == "train":
            index[key] = r
    return index
