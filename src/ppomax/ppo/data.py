"""The PPO data the iteration draws from (:func:`load_data`): the training prompts, the held-out prompts of
evaluation, the PPO-ptx examples, and their streams with a resumable position.

Each stream walks a seeded permutation of its examples, a new one every epoch (``seed + epoch``), and hands out
``k`` examples per call; its whole state is ``(epoch, pos)``, saved in checkpoints, so a resumed run sees exactly
the prompts it would have seen. With several processes each rank takes an interleaved share of the same global
batch, so together they consume the global order once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ppomax.config import PPOConfig
from ppomax.data import (
    LoadStats,
    PromptCollator,
    SFTCollator,
    Source,
    pad_id_of,
    prompt_features,
    sft_features,
)
from ppomax.data.batching import IndexStream
from ppomax.trainers.common import data_source

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class PromptSet:
    """Tokenised prompts (ids, left truncated) with their texts and metadata."""

    ids: list[list[int]]
    texts: list[str]
    meta: list[dict[str, Any]]
    stats: LoadStats

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, indices: list[int], pad_id: int, device: torch.device) -> dict[str, Any]:
        """Left-padded ``input_ids`` / ``attention_mask`` [B, P] on ``device`` plus ``prompts`` and ``meta``."""
        b = PromptCollator(pad_id)([self.ids[i] for i in indices])
        return {
            "input_ids": b["input_ids"].to(device),
            "attention_mask": b["attention_mask"].to(device),
            "prompts": [self.texts[i] for i in indices],
            "meta": [self.meta[i] for i in indices],
        }


def load_prompt_set(
    source: Source, cfg: PPOConfig, tokenizer: PreTrainedTokenizerBase, progress: str | None = None
) -> PromptSet:
    """Tokenised prompts of a source (formats of :mod:`ppomax.data.formats`); bad records per ``data.on_bad_line``."""
    d = cfg.data
    stats = LoadStats()
    rows = prompt_features(
        source,
        tokenizer,
        format=d.chat_format,
        max_prompt_tokens=d.max_prompt_tokens,
        on_error=d.on_bad_line,
        stats=stats,
        num_proc=d.num_proc,
        progress=progress,
    )
    return PromptSet([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], stats)


@dataclass
class PTXSet:
    """Tokenised SFT/pretraining examples for the PPO-ptx loss (paper eq. 17)."""

    features: list[dict[str, Any]]
    stats: LoadStats

    def __len__(self) -> int:
        return len(self.features)

    def batch(self, indices: list[int], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
        """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 off the trained tokens)."""
        b = SFTCollator(pad_id)([self.features[i] for i in indices])
        return {k: v.to(device) for k, v in b.items()}


def load_ptx_set(
    source: Source, cfg: PPOConfig, tokenizer: PreTrainedTokenizerBase, progress: str | None = None
) -> PTXSet:
    """SFT examples (any SFT format); the LM loss covers their response tokens, as in SFT."""
    d = cfg.data
    stats = LoadStats()
    feats = sft_features(
        source,
        tokenizer,
        format=d.chat_format,
        max_prompt_tokens=d.max_prompt_tokens,
        max_response_tokens=d.max_ptx_response_tokens,
        on_error=d.on_bad_line,
        stats=stats,
        num_proc=d.num_proc,
        progress=progress,
    )
    return PTXSet(feats, stats)


@dataclass
class PPOData:
    """The prompts (training and held-out), the PPO-ptx examples, and the resumable streams drawing from them."""

    prompts: PromptSet
    prompt_stream: IndexStream
    valid: PromptSet | None
    ptx: PTXSet | None
    ptx_stream: IndexStream | None
    pad_id: int

    def next_ptx(self, k: int, device: torch.device) -> dict[str, Tensor]:
        assert self.ptx is not None and self.ptx_stream is not None
        return self.ptx.batch(self.ptx_stream.take(k), self.pad_id, device)


def load_data(
    cfg: PPOConfig,
    tokenizer: PreTrainedTokenizerBase,
    rank: int,
    world: int,
    resizable: bool = False,
    sources: dict[str, Source] | None = None,
) -> PPOData:
    """The PPO data; ``resizable``: a resumed run may continue its streams on data of another size
    (``--allow-data-change``); ``sources``: the run's data sources by key (data objects given from Python
    included; by default the config's)."""
    d, p = cfg.data, cfg.ppo
    assert d.prompts
    sources = sources or {}

    def progress(what: str) -> str | None:  # a progress bar on the main process
        return what if rank == 0 and cfg.logging.progress else None

    def source(name: str) -> Source:
        return sources.get(f"data.{name}") or data_source(cfg, name)

    prompts = load_prompt_set(source("prompts"), cfg, tokenizer, progress("prompts"))
    valid = (
        load_prompt_set(source("valid_prompts"), cfg, tokenizer, progress("valid prompts"))
        if d.valid_prompts
        else None
    )
    ptx = load_ptx_set(source("ptx"), cfg, tokenizer, progress("ptx")) if (p.ptx_coef > 0 and d.ptx) else None
    return PPOData(
        prompts=prompts,
        prompt_stream=IndexStream(len(prompts), cfg.seed, rank=rank, world=world, resizable=resizable),
        valid=valid,
        ptx=ptx,
        ptx_stream=(
            IndexStream(len(ptx), cfg.seed + 1, rank=rank, world=world, resizable=resizable) if ptx else None
        ),
        pad_id=pad_id_of(tokenizer),
    )


__all__ = [
    "IndexStream",
    "PPOData",
    "PTXSet",
    "PromptSet",
    "load_data",
    "load_prompt_set",
    "load_ptx_set",
    "pad_id_of",
]
