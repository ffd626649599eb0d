"""The PPO experience buffer: one :class:`Experience` holds a batch of rollouts and what was computed on them
(filled by the rollout, the scoring pass and the advantages; read by the update).

Layout: a row is ``[prompt, left-padded | response, right-padded]``. Every prompt of a batch
ends at column ``P = prompt_width`` and every response starts there, so per-token quantities are stored only for
the ``R`` response columns: response token ``j`` is ``sequences[:, P + j]``; its log-prob comes from the logits at
column ``P + j - 1`` and its value ``V(s_j)`` from the critic's hidden state at the same column (the state before
the token is emitted). Tokens after a row's first EOS are padding and are masked out.

Batches with different ``P`` and ``R`` are merged by :meth:`Experience.cat` (re-padding prompts on the left and
responses on the right); :meth:`Experience.select` takes rows and trims columns that are padding in every row, so
a minibatch is never wider than its longest prompt plus its longest response, and
:meth:`Experience.micro_batches` puts rows of similar length into the same chunk, so a chunk's forward is not much
wider than its own rows either. Row lengths are kept on the host (``prompt_lens``, ``response_lens``) so trimming
needs no device synchronisation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

TokenField = Literal[
    "logprobs",
    "ref_logprobs",
    "values",
    "kl",
    "rewards",
    "advantages",
    "returns",
    "entropy",
    "raw_logprobs",
    "ref_raw_logprobs",
    "exact_kl",
]
RowField = Literal["scores", "final_scores"]
# Optional per-token fields ([B, R], response columns) and per-row fields ([B]) that cat/select handle.
_TOKEN_FIELDS: tuple[str, ...] = get_args(TokenField)
_ROW_FIELDS: tuple[str, ...] = get_args(RowField)


@dataclass
class Experience:
    """A batch of rollouts. ``B`` rows, ``P`` prompt columns, ``R`` response columns (see the module docstring).

    Filled in three stages: the rollout (``sequences`` .. ``truncated``), the scoring pass (``logprobs`` ..
    ``scores``), and the advantage computation (``kl`` .. ``returns``). Fields not yet computed are None.
    """

    sequences: Tensor
    """[B, P+R] long: prompt (left-padded) then response (right-padded with the pad id after the first EOS)."""
    attention_mask: Tensor
    """[B, P+R] long: 1 on real prompt tokens and on response tokens up to and including the first EOS."""
    response_mask: Tensor
    """[B, R] bool: response token j of a row is real (generated, not after EOS). EOS itself is included."""
    prompt_width: int
    """P: the column where every response starts."""
    prompt_lens: Tensor
    """[B] long, on the CPU: real prompt tokens per row."""
    response_lens: Tensor
    """[B] long, on the CPU: real response tokens per row (EOS included)."""
    truncated: Tensor
    """[B] bool: the response hit max_new_tokens without EOS."""
    prompts: list[str] = field(default_factory=list)
    """B prompt texts."""
    responses: list[str] = field(default_factory=list)
    """B decoded response texts (special tokens skipped)."""
    meta: list[dict[str, Any]] = field(default_factory=list)
    """B metadata dicts of the prompts (passed to reward functions that ask for them)."""

    sampling_logits: Tensor | None = None
    """[B, R, V] float32: the sampling pass's raw logits at the response positions (``generation.logprobs_from:
    generate``), until the scoring pass reads the policy's fields from them (then None: the largest tensor of a
    rollout is not kept)."""

    # --- scoring pass (no gradient)
    logprobs: Tensor | None = None
    """[B, R] float32: log pi_old(y_j) under the sampling policy, from the logits ``generation.logprobs_from``
    names (temperature-scaled by default); the "old" policy of the PPO ratio."""
    ref_logprobs: Tensor | None = None
    """[B, R] float32: log pi_ref(y_j), same logits convention as ``logprobs`` (the KL penalty compares like
    with like)."""
    raw_logprobs: Tensor | None = None
    """[B, R] float32: policy log-probs from raw logits (perplexity); the same tensor as ``logprobs`` when those
    are raw already."""
    ref_raw_logprobs: Tensor | None = None
    """[B, R] float32: reference log-probs from raw logits (reference perplexity on the same responses)."""
    entropy: Tensor | None = None
    """[B, R] float32: entropy of the policy's distribution at each response position (monitoring)."""
    exact_kl: Tensor | None = None
    """[B, R] float32: the exact KL(pi_old || pi_ref) over the vocabulary at each response position, from the
    policy's and the reference's logits (the convention of ``logprobs``)."""
    values: Tensor | None = None
    """[B, R] float32: critic values V(s_j) at rollout time (the "old" values of the clipped value loss)."""
    scores: Tensor | None = None
    """[B] float32: the raw reward of each response (weighted sum of the reward sources, before
    re-parameterisation)."""
    score_parts: dict[str, Tensor] = field(default_factory=dict)
    """name -> [B] raw score of each reward source (unweighted), for monitoring."""

    # --- advantages (no gradient)
    final_scores: Tensor | None = None
    """[B] float32: the score actually added at the last token (after scaling / normalisation / clipping and the
    truncation penalty)."""
    kl: Tensor | None = None
    """[B, R] float32: per-token KL(pi_old || pi_ref) estimate (``ppo.kl.estimator``)."""
    rewards: Tensor | None = None
    """[B, R] float32: token-level rewards ``-kl_coef * kl`` (no KL term with ``ppo.kl.acts_in: loss``) plus the final
    score at the last response token."""
    advantages: Tensor | None = None
    """[B, R] float32: GAE advantages, or those of the critic-free ``ppo.advantage_estimator`` (not normalised by
    ``advantage_norm``; minibatch normalisation happens in the update)."""
    returns: Tensor | None = None
    """[B, R] float32: advantages + values, the critic's targets; without a critic the reward-to-go."""

    # ------------------------------------------------------------------ shape helpers

    @property
    def batch_size(self) -> int:
        return int(self.sequences.shape[0])

    @property
    def response_width(self) -> int:
        return int(self.response_mask.shape[1])

    @property
    def responses_ids(self) -> Tensor:
        """[B, R] long: the response columns of ``sequences``."""
        return self.sequences[:, self.prompt_width :]

    # ------------------------------------------------------------------ merging and slicing

    def micro_batches(self, size: int | None) -> list[list[int]]:
        """The rows split into forwards of at most ``size`` rows (None: one of all rows), rows of similar length
        together: sorted by prompt + response length, then cut into consecutive runs of ``size``.

        A forward over :meth:`select`'s rows is as wide as their longest prompt plus their longest response, so
        one long row among consecutive rows of a shuffled batch would make every row of its chunk pay its width;
        grouping by length keeps each chunk close to its own rows' lengths. The chunks' sizes are those of
        consecutive runs (only which rows share a chunk changes), so a sum over chunks is unchanged.
        """
        n = self.batch_size
        if size is None or size >= n:
            return [list(range(n))]
        order = torch.argsort(self.prompt_lens + self.response_lens, stable=True).tolist()
        return [order[lo : lo + size] for lo in range(0, n, size)]

    def in_row_order(self, chunks: list[list[int]], outputs: Tensor) -> Tensor:
        """Per-row ``outputs`` of :meth:`micro_batches`' ``chunks``, concatenated chunk after chunk, put back in
        this batch's row order."""
        if len(chunks) == 1:  # one chunk is every row in order
            return outputs
        order = torch.tensor([i for rows in chunks for i in rows])
        return outputs[torch.argsort(order).to(outputs.device)]

    def select(self, index: Tensor | list[int]) -> Experience:
        """Rows ``index`` (a list or a CPU long tensor), trimmed to their longest prompt and response.

        Only padding columns are dropped (those left of every selected prompt, right of every selected
        response), so the result is the same batch with less waste.
        """
        idx = torch.as_tensor(index, dtype=torch.long)
        p_new = int(self.prompt_lens[idx].max()) if len(idx) else 0
        r_new = int(self.response_lens[idx].max()) if len(idx) else 0
        lo = self.prompt_width - p_new
        dev_idx = idx.to(self.sequences.device)
        out = dataclasses.replace(
            self,
            sequences=self.sequences[dev_idx, lo : self.prompt_width + r_new],
            attention_mask=self.attention_mask[dev_idx, lo : self.prompt_width + r_new],
            response_mask=self.response_mask[dev_idx, :r_new],
            prompt_width=p_new,
            prompt_lens=self.prompt_lens[idx],
            response_lens=self.response_lens[idx],
            truncated=self.truncated[dev_idx],
            prompts=[self.prompts[i] for i in idx.tolist()] if self.prompts else [],
            responses=[self.responses[i] for i in idx.tolist()] if self.responses else [],
            meta=[self.meta[i] for i in idx.tolist()] if self.meta else [],
            score_parts={k: v[dev_idx] for k, v in self.score_parts.items()},
            sampling_logits=None if self.sampling_logits is None else self.sampling_logits[dev_idx, :r_new],
        )
        for name in _TOKEN_FIELDS:
            v = getattr(self, name)
            if v is not None:
                setattr(out, name, v[dev_idx, :r_new])
        for name in _ROW_FIELDS:
            v = getattr(self, name)
            if v is not None:
                setattr(out, name, v[dev_idx])
        return out

    @staticmethod
    def cat(batches: list[Experience], pad_id: int) -> Experience:
        """Merge batches row-wise: prompts re-padded on the left to the widest P, responses on the right to the
        widest R. A field must be set in all batches or in none."""
        if len(batches) == 1:
            return batches[0]
        p = max(b.prompt_width for b in batches)
        r = max(b.response_width for b in batches)

        def pad2(t: Tensor, left: int, right: int, value: float | int | bool) -> Tensor:
            if left == 0 and right == 0:
                return t
            return torch.nn.functional.pad(t, (left, right), value=value)

        def tokens(name: str) -> Tensor | None:
            vals = [getattr(b, name) for b in batches]
            if all(v is None for v in vals):
                return None
            if any(v is None for v in vals):
                raise ValueError(f"Experience.cat: field {name!r} is set in some batches only")
            return torch.cat(
                [pad2(v, 0, r - b.response_width, 0) for v, b in zip(vals, batches, strict=True)]
            )

        def sampled() -> Tensor | None:
            vals = [b.sampling_logits for b in batches if b.sampling_logits is not None]
            if not vals:
                return None
            if len(vals) < len(batches):
                raise ValueError("Experience.cat: field 'sampling_logits' is set in some batches only")
            return torch.cat(
                [F.pad(v, (0, 0, 0, r - b.response_width)) for v, b in zip(vals, batches, strict=True)]
            )

        def rows(name: str) -> Tensor | None:
            vals = [getattr(b, name) for b in batches]
            if all(v is None for v in vals):
                return None
            return torch.cat(vals)

        out = Experience(
            sequences=torch.cat(
                [pad2(b.sequences, p - b.prompt_width, r - b.response_width, pad_id) for b in batches]
            ),
            attention_mask=torch.cat(
                [pad2(b.attention_mask, p - b.prompt_width, r - b.response_width, 0) for b in batches]
            ),
            response_mask=torch.cat([pad2(b.response_mask, 0, r - b.response_width, False) for b in batches]),
            prompt_width=p,
            prompt_lens=torch.cat([b.prompt_lens for b in batches]),
            response_lens=torch.cat([b.response_lens for b in batches]),
            truncated=torch.cat([b.truncated for b in batches]),
            prompts=[s for b in batches for s in b.prompts],
            responses=[s for b in batches for s in b.responses],
            meta=[m for b in batches for m in b.meta],
            sampling_logits=sampled(),
        )
        for name in _TOKEN_FIELDS:
            setattr(out, name, tokens(name))
        for name in _ROW_FIELDS:
            setattr(out, name, rows(name))
        keys = batches[0].score_parts.keys()
        out.score_parts = {k: torch.cat([b.score_parts[k] for b in batches]) for k in keys}
        return out

    def computed(self, name: TokenField | RowField) -> Tensor:
        """Field ``name`` of a stage that has run (the scoring pass, the advantages); an error naming it when the
        stage has not filled it yet."""
        value: Tensor | None = getattr(self, name)
        if value is None:
            raise ValueError(f"Experience.{name}: read before the stage that computes it ran")
        return value
