"""Property-based fuzzing of every data loader: SFT examples, preference pairs, PPO prompts and PPO-ptx
text, from .jsonl, .jsonl.gz, .json, .json.gz and `datasets` directories.

Each generated file must give, for every record, a loaded item, a counted skip (``on_error="skip"``) or one
``path:line: what`` :class:`DataError` line; never another exception (a traceback), and never an item that
silently differs from its source text: every loaded item is checked against an independent reading of the record
(the rules of :mod:`ppomax.data.formats` and :mod:`ppomax.data.chat`, written out again here), and then tokenised.

Budgets: a small derandomised one by default; ``PPOMAX_FUZZ=full`` for the big one (see tests/conftest.py).
"""

from __future__ import annotations

import gzip
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("hypothesis")
from hypothesis import given, settings
from hypothesis import strategies as st

from ppomax.data import (
    DataError,
    LoadStats,
    PreferencePair,
    PromptExample,
    SFTExample,
    load_preference_pairs,
    load_prompts,
    load_sft_examples,
    tokenize_pair,
    tokenize_prompt,
    tokenize_sft,
)

FULL = os.environ.get("PPOMAX_FUZZ", "").lower() == "full"
H, A = "\n\nHuman:", "\n\nAssistant:"


def budget(ci: int, full: int):
    return settings(max_examples=full if FULL else ci)


# ---------------------------------------------------------------------------------------------------------------
# strategies: text made of the pieces loaders care about (markers, whitespace, surrogates, special tokens)

PIECES = [
    H,
    A,
    "Human:",
    "Assistant:",
    " Human: ",
    "\n",
    "\n\n",
    " ",
    "\t",
    "\r\n",
    "\r",
    "hi",
    "é",
    "\u2028",
    "\x00",
    "\ufeff",
    "\ud800",
    "\udfff",
    "\U0001f600",
    "<|im_end|>",
    "</s>",
    '"',
    "\\",
    "{",
    "]",
]
HOSTILE = st.lists(st.one_of(st.sampled_from(PIECES), st.text(max_size=6)), max_size=6).map("".join)
WORDS = st.text(st.characters(codec="utf-8", exclude_characters="\r\n"), min_size=1, max_size=8)
#: mostly ordinary words (so that most records load and their reading is checked), often hostile pieces
TEXT = st.one_of(WORDS, WORDS, HOSTILE)
ROLES = st.sampled_from(["user", "assistant", "system", "human", "gpt", "bot", "model", "USER", "x", ""])


@st.composite
def hh_dialogue(draw: Any, end: str = "assistant") -> str:
    """An HH dialogue, mostly well formed: turns alternating from the human's, maybe empty, maybe no space."""
    n = draw(st.integers(1, 3))
    parts = [draw(st.sampled_from(["", "", "", "Intro text.", "\n\n"]))]
    for _ in range(n):
        parts += [H, draw(st.sampled_from([" ", " ", "", "  "])), draw(TEXT), A, " ", draw(TEXT)]
    if end == "prompt":
        parts[-2:] = []
    text = "".join(parts)
    return draw(st.sampled_from([text, text, text.lstrip("\n"), text + draw(HOSTILE)]))


@st.composite
def hh_pair(draw: Any) -> dict[str, Any]:
    """An HH-RLHF record: two dialogues that share everything up to their last assistant cue (mostly)."""
    prompt = draw(hh_dialogue("prompt"))
    other = draw(st.sampled_from([prompt, prompt, prompt, draw(hh_dialogue("prompt"))]))
    return {
        "chosen": prompt + draw(st.sampled_from([" ", ""])) + draw(TEXT),
        "rejected": other + " " + draw(TEXT),
    }


MESSAGE = st.fixed_dictionaries({"role": ROLES, "content": st.one_of(TEXT, TEXT, st.integers())})
TURN_LIST = st.lists(TEXT, min_size=0, max_size=4)
MESSAGES = st.lists(MESSAGE, max_size=4)
JSON_ANY = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(TEXT | st.sampled_from(["prompt", "chosen"]), inner, max_size=3)
    ),
    max_leaves=6,
)
TEXTISH = hh_dialogue() | hh_dialogue("prompt") | TEXT


def _extra() -> Any:
    return st.dictionaries(st.sampled_from(["subset", "id", "a\nb", "score"]), JSON_ANY, max_size=2)


def _with(record: Any, extra: dict[str, Any]) -> Any:
    return {**record, **extra}


# TRL's unpaired preference type: refused by the SFT and pair loaders, never read as another type
KTO_RECORD = st.builds(
    lambda p, c, ok: {"prompt": p, "completion": c, "label": ok}, TEXTISH, TEXTISH, st.booleans()
)
SFT_RECORD = st.one_of(
    st.builds(lambda p, r, x: {"prompt": p, "response": r, **x}, TEXTISH, TEXTISH, _extra()),
    st.builds(
        lambda p, r: {"prompt": p, "completion": r}, TEXTISH | TURN_LIST | MESSAGES, TEXTISH | MESSAGES
    ),
    st.builds(lambda t: {"text": t}, hh_dialogue() | TEXT),
    st.builds(lambda t: {"chosen": t, "rejected": "x"}, hh_dialogue()),
    st.builds(lambda m: {"messages": m}, MESSAGES | TURN_LIST),
    TURN_LIST,
    KTO_RECORD,
    JSON_ANY,
)
PAIR_RECORD = st.one_of(
    st.builds(_with, hh_pair(), _extra()),
    hh_pair(),
    st.builds(lambda p, c, r: {"prompt": p, "chosen": c, "rejected": r}, TEXTISH, TEXTISH, TEXTISH),
    st.builds(lambda c, r: {"chosen": c, "rejected": r}, TURN_LIST | MESSAGES, TURN_LIST | MESSAGES),
    # TRL's implicit prompt: a shared beginning, then the responses
    st.builds(lambda p, c, r: {"chosen": p + c, "rejected": p + r}, TEXTISH, TEXTISH, TEXTISH),
    KTO_RECORD,
    st.builds(
        lambda p, c, r: {"prompt": p, "chosen": c, "rejected": r}, MESSAGES | TURN_LIST, MESSAGES, MESSAGES
    ),
    JSON_ANY,
)
PROMPT_RECORD = st.one_of(
    st.builds(lambda p, x: {"prompt": p, **x}, TEXTISH | TURN_LIST | MESSAGES, _extra()),
    st.builds(lambda m: {"messages": m}, MESSAGES | TURN_LIST),
    st.builds(lambda c: {"chosen": c, "rejected": "r"}, hh_dialogue()),
    TEXTISH,
    TURN_LIST,
    JSON_ANY,
)
TEXT_RECORD = st.one_of(
    st.builds(lambda t: {"text": t}, TEXTISH), st.builds(lambda t: {"text": t}, TEXTISH), JSON_ANY
)
RECORDS = {
    "sft": SFT_RECORD,
    "pairs": PAIR_RECORD,
    "prompts": PROMPT_RECORD,
    "ptx": SFT_RECORD,
    "text": TEXT_RECORD,
}
LOADERS = {
    "sft": load_sft_examples,
    "pairs": load_preference_pairs,
    "prompts": load_prompts,
    "ptx": load_sft_examples,  # data.ptx is read by the SFT loader (ppo/data.py)
}
JUNK_LINES = [
    b"{",
    b'{"prompt": "a"',
    b"\xff\xfe",
    b'{"prompt": "caf\xe9"}',
    b"nul\x00",
    b"[1, 2",
    b"}{",
    b"\x85",
]


# ---------------------------------------------------------------------------------------------------------------
# the independent reading of a record (HH format)


def _norm(text: str) -> str:
    return "\n\n" + text if text.startswith(("Human:", "Assistant:")) else text


def _is_hh(text: str) -> bool:
    return text.startswith(("Human:", "Assistant:")) or H in text or A in text


def _response(text: str) -> str:
    return text if text[:1].isspace() else " " + text


def _prompt_text(text: str) -> str:
    return _norm(text).rstrip() if _is_hh(text) else f"{H} {text.strip()}{A}"


_ALIASES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "bot": "assistant"}
_ALIASES |= {"model": "assistant", "system": "system"}


def _turns(items: list[Any], last_role: str | None = None) -> list[tuple[str, str]]:
    if all(isinstance(m, dict) for m in items):
        return [(_ALIASES[str(m["role"]).lower()], m["content"]) for m in items]
    first_user = True if last_role is None else ((last_role == "user") == ((len(items) - 1) % 2 == 0))
    roles = ("user", "assistant") if first_user else ("assistant", "user")
    return [(roles[k % 2], s) for k, s in enumerate(items)]


def _render(turns: list[tuple[str, str]]) -> str:
    out = {
        "system": lambda c: c.strip(),
        "user": lambda c: f"{H} {c.strip()}",
        "assistant": lambda c: A + _response(c),
    }
    return "".join(out[role](c) for role, c in turns)


def _split(dialogue: str) -> tuple[str, str]:
    d = _norm(dialogue)
    i = d.rindex(A) + len(A)
    return d[:i], d[i:]


def expected_prompt(rec: Any) -> tuple[str, dict[str, Any]]:
    if isinstance(rec, str):
        return _prompt_text(rec), {}
    if isinstance(rec, list):
        return _prompt_from_list(rec, {})
    key = next(k for k in ("prompt", "messages", "chosen") if k in rec)
    meta = {k: v for k, v in rec.items() if k not in (key, "rejected")}
    value = rec[key]
    if isinstance(value, list):
        return _prompt_from_list(value, meta)
    return (_split(value)[0] if key == "chosen" else _prompt_text(value)), meta


def _prompt_from_list(items: list[Any], meta: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    strings = not all(isinstance(v, dict) for v in items)
    if strings and len(items) >= 2 and len(items) % 2 == 0:
        return _render(_turns(items[:-1])) + A, {**meta, "response": items[-1]}
    return _render(_turns(items)) + A, meta


def expected_pair(rec: dict[str, Any]) -> tuple[str, str, str, dict[str, Any]]:
    chosen, rejected = rec["chosen"], rec["rejected"]
    meta = {k: v for k, v in rec.items() if k not in ("prompt", "chosen", "rejected")}
    if isinstance(chosen, str):
        if "prompt" not in rec and not _is_hh(chosen) and not _is_hh(rejected):
            prompt, c, r = _implicit(chosen, rejected)
            return _prompt_text(prompt), _response(c), _response(r), meta
        if "prompt" not in rec:
            (p, c), (_, r) = _split(chosen), _split(rejected)
            return p, c, r, meta
        prompt = _prompt_text(rec["prompt"])
        if _is_hh(rec["prompt"]) and chosen.startswith(prompt):  # the prompt repeated inside the responses
            chosen, rejected = _split(chosen)[1], _split(rejected)[1]
        return prompt, _response(chosen), _response(rejected), meta
    if "prompt" in rec:
        context = _turns(rec["prompt"], "user")
        c, r = _content(chosen[0]), _content(rejected[0])
    else:
        tc, tr = _turns(chosen, "assistant"), _turns(rejected, "assistant")
        context, c, r = tc[:-1], tc[-1][1], tr[-1][1]
    return _render(context) + A, _response(c), _response(r), meta


def _implicit(chosen: str, rejected: str) -> tuple[str, str, str]:
    """TRL's implicit prompt: the common prefix, less its last partial word and the whitespace before it."""
    common = os.path.commonprefix([chosen, rejected])  # noqa: RUF071 (characters are what is compared)
    if re.search(r"\s", common):
        common = re.match(r"(?s)(.*?)\s*\S*\Z", common).group(1)  # type: ignore[union-attr]
    return common, chosen[len(common) :], rejected[len(common) :]


def _content(turn: Any) -> str:
    return turn if isinstance(turn, str) else turn["content"]


def expected_sft(rec: Any) -> tuple[str, str]:
    """(the whole dialogue the segments must spell, the final response)."""
    if isinstance(rec, list):
        return _render(_turns(rec)), _response(_content(rec[-1]))
    if "prompt" in rec:
        key = "completion" if "completion" in rec and "response" not in rec else "response"
        response = rec[key] if isinstance(rec[key], str) else _content(rec[key][0])
        p = rec["prompt"]
        prompt = _render(_turns(p, "user")) + A if isinstance(p, list) else _prompt_text(p)
        return prompt + _response(response), _response(response)
    key = next(k for k in ("messages", "text", "chosen") if k in rec)
    value = rec[key]
    if isinstance(value, list):
        return _render(_turns(value)), _response(_content(value[-1]))
    if key == "text" and not _is_hh(value):  # language modelling: the whole text is the response
        return value, value
    return _norm(value), _split(value)[1]


def check_item(kind: str, item: Any, rec: Any) -> None:
    """The loaded item equals the independent reading of its record, and its text is Unicode."""
    kto = isinstance(rec, dict) and "label" in rec and "completion" in rec
    assert kind == "prompts" or not kto, "an unpaired preference (KTO) record was loaded"
    if kind == "prompts":
        assert isinstance(item, PromptExample)
        prompt, meta = expected_prompt(rec)
        assert (item.prompt, item.meta) == (prompt, meta)
        texts = [item.prompt]
    elif kind == "pairs":
        assert isinstance(item, PreferencePair)
        assert (item.prompt, item.chosen, item.rejected, item.meta) == expected_pair(rec)
        assert item.chosen.strip() != item.rejected.strip()
        texts = [item.prompt, item.chosen, item.rejected]
    else:
        assert isinstance(item, SFTExample)
        whole, response = expected_sft(rec)
        assert "".join(s for s, _ in item.segments) == whole
        assert item.segments[-1] == (response, True) and item.response == response and response.strip()
        assert item.prompt + item.response == whole
        texts = [whole]
    for t in texts:
        t.encode("utf-8")  # no lone surrogate reaches the tokenizer


# ---------------------------------------------------------------------------------------------------------------
# writing files


def _dump(rec: Any, ascii_only: bool) -> bytes:
    return json.dumps(rec, ensure_ascii=ascii_only).encode("utf-8", errors="surrogatepass")


@st.composite
def jsonl_file(draw: Any, kind: str) -> tuple[list[tuple[int, Any]], bytes]:
    """``([(line, record or None for junk)], bytes)``: records one per line, with blank and junk lines."""
    records = draw(st.lists(RECORDS[kind], min_size=1, max_size=6))
    ascii_only = draw(st.booleans())
    lines: list[bytes] = []
    where: list[tuple[int, Any]] = []
    for rec in records:
        for _ in range(draw(st.integers(0, 1))):
            if draw(st.booleans()):
                lines.append(draw(st.sampled_from([b"", b"  ", b"\t", b"\r", b"\x0c"])))
            else:
                lines.append(draw(st.sampled_from(JUNK_LINES)))
                where.append((len(lines), None))
        lines.append(_dump(rec, ascii_only) + draw(st.sampled_from([b"", b"\r", b"  "])))
        where.append((len(lines), rec))
    return where, b"\n".join(lines) + draw(st.sampled_from([b"\n", b""]))


def _reads_as(rec: Any, ascii_only: bool) -> bool:
    try:
        _dump(rec, ascii_only).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from helpers import make_tiny_tokenizer

    return AutoTokenizer.from_pretrained(make_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def load_and_check(kind: str, path: Path, rows: list[tuple[int, Any]], on_error: str, tokenizer: Any) -> int:
    """Load ``path``; check the outcome against ``rows`` (``(line, record)``; record None: a line that must not
    load); returns how many items were loaded and checked (-1: the load failed with a DataError)."""
    stats = LoadStats()
    # the source text's meaning: JSON reads the escapes of a surrogate pair ("\\ud800\\udfff") as one character
    by_line = {line: None if rec is None else json.loads(json.dumps(rec)) for line, rec in rows}
    try:
        items = LOADERS[kind](path, on_error=on_error, stats=stats)
    except DataError as e:
        msg = str(e)
        assert "\n" not in msg and "\r" not in msg, msg
        # a line of a file is PATH:N, a row of a datasets directory PATH row N
        m = re.match(rf"{re.escape(str(path))}(?::(\d+)| row (\d+))?: \S", msg)
        assert m, msg
        number = m.group(1) or m.group(2)
        # a .json file is one JSON value: a byte or syntax error in it names the physical line and fails the file
        whole = path.name.endswith((".json", ".json.gz")) and (
            "not UTF-8 text" in msg or "malformed JSON" in msg
        )
        if number is not None and not whole:
            assert int(number) in by_line, msg
        if on_error == "skip":  # only a problem of the whole file fails a skipping load
            assert number is None or whole, msg
        return -1
    assert stats.loaded == len(items) and stats.loaded + stats.skipped == len(rows), (stats, rows)
    for item in items:
        m = re.fullmatch(rf"{re.escape(str(path))}(:| row )(\d+)", item.where)
        assert m and (m.group(1) == " row ") == path.is_dir(), item.where
        line = int(m.group(2))
        rec = by_line[line]
        assert rec is not None, f"junk line {line} loaded"
        check_item("sft" if kind == "ptx" else kind, item, rec)
        tokenize(kind, item, tokenizer, stats)
    return len(items)


def tokenize(kind: str, item: Any, tok: Any, stats: LoadStats) -> None:
    if kind == "prompts":
        ids = tokenize_prompt(tok, item.prompt, 16, stats)
        assert 0 < len(ids) <= 16
    elif kind == "pairs":
        out = tokenize_pair(tok, item, 16, 8, stats)
        assert all(len(out[k]) <= (16 if k == "prompt_ids" else 8) for k in ("prompt_ids", "chosen_ids"))
    else:
        out = tokenize_sft(tok, item, 16, 8, stats)
        assert len(out["input_ids"]) == len(out["labels"]) <= 24


def _write(path: Path, data: bytes) -> None:
    path.write_bytes(gzip.compress(data, mtime=0) if path.name.endswith(".gz") else data)


# ---------------------------------------------------------------------------------------------------------------
# the properties


@pytest.mark.parametrize("kind", list(LOADERS))
@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_fuzz_jsonl(kind, suffix, tokenizer, workdir, fuzz_cases):
    @budget(ci=25, full=1200)
    @given(jsonl_file(kind), st.sampled_from(["fail", "skip"]))
    def run(file, on_error):
        rows, data = file
        path = workdir / f"{kind}{suffix}"
        _write(path, data)
        fuzz_cases["(loaded items checked)"] += max(0, load_and_check(kind, path, rows, on_error, tokenizer))
        fuzz_cases[f"jsonl {kind}"] += 1

    run()


@pytest.mark.parametrize("kind", list(LOADERS))
def test_fuzz_json(kind, tokenizer, workdir, fuzz_cases):
    """.json / .json.gz: a list of records or a dict of columns; ``line`` is the record index."""

    @budget(ci=20, full=600)
    @given(
        st.lists(RECORDS[kind], min_size=1, max_size=5),
        st.sampled_from(["list", "columns"]),
        st.booleans(),
        st.sampled_from([".json", ".json.gz"]),
        st.sampled_from(["fail", "skip"]),
    )
    def run(records, layout, ascii_only, suffix, on_error):
        path = workdir / f"{kind}{suffix}"
        if layout == "columns":
            keys = sorted({k for r in records if isinstance(r, dict) for k in r})
            records = [r for r in records if isinstance(r, dict) and sorted(r) == keys] or [{"prompt": "q"}]
            keys = list(records[0])
            top: Any = {k: [r[k] for r in records] for k in keys}
        else:
            top = records
        data = json.dumps(top, ensure_ascii=ascii_only, indent=1).encode("utf-8", errors="surrogatepass")
        _write(path, data)
        rows = list(enumerate(records, start=1))
        checked = load_and_check(kind, path, rows, on_error, tokenizer)
        fuzz_cases["(loaded items checked)"] += max(0, checked)
        # a raw surrogate is bytes that are not UTF-8: the one JSON value is bad
        assert checked == -1 or all(_reads_as(r, ascii_only) for r in records)
        fuzz_cases[f"json {kind}"] += 1

    run()


@pytest.mark.parametrize("kind", ["sft", "pairs", "prompts"])
def test_fuzz_datasets_dir(kind, tokenizer, fuzz_cases):
    """`datasets` directories (save_to_disk): rows of one schema, strings without surrogates (Arrow is UTF-8)."""
    datasets = pytest.importorskip("datasets")
    keys = {"sft": ["prompt", "response"], "pairs": ["prompt", "chosen", "rejected"], "prompts": ["prompt"]}[
        kind
    ]
    clean = TEXTISH.map(lambda t: t.encode("utf-8", "ignore").decode("utf-8"))
    if kind == "pairs":
        rows = st.builds(
            lambda c, r: {"chosen": c, "rejected": r},
            hh_dialogue().map(lambda t: t.encode("utf-8", "ignore").decode()),
            hh_dialogue().map(lambda t: t.encode("utf-8", "ignore").decode()),
        )
    else:
        rows = st.fixed_dictionaries({k: clean for k in keys})

    @budget(ci=3, full=120)
    @given(st.lists(rows, min_size=1, max_size=4), st.sampled_from(["fail", "skip"]))
    def run(records, on_error):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "ds"
            datasets.Dataset.from_list(records).save_to_disk(str(path))
            checked = load_and_check(kind, path, list(enumerate(records, start=1)), on_error, tokenizer)
            fuzz_cases["(loaded items checked)"] += max(0, checked)
        fuzz_cases[f"datasets {kind}"] += 1

    run()


def test_fuzz_whole_files_of_arbitrary_bytes(workdir, fuzz_cases):
    """Any bytes under any supported name: a DataError line or loaded items, nothing else."""

    @budget(ci=40, full=1500)
    @given(
        st.binary(max_size=200)
        | st.lists(st.sampled_from([*JUNK_LINES, b'{"prompt": "hi"}', b"[", b"]"])).map(b"\n".join),
        st.sampled_from([".jsonl", ".json", ".jsonl.gz", ".json.gz"]),
        st.sampled_from(list(LOADERS)),
        st.sampled_from(["fail", "skip"]),
        st.booleans(),
    )
    def run(data, suffix, kind, on_error, raw_gz):
        path = workdir / f"any{suffix}"
        path.write_bytes(data if raw_gz or not suffix.endswith(".gz") else gzip.compress(data, mtime=0))
        try:
            LOADERS[kind](path, on_error=on_error, stats=LoadStats())
        except DataError as e:
            assert "\n" not in str(e) and str(e).startswith(str(path)), str(e)
        fuzz_cases["arbitrary bytes"] += 1

    run()


def test_fuzz_pretraining_text(tokenizer, workdir, fuzz_cases):
    """`objective: pretrain` records ``{"text": ...}`` (read by trainers/sft.py through the same reader): each is a
    loaded text cut into blocks, a counted skip or one DataError line."""
    from ppomax.trainers.sft import pretrain_features

    @budget(ci=15, full=800)
    @given(jsonl_file("text"), st.sampled_from(["fail", "skip"]))
    def run(file, on_error):
        rows, data = file
        path = workdir / "text.jsonl"
        _write(path, data)
        stats = LoadStats()
        try:
            feats = pretrain_features(str(path), tokenizer, 16, on_error, stats)
        except DataError as e:
            assert "\n" not in str(e) and str(e).startswith(str(path)), str(e)
        else:
            assert stats.loaded + stats.skipped == len(rows)
            assert all(2 <= len(f["input_ids"]) <= 16 and f["labels"] == f["input_ids"] for f in feats)
        fuzz_cases["pretraining text"] += 1

    run()
