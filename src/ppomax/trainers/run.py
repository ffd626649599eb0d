"""The run engine every trainer (SFT, RM, PPO) runs on: its directory, config, metrics, checkpoints, signals and
final save. The trainers own only their optimisation step.

The directory's layout and rules: :mod:`ppomax.trainers.run_dir`.

No resume path unpickles arbitrary objects. accelerate's ``load_state`` reads its own files with
``torch.load(weights_only=True)`` but the objects given to ``register_for_checkpointing`` with
``weights_only=False`` (accelerate.checkpointing.load_custom_state), so a crafted ``custom_checkpoint_*.pkl`` would
run code: ppomax registers nothing there and keeps its own state (learning-rate schedules, running moments, data
positions, collapse monitor, counters: the objects given to :meth:`RunContext.track`) as JSON in
``ppomax_state.json``; a checkpoint that holds custom pickles is refused. RNG states (python, numpy, torch, CUDA,
one file per process) are accelerate's.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import signal
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors import SafetensorError

from ppomax.checkpoint import prune_checkpoints
from ppomax.config import CONFIG_CLASSES, CommandConfig, RunKind, to_yaml
from ppomax.console import console
from ppomax.data.sources import fingerprint
from ppomax.errors import ConfigError, RunStopped, UserError
from ppomax.models import save_trained, weights_error
from ppomax.monitor import MetricsLogger

from . import trackers
from .inputs import Callbacks
from .launch import Engine, build_accelerator
from .run_dir import (
    COMMANDS,
    CONFIG_FILE,
    RunPlan,
    inspect_dir,
    open_dir,
    remove_run_files,
    remove_stale_temporaries,
    write_error_cause,
)
from .run_lock import RunLock

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

STATE_FILE = "ppomax_state.json"
# The keys of ppomax_state.json that hold the fingerprints of the run's data files, and the number of records
# metrics.jsonl held at the checkpoint (what a resume keeps of it).
DATA_KEY = "data_files"
METRICS_KEY = "metrics_records"
LAYOUT_KEY = "model_layout"
log = console()


class Stateful(Protocol):
    """What :meth:`RunContext.track` saves: ``state_dict()`` of JSON values, and its inverse."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class DictState:
    """A plain dict of JSON values (e.g. the RM trainer's best accuracy) as a :class:`Stateful`, updated in place."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data

    def state_dict(self) -> dict[str, Any]:
        return dict(self.data)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.data.clear()
        self.data.update(state)


# --------------------------------------------------------------------------- the run


@dataclass
class RunContext:
    """One run: its accelerator, directory, metrics and checkpoints (see the module docstring).

    Opened by :func:`open_run`, which writes nothing into the directory but its lock; :meth:`restore` starts
    it (the first write), once the trainer has loaded and checked everything. ``resume_from`` is the
    checkpoint :meth:`restore` loads (None: a fresh run) and ``start_step`` its step; ``tracked`` the trainer's
    own state saved with every checkpoint; ``data`` the data files it reads, whose fingerprints every
    checkpoint keeps."""

    accelerator: Accelerator
    out_dir: Path
    cfg: CommandConfig
    resume_from: Path | None = None
    last_checkpoint: Path | None = None
    start_step: int = 0
    tracked: dict[str, Stateful] = field(default_factory=dict)
    data: RunData = field(default_factory=lambda: RunData({}))
    plan: RunPlan | None = None
    """What the main process found in the directory, and its lock (None on the other ranks)."""
    layout: dict[str, Any] = field(default_factory=dict)
    """How the trained models are laid out where a checkpoint's weights depend on it (e.g. whether value heads have
    a bias), recorded with every checkpoint: :meth:`resumed_layout`."""
    callbacks: Callbacks = field(default_factory=Callbacks)
    """The callbacks given from Python (:class:`~ppomax.trainers.inputs.Callbacks`; main process)."""
    _metrics: MetricsLogger | None = None

    @property
    def metrics(self) -> MetricsLogger:
        """The run's metrics logger (from :meth:`restore` on)."""
        if self._metrics is None:
            raise RuntimeError("the run has not started: call restore() first")
        return self._metrics

    @property
    def kind(self) -> RunKind:
        """The command whose config the run holds: "sft", "rm" or "ppo"."""
        return next(kind for kind, cls in CONFIG_CLASSES.items() if isinstance(self.cfg, cls))

    @property
    def engine(self) -> Engine:
        """The run's engine (:class:`~ppomax.trainers.launch.Engine`), as its accelerator runs it."""
        return Engine.of(self.accelerator)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    def print(self, *args: Any) -> None:
        """One message on the console (main process only), through the ppomax logger."""
        if self.is_main:
            log.info(" ".join(str(a) for a in args))

    def warn(self, message: str) -> None:
        if self.is_main:
            log.warning("warning: %s", message)

    # ------------------------------------------------------------------ checkpoints

    def resumed_layout(self) -> dict[str, Any] | None:
        """The :attr:`layout` recorded in the checkpoint this run resumes from ({} for one written before layouts
        were recorded), None for a fresh run: the trainer builds its models to match before loading the weights."""
        if self.resume_from is None:
            return None
        try:
            state = json.loads((self.resume_from / STATE_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}  # restore() says what is wrong with the checkpoint
        layout = state.get(LAYOUT_KEY) if isinstance(state, dict) else None
        return dict(layout) if isinstance(layout, dict) else {}

    def track(self, **objects: Stateful | None) -> None:
        """Save these objects' ``state_dict()`` (JSON) with every checkpoint and restore them on resume."""
        self.tracked.update({k: v for k, v in objects.items() if v is not None})

    def save_checkpoint(self, step: int) -> Path:
        """``checkpoints/step-N``: accelerate ``save_state`` (models, optimisers, RNG; sharded engines write
        their own shards) + ``ppomax_state.json``, atomically; then prune to ``logging.keep_checkpoints``."""
        root = self.out_dir / "checkpoints"
        final = root / f"step-{step}"
        # serialised first: a state that is not JSON is a bug, found before anything is written
        state = {k: v.state_dict() for k, v in self.tracked.items()}
        ppomax = {
            "step": step,
            DATA_KEY: self.data.fingerprints,
            METRICS_KEY: self.metrics.records,
            LAYOUT_KEY: self.layout,
        }
        text = json.dumps({**ppomax, **state}, indent=1)
        with self.atomic_dir(final, what="a checkpoint") as tmp:
            self.accelerator.save_state(str(tmp))
            if self.is_main:
                (tmp / STATE_FILE).write_text(text + "\n", encoding="utf-8")
        if self.is_main:
            prune_checkpoints(root, self.cfg.logging.keep_checkpoints)
        self.accelerator.wait_for_everyone()
        self.last_checkpoint = final
        self.callbacks.save(final)
        return final

    def restore(self) -> int:
        """Start the run, from ``resume_from`` when it resumes (models, optimisers, RNG, tracked state); returns
        its step (0 for a fresh run). Call it after ``accelerator.prepare`` and :meth:`track`: the trainer has
        then loaded and checked its config, data and models, so a run that cannot start has changed nothing in
        its directory. Here the data files are fingerprinted (and compared with the checkpoint's), the checkpoint
        loaded, and only then the directory written: the files of a run it replaces removed, ``config.yaml``
        written, the metrics opened (truncated to the checkpoint's step)."""
        ckpt = self.resume_from
        state = _checkpoint_state(ckpt, self.tracked) if ckpt is not None else None
        acc = self.accelerator
        self.data.fingerprints = on_main(acc, lambda: self._fingerprint_data(state)) or {}
        if ckpt is not None and state is not None:
            try:
                _check_random_states(ckpt, self.rank)
                with self.engine.reading_checkpoint():
                    acc.load_state(str(ckpt))
            except (pickle.UnpicklingError, SafetensorError, EOFError) as exc:  # hostile or broken files
                raise weights_error(ckpt, exc) from None
            except RuntimeError as exc:
                if "PytorchStreamReader" not in str(
                    exc
                ):  # torch.load of a truncated file; anything else is a bug
                    raise
                raise weights_error(ckpt, exc) from None
            for name, obj in self.tracked.items():
                obj.load_state_dict(state[name])
            self.last_checkpoint = ckpt
            self.start_step = int(state["step"])
        on_main(acc, self._start_dir)
        resume_step = self.start_step if ckpt is not None else None
        trackers.start(acc, self.cfg, resume_step)
        self._metrics = MetricsLogger(
            self.out_dir,
            enabled=self.is_main,
            resume_step=resume_step,
            resume_records=(state or {}).get(METRICS_KEY),
            sink=lambda values, step: acc.log(values, step=step),
            table_sink=lambda name, rows, step: trackers.log_table(acc, name, rows, step),
        )
        if ckpt is not None:
            self.print(f"resumed from {ckpt} (step {self.start_step})")
        return self.start_step

    def _fingerprint_data(self, state: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
        """The fingerprints of the run's data files (main process); on resume, a data file that changed since
        the checkpoint is refused, or with ``data.allow_change`` named in a warning."""
        now = {key: fingerprint(source) for key, source in self.data.files.items()}
        before = (state or {}).get(DATA_KEY) or {}
        changed = [key for key in now if key in before and _content(before[key]) != _content(now[key])]
        if changed and self.resume_from is not None:
            files = ", ".join(f"{k} ({now[k]['path']}: {_change(before[k], now[k])})" for k in changed)
            if not self.data.allow_change:
                raise UserError(
                    f"--resume {self.out_dir}: the data changed since checkpoint {self.resume_from.name} was "
                    f"written: {files}; resume with the data the run was trained on, start a new run, or add "
                    "--allow-data-change to continue this one on the new data"
                )
            self.warn(
                f"the data changed since checkpoint {self.resume_from.name}: {files}; continuing on it "
                "(--allow-data-change)"
            )
        return now

    def _start_dir(self) -> None:
        """The first writes into the run directory (main process), under its lock."""
        out, plan = self.out_dir, self.plan
        assert plan is not None
        if not plan.existed:
            # the directory did not exist when the run was opened: another run may have made it since
            try:
                out.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise UserError(
                    f"{out}: cannot write the run directory (logging.out_dir): {write_error_cause(exc)}"
                ) from None
            plan.lock = RunLock.take(out)
            remove_stale_temporaries(out)
            inspect_dir(out, self.cfg, self.kind, resume=False, overwrite=False)
        if plan.clear:
            remove_run_files(out)
        _write_text(out / CONFIG_FILE, to_yaml(self.cfg))

    # ------------------------------------------------------------------ saving

    @contextmanager
    def atomic_dir(self, final: Path, what: str = "") -> Iterator[Path]:
        """A temporary ``<final>.tmp-PID`` every rank may write into; the main process renames it into place
        once all are done, so a good name never holds a half-written directory. A failed write (disk full,
        read-only) removes the temporary and raises one :class:`UserError` line naming the path and cause."""
        acc = self.accelerator
        tmp = final.with_name(f"{final.name}.tmp-{_main_pid(acc)}")
        try:
            if self.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            acc.wait_for_everyone()
            try:
                yield tmp
            except BaseException as exc:
                cause = write_failure(exc, tmp)
                if cause is not None:
                    _release_frames(exc)
                shutil.rmtree(tmp, ignore_errors=True)
                if cause is None:
                    raise
                kept = (
                    f"; the last checkpoint {self.last_checkpoint} is intact" if self.last_checkpoint else ""
                )
                raise UserError(f"{final}: cannot write {what or 'it'}: {cause}{kept}") from None
            acc.wait_for_everyone()
            if self.is_main:
                _replace_dir(tmp, final)
        except OSError as exc:  # mkdir or rename
            shutil.rmtree(tmp, ignore_errors=True)
            raise UserError(f"{final}: cannot write {what or 'it'}: {write_error_cause(exc)}") from None
        acc.wait_for_everyone()

    def save_model(
        self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase | None, final: Path
    ) -> Path:
        """``save_pretrained`` of the unwrapped (prepared) model + tokenizer into ``final``, atomically."""
        return self.save_models(final, {"": (model, tokenizer)})

    def save_models(
        self, final: Path, models: dict[str, tuple[torch.nn.Module, PreTrainedTokenizerBase | None]]
    ) -> Path:
        """``{subdir: (prepared model, tokenizer)}`` saved with ``save_pretrained`` under ``final/subdir`` (``""``:
        ``final`` itself), all in one atomic directory. Under ZeRO-3/FSDP the full weights are gathered first
        (``accelerator.get_state_dict``, a collective: every rank calls this). Weights are written as the run holds
        them, never cast: a model trained in full under mixed precision is its float32 master weights (config.json
        says float32), so the saved model computes exactly what the trained one did."""
        acc = self.accelerator
        states = {name: self.engine.full_state_dict(acc, m) for name, (m, _) in models.items()}
        with self.atomic_dir(final, what="the model") as tmp:
            if self.is_main:
                for name, (model, tokenizer) in models.items():
                    unwrapped, lora = acc.unwrap_model(model), self.cfg.model.lora
                    save_trained(unwrapped, tmp / name, states[name], tokenizer, lora)
        self.callbacks.save(final)
        return final

    # ------------------------------------------------------------------ stopping

    def stopped(self, signum: int, step: int) -> RunStopped:
        """The exception that ends a run stopped by ``signum`` after its checkpoint at ``step`` (message printed)."""
        name = signal.Signals(signum).name
        message = (
            f"{name}: stopped at step {step}, checkpoint saved in {self.last_checkpoint}; continue with: "
            f"ppomax {COMMANDS[self.kind]} --resume {self.out_dir}"
        )
        self.print(message)
        return RunStopped(message)

    def close(self) -> None:
        """End the run in the experiment trackers and release the directory's lock."""
        trackers.finish(self.accelerator)
        if self.plan is not None and self.plan.lock is not None:
            self.plan.lock.release()


def _checkpoint_state(ckpt: Path, tracked: dict[str, Stateful]) -> dict[str, Any]:
    """The checkpoint's ``ppomax_state.json``; a checkpoint with pickles ppomax never writes, or without the
    state of every tracked object, is refused."""
    pickles = sorted(p.name for p in ckpt.glob("custom_checkpoint_*.pkl"))
    if pickles or not (ckpt / STATE_FILE).is_file():
        raise UserError(
            f"{ckpt}: not a checkpoint of this ppomax version ("
            + (f"it holds {', '.join(pickles)}, which ppomax never writes or loads" if pickles else "")
            + ("" if pickles else f"no {STATE_FILE}")
            + "); start again with --overwrite, or resume with the ppomax version that wrote it"
        )
    state = json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))
    missing = sorted(set(tracked) - set(state))
    if missing:
        raise UserError(f"{ckpt}: {STATE_FILE} lacks {', '.join(missing)}; it was written by another trainer")
    return state


def _content(fp: dict[str, Any]) -> tuple[Any, Any]:
    return fp.get("size"), fp.get("sha256")


def _change(before: dict[str, Any], now: dict[str, Any]) -> str:
    if before.get("size") != now.get("size"):
        return f"{before.get('size')} -> {now.get('size')} bytes"
    return "same size, other content"


def _check_random_states(ckpt: Path, rank: int) -> None:
    """This rank's RNG states must load: accelerate skips a file it cannot read with one INFO log line and resumes
    anyway, with fresh random streams, i.e. silently not the run it continues."""
    from accelerate.utils import load

    path = ckpt / f"random_states_{rank}.pkl"
    if not path.is_file():
        raise UserError(
            f"{path}: missing, so the run cannot continue exactly; resume from another checkpoint"
        )
    states = load(path)
    if not isinstance(states, dict) or not {"random_state", "torch_manual_seed"} <= set(states):
        raise UserError(f"{path}: not accelerate's random states; resume from another checkpoint")


def _main_pid(acc: Accelerator) -> int:
    """The main process's pid (the name of temporaries every rank writes into)."""
    if acc.num_processes == 1:
        return os.getpid()
    from accelerate.utils import broadcast_object_list

    return int(broadcast_object_list([os.getpid()])[0])


def _replace_dir(tmp: Path, final: Path) -> None:
    old = final.with_name(f"{final.name}.old-{os.getpid()}")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _release_frames(exc: BaseException) -> None:
    """Clear the finished frames of ``exc`` and of the exceptions chained to it: a failed writer's frames hold
    its open file (torch.save's zip writer, safetensors'), which the exception chained to our one-line error
    would keep, with the space of its deleted file, for as long as the process lives."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        traceback.clear_frames(e.__traceback__)
        todo += [e.__cause__, e.__context__]


def write_failure(exc: BaseException, where: Path) -> str | None:
    """Why a write under ``where`` failed, if it failed for lack of space or permission (not a bug).

    torch.save and safetensors report a full disk as RuntimeError/SafetensorError, not OSError; the free space
    at the moment of the failure (before the temporary is removed) tells it apart."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return write_error_cause(exc)
    if not isinstance(exc, Exception) or isinstance(exc, UserError):
        return None
    text = str(exc)
    if "No space left" in text or "StorageFull" in text:
        return "no space left on device"
    free: int | None = None
    with contextlib.suppress(OSError):
        free = shutil.disk_usage(where if where.exists() else where.parent).free
    if free is not None and free < 1 << 20:
        return "no space left on device"
    if "Read-only file system" in text or "ReadOnlyFilesystem" in text:
        return "read-only file system"
    if "iostream error" in text or "inline_container.cc" in text:
        # torch.save's zip writer lost its file: what it reports of a disk that filled up part-way (the rest of
        # a large tensor did not fit, so more than a MiB may still be free)
        room = f"{free / 2**20:,.0f} MiB" if free is not None else "unknown space"
        return f"the file write failed with {room} free on its device (a full disk or quota?)"
    return None


# --------------------------------------------------------------------------- opening a run


def open_run(
    cfg: CommandConfig,
    kind: RunKind,
    *,
    resume: bool = False,
    overwrite: bool = False,
    allow_data_change: bool = False,
    data: dict[str, Any] | None = None,
    trained: tuple[str, ...] = ("model",),
    frozen: bool = False,
    callbacks: list[Any] | None = None,
) -> RunContext:
    """Accelerator (:func:`~ppomax.trainers.launch.build_accelerator`: what ``accelerate launch`` configured, for
    the models named in ``trained``, and ``frozen`` ones beside them), seeds, and the run directory
    ``cfg.logging.out_dir`` checked by the rules of the module docstring: locked (when it exists), a run there
    refused unless resumed or overwritten, a resumed run's config compared. Nothing is written into it yet:
    :meth:`RunContext.restore` starts the run once the trainer has loaded everything. ``data``: the data files
    the run reads, ``{config key: path}``, fingerprinted in every checkpoint (a resume refuses changed ones
    unless ``allow_data_change``). ``callbacks``: objects given from Python, called on the main process
    (:class:`~ppomax.trainers.inputs.Callbacks`). Nothing here loads a model, so an unusable directory is reported
    first."""
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other (continue the run, or replace it)")
    if allow_data_change and not resume:
        raise ConfigError("--allow-data-change goes with --resume (a new run reads its data as it is)")
    log_with = trackers.log_with(cfg.logging, Path(cfg.logging.out_dir))
    accelerator = build_accelerator(trained, cfg.model.dtype, frozen=frozen, log_with=log_with)
    set_seed(cfg.seed)
    ctx = RunContext(
        accelerator,
        Path(cfg.logging.out_dir),
        cfg,
        data=RunData(dict(data or {}), allow_data_change),
        callbacks=Callbacks(callbacks, enabled=accelerator.is_main_process),
    )

    def plan_run() -> tuple[Path | None, int]:
        ctx.plan = open_dir(ctx.out_dir, cfg, kind, resume, overwrite)
        return ctx.plan.checkpoint, ctx.plan.step

    ctx.resume_from, _ = on_main(accelerator, plan_run)
    return ctx


@dataclass
class RunData:
    """The data a run reads (``{config key: source}``), their fingerprints (:func:`ppomax.data.sources.fingerprint`)
    from the start of the run on, and whether a resume may continue on files that changed since its checkpoint."""

    files: dict[str, Any]
    allow_change: bool = False
    fingerprints: dict[str, dict[str, Any]] = field(default_factory=dict)


def on_main(acc: Accelerator, fn: Any) -> Any:
    """``fn()`` on the main process, and its result on every rank; a :class:`UserError` it raises is raised on
    every rank (the other ranks would otherwise wait for the main process forever)."""
    if acc.num_processes == 1:
        return fn()
    from accelerate.utils import broadcast_object_list

    result, error = None, None
    if acc.is_main_process:
        try:
            result = fn()
        except UserError as exc:
            error = exc
    result, message = broadcast_object_list([result, None if error is None else str(error)])
    if error is not None:
        raise error
    if message is not None:
        raise UserError(message)
    return result


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UserError(f"{path}: cannot write: {write_error_cause(exc)}") from None


# --------------------------------------------------------------------------- signals


class StopFlag:
    """The first SIGINT/SIGTERM sets a flag the loop checks at each step boundary (it then checkpoints and raises
    :class:`RunStopped`); a second one interrupts at once. Handlers are installed only in the main thread."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: no graceful stop
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signum is not None:  # a second signal: stop now
            self.__exit__()
            raise KeyboardInterrupt
        self.signum = signum
        log.warning(
            "%s: saving a checkpoint at the end of this step, then stopping (signal again to stop at once)",
            signal.Signals(signum).name,
        )

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def agreed(self, accelerator: Accelerator) -> int | None:
        """The signal when any rank got one, else None (all ranks must stop at the same step)."""
        if accelerator.num_processes == 1:
            return self.signum
        flag = torch.tensor([float(self.signum or 0)], device=accelerator.device)
        got = int(accelerator.gather(flag).max().item())
        return got or None
