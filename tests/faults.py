"""The fault-injection harness of tests/test_faults.py: a trainer run as a child process that is SIGKILLed at a
chosen moment, then resumed until it finishes, and the finished run compared with an uninterrupted one.

ppomax has no fault hook, so the moments are found from outside, from what the run writes (polled every
millisecond or so) or from the wall clock:

* ``random``: a uniform delay within the length of an uninterrupted run (any phase: start, model loading,
  a step, a checkpoint, the final save);
* ``early``: a uniform delay within the time an uninterrupted run takes to write its ``config.yaml`` (start-up,
  model and data loading: the run directory is not written yet);
* ``first_checkpoint``: the first checkpoint's temporary directory (``checkpoints/step-1.tmp-PID``) appears;
* ``checkpoint``: the temporary directory of a later checkpoint appears, or holds 1-3 files (mid-write);
* ``generation`` (PPO): just after a checkpoint is complete, when the next iteration starts generating;
* ``update``: PPO: just after the iteration's last reward call, when advantages and minibatch updates run; SFT
  and RM: a few milliseconds after a step is logged, inside a later step.

A child is a fork of the test process (no interpreter start, no import: a kill costs only the run's own time);
it runs :func:`ppomax.cli.main` with its output in a log file and exits with its return code.

Between attempts a chain also checks what a user would try next: after a kill before ``config.yaml`` existed,
``--resume DIR`` alone must be one line giving the command that starts the run afresh (the chain then runs that
command); once a checkpoint exists, a resume on a changed data file must be refused in one line naming it, the
run directory byte for byte as it was (the data is then put back).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from helpers import run_differences

MOMENTS = ("random", "early", "first_checkpoint", "checkpoint", "generation", "update")
HANG_S = 120.0  # a child that runs this long is killed and reported, never waited for forever


@dataclass
class Child:
    pid: int
    log: Path
    started: float


def spawn(args: list[str], log: Path) -> Child:
    """Fork a child that runs ``ppomax args`` with stdout and stderr appended to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        rc = 97
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            sys.stdout = sys.stderr = open(fd, "w", buffering=1, closefd=False)  # noqa: SIM115
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            _own_tqdm_locks()
            from ppomax.cli import main

            rc = main(args)
        except BaseException:
            traceback.print_exc()
            rc = 98
        finally:
            with_flush = getattr(sys.stdout, "flush", None)
            if with_flush is not None:
                with_flush()
            os._exit(rc)
    return Child(pid, log, started)


def _own_tqdm_locks() -> None:
    """A forked child's own progress-bar locks. tqdm's write lock holds a multiprocessing semaphore that every
    fork shares: a child killed while it held it (drawing a weight-loading bar, or creating any bar) stalled the
    parent and every later child for good. Each bar class that made its lock before the fork has its own."""
    from tqdm.std import tqdm

    todo = [tqdm]
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        if cls is tqdm or "_lock" in vars(cls):
            cls._lock = threading.RLock()


def _poll(child: Child) -> int | None:
    pid, status = os.waitpid(child.pid, os.WNOHANG)
    return None if pid == 0 else os.waitstatus_to_exitcode(status)


def wait(child: Child) -> int:
    """The child's exit code, once it exits (a hang past :data:`HANG_S` is killed and reported)."""
    while True:
        rc = _poll(child)
        if rc is not None:
            return rc
        if time.monotonic() - child.started > HANG_S:
            _kill(child)
            raise AssertionError(f"no exit after {HANG_S:.0f}s (see {child.log})")
        time.sleep(0.005)


def _kill(child: Child) -> int:
    os.kill(child.pid, signal.SIGKILL)
    _, status = os.waitpid(child.pid, 0)
    return os.waitstatus_to_exitcode(status)


# --------------------------------------------------------------------------------------------- kill triggers


def _complete_steps(out: Path) -> list[int]:
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    steps = []
    for p in root.iterdir():
        name = p.name
        if name.startswith("step-") and name[5:].isdigit():
            steps.append(int(name[5:]))
    return sorted(steps)


def _temporaries(out: Path) -> list[Path]:
    root = out / "checkpoints"
    try:
        return [p for p in root.iterdir() if ".tmp-" in p.name]
    except OSError:
        return []


def _lines(path: Path) -> int:
    try:
        with path.open("rb") as fh:
            return sum(1 for _ in fh)
    except OSError:
        return 0


def _counter(path: Path) -> int:
    try:
        return int(path.read_text() or 0)
    except (OSError, ValueError):
        return 0


@dataclass
class Trigger:
    """When to kill a child: ``due()`` is polled; ``what`` says where the kill was aimed."""

    what: str
    due: Callable[[], bool]


def make_trigger(
    moment: str,
    out: Path,
    rng: random.Random,
    *,
    span: float,
    kind: str,
    reward_calls: Path | None,
    early_span: float = 0.0,
) -> Trigger:
    """A trigger for ``moment`` (see the module docstring) in the run writing ``out``; ``span``: the length of
    an uninterrupted run (seconds), ``early_span``: its time to ``config.yaml``, ``reward_calls``: the PPO reward
    function's call-count file."""
    t0 = time.monotonic()
    if moment in ("random", "early"):
        at = rng.uniform(0.0, span if moment == "random" else early_span)
        return Trigger(f"{moment} at {at:.2f}s", lambda: time.monotonic() - t0 >= at)
    if moment == "first_checkpoint":
        return Trigger(
            "first checkpoint write", lambda: any(p.name.startswith("step-1.") for p in _temporaries(out))
        )
    if moment == "checkpoint":
        after = max(_complete_steps(out), default=0) + rng.randint(0, 2)
        files = rng.randint(0, 3)

        def in_checkpoint() -> bool:
            for p in _temporaries(out):
                step = p.name[5:].split(".")[0]
                if step.isdigit() and int(step) > after:
                    try:
                        if len(list(p.iterdir())) >= files:
                            return True
                    except OSError:
                        pass
            return False

        return Trigger(f"checkpoint write after step {after} ({files}+ files in)", in_checkpoint)
    if moment == "generation":
        after = max(_complete_steps(out), default=0) + rng.randint(1, 2)
        delay = rng.uniform(0.0, 0.02)
        seen: dict[str, float] = {}

        def generating() -> bool:
            if "t" not in seen and max(_complete_steps(out), default=0) >= after:
                seen["t"] = time.monotonic()
            return "t" in seen and time.monotonic() - seen["t"] >= delay

        return Trigger(f"generation after checkpoint step-{after}", generating)
    if moment == "update":
        delay = rng.uniform(0.0, 0.02)
        seen = {}
        if kind == "ppo":
            assert reward_calls is not None
            # Two reward calls per iteration (buffer 8, rollout batches of 4), counted from this process's start
            # (run_chain resets the count): call 2k ends the scoring of its k-th iteration.
            target = 2 * rng.randint(1, 2)

            def updating() -> bool:
                if "t" not in seen and _counter(reward_calls) >= target:
                    seen["t"] = time.monotonic()
                return "t" in seen and time.monotonic() - seen["t"] >= delay

            return Trigger(f"update after reward call {target}", updating)
        metrics = out / "metrics.jsonl"
        base = _lines(metrics) + rng.randint(1, 3)

        def stepping() -> bool:
            if "t" not in seen and _lines(metrics) >= base:
                seen["t"] = time.monotonic()
            return "t" in seen and time.monotonic() - seen["t"] >= delay

        return Trigger(f"training step after metrics line {base}", stepping)
    raise ValueError(moment)


# --------------------------------------------------------------------------------------------- one run


@dataclass
class Attempt:
    moment: str
    aimed: str
    fired: bool
    rc: int | None
    mid_write: bool = False
    """A checkpoint's temporary directory existed when the kill landed."""


def run_once(args: list[str], log: Path, trigger: Trigger | None = None, out: Path | None = None) -> Attempt:
    """One child until it exits, or until ``trigger`` fires (then SIGKILL; ``out``: the run directory, to tell
    whether the kill landed in a checkpoint write)."""
    child = spawn(args, log)
    while True:
        rc = _poll(child)
        if rc is not None:
            return Attempt("", trigger.what if trigger else "", False, rc)
        if trigger is not None and trigger.due():
            rc = _kill(child)
            return Attempt("", trigger.what, True, rc, mid_write=out is not None and bool(_temporaries(out)))
        if time.monotonic() - child.started > HANG_S:
            _kill(child)
            raise AssertionError(f"{args}: no exit after {HANG_S:.0f}s (see {log})")
        time.sleep(0.001)


def _descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (from /proc), children before their own children."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def run_launched(
    command: list[str], log: Path, env: dict[str, str], trigger: Trigger | None, out: Path
) -> Attempt:
    """A launcher (``accelerate launch``) and its ranks until it exits, or until ``trigger`` fires: then the
    launcher and every process under it are SIGKILLed at once, as a machine that dies takes them all (torchrun
    starts each rank in a session of its own, so the process group alone would miss them)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as fh:
        proc = subprocess.Popen(command, stdout=fh, stderr=fh, env=env, start_new_session=True)
    started = time.monotonic()
    while True:
        rc = proc.poll()
        if rc is not None:
            return Attempt("", trigger.what if trigger else "", False, rc)
        if trigger is not None and trigger.due():
            for pid in [proc.pid, *_descendants(proc.pid)]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            rc = proc.wait()
            return Attempt("", trigger.what, True, rc, mid_write=bool(_temporaries(out)))
        if time.monotonic() - started > 5 * HANG_S:
            for pid in [proc.pid, *_descendants(proc.pid)]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            raise AssertionError(f"{command}: no exit after {5 * HANG_S:.0f}s (see {log})")
        time.sleep(0.002)


def last_line(log: Path) -> str:
    try:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


# --------------------------------------------------------------------------------------------- a chain


@dataclass
class Chain:
    """One run killed at each of ``moments`` in turn (a moment that never came is not a kill), resumed until it
    finished, then compared with the uninterrupted run."""

    kind: str
    moments: list[str]
    attempts: list[Attempt] = field(default_factory=list)
    exact: bool = False
    reason: str = ""
    checks: list[str] = field(default_factory=list)
    """Refusals checked between attempts: ``no config`` (a resume of a run killed before its config),
    ``changed data`` (a resume on a changed data file)."""


def run_chain(
    chain: Chain,
    command: list[str],
    out: Path,
    ref: Path,
    rng: random.Random,
    *,
    span: float,
    early_span: float = 0.0,
    reward_calls: Path | None = None,
    data: tuple[str, Path] | None = None,
    max_resumes: int = 12,
) -> Chain:
    """Run ``command`` (which writes ``out``) with the kills of ``chain``, resume (``--resume out``) until exit 0,
    compare with ``ref``. After a kill before the run wrote its config, ``--resume out`` alone must say how to
    start it afresh, and the chain goes on with that command (``command --resume out``). ``data``: (config key,
    file) of a data file to change once a checkpoint exists: the resume must refuse it (see the module
    docstring)."""
    logs = out.parent / f"{out.name}-logs"
    pending = list(chain.moments)
    rc: int | None = None
    for i in range(len(pending) + max_resumes):
        started = (out / "config.yaml").is_file()
        problem = None
        if i and not started:
            chain.checks.append("no config")
            problem = refused_without_config(command, out, logs / f"{i}-no-config.log")
        elif data is not None and _complete_steps(out):
            chain.checks.append("changed data")
            problem = refused_on_changed_data(command[0], out, data, logs / f"{i}-data.log")
            data = None
        if problem:
            chain.reason = problem
            return chain
        args = (
            [command[0], "--resume", str(out)]
            if started
            else [*command, *(("--resume", str(out)) if i else ())]
        )
        moment = pending.pop(0) if pending else None
        trigger = (
            make_trigger(
                moment, out, rng, span=span, kind=chain.kind, reward_calls=reward_calls, early_span=early_span
            )
            if moment
            else None
        )
        if reward_calls is not None:
            reward_calls.write_text("0")
        attempt = run_once(args, logs / f"{i}.log", trigger, out)
        attempt.moment = moment or ""
        if moment:
            chain.attempts.append(attempt)
        rc = attempt.rc
        if not attempt.fired and rc != 0:
            chain.reason = f"exit {rc} on {'resume' if i else 'start'}: {last_line(logs / f'{i}.log')}"
            return chain
        if not attempt.fired and rc == 0 and not pending:
            break
    else:
        chain.reason = "did not finish"
        return chain
    diff = run_differences(ref, out)
    chain.exact = diff is None
    chain.reason = diff or ""
    return chain


def snapshot(run: Path) -> dict[str, bytes]:
    """A run directory's files and their bytes: the lock file (a PID) and the temporaries of a killed save (which
    every start removes) aside."""
    if not run.is_dir():
        return {}
    return {
        str(p.relative_to(run)): p.read_bytes()
        for p in sorted(run.rglob("*"))
        if p.is_file() and p.name != ".ppomax.lock" and ".tmp-" not in str(p.relative_to(run))
    }


def refused_without_config(command: list[str], out: Path, log: Path) -> str | None:
    """``--resume out`` of a run killed before it wrote its config: exit 2, one line with the command that starts
    it afresh, nothing written. The problem, or None."""
    before = snapshot(out)
    attempt = run_once([command[0], "--resume", str(out)], log)
    line = last_line(log)
    if attempt.rc != 2 or f"ppomax {command[0]} --resume {out} --config FILE" not in line:
        return f"--resume of a run killed before its config: exit {attempt.rc}: {line}"
    if snapshot(out) != before:
        return "--resume of a run killed before its config changed its directory"
    return None


def refused_on_changed_data(command: str, out: Path, data: tuple[str, Path], log: Path) -> str | None:
    """``--resume out`` with the data file's records in reverse order (same size, other bytes): exit 2, one line
    naming the file, the run directory as it was; the file is put back. The problem, or None."""
    key, path = data
    original = path.read_bytes()
    lines = original.splitlines(keepends=True)
    before = snapshot(out)
    try:
        path.write_bytes(b"".join(reversed(lines)))
        attempt = run_once([command, "--resume", str(out)], log)
    finally:
        path.write_bytes(original)
    line = last_line(log)
    if attempt.rc != 2 or f"{key} ({path}: same size, other content)" not in line:
        return f"--resume on changed data: exit {attempt.rc}: {line}"
    if snapshot(out) != before:
        return "--resume on changed data changed the run directory"
    return None


def report(chains: list[Chain], faults: list[str]) -> str:
    """The suite's report: kills tried (fired), runs resumed exactly, the reason for each that was not."""
    kills = [a for c in chains for a in c.attempts if a.fired]
    missed = [a for c in chains for a in c.attempts if not a.fired]
    lines = ["fault injection report"]
    for kind in ("sft", "rm", "ppo"):
        mine = [c for c in chains if c.kind == kind]
        if not mine:
            continue
        k = sum(a.fired for c in mine for a in c.attempts)
        ok = sum(c.exact for c in mine)
        by = {}
        for c in mine:
            for a in c.attempts:
                if a.fired:
                    by[a.moment] = by.get(a.moment, 0) + 1
        lines.append(
            f"  {kind}: {k} kills ({', '.join(f'{m} {n}' for m, n in sorted(by.items()))}) in {len(mine)} runs; "
            f"{ok}/{len(mine)} runs resumed exactly"
        )
    exact_kills = sum(sum(a.fired for a in c.attempts) for c in chains if c.exact)
    checks = Counter(x for c in chains for x in c.checks)
    lines.append(
        f"  total: {len(kills)} kills tried ({sum(a.mid_write for a in kills)} during a checkpoint write), "
        f"{exact_kills} resumed exactly (runs {sum(c.exact for c in chains)}/{len(chains)}); "
        f"{len(missed)} aimed moments never came (the run had ended); "
        f"refusals checked between attempts: {checks.get('no config', 0)} resumes of a run killed before its "
        f"config, {checks.get('changed data', 0)} resumes on a changed data file"
    )
    for c in chains:
        if not c.exact:
            lines.append(f"  NOT EXACT {c.kind} {c.moments}: {c.reason}")
    lines += [f"  fault: {f}" for f in faults]
    return "\n".join(lines)
