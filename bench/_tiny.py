"""Tiny models and prompts for the benches, built from scratch in a directory (nothing downloaded).

Shared by ``ppo_iteration.py`` and ``trl_compare.py`` so that both time the very same models: a byte-level BPE
tokenizer trained on synthetic text, a random Llama saved with ``save_pretrained``, and a value-head reward model
on that backbone (:class:`ppomax.models.ValueHeadModel`, fresh seeded head), plus synthetic HH-style prompts.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch

WORDS = [
    "the",
    "a",
    "of",
    "to",
    "and",
    "in",
    "is",
    "it",
    "you",
    "that",
    "he",
    "was",
    "for",
    "on",
    "are",
    "with",
    "as",
    "his",
    "they",
    "be",
    "at",
    "one",
    "have",
    "this",
    "from",
    "or",
    "had",
    "by",
    "word",
    "but",
    "what",
    "some",
    "we",
    "can",
    "out",
    "other",
    "were",
    "all",
    "there",
    "when",
    "up",
    "use",
    "your",
    "how",
    "said",
    "an",
    "each",
    "she",
    "which",
    "do",
    "their",
    "time",
    "if",
    "will",
    "way",
    "about",
    "many",
    "then",
    "them",
    "write",
    "would",
    "like",
    "so",
    "these",
    "her",
    "long",
    "make",
    "thing",
    "see",
    "him",
    "two",
    "has",
    "look",
    "more",
    "day",
    "could",
    "go",
    "come",
    "did",
    "number",
    "sound",
    "no",
    "most",
    "people",
    "my",
    "over",
    "know",
    "water",
    "than",
    "call",
    "first",
    "who",
    "may",
    "down",
    "side",
    "been",
    "now",
    "find",
    "paris",
    "bread",
    "joke",
    "capital",
    "france",
    "count",
    "five",
    "colour",
    "dog",
    "sky",
    "blue",
    "nice",
]


# Real models' shapes (random weights of that shape: the benches time the architecture, not the weights).
SHAPES: dict[str, dict[str, Any]] = {
    # HuggingFaceTB/SmolLM2-135M-Instruct's config.json (a 134.5M Llama)
    "smollm2-135m": {
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
    },
}


def tiny_shape(hidden: int, layers: int) -> dict[str, Any]:
    """The benches' tiny Llama of ``hidden`` x ``layers``: heads of 32, an MLP 4x wide."""
    heads = max(1, hidden // 32)
    return {
        "hidden_size": hidden,
        "intermediate_size": 4 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
    }


def build_models(
    root: Path, shape: dict[str, Any], vocab: int, seed: int, rng: random.Random | None = None
) -> tuple[Path, Path, int]:
    """Tokenizer + random Llama of ``shape`` (LlamaConfig fields; its ``vocab_size`` is ignored) in
    ``root/policy``, value-head RM on the same backbone in ``root/rm``.

    The model has ``vocab`` token rows, or the tokenizer's size if larger (a byte-level BPE has at least 259
    tokens); the BPE tokenizer trained on the synthetic corpus has at most ``vocab`` (the corpus saturates near
    600: larger vocabularies leave the rows above unused by the prompts, which generation still samples, as real
    models' padded vocabularies do). ``rng`` draws the tokenizer's corpus
    (default ``Random(seed)``). Returns ``(policy_dir, rm_dir, n_params)`` (parameters of the policy)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ppomax.demo.tokenizer import train_bpe_tokenizer
    from ppomax.models import ValueHeadModel

    rng = rng or random.Random(seed)
    texts = [" ".join(rng.choice(WORDS) for _ in range(40)) for _ in range(400)]
    fast = train_bpe_tokenizer(texts, vocab)
    config = LlamaConfig(
        **{**shape, "vocab_size": max(vocab, len(fast))},
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    policy = root / "policy"
    model.save_pretrained(policy)
    fast.save_pretrained(policy)
    ValueHeadModel.from_causal_lm(policy, seed=seed).save_pretrained(root / "rm")
    return policy, root / "rm", n_params


def random_prompt(rng: random.Random, words: int) -> str:
    """An HH-style single-turn prompt of ``words`` random words."""
    q = " ".join(rng.choice(WORDS) for _ in range(words))
    return f"\n\nHuman: {q}?\n\nAssistant:"


def write_prompts(path: Path, prompts: list[str]) -> Path:
    """``{"prompt": ...}`` JSON lines (a format ``data.prompts`` reads)."""
    with path.open("w") as fh:
        for p in prompts:
            fh.write(json.dumps({"prompt": p}) + "\n")
    return path


def build(root: Path, hidden: int, layers: int, vocab: int, seed: int) -> tuple[Path, Path, Path, int]:
    """Models as :func:`build_models` plus 512 prompts of 8-24 words in ``root/prompts.jsonl``.

    Returns ``(policy_dir, rm_dir, prompts_file, n_params)``."""
    rng = random.Random(seed)
    policy, rm, n_params = build_models(root, tiny_shape(hidden, layers), vocab, seed, rng)
    prompts = [random_prompt(rng, rng.randint(8, 24)) for _ in range(512)]
    return policy, rm, write_prompts(root / "prompts.jsonl", prompts), n_params


def one_update_overrides(
    policy: Path, rm: Path, prompts: Path, out_dir: Path, batch: int, new_tokens: int, iterations: int
) -> list[str]:
    """``--set`` overrides of the ``ppo_max`` preset for the PPO-iteration benches: these models and prompts, no
    critic pre-training, ``batch`` rollouts per iteration trained as one minibatch in one epoch (one update of
    each model), ``new_tokens`` at most, quiet logging into ``out_dir``."""
    return [
        f"model.policy={policy}",
        f"model.reward={rm}",
        f"data.prompts={prompts}",
        f"generation.max_new_tokens={new_tokens}",
        "ppo.critic_pretrain_steps=0",
        f"ppo.iterations={iterations}",
        f"ppo.rollout_batch_size={batch}",
        f"ppo.buffer_size={batch}",
        f"ppo.minibatch_size={batch}",
        "ppo.ppo_epochs=1",
        f"logging.out_dir={out_dir}",
        "logging.tensorboard=false",
        "logging.progress=false",
    ]
