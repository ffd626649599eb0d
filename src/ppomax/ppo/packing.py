"""Packed sequences (``ppo.pack_sequences``): a chunk's rows laid end to end in fewer, fuller rows.

A forward over :class:`~ppomax.ppo.experience.Experience` rows is as wide as their longest prompt plus their
longest response, usually of different rows: most of its positions can be padding. Packed, each row's real tokens
(its prompt, then its response up to and including EOS) follow one another, first-fit decreasing, in rows as wide
as the chunk's longest sequence (no attention is wider than the padded forward's), and position ids restart at 0
with each sequence. Given such position ids and no attention mask, transformers' attention (sdpa, eager, flash)
lets a token attend only to the earlier tokens of its own sequence (``masking_utils.find_packed_sequence_indices``
splits a row where the position ids do not go up by one), so every sequence's outputs are those of the padded
forward, to float rounding. :meth:`PackedChunk.gather` puts the outputs of the response positions back in the
``[B, R]`` layout of the experience buffer.

:class:`~ppomax.models.lm_head.ResponsePositions` are the positions of a forward, packed or padded, whose outputs
the rows' real response tokens read (the LM head runs on those only, see :class:`ppomax.ppo.models.Forward`).

Only the index arithmetic is here; the forwards are :class:`ppomax.ppo.models.Forward`'s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ppomax.models.lm_head import ResponsePositions, real_response_tokens


@dataclass(frozen=True)
class PackedChunk:
    """A chunk of ``B`` rows packed into ``N`` rows of width ``W`` (see the module docstring)."""

    input_ids: Tensor
    """[N, W] long, on the sequences' device: the sequences one after another, then ``pad_id`` to the row's end."""
    position_ids: Tensor
    """[N, W] long: 0, 1, ... within each sequence; a row's trailing padding counts from 0 too (a sequence of its
    own, which attends to nothing real)."""
    response_index: Tensor
    """[B, R] long, into the flattened ``N * W`` positions: the position whose output is read for response token
    ``j`` of row ``b`` (the one before it, as the padded column ``P + j - 1``); response columns past the row's
    sequence read its last token."""
    response_positions: ResponsePositions
    """The positions of :attr:`response_index` that the real response tokens read."""

    def gather(self, outputs: Tensor) -> Tensor:
        """[N, W, ...] per-position outputs of a forward over :attr:`input_ids` -> [B, R, ...] at the response
        positions, as the padded forward's columns ``P - 1 .. P + R - 2`` hold them."""
        return outputs.flatten(0, 1)[self.response_index]

    def token_index(self, prompt_lens: Tensor, tokens: Tensor) -> Tensor:
        """[B] long, into the flattened ``N * W`` positions: where token ``tokens[b]`` of row ``b``'s sequence
        (counted from its first real token) is packed; ``prompt_lens`` [B] the rows' real prompt token counts.
        Rows with at least one response column."""
        device = self.response_index.device
        # response token 0 is read at the sequence's token p - 1 (its first token for an empty prompt)
        first = self.response_index[:, 0] - (prompt_lens.to(device) - 1).clamp(min=0)
        return first + tokens.to(device)


def first_fit_decreasing(lengths: list[int], width: int) -> list[list[int]]:
    """The indices of ``lengths`` in bins of total length at most ``width``: longest first (ties in index
    order), each into the first bin it fits in, a new bin when none has room. Every length must be at most
    ``width``."""
    bins: list[list[int]] = []
    used: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: -lengths[k]):
        fit = next((b for b, u in enumerate(used) if u + lengths[i] <= width), None)
        if fit is None:
            bins.append([i])
            used.append(lengths[i])
        else:
            bins[fit].append(i)
            used[fit] += lengths[i]
    return bins


def pack(
    sequences: Tensor, prompt_lens: Tensor, response_lens: Tensor, prompt_width: int, pad_id: int = 0
) -> PackedChunk:
    """Pack the rows of an experience chunk: ``sequences`` [B, P + R] (prompts left-padded to end at column
    ``prompt_width`` = P, responses right-padded), ``prompt_lens`` and ``response_lens`` [B] its rows' real token
    counts (on the host: the layout needs no device synchronisation). Rows as wide as the longest sequence."""
    b, total_width = sequences.shape
    r = total_width - prompt_width
    p_lens, r_lens = prompt_lens.cpu().long(), response_lens.cpu().long()
    lens = p_lens + r_lens
    width = max(int(lens.max()) if b else 0, 1)
    bins = first_fit_decreasing(lens.tolist(), width)
    n = max(len(bins), 1)
    # where each sequence starts in the flattened [N * W] packed rows
    start = torch.zeros(b, dtype=torch.long)
    used = torch.zeros(n, dtype=torch.long)
    for row, members in enumerate(bins):
        offset = 0
        for i in members:
            start[i] = row * width + offset
            offset += int(lens[i])
        used[row] = offset
    # every real token: its sequence, its place in it, where it is in `sequences` and where it goes
    seq_of = torch.repeat_interleave(torch.arange(b), lens)
    within = torch.arange(int(lens.sum())) - torch.repeat_interleave(lens.cumsum(0) - lens, lens)
    src = seq_of * total_width + (prompt_width - p_lens)[seq_of] + within
    dst = start[seq_of] + within
    column = torch.arange(width).expand(n, width)
    position_ids = (
        column - used.unsqueeze(1)
    ).flatten()  # trailing padding: 0, 1, ... after the last sequence
    position_ids[dst] = within
    # response token j is predicted (and valued) at the sequence's token p - 1 + j; past the sequence: its last
    last = (lens - 1).clamp(min=0)
    j = torch.arange(r).expand(b, r)
    at = torch.minimum(p_lens.unsqueeze(1) - 1 + j, last.unsqueeze(1)).clamp(min=0)
    response_index = (start.unsqueeze(1) + at).clamp(max=n * width - 1)
    token_row, token_column = real_response_tokens(r_lens, r)
    target = token_row * r + token_column
    device = sequences.device
    input_ids = torch.full((n * width,), pad_id, dtype=sequences.dtype, device=device)
    input_ids[dst.to(device)] = sequences.flatten()[src.to(device)]
    return PackedChunk(
        input_ids=input_ids.view(n, width),
        position_ids=position_ids.view(n, width).to(device),
        response_index=response_index.to(device),
        response_positions=ResponsePositions(
            response_index.flatten()[target].to(device), target.to(device), b, r
        ),
    )
