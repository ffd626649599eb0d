"""Fault injection (the harness: tests/faults.py): SIGKILL at random and at aimed moments of SFT, RM and PPO runs
(generation, an update, a checkpoint write, the first checkpoint), then resume until done: every finished run
has the metrics (all but timing fields) and the final weights of an uninterrupted run. A full disk at the first
and at a later checkpoint, and an output directory that turns read-only: one line, the previous checkpoint intact.

The default run kills a few times (fast); ``-m slow`` runs the long suite (at least 30 kills over the three
trainers) and prints its report: kills tried, runs resumed exactly, the reason for any that was not.
"""

from __future__ import annotations

import errno
import os
import pathlib
import random
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from faults import (
    Chain,
    Trigger,
    last_line,
    make_trigger,
    report,
    run_chain,
    run_launched,
    run_once,
    snapshot,
    spawn,
    wait,
)
from helpers import DEFAULT_TEXTS, assert_same_run, open_files_under, run_differences, set_args
from ppo_helpers import FAST, make_setup, reward_fn
from ppomax.cli import main
from test_reward_trainer import _texts, rule_pairs
from tiny_lm import make_tiny_lm, write_jsonl, write_yaml

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = ["apple", "river", "stone", "cloud", "green", "seven", "table", "music"]
SFT_RECORDS = [{"prompt": f"Repeat the word {w}.", "response": f"{w} {w} {w}"} for w in WORDS]
LOGGING = {"progress": False, "tensorboard": False, "checkpoint_every": 1, "keep_checkpoints": 2}
# every kind of moment each trainer is killed at (tests/faults.py)
MOMENTS = {
    "sft": ["random", "early", "checkpoint", "update"],
    "rm": ["random", "early", "checkpoint", "update"],
    "ppo": ["random", "early", "checkpoint", "generation", "update"],
}


@dataclass
class Trainer:
    """One trainer's small run: its command (``ppomax ...`` arguments without ``logging.out_dir``), the
    uninterrupted reference run, that run's length and its time to ``config.yaml`` in seconds, and its
    training data file (config key, path)."""

    kind: str
    command: list[str]
    ref: Path
    span: float
    early_span: float
    data: tuple[str, Path]
    reward_calls: Path | None = None

    def args(self, out: Path, *extra: str) -> list[str]:
        return [*self.command, "--set", f"logging.out_dir={out}", *extra]


def _reference(
    kind: str, command: list[str], root: Path, data: tuple[str, Path], reward_calls: Path | None = None
) -> Trainer:
    ref = root / "ref"
    t0 = time.monotonic()
    seen: dict[str, float] = {}

    def watch() -> bool:  # never fires: notes when the run writes its config
        if "config" not in seen and (ref / "config.yaml").is_file():
            seen["config"] = time.monotonic() - t0
        return False

    attempt = run_once([*command, "--set", f"logging.out_dir={ref}"], root / "ref.log", Trigger("", watch))
    assert attempt.rc == 0, last_line(root / "ref.log")
    return Trainer(kind, command, ref, time.monotonic() - t0, seen["config"], data, reward_calls)


@pytest.fixture(scope="module")
def trainers(tmp_path_factory) -> dict[str, Trainer]:
    """SFT (8 steps), RM (8 steps, evaluated every 4) and PPO (4 iterations), each checkpointing every step, and
    their uninterrupted runs (built lazily, once per module)."""
    root = tmp_path_factory.mktemp("faults")

    class Lazy(dict):
        def __missing__(self, kind: str) -> Trainer:
            self[kind] = _build(kind, root / kind)
            return self[kind]

    return Lazy()


def _build(kind: str, root: Path) -> Trainer:
    root.mkdir(parents=True)
    if kind == "sft":
        model = make_tiny_lm(root, DEFAULT_TEXTS)
        cfg = {
            "model": {"policy": str(model)},
            "data": {"train": str(write_jsonl(root / "train.jsonl", SFT_RECORDS))},
            "optim": {"lr": 3e-3},
            "epochs": 2,
            "batch_size": 2,
            "logging": LOGGING,
        }
        command = ["train-sft", "--config", str(write_yaml(root / "sft.yaml", cfg))]
        return _reference(kind, command, root, ("data.train", root / "train.jsonl"))
    if kind == "rm":
        train, valid = rule_pairs(32, 0), rule_pairs(16, 1)
        model = make_tiny_lm(root, _texts(train))
        cfg = {
            "model": {"policy": str(model)},
            "data": {
                "train": str(write_jsonl(root / "train.jsonl", train)),
                "valid": str(write_jsonl(root / "valid.jsonl", valid)),
            },
            "optim": {"lr": 3e-3},
            "epochs": 2,
            "batch_size": 8,
            "logging": {**LOGGING, "eval_every": 4},
        }
        command = ["train-rm", "--config", str(write_yaml(root / "rm.yaml", cfg))]
        return _reference(kind, command, root, ("data.train", root / "train.jsonl"))
    setup = make_setup(root)
    calls = root / "reward-calls"
    sets = [
        f"model.policy={setup.policy}",
        f"model.reward={setup.reward}",
        f"data.prompts={setup.prompts}",
        *FAST,
        "ppo.iterations=4",
        "logging.checkpoint_every=1",
        "logging.keep_checkpoints=2",
        reward_fn("ppo_helpers:counted", counter=str(calls)),
    ]
    command = ["train-ppo", "--preset", "ppo_max", *set_args(*sets)]
    return _reference(kind, command, root, ("data.prompts", setup.prompts), calls)


def _chain(t: Trainer, moments: list[str], out: Path, rng: random.Random, change_data: bool = False) -> Chain:
    return run_chain(
        Chain(t.kind, moments),
        t.args(out),
        out,
        t.ref,
        rng,
        span=t.span,
        early_span=t.early_span,
        reward_calls=t.reward_calls,
        data=t.data if change_data else None,
    )


# ------------------------------------------------------------------------------------------------- kills


@pytest.mark.parametrize(
    ("kind", "moments", "change_data"),
    [
        ("ppo", ["first_checkpoint", "checkpoint", "generation"], True),
        ("sft", ["early", "update", "random"], True),
        ("rm", ["early", "checkpoint", "update"], False),
    ],
)
def test_killed_runs_resume_to_the_uninterrupted_result(
    trainers, tmp_path, capsys, kind, moments, change_data
):
    """Also: after a kill before the run wrote its config, --resume alone gives the command that starts it
    afresh; a resume on a changed data file is refused, the run untouched (tests/faults.py:run_chain)."""
    chain = _chain(trainers[kind], moments, tmp_path / "run", random.Random(12), change_data)
    with capsys.disabled():
        print("\n" + report([chain], []))
    assert chain.exact, chain.reason
    assert sum(a.fired for a in chain.attempts) >= len(moments) - 1, chain.attempts
    assert "changed data" in chain.checks or not change_data, chain.checks


@pytest.mark.slow
def test_kills_anywhere_in_every_trainer_resume_exactly(trainers, tmp_path, capsys):
    """At least 60 kills over the three trainers, at moments drawn at random (seed in the report), some before
    the run wrote its config; in about a third of the runs a data file changes once a checkpoint exists (the
    resume must refuse it)."""
    seed = int(os.environ.get("PPOMAX_FAULT_SEED", "2026"))
    rng = random.Random(seed)
    wanted = {"sft": 20, "rm": 20, "ppo": 25}
    chains: list[Chain] = []
    for kind, n in wanted.items():
        t, fired, i = trainers[kind], 0, 0
        while fired < n and i < 3 * n:
            moments = [rng.choice(MOMENTS[kind]) for _ in range(rng.randint(2, 4))]
            first = rng.random()
            if first < 0.3:
                moments[0] = "first_checkpoint"
            elif first < 0.5:
                moments[0] = "early"
            chain = _chain(t, moments, tmp_path / f"{kind}-{i}", rng, change_data=rng.random() < 0.35)
            chains.append(chain)
            fired += sum(a.fired for a in chain.attempts)
            i += 1
            if chain.exact:
                shutil.rmtree(tmp_path / f"{kind}-{i - 1}", ignore_errors=True)
    text = report(chains, [f"seed {seed} (PPOMAX_FAULT_SEED)"])
    with capsys.disabled():
        print("\n" + text)
    assert sum(a.fired for c in chains for a in c.attempts) >= 60, text
    assert all(c.exact for c in chains), text


# ------------------------------------------------------------------------------------------------- two writers


def _two_at_once(t: Trainer, out: Path) -> str | None:
    """Two runs started at once into ``out``: one runs to the uninterrupted result, the other exits 2 in one line
    (the run writing there, by PID, or the run it left). The problem, or None."""
    logs = out.parent / f"{out.name}-logs"
    children = [spawn(t.args(out), logs / f"{name}.log") for name in ("a", "b")]
    codes = [wait(c) for c in children]
    if sorted(codes) != [0, 2]:
        return f"two at once into {out}: exits {codes}"
    line = last_line(children[codes.index(2)].log)
    if "another ppomax run (PID " not in line and "already holds a run" not in line:
        return f"two at once into {out}: {line}"
    return run_differences(t.ref, out)


def _second_writers(t: Trainer, out: Path, capsys) -> str | None:
    """While a run is alive (stopped with SIGSTOP after its first checkpoint), a new run, --overwrite and --resume
    into its directory exit 2 naming its PID and change nothing; it then finishes as if alone. The problem, or
    None."""
    child = spawn(t.args(out), out.parent / f"{out.name}-live.log")
    while not (out / "checkpoints" / "step-1").is_dir():
        assert os.waitpid(child.pid, os.WNOHANG)[0] == 0, last_line(child.log)
        time.sleep(0.001)
    os.kill(child.pid, signal.SIGSTOP)
    try:
        before = snapshot(out)
        for args in (t.args(out), t.args(out, "--overwrite"), [t.command[0], "--resume", str(out)]):
            capsys.readouterr()
            if main(args) != 2:
                return f"{args}: not refused"
            line = _one_line(capsys.readouterr().err)
            if f"{out}: another ppomax run (PID {child.pid}) is writing here" not in line:
                return f"{args}: {line}"
        if snapshot(out) != before:
            return "a refused writer changed the live run's directory"
    finally:
        os.kill(child.pid, signal.SIGCONT)
    rc = wait(child)
    return f"the live run exited {rc}: {last_line(child.log)}" if rc else run_differences(t.ref, out)


def test_two_runs_started_together_into_one_directory_give_one_run(trainers, tmp_path):
    """Started at once into a directory neither has made yet (each finds it missing, so each takes the lock
    only when it starts writing)."""
    problem = _two_at_once(trainers["sft"], tmp_path / "run")
    assert problem is None, problem


def test_a_second_writer_into_a_live_run_is_refused_naming_it(trainers, tmp_path, capsys):
    problem = _second_writers(trainers["sft"], tmp_path / "run", capsys)
    assert problem is None, problem


@pytest.mark.slow
def test_concurrent_writers_in_every_trainer(trainers, tmp_path, capsys):
    """Per trainer: two runs started together, three times (twice into a new directory, once into an existing
    empty one, where both reach the lock before loading anything), and the three second writers into a live
    run."""
    problems, pairs, live = [], 0, 0
    for kind in ("sft", "rm", "ppo"):
        t = trainers[kind]
        for i in range(3):
            out = tmp_path / f"{kind}-together-{i}"
            if i == 2:
                out.mkdir()
            pairs += 1
            problems.append(_two_at_once(t, out))
        live += 1
        problems.append(_second_writers(t, tmp_path / f"{kind}-live", capsys))
    text = (
        f"concurrent writers: {pairs} pairs started together, {live} live runs each refusing a new run, "
        f"--overwrite and --resume; problems: {[p for p in problems if p] or 'none'}"
    )
    with capsys.disabled():
        print("\n" + text)
    assert not any(problems), text


# ------------------------------------------------------------------------------------------------- ZeRO-3


@pytest.mark.slow
def test_a_zero3_ppo_run_with_2_processes_killed_in_checkpoint_writes_resumes_exactly(tmp_path, capsys):
    """accelerate launch with configs/accelerate/zero3.yaml, 2 CPU processes (gloo): the launcher and both ranks
    SIGKILLed at once while a checkpoint is being written (its step-N.tmp-PID directory holding 0-3 files), twice,
    then resumed with the same launch until done: the metrics (all but timing fields) and the final weights of
    the uninterrupted 2-process run."""
    pytest.importorskip("deepspeed")
    from launch_helpers import accelerate_launch

    configs = Path(__file__).parents[1] / "src" / "ppomax" / "configs" / "accelerate"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), str(Path(__file__).parent)]),
        "OMP_NUM_THREADS": "1",
    }
    setup = make_setup(tmp_path)
    sets = [
        f"model.policy={setup.policy}",
        f"model.reward={setup.reward}",
        f"data.prompts={setup.prompts}",
        *FAST,
        "ppo.iterations=4",
        "ppo.rollout_batch_size=4",
        "ppo.buffer_size=4",
        "ppo.minibatch_size=2",
        "logging.checkpoint_every=1",
        "logging.keep_checkpoints=2",
    ]
    launch = [*accelerate_launch(2, ["--quiet", "--config_file", str(configs / "zero3.yaml")]), "train-ppo"]

    def args(out: Path) -> list[str]:
        return [
            *launch,
            "--preset",
            "ppo_max",
            *set_args(*sets, f"logging.out_dir={out}"),
        ]

    ref, out = tmp_path / "ref", tmp_path / "run"
    assert run_launched(args(ref), tmp_path / "ref.log", env, None, ref).rc == 0, last_line(
        tmp_path / "ref.log"
    )
    rng = random.Random(3)
    attempts = []
    for i in range(12):
        command = args(out) if not (out / "config.yaml").is_file() else [*launch, "--resume", str(out)]
        moment = "checkpoint" if len(attempts) < 2 else None
        trigger = make_trigger(moment, out, rng, span=0, kind="ppo", reward_calls=None) if moment else None
        attempt = run_launched(command, tmp_path / f"{i}.log", env, trigger, out)
        if moment:
            attempts.append(attempt)
        if not attempt.fired:
            assert attempt.rc == 0, last_line(tmp_path / f"{i}.log")
            if not moment and len(attempts) >= 2:
                break
    text = (
        f"zero3 ppo, 2 processes: {sum(a.fired for a in attempts)} kills ({sum(a.mid_write for a in attempts)} "
        f"during a checkpoint write: {[a.aimed for a in attempts]})"
    )
    diff = run_differences(ref, out)
    with capsys.disabled():
        print(f"\n{text}; {'resumed exactly' if diff is None else diff}")
    assert diff is None, diff
    assert sum(a.mid_write for a in attempts) >= 1, text


# ------------------------------------------------------------------------------------------------- full disk


def _one_line(err: str) -> str:
    """The error: stderr's last line, one of ppomax's own, no traceback (transformers' progress bars aside)."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip() and "it/s]" not in ln]
    assert lines and all(ln.startswith("ppomax: ") for ln in lines), err
    return lines[-1]


@pytest.mark.parametrize(("kind", "failing"), [("ppo", 1), ("rm", 3)])
def test_a_full_disk_at_a_checkpoint_is_one_line_and_resumes_exactly(
    trainers, tmp_path, monkeypatch, capsys, kind, failing
):
    """The writer patched in-process (a real small filesystem: the next test): the ``failing``-th checkpoint
    writes half a file, then the disk is full."""
    from accelerate import Accelerator

    t = trainers[kind]
    out = tmp_path / "run"
    real, calls = Accelerator.save_state, {"n": 0}

    def save_state(self, output_dir=None, **kw):
        calls["n"] += 1
        if calls["n"] == failing:
            pathlib.Path(output_dir, "model.safetensors").write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, output_dir, **kw)

    monkeypatch.setattr(Accelerator, "save_state", save_state)
    capsys.readouterr()
    assert main(t.args(out)) == 2
    line = _one_line(capsys.readouterr().err)
    assert (
        f"{out / 'checkpoints' / f'step-{failing}'}: cannot write a checkpoint: no space left on device"
        in line
    )
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    if failing == 1:
        assert kept == [] and "intact" not in line
    else:
        assert f"the last checkpoint {out / 'checkpoints' / f'step-{failing - 1}'} is intact" in line
        assert kept == [f"step-{failing - 2}", f"step-{failing - 1}"]
    monkeypatch.setattr(Accelerator, "save_state", real)
    assert main([t.command[0], "--resume", str(out)]) == 0
    assert_same_run(t.ref, out)


def _mount_tmpfs(where: Path, size: int) -> str | None:
    """Mount a tmpfs of ``size`` bytes at ``where``; the reason it cannot be done, or None."""
    where.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        return "no mount command"
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True, text=True
    )
    return (
        None if res.returncode == 0 else f"cannot mount a tmpfs here ({res.stderr.strip() or res.returncode})"
    )


def _umount(where: Path) -> None:
    if subprocess.run(["umount", str(where)], capture_output=True).returncode:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)  # never leave a mount behind


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@pytest.mark.parametrize("at", ["first", "later"])
def test_a_real_full_disk_is_one_line_and_the_run_resumes_elsewhere(trainers, tmp_path, capsys, at):
    """A tmpfs (needs mount rights, else skipped) that holds the run's files and, for ``later``, one
    checkpoint: the failing checkpoint is one line, the one before it intact (copied off the full disk, the
    run resumes to the uninterrupted result)."""
    t = trainers["sft"]
    ckpt = _size(sorted((t.ref / "checkpoints").iterdir())[-1])
    small = (t.ref / "metrics.jsonl").stat().st_size + (t.ref / "config.yaml").stat().st_size + 64 * 1024
    size = small + ckpt // 2 if at == "first" else small + ckpt + ckpt // 2
    disk = tmp_path / "disk"
    reason = _mount_tmpfs(disk, size)
    if reason:
        pytest.skip(reason)
    try:
        out = disk / "run"
        capsys.readouterr()
        assert main(t.args(out)) == 2
        line = _one_line(capsys.readouterr().err)
        assert open_files_under(disk) == []  # the failed write's files are closed: the space is free again
        assert ": cannot write a checkpoint: no space left on device" in line, line
        kept = sorted(p.name for p in (out / "checkpoints").iterdir())
        assert kept == ([] if at == "first" else ["step-1"]), kept
        assert ("is intact" in line) == (at == "later"), line
        moved = tmp_path / "moved"
        shutil.copytree(out, moved)
    finally:
        _umount(disk)
    assert main([t.command[0], "--resume", str(moved)]) == 0
    assert_same_run(t.ref, moved)


# ------------------------------------------------------------------------------------------------- read-only


def _read_only(out: Path, how: str) -> str | None:
    """Make the run directory read-only: ``chmod`` (no effect as root) or a read-only remount of the tmpfs it
    lives on. The reason it did not take, or None."""
    if how == "chmod":
        for p in (out, out / "checkpoints"):
            p.chmod(0o555)
        probe = out / "checkpoints" / ".probe"
        try:
            probe.mkdir()
        except OSError:
            return None
        probe.rmdir()
        for p in (out, out / "checkpoints"):
            p.chmod(0o755)
        return "permissions do not stop this user's writes (root): chmod cannot make a directory read-only"
    res = subprocess.run(["mount", "-o", "remount,ro", str(out.parent)], capture_output=True, text=True)
    # the tmpfs is the test's own: only a file the run holds open for writing makes it busy (the run's lock
    # file, opened read-write, did)
    assert "busy" not in res.stderr, f"the run holds a file open for writing: {res.stderr.strip()}"
    return None if res.returncode == 0 else f"cannot remount read-only ({res.stderr.strip()})"


@pytest.mark.parametrize("how", ["chmod", "remount"])
def test_an_output_directory_turning_read_only_is_one_line_and_the_checkpoint_stays(trainers, tmp_path, how):
    """After the first checkpoint, the run directory becomes read-only (the run is a child process, made
    read-only from outside): the next checkpoint is one line and step-1 stays, and resumes exactly."""
    t = trainers["sft"]
    disk = tmp_path / "disk"
    if how == "remount":
        reason = _mount_tmpfs(disk, 64 << 20)
        if reason:
            pytest.skip(reason)
    out = disk / "run"
    try:
        child = spawn(t.args(out), tmp_path / "ro.log")
        made: dict[str, str | None] = {}
        while True:
            pid, status = os.waitpid(child.pid, os.WNOHANG)
            if pid:
                rc = os.waitstatus_to_exitcode(status)
                break
            if "r" not in made and (out / "checkpoints" / "step-1").is_dir():
                os.kill(child.pid, 19)  # SIGSTOP while the directory changes
                try:
                    made["r"] = _read_only(out, how)
                finally:
                    os.kill(child.pid, 18)  # SIGCONT
            time.sleep(0.001)
        if made.get("r"):
            pytest.skip(made["r"])
        assert "r" in made, "the run finished before its first checkpoint was seen"
        err = (tmp_path / "ro.log").read_text()
        line = _one_line(err)
        assert rc == 2, err
        assert ": cannot write a checkpoint: " in line or ": cannot write" in line, line
        assert "Read-only file system" in line or "Permission denied" in line or "read-only" in line, line
        steps = sorted(p.name for p in (out / "checkpoints").iterdir())
        assert "step-1" in steps and not any(".tmp-" in s for s in steps), steps
        moved = tmp_path / "moved"
        shutil.copytree(out, moved)
    finally:
        if how == "chmod":
            for p in (out, out / "checkpoints"):
                if p.exists():
                    p.chmod(0o755)
        else:
            _umount(disk)
    assert main([t.command[0], "--resume", str(moved)]) == 0
    assert_same_run(t.ref, moved)
