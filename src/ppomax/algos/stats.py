"""Masked statistics (sum, mean, whitening) and running moments, all rank-aware, and the last-token index."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

AllReduce = Callable[[Tensor], Tensor]
"""Sums a tensor across ranks and returns it (identity on a single process)."""


def _bool_mask(mask: Tensor) -> Tensor:
    return mask if mask.dtype == torch.bool else mask != 0


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # Sums and counts of bf16/fp16 tensors are accumulated and returned in float32: a bf16 count is
    # already inexact above 256 tokens.
    return torch.promote_types(dtype, torch.float32) if dtype.is_floating_point else torch.float32


def last_token_index(mask: Tensor) -> Tensor:
    """Index of the last set position of every row: mask [B, T] -> LongTensor [B].

    Where a sequence's one number is read or placed: the reward model's score (the value at the last real
    token, paper 3.1) and the score added at the last response token (eq. 3). Padding may sit left, right
    or both (the position of the rightmost set entry). A row with nothing set gives 0; callers that care
    test ``mask.any(dim=1)``.
    """
    m = _bool_mask(mask)
    positions = torch.arange(m.shape[-1], device=m.device).expand_as(m)
    return torch.where(m, positions, torch.full_like(positions, -1)).amax(dim=-1).clamp(min=0)


def score_token_index(input_ids: Tensor, attention_mask: Tensor, pad_token_id: int | None) -> Tensor:
    """Where a reward model reads its score: the last attended token that is not ``pad_token_id``, [B].

    This is where transformers' ``*ForSequenceClassification`` pools (the rightmost token whose id is not
    ``config.pad_token_id``, for right or left padding), so a reward model scores a sequence as plain transformers
    does. When the pad token is also the EOS token (many chat models), a trailing EOS counts as padding and the score
    is read at the token before it, as TRL's ``get_reward`` reads it (the token before the first pad of the
    response). The attention mask also counts: positions it masks out are padding whatever their id. Without a pad
    token id: the last attended token (paper 3.1).
    """
    keep = _bool_mask(attention_mask)
    if pad_token_id is not None:
        keep = keep & (input_ids != pad_token_id)
    return last_token_index(keep)


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of `x` over positions where `mask` is set.

    x: [B, T] (any shape broadcastable with mask); mask: [B, T]. Returns a scalar (dim=None) or the sum
    over `dim`, in float32 or wider. Masked-out entries are selected away rather than multiplied by 0,
    so NaN/inf in padding cannot leak.
    """
    acc = _acc_dtype(x.dtype)
    x = torch.where(_bool_mask(mask), x.to(acc), torch.zeros((), dtype=acc, device=x.device))
    return x.sum() if dim is None else x.sum(dim=dim)


def masked_max(x: Tensor, mask: Tensor) -> Tensor:
    """Largest ``x`` where ``mask`` is set (a scalar; 0 when nothing is), without a host sync (no ``if
    mask.any()``)."""
    m = _bool_mask(mask)
    top = torch.where(m, x, torch.full((), -math.inf, dtype=x.dtype, device=x.device)).max()
    return torch.where(m.any(), top, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_min(x: Tensor, mask: Tensor) -> Tensor:
    """Smallest ``x`` where ``mask`` is set (a scalar; 0 when nothing is): :func:`masked_max` of ``-x``."""
    return -masked_max(-x, mask)


def _sum_and_count(
    x: Tensor, mask: Tensor, dim: int | None, all_reduce: AllReduce | None
) -> tuple[Tensor, Tensor]:
    total = masked_sum(x, mask, dim)
    count = masked_sum(torch.ones((), dtype=total.dtype, device=x.device).expand_as(x), mask, dim)
    if all_reduce is not None:
        packed = all_reduce(torch.stack([total.detach(), count]))
        # Global statistics, but only the local rank's terms carry gradient (as under DDP).
        total = total + (packed[0] - total.detach())
        count = packed[1]
    return total, count


def masked_mean(
    x: Tensor, mask: Tensor, dim: int | None = None, all_reduce: AllReduce | None = None
) -> Tensor:
    """Mean of `x` over masked positions: sum(x * m) / sum(m).

    x, mask: [B, T]. dim=None gives a scalar, else the mean along `dim` (e.g. dim=1 -> [B]).
    With `all_reduce`, the sum and the count are summed over ranks first, so the result is the global
    mean over all ranks' tokens (not a mean of per-rank means). An empty mask gives 0, not NaN.
    Low-precision inputs give a float32 result.
    """
    total, count = _sum_and_count(x, mask, dim, all_reduce)
    return total / count.clamp(min=1)


def token_weights(counts: Tensor, all_reduce: AllReduce | None = None) -> Tensor:
    """Weights that turn a sum of micro-batch means into the mean over all of their units (tokens, pairs).

    counts: [..., K] how many units each of this rank's K micro-batches averages over (one row per kind of
    unit). With N the total over the K micro-batches of all R ranks (``all_reduce``; N and R are 1 call),
    ``w_i = R * n_i / N``, so ``sum_i w_i * mean_i = R * sum_i s_i / N`` (s_i the micro-batch's sum) and,
    once data-parallel training averages the R ranks' gradients, the update is that of the mean over all N
    units at once, however they were split into micro-batches and ranks (gradient accumulation that changes
    only memory, not the update). A mean of equally weighted micro-batch means would instead over-weight the
    units of small micro-batches. One rank: ``w_i = n_i / N`` (summing to 1). N = 0 gives zeros.
    """
    counts = counts.detach().to(_acc_dtype(counts.dtype))
    total = counts.sum(dim=-1, keepdim=True)
    ranks = torch.ones((), dtype=counts.dtype, device=counts.device)
    if all_reduce is not None:
        packed = all_reduce(torch.cat([total.flatten(), ranks.reshape(1)]))
        total, ranks = packed[:-1].reshape(total.shape), packed[-1]
    return counts * ranks / total.clamp(min=1)


def masked_whiten(
    x: Tensor,
    mask: Tensor,
    shift_mean: bool = True,
    all_reduce: AllReduce | None = None,
    eps: float = 1e-8,
) -> Tensor:
    """Whiten `x` under the mask: (x - mean) / sqrt(var + eps), zero outside the mask.

    x, mask: [B, T] -> [B, T]. Mean and unbiased variance (two-pass: the mean first, then the squared
    deviations, with Bessel's correction n / (n - 1); 0 when n <= 1) are taken over the masked tokens of the
    whole batch (all ranks with `all_reduce`, n the global count). shift_mean=False keeps the original mean
    (only rescales), the usual choice when whitening rewards rather than advantages.
    """
    mean = masked_mean(x, mask, all_reduce=all_reduce)
    sq_sum, count = _sum_and_count((x - mean).square(), mask, None, all_reduce)
    var = sq_sum / (count - 1).clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(_bool_mask(mask), out, torch.zeros((), dtype=out.dtype, device=out.device))


class RunningMoments:
    """Running mean / variance of every value seen so far (reward scaling and normalisation, paper 5.3.1).

    Each `update` computes the batch's count, mean and sum of squared deviations (M2) over all ranks,
    then merges them into the running statistics with the parallel formula of Chan et al. (1979):
    ``delta = mean_b - mean_a; n = n_a + n_b; mean = mean_a + delta * n_b / n;
    M2 = M2_a + M2_b + delta**2 * n_a * n_b / n``. State is kept in Python floats (float64), so long runs
    do not drift. `var` is the unbiased variance of all seen values, `std = sqrt(var)`; before two values
    have been seen, `var` is 1 and `mean` 0, so normalising by them is the identity.
    """

    def __init__(self, all_reduce: AllReduce | None = None) -> None:
        self.all_reduce = all_reduce
        self.mean = 0.0
        self.m2 = 0.0
        self.count = 0.0

    @property
    def var(self) -> float:
        return self.m2 / (self.count - 1) if self.count >= 2 else 1.0

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    @torch.no_grad()
    def update(self, x: Tensor, mask: Tensor | None = None) -> tuple[float, float]:
        """Merge the batch `x` (any shape; with `mask`, only masked entries) into the running moments.

        Returns the batch mean and unbiased batch std (over all ranks). An empty batch changes nothing
        and returns (0.0, 0.0).
        """
        # float64 keeps long runs exact; MPS has no float64, so it gets float32.
        x = x.detach().to(torch.float32 if x.device.type == "mps" else torch.float64)
        m = torch.ones_like(x, dtype=torch.bool) if mask is None else _bool_mask(mask)
        total, count = _sum_and_count(x, m, None, self.all_reduce)
        n_b = float(count)
        if n_b == 0:
            return 0.0, 0.0
        mean_b = float(total) / n_b
        sq, _ = _sum_and_count((x - mean_b).square(), m, None, self.all_reduce)
        m2_b = float(sq)

        n_a = self.count
        n = n_a + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / n
        self.m2 += m2_b + delta * delta * n_a * n_b / n
        self.count = n
        std_b = math.sqrt(m2_b / (n_b - 1)) if n_b > 1 else 0.0
        return mean_b, std_b

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "m2": self.m2, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.mean = float(state["mean"])
        self.m2 = float(state["m2"])
        self.count = float(state["count"])
