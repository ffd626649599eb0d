"""Data sources (README, Data): local files of every kind, directories, globs, lists, mappings of load_dataset's
arguments and Hub dataset ids (offline, from a prepared cache); their splits, `SOURCE[split] row N` errors and
counted skips, and their fingerprints. Nothing here downloads: the `datasets` cache is a temporary directory and the
Hub is offline."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from ppomax.data import DataError, LoadStats, Source, fingerprint, load_preference_pairs, read_records
from ppomax.data.io import SKIP_HINT

datasets = pytest.importorskip("datasets", reason="the optional 'datasets' package is not installed")

H, A = "\n\nHuman:", "\n\nAssistant:"
PAIRS = [{"chosen": f"{H} q{i}{A} good {i}", "rejected": f"{H} q{i}{A} bad {i}"} for i in range(3)]
EXPECTED = [(f"{H} q{i}{A}", f" good {i}", f" bad {i}") for i in range(3)]


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """datasets' cache in tmp_path, and the Hub offline (a Hub id is read from that cache or not at all)."""
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def triples(pairs) -> list[tuple[str, str, str]]:
    return [(p.prompt, p.chosen, p.rejected) for p in pairs]


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def hub_cache(tmp_path: Path, name: str, splits: dict[str, list]) -> str:
    """The cache an online `load_dataset(name)` leaves, made offline: a local repository loaded once, its cache
    directory renamed to the Hub id's (datasets' CachedDatasetModuleFactory then serves `load_dataset(name)`)."""
    owner, dataset = name.split("/")
    repo = tmp_path / "clone" / dataset  # the cache's files are named after the dataset
    for split, rows in splits.items():
        write_jsonl(repo / f"{split}.jsonl", rows)
    datasets.load_dataset(str(repo))
    cache = Path(datasets.config.HF_DATASETS_CACHE)
    target = cache / f"{owner}___{dataset}"
    shutil.move(cache / dataset, target)
    (config_dir,) = list(target.iterdir())
    config_dir.rename(target / "default")
    return name


# ---------------------------------------------------------------------------------------------- source kinds


@pytest.mark.parametrize(
    "kind",
    ["parquet", "csv", "arrow", "glob", "dir-of-parquet", "dir-of-jsonl", "saved", "dataset-dict", "mapping"],
)
def test_every_source_kind_gives_the_same_pairs(tmp_path, kind):
    ds = datasets.Dataset.from_list(PAIRS)
    if kind in ("parquet", "csv"):
        source = str(tmp_path / f"p.{kind}")
        getattr(ds, f"to_{kind}")(source)
        where = f"{source} row 3"
    elif kind == "arrow":
        ds.save_to_disk(str(tmp_path / "saved"))
        source = str(shutil.copy(next((tmp_path / "saved").glob("*.arrow")), tmp_path / "p.arrow"))
        where = f"{source} row 3"
    elif kind == "glob":
        ds.select([0, 1]).to_parquet(str(tmp_path / "p-0.parquet"))
        ds.select([2]).to_parquet(str(tmp_path / "p-1.parquet"))
        source, where = str(tmp_path / "p-*.parquet"), f"{tmp_path / 'p-1.parquet'} row 1"
    elif kind == "dir-of-parquet":
        (tmp_path / "d").mkdir()
        ds.to_parquet(str(tmp_path / "d" / "train.parquet"))
        ds.select([0]).to_parquet(str(tmp_path / "d" / "test.parquet"))
        source, where = str(tmp_path / "d"), f"{tmp_path / 'd'}[train] row 3"
    elif kind == "dir-of-jsonl":  # datasets finds the files, our reader reads them: file:line
        write_jsonl(tmp_path / "d" / "train.jsonl", PAIRS)
        source, where = str(tmp_path / "d"), f"{tmp_path / 'd' / 'train.jsonl'}:3"
    elif kind == "saved":
        ds.save_to_disk(str(tmp_path / "saved"))
        source, where = str(tmp_path / "saved"), f"{tmp_path / 'saved'} row 3"
    elif kind == "dataset-dict":
        datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dd"))
        source, where = str(tmp_path / "dd"), f"{tmp_path / 'dd'}[train] row 3"
    else:
        ds.to_parquet(str(tmp_path / "p.parquet"))
        source = {"path": "parquet", "data_files": [str(tmp_path / "p.parquet")]}
        where = f"parquet(data_files=[{tmp_path / 'p.parquet'}])[train] row 3"
    pairs = load_preference_pairs(source)
    assert triples(pairs) == EXPECTED
    assert pairs[-1].where == where


def test_a_list_of_files_and_globs_is_one_source_in_order(tmp_path):
    first = write_jsonl(tmp_path / "a.jsonl", PAIRS[2:])
    datasets.Dataset.from_list(PAIRS[:2]).to_parquet(str(tmp_path / "b-0.parquet"))
    pairs = load_preference_pairs([str(first), str(tmp_path / "b-*.parquet")])
    assert triples(pairs) == [EXPECTED[2], *EXPECTED[:2]]
    assert [p.where for p in pairs] == [
        f"{first}:1",
        *(f"{tmp_path / 'b-0.parquet'} row {n}" for n in (1, 2)),
    ]
    for bad, message in [
        ([str(tmp_path / "c-*.jsonl")], r"c-\*\.jsonl: no file matches this pattern$"),
        ([str(tmp_path)], r": a directory \(a list holds files or globs\)$"),
        ([], r"\[\]: a list source holds file paths or globs"),
    ]:
        with pytest.raises(DataError, match=message):
            load_preference_pairs(bad)


def test_rows_of_a_datasets_source_are_named_and_skipped_like_lines(tmp_path):
    rows = [PAIRS[0], {"chosen": f"{H} q{A} same", "rejected": f"{H} q{A} same"}, PAIRS[1]]
    dd = tmp_path / "dd"
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}).save_to_disk(str(dd))
    source = {"path": str(dd), "split": "test"}
    with pytest.raises(DataError) as err:
        load_preference_pairs(source)
    assert str(err.value) == f"{dd}[test] row 2: chosen and rejected responses are identical ({SKIP_HINT})"
    stats = LoadStats()
    assert triples(load_preference_pairs(source, on_error="skip", stats=stats)) == EXPECTED[:2]
    assert (stats.loaded, stats.skipped) == (2, 1)
    assert stats.examples == [f"{dd}[test] row 2: chosen and rejected responses are identical"]


def test_json_files_that_datasets_resolves_keep_line_errors_and_skips(tmp_path):
    """A directory or a json mapping of JSON Lines: a malformed line is skipped at its file:line, where datasets'
    JSON builder would fail the whole load."""
    path = write_jsonl(tmp_path / "d" / "train.jsonl", PAIRS)
    path.write_text(path.read_text() + "{not json\n")
    for source in (str(tmp_path / "d"), {"path": "json", "data_files": {"train": str(path)}}):
        stats = LoadStats()
        assert triples(load_preference_pairs(source, on_error="skip", stats=stats)) == EXPECTED
        assert stats.examples == [
            f"{path}:4: malformed JSON (Expecting property name enclosed in double quotes at column 2)"
        ]
        with pytest.raises(DataError, match=rf"^{path}:4: malformed JSON"):
            load_preference_pairs(source)


def test_a_none_column_of_a_row_is_a_missing_field(tmp_path):
    """Arrow gives every row every column; a row without 'prompt' among rows with one reads as having none."""
    rows = [
        {"prompt": "Hi", "chosen": " A", "rejected": " B"},
        {"chosen": f"{H} q{A} a", "rejected": f"{H} q{A} b"},
    ]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "m.parquet"))
    assert triples(load_preference_pairs(str(tmp_path / "m.parquet"))) == [
        (f"{H} Hi{A}", " A", " B"),
        (f"{H} q{A}", " a", " b"),
    ]


# ---------------------------------------------------------------------------------------------- splits


def test_split_rules(tmp_path):
    ds = datasets.Dataset.from_list(PAIRS)
    dd = tmp_path / "dd"
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(dd))
    assert len(load_preference_pairs(Source(str(dd), "data.train"))) == 3  # training data: train
    with pytest.raises(DataError) as err:  # a held-out set must name one of several splits
        load_preference_pairs(Source(str(dd), "data.valid", held_out=True))
    assert str(err.value) == (
        f"data.valid: {dd}: a source with splits train, test; a held-out set names its split "
        f"(e.g. data.valid: {{path: {dd}, split: test}})"
    )
    assert len(load_preference_pairs(Source({"path": str(dd), "split": "test"}, "data.valid", True))) == 1
    with pytest.raises(DataError, match=r"^data.train: .*dd: no split 'dev' \(splits: train, test\)$"):
        load_preference_pairs(Source({"path": str(dd), "split": "dev"}, "data.train"))
    only_test = tmp_path / "only-test"
    datasets.DatasetDict({"test": ds}).save_to_disk(str(only_test))
    with pytest.raises(DataError, match=r"has no 'train' split \(splits: test; e.g. data.train: \{path: "):
        load_preference_pairs(Source(str(only_test), "data.train"))
    assert (
        len(load_preference_pairs(Source(str(only_test), "data.valid", held_out=True))) == 3
    )  # its one split
    ds.save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(DataError, match=r"saved: has no splits \(a Dataset written by save_to_disk\)"):
        load_preference_pairs({"path": str(tmp_path / "saved"), "split": "train"})


def test_a_hub_dataset_id_is_read_through_load_dataset_offline(tmp_path):
    """`load_dataset("owner/name")` as datasets resolves it without a network: from the cache an earlier online
    load left (made here from a local repository). A plain id reads train; a held-out set needs its split."""
    name = hub_cache(tmp_path, "someone/hh-mini", {"train": PAIRS, "test": PAIRS[:1]})
    pairs = load_preference_pairs(Source(name, "data.train"))
    assert triples(pairs) == EXPECTED and pairs[0].where == f"{name}[train] row 1"
    test = load_preference_pairs(Source({"path": name, "split": "test"}, "data.valid", held_out=True))
    assert triples(test) == EXPECTED[:1] and test[0].where == f"{name}[test] row 1"
    with pytest.raises(DataError) as err:
        load_preference_pairs(Source(name, "data.valid", held_out=True))
    assert str(err.value) == (
        f"data.valid: {name}: a Hub dataset; a held-out set names its split "
        f"(e.g. data.valid: {{path: {name}, split: test}})"
    )
    with pytest.raises(DataError) as err:
        load_preference_pairs("someone/not-there")
    message = str(err.value)
    assert message.startswith("someone/not-there: no such file or directory, and cannot load it from the")
    assert "\n" not in message
    train_print, test_print = fingerprint(name), fingerprint({"path": name, "split": "test"})
    assert train_print == fingerprint(name) and train_print["sha256"] != test_print["sha256"]
    assert train_print["path"] == name and train_print["size"] > 0


def test_strings_that_name_nothing(tmp_path):
    with pytest.raises(DataError, match=r"nope\.parquet: no such file or directory$"):
        load_preference_pairs(str(tmp_path / "nope.parquet"))
    (tmp_path / "x.txt").write_text("hello\n")
    with pytest.raises(DataError, match=r"x\.txt: unsupported file type \(expected \.jsonl, .*\.parquet"):
        load_preference_pairs(str(tmp_path / "x.txt"))
    with pytest.raises(DataError, match=r"unknown key 'splits' \(a source mapping has path, name, data_dir"):
        load_preference_pairs({"path": str(tmp_path), "splits": "train"})


def test_read_records_names_rows_and_lines(tmp_path):
    datasets.Dataset.from_list(PAIRS[:1]).to_parquet(str(tmp_path / "a.parquet"))
    (rec,) = read_records(str(tmp_path / "a.parquet"))
    assert (rec.source, rec.number, rec.row, rec.value) == (str(tmp_path / "a.parquet"), 1, True, PAIRS[0])
    assert rec.where == f"{tmp_path / 'a.parquet'} row 1"


# ---------------------------------------------------------------------------------------------- fingerprints


def _changes(source, change) -> bool:
    before = fingerprint(source)
    assert before["sha256"] is not None and before == fingerprint(source)  # stable
    change()
    return fingerprint(source)["sha256"] != before["sha256"]


def test_the_fingerprint_of_every_local_source_kind_follows_its_bytes(tmp_path):
    ds = datasets.Dataset.from_list(PAIRS)
    other = datasets.Dataset.from_list(PAIRS[::-1])
    ds.to_parquet(str(tmp_path / "a.parquet"))
    assert _changes(str(tmp_path / "a.parquet"), lambda: other.to_parquet(str(tmp_path / "a.parquet")))
    (tmp_path / "d").mkdir()
    ds.to_parquet(str(tmp_path / "d" / "train.parquet"))
    assert _changes(str(tmp_path / "d"), lambda: other.to_parquet(str(tmp_path / "d" / "train.parquet")))
    glob = str(tmp_path / "g-*.jsonl")
    write_jsonl(tmp_path / "g-0.jsonl", PAIRS)
    assert _changes(glob, lambda: write_jsonl(tmp_path / "g-1.jsonl", PAIRS))  # a new file matches
    listed = [str(tmp_path / "g-0.jsonl"), str(tmp_path / "a.parquet")]
    assert _changes(listed, lambda: write_jsonl(tmp_path / "g-0.jsonl", PAIRS[:1]))
    mapping = {"path": "parquet", "data_files": str(tmp_path / "a.parquet")}
    assert _changes(mapping, lambda: ds.to_parquet(str(tmp_path / "a.parquet")))
    dd = tmp_path / "dd"
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(dd))
    test = {"path": str(dd), "split": "test"}
    # only the split read counts: another split's files changing is no change of this source
    before = fingerprint(test)
    datasets.DatasetDict({"train": other, "test": ds}).save_to_disk(str(tmp_path / "dd2"))
    shutil.rmtree(dd / "train")
    shutil.copytree(tmp_path / "dd2" / "train", dd / "train")
    assert fingerprint(test) == before
    # a plain file keeps the fingerprint earlier versions wrote: its bytes' SHA-256
    import hashlib

    data = (tmp_path / "g-0.jsonl").read_bytes()
    assert fingerprint(str(tmp_path / "g-0.jsonl"))["sha256"] == hashlib.sha256(data).hexdigest()
    assert fingerprint(str(tmp_path / "missing.parquet"))["sha256"] is None


def test_data_in_memory_is_a_source_with_named_rows_and_a_content_fingerprint():
    """A datasets.Dataset or a list of records (what the Python API's train_dataset= takes) reads like a file:
    the same pairs, rows named in errors and skips, a fingerprint that follows the content."""
    ds = datasets.Dataset.from_list(PAIRS)
    assert triples(load_preference_pairs(ds)) == EXPECTED
    assert triples(load_preference_pairs(list(PAIRS))) == EXPECTED
    bad = [PAIRS[0], {"chosen": f"{H} q{A} same", "rejected": f"{H} q{A} same"}]
    with pytest.raises(DataError) as err:
        load_preference_pairs(bad)
    assert (
        str(err.value) == f"list(2 records) row 2: chosen and rejected responses are identical ({SKIP_HINT})"
    )
    with pytest.raises(DataError) as err:
        load_preference_pairs(datasets.Dataset.from_list(bad))
    assert str(err.value).startswith("Dataset(2 rows) row 2: chosen and rejected")
    assert fingerprint(ds) == fingerprint(datasets.Dataset.from_list(PAIRS))
    assert fingerprint(ds)["sha256"] != fingerprint(datasets.Dataset.from_list(PAIRS[:2]))["sha256"]
    assert fingerprint(list(PAIRS)) == fingerprint([dict(p) for p in PAIRS])
    assert fingerprint(list(PAIRS))["sha256"] != fingerprint(PAIRS[::-1])["sha256"]
    for wrong, what in (
        ([PAIRS[0], 3], "a list source holds file paths (strings) or records (dicts), not a mix"),
        (datasets.DatasetDict({"train": ds}), "a DatasetDict has several splits (train): pass one"),
    ):
        with pytest.raises(DataError, match=re.escape(what)):
            list(read_records(wrong))


# ---------------------------------------------------------------------------------------------- in a run


@pytest.mark.usefixtures("one_thread")
def test_train_rm_reads_every_source_kind_and_resume_checks_each(tmp_path, capsys):
    """train-rm on a Hub dataset (offline cache), a DatasetDict split and a parquet file, with two processes
    preparing the data: it trains; the checkpoint fingerprints each source, and a resume after the parquet file
    changed is refused naming its key."""
    from ppomax.cli import main
    from tiny_lm import make_tiny_lm, write_yaml

    rows = [
        {"chosen": f"{H} say {w}{A} thanks {w}", "rejected": f"{H} say {w}{A} {w}"}
        for w in ["apple", "river", "stone", "cloud", "green", "seven", "table", "music"]
    ]
    name = hub_cache(tmp_path, "someone/thanks", {"train": rows})
    dd = tmp_path / "dd"
    datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows[:4])}).save_to_disk(str(dd))
    datasets.Dataset.from_list(rows[4:]).to_parquet(str(tmp_path / "test.parquet"))
    model = make_tiny_lm(tmp_path, [r["chosen"] for r in rows])
    out = tmp_path / "run"
    cfg = {
        "model": {"policy": str(model)},
        "data": {
            "train": name,
            "valid": {"path": str(dd), "split": "validation"},
            "test": str(tmp_path / "test.parquet"),
            "num_proc": 2,
        },
        "epochs": 1,
        "batch_size": 4,
        "logging": {"out_dir": str(out), "progress": False, "tensorboard": False, "checkpoint_every": 1},
    }
    assert main(["train-rm", "--config", str(write_yaml(tmp_path / "rm.yaml", cfg))]) == 0
    printed = capsys.readouterr()
    assert f"train pairs {name}: loaded 8, skipped 0" in printed.out + printed.err
    assert f"valid pairs {dd}[validation]: loaded 4, skipped 0" in printed.out + printed.err
    state = json.loads(next((out / "checkpoints").glob("step-*/ppomax_state.json")).read_text())
    assert set(state["data_files"]) == {"data.train", "data.valid", "data.test"}
    assert all(fp["sha256"] for fp in state["data_files"].values())
    datasets.Dataset.from_list(rows[5:]).to_parquet(str(tmp_path / "test.parquet"))
    assert main(["train-rm", "--resume", str(out), "--set", "epochs=2"]) == 2
    err = capsys.readouterr().err
    assert (
        f"the data changed since checkpoint step-2 was written: data.test ({tmp_path / 'test.parquet'}: "
        in err
    )


def test_eval_prompts_are_a_held_out_source(tmp_path):
    """`ppomax eval --prompts` takes a path or a mapping (YAML); a source with several splits names its split."""
    from ppomax.commands.eval import prompts_source
    from ppomax.errors import UserError
    from ppomax.evaluate import load_eval_prompts

    rows = [{"prompt": f"q{i}", "subset": "harmless"} for i in range(3)]
    dd = tmp_path / "dd"
    ds = datasets.Dataset.from_list(rows)
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(dd))
    source = Source(prompts_source(f"{{path: {dd}, split: test}}"), "--prompts", held_out=True)
    prompts, subsets = load_eval_prompts(source, chat_format="hh")
    assert (prompts[0].text, subsets) == (f"{H} q0{A}", ["harmless"])
    with pytest.raises(DataError) as err:
        load_eval_prompts(Source(prompts_source(str(dd)), "--prompts", held_out=True))
    assert str(err.value).endswith(f"(e.g. --prompts '{{path: {dd}, split: test}}')")
    with pytest.raises(
        UserError, match=r"^--prompts '\{path: x, splits: test\}': not a mapping of load_dataset's "
    ):
        prompts_source("{path: x, splits: test}")
