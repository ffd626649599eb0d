"""Running a causal LM's head on some positions only.

A forward's LM head is its largest single matmul at a real vocabulary, and its output, [rows, width, V] logits, its
largest tensor: where only some positions' logits are read (PPO's response tokens, the reward model's chosen
answers under eq. 2's LM term), :func:`lm_head_on` runs the model's own head on those positions' final hidden states
only, inside the model's forward, so what the model does after its head (logit scaling, soft-capping) applies as
ever. :class:`ResponsePositions` says which positions, and where their outputs go; :class:`ResponseLogits` holds
such logits, [1, K, V], and puts what is computed from them per token (log-probs, entropy, KL) back in the rows'
[B, R] layout: no [B, R, V] copy of the logits is ever made.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import extract_model_from_parallel
from torch import Tensor

from ppomax.errors import UserError

from .adapter_dir import is_peft_model


@dataclass(frozen=True)
class ResponsePositions:
    """Where a chunk's ``K`` real response tokens (row by row, EOS included) read a forward's per-position outputs,
    and where those go in the chunk's ``[B, R]`` response layout."""

    source: Tensor
    """[K] long, into the forward's flattened positions: the position before each real response token (the
    padded column ``P + j - 1`` of row ``b``, or where that token is packed)."""
    target: Tensor
    """[K] long, into the flattened ``[B * R]`` response layout: ``b * R + j`` for token ``j`` of row ``b``."""
    rows: int
    width: int
    """B and R."""

    def select(self, outputs: Tensor) -> Tensor:
        """[M, W, ...] per-position inputs or outputs of the forward -> [1, K, ...] at :attr:`source`."""
        return outputs.flatten(0, 1).index_select(0, self.source).unsqueeze(0)

    def scatter(self, outputs: Tensor) -> Tensor:
        """[K, ...] outputs at the real response tokens -> [B, R, ...], zeros in the columns past a row's response
        (off the response mask: never read)."""
        rest = outputs.shape[1:]
        out = outputs.new_zeros((self.rows * self.width, *rest))
        return out.index_copy_(0, self.target, outputs).view(self.rows, self.width, *rest)

    @classmethod
    def padded(cls, response_lens: Tensor, prompt_width: int, total_width: int) -> ResponsePositions:
        """The real response tokens of ``B`` rows laid out as ``[B, total_width]`` with their prompts ending at
        column ``prompt_width`` (``response_lens`` [B] on the host, EOS included): token ``j`` of row ``b`` is
        read at column ``prompt_width + j - 1``."""
        width = total_width - prompt_width
        row, column = real_response_tokens(response_lens, width)
        return cls(
            row * total_width + prompt_width - 1 + column, row * width + column, len(response_lens), width
        )

    def to(self, device: torch.device) -> ResponsePositions:
        return dataclasses.replace(self, source=self.source.to(device), target=self.target.to(device))


def real_response_tokens(response_lens: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """(row, column) [K] of every real response token of rows with ``response_lens`` [B] (host) in ``width``
    response columns, row by row."""
    r_lens = response_lens.cpu().long().clamp(max=width)
    row = torch.repeat_interleave(torch.arange(len(r_lens)), r_lens)
    column = torch.arange(int(r_lens.sum())) - torch.repeat_interleave(r_lens.cumsum(0) - r_lens, r_lens)
    return row, column


@dataclass(frozen=True)
class ResponseLogits:
    """The logits predicting a chunk's ``[B, R]`` response tokens: ``values`` [1, K, V] at its ``K`` real ones
    (``positions``; the LM head ran on those only, :func:`lm_head_on`), or [B, R, V] (``positions`` None: a
    model whose head cannot be narrowed). Per-token results of ``values`` go back to ``[B, R]`` by :meth:`rows`,
    zeros past each row's response (off the response mask)."""

    values: Tensor
    positions: ResponsePositions | None = None

    def tokens(self, labels: Tensor) -> Tensor:
        """``[B, R]`` response tokens -> the ones ``values`` predict, in their layout."""
        if self.positions is None:
            return labels
        return labels.flatten().index_select(0, self.positions.target).unsqueeze(0)

    def rows(self, per_token: Tensor) -> Tensor:
        """A per-token result of :attr:`values` (``[1, K]`` or ``[B, R]``) -> ``[B, R]``."""
        return per_token if self.positions is None else self.positions.scatter(per_token[0])

    def detach(self) -> ResponseLogits:
        return ResponseLogits(self.values.detach(), self.positions)

    def like(self, other: ResponseLogits) -> ResponseLogits:
        """These logits in ``other``'s layout (both of the same rows): for a per-token comparison of two models'
        logits (the exact KL), one of which has a head that could not be narrowed."""
        if other.positions is None:
            if self.positions is None:
                return self
            return ResponseLogits(self.positions.scatter(self.values[0]))
        if self.positions is not None:
            if not torch.equal(self.positions.target, other.positions.target):
                raise ValueError("the two logits are of different response tokens")
            return self
        return ResponseLogits(
            self.values.flatten(0, 1).index_select(0, other.positions.target).unsqueeze(0), other.positions
        )


@contextmanager
def lm_head_on(
    head: torch.nn.Module | None, positions: ResponsePositions, input_shape: torch.Size
) -> Iterator[Callable[[Tensor], Tensor | None]]:
    """Within the block, the first call of ``head`` on the [N, W, H] final hidden states of a forward over
    ``input_shape`` [N, W] runs on ``positions.select`` of them, [1, K, H], inside the model's own forward (what
    the model does after its head, e.g. Gemma 2's logit soft-capping, applies as ever; DeepSpeed ZeRO-3 gathers
    the head's weight around the same call). Yields ``selected``: the forward's logits -> themselves, [1, K, V] at
    the positions (checked to be the head's output there), or None where the head did not run on them (no
    ``head``, or not called as expected: the caller reads the logits as they are; a UserError where the head ran
    on them but the logits are not its output). The hook is removed on leaving the block, also on an
    exception."""
    ran: list[bool] = []

    def select(_module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        hidden = args[0] if args else None
        if ran or not isinstance(hidden, Tensor) or hidden.dim() != 3 or hidden.shape[:2] != input_shape:
            return None
        ran.append(True)
        return (positions.select(hidden), *args[1:])

    def selected(logits: Tensor) -> Tensor | None:
        if not ran:
            return None
        if logits.dim() != 3 or logits.shape[:2] != (1, len(positions.source)):  # never silently misread
            raise UserError(
                f"the model's logits {tuple(logits.shape)} are not its LM head's output on the {len(positions.source)} "
                "response positions ppomax selected: its forward reshapes them; please report the model's class"
            )
        return logits

    handle = head.register_forward_pre_hook(select) if head is not None else None
    try:
        yield selected
    finally:
        if handle is not None:
            handle.remove()


def _accepts(model: torch.nn.Module, name: str) -> bool:
    if is_peft_model(model):  # PEFT passes unknown keyword arguments on to the model it wraps
        model = model.get_base_model()
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def narrowable_head(model: torch.nn.Module) -> tuple[torch.nn.Module | None, bool]:
    """(the LM head :func:`lm_head_on` may narrow, or None; whether the model takes ``logits_to_keep``) of a causal
    LM (unwrapped from any engine; PEFT's wrappers are looked through). The head only of a model that takes
    ``logits_to_keep``: its forward slices the final hidden states before the head and reads the logits the head
    returns whatever their number of positions (transformers' causal LMs)."""
    if not _accepts(model, "logits_to_keep"):
        return None, False
    get = getattr(model, "get_output_embeddings", None)  # through PEFT's wrappers to the base model's
    head = get() if callable(get) else None
    return (head if isinstance(head, torch.nn.Module) else None), True


@dataclass(frozen=True)
class TargetPositions(ResponsePositions):
    """The positions whose logits predict a batch's trained tokens, their outputs kept in one ``[1, K, ...]`` row
    (no scatter into a padded layout: a loss reads them as they are)."""

    row: Tensor
    column: Tensor
    """[K] each: the position ``(row, column)`` of a ``[B, T]`` forward whose logits predict token ``column + 1``."""

    @classmethod
    def of(cls, targets: Tensor) -> TargetPositions:
        """From ``targets`` [B, T-1] (True where the token at t + 1 is trained on, read from the logits at t)."""
        row, column = targets.nonzero(as_tuple=True)
        k = len(row)
        return cls(
            row * (targets.shape[1] + 1) + column, torch.arange(k, device=row.device), 1, k, row, column
        )

    def labels(self, input_ids: Tensor) -> Tensor:
        """[1, K] the trained tokens, in the order of the outputs."""
        return input_ids[self.row, self.column + 1].unsqueeze(0)


def logits_at_targets(model: torch.nn.Module, targets: Tensor, **inputs: Any) -> tuple[Tensor, Tensor]:
    """(logits [1, K, V], labels [1, K]) of causal LM ``model``'s forward over ``inputs`` (``input_ids`` [B, T] and
    what else the model takes) at the ``K`` positions ``targets`` [B, T-1] marks (:meth:`TargetPositions.of`):
    the LM head runs on those only where the model lets it be narrowed (:func:`lm_head_on`), on every position
    otherwise. For a masked next-token loss: prompts, padding and untrained tokens cost no logits."""
    ids = inputs["input_ids"]
    positions = TargetPositions.of(targets)
    head, _ = narrowable_head(extract_model_from_parallel(model))
    with lm_head_on(head, positions, ids.shape) as selected:
        out = model(**inputs, use_cache=False)
    logits = selected(out.logits)
    return (logits if logits is not None else positions.select(out.logits)), positions.labels(ids)
