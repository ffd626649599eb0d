"""Dialogue representation and chat formatting.

Internally a dialogue is a list of ``(role, content)`` turns with roles ``"system"``, ``"user"`` and
``"assistant"``. It is rendered to text in one of two formats (``data.chat_format``; its default ``"auto"`` is
the tokenizer's chat template when it has one, else HH: :func:`resolve_chat_format`):

* ``"hh"``: Anthropic HH-RLHF's ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``. A prompt ends with
  ``"\\n\\nAssistant:"`` (no trailing space) and a response is the exact text that follows it, so a response
  starts with a space: ``prompt + response`` is the dialogue. Responses from sources without that space
  (``{"prompt", "chosen", "rejected"}`` files, turn lists) get one space prepended; responses that already start
  with whitespace are kept byte for byte. HH-RLHF text itself is never re-rendered (kept verbatim). A system turn
  has no place in HH; its content is put before the first ``"\\n\\nHuman:"``.
* ``"chat_template"``: the tokenizer's own chat template (``tokenizer.apply_chat_template``). The prompt is the
  rendering with ``add_generation_prompt=True``; a response is what the template adds for the assistant turn
  (its end-of-turn marker included; trailing whitespace after the EOS token is dropped so that it matches what
  generation stopping at EOS produces).

A prompt is kept as a :class:`Dialogue` (its system turn, its other turns, its renderer) besides its text, so
that truncation (:mod:`ppomax.data.tokenize`) can drop whole turns and re-render instead of cutting text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal

from ppomax.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ChatFormat = Literal["hh", "chat_template"]
#: what ``data.chat_format`` may say: a format, or ``"auto"`` (:func:`resolve_chat_format`)
ChatFormatSetting = Literal["auto", "hh", "chat_template"]
CHAT_FORMAT_SETTINGS = ("auto", "hh", "chat_template")
Turn = tuple[str, str]

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"
_MARKER_RE = re.compile(r"\n\n(Human|Assistant):")
_ROLE_ALIASES = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "system": "system",
}


class FormatError(ValueError):
    """A record-level problem found while interpreting a dialogue; loaders add ``path:line``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(reason + (f" ({detail})" if detail else ""))


def hh_marker(text: str) -> str | None:
    """Why ``text`` counts as an HH dialogue (e.g. ``"it starts with 'Human:'"``), or None for plain text.

    The one rule for reading a prompt: text with a turn marker (``"\\n\\nHuman:"`` or ``"\\n\\nAssistant:"``
    anywhere, or ``"Human:"`` / ``"Assistant:"`` at the very start) is an HH dialogue; anything else is literal text.
    """
    for start in (HUMAN, ASSISTANT, "Human:", "Assistant:"):
        if text.startswith(start):
            return f"it starts with {start!r}"
    for marker in (HUMAN, ASSISTANT):
        if marker in text:
            return f"it contains {marker!r}"
    return None


def is_hh_text(text: str) -> bool:
    """Whether ``text`` is written in the HH template (has a Human/Assistant turn marker, see :func:`hh_marker`)."""
    return hh_marker(text) is not None


def normalise_hh_start(text: str) -> str:
    """HH dialogues start with ``"\\n\\nHuman:"``; accept ``"Human:"`` at the very start too."""
    if text.startswith(("Human:", "Assistant:")):
        return "\n\n" + text
    return text


def hh_response(text: str) -> str:
    """A response as it follows ``"Assistant:"`` in the HH format: one leading space unless it has whitespace."""
    return text if text[:1].isspace() else " " + text


def parse_hh(text: str) -> list[Turn]:
    """Split an HH dialogue into turns (content stripped). Text before the first marker becomes a system turn."""
    text = normalise_hh_start(text)
    parts = _MARKER_RE.split(text)
    turns: list[Turn] = []
    if parts[0].strip():
        turns.append(("system", parts[0].strip()))
    for name, content in zip(parts[1::2], parts[2::2], strict=True):
        turns.append(("user" if name == "Human" else "assistant", content.strip()))
    return turns


def hh_segments(text: str, assistant_turns: Literal["all", "last"] = "all") -> list[tuple[str, bool]]:
    """Cut an HH dialogue ending with an assistant response into ``(text, trainable)`` segments, verbatim.

    Trainable segments are the assistant contents (the text after each ``"\\n\\nAssistant:"``, leading space
    included), all of them or only the last; everything else (markers, human turns) is context. The
    concatenation of the segments is exactly ``text``.
    """
    text = normalise_hh_start(text)
    marks = [(m.start(), m.end(), m.group(1)) for m in _MARKER_RE.finditer(text)]
    spans: list[tuple[int, int]] = []  # [start, end) of each assistant content
    for k, (_, end, role) in enumerate(marks):
        if role == "Assistant":
            stop = marks[k + 1][0] if k + 1 < len(marks) else len(text)
            spans.append((end, stop))
    if assistant_turns == "last":
        spans = spans[-1:]
    segments: list[tuple[str, bool]] = []
    pos = 0
    for start, stop in spans:
        if start > pos:
            segments.append((text[pos:start], False))
        if stop > start:
            segments.append((text[start:stop], True))
        pos = stop
    if pos < len(text):
        segments.append((text[pos:], False))
    return _merge(segments)


def _merge(segments: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    out: list[tuple[str, bool]] = []
    for seg, flag in segments:
        if out and out[-1][1] == flag:
            out[-1] = (out[-1][0] + seg, flag)
        elif seg:
            out.append((seg, flag))
    return out


def turns_from_messages(messages: list[Any], what: str) -> list[Turn]:
    """``[{"role": ..., "content": ...}, ...]`` to turns; role aliases human/gpt/bot/model are accepted."""
    turns: list[Turn] = []
    for k, m in enumerate(messages, start=1):
        if not isinstance(m, dict) or "content" not in m or ("role" not in m):
            raise FormatError(f"turn {k} of '{what}' is not a {{'role', 'content'}} object")
        role = _ROLE_ALIASES.get(str(m["role"]).lower())
        if role is None:
            raise FormatError(
                f"unknown role {m['role']!r} in turn {k} of '{what}'", "use user, assistant or system"
            )
        content = m["content"]
        if not isinstance(content, str):
            raise FormatError(
                f"content of turn {k} of '{what}' must be a string, got {type(content).__name__}"
            )
        if not content.strip():
            raise FormatError(f"empty turn {k} in '{what}'")
        turns.append((role, content))
    return turns


def turns_from_strings(items: list[Any], what: str, last_role: str | None = None) -> list[Turn]:
    """MOSS-RLHF turn list (strings, alternating) to turns.

    ``last_role=None``: human first (index 0 is the user). ``last_role="user"`` / ``"assistant"``: roles are
    aligned from the end so that the last turn has that role (MOSS-RLHF's convention for prompts and for the
    context of preference pairs; a history truncated at the front may then start with an assistant turn).
    """
    for k, s in enumerate(items, start=1):
        if not isinstance(s, str):
            raise FormatError(f"turn {k} of '{what}' must be a string, got {type(s).__name__}")
        if not s.strip():
            raise FormatError(f"empty turn {k} in '{what}'")
    n = len(items)
    if last_role is None:
        first_user = True
    else:
        # the last index n-1 has role last_role; alternate backwards
        last_is_user = last_role == "user"
        first_user = last_is_user == ((n - 1) % 2 == 0)
    roles = ("user", "assistant") if first_user else ("assistant", "user")
    return [(roles[k % 2], s) for k, s in enumerate(items)]


def resolve_chat_format(
    setting: str, tokenizer: PreTrainedTokenizerBase | None, source: str = "data.chat_format"
) -> tuple[ChatFormat, str]:
    """The format that ``setting`` (``"auto"``, ``"hh"`` or ``"chat_template"``) means with ``tokenizer``, and why,
    e.g. ``("chat_template", "the tokenizer has a chat template; data.chat_format: auto")``.

    ``"auto"`` is the tokenizer's chat template when it has one (HH dialogues are then parsed into turns and
    rendered with it), else HH. ``source`` names where the setting came from, for the reason and the errors.
    """
    if setting not in CHAT_FORMAT_SETTINGS:
        raise ConfigError(f"{source}: must be 'auto', 'hh' or 'chat_template', got {setting!r}")
    if setting != "auto":
        return setting, f"{source}: {setting}"  # type: ignore[return-value]
    if getattr(tokenizer, "chat_template", None):
        return "chat_template", f"the tokenizer has a chat template; {source}: auto"
    return "hh", f"the tokenizer has no chat template; {source}: auto"


@dataclass(frozen=True)
class Dialogue:
    """A prompt as turns, rendered by ``renderer``: ``system`` is its leading system turn's content (None: none),
    ``turns`` the user and assistant turns after it, the last one the turn the model answers (a user turn).

    In the HH format the contents are the text verbatim (what follows each ``"\\n\\nHuman:"`` /
    ``"\\n\\nAssistant:"`` marker, leading space included; ``system`` is the text before the first marker), so
    that an HH-RLHF prompt, whole or shortened by whole turns, is rendered byte for byte as written.
    """

    system: str | None
    turns: tuple[Turn, ...]
    renderer: Renderer = field(repr=False, compare=False)

    @cached_property
    def text(self) -> str:
        """The prompt text, ending with the assistant cue (HH) or the template's generation prompt."""
        return self.renderer.render(self)


class Renderer:
    """Renders turns into prompt / response / SFT segments in one chat format."""

    def __init__(self, fmt: str = "hh", tokenizer: PreTrainedTokenizerBase | None = None) -> None:
        # the format is the config key data.chat_format, so the errors a user can meet name that key
        fmt, _ = resolve_chat_format(fmt, tokenizer)
        if fmt == "chat_template":
            if tokenizer is None:
                raise ValueError("format='chat_template' needs the tokenizer: pass tokenizer=...")
            if not getattr(tokenizer, "chat_template", None):
                where = getattr(tokenizer, "name_or_path", "") or "this tokenizer"
                raise ConfigError(
                    f"data.chat_format: 'chat_template' but the tokenizer {where} has no chat template; use "
                    "data.chat_format=hh, or a tokenizer whose tokenizer_config.json has a chat_template"
                )
        self.fmt = fmt
        self.tokenizer = tokenizer

    # -- chat template -------------------------------------------------------------------------------------
    def _apply(self, turns: list[Turn], generation_prompt: bool) -> str:
        msgs = [{"role": r, "content": c} for r, c in turns]
        assert self.tokenizer is not None  # the chat_template format has one (__init__)
        try:
            out = self.tokenizer.apply_chat_template(
                msgs, tokenize=False, add_generation_prompt=generation_prompt
            )
        except Exception as e:  # templates raise arbitrary errors (jinja's TemplateError, ...)
            raise FormatError(
                "the tokenizer's chat template rejected this dialogue", f"{type(e).__name__}: {e}"
            ) from e
        return out if isinstance(out, str) else str(out)

    def _assistant_text(self, turns: list[Turn], content: str) -> tuple[str, str]:
        """(prompt, response) where response is what the template adds for an assistant turn after ``turns``."""
        prompt = self._apply(turns, True)
        full = self._apply([*turns, ("assistant", content)], False)
        if not full.startswith(prompt):
            raise FormatError(
                "the chat template does not render a dialogue as its prefix plus the new turn",
                "cannot separate the response; use format='hh'",
            )
        resp = full[len(prompt) :]
        eos = getattr(self.tokenizer, "eos_token", None)
        if eos and resp.rstrip().endswith(eos):
            resp = resp.rstrip()
        return prompt, resp

    # -- public --------------------------------------------------------------------------------------------
    def dialogue(self, turns: list[Turn]) -> Dialogue:
        """The prompt for the assistant's next turn after ``turns`` (which end with a user turn)."""
        if self.fmt == "hh":
            return hh_dialogue(_hh_context(turns) + ASSISTANT)
        if turns and turns[0][0] == "system":
            return Dialogue(turns[0][1], tuple(turns[1:]), self)
        return Dialogue(None, tuple(turns), self)

    def prompt(self, turns: list[Turn]) -> str:
        """A prompt for the assistant's next turn; ``turns`` must end with a user turn."""
        return self.dialogue(turns).text

    def render(self, dialogue: Dialogue) -> str:
        """The text of a prompt (:attr:`Dialogue.text`)."""
        if self.fmt == "hh":
            markers = {"user": HUMAN, "assistant": ASSISTANT}
            return (dialogue.system or "") + "".join(markers[r] + c for r, c in dialogue.turns) + ASSISTANT
        system = [] if dialogue.system is None else [("system", dialogue.system)]
        return self._apply([*system, *dialogue.turns], True)

    def prompt_segments(
        self, dialogue: Dialogue, assistant_turns: Literal["all", "last"] = "all"
    ) -> list[tuple[str, bool]]:
        """``(text, trainable)`` segments of a prompt (an SFT example's context): the assistant turns in it are
        trainable with ``assistant_turns="all"`` (``"last"`` trains only the response that follows the prompt)."""
        if self.fmt == "hh":
            return hh_segments(dialogue.text, assistant_turns)
        turns = [*([] if dialogue.system is None else [("system", dialogue.system)]), *dialogue.turns]
        segs: list[tuple[str, bool]] = []
        done = ""
        for k, (role, content) in enumerate(turns):
            if role != "assistant":
                continue
            prompt, resp = self._assistant_text(turns[:k], content)
            if not prompt.startswith(done):
                raise FormatError(
                    "the chat template does not render a dialogue as its prefix plus the new turn",
                    "cannot separate assistant turns; use format='hh'",
                )
            segs.append((prompt[len(done) :], False))
            segs.append((resp, assistant_turns == "all"))
            done = prompt + resp
        text = self.render(dialogue)
        if not text.startswith(done):
            raise FormatError(
                "the chat template does not render a dialogue as its prefix plus the new turn",
                "cannot separate assistant turns; use format='hh'",
            )
        segs.append((text[len(done) :], False))
        return _merge(segs)

    def response(self, context: list[Turn], content: str) -> str:
        """The text of an assistant response after ``context`` (see the module docstring for spacing)."""
        if self.fmt == "chat_template":
            return self._assistant_text(context, content)[1]
        _check_hh_writable([("assistant", content)], "the response")
        return hh_response(content)

    def segments(
        self, turns: list[Turn], assistant_turns: Literal["all", "last"] = "all"
    ) -> list[tuple[str, bool]]:
        """``(text, trainable)`` segments of a dialogue ending with an assistant turn."""
        if self.fmt == "hh":
            return hh_segments(_hh_context(turns), assistant_turns)
        last = max(k for k, (r, _) in enumerate(turns) if r == "assistant")
        resp = self._assistant_text(turns[:last], turns[last][1])[1]
        return _merge([*self.prompt_segments(self.dialogue(turns[:last]), assistant_turns), (resp, True)])


def hh_dialogue(text: str) -> Dialogue:
    """An HH prompt (text ending with ``"\\n\\nAssistant:"``) as a :class:`Dialogue` whose contents are the text
    verbatim (its :attr:`~Dialogue.text` is ``text`` itself)."""
    text = normalise_hh_start(text)
    if not text.endswith(ASSISTANT):
        raise ValueError(f"an HH prompt ends with {ASSISTANT!r}")
    parts = _MARKER_RE.split(text[: -len(ASSISTANT)])
    turns = tuple(
        ("user" if name == "Human" else "assistant", content)
        for name, content in zip(parts[1::2], parts[2::2], strict=True)
    )
    return Dialogue(parts[0] or None, turns, _HH)


def hh_prompt_dialogue(text: str) -> Dialogue | None:
    """:func:`hh_dialogue` of ``text`` if it is an HH prompt (a dialogue ending with the assistant cue), else None."""
    if is_hh_text(text) and normalise_hh_start(text).endswith(ASSISTANT):
        return hh_dialogue(text)
    return None


def _hh_context(turns: list[Turn]) -> str:
    _check_hh_writable(turns)
    out = []
    for role, content in turns:
        if role == "system":
            out.append(content.strip())
        elif role == "user":
            out.append(f"{HUMAN} {content.strip()}")
        else:
            out.append(f"{ASSISTANT}{hh_response(content)}")
    return "".join(out)


def _check_hh_writable(turns: list[Turn], what: str = "") -> None:
    """A turn whose text holds an HH turn marker cannot be written in the HH format: read back, the marker would
    start a turn of its own (an assistant answer ``"...\\n\\nHuman: ..."`` would train on a fake human turn)."""
    for k, (role, content) in enumerate(turns, start=1):
        marker = next((m for m in (HUMAN, ASSISTANT) if m in content), None)
        if (
            marker is None
            and k == 1
            and role == "system"
            and content.strip().startswith(("Human:", "Assistant:"))
        ):
            marker = content.strip().split(":", 1)[0] + ":"  # text before the first turn that reads as a turn
        if marker is not None:
            raise FormatError(
                "a turn holds an HH turn marker, so it cannot be written in the HH format",
                f"{what or f'turn {k} ({role})'} contains {marker!r}; use data.chat_format: chat_template, or "
                "remove the marker",
            )


_HH = Renderer("hh")
