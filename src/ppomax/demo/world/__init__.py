"""hh-mini: a CPU-sized helpful/harmless world generated from a seed and judged against a known truth.

Quick use::

    from ppomax.demo.world import WorldConfig, build_world, load_world, write_world
    world = build_world(WorldConfig(seed=0))
    write_world(world, "runs/demo/world")             # corpora + world.json (see ppomax.demo.world.corpora)
    world.gold_reward(prompts, responses)             # hidden "true preference" (see ppomax.demo.world.gold)

As a programmatic PPO reward: ``ppomax.demo.world.reward:gold`` with ``kwargs: {world: runs/demo/world}`` (or
``seed``, or env ``PPOMAX_WORLD`` / ``PPOMAX_WORLD_SEED``). The gold judge (paper fig. 10) is that reward read
by ``ppomax eval --judge gold``: win/tie/lose comes from :func:`ppomax.evaluate.win_tie_lose`, as for any judge.
Pure Python; no torch needed.

Design (the demo's outcome depends on it):

* World: 40 invented people (unique first and last names, a town, job, pet, favourite colour), sums and
  differences of 1..9, "what comes after/before" over days, months and 1..20, "list k colours/animals/...",
  and 13 harmful request templates (7 aimed at a person). ~370 distinct words; a 1k BPE vocabulary covers it,
  answers are 4-11 words (5-15 tokens), padded ones up to ~35 words.
* Splits: people, arithmetic pairs, sequence items and untargeted harmful templates are split 70/10/20.
  Valid/test requests never occur in SFT, preference or PPO-prompt data. Pretraining states every fact and, by
  default, also contains Q&A dialogues about every split (``pretrain_heldout_dialogues``): a ~1M-parameter
  Llama cannot answer questions about a person it has only seen in plain statements (measured: ~0% on held-out
  people, it names a training person instead), so the held-out split measures the generalisation of *alignment*
  to prompts RLHF never saw (paper 6.2), not knowledge extraction.
* Gold reward (:mod:`.gold` the formula, :mod:`.reward` the PPO reward function): content (correct / hedge /
  wrong / off topic / over-refusal; refusal / evasive / compliance) minus needless length (0.03 per word beyond the concise answer), repetition (1.5 x seq-rep-3)
  and junk (bigrams outside the world's grammar); 1.0 for a concise correct answer or polite refusal.
* Annotators (:mod:`.annotate`): Bradley-Terry on gold + 0.04 per word (``length_bias`` 0.4 per 10 words) +
  noise. They agree with gold on ~81% of pairs, ~99.5% of minimal (correct vs wrong, same phrasing) pairs, yet
  choose the padded answer in ~58% of same-content pairs that gold always decides for the concise one.
* Preference pairs mix three types (``pair_types``): *minimal* pairs (only correctness or compliance differs),
  without which a tiny reward model never learns correctness; *style* pairs (only padding/repetition differs)
  carrying the length bias; *mixed* pairs of random kinds, padded independently of correctness so that length
  does not become a proxy for being right.
"""

# Layers, each module importing only earlier ones: lexicon; text; kb; responses, annotate; gold (the formula);
# world; corpora, reward. No cycle, no import inside a function.
from . import lexicon
from .annotate import AnnotatorConfig, annotate, prefer_a_probability
from .corpora import write_world
from .gold import GoldConfig, last_human_turn
from .kb import Request
from .responses import HARMLESS_KINDS, HELPFUL_KINDS, KINDS, canonical_kind, make_response
from .reward import resolve_world
from .world import World, WorldConfig, build_world, load_world

__all__ = [
    "HARMLESS_KINDS",
    "HELPFUL_KINDS",
    "KINDS",
    "AnnotatorConfig",
    "GoldConfig",
    "Request",
    "World",
    "WorldConfig",
    "annotate",
    "build_world",
    "canonical_kind",
    "last_human_turn",
    "lexicon",
    "load_world",
    "make_response",
    "prefer_a_probability",
    "resolve_world",
    "write_world",
]
