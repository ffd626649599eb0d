"""Running a function over every record of a source: in order, in ``num_proc`` processes, with a progress bar,
each bad record failing the load or skipped and counted (``data.on_bad_line``) under its ``file:line`` /
``SOURCE[split] row N``.

The records are read in this process (so the readers' own errors and skips keep their order), sent to the workers
in chunks and collected in order: ``num_proc`` changes the speed, never the result. Workers start by ``fork`` where
the platform has it (the function, the tokenizer it holds, are inherited, not pickled); elsewhere the function must
be picklable (the functions of :mod:`ppomax.data.features` are). ``datasets.Dataset.map(num_proc=...)`` is not used:
records are any JSON value (Arrow needs one schema), the results are Python objects and the statistics of every
worker are added up here.
"""

from __future__ import annotations

import multiprocessing as mp
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from typing import Any, TypeVar

from ppomax.errors import UserError

from .chat import FormatError
from .io import LoadStats, OnError, Record, check_on_error, handle_error
from .sources import read_records

T = TypeVar("T")
Work = Callable[[Any, LoadStats], T]
#: records per task sent to a worker process
CHUNK = 128

_worker_fn: Callable[[Any, LoadStats], Any] | None = None


def map_records(
    source: Any,
    work: Work[T],
    *,
    on_error: OnError = "fail",
    stats: LoadStats | None = None,
    num_proc: int = 1,
    progress: str | None = None,
) -> list[tuple[Record, T]]:
    """``(record, work(record.value, stats))`` for every record of ``source`` that ``work`` accepts.

    ``work`` raises :class:`~ppomax.data.chat.FormatError` for a record it refuses (any other ``ValueError``,
    ``TypeError``, ``KeyError`` or ``AttributeError`` is reported as an unexpected record shape); a
    :class:`~ppomax.errors.UserError` (e.g. a token budget too small) stops the load. ``progress``: the label of a
    progress bar on stderr (None: no bar). ``stats.loaded`` counts the accepted records."""
    check_on_error(on_error)
    if num_proc < 1:
        raise ValueError(f"num_proc must be >= 1, got {num_proc}")
    stats = stats if stats is not None else LoadStats()
    records = read_records(source, on_error, stats)
    out: list[tuple[Record, T]] = []
    with _bar(progress) as bar:

        def take(rec: Record, ok: bool, payload: Any) -> None:
            if ok:
                out.append((rec, payload))
                stats.loaded += 1
            else:
                handle_error(rec.error(*payload), on_error, stats)

        def show(n: int) -> None:
            if progress is not None:
                bar.update(n)
                bar.set_postfix(loaded=stats.loaded, skipped=stats.skipped, refresh=False)

        if num_proc == 1:  # record by record: the first bad record in the source's order stops a failing load
            for rec in records:
                take(rec, *_attempt(work, rec.value, stats))
                show(1)
            return out
        with _context().Pool(num_proc, initializer=_init_worker, initargs=(work,)) as pool:
            pending: deque[tuple[list[Record], Any]] = deque()

            def collect() -> None:
                chunk, result = pending.popleft()
                outcomes, chunk_stats = result.get()
                stats.add(chunk_stats)
                for rec, outcome in zip(chunk, outcomes, strict=True):
                    take(rec, *outcome)
                show(len(chunk))

            for chunk in _chunks(records, CHUNK):
                pending.append((chunk, pool.apply_async(_apply_in_worker, ([r.value for r in chunk],))))
                while len(pending) > 2 * num_proc:
                    collect()
            while pending:
                collect()
    return out


def _attempt(work: Work[Any], value: Any, stats: LoadStats) -> tuple[bool, Any]:
    """``(True, work(value, stats))``, or ``(False, (reason, detail))`` for a record ``work`` refuses."""
    try:
        return True, work(value, stats)
    except FormatError as e:
        return False, (e.reason, e.detail)
    except UserError:
        raise
    except (TypeError, KeyError, AttributeError, ValueError) as e:  # a shape no check foresaw
        return False, ("unexpected record shape", f"{type(e).__name__}: {e}")


def _apply(work: Work[Any], values: list[Any]) -> tuple[list[tuple[bool, Any]], LoadStats]:
    """:func:`_attempt` on each value, and the statistics the work counted."""
    stats = LoadStats()
    return [_attempt(work, value, stats) for value in values], stats


def _init_worker(work: Work[Any]) -> None:
    global _worker_fn
    _worker_fn = work


def _apply_in_worker(values: list[Any]) -> tuple[list[tuple[bool, Any]], LoadStats]:
    assert _worker_fn is not None
    return _apply(_worker_fn, values)


def _context() -> Any:
    return mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()


def _chunks(records: Iterable[Record], size: int) -> Iterator[list[Record]]:
    it = iter(records)
    while chunk := list(islice(it, size)):
        yield chunk


def _bar(label: str | None) -> Any:
    from tqdm.auto import tqdm

    return tqdm(desc=label, unit=" records", disable=label is None, mininterval=1.0)
