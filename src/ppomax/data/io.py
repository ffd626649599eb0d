"""Reading records from local JSON files, and the error/statistics plumbing every loader shares.

Supported files (summed up in the README's Data section; :mod:`ppomax.data.sources` reads every other kind of
source, through ``datasets``):

* ``.jsonl`` / ``.jsonl.gz``: one JSON value per line; blank lines are ignored. ``line`` is the 1-based
  physical line of the file.
* ``.json`` / ``.json.gz``: a list of records, or a dict of equal-length column lists
  (``{"chosen": [...], "rejected": [...]}``). ``line`` is the 1-based *record index* (``json`` does not report
  positions). A ``.json`` file that is really JSON Lines (several top-level values) is read as JSON Lines.

Every problem with the data is a :class:`DataError` whose message is ``path:line: what is wrong`` (a row of a
``datasets`` source: ``SOURCE[split] row N: what is wrong``). Loaders take ``on_error="fail"`` (default: raise the
first error) or ``"skip"`` (drop the record and count the reason in :class:`LoadStats`). Problems with the file as a
whole (missing, unreadable, not JSON at all) always raise.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

from ppomax.errors import UserError

logger = logging.getLogger("ppomax.data")

OnError = Literal["fail", "skip"]
#: how many skip messages a LoadStats keeps verbatim (the rest are only counted)
MAX_EXAMPLES = 20
#: the end of the message of a record-level error that stops a load (``on_error="fail"``)
SKIP_HINT = "data.on_bad_line: skip skips and counts such records"


class DataError(UserError):
    """A problem with input data; ``str(err)`` is always ``"path:line: what is wrong"`` (``row=True``, a row of a
    ``datasets`` source: ``"SOURCE[split] row N: what is wrong"``).

    ``reason`` is the short, record-independent part (used as the key of ``LoadStats.skip_reasons``);
    ``detail`` adds record-specific information to the message only; ``hint`` ends the message (e.g.
    :data:`SKIP_HINT`).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        line: int | None,
        reason: str,
        detail: str = "",
        hint: str = "",
        *,
        row: bool = False,
    ) -> None:
        self.path = str(path)
        self.line = line
        self.row = row
        self.reason = _one_line(reason)
        self.detail = _one_line(detail)
        self.hint = _one_line(hint)
        extra = "".join(f" ({part})" for part in (self.detail, self.hint) if part)
        super().__init__(f"{self.where}: {self.reason}{extra}")

    @property
    def where(self) -> str:
        return where(self.path, self.line, self.row) if self.line is not None else self.path

    def __reduce__(self) -> tuple[Any, ...]:  # rebuilt from its parts when it crosses processes
        return (_data_error, (self.path, self.line, self.reason, self.detail, self.hint, self.row))


def _data_error(path: str, line: int | None, reason: str, detail: str, hint: str, row: bool) -> DataError:
    return DataError(path, line, reason, detail, hint, row=row)


def where(source: str, number: int, row: bool = False) -> str:
    """How a record is named in messages: ``path:line`` (a line of a file), ``SOURCE row N`` (a row of a dataset)."""
    return f"{source} row {number}" if row else f"{source}:{number}"


class Record(NamedTuple):
    """One record and where it is: line ``number`` of the file ``source``, or (``row``) the 1-based row
    ``number`` of a ``datasets`` source named ``source`` (``SOURCE[split]``)."""

    source: str
    number: int
    value: Any
    row: bool = False

    @property
    def where(self) -> str:
        return where(self.source, self.number, self.row)

    def error(self, reason: str, detail: str = "") -> DataError:
        return DataError(self.source, self.number, reason, detail, row=self.row)


_LINE_BREAKS = re.compile("[\r\n\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")


def _one_line(text: str) -> str:
    """``text`` with its line breaks escaped: parts of a message may quote the data (a field name, an
    exception's text), and a message is one line."""
    return _LINE_BREAKS.sub(lambda m: repr(m.group())[1:-1], text)


@dataclass
class LoadStats:
    """What a loader (and later the tokenisation) did to the data; pass one instance through the pipeline.

    ``skip_reasons`` counts skipped records by reason; ``examples`` keeps the first few full
    ``path:line: ...`` messages so that a log can point at them. ``truncated_prompts`` /
    ``truncated_responses`` are filled by :mod:`ppomax.data.tokenize`: prompts (SFT contexts) shortened to
    ``data.max_prompt_tokens``, with ``prompt_cuts`` counting the prompts by how they were shortened (e.g.
    ``"lost their oldest turns"``, ``"cut inside their latest user turn"``) and ``dropped_turns`` the turns
    dropped in all; responses cut to their token budget. ``notes`` counts non-fatal normalisations (e.g. a
    trailing assistant turn moved out of a PPO prompt).
    """

    loaded: int = 0
    skipped: int = 0
    skip_reasons: Counter[str] = field(default_factory=Counter)
    truncated_prompts: int = 0
    prompt_cuts: Counter[str] = field(default_factory=Counter)
    dropped_turns: int = 0
    truncated_responses: int = 0
    notes: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def record_skip(self, err: DataError) -> None:
        self.skipped += 1
        self.skip_reasons[err.reason] += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(str(err))

    def add(self, other: LoadStats) -> None:
        """Add the counts of ``other`` (the statistics of a share of the records, e.g. from a worker process)."""
        self.loaded += other.loaded
        self.skipped += other.skipped
        self.skip_reasons.update(other.skip_reasons)
        self.truncated_prompts += other.truncated_prompts
        self.prompt_cuts.update(other.prompt_cuts)
        self.dropped_turns += other.dropped_turns
        self.truncated_responses += other.truncated_responses
        self.notes.update(other.notes)
        self.examples.extend(other.examples[: max(0, MAX_EXAMPLES - len(self.examples))])

    def summary(self) -> str:
        """One line for a log: counts, then reasons, most frequent first."""
        parts = [f"loaded {self.loaded}", f"skipped {self.skipped}"]
        if self.truncated_prompts:
            how = [
                f"{n} {why}"
                + (f", {self.dropped_turns} turns dropped in all" if why == "lost their oldest turns" else "")
                for why, n in self.prompt_cuts.most_common()
            ]
            parts.append(
                f"truncated prompts {self.truncated_prompts}" + (f" ({'; '.join(how)})" if how else "")
            )
        if self.truncated_responses:
            parts.append(f"truncated responses {self.truncated_responses}")
        text = ", ".join(parts)
        if self.skip_reasons:
            text += "; skip reasons: " + "; ".join(f"{r} x{n}" for r, n in self.skip_reasons.most_common())
        if self.notes:
            text += "; notes: " + "; ".join(f"{r} x{n}" for r, n in self.notes.most_common())
        return text


def check_on_error(on_error: str) -> None:
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")


def handle_error(err: DataError, on_error: OnError, stats: LoadStats | None) -> None:
    """Raise ``err`` (fail-fast; its message then says how to skip such records) or count it (skip mode)."""
    if on_error == "fail":
        raise DataError(err.path, err.line, err.reason, err.detail, SKIP_HINT, row=err.row)
    if stats is not None:
        stats.record_skip(err)


#: the file names the JSON readers of this module read (others go to ``datasets``: :mod:`ppomax.data.sources`)
JSON_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz")


def read_json_file(p: Path, on_error: OnError = "fail", stats: LoadStats | None = None) -> Iterator[Record]:
    """Every record of a JSON Lines / JSON file (:data:`JSON_SUFFIXES`; see the module docstring).

    A malformed JSON line of a ``.jsonl`` file is a record-level error (skippable); a ``.json`` file that does
    not parse is a file-level error and always raises.
    """
    check_on_error(on_error)
    spath = str(p)
    if p.name.lower().endswith((".jsonl", ".jsonl.gz")):
        rows = _read_jsonl(p, spath, on_error, stats)
    else:
        rows = _read_json(p, spath, on_error, stats)
    for source, line, rec in rows:
        yield Record(source, line, rec)


def _open_binary(p: Path, spath: str):
    try:
        return gzip.open(p, "rb") if p.name.lower().endswith(".gz") else open(p, "rb")
    except OSError as e:
        raise DataError(spath, None, "cannot open file", str(e)) from e


def _read_jsonl(
    p: Path, spath: str, on_error: OnError, stats: LoadStats | None
) -> Iterator[tuple[str, int, Any]]:
    # Bytes are decoded line by line, not by a text stream in chunks: a byte that is not UTF-8 is then a problem
    # of its own line (reported there, skippable), not of the whole file from the chunk it fell in.
    with _open_binary(p, spath) as fh:
        lineno = 0
        try:
            for lineno, raw in enumerate(fh, start=1):  # lineno is reported on read errors
                if not raw.strip():
                    continue
                try:
                    text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8").rstrip("\r\n")
                except UnicodeDecodeError as e:
                    handle_error(_not_utf8(spath, raw, e, lineno), on_error, stats)
                    continue
                try:
                    rec = json.loads(text)
                except json.JSONDecodeError as e:
                    handle_error(
                        DataError(spath, lineno, "malformed JSON", f"{e.msg} at column {e.colno}"),
                        on_error,
                        stats,
                    )
                    continue
                bad = _surrogate_error(spath, lineno, rec) if "\\u" in text else None
                if bad is not None:  # only a \u escape can write a lone surrogate
                    handle_error(bad, on_error, stats)
                    continue
                yield spath, lineno, rec
        except (OSError, EOFError) as e:
            # a truncated or corrupt .gz: the rest of the file is unreadable
            raise DataError(spath, lineno + 1, "unreadable data", f"{type(e).__name__}: {e}") from e


def _not_utf8(spath: str, data: bytes, e: UnicodeDecodeError, first_line: int = 1) -> DataError:
    """The error for a byte that is not UTF-8 at ``e.start`` of ``data`` (text starting at line ``first_line``)."""
    line = first_line + data.count(b"\n", 0, e.start)
    column = e.start - data.rfind(b"\n", 0, e.start)
    return DataError(spath, line, "not UTF-8 text", f"byte {data[e.start]:#04x} at byte {column} of the line")


def _surrogate_error(spath: str, line: int, rec: Any) -> DataError | None:
    """A record holding a lone UTF-16 surrogate (JSON ``"\\ud800"``) is not Unicode text: tokenizers (and any UTF-8
    writer) reject it, so it is refused here, where its ``path:line`` is known."""
    found = _find_surrogate(rec, "the record")
    if found is None:
        return None
    where, char = found
    return DataError(spath, line, "lone surrogate in a string (not Unicode text)", f"{char!r} in {where}")


def _find_surrogate(value: Any, where: str) -> tuple[str, str] | None:
    """``(where, char)`` of the first lone surrogate in a JSON value, or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            return where, value[e.start]
        return None
    found = None
    inside = "" if where == "the record" else f" of {where}"
    if isinstance(value, dict):
        for k, v in value.items():
            found = _find_surrogate(k, f"a field name{inside}") or _find_surrogate(v, f"field {k!r}{inside}")
            if found:
                break
    elif isinstance(value, list):
        for i, v in enumerate(value, start=1):
            found = _find_surrogate(v, f"item {i}{inside}")
            if found:
                break
    return found


def _read_json(
    p: Path, spath: str, on_error: OnError, stats: LoadStats | None
) -> Iterator[tuple[str, int, Any]]:
    with _open_binary(p, spath) as fh:
        try:
            raw = fh.read()
        except (OSError, EOFError) as e:
            raise DataError(spath, None, "unreadable data", f"{type(e).__name__}: {e}") from e
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        first = raw.split(b"\n", 1)[0].decode("utf-8-sig", errors="replace")
        if _looks_like_jsonl(first):  # JSON Lines under a .json name: only the line with the bad byte is bad
            logger.info("%s: several top-level JSON values; reading it as JSON Lines", spath)
            yield from _read_jsonl(p, spath, on_error, stats)
            return
        raise _not_utf8(spath, raw, e) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and _looks_like_jsonl(text):
            logger.info("%s: several top-level JSON values; reading it as JSON Lines", spath)
            yield from _read_jsonl(p, spath, on_error, stats)
            return
        raise DataError(spath, e.lineno, "malformed JSON", f"{e.msg} at column {e.colno}") from e
    check = "\\u" in text  # only a \u escape can write a lone surrogate
    if isinstance(data, list):
        records: Iterator[Any] = iter(data)
    elif isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
        lengths = {k: len(v) for k, v in data.items()}
        if len(set(lengths.values())) != 1:
            raise DataError(spath, None, "column lists of different lengths", str(lengths))
        keys = list(data)
        records = ({k: data[k][i] for k in keys} for i in range(next(iter(lengths.values()))))
    else:
        raise DataError(
            spath,
            None,
            "unexpected JSON top level",
            f"expected a list of records or a dict of equal-length column lists, got {type(data).__name__}",
        )
    for i, rec in enumerate(records, start=1):
        bad = _surrogate_error(spath, i, rec) if check else None
        if bad is not None:
            handle_error(bad, on_error, stats)
            continue
        yield spath, i, rec


def _looks_like_jsonl(text: str) -> bool:
    first = text.lstrip().split("\n", 1)[0]
    try:
        json.loads(first)
    except json.JSONDecodeError:
        return False
    return True
