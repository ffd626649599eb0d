"""Tokenisation and its truncation rules.

* Prompts are truncated from the **left**, keeping the latest turns: first whole turns are dropped (cutting just
  before a ``"\\n\\nHuman:"`` marker, oldest first, as few as needed); only if the latest human turn alone is still
  too long are tokens cut from its left. The end of the prompt (the assistant cue) is always kept. Every truncated
  prompt is counted in ``LoadStats.truncated_prompts``; cuts inside a turn are also counted in ``notes``.
* Responses are truncated from the **right** to ``max_response_tokens``. EOS is appended to a complete response
  (and counts toward the budget); a truncated response gets no EOS, as a generation that hits
  ``max_new_tokens`` has none. Counted in ``LoadStats.truncated_responses``.
* Special tokens: the tokenizer's own leading special tokens (BOS for Llama-style tokenizers, none for GPT-2 or
  Qwen) are put in front of the prompt unless the text already starts with the BOS string (chat templates
  usually write it). Nothing is appended to prompts.
* A response is tokenised as the continuation of its prompt: the last characters of the prompt are encoded with
  and without the response and the response keeps the extra tokens. This avoids the spurious word-start token
  SentencePiece tokenizers (Llama, Mistral) put at the start of every separately encoded string, and equals
  encoding the response alone for byte-level BPE tokenizers (GPT-2, Qwen, Llama 3). Prompt and response ids are
  concatenated, so the prompt/response boundary is exact; generation in PPO continues the same prompt ids.
"""

from __future__ import annotations

import contextlib
import re
import weakref
from typing import Any

from ppomax.errors import ConfigError, ModelPathError

from .chat import HUMAN
from .formats import PreferencePair, SFTExample
from .io import LoadStats

IGNORE_INDEX = -100
_CONTEXT_CHARS = 64  # enough text before a boundary to reproduce how the tokenizer treats it
_prefix_cache: weakref.WeakKeyDictionary[Any, list[int]] = weakref.WeakKeyDictionary()


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without any special tokens added."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def special_prefix(tokenizer: Any) -> list[int]:
    """The special tokens the tokenizer puts in front of a text by default (e.g. ``[bos_id]``), maybe ``[]``."""
    try:
        return _prefix_cache[tokenizer]
    except (KeyError, TypeError):
        pass
    probe = "hello"
    with_special = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    plain = encode(tokenizer, probe)
    prefix: list[int] = []
    for k in range(len(with_special) - len(plain) + 1):
        if with_special[k : k + len(plain)] == plain:
            prefix = with_special[:k]
            break
    with contextlib.suppress(TypeError):  # not weak-referenceable: recomputed next time
        _prefix_cache[tokenizer] = prefix
    return prefix


def _prefix_for(tokenizer: Any, text: str) -> list[int]:
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos):
        return []
    return special_prefix(tokenizer)


def encode_continuation(tokenizer: Any, context: str, text: str) -> list[int]:
    """Ids of ``text`` as it is tokenised after ``context`` (see the module docstring); falls back to
    encoding ``text`` alone if the tokens of the context change when ``text`` follows."""
    if not context:
        return encode(tokenizer, text)
    ctx = context[-_CONTEXT_CHARS:]
    ctx_ids = encode(tokenizer, ctx)
    full = encode(tokenizer, ctx + text)
    if full[: len(ctx_ids)] == ctx_ids:
        return full[len(ctx_ids) :]
    return encode(tokenizer, text)


def _check_budget(key: str, value: int | None, minimum: int) -> None:
    """``key`` is the config key the budget comes from: the trainers pass ``data.*`` values straight through."""
    if value is not None and value < minimum:
        n = minimum - 1
        why = f" (the tokenizer puts {n} special token{'s' * (n > 1)} in front of every text)" if n else ""
        raise ConfigError(f"{key}: must be at least {minimum}{why}, got {value}")


def tokenize_prompt(
    tokenizer: Any,
    prompt: str,
    max_tokens: int | None,
    stats: LoadStats | None = None,
    *,
    turn_marker: str = HUMAN,
) -> list[int]:
    """Prompt ids of at most ``max_tokens`` tokens, left-truncated keeping the latest turns.

    ``turn_marker`` is the string a turn starts with (the HH ``"\\n\\nHuman:"`` by default); pass your chat
    template's user-turn opener to cut templated prompts at turn boundaries, else they are cut by tokens.
    """
    prefix = _prefix_for(tokenizer, prompt)
    _check_budget("data.max_prompt_tokens", max_tokens, len(prefix) + 1)
    ids = prefix + encode(tokenizer, prompt)
    if max_tokens is None or len(ids) <= max_tokens:
        return ids
    if stats is not None:
        stats.truncated_prompts += 1
    starts = (
        [m.start() for m in re.finditer(re.escape(turn_marker), prompt) if m.start() > 0]
        if turn_marker
        else []
    )
    for s in starts:  # oldest first: the first cut that fits drops the fewest turns
        cut = prefix + encode(tokenizer, prompt[s:])
        if len(cut) <= max_tokens:
            return cut
    if stats is not None:
        stats.notes["prompt cut inside its latest turn (no whole-turn cut fits)"] += 1
    tail = encode(tokenizer, prompt[starts[-1] :]) if starts else ids[len(prefix) :]
    return prefix + tail[len(tail) - (max_tokens - len(prefix)) :]


def tokenize_response(
    tokenizer: Any,
    response: str,
    max_tokens: int | None,
    *,
    context: str = "",
    add_eos: bool = True,
) -> tuple[list[int], bool]:
    """``(ids, truncated)`` for a response after ``context``: EOS appended when complete (see module doc)."""
    _check_budget("data.max_response_tokens", max_tokens, 1)
    ids = encode_continuation(tokenizer, context, response)
    eos_id = getattr(tokenizer, "eos_token_id", None)
    eos = getattr(tokenizer, "eos_token", None)
    if add_eos and not (eos and response.rstrip().endswith(eos)):
        if eos_id is None:
            where = getattr(tokenizer, "name_or_path", "") or "this tokenizer"
            raise ModelPathError(
                f"the tokenizer {where} has no EOS token to end responses with; add one "
                "(tokenizer.add_special_tokens({'eos_token': ...})) and save it again"
            )
        full = [*ids, eos_id]
    else:
        full = ids
    if max_tokens is None or len(full) <= max_tokens:
        return full, False
    return ids[:max_tokens], True


def tokenize_pair(
    tokenizer: Any,
    pair: PreferencePair,
    max_prompt_tokens: int | None,
    max_response_tokens: int | None,
    stats: LoadStats | None = None,
    *,
    add_eos: bool = True,
) -> dict[str, Any]:
    """Ids of a preference pair: ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` (responses only, EOS
    included when complete), ``chosen_truncated``, ``rejected_truncated``. The sequences the RM scores are
    ``prompt_ids + chosen_ids`` and ``prompt_ids + rejected_ids`` (built by ``PreferenceCollator``)."""
    prompt_ids = tokenize_prompt(tokenizer, pair.prompt, max_prompt_tokens, stats)
    out: dict[str, Any] = {"prompt_ids": prompt_ids}
    for name, text in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        ids, truncated = tokenize_response(
            tokenizer, text, max_response_tokens, context=pair.prompt, add_eos=add_eos
        )
        out[f"{name}_ids"] = ids
        out[f"{name}_truncated"] = truncated
        if truncated and stats is not None:
            stats.truncated_responses += 1
    return out


def tokenize_sft(
    tokenizer: Any,
    example: SFTExample,
    max_prompt_tokens: int | None,
    max_response_tokens: int | None,
    stats: LoadStats | None = None,
    *,
    add_eos: bool = True,
) -> dict[str, Any]:
    """``input_ids``, ``labels`` (the id on trainable tokens, ``-100`` elsewhere) and ``prompt_length`` (tokens
    before the final response) of an SFT example.

    The context (all segments but the final response, earlier assistant turns keep their trainable flag) is
    limited to ``max_prompt_tokens`` by dropping whole leading segments at context-segment starts (turn
    boundaries), then by cutting tokens from the left; the final response follows :func:`tokenize_response`.
    """
    segs = example.segments
    context_segs, (resp_text, _) = segs[:-1], segs[-1]
    context_text = "".join(s for s, _ in context_segs)
    prefix = _prefix_for(tokenizer, context_text or resp_text)
    _check_budget("data.max_prompt_tokens", max_prompt_tokens, len(prefix) + 1)
    pieces: list[tuple[list[int], bool]] = []
    done = ""
    for text, flag in context_segs:
        pieces.append((encode_continuation(tokenizer, done, text), flag))
        done += text
    total = len(prefix) + sum(len(ids) for ids, _ in pieces)
    if max_prompt_tokens is not None and total > max_prompt_tokens:
        if stats is not None:
            stats.truncated_prompts += 1
        pieces = _truncate_context(tokenizer, context_segs, pieces, max_prompt_tokens - len(prefix), stats)
    resp_ids, truncated = tokenize_response(
        tokenizer, resp_text, max_response_tokens, context=done, add_eos=add_eos
    )
    if truncated and stats is not None:
        stats.truncated_responses += 1
    input_ids = list(prefix)
    labels = [IGNORE_INDEX] * len(prefix)
    for ids, flag in [*pieces, (resp_ids, True)]:
        input_ids += ids
        labels += ids if flag else [IGNORE_INDEX] * len(ids)
    return {"input_ids": input_ids, "labels": labels, "prompt_length": len(input_ids) - len(resp_ids)}


def _truncate_context(
    tokenizer: Any,
    segs: list[tuple[str, bool]],
    pieces: list[tuple[list[int], bool]],
    budget: int,
    stats: LoadStats | None,
) -> list[tuple[list[int], bool]]:
    """Drop the oldest segments (cutting only before a non-trainable segment, i.e. a turn start) until the
    context fits ``budget`` tokens; the new first segment is re-encoded as the start of a text."""
    for k in range(1, len(segs)):
        if segs[k][1]:
            continue
        first = encode(tokenizer, segs[k][0])
        if len(first) + sum(len(ids) for ids, _ in pieces[k + 1 :]) <= budget:
            return [(first, segs[k][1]), *pieces[k + 1 :]]
    if stats is not None:
        stats.notes["prompt cut inside its latest turn (no whole-turn cut fits)"] += 1
    # keep the last `budget` tokens of the latest context turn, flags kept per token
    last_start = max((k for k in range(len(segs)) if not segs[k][1]), default=0)
    kept = [(encode(tokenizer, segs[last_start][0]), segs[last_start][1]), *pieces[last_start + 1 :]]
    flat = [(t, flag) for ids, flag in kept for t in ids][-budget:]
    out: list[tuple[list[int], bool]] = []
    for t, flag in flat:
        if out and out[-1][1] == flag:
            out[-1][0].append(t)
        else:
            out.append(([t], flag))
    return out
