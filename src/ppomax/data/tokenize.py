"""Tokenisation and its truncation rules.

* Prompts are truncated to ``max_prompt_tokens`` by turns, re-rendered in their chat format
  (:class:`ppomax.data.chat.Dialogue`; :func:`fit_prompt`): first the oldest turns are dropped, whole exchanges
  (cutting before a user turn), as few as needed; the system turn and the latest user turn with the assistant
  cue (HH) or the generation prompt (chat template) are always kept. Only if [system turn + latest turn] alone
  is too long is the latest turn's *content* cut from its left, at a token boundary, its role header kept; only
  if the system turn alone is too long is its content cut from the left too. HH text stays verbatim: dropping
  whole turns cuts it just before a ``"\\n\\nHuman:"`` marker. Every truncated prompt is counted in
  ``LoadStats.truncated_prompts``, and how it was cut in ``LoadStats.prompt_cuts`` / ``dropped_turns``. A prompt
  given as plain text that is not a dialogue keeps its latest tokens.
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
import weakref
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Literal

from ppomax.errors import ConfigError, ModelPathError

from .chat import Dialogue, FormatError, hh_prompt_dialogue
from .formats import PreferencePair, SFTExample
from .io import LoadStats

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
_CONTEXT_CHARS = 64  # enough text before a boundary to reproduce how the tokenizer treats it
_prefix_cache: weakref.WeakKeyDictionary[PreTrainedTokenizerBase, list[int]] = weakref.WeakKeyDictionary()


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of ``text`` without any special tokens added."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def special_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
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


def _prefix_for(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos):
        return []
    return special_prefix(tokenizer)


def encode_continuation(tokenizer: PreTrainedTokenizerBase, context: str, text: str) -> list[int]:
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
    tokenizer: PreTrainedTokenizerBase,
    prompt: str | Dialogue,
    max_tokens: int | None,
    stats: LoadStats | None = None,
) -> list[int]:
    """Prompt ids of at most ``max_tokens`` tokens, truncated by turns (see the module docstring).

    ``prompt``: a :class:`Dialogue` (what the loaders keep), or text: an HH prompt is read as its dialogue, any
    other text is cut by tokens from its left."""
    text = prompt.text if isinstance(prompt, Dialogue) else prompt
    prefix = _prefix_for(tokenizer, text)
    _check_budget("data.max_prompt_tokens", max_tokens, len(prefix) + 1)
    ids = prefix + encode(tokenizer, text)
    if max_tokens is None or len(ids) <= max_tokens:
        return ids
    dialogue = prompt if isinstance(prompt, Dialogue) else hh_prompt_dialogue(prompt)
    if dialogue is None:
        _count_cut(stats, 0, "cut by tokens (not a dialogue)")
        return prefix + ids[len(prefix) :][len(ids) - max_tokens :]
    text = fit_prompt(tokenizer, dialogue, max_tokens, stats).text
    return _prefix_for(tokenizer, text) + encode(tokenizer, text)


def prompt_length(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    """Tokens of a prompt text, the tokenizer's leading special tokens included."""
    return len(_prefix_for(tokenizer, text)) + len(encode(tokenizer, text))


def fit_prompt(
    tokenizer: PreTrainedTokenizerBase,
    dialogue: Dialogue,
    max_tokens: int,
    stats: LoadStats | None = None,
    *,
    length: Callable[[Dialogue], int] | None = None,
) -> Dialogue:
    """``dialogue`` shortened until ``length(dialogue) <= max_tokens`` (default: :func:`prompt_length` of its
    text) by the rule of the module docstring; counted in ``stats`` when shortened.

    Raises ConfigError when no shortening fits: the budget does not hold the format's role headers and cue."""
    measure = length or (lambda d: prompt_length(tokenizer, d.text))

    def fits(d: Dialogue) -> bool:
        try:
            return measure(d) <= max_tokens
        except FormatError:  # a shortening the chat template refuses is no way to shorten this prompt
            return False

    if fits(dialogue):
        return dialogue
    turns, n = dialogue.turns, len(dialogue.turns)
    # whole turns: cut before a user turn (whole exchanges), oldest first, down to the latest turn alone
    starts = [k for k in range(1, n) if turns[k][0] == "user"]
    if n > 1 and starts[-1:] != [n - 1]:
        starts.append(n - 1)
    k = _first_fitting(starts, lambda k: replace(dialogue, turns=turns[k:]), fits)
    if k is not None:
        _count_cut(stats, k)
        return replace(dialogue, turns=turns[k:])
    role, content = turns[-1] if n else ("user", "")
    latest = replace(dialogue, turns=turns[-1:])
    if n:  # the latest turn's content, cut from its left
        shorter = _keep_tail(tokenizer, content, lambda c: replace(latest, turns=((role, c),)), fits)
        if shorter is not None:
            _count_cut(stats, n - 1, f"cut inside their latest {role} turn")
            return shorter
    if dialogue.system:  # the system turn alone is too long: cut it too, the latest turn first kept whole
        hows = ["cut inside their system turn"]
        shorter = _keep_tail(tokenizer, dialogue.system, lambda s: replace(latest, system=s), fits)
        if shorter is None and n:
            emptied = replace(latest, system="")
            shorter = _keep_tail(tokenizer, content, lambda c: replace(emptied, turns=((role, c),)), fits)
            hows.append(f"cut inside their latest {role} turn")
        if shorter is not None:
            _count_cut(stats, n - 1, *hows)
            return shorter
    shortest = replace(latest, system="" if dialogue.system else dialogue.system)
    shortest = replace(shortest, turns=((role, content.rstrip()[-1:]),) if n else ())
    try:
        least = f"takes {measure(shortest)} tokens"
    except FormatError:
        least = "is refused by the chat template"
    raise ConfigError(
        f"data.max_prompt_tokens: {max_tokens} is too small for the chat format's role headers and assistant cue: "
        f"a prompt cut to the last character of its latest turn{' and an empty system turn' * bool(dialogue.system)} "
        f"{least}"
    )


def _keep_tail(
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    make: Callable[[str], Dialogue],
    fits: Callable[[Dialogue], bool],
) -> Dialogue | None:
    """``make(tail)`` for the longest tail of ``text`` that fits, cut at a token start (its leading whitespace
    kept), or None."""
    lead = text[: len(text) - len(text.lstrip())]
    starts = [s for s in _token_starts(tokenizer, text) if s > len(lead) and text[s:].strip()]
    s = _first_fitting(starts, lambda s: make(lead + text[s:].lstrip()), fits)
    return None if s is None else make(lead + text[s:].lstrip())


def _first_fitting(
    cuts: list[int], make: Callable[[int], Dialogue], fits: Callable[[Dialogue], bool]
) -> int | None:
    """The first of ``cuts`` (ascending, each shortening more than the one before) whose ``make(cut)`` fits, by
    binary search; None if none does."""
    lo, hi = 0, len(cuts)
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(make(cuts[mid])):
            hi = mid
        else:
            lo = mid + 1
    return cuts[lo] if lo < len(cuts) else None


def _token_starts(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Character offsets where the tokens of ``text`` start (fast tokenizers); any character for slow ones."""
    if getattr(tokenizer, "is_fast", False):
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        return sorted({s for s, e in offsets if e > s})
    return list(range(len(text)))


def _count_cut(stats: LoadStats | None, dropped: int, *hows: str) -> None:
    """Count one truncated prompt: its ``dropped`` oldest turns, and ``hows`` it was cut besides."""
    if stats is None:
        return
    stats.truncated_prompts += 1
    if dropped:
        stats.prompt_cuts["lost their oldest turns"] += 1
        stats.dropped_turns += dropped
    for how in hows:
        stats.prompt_cuts[how] += 1


def tokenize_response(
    tokenizer: PreTrainedTokenizerBase,
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
    tokenizer: PreTrainedTokenizerBase,
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
    prompt_ids = tokenize_prompt(tokenizer, pair.dialogue or pair.prompt, max_prompt_tokens, stats)
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
    tokenizer: PreTrainedTokenizerBase,
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
    limited to ``max_prompt_tokens`` as prompts are (:func:`fit_prompt` on ``example.dialogue``, re-rendered
    into segments; a context that is not a dialogue keeps its latest tokens); the final response follows
    :func:`tokenize_response`.
    """
    segs = example.segments
    context_segs, (resp_text, _) = segs[:-1], segs[-1]
    context_text = "".join(s for s, _ in context_segs)
    prefix = _prefix_for(tokenizer, context_text or resp_text)
    _check_budget("data.max_prompt_tokens", max_prompt_tokens, len(prefix) + 1)
    pieces = _encode_segments(tokenizer, context_segs)
    total = len(prefix) + sum(len(ids) for ids, _ in pieces)
    if max_prompt_tokens is not None and total > max_prompt_tokens:
        if example.dialogue is None:
            _count_cut(stats, 0, "cut by tokens (not a dialogue)")
            pieces = _keep_last_tokens(pieces, max_prompt_tokens - len(prefix))
        else:
            # earlier assistant turns are trained on when the context has trainable segments (SFT's "all")
            mode: Literal["all", "last"] = "all" if any(flag for _, flag in context_segs) else "last"

            def length(d: Dialogue) -> int:
                d_segs = d.renderer.prompt_segments(d, mode)
                d_prefix = _prefix_for(tokenizer, "".join(s for s, _ in d_segs))
                return len(d_prefix) + sum(len(ids) for ids, _ in _encode_segments(tokenizer, d_segs))

            short = fit_prompt(tokenizer, example.dialogue, max_prompt_tokens, stats, length=length)
            context_segs = short.renderer.prompt_segments(short, mode)
            context_text = "".join(s for s, _ in context_segs)
            prefix = _prefix_for(tokenizer, context_text or resp_text)
            pieces = _encode_segments(tokenizer, context_segs)
    resp_ids, truncated = tokenize_response(
        tokenizer, resp_text, max_response_tokens, context=context_text, add_eos=add_eos
    )
    if truncated and stats is not None:
        stats.truncated_responses += 1
    input_ids = list(prefix)
    labels = [IGNORE_INDEX] * len(prefix)
    for ids, flag in [*pieces, (resp_ids, True)]:
        input_ids += ids
        labels += ids if flag else [IGNORE_INDEX] * len(ids)
    return {"input_ids": input_ids, "labels": labels, "prompt_length": len(input_ids) - len(resp_ids)}


def _encode_segments(
    tokenizer: PreTrainedTokenizerBase, segs: list[tuple[str, bool]]
) -> list[tuple[list[int], bool]]:
    """``(ids, trainable)`` of consecutive segments, each tokenised as the continuation of those before it."""
    pieces: list[tuple[list[int], bool]] = []
    done = ""
    for text, flag in segs:
        pieces.append((encode_continuation(tokenizer, done, text), flag))
        done += text
    return pieces


def _keep_last_tokens(pieces: list[tuple[list[int], bool]], budget: int) -> list[tuple[list[int], bool]]:
    """The last ``budget`` tokens of ``pieces``, each keeping its piece's flag."""
    flat = [(t, flag) for ids, flag in pieces for t in ids][-budget:]
    out: list[tuple[list[int], bool]] = []
    for t, flag in flat:
        if out and out[-1][1] == flag:
            out[-1][0].append(t)
        else:
            out.append(([t], flag))
    return out
