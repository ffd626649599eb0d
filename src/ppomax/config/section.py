"""What every config section is (:class:`Section`): unknown keys, YAML's infinities and its booleans for numbers
are errors, and keys that configs of earlier versions hold are dropped or named. A check across keys raises
:class:`KeyConflicts`, one problem per line naming its keys.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator, model_validator

#: a section's retired keys: each with the value earlier versions wrote by default and why it is gone
Retired = dict[str, tuple[Any, str]]


class KeyConflicts(ValueError):
    """Raised by a model-level check: each problem names the keys it involves (relative to the section).

    The validation error (:mod:`ppomax.config.validation`) prints one line per problem, ``section.key_a, section.key_b: message``, instead of
    pydantic's "Value error" with the whole section as its input."""

    def __init__(self, problems: list[tuple[tuple[str, ...], str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{', '.join(keys)}: {msg}" for keys, msg in problems))


class Section(BaseModel):
    # allow_inf_nan=False: YAML's .inf/.nan are no setting of any float here (an infinite KL coefficient or
    # temperature "validates" against gt=0 and then wrecks training); _no_bool_for_numbers: YAML's true/false are
    # not the numbers 1/0 (pydantic's lax mode would take `iterations: true` as 1)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, allow_inf_nan=False)

    #: Keys a section does not have (its command never reads them) that configs written by earlier ppomax versions
    #: hold, each with the value those versions wrote by default: that value is dropped on load (it never had an
    #: effect), any other value is an error naming the key and the command that does read it.
    _retired: ClassVar[Retired] = {}

    @model_validator(mode="before")
    @classmethod
    def _drop_retired_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not cls._retired:
            return data
        out = dict(data)
        problems: list[tuple[tuple[str, ...], str]] = []
        for key, (written_by_default, why) in cls._retired.items():
            if key in out and out.pop(key) != written_by_default:
                problems.append(((key,), f"{why}; remove it (got {data[key]!r})"))
        if problems:
            raise KeyConflicts(problems)
        return out

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, bool) and info.field_name is not None:
            types = _leaf_types(cls.model_fields[info.field_name].annotation)
            if bool not in types and types & {int, float}:
                raise ValueError(f"must be a number, not {str(value).lower()}")
        return value


def _leaf_types(annotation: Any) -> set[Any]:
    """The types a field's annotation admits (``int | None`` -> ``{int, NoneType}``)."""
    args = get_args(annotation)
    if not args or get_origin(annotation) is Literal:
        return {annotation}
    return set().union(*(_leaf_types(a) for a in args))
