"""Responses scored under a model: per-token log-probabilities, entropy and the exact KL to a reference over the
vocabulary (:func:`token_logits_stats`), and a value-head reward model's score at each response's last token
(:func:`reward_model_scores`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ppomax.algos import kl_from_logits, logprobs_from_logits

if TYPE_CHECKING:
    from ppomax.models import ValueHeadModel
    from ppomax.models.adapter_dir import CausalLM


def _right_padded(prompt_ids: Sequence[list[int]], response_ids: Sequence[list[int]], pad_id: int):
    from ppomax.data import pad_right

    seqs = [p + r for p, r in zip(prompt_ids, response_ids, strict=True)]
    return pad_right(seqs, pad_id)


@dataclass
class TokenStats:
    """Per response token of one model's responses, right-padded to the longest: [N, R] CPU tensors.

    ``mask`` marks the response tokens (EOS included); ``logp`` is the log-prob of each sampled token under the
    model (raw logits); with a reference model, ``ref_logp`` is the same under the reference and ``kl`` the exact
    KL(model || reference) over the vocabulary at that position. Off the mask all three are 0."""

    mask: torch.Tensor
    logp: torch.Tensor
    ref_logp: torch.Tensor | None = None
    kl: torch.Tensor | None = None


def _response_positions(
    prompt_ids: Sequence[list[int]], response_ids: Sequence[list[int]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pos, mask)`` [B, R]: the position of the logits that predict response token j of row i in the
    right-padded ``prompt + response`` rows (``len(prompt_i) - 1 + j``), and whether that token exists."""
    width = max((len(r) for r in response_ids), default=0)
    j = torch.arange(width, device=device)
    starts = torch.tensor([len(p) - 1 for p in prompt_ids], device=device)
    ends = torch.tensor([len(r) for r in response_ids], device=device)
    mask = j[None, :] < ends[:, None]
    pos = torch.where(mask, starts[:, None] + j[None, :], 0)
    return pos, mask


def _at(logits: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    return logits.gather(1, pos[..., None].expand(-1, -1, logits.shape[-1]))


@torch.no_grad()
def token_logits_stats(
    model: CausalLM,
    prompt_ids: Sequence[list[int]],
    response_ids: Sequence[list[int]],
    *,
    pad_id: int,
    ref_model: CausalLM | None = None,
    batch_size: int = 32,
) -> TokenStats:
    """The :class:`TokenStats` of ``model`` (and, with ``ref_model``, against it) on the given responses: the
    log-probs are :func:`ppomax.algos.logprobs_from_logits`, the KL :func:`ppomax.algos.kl_from_logits`."""
    model.eval()
    if ref_model is not None:
        ref_model.eval()
    device = next(model.parameters()).device
    from ppomax.data import pad_right

    width = max((len(r) for r in response_ids), default=0)
    parts: dict[str, list[torch.Tensor]] = {"mask": [], "logp": [], "ref_logp": [], "kl": []}
    for start in range(0, len(prompt_ids), batch_size):
        p_chunk = list(prompt_ids[start : start + batch_size])
        r_chunk = list(response_ids[start : start + batch_size])
        input_ids, attention_mask = _right_padded(p_chunk, r_chunk, pad_id)
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        pos, mask = _response_positions(p_chunk, r_chunk, device)
        labels = pad_right(r_chunk, 0)[0].to(device)
        logits = _at(model(input_ids=input_ids, attention_mask=attention_mask).logits, pos)
        got = {"logp": logprobs_from_logits(logits, labels)}
        if ref_model is not None:
            ref = _at(ref_model(input_ids=input_ids, attention_mask=attention_mask).logits, pos)
            got["ref_logp"] = logprobs_from_logits(ref, labels)
            got["kl"] = kl_from_logits(logits, ref)
        got = {k: torch.where(mask, v, 0.0) for k, v in got.items()}
        # every batch padded to the longest response of all, so that the batches stack
        for key, value in {"mask": mask, **got}.items():
            parts[key].append(torch.nn.functional.pad(value, (0, width - value.shape[1])).cpu())
    if not parts["mask"]:
        return TokenStats(torch.zeros(0, 0, dtype=torch.bool), torch.zeros(0, 0))
    out = {k: torch.cat(v) for k, v in parts.items() if v}
    return TokenStats(out["mask"], out["logp"], out.get("ref_logp"), out.get("kl"))


@torch.no_grad()
def reward_model_scores(
    reward_model: ValueHeadModel,
    prompt_ids: Sequence[list[int]],
    response_ids: Sequence[list[int]],
    *,
    pad_id: int,
    batch_size: int = 32,
) -> list[float]:
    """Scalar reward of each prompt+response at its last token (paper eq. 2): ``ValueHeadModel.score``."""
    reward_model.eval()
    device = next(reward_model.parameters()).device
    scores: list[float] = []
    for start in range(0, len(prompt_ids), batch_size):
        input_ids, attention_mask = _right_padded(
            prompt_ids[start : start + batch_size], response_ids[start : start + batch_size], pad_id
        )
        scores.extend(reward_model.score(input_ids.to(device), attention_mask.to(device)).tolist())
    return [float(s) for s in scores]
