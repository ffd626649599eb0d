"""Responses of every kind for any request: the raw material of all corpora.

Kinds (``KINDS``): ``correct_concise``, ``correct_verbose`` (correct + pleasantries), ``wrong`` (plausible but
false: another town, an off-by-few number, the wrong day), ``off_topic`` (an answer to some other question or
small talk), ``harmful_compliance``, ``polite_refusal``, ``over_refusal`` (refusing a harmless request) and
``repetitive_filler`` (a phrase repeated). For a harmful request the *correct* answer is a polite refusal, so
``correct_concise`` / ``correct_verbose`` there mean a (padded) refusal and ``wrong`` means compliance; on a
helpful request ``polite_refusal`` is an over-refusal. ``harmful_compliance`` on a helpful request and
``over_refusal`` on a harmful one do not exist and raise ``ValueError``.

Any kind can carry ``n_pad`` pleasantries (prefix and/or suffixes, never repeated): the preference data uses
this to vary length independently of correctness, which is what lets a reward model learn a length bias.
"""

from __future__ import annotations

import random
import re

from . import lexicon as lx
from .kb import Request, join_items

KINDS = (
    "correct_concise",
    "correct_verbose",
    "wrong",
    "off_topic",
    "harmful_compliance",
    "polite_refusal",
    "over_refusal",
    "repetitive_filler",
)
HELPFUL_KINDS = (
    "correct_concise",
    "correct_verbose",
    "wrong",
    "off_topic",
    "over_refusal",
    "repetitive_filler",
)
HARMLESS_KINDS = ("polite_refusal", "correct_verbose", "harmful_compliance", "off_topic", "repetitive_filler")


def canonical_kind(request: Request, kind: str) -> str:
    """Map a kind to its meaning for this request (harmful: correct = refusal, wrong = compliance)."""
    if kind not in KINDS:
        raise ValueError(f"unknown response kind {kind!r}; expected one of {', '.join(KINDS)}")
    if request.harmful:
        if kind == "over_refusal":
            raise ValueError(
                "over_refusal is a refusal of a harmless request; use polite_refusal for a harmful one"
            )
        return {"correct_concise": "polite_refusal", "wrong": "harmful_compliance"}.get(kind, kind)
    if kind == "harmful_compliance":
        raise ValueError(f"harmful_compliance needs a harmful request, got {request.task!r}")
    return "over_refusal" if kind == "polite_refusal" else kind


def pad_parts(n_pad: int, rng: random.Random) -> tuple[str, list[str]]:
    """``n_pad`` distinct pleasantries -> (prefix or "", suffixes). A single pad is always a suffix sentence."""
    if n_pad <= 0:
        return "", []
    n_prefix = 1 if n_pad >= 2 and rng.random() < 0.4 else 0
    n_suffix = min(n_pad - n_prefix, len(lx.PAD_SUFFIXES))
    return (rng.choice(lx.PAD_PREFIXES) if n_prefix else ""), rng.sample(lx.PAD_SUFFIXES, n_suffix)


def apply_pad(text: str, parts: tuple[str, list[str]]) -> str:
    prefix, suffixes = parts
    return " ".join(([prefix] if prefix else []) + [text] + suffixes)


def pad(text: str, n_pad: int, rng: random.Random) -> str:
    """Wrap ``text`` in ``n_pad`` distinct pleasantries: maybe one prefix, the rest suffixes."""
    return apply_pad(text, pad_parts(n_pad, rng))


def correct_answer(request: Request, rng: random.Random, paraphrase: float) -> str:
    """A correct concise answer: the canonical one, or with probability ``paraphrase`` another phrasing."""
    if request.task == "list":
        members = sorted(request.category)
        cat_values = lx.LIST_CATEGORIES[request.slots["cat"]]
        items = rng.sample([v for v in cat_values if v.lower() in members], request.n_items)
        template = lx.LIST_ANSWERS[0] if rng.random() >= paraphrase else rng.choice(lx.LIST_ANSWERS[1:])
        return template.format(items=join_items(items), **request.slots)
    if request.harmful:
        return lx.POLITE_REFUSALS[0] if rng.random() >= paraphrase else rng.choice(lx.POLITE_REFUSALS[1:])
    if rng.random() < paraphrase and len(request.answers) > 1:
        return rng.choice(request.answers[1:])
    return request.concise


def wrong_answer(request: Request, rng: random.Random, paraphrase: float, right: str | None = None) -> str:
    """Plausible but false: a correct answer (``right``, or a fresh one) with the answer value swapped for a
    wrong one of the same type (another town, a number off by 1-3, another day; lists: one item from another
    category)."""
    if right is None:
        right = correct_answer(request, rng, paraphrase)
    if request.task == "list":
        cat = request.slots["cat"]
        present = [v for v in lx.LIST_CATEGORIES[cat] if re.search(rf"\b{re.escape(v)}\b", right)]
        other = rng.choice([c for c in lx.LIST_CATEGORIES if c != cat])
        intruder = rng.choice([v for v in lx.LIST_CATEGORIES[other] if v.lower() not in request.category])
        return _replace_value(right, rng.choice(present), intruder)
    (value,) = request.expected
    if request.task in ("plus", "minus"):
        c, operands = int(value), {int(request.slots["a"]), int(request.slots["b"])}
        choices = [c + d for d in (-3, -2, -1, 1, 2, 3) if c + d >= 0 and c + d not in operands]
        false = str(rng.choice(choices))
    else:
        false = rng.choice(sorted(request.distractors - set(request.operands)))
    return _replace_value(right, value, false)


def _replace_value(text: str, value: str, false: str) -> str:
    """Replace the answer word (case-insensitive, whole word, last occurrence) by ``false``."""
    matches = list(re.finditer(rf"\b{re.escape(value)}\b", text, flags=re.IGNORECASE))
    if not matches:
        raise AssertionError(f"answer {value!r} not in {text!r}")
    m = matches[-1]  # "After 7 comes 8.": the answer is the last number
    false = false.capitalize() if m.group(0)[0].isupper() else false
    return text[: m.start()] + false + text[m.end() :]


def refusal(rng: random.Random, polite: float = 0.85) -> str:
    return rng.choice(lx.POLITE_REFUSALS) if rng.random() < polite else rng.choice(lx.BARE_REFUSALS)


def repetitive(base: str, rng: random.Random) -> str:
    """A phrase repeated: the answer followed by one pleasantry 3-5 times, or the answer itself 3-4 times."""
    if rng.random() < 0.6:
        return " ".join([base] + [rng.choice(lx.PAD_SUFFIXES)] * rng.randint(3, 5))
    return " ".join([base] * rng.randint(3, 4))


def make_response(
    request: Request,
    kind: str,
    rng: random.Random,
    *,
    off_topic: str = "",
    n_pad: int | None = None,
    paraphrase: float = 0.2,
) -> str:
    """One response of ``kind`` to ``request``.

    off_topic: the text to use for ``off_topic`` (an answer to another request; the caller picks it so the
    world can draw it from a different task); small talk when empty.
    n_pad: pleasantries to add; None = the kind's default (1-4 for ``correct_verbose``, else 0).
    paraphrase: probability of a non-canonical (but correct) phrasing.
    """
    kind = canonical_kind(request, kind)
    if n_pad is None:
        n_pad = rng.randint(1, 4) if kind == "correct_verbose" else 0
    if kind in ("correct_concise", "correct_verbose"):
        text = correct_answer(request, rng, paraphrase)
    elif kind == "polite_refusal":
        text = rng.choice(lx.POLITE_REFUSALS)
    elif kind == "over_refusal":
        text = refusal(rng)
    elif kind == "wrong":
        text = wrong_answer(request, rng, paraphrase)
    elif kind == "harmful_compliance":
        text = request.compliance
    elif kind == "off_topic":
        text = off_topic or rng.choice(lx.SMALL_TALK)
    else:  # repetitive_filler
        base = correct_answer(request, rng, paraphrase) if rng.random() < 0.7 else rng.choice(lx.SMALL_TALK)
        return repetitive(base, rng)
    return pad(text, n_pad, rng)
