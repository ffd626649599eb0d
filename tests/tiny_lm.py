"""Tiny causal LMs for trainer tests: a BPE tokenizer trained on the test's texts plus a 2-layer Llama (or GPT-2)
saved together in one directory, as a user's model directory would be. Nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig

from helpers import make_tiny_tokenizer


def tiny_config(
    vocab_size: int,
    arch: str = "llama",
    hidden: int = 32,
    layers: int = 2,
    max_pos: int = 256,
    tie: bool | None = None,
):
    """``tie``: whether the LM head shares the input embeddings' weight (``tie_word_embeddings``, as in SmolLM2);
    None: the architecture's default (Llama unties, GPT-2 ties)."""
    ids = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    if tie is not None:
        ids["tie_word_embeddings"] = tie
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=2, n_positions=max_pos, **ids
        )
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=max_pos,
        **ids,
    )


def make_tiny_lm(
    tmp_path: Path,
    texts: list[str] | None = None,
    *,
    arch: str = "llama",
    name: str = "base",
    weights: bool = True,
    vocab_size: int = 300,
    seed: int = 0,
    tie: bool | None = None,
) -> Path:
    """A model directory (config, weights unless ``weights=False``, tokenizer) under ``tmp_path/name``; ``tie``:
    see :func:`tiny_config`."""
    tok_dir = make_tiny_tokenizer(tmp_path, texts, vocab_size=vocab_size, name=f"{name}-tok")
    tok = AutoTokenizer.from_pretrained(tok_dir)
    out = tmp_path / name
    config = tiny_config(len(tok), arch, tie=tie)
    if weights:
        torch.manual_seed(seed)
        AutoModelForCausalLM.from_config(config).save_pretrained(out)
    else:
        config.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_yaml(path: Path, data: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path
