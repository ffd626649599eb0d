"""PPO checkpoints (everything needed to resume exactly), RNG state and clean stops on SIGINT/SIGTERM.

A checkpoint ``out_dir/checkpoints/step-N/`` is written atomically (:func:`ppomax.checkpoint.atomic_dir`)::

    policy/        save_pretrained (safetensors) + tokenizer: loads with AutoModelForCausalLM
    critic/        ValueHeadModel.save_pretrained
    optim.pt       optimiser and scheduler state dicts (loaded with torch.load(weights_only=True))
    rng.pt         python / torch CPU / CUDA RNG states, one entry per process
    state.json     step, data positions, running reward moments, counters

Resuming loads policy and critic from the checkpoint, the reference and reward model from the config, then the
rest of the state, so the run continues as if it had not stopped.
"""

from __future__ import annotations

import json
import random
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ppomax.checkpoint import atomic_dir, latest_checkpoint, prune_checkpoints
from ppomax.errors import UserError

STATE_FILE = "state.json"


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_to_tuple(state["python"]))
    torch.random.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_tuple(x: Any) -> Any:
    # torch.load may hand the python RNG state back with lists where random.setstate wants tuples.
    return tuple(_to_tuple(v) for v in x) if isinstance(x, list | tuple) else x


def resolve_resume(path: str | Path) -> Path:
    """A checkpoint directory from ``--resume PATH``: a ``step-N`` checkpoint itself, or a run directory (its
    newest checkpoint)."""
    p = Path(path)
    if (p / STATE_FILE).is_file():
        return p
    for root in (p / "checkpoints", p):
        found = latest_checkpoint(root)
        if found is not None:
            return found
    raise UserError(
        f"--resume {p}: no checkpoint there (expected {p}/checkpoints/step-N/ or a step-N directory)"
    )


def save_checkpoint(
    out_dir: Path,
    step: int,
    *,
    policy: Any,
    critic: Any,
    tokenizer: Any,
    optim: dict[str, Any],
    state: dict[str, Any],
    rng_states: list[dict[str, Any]],
    keep: int,
) -> Path:
    """Write ``out_dir/checkpoints/step-{step}`` atomically and prune old ones (main process only)."""
    root = out_dir / "checkpoints"
    final = root / f"step-{step}"
    with atomic_dir(final) as tmp:
        policy.save_pretrained(tmp / "policy", safe_serialization=True)
        tokenizer.save_pretrained(tmp / "policy")
        critic.save_pretrained(tmp / "critic")
        torch.save(optim, tmp / "optim.pt")
        torch.save(rng_states, tmp / "rng.pt")
        (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step}, indent=2) + "\n", encoding="utf-8")
    prune_checkpoints(root, keep)
    return final


def load_checkpoint(ckpt: Path) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """(state, optimiser/scheduler state dicts, per-process RNG states) of a checkpoint directory."""
    state = json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))
    optim = torch.load(ckpt / "optim.pt", weights_only=True, map_location="cpu")
    rngs = torch.load(ckpt / "rng.pt", weights_only=True, map_location="cpu")
    return state, optim, rngs


class StopRequest:
    """Turns the first SIGINT/SIGTERM into a flag the loop checks between iterations (it then saves a checkpoint
    and returns); a second signal interrupts at once. Handlers are installed only in the main thread."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signum is not None:
            self.restore()
            raise KeyboardInterrupt
        self.signum = signum

    @contextmanager
    def installed(self) -> Iterator[StopRequest]:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        try:
            yield self
        finally:
            self.restore()

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
