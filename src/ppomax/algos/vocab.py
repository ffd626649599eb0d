"""Reductions over the vocabulary of LM-head logits [B, T, V]: log-probs of chosen tokens, entropy, exact KL.

At real vocabularies (49k-152k) a float32 [B, T, V] tensor is the largest thing in a PPO step, so none of these
makes one: without a gradient they go through the logits a few rows x positions at a time
(:data:`VOCAB_SLICE_ELEMENTS` logits per slice), and under autograd the log-probs and entropy are custom
functions that save only the logits (alive anyway) and per-position statistics and recompute the softmax per
slice in the backward, writing straight into the one gradient tensor (as TRL's ``selective_log_softmax`` and
Liger's fused cross-entropy avoid the full log-softmax). A slice's float32 temporaries are written into buffers
that the next slice reuses (:class:`_Scratch`): a fresh 64 MiB tensor per slice is a fresh mapping of memory on
the CPU, and faulting its pages in took ~40% of the scoring reductions' CPU time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import torch
from torch import Tensor

# At most this many logits per slice: each float32 temporary (upcast, temperature-scaled copy, exp, softmax,
# log-softmax) is then at most 64 MiB, whatever the logits' [B, T, V].
VOCAB_SLICE_ELEMENTS = 1 << 24

Block = tuple[slice, slice]


def _float32_or_wider(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


class _Scratch:
    """Named buffers for one pass over a tensor's slices: :meth:`take` hands out the same memory again for the next
    slice (or a prefix of it for a smaller one), where allocating anew would map and fault in fresh pages each
    time (glibc serves allocations this large with mmap, and returns them to the system when freed)."""

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}

    def take(
        self, name: str, shape: torch.Size | tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> Tensor:
        """An uninitialised ``shape`` tensor, the memory of the previous ``take`` of ``name`` where it fits."""
        n = math.prod(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < n or buf.dtype != dtype or buf.device != device:
            buf = self._buffers[name] = torch.empty(n, dtype=dtype, device=device)
        return buf[:n].view(shape)


def _scaled(
    logits: Tensor, temperature: float, dtype: torch.dtype, scratch: _Scratch, name: str = "z"
) -> Tensor:
    """``logits / temperature`` in ``dtype`` in the buffer ``name`` of ``scratch``, never ``logits`` itself (the
    caller may work on it in place)."""
    z = scratch.take(name, logits.shape, dtype, logits.device).copy_(logits)
    return z.div_(temperature) if temperature != 1.0 else z


def _blocks(logits: Tensor) -> Iterator[Block]:
    """Slices of rows and positions of [B, T, V] ``logits``, at most :data:`VOCAB_SLICE_ELEMENTS` logits each
    (whole rows while they fit). Slicing dims 0 and 1 makes views: no copy of non-contiguous logits."""
    rows, positions, vocab = logits.shape
    tokens = max(1, VOCAB_SLICE_ELEMENTS // max(1, vocab))
    step_rows, step_positions = (
        (max(1, tokens // positions), positions) if tokens >= positions else (1, tokens)
    )
    for r in range(0, rows, step_rows):
        for p in range(0, positions, step_positions):
            yield slice(r, r + step_rows), slice(p, p + step_positions)


def _by_slices(fn: Callable[..., Tensor], first: Tensor, *rest: Tensor) -> Tensor:
    """``fn(first, *rest, scratch=...)`` -> [B, T, ...] for [B, T, ...] arguments, computed over :func:`_blocks`,
    every slice's temporaries in one :class:`_Scratch`: equal to the one-go result, as each position's value
    depends only on its own logits. Without a gradient only (``fn`` works in place and with ``out=``): under
    autograd the public functions take their custom functions or out-of-place forms instead."""
    scratch = _Scratch()
    if first.dim() != 3 or first.numel() <= VOCAB_SLICE_ELEMENTS:
        return fn(first, *rest, scratch=scratch)
    out: Tensor | None = None
    for block in _blocks(first):
        part = fn(*(t[block] for t in (first, *rest)), scratch=scratch)
        if out is None:
            out = part.new_empty((*first.shape[:2], *part.shape[2:]))
        out[block] = part
    assert out is not None
    return out


def logprobs_from_logits(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-probability of `labels` under softmax(logits / temperature): [B, T, V], [B, T] -> [B, T].

    ``log p(y_t) = z_{y_t} - logsumexp(z)`` with z = logits / temperature, computed in float32 (or wider)
    without a full log_softmax or float32 z (see the module). logits[:, t] must already be aligned with
    labels[:, t] (the caller shifts by one). Negative labels (e.g. -100 padding) are read as token 0; mask those
    positions downstream. Differentiable w.r.t. logits.
    """
    if torch.is_grad_enabled() and logits.requires_grad:
        rows = logits if logits.dim() == 3 else logits.reshape(1, -1, logits.shape[-1])
        picked = _LogprobsBySlices.apply(rows, labels.reshape(rows.shape[:-1]), temperature)
        return picked.reshape(labels.shape)
    return _by_slices(partial(_logprobs, temperature=temperature), logits, labels)


def _logprobs(logits: Tensor, labels: Tensor, temperature: float, scratch: _Scratch) -> Tensor:
    z = _scaled(logits, temperature, _float32_or_wider(logits), scratch)
    z_y = z.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return z_y - _consumed_logsumexp(z)


def _logsumexp(logits: Tensor, temperature: float, scratch: _Scratch) -> Tensor:
    return _consumed_logsumexp(_scaled(logits, temperature, _float32_or_wider(logits), scratch))


def _consumed_logsumexp(z: Tensor) -> Tensor:
    """``torch.logsumexp(z, -1)``, computed in ``z``'s own memory (``z`` is overwritten): torch's makes a shifted
    copy of its input, which at a vocabulary's width costs more than the exponentials."""
    top = z.amax(dim=-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros((), dtype=z.dtype, device=z.device))
    return z.sub_(top).exp_().sum(dim=-1).log_().add_(top.squeeze(-1))


class _LogprobsBySlices(torch.autograd.Function):
    """:func:`logprobs_from_logits` under autograd. Saves the logits and logsumexp [B, T]; the backward is
    ``d log p(y) / d logits_v = (1[v = y] - softmax(z)_v) / temperature``, softmax recomputed per slice."""

    @staticmethod
    def forward(ctx: Any, logits: Tensor, labels: Tensor, temperature: float) -> Tensor:
        lse = _by_slices(partial(_logsumexp, temperature=temperature), logits)
        z_y = logits.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1).to(lse.dtype)
        ctx.save_for_backward(logits, labels, lse)
        ctx.temperature = temperature
        return (z_y / temperature if temperature != 1.0 else z_y) - lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        logits, labels, lse = ctx.saved_tensors
        t = ctx.temperature
        out = torch.empty_like(logits)
        g = (grad / t).unsqueeze(-1)
        scratch = _Scratch()
        for block in _blocks(logits):
            p = _scaled(logits[block], t, lse.dtype, scratch).sub_(lse[block].unsqueeze(-1)).exp_()
            part = p.mul_(-g[block])
            part.scatter_add_(-1, labels[block].clamp(min=0).unsqueeze(-1), g[block])
            out[block] = part
        return out, None, None


def entropy_from_logits(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Entropy of softmax(logits / temperature) at every position: [B, T, V] -> [B, T] (float32 or wider).

    H = logsumexp(z) - sum_v softmax(z)_v * z_v, which equals -sum p log p without forming log p and is
    stable for large logits. Computed in float32 (bf16/fp16 logits are upcast), without a whole float32 copy
    (see the module). -inf logits (masked vocabulary) contribute 0. Differentiable.
    """
    if torch.is_grad_enabled() and logits.requires_grad:
        rows = logits if logits.dim() == 3 else logits.reshape(1, -1, logits.shape[-1])
        return _EntropyBySlices.apply(rows, temperature).reshape(logits.shape[:-1])
    stats = _by_slices(partial(_entropy_stats, temperature=temperature), logits)
    return stats[..., 0] - stats[..., 1]


def _entropy_stats(logits: Tensor, temperature: float, scratch: _Scratch) -> Tensor:
    """[..., 2]: logsumexp(z) and the mean of z under softmax(z), whose difference is the entropy. With
    ``top`` = max z (finite: -inf logits are clamped to the dtype's lowest) and e = exp(z - top): logsumexp =
    log sum e + top, the mean = sum e (z - top) / sum e + top."""
    z = _scaled(logits, temperature, _float32_or_wider(logits), scratch)
    top = z.clamp_(min=torch.finfo(z.dtype).min).amax(dim=-1, keepdim=True)
    e = torch.exp(z.sub_(top), out=scratch.take("e", z.shape, z.dtype, z.device))
    total = e.sum(dim=-1, keepdim=True)
    lse = total.log() + top
    mean = _dot(e, z).unsqueeze(-1) / total + top
    return torch.cat((lse, mean), dim=-1)


class _EntropyBySlices(torch.autograd.Function):
    """:func:`entropy_from_logits` under autograd. Saves the logits, logsumexp and the mean of z [B, T]; the
    backward is ``dH / d logits_v = -softmax(z)_v (z_v - E[z]) / temperature``, recomputed per slice."""

    @staticmethod
    def forward(ctx: Any, logits: Tensor, temperature: float) -> Tensor:
        stats = _by_slices(partial(_entropy_stats, temperature=temperature), logits)
        lse, mean = stats.unbind(-1)
        ctx.save_for_backward(logits, lse, mean)
        ctx.temperature = temperature
        return lse - mean

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        logits, lse, mean = ctx.saved_tensors
        t = ctx.temperature
        out = torch.empty_like(logits)
        g = (grad / t).unsqueeze(-1)
        scratch = _Scratch()
        for block in _blocks(logits):
            z = _scaled(logits[block], t, lse.dtype, scratch).clamp_(min=torch.finfo(lse.dtype).min)
            p = torch.sub(
                z, lse[block].unsqueeze(-1), out=scratch.take("p", z.shape, z.dtype, z.device)
            ).exp_()
            out[block] = p.mul_(z.sub_(mean[block].unsqueeze(-1))).mul_(-g[block])
        return out, None


def kl_from_logits(logits: Tensor, ref_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Exact ``KL(pi || ref)`` over the vocabulary at every position: [B, T, V], [B, T, V] -> [B, T].

    ``KL_t = sum_v pi(v|s_t) * (log pi(v|s_t) - log ref(v|s_t))`` with pi = softmax(logits / temperature),
    ref = softmax(ref_logits / temperature): the quantity the sampled estimators of
    :func:`ppomax.algos.kl_per_token` (paper eq. 3 / 19) estimate, without their noise. Computed in float32 (or
    wider); without a gradient over slices (see the module). A token pi gives probability 0 (a -inf logit, or
    underflow) contributes 0; one that ref rules out and pi does not gives inf. Where the two distributions
    agree, rounding can put the sum a hair below 0: it is clamped at 0, as a KL is.
    """
    if torch.is_grad_enabled() and (logits.requires_grad or ref_logits.requires_grad):
        return _kl_differentiable(logits, ref_logits, temperature)
    return _by_slices(partial(_kl, temperature=temperature), logits, ref_logits)


def _kl_differentiable(logits: Tensor, ref_logits: Tensor, temperature: float) -> Tensor:
    """:func:`kl_from_logits` under autograd: the same sum in one go, out of place (the sliced path writes into
    reused buffers with ``out=``, which autograd cannot record)."""
    acc = _float32_or_wider(logits)
    logp = torch.log_softmax(logits.to(acc) / temperature, dim=-1)
    ref_logp = torch.log_softmax(ref_logits.to(acc) / temperature, dim=-1)
    p = logp.exp()
    terms = torch.where(p > 0, p * (logp - ref_logp), torch.zeros((), dtype=acc, device=p.device))
    return terms.sum(dim=-1).clamp_min(0)


def _kl(logits: Tensor, ref_logits: Tensor, temperature: float, scratch: _Scratch) -> Tensor:
    logp, _, p = _log_softmax_and_raw(logits, None, temperature, scratch, "policy")
    p = torch.exp(logp, out=p)
    ref_logp, _, _ = _log_softmax_and_raw(ref_logits, None, temperature, scratch, "reference")
    return _exact_kl(p, logp.clamp_(min=torch.finfo(logp.dtype).min), ref_logp)


def scoring_reductions(
    logits: Tensor,
    labels: Tensor,
    temperature: float = 1.0,
    ref_logits: Tensor | None = None,
    entropy: bool = True,
) -> dict[str, Tensor]:
    """Everything PPO's scoring pass reads from a policy's (and a reference's) logits, in one pass over each
    slice of them (no gradient): [B, T, V] logits and ``ref_logits``, [B, T] ``labels`` -> [B, T] each of

    - ``logprobs``: log pi_T(y_t), pi_T = softmax(logits / temperature) (:func:`logprobs_from_logits`);
    - ``raw_logprobs``: the same at temperature 1 (the same tensor when ``temperature`` is 1);
    - ``entropy`` (with ``entropy``): -sum_v pi_T(v) log pi_T(v) (:func:`entropy_from_logits`);
    - with ``ref_logits``: ``ref_logprobs``, ``ref_raw_logprobs`` of the reference, and ``exact_kl``, sum_v
      pi_T(v) (log pi_T(v) - log ref_T(v)) clamped at 0 (:func:`kl_from_logits`).

    Equal to those functions' results (float32 or wider); computed from one log-softmax of each model's
    scaled logits per slice (the separate functions take a logsumexp each, five or six of them per position
    where one per model and temperature suffices)."""
    tensors = (logits, labels) if ref_logits is None else (logits, labels, ref_logits)
    columns = _scoring_columns(temperature, ref_logits is not None, entropy)
    stats = _by_slices(partial(_scoring, temperature=temperature, entropy=entropy), *tensors)
    out = dict(zip(columns, stats.unbind(-1), strict=True))
    if temperature == 1.0:
        out["raw_logprobs"] = out["logprobs"]
        if ref_logits is not None:
            out["ref_raw_logprobs"] = out["ref_logprobs"]
    return out


def _scoring_columns(temperature: float, ref: bool, entropy: bool) -> list[str]:
    names = ["logprobs", *(["raw_logprobs"] if temperature != 1.0 else []), *(["entropy"] if entropy else [])]
    if ref:
        names += ["ref_logprobs", *(["ref_raw_logprobs"] if temperature != 1.0 else []), "exact_kl"]
    return names


def _log_softmax_and_raw(
    logits: Tensor, index: Tensor | None, temperature: float, scratch: _Scratch, name: str
) -> tuple[Tensor, list[Tensor], Tensor]:
    """(log-softmax of ``logits / temperature`` in float32 or wider, [log p_T(y), log p_1(y) unless
    ``temperature`` is 1] for the labels ``index`` [..., 1] (none without), a spare buffer of its shape), both in
    ``scratch``'s buffers ``name`` and ``name``-buffer. One shifted copy of the logits and one buffer,
    exponentiated once per temperature (``torch.logsumexp`` makes copies of its own)."""
    z = _scaled(logits, temperature, _float32_or_wider(logits), scratch, name)
    top = z.amax(dim=-1, keepdim=True)
    z.sub_(torch.where(torch.isfinite(top), top, torch.zeros((), dtype=z.dtype, device=z.device)))
    buffer = torch.exp(z, out=scratch.take(f"{name}-buffer", z.shape, z.dtype, z.device))
    log_sum = buffer.sum(dim=-1, keepdim=True).log_()
    if index is None:
        return z.sub_(log_sum), [], buffer
    z_y = z.gather(-1, index)
    picked = [(z_y - log_sum).squeeze(-1)]
    if temperature != 1.0:  # log p_1(y) = x_y - logsumexp(x), x = temperature * z (the shift cancels)
        raw_log_sum = torch.mul(z, temperature, out=buffer).exp_().sum(dim=-1, keepdim=True).log_()
        picked.append((temperature * z_y - raw_log_sum).squeeze(-1))
    return z.sub_(log_sum), picked, buffer


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """sum_v a_v b_v over the last dim, as a batched matrix product (no product tensor)."""
    return (a.unsqueeze(-2) @ b.unsqueeze(-1)).squeeze(-1).squeeze(-1)


def _scoring(
    logits: Tensor,
    labels: Tensor,
    ref_logits: Tensor | None = None,
    *,
    temperature: float,
    entropy: bool,
    scratch: _Scratch,
) -> Tensor:
    """[..., columns] of :func:`scoring_reductions` for one slice."""
    index = labels.clamp(min=0).unsqueeze(-1)
    logp, columns, buffer = _log_softmax_and_raw(logits, index, temperature, scratch, "policy")
    p = torch.exp(logp, out=buffer)
    # a token a model rules out (a -inf logit) has log-prob -inf: at the dtype's lowest, 0 * it is 0
    lowest = torch.finfo(logp.dtype).min
    logp.clamp_(min=lowest)
    p_logp = _dot(p, logp)
    if entropy:
        columns.append(-p_logp)
    if ref_logits is not None:
        ref_logp, ref_columns, _ = _log_softmax_and_raw(ref_logits, index, temperature, scratch, "reference")
        columns += [*ref_columns, _exact_kl(p, logp, ref_logp)]
    return torch.stack(columns, dim=-1)


def _exact_kl(p: Tensor, logp: Tensor, ref_logp: Tensor) -> Tensor:
    """sum_v p_v (log p_v - log ref_v) over the last dim, clamped at 0, for p = exp(``logp``) and ``logp`` clamped
    at its dtype's lowest (0 * it is 0); overwrites ``logp`` and ``ref_logp``. Not a difference of two dot
    products, so that small KLs stay exact; inf (not a huge number) where pi keeps a token ref rules out."""
    lowest = torch.finfo(logp.dtype).min
    ruled_out = ref_logp.amin(dim=-1) == -math.inf
    kl = _dot(p, logp.sub_(ref_logp.clamp_(min=lowest)))
    if bool(ruled_out.any()):
        kl = torch.where(ruled_out & ((p > 0) & (ref_logp == lowest)).any(dim=-1), math.inf, kl)
    return kl.clamp_min(0)
