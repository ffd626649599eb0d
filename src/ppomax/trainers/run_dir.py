"""The run directory (``logging.out_dir``): what a run writes there, and whether a run may start, continue or
replace one there. :mod:`ppomax.trainers.run` runs in it.

Layout of a run directory (``logging.out_dir``)::

    config.yaml            the resolved config (written by the main process, atomically)
    metrics.jsonl, tb/     one record per logged step (:class:`ppomax.monitor.MetricsLogger`; tb/: TensorBoard,
                           one of the experiment trackers of logging.report_to, :mod:`.trackers`)
    checkpoints/step-N/    accelerate ``save_state`` (model*.safetensors, optimizer*.bin, random_states_R.pkl)
                           + ppomax_state.json (step, schedules, the trainer's own state, the data files'
                           fingerprints); atomic
    .ppomax.lock           the lock of the run writing here (its PID)
    final/ (best/)         the trained model(s): ``save_pretrained`` + tokenizer, gathered under ZeRO-3/FSDP
                           (LoRA: the adapters, and the merged model in merged/ on request; models.lora)
    samples/               PPO evaluation samples

The rules, the same for all three trainers (:func:`ppomax.trainers.run.open_run`,
:meth:`ppomax.trainers.run.RunContext.restore`):

* one run writes into a directory at a time: its main process locks it (:mod:`ppomax.trainers.run_lock`), and
  another run into it is refused naming the PID of the one writing;
* nothing is written into the directory before the trainer has loaded its config, data and models: it is first
  written when :meth:`RunContext.restore` starts the run, so a run that cannot start leaves it as it was;
* a new run into a directory that holds a run (a complete checkpoint or ``final/``) is refused unless
  ``overwrite`` (``--overwrite``), which deletes that run's files (only the names above);
* ``resume`` (``--resume DIR``) continues the run in ``logging.out_dir`` from its newest complete checkpoint, and
  refuses a config that differs from the run's ``config.yaml`` in anything but :data:`RESUMABLE_KEYS` (the run
  length; the directory itself, which may have been moved; the progress bar; the data preparation's processes;
  the experiment trackers), naming the differing keys, and a data source whose fingerprint (size, SHA-256) differs from the checkpoint's
  unless ``allow_data_change``;
* a directory whose run died before its first complete checkpoint holds no run: a new run or a resume starts it
  afresh (its old metrics are removed), no ``rm -rf`` needed; temporary ``*.tmp-PID`` directories that a killed
  save left behind are removed on every start;
* an output directory that cannot be written is reported before any model is loaded; a write that fails
  (disk full, read-only) is one line naming the path and the cause, and the previous checkpoint stays intact;
* SIGINT/SIGTERM: the step finishes, a checkpoint is saved, the run says where and how to resume and raises
  :class:`ppomax.errors.RunStopped` (the CLI exits with :data:`ppomax.errors.STOPPED_EXIT_CODE`); a second signal
  interrupts at once (exit 130, no checkpoint);
* the last step is always checkpointed, so a run resumed after it (killed in its final evaluation or save, or
  finished) does only the run's end again: the metrics are cut back to the records logged when that checkpoint
  was saved, and the end logs its own again.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ppomax.checkpoint import step_dirs
from ppomax.config import CommandConfig, RunKind, load_config
from ppomax.console import console
from ppomax.errors import ConfigError, UserError

from .run_lock import RunLock

CONFIG_FILE = "config.yaml"
# What a run writes into its directory: what --overwrite (or restarting a run that died early) deletes.
RUN_FILES = ("config.yaml", "metrics.jsonl", "tb", "checkpoints", "final", "best", "samples")
RUN_GLOBS = ("rm_eval_*.json", "rm_margins_*.png")
# Config keys a resume may change: the run length, where the run lives (a moved run), the progress bar, the
# data preparation's processes, the experiment trackers.
RESUMABLE_KEYS = (
    "epochs",
    "ppo.iterations",
    "logging.out_dir",
    "logging.progress",
    "data.num_proc",
    "logging.report_to",
    "logging.project",
    "logging.run_name",
)
COMMANDS = {"sft": "train-sft", "rm": "train-rm", "ppo": "train-ppo"}


log = console()


_WRITE_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}


def write_error_cause(exc: OSError) -> str:
    """What a failed write says about its cause, in a few words."""
    if exc.errno in _WRITE_ERRNOS:
        return _WRITE_ERRNOS[exc.errno]
    return exc.strerror or str(exc)


@dataclass
class RunPlan:
    """What opening a run found in its directory: the checkpoint it resumes from (None: a fresh run) and its
    step; whether the files of an earlier run go when it starts (``--overwrite``, or a run that died before its
    first checkpoint); whether the directory existed (else it is made and locked when the run starts); the
    directory's lock (:mod:`ppomax.trainers.run_lock`) once taken."""

    checkpoint: Path | None = None
    step: int = 0
    clear: bool = False
    existed: bool = True
    lock: RunLock | None = None


def open_dir(out: Path, cfg: CommandConfig, kind: RunKind, resume: bool, overwrite: bool) -> RunPlan:
    """Check the run directory (main process): writable, locked, its run continued, replaced or refused. An
    existing directory is locked (and the temporaries of killed saves removed); a missing one is left to
    :meth:`RunContext.restore` to make."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: cannot write the run directory (logging.out_dir): not a directory")
    if not out.exists():
        _probe_writable(out, next(p for p in out.parents if p.exists()))
        return replace(inspect_dir(out, cfg, kind, resume, overwrite), existed=False)
    _probe_writable(out, out)
    lock = RunLock.take(out)
    try:
        remove_stale_temporaries(out)
        return replace(inspect_dir(out, cfg, kind, resume, overwrite), lock=lock)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _probe_writable(out: Path, where: Path) -> None:
    """``out`` (the run directory, or its nearest existing parent ``where``) can be written: one line if not."""
    try:
        probe = where / f".ppomax-write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise UserError(
            f"{out}: cannot write the run directory (logging.out_dir): {write_error_cause(exc)}"
        ) from None


def inspect_dir(out: Path, cfg: CommandConfig, kind: RunKind, resume: bool, overwrite: bool) -> RunPlan:
    """The directory rules (module docstring), read-only: the plan of a run into ``out``, or the refusal."""
    done = step_dirs(out / "checkpoints")
    holds = [f"checkpoints/{done[-1][1].name}"] if done else []
    holds += ["final/"] if (out / "final").is_dir() else []
    if overwrite:
        return RunPlan(clear=True)
    if not resume:
        if holds:
            raise UserError(
                f"{out} already holds a run ({', '.join(holds)}): continue it with `ppomax {COMMANDS[kind]} "
                f"--resume {out}`, replace it with --overwrite, or set logging.out_dir to a new directory"
            )
        return RunPlan(clear=True)  # what a run that died before its first checkpoint left goes
    if not done:  # nothing to carry over, so nothing to compare either
        log.info("resume: no complete checkpoint in %s yet; starting the run from the beginning", out)
        return RunPlan(clear=True)
    check_resumable(cfg, kind, out / CONFIG_FILE)
    step, ckpt = done[-1]
    return RunPlan(ckpt, step)


def remove_stale_temporaries(out: Path) -> None:
    """Delete the ``*.tmp-PID`` directories of saves a kill interrupted; an ``X.old-PID`` whose ``X`` is missing
    (a kill between the two renames of a replacement) is put back as ``X``."""
    for parent in (out, out / "checkpoints"):
        if not parent.is_dir():
            continue
        for child in list(parent.iterdir()):
            base, sep, pid = child.name.rpartition(".old-")
            if sep and pid.isdigit() and child.is_dir():
                target = parent / base
                if target.exists():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.rename(target)
        for child in list(parent.iterdir()):
            _, sep, pid = child.name.rpartition(".tmp-")
            if sep and pid.isdigit() and child.is_dir():
                shutil.rmtree(child, ignore_errors=True)


def remove_run_files(out: Path) -> None:
    for name in RUN_FILES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    for pattern in RUN_GLOBS:
        for path in out.glob(pattern):
            path.unlink()


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_differences(saved: CommandConfig, current: CommandConfig) -> list[str]:
    """The dotted keys whose values differ between two configs of one kind, except :data:`RESUMABLE_KEYS`."""
    a = _flatten(saved.model_dump(mode="json"))
    b = _flatten(current.model_dump(mode="json"))
    return sorted(k for k in set(a) | set(b) if k not in RESUMABLE_KEYS and a.get(k) != b.get(k))


def check_resumable(cfg: CommandConfig, kind: RunKind, saved_path: Path) -> None:
    """Refuse to resume with a config that differs from the run's own (``config.yaml``) in anything that
    changes what the run computes."""
    if not saved_path.is_file():
        raise UserError(f"{saved_path.parent}: no {CONFIG_FILE}, so not a ppomax run directory to resume")
    saved = load_config(kind, path=saved_path)
    differ = config_differences(saved, cfg)
    if differ:
        shown = ", ".join(f"{k} ({_short(_get(saved, k))} -> {_short(_get(cfg, k))})" for k in differ[:8])
        more = f" and {len(differ) - 8} more" if len(differ) > 8 else ""
        raise ConfigError(
            f"--resume {saved_path.parent}: the config differs from the run's {CONFIG_FILE} in {shown}{more}; "
            f"a resumed run may change only {', '.join(RESUMABLE_KEYS)} (start a new run for the rest)"
        )


def _get(cfg: CommandConfig, dotted: str) -> Any:
    return _flatten(cfg.model_dump(mode="json")).get(dotted)


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def resume_config(
    kind: RunKind,
    run_dir: str | Path,
    path: str | Path | None = None,
    preset: str | None = None,
    overrides: list[str] | None = None,
) -> CommandConfig:
    """The config of ``--resume DIR``: the run's own ``config.yaml`` (or ``path`` / ``preset`` when given) with
    ``overrides`` on top, and ``logging.out_dir`` set to ``run_dir``, so a moved or copied run writes where it
    is now. Whether it may resume that run is checked by :func:`open_run`.

    A directory without ``config.yaml`` (none at all, or a run killed in its first seconds, before it wrote
    one) holds nothing to continue: with ``path``, ``preset`` or ``overrides`` (the arguments that started the
    run) the run starts there afresh; without them the error gives that command."""
    run_dir = Path(run_dir)
    saved = run_dir / CONFIG_FILE
    if not saved.is_file() and run_dir.name.startswith("step-") and run_dir.parent.name == "checkpoints":
        raise UserError(
            f"--resume {run_dir}: no {CONFIG_FILE} there, so not a ppomax run directory; pass the run "
            f"directory {run_dir.parent.parent} (it resumes from its newest checkpoint)"
        )
    if not saved.is_file():
        if path is None and preset is None and not overrides:
            what = f"no {CONFIG_FILE} there" if run_dir.is_dir() else "no such directory"
            raise UserError(
                f"--resume {run_dir}: {what}, so no run to continue (a run killed in its first seconds has not "
                "written one); start it afresh there with the arguments that started it: "
                f"`ppomax {COMMANDS[kind]} --resume {run_dir} --config FILE` (or its --preset / --set arguments)"
            )
    elif path is None:  # a --preset then only fills what the saved config leaves out (nothing)
        path = saved
    cfg = load_config(kind, path=path, preset=preset, overrides=overrides)
    cfg.logging = cfg.logging.model_copy(update={"out_dir": str(run_dir)})
    return cfg
