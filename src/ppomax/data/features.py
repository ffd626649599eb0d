"""What the trainers load: every record of a source parsed (:mod:`ppomax.data.formats`) and tokenised
(:mod:`ppomax.data.tokenize`) in one pass, in ``num_proc`` processes with a progress bar
(:func:`ppomax.data.pipeline.map_records`). The results equal those of the loaders followed by the tokenisers, for
any ``num_proc``."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any, Literal

from .chat import ChatFormatSetting, Renderer
from .formats import _parse_pair, _parse_prompt, _parse_sft
from .io import DataError, LoadStats, OnError
from .pipeline import map_records
from .sources import SourceSpec, as_source
from .tokenize import tokenize_pair, tokenize_prompt, tokenize_sft

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def pair_features(
    source: SourceSpec,
    tokenizer: PreTrainedTokenizerBase,
    *,
    format: ChatFormatSetting = "auto",
    max_prompt_tokens: int | None,
    max_response_tokens: int | None,
    on_error: OnError = "fail",
    stats: LoadStats | None = None,
    num_proc: int = 1,
    progress: str | None = None,
) -> list[dict[str, Any]]:
    """:func:`~ppomax.data.tokenize.tokenize_pair` of every preference pair of ``source``."""
    work = partial(_pair, Renderer(format, tokenizer), tokenizer, max_prompt_tokens, max_response_tokens)
    return _run(source, work, "preference pairs", on_error, stats, num_proc, progress)


def sft_features(
    source: SourceSpec,
    tokenizer: PreTrainedTokenizerBase,
    *,
    format: ChatFormatSetting = "auto",
    max_prompt_tokens: int | None,
    max_response_tokens: int | None,
    assistant_turns: Literal["all", "last"] = "all",
    on_error: OnError = "fail",
    stats: LoadStats | None = None,
    num_proc: int = 1,
    progress: str | None = None,
) -> list[dict[str, Any]]:
    """:func:`~ppomax.data.tokenize.tokenize_sft` of every SFT example of ``source``."""
    renderer = Renderer(format, tokenizer)
    work = partial(_sft, renderer, tokenizer, assistant_turns, max_prompt_tokens, max_response_tokens)
    return _run(source, work, "SFT examples", on_error, stats, num_proc, progress)


def prompt_features(
    source: SourceSpec,
    tokenizer: PreTrainedTokenizerBase,
    *,
    format: ChatFormatSetting = "auto",
    max_prompt_tokens: int | None,
    moss_roles: Literal["human_first", "last_is_human"] = "human_first",
    on_error: OnError = "fail",
    stats: LoadStats | None = None,
    num_proc: int = 1,
    progress: str | None = None,
) -> list[tuple[list[int], str, dict[str, Any]]]:
    """``(ids, text, meta)`` of every PPO prompt of ``source``: :func:`~ppomax.data.tokenize.tokenize_prompt`,
    the prompt's text and its record's other fields."""
    work = partial(_prompt, Renderer(format, tokenizer), tokenizer, moss_roles, max_prompt_tokens)
    return _run(source, work, "prompts", on_error, stats, num_proc, progress)


def _run(
    source: SourceSpec,
    work: Any,
    kind: str,
    on_error: OnError,
    stats: LoadStats | None,
    num_proc: int,
    progress: str | None,
) -> list[Any]:
    own = stats if stats is not None else LoadStats()
    out = [
        item
        for _, item in map_records(
            source, work, on_error=on_error, stats=own, num_proc=num_proc, progress=progress
        )
    ]
    if not out:
        raise DataError(as_source(source).name, None, f"no usable {kind}", own.summary())
    return out


# the work on one record; module-level functions, so that a worker started by spawn can unpickle them


def _pair(
    renderer: Renderer,
    tokenizer: PreTrainedTokenizerBase,
    max_prompt: int | None,
    max_response: int | None,
    rec: Any,
    stats: LoadStats,
) -> dict[str, Any]:
    return tokenize_pair(tokenizer, _parse_pair(rec, renderer, stats), max_prompt, max_response, stats)


def _sft(
    renderer: Renderer,
    tokenizer: PreTrainedTokenizerBase,
    assistant_turns: Literal["all", "last"],
    max_prompt: int | None,
    max_response: int | None,
    rec: Any,
    stats: LoadStats,
) -> dict[str, Any]:
    example = _parse_sft(rec, renderer, assistant_turns, stats)
    return tokenize_sft(tokenizer, example, max_prompt, max_response, stats)


def _prompt(
    renderer: Renderer,
    tokenizer: PreTrainedTokenizerBase,
    moss_roles: str,
    max_prompt: int | None,
    rec: Any,
    stats: LoadStats,
) -> tuple[list[int], str, dict[str, Any]]:
    example = _parse_prompt(rec, renderer, moss_roles, stats)
    return (
        tokenize_prompt(tokenizer, example.dialogue or example.prompt, max_prompt, stats),
        example.prompt,
        dict(example.meta),
    )
