"""Step 2 of the PPO iteration, the scoring pass: on each rollout batch, without gradient, the policy's old
log-probs and entropy, the reference's log-probs (and the exact KL between the two), the critic's values and the
reward sources' raw scores (:func:`score_experience`), each computed once per iteration and reused by every epoch.

:class:`Rollouts` holds what generation (:mod:`ppomax.ppo.rollout`) and the scoring pass run on: the unwrapped
models, the rollout engine, the reward sources (:mod:`ppomax.ppo.reward_sources`); evaluation
(:mod:`ppomax.ppo.evaluation`) uses it too.

``generation.logprobs_from``: ``sampling`` (default) takes the log-probs of the ratio, the KL penalty and the
entropy from ``logits / temperature``, the distribution the tokens were drawn from, so the first ratio of an
iteration is exactly 1 and the KL compares the two distributions actually in play (the reference is scaled
the same way). Top-p/top-k truncation and the repetition penalty are *not* applied: they are sampling-time
heuristics whose truncated distributions have no gradient outside the nucleus. ``raw`` uses temperature-1
logits (the model's own distribution), as some implementations do. Perplexities are always from raw logits.
``generate`` is ``sampling`` with the policy's logits taken from the sampling pass itself (KV-cached, its raw
logits before any processor) instead of a second forward: its log-probs, entropy and the exact KL are computed
from them beside the reference's logits of the same rows. The two differ by float rounding only;
``policy/logprob_mismatch_{max,mean}`` log that gap every iteration, free: the update's first minibatch's forward
(before any step) is the recompute. Evaluation (greedy) always recomputes.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from ppomax.models.lm_head import ResponseLogits

from .data import PromptSet
from .experience import Experience
from .models import Forward
from .reward_sources import RewardError, RewardSources
from .rollout import RolloutEngine, rollout

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ppomax.models import AdaptersOff, ValueHeadModel
    from ppomax.models.adapter_dir import CausalLM


@torch.no_grad()
def score_experience(
    exp: Experience,
    *,
    policy: torch.nn.Module | None,
    reference: torch.nn.Module | AdaptersOff | None,
    critic: ValueHeadModel | None,
    fwd: Forward,
    rewards: RewardSources,
    eos_ids: list[int],
    chunk_size: int | None = None,
) -> None:
    """Fill the scoring-pass fields of ``exp`` in place (see :class:`Experience`). ``critic=None`` skips values
    (evaluation), ``policy=None`` the policy's forward and ``reference=None`` the reference's. The policy's logits
    are ``exp.sampling_logits`` where the rollout kept them (``generation.logprobs_from: generate``; dropped
    here once read), else its forward's. A chunk's policy and reference logits are held together: their
    log-probs, the entropy and the exact KL come from one pass over them (:meth:`Forward.scoring_stats`). Models
    are used as given (pass unwrapped ones: no gradient, no DDP synchronisation).
    ``chunk_size`` rows per forward bound the logits in memory (``ppo.micro_batch_size``); rows of similar length
    share a chunk (:meth:`Experience.micro_batches`), the outputs are stored in ``exp``'s row order."""
    r_all = exp.response_width
    chunks = exp.micro_batches(chunk_size)
    out: dict[str, list[Tensor]] = {}
    for rows in chunks:
        # A chunk (rows of similar length, Experience.micro_batches) drops the columns that are padding in all
        # its rows (Experience.select): position ids come from the mask, so a row's outputs are those of the
        # whole batch (to float rounding); its per-token outputs are padded back to the batch's R with zeros
        # (off the response mask, never read).
        chunk = exp if len(chunks) == 1 else exp.select(rows)
        ref = None if reference is None else fwd.response_logits(reference, chunk)
        logits = _policy_logits(chunk, policy, fwd, ref)
        if logits is not None or ref is not None:
            for name, value in fwd.scoring_stats(logits, ref, chunk.responses_ids).items():
                out.setdefault(name, []).append(value)
        del logits, ref
        if critic is not None:
            out.setdefault("values", []).append(fwd.values(critic, chunk))
    for name, parts in out.items():
        setattr(exp, name, exp.in_row_order(chunks, torch.cat([_pad_right(t, r_all) for t in parts])))
    exp.sampling_logits = None
    exp.scores, exp.score_parts = rewards(exp, eos_ids)


def _policy_logits(
    chunk: Experience, policy: torch.nn.Module | None, fwd: Forward, ref: ResponseLogits | None
) -> ResponseLogits | None:
    """The policy's logits of ``chunk``: the sampling pass's (in ``ref``'s layout: at the real response tokens
    only, where the reference's head ran on those), else ``policy``'s forward, else None."""
    if chunk.sampling_logits is None:
        return None if policy is None else fwd.response_logits(policy, chunk)
    sampled = ResponseLogits(chunk.sampling_logits)
    return sampled if ref is None else sampled.like(ref)


def _pad_right(t: Tensor, width: int) -> Tensor:
    """[B, r] -> [B, width], zeros on the right (the tensor itself when it is that wide already)."""
    return t if t.shape[1] == width else F.pad(t, (0, width - t.shape[1]))


@dataclasses.dataclass
class Rollouts:
    """Generation and the scoring pass of the PPO buffer (and of evaluation), on unwrapped models: no gradient,
    no DDP synchronisation."""

    engine: RolloutEngine
    fwd: Forward
    rewards: RewardSources
    tokenizer: PreTrainedTokenizerBase
    eos_ids: list[int]
    pad_id: int
    device: torch.device
    policy: CausalLM
    reference: torch.nn.Module | AdaptersOff
    """As prepared for inference (:meth:`ppomax.trainers.launch.Engine.prepare_frozen`)."""
    critic: ValueHeadModel | None
    """None without a critic (a critic-free ``ppo.advantage_estimator``)."""
    chunk_size: int | None = None
    """Rows per scoring forward (``ppo.micro_batch_size``): bounds the [rows, R, V] logits in memory."""
    logprobs_from_generate: bool = False
    """``generation.logprobs_from: generate``: sampled rollouts carry the policy's log-probs and entropy from
    the sampling pass's logits, and the scoring pass does not run the policy on them."""

    def generate(self, prompts: PromptSet, indices: list[int], greedy: bool = False) -> Experience:
        """Responses to ``prompts[indices]`` (sampled as ``generation`` says, or greedy)."""
        batch = prompts.batch(indices, self.pad_id, self.device)
        return rollout(
            self.engine,
            self.policy,
            self.tokenizer,
            batch["input_ids"],
            batch["attention_mask"],
            eos_ids=self.eos_ids,
            pad_id=self.pad_id,
            prompts=batch["prompts"],
            meta=batch["meta"],
            greedy=greedy,
            # evaluation (greedy) recomputes: its KL and perplexity stay comparable across settings
            keep_logits=self.logprobs_from_generate and not greedy,
        )

    def score(
        self, exp: Experience, step: int | None = None, *, critic: bool = True, forwards: bool = True
    ) -> None:
        """The scoring pass (:func:`score_experience`): policy (unless ``exp`` has its logits from the sampling
        pass), reference, critic (``critic=False``: no values, as evaluation needs none) and reward sources.
        ``forwards=False``: no model runs (the fused update scores the rows), only the reward sources and what
        the sampling pass's logits give. A reward function's error names the iteration ``step``."""
        with _naming_step(step):
            score_experience(
                exp,
                policy=self.policy if forwards and exp.sampling_logits is None else None,
                reference=self.reference if forwards else None,
                critic=self.critic if critic and forwards else None,
                fwd=self.fwd,
                rewards=self.rewards,
                eos_ids=self.eos_ids,
                chunk_size=self.chunk_size,
            )


@contextlib.contextmanager
def _naming_step(step: int | None) -> Iterator[None]:
    """A reward function's error (:class:`RewardError`) raised again with the iteration ``step`` in front."""
    try:
        yield
    except RewardError as exc:
        if step is None:
            raise
        raise RewardError(f"step {step}: {exc}") from exc.__cause__
