"""Simulated annotators: Bradley-Terry on the gold reward, plus noise, plus a bias toward longer answers.

Each annotator judgement sees utilities

    u(y) = gold(y) + length_bias * words(y) / 10 + eps,     eps ~ N(0, noise^2)

and prefers A with probability ``sigmoid(beta * (u(A) - u(B)))`` (Bradley-Terry). The length term is the
reward-model bias the paper reports in section 4.3 (longer responses get higher scores even when they are
worse); the gold reward charges ``len_coef`` per extra word, so with ``length_bias / 10 > len_coef`` annotators
(and the reward model trained on their labels) prefer padded answers to equally correct concise ones, while
still preferring correct to wrong and refusal to harmful compliance. That is the exploitable flaw vanilla PPO
is expected to find.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class AnnotatorConfig:
    beta: float = 5.0  # Bradley-Terry sharpness: higher = more decisive annotators
    noise: float = 0.3  # std of the Gaussian noise on each utility
    length_bias: float = 0.4  # utility per 10 words of response (gold charges 0.3 per 10 padding words)


def utility(gold: float, n_words: int, cfg: AnnotatorConfig) -> float:
    """Noise-free annotator utility of a response."""
    return gold + cfg.length_bias * n_words / 10.0


def prefer_a_probability(gold_a: float, n_a: int, gold_b: float, n_b: int, cfg: AnnotatorConfig) -> float:
    """P(annotator prefers A) before the utility noise (Bradley-Terry on noise-free utilities)."""
    z = cfg.beta * (utility(gold_a, n_a, cfg) - utility(gold_b, n_b, cfg))
    return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, z))))


def annotate(
    gold_a: float, n_a: int, gold_b: float, n_b: int, cfg: AnnotatorConfig, rng: random.Random
) -> bool:
    """One noisy annotator label: True when A is preferred."""
    ua = utility(gold_a, n_a, cfg) + rng.gauss(0.0, cfg.noise)
    ub = utility(gold_b, n_b, cfg) + rng.gauss(0.0, cfg.noise)
    z = cfg.beta * (ua - ub)
    p = 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, z))))
    return rng.random() < p
