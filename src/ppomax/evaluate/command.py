"""`ppomax eval` as a function (:func:`evaluate`): both models loaded from their paths, the prompts from any data
source, rendered in the chat format and cut to the prompt budget the policy's run used
(:func:`run_data_config`); the result as a table (:func:`format_table`) or JSON (:func:`write_json`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ppomax.data.chat import ChatFormat, ChatFormatSetting, Dialogue, resolve_chat_format
from ppomax.data.io import SKIP_HINT, DataError, LoadStats, OnError
from ppomax.data.sources import Source, SourceSpec, describe
from ppomax.errors import UserError
from ppomax.evaluate.compare import DEFAULT_MAX_PROMPT_TOKENS, EvalSettings, evaluate_models

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


#: the end of the message of a prompt record that stops `ppomax eval`
EVAL_SKIP_HINT = "--on-bad-line skip skips and counts such records"


def load_eval_prompts(
    path: SourceSpec,
    limit: int | None = None,
    *,
    chat_format: ChatFormatSetting = "auto",
    tokenizer: PreTrainedTokenizerBase | None = None,
    on_error: OnError = "fail",
    stats: LoadStats | None = None,
) -> tuple[list[Dialogue | str], list[str] | None]:
    """Prompts (dialogues, rendered in ``chat_format`` with ``tokenizer``: :func:`ppomax.data.load_prompts`) and
    their subsets (``None`` when no record names one) from any prompts source of ppomax.data (a file, a
    directory, a glob, a Hub dataset, a mapping of load_dataset's arguments: :mod:`ppomax.data.sources`).
    ``on_error="skip"`` drops the records ppomax cannot read, counted in ``stats``; ``limit`` counts the prompts
    kept."""
    from ppomax.data import load_prompts

    examples = load_prompts(path, on_error, stats, format=chat_format, tokenizer=tokenizer)
    if limit is not None:
        examples = examples[:limit]
    if not examples:
        raise UserError(f"{describe(path)}: no prompts")
    prompts = [e.dialogue or e.prompt for e in examples]
    subsets = [e.meta.get("subset") for e in examples]
    if all(s is None for s in subsets):
        return prompts, None
    return prompts, [str(s) if s is not None else "helpful" for s in subsets]


def run_data_config(model_dir: str | os.PathLike[str]) -> tuple[dict[str, Any], Path] | None:
    """``(data section, config path)`` of the run that saved ``model_dir`` (``<run>/final``,
    ``<run>/final/policy``, ...): its ``config.yaml`` in ``model_dir`` or up to two levels above; None without
    one (a Hub id has none). Evaluation renders and cuts prompts as that run did (``chat_format``,
    ``max_prompt_tokens``)."""
    import yaml

    if not Path(model_dir).exists():
        return None
    start = Path(model_dir).absolute()
    for d in (start, start.parent, start.parent.parent):
        path = d / "config.yaml"
        if not path.is_file():
            continue
        try:
            cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise UserError(f"{path}: cannot read the run's config: {type(e).__name__}") from None
        data = cfg.get("data") if isinstance(cfg, dict) else None
        if isinstance(data, dict):
            return data, path
    return None


def eval_chat_format(
    policy_dir: str | os.PathLike[str], tokenizer: PreTrainedTokenizerBase, override: str | None = None
) -> tuple[ChatFormat, str]:
    """The chat format of an evaluation and why: ``override`` (``--chat-format``), else the policy's run config
    (:func:`run_data_config`: the format PPO's own evaluation used), else ``auto``; ``auto`` resolved with
    ``tokenizer`` (:func:`ppomax.data.resolve_chat_format`)."""
    if override is not None:
        return resolve_chat_format(override, tokenizer, "--chat-format")
    found = run_data_config(policy_dir)
    if found is not None and "chat_format" in found[0]:
        return resolve_chat_format(str(found[0]["chat_format"]), tokenizer, f"data.chat_format in {found[1]}")
    fmt, why = resolve_chat_format("auto", tokenizer, "--chat-format")
    return fmt, f"{why} (default: no run config.yaml at or above the policy)"


def evaluate(
    policy_dir: str | os.PathLike[str],
    baseline_dir: str | os.PathLike[str],
    prompts_file: Any,
    judges: Mapping[str, tuple[str, Any]],
    settings: EvalSettings | None = None,
    tokenizer_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
    chat_format: str | None = None,
) -> dict[str, Any]:
    """`ppomax eval` as a function: load both policies (and any reward-model judge given as a path) and
    run :func:`evaluate_models` with ``judges`` as it takes them. Prompts are rendered in the chat format of
    :func:`eval_chat_format` (``chat_format``: the override), recorded in the result as ``chat_format`` and
    ``chat_format_reason``; the prompt records skipped (``settings.on_bad_line``) as ``prompts_skipped`` and
    ``prompts_skip_reasons``."""
    from ppomax.models import ValueHeadModel, check_same_tokens, check_vocab, load_causal_lm, load_tokenizer

    s = settings or EvalSettings()
    if s.max_prompt_tokens is None:  # cut as the policy's run cut its prompts
        found = run_data_config(policy_dir)
        budget = found[0].get("max_prompt_tokens") if found is not None else None
        s = dataclasses.replace(s, max_prompt_tokens=int(budget or DEFAULT_MAX_PROMPT_TOKENS))
    tokenizer_key = "--tokenizer" if tokenizer_dir else "--policy"
    tokenizer = load_tokenizer(str(tokenizer_dir or policy_dir), key=tokenizer_key)
    fmt, why = eval_chat_format(policy_dir, tokenizer, chat_format)
    # held-out prompts: a Hub dataset (or a source with several splits) names its split
    source = (
        prompts_file if isinstance(prompts_file, Source) else Source(prompts_file, "--prompts", held_out=True)
    )
    stats = LoadStats()
    try:
        prompts, subsets = load_eval_prompts(
            source, s.limit, chat_format=fmt, tokenizer=tokenizer, on_error=s.on_bad_line, stats=stats
        )
    except DataError as e:  # the loaders name the training config's key; eval's is a flag
        if e.hint != SKIP_HINT:
            raise
        raise DataError(e.path, e.line, e.reason, e.detail, EVAL_SKIP_HINT, row=e.row) from None
    policy = load_causal_lm(str(policy_dir), key="--policy")
    check_vocab(policy, tokenizer, "--policy", tokenizer_key)
    baseline = load_causal_lm(str(baseline_dir), key="--baseline")
    check_vocab(baseline, tokenizer, "--baseline", tokenizer_key)
    loaded: dict[str, tuple[str, Any]] = {}
    for name, (kind, judge) in judges.items():
        if kind == "reward-model" and isinstance(judge, str | os.PathLike):
            path = os.fspath(judge)
            judge = ValueHeadModel.from_pretrained(path, key=f"--judge {name}")
            check_vocab(judge, tokenizer, f"--judge {name}", tokenizer_key)
            check_same_tokens(path, tokenizer, f"--judge {name}", tokenizer_key)
        loaded[name] = (kind, judge)
    result = evaluate_models(policy, baseline, tokenizer, prompts, subsets, loaded, s, progress=progress)
    result["policy"]["path"] = str(policy_dir)
    result["baseline"]["path"] = str(baseline_dir)
    result["prompts_file"] = source.name
    result["chat_format"] = fmt
    result["chat_format_reason"] = why
    result["prompts_skipped"] = stats.skipped
    result["prompts_skip_reasons"] = dict(stats.skip_reasons)
    return result


def format_table(result: dict[str, Any], policy_name: str = "policy", baseline_name: str = "baseline") -> str:
    """A plain-text summary of :func:`evaluate`'s result."""
    lines = []
    for name, j in result["judges"].items():
        lines.append(
            f"judge {name}: {policy_name} vs {baseline_name} (tie margin {result['settings']['tie_margin']})"
        )
        lines.append(
            f"  {'subset':<10} {'n':>4} {'win':>6} {'tie':>6} {'lose':>6}  {'mean ' + policy_name:>14} "
            f"{'mean ' + baseline_name:>14}"
        )
        for subset, r in j["win_tie_lose"].items():
            lines.append(
                f"  {subset:<10} {r['n']:>4} {r['win_rate']:>6.0%} {r['tie_rate']:>6.0%} {r['lose_rate']:>6.0%}  "
                f"{r['mean_a']:>14.3f} {r['mean_b']:>14.3f}"
            )
    p, b = result["policy"], result["baseline"]
    lines.append(
        f"{'':<12} {'perplexity':>10} {'len(tok)':>9} {'len(words)':>10} {'cut':>5} {'KL/token':>9} {'KL/seq':>8}"
    )
    lines.append(
        f"{policy_name:<12} {p['perplexity']:>10.3f} {p['length_tokens']:>9.1f} {p['length_words']:>10.1f} "
        f"{p['truncated_rate']:>5.0%} {p['kl_per_token']:>9.4f} {p['kl_per_sequence']:>8.3f}"
    )
    lines.append(
        f"{baseline_name:<12} {b['perplexity']:>10.3f} {b['length_tokens']:>9.1f} {b['length_words']:>10.1f} "
        f"{b['truncated_rate']:>5.0%} {'-':>9} {'-':>8}"
    )
    return "\n".join(lines)


def write_json(result: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(result, indent=1), encoding="utf-8")
    return p
