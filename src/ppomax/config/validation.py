"""A config validated once: pydantic's errors as one :class:`ConfigError` with a line per bad key, naming the
dotted key, what is allowed and what was given (the keys of a :class:`KeyConflicts` each), and the nearest key
to an unknown one."""

from __future__ import annotations

import json
import re
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from ppomax.config.runs import RunConfig
from ppomax.config.section import KeyConflicts
from ppomax.errors import ConfigError

C = TypeVar("C", bound=RunConfig)


def validate_config(cls: type[C], data: dict[str, Any], origin: str) -> C:
    """``cls`` from ``data``; a :class:`ConfigError` naming each bad key and ``origin`` (where the data came from)."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, origin, cls)) from None


def _format_validation_error(err: ValidationError, origin: str, cls: type[BaseModel]) -> str:
    from ppomax.config_keys import did_you_mean

    lines = [f"invalid config ({origin}):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["loc"] and not re.fullmatch(
            r"[\w.-]+", key
        ):  # an unknown key may hold a line break, blanks, a colon
            key = repr(key)
        conflicts = e.get("ctx", {}).get("error")
        if isinstance(conflicts, KeyConflicts):
            prefix = "".join(f"{p}." for p in e["loc"])
            lines.extend(
                f"  {', '.join(prefix + k for k in keys)}: {msg}" for keys, msg in conflicts.problems
            )
            continue
        if e["type"] == "extra_forbidden":
            msg = "unknown key" + did_you_mean(key, cls)
        elif e["type"] == "string_type" and isinstance(e.get("input"), bool | int | float):
            what = f"the {'boolean' if isinstance(e['input'], bool) else 'number'} {json.dumps(e['input'])}"
            msg = (
                f"must be text, but YAML read the unquoted value as {what} (yes/no/on/off/true/false are booleans, "
                f'digits numbers): quote it, e.g. --set \'{key}="..."\' or {key.rsplit(".", 1)[-1]}: "..." in a file'
            )
        elif e["type"] == "literal_error":
            msg = f"must be one of {e['ctx']['expected']} (got {e.get('input')!r})"
        elif not e["loc"]:
            msg = e["msg"]
        elif e["type"] == "value_error":  # our own validators' messages, without pydantic's "Value error, "
            msg = f"{e['ctx']['error']} (got {e.get('input')!r})"
        else:
            msg = f"{e['msg']} (got {e.get('input')!r})"
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)
