"""Loaders for preference pairs, PPO prompts and SFT examples (summed up in the README's Data section).

Record shapes each loader accepts (from any source of :mod:`ppomax.data.sources`); TRL's dataset types
(https://huggingface.co/docs/trl/dataset_formats) are among them:

Preference pairs (:func:`load_preference_pairs`)
  * HH-RLHF: ``{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: A", "rejected": "...\\n\\nAssistant: B"}``; each
    dialogue is split at its last ``"\\n\\nAssistant:"`` and both halves before it must be identical.
  * TRL's implicit prompt, ``{"chosen": "The sky is blue.", "rejected": "The sky is green."}`` (strings without HH
    markers): their common beginning is the prompt (plain text: one human turn), the rest the responses
    (:func:`implicit_prompt`).
  * ``{"prompt": str, "chosen": str, "rejected": str}``: the prompt is plain text (wrapped as one human turn) or
    an HH dialogue ending with ``"\\n\\nAssistant:"``; chosen/rejected are the responses.
  * MOSS-RLHF: ``{"chosen": [turn, ..., A], "rejected": [turn, ..., B]}`` (lists of strings with the same
    context); roles are aligned from the end (the response is the assistant's, the turn before it the human's).
  * role/content messages: ``{"chosen": [{"role", "content"}...], "rejected": [...]}`` (full conversations), or
    TRL's ``{"prompt": [messages], "chosen": [assistant message], "rejected": [...]}``.

PPO prompts (:func:`load_prompts`)
  * ``{"prompt": str}`` (plain text or HH dialogue ending with ``"\\n\\nAssistant:"``), ``{"prompt": [turns]}``,
    ``{"messages": [...]}``, an HH pair (the shared prompt of ``"chosen"``), a bare string, or a MOSS-RLHF
    list of strings. Fields other than the text go to ``PromptExample.meta``. Only the prompt is read: the
    answer of an HH pair or of a MOSS list is not validated (HH-RLHF has pairs whose chosen answer is empty).
  * MOSS turn lists: ``moss_roles="human_first"`` (default): turn 0 is the human's; a list ending with an
    assistant turn (even length) has that turn moved to ``meta["response"]`` and counted in
    ``stats.notes``. ``moss_roles="last_is_human"`` reproduces MOSS-RLHF's own ``OnlyPromptDataset``: the last
    turn is always the human's, so a two-turn ``[instruction, answer]`` record becomes
    ``Assistant: instruction / Human: answer``.

SFT examples (:func:`load_sft_examples`)
  * ``{"prompt", "response"}`` (or ``"completion"``): loss on the response only. TRL's conversational
    prompt-completion ``{"prompt": [messages], "completion": [assistant message]}`` too.
  * an HH dialogue in ``"text"`` or ``"chosen"``, ``{"messages": [...]}``, or a MOSS list of strings (human
    first, MOSS-RLHF's SFT convention): it must end with an assistant turn; loss on assistant turns only,
    represented by ``SFTExample.segments`` (``assistant_turns="all"`` trains every assistant turn,
    ``"last"`` only the final one).
  * TRL's language modelling ``{"text": ...}`` that is not an HH dialogue: plain text, the loss on every token
    (counted in ``stats.notes``); it is cut to the response budget.

TRL's unpaired preference (``{"prompt", "completion", "label"}``, KTO) and stepwise supervision
(``{"prompt", "completions", "labels"}``) records are refused by the SFT and preference loaders with a message
saying what they are (ppomax trains neither KTO nor a process reward model); the prompt loader reads their prompt.

Errors name ``path:line`` and the problem: malformed JSON, missing/empty/mistyped field, chosen identical to
rejected, chosen and rejected with different prompts, a prompt that does not end with an assistant turn.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from .chat import (
    ASSISTANT,
    HUMAN,
    ChatFormatSetting,
    Dialogue,
    FormatError,
    Renderer,
    Turn,
    hh_marker,
    hh_prompt_dialogue,
    hh_segments,
    is_hh_text,
    normalise_hh_start,
    parse_hh,
    turns_from_messages,
    turns_from_strings,
)
from .io import DataError, LoadStats, OnError, check_on_error
from .pipeline import map_records
from .sources import SourceSpec, as_source

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger("ppomax.data")
T = TypeVar("T")
_ASSISTANT_REPR = repr(ASSISTANT)


@dataclass
class PreferencePair:
    """One comparison. ``prompt`` ends with the assistant cue (``"\\n\\nAssistant:"`` in the HH format);
    ``chosen``/``rejected`` are the responses only (see :mod:`ppomax.data.chat` for leading spaces).
    ``dialogue``: the prompt's turns, for truncation (derived from an HH prompt when not given)."""

    prompt: str
    chosen: str
    rejected: str
    where: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    dialogue: Dialogue | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.dialogue is None:
            self.dialogue = hh_prompt_dialogue(self.prompt)


@dataclass
class PromptExample:
    """A PPO prompt ending with the assistant cue; ``meta`` keeps the record's other fields (e.g. ``subset``).
    ``dialogue``: the prompt's turns, for truncation (derived from an HH prompt when not given)."""

    prompt: str
    meta: dict[str, Any] = field(default_factory=dict)
    where: str = ""
    dialogue: Dialogue | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.dialogue is None:
            self.dialogue = hh_prompt_dialogue(self.prompt)


@dataclass
class SFTExample:
    """A demonstration. ``segments`` are ``(text, trainable)`` pieces whose concatenation is
    ``prompt + response``; the last one is ``(response, True)``. Multi-turn dialogues mark every assistant
    turn trainable (loss on assistant turns only); ``prompt`` is everything before the final response.
    ``dialogue``: the turns of ``prompt``, for truncation (derived from an HH prompt when not given)."""

    prompt: str
    response: str
    segments: list[tuple[str, bool]] = field(default_factory=list)
    where: str = ""
    dialogue: Dialogue | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.segments:
            self.segments = (
                [(self.prompt, False), (self.response, True)] if self.prompt else [(self.response, True)]
            )
        if self.dialogue is None:
            self.dialogue = hh_prompt_dialogue(self.prompt)


# ---------------------------------------------------------------------------------------------------------------
# shared helpers


def _field(rec: dict[str, Any], name: str) -> Any:
    if name not in rec:
        raise FormatError(
            f"missing field '{name}'", "record has: " + (", ".join(map(str, rec)) or "no fields")
        )
    value = rec[name]
    if value is None or (
        isinstance(value, str | list) and not (value.strip() if isinstance(value, str) else value)
    ):
        raise FormatError(f"empty field '{name}'")
    return value


def _text_field(rec: dict[str, Any], name: str) -> str:
    value = _field(rec, name)
    if not isinstance(value, str):
        raise FormatError(f"field '{name}' must be a string, got {type(value).__name__}")
    return value


def _turns(value: Any, what: str, last_role: str | None = None) -> list[Turn]:
    """A list field as turns: strings (MOSS) or role/content dicts."""
    if not isinstance(value, list) or not value:
        raise FormatError(f"field '{what}' must be a non-empty list of turns")
    if all(isinstance(v, dict) for v in value):
        return turns_from_messages(value, what)
    return turns_from_strings(value, what, last_role)


def _check_ends_with_user(turns: list[Turn], what: str) -> None:
    if not turns or turns[-1][0] != "user":
        raise FormatError(f"{what} does not end with a human turn", "the model must answer the last turn")


def _hh_prompt(text: str) -> str:
    """A prompt string in the HH format: plain text becomes one human turn; HH text must end with the cue."""
    why = hh_marker(text)
    if why is None:
        return f"{HUMAN} {text.strip()}{ASSISTANT}"
    text = normalise_hh_start(text).rstrip()
    if not text.endswith(ASSISTANT):
        # say which reading applied: an HH look-alike ("Human: hi Assistant:") is not taken literally
        raise FormatError(
            f"prompt does not end with {_ASSISTANT_REPR}",
            f"{why}, so it is read as an HH dialogue, which must end with the assistant cue {_ASSISTANT_REPR}, "
            "every marker after a blank line; a prompt with no HH marker is taken literally as one human turn",
        )
    _check_hh_turns(text, "prompt")
    return text


def _check_hh_turns(context: str, what: str) -> None:
    """Every turn of an HH context (ending with the assistant cue) has text, as in turn lists: an empty turn, e.g.
    the prompt ``"\\n\\nHuman: \\n\\nAssistant:"``, asks nothing and would be trained on silently."""
    turns = [t for t in parse_hh(context) if t[0] != "system"][:-1]  # the last is the cue itself
    for k, (role, content) in enumerate(turns, start=1):
        if not content:
            name = "Human" if role == "user" else "Assistant"
            raise FormatError(f"empty turn in '{what}'", f"turn {k} ({name}) has no text")


def _prompt_turns(text: str) -> list[Turn]:
    """A prompt string (plain or HH) as turns ending with a user turn."""
    if not is_hh_text(text):
        return [("user", text.strip())]
    turns = parse_hh(_hh_prompt(text))
    if turns and turns[-1] == ("assistant", ""):
        turns = turns[:-1]
    _check_ends_with_user(turns, "prompt")
    return turns


def _split_hh(dialogue: str, what: str) -> tuple[str, str]:
    """(prompt, response) of an HH dialogue, split after its last ``"\\n\\nAssistant:"``.

    The response is not validated: a PPO prompt needs only the split (HH-RLHF has records whose chosen answer is
    empty). Records that train on the response go through :func:`_split_hh_answer`.
    """
    dialogue = normalise_hh_start(dialogue)
    i = dialogue.rfind(ASSISTANT)
    if i < 0:
        raise FormatError(f"no {_ASSISTANT_REPR} turn in '{what}'")
    prompt, response = dialogue[: i + len(ASSISTANT)], dialogue[i + len(ASSISTANT) :]
    if HUMAN in response:
        raise FormatError(f"'{what}' ends with a human turn, not an assistant response")
    _check_hh_turns(prompt, what)
    return prompt, response


def _split_hh_answer(dialogue: str, what: str) -> tuple[str, str]:
    """:func:`_split_hh` for SFT and preference records, whose response is trained on: it must not be empty."""
    prompt, response = _split_hh(dialogue, what)
    if not response.strip():
        raise FormatError(f"empty {what} response")
    return prompt, response


def _check_distinct(chosen: str, rejected: str) -> None:
    if chosen.strip() == rejected.strip():
        raise FormatError("chosen and rejected responses are identical")


def _load(
    source: Any,
    on_error: OnError,
    stats: LoadStats | None,
    parse: Callable[[Any, LoadStats], T],
    kind: str,
) -> list[T]:
    check_on_error(on_error)
    own = stats if stats is not None else LoadStats()
    out: list[T] = []
    for rec, item in map_records(source, parse, on_error=on_error, stats=own):
        if hasattr(item, "where"):
            item.where = rec.where
        out.append(item)
    if not out:
        raise DataError(as_source(source).name, None, f"no usable {kind}", own.summary())
    if own.skipped:
        logger.warning("%s: %s", as_source(source).name, own.summary())
    return out


def refuse_other_trl_types(rec: dict[str, Any]) -> None:
    """TRL's record types that ppomax has no trainer for, named instead of being read as another type."""
    if "label" in rec and "completion" in rec:
        raise FormatError(
            "unpaired preference record ('prompt', 'completion', 'label': TRL's KTO format); ppomax has no KTO "
            "trainer",
            "a reward model needs pairs {'prompt', 'chosen', 'rejected'}; for SFT keep the wanted completions and "
            "drop 'label'",
        )
    if "completions" in rec and "labels" in rec:
        raise FormatError(
            "stepwise supervision record ('completions', 'labels': TRL's PRM format); ppomax has no process "
            "reward model trainer"
        )


# ---------------------------------------------------------------------------------------------------------------
# preference pairs


def load_preference_pairs(
    path: SourceSpec,
    on_error: OnError = "fail",
    stats: LoadStats | None = None,
    *,
    format: ChatFormatSetting = "auto",
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> list[PreferencePair]:
    """Load preference pairs from any source (:mod:`ppomax.data.sources`; the module docstring has the record
    shapes)."""
    renderer = Renderer(format, tokenizer)
    return _load(path, on_error, stats, lambda rec, st: _parse_pair(rec, renderer, st), "preference pairs")


def _parse_pair(rec: Any, r: Renderer, stats: LoadStats) -> PreferencePair:
    if not isinstance(rec, dict):
        raise FormatError(
            f"record must be a JSON object with 'chosen' and 'rejected', got {type(rec).__name__}"
        )
    refuse_other_trl_types(rec)
    chosen, rejected = _field(rec, "chosen"), _field(rec, "rejected")
    meta = {k: v for k, v in rec.items() if k not in ("prompt", "chosen", "rejected")}
    if isinstance(chosen, str) and isinstance(rejected, str):
        implicit = "prompt" not in rec and not is_hh_text(chosen) and not is_hh_text(rejected)
        if "prompt" in rec or implicit:
            if implicit:
                prompt_text, chosen, rejected = implicit_prompt(chosen, rejected)
                stats.notes["implicit prompt: the common beginning of chosen and rejected"] += 1
            else:
                prompt_text = _text_field(rec, "prompt")
            if is_hh_text(prompt_text) and chosen.startswith(_hh_prompt(prompt_text)):
                # some dumps repeat the prompt inside chosen/rejected; keep the responses only
                _, chosen = _split_hh_answer(chosen, "chosen")
                _, rejected = _split_hh_answer(rejected, "rejected")
                stats.notes["prompt repeated inside chosen/rejected: removed"] += 1
            _check_distinct(chosen, rejected)
            if r.fmt == "hh":
                return PreferencePair(
                    _hh_prompt(prompt_text), r.response([], chosen), r.response([], rejected), meta=meta
                )
            turns = _prompt_turns(prompt_text)
            d = r.dialogue(turns)
            return PreferencePair(
                d.text, r.response(turns, chosen), r.response(turns, rejected), meta=meta, dialogue=d
            )
        # HH-RLHF: two full dialogues
        p_c, resp_c = _split_hh_answer(chosen, "chosen")
        p_r, resp_r = _split_hh_answer(rejected, "rejected")
        if p_c != p_r:
            at = next(
                (k for k, (a, b) in enumerate(zip(p_c, p_r, strict=False)) if a != b), min(len(p_c), len(p_r))
            )
            turn = p_c[:at].count(HUMAN) + p_c[:at].count(ASSISTANT)
            raise FormatError(
                f"chosen and rejected differ before their last {_ASSISTANT_REPR}",
                f"different prompts; first difference at character {at + 1}, in turn {max(turn, 1)}",
            )
        _check_distinct(resp_c, resp_r)
        if r.fmt == "hh":
            return PreferencePair(p_c, resp_c, resp_r, meta=meta)
        turns = _prompt_turns(p_c)
        d = r.dialogue(turns)
        chosen_text, rejected_text = r.response(turns, resp_c.strip()), r.response(turns, resp_r.strip())
        return PreferencePair(d.text, chosen_text, rejected_text, meta=meta, dialogue=d)
    if isinstance(chosen, list) and isinstance(rejected, list):
        if "prompt" in rec:  # TRL conversational: prompt messages + one assistant message each
            context = _turns(rec["prompt"], "prompt", last_role="user")
            resp_c = _single_response(chosen, "chosen")
            resp_r = _single_response(rejected, "rejected")
        else:
            tc = _turns(chosen, "chosen", last_role="assistant")
            tr = _turns(rejected, "rejected", last_role="assistant")
            if len(tc) != len(tr):
                raise FormatError(
                    "chosen and rejected turn lists differ in length", f"{len(tc)} vs {len(tr)} turns"
                )
            if tc[:-1] != tr[:-1]:
                raise FormatError(
                    "chosen and rejected turn lists differ before their last turn (different prompts)"
                )
            if tc[-1][0] != "assistant":
                raise FormatError("the last turn of 'chosen' is not an assistant turn")
            context, resp_c, resp_r = tc[:-1], tc[-1][1], tr[-1][1]
        _check_ends_with_user(context, "the context of chosen/rejected")
        _check_distinct(resp_c, resp_r)
        d = r.dialogue(context)
        return PreferencePair(
            d.text, r.response(context, resp_c), r.response(context, resp_r), meta=meta, dialogue=d
        )
    raise FormatError(
        "fields 'chosen' and 'rejected' must both be strings or both be lists of turns",
        f"got {type(chosen).__name__} and {type(rejected).__name__}",
    )


def implicit_prompt(chosen: str, rejected: str) -> tuple[str, str, str]:
    """``(prompt, chosen response, rejected response)`` of TRL's preference type "with implicit prompt": the prompt
    is the longest common prefix of the two texts (TRL's ``maybe_extract_prompt`` / ``extract_prompt``, dataset
    formats doc). The cut never falls inside a word: it moves back to the last whitespace of the common prefix,
    which then starts both responses (TRL moves back over one space only, so "blue" / "black" would leave "bl" in
    its prompt, and "blue" / "blue, really" would leave "blu"); a common prefix without whitespace is cut where the
    texts differ."""
    differ = (k for k, (a, b) in enumerate(zip(chosen, rejected, strict=False)) if a != b)
    common = chosen[: next(differ, min(len(chosen), len(rejected)))]
    last_space = max((k for k, c in enumerate(common) if c.isspace()), default=-1)
    cut = len(common[: last_space + 1].rstrip()) if last_space >= 0 else len(common)
    prompt = chosen[:cut]
    if not prompt.strip():
        raise FormatError(
            "chosen and rejected have no common beginning to take as the prompt",
            "TRL's implicit prompt; give 'prompt' with the responses, or HH dialogues",
        )
    _check_distinct(chosen[cut:], rejected[cut:])
    for what, text in (("chosen", chosen), ("rejected", rejected)):
        if not text[cut:].strip():
            raise FormatError(f"empty {what} response", f"'{what}' is the implicit prompt and nothing more")
    return prompt, chosen[cut:], rejected[cut:]


def _single_response(value: list[Any], what: str) -> str:
    turns = _turns(value, what, last_role="assistant")
    if len(turns) != 1 or turns[0][0] != "assistant":
        raise FormatError(f"'{what}' must hold exactly one assistant message when 'prompt' is given")
    return turns[0][1]


# ---------------------------------------------------------------------------------------------------------------
# PPO prompts


def load_prompts(
    path: SourceSpec,
    on_error: OnError = "fail",
    stats: LoadStats | None = None,
    *,
    format: ChatFormatSetting = "auto",
    tokenizer: PreTrainedTokenizerBase | None = None,
    moss_roles: Literal["human_first", "last_is_human"] = "human_first",
) -> list[PromptExample]:
    """Load PPO prompts; each ends with the assistant cue of ``format``."""
    if moss_roles not in ("human_first", "last_is_human"):
        raise ValueError(f"moss_roles must be 'human_first' or 'last_is_human', got {moss_roles!r}")
    renderer = Renderer(format, tokenizer)
    return _load(
        path, on_error, stats, lambda rec, st: _parse_prompt(rec, renderer, moss_roles, st), "prompts"
    )


def _parse_prompt(rec: Any, r: Renderer, moss_roles: str, stats: LoadStats) -> PromptExample:
    meta: dict[str, Any] = {}
    if isinstance(rec, str):
        if not rec.strip():
            raise FormatError("empty prompt")
        return _prompt_from_text(rec, r, meta)
    if isinstance(rec, list):
        return _prompt_from_list(rec, "turns", r, moss_roles, meta, stats)
    if not isinstance(rec, dict):
        raise FormatError(
            f"record must be a JSON object, a string or a list of turns, got {type(rec).__name__}"
        )
    for key in ("prompt", "messages", "chosen"):
        if key in rec:
            value = _field(rec, key)
            meta = {k: v for k, v in rec.items() if k not in (key, "rejected")}
            if isinstance(value, list):
                return _prompt_from_list(value, key, r, moss_roles, meta, stats)
            if not isinstance(value, str):
                raise FormatError(
                    f"field '{key}' must be a string or a list of turns, got {type(value).__name__}"
                )
            if key == "chosen":
                return _prompt_from_text(_split_hh(value, "chosen")[0], r, meta)
            return _prompt_from_text(value, r, meta)
    raise FormatError("missing field 'prompt'", "record has: " + (", ".join(map(str, rec)) or "no fields"))


def _prompt_from_text(text: str, r: Renderer, meta: dict[str, Any]) -> PromptExample:
    if r.fmt == "hh":
        return PromptExample(_hh_prompt(text), meta)
    return _prompt_example(r.dialogue(_prompt_turns(text)), meta)


def _prompt_from_list(
    value: list[Any], what: str, r: Renderer, moss_roles: str, meta: dict[str, Any], stats: LoadStats
) -> PromptExample:
    last_role = "user" if moss_roles == "last_is_human" else None
    strings = not all(isinstance(v, dict) for v in value)
    answer: Any = None
    if strings and last_role is None and len(value) >= 2 and len(value) % 2 == 0:
        # human first and an even length: the list ends with the assistant's answer, which a PPO prompt does not
        # need, so it is not validated (it may be empty) and goes to meta
        *value, answer = value
        if not isinstance(answer, str):
            raise FormatError(
                f"turn {len(value) + 1} of '{what}' must be a string, got {type(answer).__name__}"
            )
    turns = _turns(value, what, last_role)
    _check_ends_with_user(turns, "prompt")
    if answer is not None:
        meta = {**meta, "response": answer}
        stats.notes["turn list ends with an assistant turn: moved to meta['response']"] += 1
    return _prompt_example(r.dialogue(turns), meta)


def _prompt_example(d: Dialogue, meta: dict[str, Any]) -> PromptExample:
    return PromptExample(d.text, meta, dialogue=d)


# ---------------------------------------------------------------------------------------------------------------
# SFT


def load_sft_examples(
    path: SourceSpec,
    on_error: OnError = "fail",
    stats: LoadStats | None = None,
    *,
    format: ChatFormatSetting = "auto",
    tokenizer: PreTrainedTokenizerBase | None = None,
    assistant_turns: Literal["all", "last"] = "all",
) -> list[SFTExample]:
    """Load SFT demonstrations; multi-turn dialogues train on assistant turns (all, or only the last)."""
    if assistant_turns not in ("all", "last"):
        raise ValueError(f"assistant_turns must be 'all' or 'last', got {assistant_turns!r}")
    renderer = Renderer(format, tokenizer)
    return _load(
        path, on_error, stats, lambda rec, st: _parse_sft(rec, renderer, assistant_turns, st), "SFT examples"
    )


def _parse_sft(
    rec: Any, r: Renderer, assistant_turns: Literal["all", "last"], stats: LoadStats | None = None
) -> SFTExample:
    if isinstance(rec, list):
        return _sft_from_turns(_turns(rec, "turns"), r, assistant_turns)
    if not isinstance(rec, dict):
        raise FormatError(f"record must be a JSON object or a list of turns, got {type(rec).__name__}")
    refuse_other_trl_types(rec)
    if "prompt" in rec:
        resp_key = "completion" if "completion" in rec and "response" not in rec else "response"
        response = _response_field(rec, resp_key)
        prompt_value = _field(rec, "prompt")
        if isinstance(prompt_value, list):
            turns = _turns(prompt_value, "prompt", last_role="user")
            _check_ends_with_user(turns, "prompt")
            d = r.dialogue(turns)
            return SFTExample(d.text, r.response(turns, response), dialogue=d)
        if not isinstance(prompt_value, str):
            raise FormatError(
                f"field 'prompt' must be a string or a list of turns, got {type(prompt_value).__name__}"
            )
        if r.fmt == "hh":
            return SFTExample(_hh_prompt(prompt_value), r.response([], response))
        turns = _prompt_turns(prompt_value)
        d = r.dialogue(turns)
        return SFTExample(d.text, r.response(turns, response), dialogue=d)
    for key in ("messages", "text", "chosen"):
        if key in rec:
            value = _field(rec, key)
            if isinstance(value, list):
                return _sft_from_turns(_turns(value, key), r, assistant_turns)
            if not isinstance(value, str):
                raise FormatError(
                    f"field '{key}' must be a string or a list of turns, got {type(value).__name__}"
                )
            if not is_hh_text(value):
                if key == "text":  # TRL's language modelling type: plain text, trained on every token
                    if stats is not None:
                        stats.notes["plain text ('text' without HH markers): loss on every token"] += 1
                    return SFTExample("", value, [(value, True)])
                raise FormatError(
                    f"field '{key}' is not an HH dialogue ('\\n\\nHuman: ...\\n\\nAssistant: ...')"
                )
            _split_hh_answer(value, key)  # validates: ends with a non-empty assistant response
            if r.fmt == "hh":
                segs = hh_segments(value, assistant_turns)
                return SFTExample("".join(s for s, _ in segs[:-1]), segs[-1][0], segs)
            return _sft_from_turns(parse_hh(value), r, assistant_turns)
    raise FormatError(
        "missing field 'prompt' (with 'response') or 'messages' or 'text'",
        "record has: " + (", ".join(map(str, rec)) or "no fields"),
    )


def _response_field(rec: dict[str, Any], name: str) -> str:
    """A response: text, or TRL's conversational ``[{"role": "assistant", "content": ...}]``."""
    value = _field(rec, name)
    if isinstance(value, list):
        return _single_response(value, name)
    if not isinstance(value, str):
        raise FormatError(
            f"field '{name}' must be a string or a list with one assistant message, got {type(value).__name__}"
        )
    return value


def _sft_from_turns(turns: list[Turn], r: Renderer, assistant_turns: Literal["all", "last"]) -> SFTExample:
    if turns[-1][0] != "assistant":
        raise FormatError(
            "dialogue does not end with an assistant turn",
            f"{len(turns)} turns, human first; SFT needs the response last",
        )
    if not any(role == "user" for role, _ in turns):
        raise FormatError("dialogue has no human turn")
    segs = r.segments(turns, assistant_turns)
    if not segs or not segs[-1][1]:
        raise FormatError("empty final assistant response")
    return SFTExample("".join(s for s, _ in segs[:-1]), segs[-1][0], segs, dialogue=r.dialogue(turns[:-1]))
