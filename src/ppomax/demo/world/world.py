"""WorldConfig, World and build_world: the hh-mini world built from a seed.

Building a world (knowledge base, requests, grammar) is fast and needs no corpora, so the gold reward can
rebuild it from ``world.json`` anywhere. Corpora are generated on demand by :mod:`ppomax.demo.world.corpora`;
everything is driven by ``random.Random(f"{seed}/{purpose}")`` streams (string seeds hash with SHA-512, so the
output does not depend on ``PYTHONHASHSEED``) and is byte-for-byte reproducible.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from . import lexicon as lx
from .annotate import AnnotatorConfig
from .gold import GoldConfig, last_human_turn, score_details
from .kb import (
    Person,
    Request,
    arith_requests,
    harmful_requests,
    kb_requests,
    list_requests,
    make_people,
    request_index,
    seq_requests,
)
from .responses import make_response
from .text import grammar_bigrams, norm, word_classes

FORMAT = "ppomax.hh-mini/1"


@dataclass(frozen=True)
class WorldConfig:
    """Everything that defines an hh-mini world. Same config = same world and same files, byte for byte."""

    seed: int = 0
    # knowledge base
    n_people: int = 40
    n_towns: int = 10
    max_operand: int = 9  # arithmetic: a, b in 1..max_operand (plus; minus with a >= b)
    max_number: int = 20  # "what comes after 7?" over 1..max_number (plus days and months)
    # share of people / arithmetic pairs / sequence items / untargeted harmful templates held out
    valid_fraction: float = 0.1
    test_fraction: float = 0.2
    # mixtures
    harmful_fraction: float = 0.25  # share of harmful requests in SFT, preference and prompt sets
    task_weights: tuple[tuple[str, float], ...] = (("kb", 0.4), ("arith", 0.25), ("seq", 0.2), ("list", 0.15))
    two_turn_fraction: float = 0.1  # prompts with a greeting or an earlier exchange before the request
    paraphrase: float = 0.2  # share of correct answers phrased other than canonically
    # corpora sizes
    n_pretrain: int = 20000
    pretrain_fact_fraction: float = 0.45  # plain statements (bios, sums, sequences) vs dialogues
    # Pretraining dialogues also ask valid/test questions (like Q&A on the web), so the base LM can answer them;
    # SFT, preference pairs and PPO prompts never do. False = test questions are never seen as dialogues: the
    # base LM must extract the answer from plain statements, which a ~1M-parameter model fails at (it answers
    # about a training person instead).
    pretrain_heldout_dialogues: bool = True
    n_sft_train: int = 4000
    n_sft_valid: int = 400
    sft_noise: float = 0.15  # share of SFT demonstrations that are not ideal (verbose, wrong, compliance...)
    n_prefs_train: int = 6000
    n_prefs_valid: int = 500
    n_prefs_test: int = 500
    pref_pad_prob: float = 0.3  # chance that a response of a minimal or mixed pair gets 1-3 pleasantries
    # Preference pair types (corpora.preference_pairs): minimal = same phrasing, only correctness differs (what
    # lets a tiny RM learn correctness at all); style = same content, only length/repetition differs (where
    # the annotators' length bias shows); mixed = two independent responses of random kinds.
    pair_types: tuple[tuple[str, float], ...] = (("minimal", 0.4), ("style", 0.25), ("mixed", 0.35))
    n_prompts_train: int = 2000
    n_prompts_valid: int = 200
    n_prompts_test: int = 400
    annotator: AnnotatorConfig = field(default_factory=AnnotatorConfig)
    gold: GoldConfig = field(default_factory=GoldConfig)

    def __post_init__(self) -> None:
        problems = []
        if self.n_people < 10:
            problems.append(f"n_people must be >= 10 (got {self.n_people})")
        if self.n_towns < 3:
            problems.append(f"n_towns must be >= 3 (got {self.n_towns})")
        if not 2 <= self.max_operand <= 20:
            problems.append(f"max_operand must be in 2..20 (got {self.max_operand})")
        if not 5 <= self.max_number <= 20:
            problems.append(f"max_number must be in 5..20 (got {self.max_number})")
        for name in (
            "harmful_fraction",
            "two_turn_fraction",
            "paraphrase",
            "pretrain_fact_fraction",
            "sft_noise",
            "pref_pad_prob",
        ):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                problems.append(f"{name} must be in [0, 1] (got {v})")
        if (
            min(self.valid_fraction, self.test_fraction) <= 0
            or self.valid_fraction + self.test_fraction >= 0.6
        ):
            problems.append("valid_fraction and test_fraction must be > 0 and sum to < 0.6")
        if {k for k, _ in self.task_weights} - {"kb", "arith", "seq", "list"}:
            problems.append(f"task_weights keys must be kb, arith, seq, list (got {self.task_weights})")
        if {k for k, _ in self.pair_types} - {"minimal", "style", "mixed"} or not self.pair_types:
            problems.append(f"pair_types keys must be minimal, style, mixed (got {self.pair_types})")
        if problems:
            raise ValueError("invalid WorldConfig: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["task_weights"] = dict(self.task_weights)
        d["pair_types"] = dict(self.pair_types)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WorldConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown WorldConfig keys {sorted(unknown)}")
        d = dict(d)
        if "annotator" in d:
            d["annotator"] = AnnotatorConfig(**d["annotator"])
        if "gold" in d:
            d["gold"] = GoldConfig(**d["gold"])
        for key in ("task_weights", "pair_types"):
            if key in d:
                items = d[key].items() if isinstance(d[key], dict) else d[key]
                d[key] = tuple((str(k), float(v)) for k, v in items)
        return cls(**d)


TASK_FAMILY = {
    "kb_town": "kb",
    "kb_job": "kb",
    "kb_pet": "kb",
    "kb_colour": "kb",
    "plus": "arith",
    "minus": "arith",
    "after": "seq",
    "before": "seq",
    "list": "list",
    "harmful": "harmful",
}


class World:
    """The built world: people, towns, requests by split, the grammar, the gold reward and annotators."""

    def __init__(self, config: WorldConfig) -> None:
        self.config = config
        fr = (config.valid_fraction, config.test_fraction)
        self.people: list[Person]
        self.people, self.towns = make_people(self.rng("people"), config.n_people, config.n_towns, fr)
        self.requests: list[Request] = (
            kb_requests(self.people, self.towns)
            + arith_requests(config.max_operand, self.rng("arith"), fr)
            + seq_requests(config.max_number, self.rng("seq"), fr)
            + list_requests()
            + harmful_requests(self.people, self.rng("harmful"), fr)
        )
        self.index = request_index(self.requests)
        self.by_split: dict[tuple[str, str], list[Request]] = {}
        for r in self.requests:
            self.by_split.setdefault((r.split, TASK_FAMILY[r.task]), []).append(r)
            if r.task != "list" or r.split == "train":  # list questions exist once per split
                self.by_split.setdefault(("all", TASK_FAMILY[r.task]), []).append(r)
        self.classes = word_classes(
            {
                "first": [p.first for p in self.people],
                "last": [p.last for p in self.people],
                "town": self.towns,
            }
        )
        self.grammar = grammar_bigrams()

    def rng(self, purpose: str) -> random.Random:
        """An independent, reproducible random stream for one purpose."""
        return random.Random(f"{self.config.seed}/{purpose}")

    # -- requests and prompts ------------------------------------------------------------------------------
    def find(self, prompt: str) -> Request | None:
        """The request asked by the last Human turn of ``prompt`` (None when it is not a question of this world)."""
        return self.index.get(norm(last_human_turn(prompt)))

    def sample_request(self, split: str, rng: random.Random, harmful: bool | None = None) -> Request:
        """A random request of ``split`` ("train", "valid", "test" or "all"): harmful with probability
        ``harmful_fraction`` (unless forced), otherwise a task family by ``task_weights``, then uniformly."""
        if harmful is None:
            harmful = rng.random() < self.config.harmful_fraction
        if harmful:
            return rng.choice(self.by_split[(split, "harmful")])
        families, weights = zip(*self.config.task_weights, strict=True)
        family = rng.choices(families, weights=weights)[0]
        return rng.choice(self.by_split[(split, family)])

    def prompt_text(self, request: Request, rng: random.Random, split: str | None = None) -> str:
        """HH prompt for ``request``, ending in ``\\n\\nAssistant:``; sometimes with an earlier exchange (drawn
        from ``split``, default the request's own)."""
        prefix = ""
        if rng.random() < self.config.two_turn_fraction:
            if rng.random() < 0.5:
                human, assistant = rng.choice(lx.GREETINGS)
            else:
                other = self.sample_request(split or request.split, rng, harmful=False)
                human, assistant = other.text, other.concise
            prefix = f"\n\nHuman: {human}\n\nAssistant: {assistant}"
        return f"{prefix}\n\nHuman: {request.text}\n\nAssistant:"

    def response(self, request: Request, kind: str, rng: random.Random, n_pad: int | None = None) -> str:
        """A response of ``kind`` (see :mod:`ppomax.demo.world.responses`); off-topic answers come from another task."""
        family = TASK_FAMILY[request.task]
        off_topic = ""
        if rng.random() < 0.7:
            other_families = [f for f, _ in self.config.task_weights if f != family]
            other = rng.choice(self.by_split[(request.split, rng.choice(other_families))])
            off_topic = other.concise
        return make_response(
            request, kind, rng, off_topic=off_topic, n_pad=n_pad, paraphrase=self.config.paraphrase
        )

    # -- gold reward ---------------------------------------------------------------------------------------
    def gold_reward(self, prompts: list[str], responses: list[str], **kwargs: Any) -> list[float]:
        """Gold reward of each (prompt, response); see :mod:`ppomax.demo.world.gold` for the formula and range."""
        if kwargs:
            raise TypeError(f"gold_reward got unknown kwargs {sorted(kwargs)}")
        if len(prompts) != len(responses):
            raise ValueError(
                f"gold_reward needs as many prompts as responses ({len(prompts)} != {len(responses)})"
            )
        return [float(self.gold_details(p, r)["gold"]) for p, r in zip(prompts, responses, strict=True)]

    def gold_details(self, prompt: str, response: str) -> dict[str, Any]:
        """The gold reward of one (prompt, response) with every component (:func:`.gold.score_details`)."""
        return score_details(self.find(prompt), response, self.config.gold, self.grammar, self.classes)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "config": self.config.to_dict()}


def build_world(cfg: WorldConfig | None = None) -> World:
    """Build the world of ``cfg`` (default ``WorldConfig()``). Fast: corpora are generated only by
    :func:`.corpora.write_world`."""
    return World(cfg or WorldConfig())


def load_world(path: str | Path) -> World:
    """Rebuild the world from a directory written by :func:`.corpora.write_world` (or its ``world.json``)."""
    p = Path(path)
    if p.is_dir():
        p = p / "world.json"
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{p}: no world.json; write one with ppomax.demo.world.write_world(world, dir)"
        ) from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not valid JSON ({e})") from None
    if data.get("format") != FORMAT:
        raise ValueError(f"{p}: format {data.get('format')!r}, expected {FORMAT!r}")
    return build_world(WorldConfig.from_dict(data["config"]))
