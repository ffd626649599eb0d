"""Padding, collators for the trainers, token-balanced dynamic batching (paper section 4.2), and the sharding of
batches across data-parallel ranks (every index order a trainer draws from).

Padding sides: training batches (SFT, reward model) are padded on the **right**, so that the position ids a
causal LM assumes by default (0, 1, 2, ...) are those of the real tokens; prompts for generation are padded on
the **left**, so that every row's next token is at the last position.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from ppomax.errors import ConfigError

from .tokenize import IGNORE_INDEX

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def pad_id_of(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id to pad with: the tokenizer's pad token, else its EOS (masks make the choice invisible)."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    raise ValueError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token")


def _pad(
    seqs: Sequence[Sequence[int]], value: int, left: bool, dtype: torch.dtype = torch.long
) -> torch.Tensor:
    width = max((len(s) for s in seqs), default=0)
    out = torch.full((len(seqs), width), value, dtype=dtype)
    for i, s in enumerate(seqs):
        if len(s):
            row = torch.as_tensor(list(s), dtype=dtype)
            if left:
                out[i, width - len(s) :] = row
            else:
                out[i, : len(s)] = row
    return out


def pad_left(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, both ``(B, max_len)`` long tensors, padding on the left."""
    return _pad(seqs, pad_id, left=True), _pad([[1] * len(s) for s in seqs], 0, left=True)


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, both ``(B, max_len)`` long tensors, padding on the right."""
    return _pad(seqs, pad_id, left=False), _pad([[1] * len(s) for s in seqs], 0, left=False)


def feature_length(feature: dict[str, Any] | Sequence[int]) -> int:
    """The length to balance batches on: ``prompt + longer response`` for a pair (each of the pair's two rows
    is padded to the batch's longest), ``input_ids`` for an SFT example or prompt, ``len`` of an id list."""
    if isinstance(feature, dict):
        if "prompt_ids" in feature:
            return len(feature["prompt_ids"]) + max(len(feature["chosen_ids"]), len(feature["rejected_ids"]))
        return len(feature["input_ids"])
    return len(feature)


class PreferenceCollator:
    """Batches :func:`~ppomax.data.tokenize.tokenize_pair` outputs for the reward model (paper eq. 2).

    For ``B`` pairs the batch has ``2B`` rows: rows ``0..B-1`` are ``prompt + chosen``, rows ``B..2B-1`` are
    ``prompt + rejected`` (same pair order), right-padded. Returned tensors, all ``(2B, T)``:

    * ``input_ids``, ``attention_mask`` (the reward is read at each row's last real token,
      :func:`ppomax.algos.last_token_index`)
    * ``lm_mask`` (bool): the chosen response tokens only, EOS included (rejected rows all False): the tokens of
      the ``beta_rm * LM_NLL(y_w | x)`` term. Masks mark *target* tokens; the logit that predicts token ``t`` is
      at ``t - 1``.
    * ``num_pairs``: ``B`` (int)
    """

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        rows: list[list[int]] = []
        masks: list[list[int]] = []
        for side in ("chosen", "rejected"):
            for f in features:
                rows.append([*f["prompt_ids"], *f[f"{side}_ids"]])
                masks.append([0] * len(f["prompt_ids"]) + [1] * len(f[f"{side}_ids"]))
        input_ids, attention_mask = pad_right(rows, self.pad_id)
        n = len(features)
        lm_mask = _pad(masks, 0, left=False).bool()
        lm_mask[n:] = False
        return {"input_ids": input_ids, "attention_mask": attention_mask, "lm_mask": lm_mask, "num_pairs": n}


class SFTCollator:
    """Batches :func:`~ppomax.data.tokenize.tokenize_sft` outputs: ``input_ids``, ``attention_mask`` and
    ``labels`` (``-100`` on prompt, non-assistant and pad tokens), all ``(B, T)``, right-padded."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        input_ids, attention_mask = pad_right([f["input_ids"] for f in features], self.pad_id)
        labels = _pad([f["labels"] for f in features], IGNORE_INDEX, left=False)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class PromptCollator:
    """Left-padded prompts for generation. Features are id lists or dicts with ``input_ids`` (other keys are
    passed through as lists, e.g. ``prompt`` text or ``meta``). Returns ``input_ids`` and ``attention_mask``
    ``(B, T)``, plus the passed-through keys."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, features: Sequence[Any]) -> dict[str, Any]:
        if features and isinstance(features[0], dict):
            seqs = [f["input_ids"] for f in features]
            extra = {k: [f.get(k) for f in features] for k in features[0] if k != "input_ids"}
        else:
            seqs, extra = list(features), {}
        input_ids, attention_mask = pad_left(seqs, self.pad_id)
        return {"input_ids": input_ids, "attention_mask": attention_mask, **extra}


def token_balanced_batches(
    lengths: Sequence[int],
    max_tokens: int,
    shuffle: bool = True,
    seed: int = 0,
    *,
    max_batch_size: int | None = None,
    pool_size: int | None = None,
) -> list[list[int]]:
    """Group indices into batches whose padded size ``max(length) * len(batch)`` stays ``<= max_tokens``.

    The paper's dynamic batching (section 4.2) for the reward model: the number of sequences per batch follows
    the number of tokens (their bounds were 4 to 128 sequences). Indices are sorted by length (ties and, with
    ``pool_size``, pools of that many shuffled indices keep it random) and filled greedily; with ``shuffle`` the
    order of the batches is shuffled too. Every index appears exactly once. An example longer than
    ``max_tokens`` gets a batch of its own (the only case where a batch exceeds the budget). No minimum batch size
    is enforced: the budget decides. ``max_batch_size`` caps the sequences per batch.

    For preference pairs pass the longer of the two sequences as the length and half the token budget, since a
    ``PreferenceCollator`` batch of ``n`` pairs has ``2n`` rows.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    if max_batch_size is not None and max_batch_size < 1:
        raise ValueError(f"max_batch_size must be positive, got {max_batch_size}")
    if any(n < 0 for n in lengths):
        raise ValueError("lengths must be non-negative")
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    if shuffle:
        rng.shuffle(order)
    pools = [order] if not pool_size else [order[i : i + pool_size] for i in range(0, len(order), pool_size)]
    batches: list[list[int]] = []
    for pool in pools:
        pool = sorted(pool, key=lambda i: lengths[i])  # stable: ties keep the shuffled order
        batch: list[int] = []
        longest = 0
        for i in pool:
            grown = max(longest, lengths[i])
            full = max_batch_size is not None and len(batch) >= max_batch_size
            if batch and (full or grown * (len(batch) + 1) > max_tokens):
                batches.append(batch)
                batch, grown = [], lengths[i]
            batch.append(i)
            longest = grown
        if batch:
            batches.append(batch)
    if shuffle:
        rng.shuffle(batches)
    return batches


# --------------------------------------------------------------------------- sharding across ranks
#
# Data-parallel ranks never exchange indices: every rank builds the same global batches from the seed, and
# rank_share decides what each rank takes of one (the one sharding rule: training batches, PPO prompts, the
# evaluation splits). What forms the global batches differs between the trainers, and each keeps the stream it has
# always had on one process (a resumed run, and every single-process result made so far, depend on those exact
# indices), so they are two orders, not one:
#
# * global_batches (SFT, reward model): epochs of steps, reshuffled with Python's ``random.Random(seed + epoch)``
#   (fixed-size batches) or grouped by token_balanced_batches (a global batch is then ``world`` micro-batches of
#   different sizes); no step spans two epochs, so an epoch's last step may be short; the resume position is the
#   number of micro-batches already seen (the trainer re-derives the epoch's steps and skips them).
# * IndexStream (PPO prompts and PPO-ptx examples): an endless walk over ``torch.randperm`` permutations seeded
#   ``seed + epoch``; every global batch is full (a rollout batch has a fixed size), so one may span two epochs;
#   the resume position is ``(epoch, pos)``.
#
# Making either order the other's would change which examples one process sees at which step (another RNG's
# permutation; an epoch's short last step against a full batch spanning the epoch boundary; no fixed count of
# indices per token-balanced step), i.e. every single-process SFT, RM or PPO run made so far.

T = TypeVar("T")


def rank_share(items: Sequence[T], rank: int, world: int) -> list[T]:
    """Rank ``rank``'s share of one global batch: the items at positions ``rank, rank + world, ...``.

    Every rank gets ``len(items) // world`` or one more (a ragged batch of at least ``world`` items leaves no rank
    empty), the shares together are ``items`` once, and one process (``world == 1``) takes everything in order."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not one of {world} process(es)")
    return list(items[rank::world])


def global_batches(
    lengths: Sequence[int],
    world: int,
    epoch: int,
    seed: int,
    batch_size: int | None = None,
    max_tokens: int | None = None,
    shuffle: bool = True,
) -> list[list[list[int]]]:
    """One epoch as a list of steps; each step is a list of ``world`` index lists (one micro-batch per rank,
    :func:`rank_share` of the step's global batch).

    Fixed size: a seeded shuffle cut into global batches of ``batch_size * world`` (a ragged tail is dropped only
    if it cannot give every rank one example). Token-balanced (``max_tokens``): :func:`token_balanced_batches` per
    rank budget, ``world`` consecutive ones a global batch of micro-batches (step ``s`` gives rank ``r`` batch
    ``s * world + r``), and the last ``len % world`` batches dropped so every rank runs the same steps.
    """
    n = len(lengths)
    if max_tokens is not None:
        batches = token_balanced_batches(lengths, max_tokens, shuffle=shuffle, seed=seed + epoch)
        usable = len(batches) - len(batches) % world
        groups = [batches[i : i + world] for i in range(0, usable, world)]
        return [[rank_share(g, r, world)[0] for r in range(world)] for g in groups]
    if batch_size is None:
        raise ValueError("global_batches needs batch_size or max_tokens")
    order = list(range(n))
    if shuffle:
        random.Random(seed + epoch).shuffle(order)
    per_step = batch_size * world
    chunks = [order[start : start + per_step] for start in range(0, n, per_step)]
    return [[rank_share(c, r, world) for r in range(world)] for c in chunks if len(c) >= world]


class IndexStream:
    """Seeded, epoch-wise shuffled indices ``0..n-1`` with a resumable position.

    Each call to :meth:`take` hands out the next ``k * world`` indices of the global order, a global batch, and
    this rank keeps its :func:`rank_share` of them, so together the ranks consume the global order once. The
    whole state is ``(epoch, pos)`` (:meth:`state_dict`). A state saved with another ``n`` (the data changed) is
    refused unless ``resizable``.
    """

    def __init__(self, n: int, seed: int, *, rank: int = 0, world: int = 1, resizable: bool = False) -> None:
        if n <= 0:
            raise ConfigError("no examples to draw from")
        self.n = n
        self.resizable = resizable
        self.seed = seed
        self.rank = rank
        self.world = world
        self.epoch = 0
        self.pos = 0
        self._order = self._perm(0)

    def _perm(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def take(self, k: int) -> list[int]:
        """This rank's ``k`` indices of the next global batch of ``k * world``."""
        out: list[int] = []
        need = k * self.world
        while len(out) < need:
            if self.pos >= self.n:
                self.epoch += 1
                self.pos = 0
                self._order = self._perm(self.epoch)
            grab = min(need - len(out), self.n - self.pos)
            out.extend(self._order[self.pos : self.pos + grab])
            self.pos += grab
        return rank_share(out, self.rank, self.world)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos, "n": self.n}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if int(state["n"]) != self.n and not self.resizable:
            raise ConfigError(
                f"the checkpoint was taken with {state['n']} examples in this stream, the data now has {self.n}; "
                "resume with the same data files"
            )
        self.epoch = int(state["epoch"])
        self.pos = min(
            int(state["pos"]), self.n
        )  # on data of another size: the same epoch, as far as it goes
        self._order = self._perm(self.epoch)
