"""Data sources: what a data key (``data.train``, ``data.prompts``, ...) may name, reading its records, and its
fingerprint (what a checkpoint keeps to tell whether the data changed).

A source is what ``datasets.load_dataset`` accepts, in three spellings:

* a string: a local file, a directory (written by ``save_to_disk``: a ``Dataset`` or a ``DatasetDict``; or a
  directory of data files, read as ``load_dataset(DIR)`` reads it), a glob (``data/train-*.parquet``), or a
  Hugging Face Hub dataset id (``Anthropic/hh-rlhf``);
* a list of strings: files and globs, read in order as one source;
* a mapping of ``load_dataset``'s own arguments, :data:`DATASET_ARGS`
  (``{path: Anthropic/hh-rlhf, data_dir: harmless-base, split: test}``);

or, from Python (the trainers' ``train_dataset=`` and such), the data itself: a ``datasets.Dataset`` or a list of
records (dicts). Its rows are named ``Dataset(N rows) row I`` / ``list(N records) row I``; its fingerprint is the
``Dataset``'s own (``datasets`` derives it from the data and every transform applied) or the SHA-256 of the records
as JSON.

A string is a local path when it exists, a glob when it holds ``*``, ``?`` or ``[``, and otherwise a Hub id when it
looks like one (``name`` or ``owner/name``, no data file suffix); anything else is "no such file or directory".

Splits. A source with splits (a Hub dataset, a ``DatasetDict``, a directory of data files) and no ``split`` is read
at its ``train`` split, unless it is a held-out set (``Source(held_out=True)``: ``data.valid``, ``data.test``,
``data.valid_prompts``): a Hub dataset, or a source with several splits, must then name its split in the mapping
(an error says so); a local source with one split is read at that split.

Who reads what. ``.jsonl`` / ``.json`` (``.gz``) files are read by :mod:`ppomax.data.io` wherever they come from
(given directly, through a glob or a list, or as the local data files ``datasets`` resolves for a directory or a
mapping): those readers name every bad record ``file:line``, report bytes that are not UTF-8 and lone surrogates at
their line as skippable records, and accept a BOM, where ``datasets``'s JSON builder fails the whole load. Everything
else (``.parquet``, ``.csv``, ``.arrow`` files, ``save_to_disk`` directories, Hub datasets) is read by ``datasets``
(the optional extra ``pip install 'ppomax[datasets]'``); its rows are named ``SOURCE[split] row N`` (1-based; a
single file or a saved ``Dataset`` has no split: ``SOURCE row N``), and a row with a ``None`` column reads as a
record without that field (Arrow fills the columns a row lacks with ``None``).
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import os
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .io import JSON_SUFFIXES, DataError, LoadStats, OnError, Record, check_on_error, read_json_file

#: the keys of a source given as a mapping: ``datasets.load_dataset``'s own arguments
DATASET_ARGS = ("path", "name", "data_dir", "data_files", "split", "revision")
#: local files read by a packaged ``datasets`` builder, by suffix
BUILDER_OF_SUFFIX = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
_DATA_SUFFIXES = (*JSON_SUFFIXES, *BUILDER_OF_SUFFIX, ".gz", ".txt", ".tsv", ".zip")
_GLOB_CHARS = re.compile(r"[*?\[]")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_SPLIT_NAME = re.compile(r"[\w.-]+")
_INSTALL = "pip install 'ppomax[datasets]'"

#: what a loader takes: a :class:`Source`, or its spec (a path, a list of paths, a mapping of load_dataset arguments)
SourceSpec = Any


@dataclass(frozen=True)
class Source:
    """A data source (``spec``: a string, a list of strings or a mapping, see the module docstring), with the
    config ``key`` it comes from (for messages) and whether it is a held-out set (which must name its split)."""

    spec: Any
    key: str | None = None
    held_out: bool = False

    @property
    def name(self) -> str:
        """The source in messages (a mapping's split as ``[split]``)."""
        if in_memory(self.spec):
            return describe(self.spec)
        spec = normalise(self.spec)
        split = spec.get("split") if isinstance(spec, dict) else None
        return describe(spec) + (f"[{split}]" if split else "")


def as_source(source: Any) -> Source:
    return source if isinstance(source, Source) else Source(source)


def normalise(spec: Any) -> str | list[str] | dict[str, Any]:
    """A source spec as plain data: a path as a string, a list of strings, a mapping without its null values (a
    pydantic model of the config is dumped)."""
    if hasattr(spec, "model_dump"):
        spec = spec.model_dump()
    if isinstance(spec, Mapping):
        return {str(k): v for k, v in spec.items() if v is not None}
    if isinstance(spec, str | os.PathLike):
        return os.fspath(spec)
    if isinstance(spec, Sequence):
        return [os.fspath(s) if isinstance(s, os.PathLike) else s for s in spec]
    raise DataError(
        repr(spec), None, "a data source is a path, a list of paths or a mapping of load_dataset arguments"
    )


def in_memory(spec: Any) -> bool:
    """Whether a source is data held in memory (a ``datasets.Dataset``, or a list of records) rather than where to
    read it."""
    datasets = sys.modules.get("datasets")  # a Dataset exists only where datasets was imported
    if datasets is not None and isinstance(
        spec, datasets.Dataset | datasets.DatasetDict | datasets.IterableDataset
    ):
        return True
    return (
        isinstance(spec, list | tuple)
        and bool(spec)
        and not any(isinstance(s, str | os.PathLike) for s in spec)
    )


def describe(spec: Any) -> str:
    """A source in messages: the string itself; a list as ``[a, b, c]``; a mapping as its ``path`` with the other
    arguments but the split in parentheses (the split is written ``[split]`` where rows are named); data in memory
    as ``Dataset(N rows)`` or ``list(N records)``."""
    if in_memory(spec):
        if isinstance(spec, list | tuple):
            return f"list({len(spec)} records)"
        rows = getattr(spec, "num_rows", None)
        return f"{type(spec).__name__}({rows} rows)" if isinstance(rows, int) else type(spec).__name__
    spec = normalise(spec)
    if isinstance(spec, str):
        return spec
    if isinstance(spec, list):
        shown = [str(s) for s in spec[:3]]
        more = f", ... ({len(spec)} in all)" if len(spec) > 3 else ""
        return f"[{', '.join(shown)}{more}]"
    args = ", ".join(f"{k}={_short(spec[k])}" for k in DATASET_ARGS[1:] if k in spec and k != "split")
    return f"{spec.get('path', '?')}" + (f"({args})" if args else "")


def _short(value: Any) -> str:
    if isinstance(value, list | tuple):
        return "[" + ", ".join(map(str, value[:2])) + (", ..." if len(value) > 2 else "") + "]"
    return str(value)


# --------------------------------------------------------------------------- parts of a source


@dataclass
class _File:
    """A local file: JSON by our readers, parquet / csv / arrow by a packaged ``datasets`` builder."""

    path: Path

    def records(self, on_error: OnError, stats: LoadStats | None) -> Iterator[Record]:
        if self.path.name.lower().endswith(JSON_SUFFIXES):
            yield from read_json_file(self.path, on_error, stats)
            return
        builder_name = BUILDER_OF_SUFFIX[self.path.suffix.lower()]
        name = str(self.path)
        builder = _builder(name, {"path": builder_name, "data_files": {"train": [str(self.path)]}})
        yield from _rows(name, _prepared(name, builder, "train"), name)

    def digest(self) -> tuple[int, str]:
        return _hash_files([self.path], None)


@dataclass
class _Saved:
    """A directory written by ``save_to_disk`` (a ``Dataset``, or one split of a ``DatasetDict``)."""

    path: Path
    name: str
    split: str | None

    def records(self, on_error: OnError, stats: LoadStats | None) -> Iterator[Record]:
        ds = _load_from_disk(self.path, self.name)
        if self.split is not None:
            ds = ds[self.split]
        yield from _rows(self.name, ds, f"{self.name}[{self.split}]" if self.split else self.name)

    def digest(self) -> tuple[int, str]:  # the files of the directory (of the split read), by name
        root = self.path / self.split if self.split is not None else self.path
        return _hash_files(sorted(f for f in root.rglob("*") if f.is_file()), root)


@dataclass
class _Built:
    """A split of a dataset that ``datasets`` resolves and prepares (a Hub dataset, a directory of data files, a
    mapping); ``local_files``: the split's data files when they are all local (their bytes are its fingerprint)."""

    name: str
    builder: Any
    split: str
    local_files: list[Path] | None

    def records(self, on_error: OnError, stats: LoadStats | None) -> Iterator[Record]:
        yield from _rows(
            self.name, _prepared(self.name, self.builder, self.split), f"{self.name}[{self.split}]"
        )

    def digest(self) -> tuple[int, str]:
        if self.local_files is not None:
            return _hash_files(self.local_files, None, names=True)
        # a Hub dataset: datasets' own fingerprint of the prepared split (it hashes the builder's configuration and
        # the resolved data files, which name the repository's commit)
        ds = _prepared(self.name, self.builder, self.split)
        size = sum(os.path.getsize(f["filename"]) for f in ds.cache_files if os.path.exists(f["filename"]))
        return size, hashlib.sha256(f"{ds._fingerprint}\0{self.split}".encode()).hexdigest()


@dataclass
class _InMemory:
    """Data passed from Python: a ``datasets.Dataset`` or a list of records."""

    data: Any

    @property
    def name(self) -> str:
        return describe(self.data)

    def records(self, on_error: OnError, stats: LoadStats | None) -> Iterator[Record]:
        if isinstance(self.data, list | tuple):
            for number, value in enumerate(self.data, start=1):
                yield Record(self.name, number, value, row=True)
            return
        yield from _rows(self.name, self.data, self.name)

    def digest(self) -> tuple[int, str]:
        if isinstance(self.data, list | tuple):
            text = json.dumps(list(self.data), sort_keys=True, ensure_ascii=False, default=repr).encode()
            return len(text), hashlib.sha256(text).hexdigest()
        size = int(getattr(self.data.data, "nbytes", 0))
        return size, hashlib.sha256(f"{self.data._fingerprint}".encode()).hexdigest()


_Part = _File | _Saved | _Built | _InMemory


def _parts(src: Source) -> list[_Part]:
    if in_memory(src.spec):
        return [_memory_part(src.spec)]
    spec = normalise(src.spec)
    if isinstance(spec, dict):
        return _mapping_parts(spec, src)
    if isinstance(spec, list):
        if not spec or not all(isinstance(s, str) and s for s in spec):
            raise DataError(
                describe(spec), None, "a list source holds file paths or globs (non-empty strings)"
            )
        return [_File(f) for item in spec for f in _files_of(item)]
    return _string_parts(spec, src)


def _memory_part(data: Any) -> _InMemory:
    name = describe(data)
    if isinstance(data, list | tuple):
        if not all(isinstance(r, dict) for r in data):
            raise DataError(
                name, None, "a list source holds file paths (strings) or records (dicts), not a mix"
            )
        return _InMemory(data)
    kind = type(data).__name__
    if kind == "DatasetDict":
        splits = ", ".join(data)
        raise DataError(
            name, None, f"a DatasetDict has several splits ({splits}): pass one, e.g. dataset['train']"
        )
    if kind == "IterableDataset":
        raise DataError(
            name, None, "an IterableDataset (streaming) is not supported: load it with streaming=False"
        )
    return _InMemory(data)


def _files_of(item: str) -> list[Path]:
    """A list's item: a file, or a glob's files (sorted)."""
    p = Path(item)
    if p.is_file():
        return [_checked_file(p)]
    if _GLOB_CHARS.search(item):
        return _glob(item)
    what = "a directory (a list holds files or globs)" if p.is_dir() else "no such file"
    raise DataError(item, None, what)


def _glob(pattern: str) -> list[Path]:
    found = sorted(Path(f) for f in globlib.glob(pattern, recursive=True) if os.path.isfile(f))
    if not found:
        raise DataError(pattern, None, "no file matches this pattern")
    return [_checked_file(f) for f in found]


def _checked_file(p: Path) -> Path:
    name = p.name.lower()
    if not name.endswith(JSON_SUFFIXES) and p.suffix.lower() not in BUILDER_OF_SUFFIX:
        kinds = ", ".join([*JSON_SUFFIXES, *BUILDER_OF_SUFFIX])
        raise DataError(
            str(p),
            None,
            "unsupported file type",
            f"expected {kinds}, a directory, a glob or a Hub dataset id",
        )
    return p


def _string_parts(spec: str, src: Source) -> list[_Part]:
    if "\0" in spec:
        raise DataError(repr(spec), None, "no such file or directory")
    p = Path(spec)
    if p.is_file():
        return [_File(_checked_file(p))]
    if p.is_dir():
        if _is_saved(p):
            return [_saved_part(p, spec, None, src)]
        return _built_parts({"path": spec}, src, hub=False)
    if _GLOB_CHARS.search(spec):
        return [_File(f) for f in _glob(spec)]
    if _HUB_ID.fullmatch(spec) and not spec.lower().endswith(_DATA_SUFFIXES):
        return _built_parts({"path": spec}, src, hub=True)
    raise DataError(spec, None, "no such file or directory")


def _mapping_parts(spec: dict[str, Any], src: Source) -> list[_Part]:
    name = describe(spec)
    unknown = [k for k in spec if k not in DATASET_ARGS]
    if unknown:
        raise DataError(
            name, None, f"unknown key {unknown[0]!r}", f"a source mapping has {', '.join(DATASET_ARGS)}"
        )
    path = spec.get("path")
    if not isinstance(path, str) or not path:
        raise DataError(
            name, None, "a source mapping needs 'path' (a Hub dataset id, a directory or a builder)"
        )
    p = Path(path)
    if p.is_dir() and _is_saved(p):
        extra = [k for k in ("name", "data_dir", "data_files", "revision") if k in spec]
        if extra:
            raise DataError(name, None, f"{extra[0]!r} does not apply to a directory written by save_to_disk")
        return [_saved_part(p, path, spec.get("split"), src)]
    hub = not p.exists() and spec.get("path") not in _packaged_builders()
    return _built_parts(spec, src, hub=hub)


def _is_saved(p: Path) -> bool:
    return (p / "state.json").is_file() or (p / "dataset_dict.json").is_file()


def _saved_part(p: Path, name: str, split: str | None, src: Source) -> _Saved:
    if not (p / "dataset_dict.json").is_file():  # a Dataset
        if split is not None:
            raise DataError(
                name, None, f"has no splits (a Dataset written by save_to_disk); remove split: {split}"
            )
        return _Saved(p, name, None)
    return _Saved(p, name, _choose_split(split, list(_load_from_disk(p, name)), src, name, hub=False))


def _built_parts(spec: dict[str, Any], src: Source, hub: bool) -> list[_Part]:
    name = describe(spec)
    if hub and src.held_out and "split" not in spec:  # before any download
        _choose_split(None, [], src, name, hub)
    kwargs = {k: spec[k] for k in DATASET_ARGS if k in spec and k != "split"}
    builder = _builder(name, kwargs, hub=hub)
    config = builder.config
    data_files = {str(k): list(v) for k, v in (config.data_files or {}).items()}
    splits = list(data_files) or [str(s) for s in (builder.info.splits or {})]
    split = _choose_split(spec.get("split"), splits, src, name, hub)
    files = data_files.get(split)
    local = [Path(f) for f in files] if files and all(os.path.isfile(f) for f in files) else None
    json_builder = type(config).__name__ == "JsonConfig" and getattr(config, "field", None) is None
    if local and json_builder and all(f.name.lower().endswith(JSON_SUFFIXES) for f in local):
        return [_File(f) for f in local]  # read by our JSON readers: file:line errors, skippable bad lines
    return [_Built(name, builder, split, local)]


def _choose_split(requested: str | None, splits: list[str], src: Source, name: str, hub: bool) -> str:
    """The split to read: the requested one, else ``train`` (training) or the only one (held-out, local)."""
    who = f"{src.key}: {name}" if src.key else name
    suggest = next(
        (s for s in ("test", "validation", "valid") if s in splits), splits[0] if splits else "test"
    )
    mapping = f"{{path: {name}, split: {suggest if src.held_out else (splits or ['train'])[0]}}}"
    if isinstance(normalise(src.spec), dict):
        how = f"add split: {suggest if src.held_out else (splits or ['train'])[0]} to the mapping"
    elif src.key and src.key.startswith("--"):  # a command-line option
        how = f"e.g. {src.key} '{mapping}'"
    else:
        how = f"e.g. {src.key or 'data.KEY'}: {mapping}"
    if requested is not None:
        if _SPLIT_NAME.fullmatch(requested) and splits and requested not in splits:
            raise DataError(who, None, f"no split {requested!r}", f"splits: {', '.join(splits)}")
        return requested
    if src.held_out:
        if hub or len(splits) != 1:
            what = "a Hub dataset" if hub else f"a source with splits {', '.join(splits) or '(unknown)'}"
            raise DataError(who, None, f"{what}; a held-out set names its split", how)
        return splits[0]
    if splits and "train" not in splits:
        raise DataError(who, None, "has no 'train' split", f"splits: {', '.join(splits)}; {how}")
    return "train"


# --------------------------------------------------------------------------- datasets


def _datasets(name: str) -> Any:
    try:
        import datasets  # the optional extra
    except ImportError as e:
        raise DataError(
            name, None, "reading this source needs the optional 'datasets' package", _INSTALL
        ) from e
    return datasets


def _packaged_builders() -> set[str]:
    try:
        from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES
    except ImportError:
        return set()
    return set(_PACKAGED_DATASETS_MODULES)


def _builder(name: str, kwargs: dict[str, Any], hub: bool = False) -> Any:
    datasets = _datasets(name)
    try:
        return datasets.load_dataset_builder(**kwargs)
    except (
        Exception
    ) as e:  # datasets raises many kinds (network, missing files, configs): each is one line here
        what = (
            "no such file or directory, and cannot load it from the Hugging Face Hub"
            if hub
            else "cannot load"
        )
        raise DataError(name, None, what, f"{type(e).__name__}: {e}") from None


def _prepared(name: str, builder: Any, split: str) -> Any:
    """The split as a ``datasets.Dataset`` (downloaded and prepared in ``datasets``' cache once)."""
    try:
        builder.download_and_prepare()
        return builder.as_dataset(split=split)
    except Exception as e:  # as in _builder: parse errors of the data files, a bad split expression, ...
        raise DataError(
            f"{name}[{split}]", None, "cannot read with datasets", f"{type(e).__name__}: {e}"
        ) from None


def _load_from_disk(p: Path, name: str) -> Any:
    datasets = _datasets(name)
    try:
        return datasets.load_from_disk(str(p))
    except (FileNotFoundError, ValueError, OSError) as e:
        raise DataError(name, None, "not a directory written by save_to_disk", str(e)) from None


def _rows(name: str, ds: Any, rows_name: str) -> Iterator[Record]:
    number = 0
    try:
        for number, row in enumerate(ds, start=1):
            yield Record(rows_name, number, {k: v for k, v in row.items() if v is not None}, row=True)
    except (
        OSError,
        ValueError,
    ) as e:  # a file of the dataset unreadable part-way (pyarrow's errors are these)
        raise DataError(
            rows_name, number + 1, "unreadable data", f"{type(e).__name__}: {e}", row=True
        ) from None


# --------------------------------------------------------------------------- public


def read_records(source: Any, on_error: OnError = "fail", stats: LoadStats | None = None) -> Iterator[Record]:
    """Every record of a source (a :class:`Source`, or a spec: see the module docstring), in order."""
    check_on_error(on_error)
    for part in _parts(as_source(source)):
        yield from part.records(on_error, stats)


def fingerprint(source: Any) -> dict[str, Any]:
    """``{"path", "size", "sha256"}`` of the data a source names, as it is now: what a checkpoint keeps to tell
    whether its data changed. Local data is hashed byte for byte (a file: its bytes; a ``save_to_disk`` directory:
    its files, by name; several files: each by name); a Hub dataset is ``datasets``' fingerprint of the prepared
    split, which follows the repository's revision. A source that cannot be read has no size and no hash (the
    loader reports it)."""
    src = as_source(source)
    try:
        parts = _parts(src)
        digests = [(_label(p), *p.digest()) for p in parts]
    except (DataError, OSError):
        return {"path": src.name, "size": None, "sha256": None}
    if len(digests) == 1:
        _, size, sha = digests[0]
    else:
        h = hashlib.sha256()
        for label, _, part_sha in digests:
            h.update(f"{label}\0{part_sha}\0".encode())
        size, sha = sum(d[1] for d in digests), h.hexdigest()
    return {"path": src.name, "size": size, "sha256": sha}


def _label(part: _Part) -> str:
    if isinstance(part, _InMemory):
        return part.name
    return str(part.path) if isinstance(part, _File | _Saved) else f"{part.name}[{part.split}]"


def _hash_files(files: list[Path], root: Path | None, names: bool = False) -> tuple[int, str]:
    """(bytes, sha256) of files read in chunks; each file's name goes first (relative to ``root``) when there is a
    root or ``names``."""
    digest, size = hashlib.sha256(), 0
    for f in files:
        if root is not None:
            digest.update(f.relative_to(root).as_posix().encode() + b"\0")
        elif names:
            digest.update(f.name.encode() + b"\0")
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
                size += len(chunk)
    return size, digest.hexdigest()
