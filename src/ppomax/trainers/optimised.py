"""One optimiser step, taken the same way by every trainer: SFT, the reward model, PPO's policy and critic.

A step is the backward of each of its micro-batches (:meth:`Optimised.backward`; the gradients accumulate, their
all-reduce over the processes deferred to the step's last micro-batch: :meth:`Optimised.no_sync`), then
:func:`step_together` for the models trained on them: the global gradient-norm clip (paper app. C.2), the check
that the step's loss and gradient norms are finite, decided over all ranks (every rank steps or skips alike), the
optimiser and learning-rate schedule steps, and the gradients zeroed. A skipped step leaves weights, optimiser
state and schedule as they were; the trainers count skipped steps and stop after ``max_nonfinite_in_row``.

ppomax ends every step itself, on every engine (no accelerate ``accumulate``; DeepSpeed's unmanaged gradient
accumulation). The engine's part is what :class:`~ppomax.trainers.launch.Engine` says: where it owns the step
(DeepSpeed) it clips inside that step and knows the gradient norm only there, so the loss is checked before it,
and a non-finite norm, a step the engine skipped itself, makes the step a skipped one after it.

Under float16 autocast (``model.dtype: float16`` on a GPU) accelerate scales the loss by its Accelerator's one
``GradScaler``, shared by every trained model. accelerate's own clip and optimiser step assume one optimiser: its
clip unscales every optimiser of the Accelerator (a second model's clip unscales again: an error) and its step
updates the scale after each optimiser, and a step skipped before it never updates the scale (it cannot back off
an overflow). So ppomax drives the scaler itself: each model's gradients unscaled once, by its own optimiser, before
their clip; the models stepped through the scaler; the scale updated once per step, taken or skipped (a skipped
overflow backs it off, the overflow recorded as the gradients were unscaled).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from torch import Tensor

from ppomax.algos import AllReduce

from .launch import Engine

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine


@dataclasses.dataclass
class Optimised:
    """A trained model as prepared on the run's ``engine``, with its optimiser and learning-rate schedule."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    accelerator: Accelerator
    engine: Engine

    @property
    def loss_scaler(self) -> torch.amp.GradScaler | None:
        """The Accelerator's float16 loss scaler (one for all its models), else None (no float16 autocast, or
        DeepSpeed: its engine scales the loss itself)."""
        return None if self.engine.owns_step else self.accelerator.scaler

    @property
    def _deepspeed(self) -> DeepSpeedEngine:
        """The prepared model as the DeepSpeed engine it is where the engine owns the step."""
        return cast("DeepSpeedEngine", self.model)

    @property
    def raw_optimizer(self) -> torch.optim.Optimizer:
        """The torch optimiser under accelerate's wrapper (the one the loss scaler keeps its state for)."""
        optimizer = self.optimizer
        while isinstance(optimizer, AcceleratedOptimizer):
            optimizer = optimizer.optimizer
        return optimizer

    def backward(self, loss: Tensor) -> None:
        """Add ``loss``'s gradient to the step's (one micro-batch)."""
        if self.engine.owns_step:
            self._deepspeed.backward(loss)
        else:
            self.accelerator.backward(loss)

    def no_sync(self) -> AbstractContextManager[Any]:
        """Forward and backward of a micro-batch that is not the step's last: no gradient all-reduce yet."""
        return self.engine.no_sync(self.accelerator, self.model)

    def clip(self, max_norm: float) -> Tensor | None:
        """Clip the gradient's global norm to ``max_norm`` (app. C.2); returns the pre-clip norm, or None where
        the engine clips inside :meth:`step`."""
        if self.engine.owns_step:
            return None
        scaler = self.loss_scaler
        if scaler is None:
            norm = self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm)
        else:
            # this model's gradients only (and the overflow they hold, for the scale's update)
            scaler.unscale_(self.raw_optimizer)
            norm = clip_unscaled(self.model.parameters(), max_norm)
        return torch.as_tensor(norm).detach().float()

    def step(self) -> Tensor | None:
        """The optimiser step (not the schedule's); returns the pre-clip gradient norm where the engine measured
        it inside its step (non-finite: the engine skipped the step)."""
        if self.engine.owns_step:
            self._deepspeed.step()
            norm = self._deepspeed.get_global_grad_norm()
            return None if norm is None else torch.as_tensor(float(norm))
        scaler = self.loss_scaler
        if scaler is not None:  # the gradients :meth:`clip` unscaled; the scale's update is the step's, once
            scaler.step(self.raw_optimizer)
            return None
        self.optimizer.step()
        return None

    def zero_grad(self) -> None:
        """After :meth:`step`: the gradients cleared for the next step."""
        if self.engine.owns_step:  # accelerate's DeepSpeed optimiser wrapper leaves it to the engine's step
            self._deepspeed.optimizer.zero_grad()
            self.model.zero_grad()
        else:
            self.optimizer.zero_grad(set_to_none=True)

    def discard(self) -> None:
        """Instead of :meth:`step`: the step's accumulated gradients dropped, nothing stepped."""
        self.engine.discard_gradients(self.model, self.optimizer)


class StepResult(NamedTuple):
    """What :func:`step_together` did."""

    stepped: bool
    norms: dict[str, Tensor]
    """Each model's pre-clip gradient norm, where known."""
    loss_scale_overflow: bool
    """Skipped only because a float16 loss scale above 1 overflowed a gradient (the loss finite on every rank):
    the scale backing off while it settles, not a sign of divergence. Trainers do not count it towards
    ``max_nonfinite_in_row`` (a run's first float16 steps overflow until the scale fits; at a scale of 1 or less an
    overflow is the gradient's own and counts)."""


def step_together(
    models: Mapping[str, Optimised],
    loss: Tensor,
    max_grad_norm: float | None,
    all_reduce: AllReduce | None = None,
) -> StepResult:
    """End one optimiser step of ``models`` (their micro-batches' backwards done), all stepping or none: clip
    each gradient's global norm to ``max_grad_norm`` (None: measured, not clipped), check this rank's step
    ``loss`` and the norms, and step (optimiser, then schedule) only if they are finite on every rank
    (``all_reduce``: the sum over ranks; None for one process). Gradients are zeroed either way.

    Returns whether the step was taken, each model's pre-clip gradient norm and whether a skip was a float16 loss
    scale overflow (:class:`StepResult`). Where the engine
    skipped a model's step itself (a non-finite norm measured inside it) that model's schedule stays and the step
    counts as skipped; a model stepped before it keeps its step (engines cannot undo one)."""
    max_norm = max_grad_norm if max_grad_norm is not None else float("inf")
    scaler = next((s for m in models.values() if (s := m.loss_scaler) is not None), None)  # one Accelerator's
    clipped = {name: m.clip(max_norm) for name, m in models.items()}
    norms = {name: n for name, n in clipped.items() if n is not None}
    grads = [n.to(loss.device).reshape(()) for n in norms.values()]
    bad = torch.stack(
        [
            ~torch.isfinite(loss.detach().float()),
            ~torch.isfinite(torch.stack(grads)).all() if grads else torch.tensor(False, device=loss.device),
        ]
    ).float()  # [loss, gradient norms] not finite on this rank
    if all_reduce is not None:  # every rank must take the same decision: the sums over ranks
        bad = all_reduce(bad)
    if bool(bad.any()):
        for m in models.values():
            m.discard()
        overflow = False
        if scaler is not None:  # an overflow recorded as the gradients were unscaled: the scale backs off
            overflow = bool(bad[0] == 0) and scaler.get_scale() > 1.0
            scaler.update()
        return StepResult(False, norms, overflow)
    stepped = True
    for name, m in models.items():
        measured = m.step()
        m.zero_grad()
        if measured is not None:
            norms[name] = measured
            if not torch.isfinite(measured):  # the engine skipped it (the same on every rank)
                stepped = False
                continue
        m.schedule.step()
    if scaler is not None:
        scaler.update()
    return StepResult(stepped, norms, False)


def clip_unscaled(parameters: Any, max_norm: float) -> Tensor:
    """Clip the global norm of ``parameters``' unscaled gradients to ``max_norm`` and return the pre-clip norm:
    accelerate's ``clip_grad_norm_`` without its unscaling of every optimiser. Sharded gradients (FSDP2's DTensors)
    give the norm over all shards."""
    norm = torch.nn.utils.clip_grad_norm_(list(parameters), max_norm)
    full_tensor = getattr(norm, "full_tensor", None)
    return full_tensor() if full_tensor is not None else norm
