"""What every saved model directory carries besides its weights, and tied weights written once.

* :func:`save_generation_config`: the base model's generation config (loaded with it from its
  ``generation_config.json``, or derived from its ``config.json``), so a saved model stops at its end-of-turn token
  under plain ``generate``; ids the base has none of come from the tokenizer.
* :func:`share_tied_weights`: a state dict gathered under ZeRO/FSDP holds a copy of each tied weight (the LM head
  of a model that ties it to the input embeddings); pointing the copy back at its source lets ``save_pretrained``
  drop it as it does for the model's own weights.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import cast

import torch
from torch import Tensor
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from .adapter_dir import is_peft_model

TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def causal_lm_of(model: torch.nn.Module) -> PreTrainedModel:
    """The transformers model inside ``model``: a value-head model's backbone, a PEFT model's base."""
    model = getattr(model, "backbone", model)
    # PEFT types the model it wraps as any Module: here it is always a transformers model
    return cast(PreTrainedModel, model.get_base_model() if is_peft_model(model) else model)


def save_generation_config(
    model: torch.nn.Module, out_dir: Path, tokenizer: PreTrainedTokenizerBase | None
) -> None:
    """``generation_config.json`` in ``out_dir``: the base model's, with the tokenizer's BOS/EOS/pad ids filled in
    where the base has none."""
    lm = causal_lm_of(model)
    own = getattr(lm, "generation_config", None)
    gen = copy.deepcopy(own) if own is not None else GenerationConfig.from_model_config(lm.config)
    if tokenizer is not None:
        for key in TOKEN_IDS:
            if getattr(gen, key, None) is None:
                setattr(gen, key, getattr(tokenizer, key, None))
    gen.save_pretrained(out_dir)


def tied_weight_keys(model: torch.nn.Module) -> dict[str, str]:
    """``{tied name: source name}`` in ``model``'s state-dict names, for every transformers model inside it whose
    config ties weights (``tie_word_embeddings``)."""
    out: dict[str, str] = {}
    for prefix, module in model.named_modules():
        if isinstance(module, PreTrainedModel):
            ties = module.get_expanded_tied_weights_keys(all_submodels=False)
            out.update({_join(prefix, k): _join(prefix, v) for k, v in ties.items()})
    return out


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def share_tied_weights(state_dict: dict[str, Tensor], model: torch.nn.Module) -> dict[str, Tensor]:
    """``state_dict`` with each tied weight that equals its source replaced by that very tensor, so that
    ``save_pretrained`` (which finds ties by shared storage) writes it once."""
    out = dict(state_dict)
    for tied, source in tied_weight_keys(model).items():
        if tied in out and source in out and torch.equal(out[tied], out[source]):
            out[tied] = out[source]
    return out
