"""The run engine's rules (ppomax.trainers.run), the same for train-sft, train-rm and train-ppo: a directory that
holds a run is never appended to, `--resume DIR` continues DIR with DIR's config, a run that died before its
first checkpoint is no dead end, stale temporaries go, TensorBoard resumes without duplicate steps, failed writes
are one line with the previous checkpoint intact, and no resume path unpickles a checkpoint's custom objects."""

from __future__ import annotations

import errno
import json
import pathlib
import pickle
import shutil

import pytest
import yaml

from helpers import assert_same_run, open_files_under, run_differences, set_args
from ppomax.cli import main
from ppomax.config import load_config
from ppomax.monitor import read_metrics
from ppomax.trainers.run_dir import config_differences, remove_stale_temporaries, resume_config
from tiny_lm import make_tiny_lm, write_jsonl, write_yaml

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = ["apple", "river", "stone", "cloud", "green", "seven", "table", "music"]
RECORDS = [{"prompt": f"Repeat the word {w}.", "response": f"{w} {w} {w}"} for w in WORDS]
TEXTS = [f"\n\nHuman: {r['prompt']}\n\nAssistant: {r['response']}" for r in RECORDS]


@pytest.fixture
def sft(tmp_path):
    """A 4-step SFT config (8 examples, batch 4, 2 epochs) checkpointing every 2 steps, and its file."""
    model = make_tiny_lm(tmp_path, TEXTS)
    cfg = {
        "model": {"policy": str(model)},
        "data": {"train": str(write_jsonl(tmp_path / "train.jsonl", RECORDS))},
        "optim": {"lr": 3e-3},
        "epochs": 2,
        "batch_size": 4,
        "logging": {
            "out_dir": str(tmp_path / "run"),
            "progress": False,
            "tensorboard": False,
            "checkpoint_every": 2,
            "keep_checkpoints": 5,
        },
    }
    return tmp_path, cfg, write_yaml(tmp_path / "sft.yaml", cfg)


def _steps(run):
    return [r["step"] for r in read_metrics(run / "metrics.jsonl") if "train/loss" in r]


# ---------------------------------------------------------------------------------------- new run / overwrite

ARGS = {
    "sft": ["train-sft", "--set", "model.policy=nowhere", "--set", "data.train=nowhere.jsonl"],
    "rm": ["train-rm", "--set", "model.policy=nowhere", "--set", "data.train=nowhere.jsonl"],
    "ppo": [
        "train-ppo",
        "--set",
        "model.policy=nowhere",
        "--set",
        "model.reward=nowhere",
        "--set",
        "data.prompts=nowhere.jsonl",
    ],
}


@pytest.mark.parametrize("kind", ["sft", "rm", "ppo"])
@pytest.mark.parametrize("holds", ["final", "checkpoints/step-3"])
def test_a_new_run_into_a_directory_holding_a_run_is_refused_by_every_trainer(tmp_path, capsys, kind, holds):
    """Refused before any model is loaded (the model paths here do not exist), the run untouched."""
    out = tmp_path / "run"
    (out / holds).mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    assert main([*ARGS[kind], "--set", f"logging.out_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert f"{out} already holds a run ({holds}" in err and "--overwrite" in err
    assert f"ppomax train-{kind} --resume {out}" in err
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_overwrite_replaces_only_the_runs_own_files(sft):
    tmp_path, _cfg, path = sft
    out = tmp_path / "run"
    assert main(["train-sft", "--config", str(path)]) == 0
    (out / "notes.txt").write_text("mine")
    assert main(["train-sft", "--config", str(path), "--overwrite"]) == 0
    assert _steps(out) == [1, 2, 3, 4]
    assert (out / "notes.txt").read_text() == "mine"
    with pytest.raises(SystemExit):  # argparse: the two exclude each other
        main(["train-sft", "--config", str(path), "--overwrite", "--resume", str(out)])


# ---------------------------------------------------------------------------------------- --resume DIR


def test_resume_reads_the_runs_config_and_writes_where_the_run_is_now(tmp_path):
    run = tmp_path / "moved"
    run.mkdir()
    cfg = load_config("sft", overrides=["logging.out_dir=/somewhere/else", "epochs=3"])
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    resumed = resume_config("sft", run, overrides=["epochs=5"])
    assert resumed.logging.out_dir == str(run) and resumed.epochs == 5
    with pytest.raises(Exception, match="not a ppomax run directory; pass the run directory"):
        resume_config("sft", run / "checkpoints" / "step-2")


def test_only_the_run_length_may_change_on_resume():
    a = load_config("ppo", preset="ppo_max")
    b = load_config(
        "ppo",
        preset="ppo_max",
        overrides=["ppo.iterations=7", "logging.out_dir=x", "ppo.kl.coef=0.2", "optim.policy_lr=1e-4"],
    )
    assert config_differences(a, b) == ["optim.policy_lr", "ppo.kl.coef"]


def test_resume_with_a_different_config_is_refused_naming_the_keys(sft, capsys):
    """Today's failure: it printed "already trained for 65 of 25 steps" and saved the other run's weights."""
    tmp_path, cfg, path = sft
    out = tmp_path / "run"
    assert main(["train-sft", "--config", str(path)]) == 0
    final = (out / "final" / "model.safetensors").read_bytes()
    cfg["batch_size"] = 2
    cfg["optim"]["lr"] = 1e-3
    other = write_yaml(tmp_path / "other.yaml", cfg)
    capsys.readouterr()
    assert main(["train-sft", "--config", str(other), "--resume", str(out)]) == 2
    err = capsys.readouterr().err
    assert "batch_size (4 -> 2)" in err and "optim.lr (0.003 -> 0.001)" in err
    assert (out / "final" / "model.safetensors").read_bytes() == final
    # the run length may change: two more epochs continue from the step-4 checkpoint
    assert main(["train-sft", "--resume", str(out), "--set", "epochs=3"]) == 0
    assert _steps(out) == [1, 2, 3, 4, 5, 6]


# ---------------------------------------------------------------------------------------- a run that died early


@pytest.mark.parametrize("again", [[], ["--resume"]])
def test_a_run_that_died_before_its_first_checkpoint_is_no_dead_end(sft, again):
    """config.yaml, metrics and TensorBoard written, only a half-written checkpoint: a plain re-run and a
    --resume both start the run afresh (no rm -rf), and the stale temporary is gone."""
    tmp_path, _cfg, path = sft
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text(pathlib.Path(path).read_text())
    (out / "metrics.jsonl").write_text('{"step": 1, "train/loss": 9.0}\n')
    (out / "checkpoints" / "step-2.tmp-4242").mkdir(parents=True)
    args = ["--resume", str(out)] if again else ["--config", str(path)]
    assert main(["train-sft", *args]) == 0
    assert _steps(out) == [1, 2, 3, 4] and read_metrics(out / "metrics.jsonl")[0]["train/loss"] != 9.0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-4"]


def test_stale_temporaries_are_removed_and_an_interrupted_replacement_is_undone(tmp_path):
    (tmp_path / "checkpoints" / "step-4.tmp-77").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-2").mkdir()
    (tmp_path / "final.tmp-77").mkdir()
    (tmp_path / "best.old-77").mkdir()  # killed between "best -> best.old" and "best.tmp -> best"
    (tmp_path / "final.old-78").mkdir()
    (tmp_path / "final").mkdir()
    remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "checkpoints", "final"]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-2"]


# ---------------------------------------------------------------------------------------- metrics


def _tb_steps(tb_dir):
    """(tag, step) of every scalar a TensorBoard reader keeps: events after a purge marker (a writer opened
    with purge_step) replace the earlier ones from that step on."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    kept: list[tuple[str, int]] = []
    for path in sorted(tb_dir.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime_ns):
        for event in EventFileLoader(str(path)).Load():
            if event.HasField("session_log") and event.session_log.status == event.session_log.START:
                kept = [(t, s) for t, s in kept if s < event.step]
            for value in event.summary.value:
                kept.append((value.tag, event.step))
    return kept


def test_tensorboard_and_metrics_resume_without_duplicate_steps(sft):
    tmp_path, _cfg, path = sft
    out = tmp_path / "run"
    assert main(["train-sft", "--config", str(path), "--set", "logging.tensorboard=true"]) == 0
    shutil.rmtree(out / "checkpoints" / "step-4")  # killed after logging step 4, before its checkpoint
    shutil.rmtree(out / "final")
    assert main(["train-sft", "--resume", str(out)]) == 0
    assert _steps(out) == [1, 2, 3, 4]
    loss = [s for t, s in _tb_steps(out / "tb") if t == "train/loss"]
    assert loss == [1, 2, 3, 4]


# ---------------------------------------------------------------------------------------- failed writes


@pytest.mark.parametrize(
    ("failure", "cause"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), "no space left on device"),
        # what torch.save and safetensors raise on a full disk
        (
            RuntimeError(
                "[enforce fail at inline_container.cc:664] . unexpected pos 0 vs 128: No space left"
            ),
            "no space left on device",
        ),
        # what torch.save raised on a real full disk, with the rest of its large tensor not fitting
        (
            RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64832 vs 64724"),
            "the file write failed with ",
        ),
    ],
)
def test_a_full_disk_is_one_line_and_the_previous_checkpoint_stays(sft, monkeypatch, capsys, failure, cause):
    from accelerate import Accelerator

    tmp_path, _cfg, path = sft
    out = tmp_path / "run"
    real = Accelerator.save_state
    calls = {"n": 0}

    def save_state(self, output_dir=None, **kw):
        calls["n"] += 1
        if calls["n"] == 2:  # the step-4 checkpoint
            pathlib.Path(output_dir, "model.safetensors").write_bytes(b"half")
            raise failure
        return real(self, output_dir, **kw)

    monkeypatch.setattr(Accelerator, "save_state", save_state)
    assert main(["train-sft", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"{out / 'checkpoints' / 'step-4'}: cannot write a checkpoint: {cause}" in err
    assert f"the last checkpoint {out / 'checkpoints' / 'step-2'} is intact" in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2"]
    monkeypatch.setattr(Accelerator, "save_state", real)
    assert main(["train-sft", "--resume", str(out)]) == 0  # the kept checkpoint resumes
    assert _steps(out) == [1, 2, 3, 4]


def test_a_failed_checkpoint_write_leaves_no_file_open(sft, monkeypatch):
    """The writer's open file (torch.save's, safetensors') lived on in the frames of the exception chained to
    the one-line error, so a full disk stayed full, with deleted files, for as long as the process lived."""
    from accelerate import Accelerator

    tmp_path, _cfg, path = sft

    def save_state(self, output_dir=None, **kw):
        # open when the disk fills up, as torch.save's file is
        fh = pathlib.Path(output_dir, "optimizer.bin").open("wb")  # noqa: SIM115
        fh.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Accelerator, "save_state", save_state)
    assert main(["train-sft", "--config", str(path)]) == 2
    assert open_files_under(tmp_path / "run") == []


@pytest.mark.parametrize("kind", ["sft", "ppo"])
def test_a_read_only_output_directory_is_found_before_any_model_is_loaded(
    tmp_path, monkeypatch, capsys, kind
):
    """As root (CI containers) permissions do not stop writes, so the read-only filesystem is simulated where
    ppomax probes it; the model paths do not exist, so reaching a loader would be a different error."""
    real_touch = pathlib.Path.touch

    def touch(self, *a, **kw):
        if self.name.startswith(".ppomax-write-test"):
            raise OSError(errno.EROFS, "Read-only file system")
        return real_touch(self, *a, **kw)

    monkeypatch.setattr(pathlib.Path, "touch", touch)
    out = tmp_path / "ro"
    assert main([*ARGS[kind], "--set", f"logging.out_dir={out}"]) == 2
    err = capsys.readouterr().err
    line = f"ppomax: {out}: cannot write the run directory (logging.out_dir): Read-only file system"
    assert line in err.splitlines() and "Traceback" not in err


# ---------------------------------------------------------------------------------------- no unpickling


class _Payload:
    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(_Payload.marker),))


def test_resume_never_unpickles_a_checkpoints_custom_objects(sft, capsys):
    """A crafted custom_checkpoint_0.pkl (accelerate would load it with weights_only=False) is refused in one
    line and never opened."""
    tmp_path, _cfg, path = sft
    out = tmp_path / "run"
    assert main(["train-sft", "--config", str(path)]) == 0
    shutil.rmtree(out / "final")
    ckpt = out / "checkpoints" / "step-4"
    assert (
        not list(ckpt.glob("custom_checkpoint_*"))
        and json.loads((ckpt / "ppomax_state.json").read_text())["step"] == 4
    )
    _Payload.marker = str(tmp_path / "pwned")
    (ckpt / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(_Payload()))
    capsys.readouterr()
    assert main(["train-sft", "--resume", str(out)]) == 2
    err = capsys.readouterr().err
    assert "custom_checkpoint_0.pkl, which ppomax never writes or loads" in err
    assert not (tmp_path / "pwned").exists()


# ---------------------------------------------------------------------------------------- one way to print


def test_every_message_goes_through_the_ppomax_logger(sft, capsys):
    """Trainer messages and the one-line error alike: records of the `ppomax` logger (stderr), stdout free
    for the result."""
    import logging

    tmp_path, _cfg, path = sft
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("ppomax")
    logger.addHandler(handler)
    try:
        assert main(["train-sft", "--config", str(path)]) == 0
        assert main(["train-sft", "--config", str(path)]) == 2  # refused: the run is there
    finally:
        logger.removeHandler(handler)
    messages = [r.getMessage() for r in records]
    assert any(m.startswith("model: ") for m in messages)
    assert any("already holds a run" in r.getMessage() and r.levelno == logging.ERROR for r in records)
    out = capsys.readouterr()
    assert out.out == f"{tmp_path / 'run' / 'final'}\n" and "ppomax: model: " in out.err


# ---------------------------------------------------------------------------------------- nothing before validation


def _snapshot(run: pathlib.Path) -> dict[str, bytes]:
    """Every file of a run directory and its bytes (the lock file aside: it only holds a PID)."""
    return {
        str(p.relative_to(run)): p.read_bytes()
        for p in sorted(run.rglob("*"))
        if p.is_file() and p.name != ".ppomax.lock"
    }


def test_a_resume_that_cannot_start_leaves_the_run_byte_identical(sft, capsys):
    """`--resume DIR --set epochs=3` with a broken data file: config.yaml (epochs), metrics, checkpoints and
    final/ are as they were; the one line names the file."""
    tmp_path, _cfg, path = sft
    out = tmp_path / "run"
    assert main(["train-sft", "--config", str(path)]) == 0
    before = _snapshot(out)
    (tmp_path / "train.jsonl").write_text('{"prompt": "x", "response": \n', encoding="utf-8")
    capsys.readouterr()
    assert main(["train-sft", "--resume", str(out), "--set", "epochs=3"]) == 2
    assert f"{tmp_path / 'train.jsonl'}:1: malformed JSON" in capsys.readouterr().err
    assert _snapshot(out) == before


@pytest.mark.parametrize("command", ["train-sft", "train-rm", "train-ppo"])
def test_a_model_path_that_is_not_there_names_its_key_and_writes_nothing(tmp_path, capsys, command):
    """A Hub id that is not in the local cache, offline (as every test is): one line naming the config key, and
    no run directory (no config.yaml, no tb/)."""
    out = tmp_path / "run"
    data = write_jsonl(
        tmp_path / "data.jsonl", [{"prompt": "p", "response": "r", "chosen": "a", "rejected": "b"}]
    )
    sets = [
        "model.policy=HuggingFaceTB/not-in-the-cache",
        f"logging.out_dir={out}",
        *(
            [f"data.train={data}"]
            if command != "train-ppo"
            else [f"data.prompts={data}", "model.reward=nowhere"]
        ),
    ]
    assert main([command, *set_args(*sets)]) == 2
    err = capsys.readouterr().err
    expected = "ppomax: model.policy: HuggingFaceTB/not-in-the-cache is not in the Hub cache and HF_HUB_OFFLINE is set"
    assert expected in err, err
    assert "tokenizer not found" not in err and "Traceback" not in err
    assert not out.exists()


# ---------------------------------------------------------------------------------------- changed data


def test_resume_refuses_changed_data_naming_the_file_unless_allowed(sft, capsys):
    """Other records in place of the training file (same count, other text): the resume is refused naming
    data.train and the way on, the run untouched; with --allow-data-change it continues, one warning naming
    the file."""
    tmp_path, _cfg, path = sft
    out = tmp_path / "run"
    assert main(["train-sft", "--config", str(path)]) == 0
    before = _snapshot(out)
    other = [{"prompt": f"Say {w}.", "response": w} for w in WORDS]
    write_jsonl(tmp_path / "train.jsonl", other)
    capsys.readouterr()
    assert main(["train-sft", "--resume", str(out), "--set", "epochs=3"]) == 2
    err = capsys.readouterr().err
    line = [ln for ln in err.splitlines() if ln.startswith("ppomax: ")][-1]
    assert f"data.train ({tmp_path / 'train.jsonl'}: " in line and "--allow-data-change" in line, line
    assert _snapshot(out) == before
    assert main(["train-sft", "--resume", str(out), "--set", "epochs=3", "--allow-data-change"]) == 0
    err = capsys.readouterr().err
    assert err.count("warning: the data changed since checkpoint step-4: data.train") == 1, err
    assert _steps(out) == [1, 2, 3, 4, 5, 6]
    state = json.loads((out / "checkpoints" / "step-6" / "ppomax_state.json").read_text())
    assert state["data_files"]["data.train"]["path"] == str(tmp_path / "train.jsonl")
    assert main(["train-sft", "--config", str(path), "--overwrite", "--allow-data-change"]) == 2


def test_the_fingerprint_of_a_data_file_and_of_a_datasets_directory(tmp_path):
    from ppomax.data.sources import fingerprint

    f = tmp_path / "a.jsonl"
    f.write_text('{"x": 1}\n')
    first = fingerprint(f)
    f.write_text('{"x": 2}\n')  # same size, other bytes
    assert first["size"] == fingerprint(f)["size"] and first["sha256"] != fingerprint(f)["sha256"]
    d = tmp_path / "ds"
    d.mkdir()
    (d / "data-00000.arrow").write_bytes(b"abc")
    (d / "state.json").write_text("{}")
    before = fingerprint(d)
    assert before["size"] == 5
    (d / "data-00000.arrow").write_bytes(b"abd")
    assert fingerprint(d)["sha256"] != before["sha256"]
    assert fingerprint(tmp_path / "missing.jsonl")["sha256"] is None


# ---------------------------------------------------------------------------------------- killed before config.yaml


@pytest.mark.parametrize("exists", [True, False])
def test_resume_of_a_directory_without_config_gives_the_command_that_starts_it(sft, capsys, exists):
    """What a run killed in its first seconds leaves (an empty directory, or none): --resume alone says how to
    start it afresh, and that command (with --config) does."""
    tmp_path, _cfg, path = sft
    out = tmp_path / "run"
    if exists:
        out.mkdir()
    assert main(["train-sft", "--resume", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"`ppomax train-sft --resume {out} --config FILE`" in err, err
    assert main(["train-sft", "--resume", str(out), "--config", str(path)]) == 0
    assert _steps(out) == [1, 2, 3, 4]


# ---------------------------------------------------------------------------------------- vocabulary


@pytest.fixture
def small_model(tmp_path):
    """A model whose embedding table (100 rows) is smaller than its tokenizer (~280 tokens), and a model whose
    config.json says a larger vocab_size than its weights hold."""
    import json as js

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tiny_lm import tiny_config

    base = make_tiny_lm(tmp_path, TEXTS)
    small = tmp_path / "small"
    AutoModelForCausalLM.from_config(tiny_config(100)).save_pretrained(small)
    AutoTokenizer.from_pretrained(base).save_pretrained(small)
    wrong = tmp_path / "wrong-config"
    shutil.copytree(base, wrong)
    config = js.loads((wrong / "config.json").read_text())
    rows = config["vocab_size"]
    config["vocab_size"] = rows + 50
    (wrong / "config.json").write_text(js.dumps(config))
    return base, small, wrong, rows


def _only_line(err: str) -> str:
    """stderr's one line (transformers' weight-loading bars aside: the CLI turns them off, a test process not)."""
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip() and "it/s]" not in ln]
    assert len(lines) == 1 and lines[0].startswith("ppomax: "), err
    return lines[0]


def test_a_tokenizer_larger_than_the_embeddings_is_one_line_in_every_command(small_model, tmp_path, capsys):
    from ppomax.models import ValueHeadModel

    base, small, _wrong, _rows = small_model
    judge = tmp_path / "rm"
    ValueHeadModel.from_causal_lm(base).save_pretrained(judge)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"]} for r in RECORDS])
    train = tmp_path / "train.jsonl"
    write_jsonl(train, RECORDS)
    runs = {
        "sft": ["train-sft", "--set", f"model.policy={small}", "--set", f"data.train={train}"],
        "ppo": [
            "train-ppo",
            "--set",
            f"model.policy={small}",
            "--set",
            f"data.prompts={prompts}",
            "--set",
            "reward.functions=[{function: 'ppo_helpers:response_length'}]",
            "--set",
            "ppo.critic_init=sft",
        ],
        "eval": [
            *("eval", "--policy", str(small), "--baseline", str(base), "--prompts", str(prompts)),
            *("--judge", f"reward-model:{judge}"),
        ],
    }
    for kind, args in runs.items():
        extra = [] if kind == "eval" else ["--set", f"logging.out_dir={tmp_path / kind}"]
        capsys.readouterr()
        assert main([*args, *extra]) == 2, kind
        line = _only_line(capsys.readouterr().err)
        assert "tokenizer has 300 tokens" in line and "embedding table has 100 rows" in line, line
        assert line.startswith("ppomax: --policy: " if kind == "eval" else "ppomax: model.policy: "), line


def test_a_config_whose_vocab_size_disagrees_with_the_weights_is_one_line(small_model, tmp_path, capsys):
    """Not transformers' load report (8 coloured lines) then an error: one line, the file and both sizes."""
    _base, _small, wrong, rows = small_model
    train = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    out = tmp_path / "run"
    assert (
        main(
            [
                "train-sft",
                "--set",
                f"model.policy={wrong}",
                "--set",
                f"data.train={train}",
                "--set",
                f"logging.out_dir={out}",
            ]
        )
        == 2
    )
    line = _only_line(capsys.readouterr().err)
    assert f"{wrong / 'config.json'}: vocab_size is {rows + 50}" in line, line
    assert f"({wrong / 'model.safetensors'}) have {rows} rows" in line, line
    assert not out.exists()


def test_a_ppo_resume_refuses_prompts_with_other_text(tmp_path, capsys):
    """The same number of prompts with other text (the prompt stream's size check cannot see it): refused,
    naming data.prompts; with --allow-data-change it continues, on more prompts too (the stream keeps its
    epoch)."""
    from ppo_helpers import QUESTIONS, config, make_setup

    setup = make_setup(tmp_path)
    cfg = config(setup, "ppo.iterations=1", "logging.checkpoint_every=1", out="run")
    path = write_yaml(tmp_path / "ppo.yaml", cfg.model_dump(mode="json"))
    out = tmp_path / "run"
    assert main(["train-ppo", "--config", str(path)]) == 0
    write_jsonl(setup.prompts, [{"prompt": f"\n\nHuman: {q} Please.\n\nAssistant:"} for q in QUESTIONS])
    capsys.readouterr()
    assert main(["train-ppo", "--resume", str(out), "--set", "ppo.iterations=2"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"data.prompts ({setup.prompts}: " in line and "--allow-data-change" in line, line
    write_jsonl(setup.prompts, [{"prompt": f"\n\nHuman: {q}\n\nAssistant:"} for q in [*QUESTIONS, "Why?"]])
    resume = ["train-ppo", "--resume", str(out), "--set", "ppo.iterations=2"]
    assert main(resume) == 2
    assert main([*resume, "--allow-data-change"]) == 0
    assert "data.prompts" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- killed after the last checkpoint


@pytest.mark.parametrize("kind", ["sft", "rm"])
@pytest.mark.parametrize("logged", [False, True])
def test_a_run_killed_after_its_last_checkpoint_resumes_to_the_same_end(tmp_path, kind, logged):
    """Killed between the last step's checkpoint and the end of the run (final evaluation, RM test scoring, final
    save): the resume does that end, so metrics and final/ are the uninterrupted run's, with no record twice
    (``logged``: the killed run had written the final evaluation's records already)."""
    from test_reward_trainer import _texts, rule_pairs

    if kind == "sft":
        model = make_tiny_lm(tmp_path, TEXTS)
        train = write_jsonl(tmp_path / "train.jsonl", RECORDS)
        data = {"train": str(train), "valid_fraction": 0.25}
        extra = {"batch_size": 2}
    else:
        pairs = rule_pairs(16, 0)
        model = make_tiny_lm(tmp_path, _texts(pairs))
        data = {
            "train": str(write_jsonl(tmp_path / "train.jsonl", pairs)),
            "valid": str(write_jsonl(tmp_path / "valid.jsonl", rule_pairs(8, 1))),
        }
        extra = {"batch_size": 4}
    logging_cfg = {"progress": False, "tensorboard": False, "checkpoint_every": 1, "eval_every": 0}
    cfg = {"model": {"policy": str(model)}, "data": data, "epochs": 1, "logging": logging_cfg, **extra}
    path = write_yaml(tmp_path / "cfg.yaml", cfg)
    command = f"train-{kind}"
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert main([command, "--config", str(path), "--set", f"logging.out_dir={ref}"]) == 0
    assert main([command, "--config", str(path), "--set", f"logging.out_dir={run}"]) == 0
    records = read_metrics(run / "metrics.jsonl")
    last = max(r["step"] for r in records)
    assert any(k.startswith("eval/") for r in records if r["step"] == last for k in r)  # the end's records
    kept = [r for r in records if "train/loss" in r or r["step"] < last] if not logged else records
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    shutil.rmtree(run / "final")
    assert main([command, "--resume", str(run)]) == 0
    assert_same_run(ref, run)


def test_run_differences_names_the_first_differing_tensor(tmp_path):
    """The tests' one comparison of a resumed run with the uninterrupted one (helpers.run_differences):
    timing fields aside, any difference is found and named by file and key, in optimiser state as in weights."""
    import torch
    from safetensors.torch import save_file

    def make_run(out: pathlib.Path, exp_avg: float, weight: float, seconds: float) -> pathlib.Path:
        ckpt = out / "checkpoints" / "step-2"
        ckpt.mkdir(parents=True)
        (out / "final").mkdir()
        (out / "metrics.jsonl").write_text(json.dumps({"step": 2, "loss": 0.5, "time/step": seconds}) + "\n")
        torch.save({"state": {0: {"exp_avg": torch.full((3,), exp_avg)}}}, ckpt / "optimizer.bin")
        save_file({"w": torch.full((2,), weight)}, str(out / "final" / "model.safetensors"))
        return out

    ref = make_run(tmp_path / "ref", 0.25, 1.0, seconds=1.0)
    assert run_differences(ref, make_run(tmp_path / "same", 0.25, 1.0, seconds=9.0)) is None
    diff = run_differences(ref, make_run(tmp_path / "optim", 0.25 + 2**-20, 1.0, seconds=1.0))
    assert diff and diff.startswith("checkpoints/step-2/optimizer.bin: state.0.exp_avg differs"), diff
    diff = run_differences(ref, make_run(tmp_path / "weights", 0.25, 1.5, seconds=1.0))
    assert diff and diff.startswith("final/model.safetensors: w differs (max |difference| 0.5)"), diff
