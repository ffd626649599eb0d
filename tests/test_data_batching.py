"""Padding, collators' masks, token-balanced dynamic batching (paper section 4.2) and the sharding of batches
across ranks."""

from __future__ import annotations

import random

import pytest
import torch

from ppomax.algos import last_token_index
from ppomax.data import (
    IGNORE_INDEX,
    IndexStream,
    PreferenceCollator,
    PromptCollator,
    SFTCollator,
    feature_length,
    global_batches,
    pad_id_of,
    pad_left,
    pad_right,
    rank_share,
    token_balanced_batches,
)
from ppomax.errors import ConfigError
from ppomax.trainers.common import eval_shards


def test_pad_left_and_right() -> None:
    ids, mask = pad_left([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert ids.dtype == torch.long and mask.dtype == torch.long
    ids, mask = pad_right([[5, 6, 7], [8]], pad_id=9)
    assert ids.tolist() == [[5, 6, 7], [8, 9, 9]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_pad_id_of() -> None:
    class T:
        pad_token_id = None
        eos_token_id = 7

    assert pad_id_of(T()) == 7
    T.eos_token_id = None
    with pytest.raises(ValueError, match="neither a pad nor an EOS"):
        pad_id_of(T())


def test_preference_collator_rows_and_masks() -> None:
    feats = [
        {"prompt_ids": [1, 2], "chosen_ids": [3, 4, 99], "rejected_ids": [5]},
        {"prompt_ids": [6], "chosen_ids": [7], "rejected_ids": [8, 9, 10, 99]},
    ]
    b = PreferenceCollator(pad_id=0)(feats)
    assert b["num_pairs"] == 2
    assert b["input_ids"].tolist() == [
        [1, 2, 3, 4, 99],  # chosen of pair 0
        [6, 7, 0, 0, 0],  # chosen of pair 1
        [1, 2, 5, 0, 0],  # rejected of pair 0
        [6, 8, 9, 10, 99],  # rejected of pair 1
    ]
    assert b["attention_mask"].tolist() == [[1] * 5, [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1] * 5]
    assert b["lm_mask"].tolist() == [
        [False, False, True, True, True],
        [False, True, False, False, False],
        [False] * 5,
        [False] * 5,
    ]
    assert set(b) == {"input_ids", "attention_mask", "lm_mask", "num_pairs"}
    # the reward is read at each row's last real token
    last = last_token_index(b["attention_mask"])
    assert b["input_ids"].gather(1, last[:, None]).squeeze(1).tolist() == [99, 7, 5, 99]


def test_feature_length() -> None:
    assert feature_length({"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5, 6]}) == 5
    assert feature_length({"input_ids": [1, 2, 3], "labels": [1, 2, 3]}) == 3
    assert feature_length([1, 2]) == 2


def test_sft_collator_labels() -> None:
    feats = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4], "labels": [4]}]
    b = SFTCollator(pad_id=0)(feats)
    assert b["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[IGNORE_INDEX, 2, 3], [4, IGNORE_INDEX, IGNORE_INDEX]]


def test_prompt_collator_left_pads_and_passes_extras() -> None:
    b = PromptCollator(pad_id=0)([{"input_ids": [1, 2, 3], "prompt": "a"}, {"input_ids": [4], "prompt": "b"}])
    assert b["input_ids"].tolist() == [[1, 2, 3], [0, 0, 4]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert b["prompt"] == ["a", "b"]
    assert PromptCollator(pad_id=0)([[1], [2, 3]])["input_ids"].tolist() == [[0, 1], [2, 3]]


def check_batches(
    batches: list[list[int]], lengths: list[int], max_tokens: int, max_batch_size: int | None = None
) -> None:
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(len(lengths)))  # every index exactly once
    for b in batches:
        assert b
        padded = max(lengths[i] for i in b) * len(b)
        if len(b) > 1:
            assert padded <= max_tokens
        else:
            assert lengths[b[0]] > 0
        if max_batch_size is not None:
            assert len(b) <= max_batch_size


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("pool_size", [None, 37])
def test_token_balanced_batches_invariants(seed: int, shuffle: bool, pool_size: int | None) -> None:
    rng = random.Random(seed)
    lengths = [rng.randint(1, 300) for _ in range(rng.randint(1, 400))]
    lengths += [2000]  # longer than the budget: gets a batch of its own
    batches = token_balanced_batches(lengths, 1024, shuffle, seed, pool_size=pool_size)
    check_batches(batches, lengths, 1024)
    over = [b for b in batches if max(lengths[i] for i in b) * len(b) > 1024]
    assert over == [[len(lengths) - 1]]
    capped = token_balanced_batches(lengths, 1024, shuffle, seed, max_batch_size=4, pool_size=pool_size)
    check_batches(capped, lengths, 1024, max_batch_size=4)


def test_token_balanced_batches_are_tight_and_deterministic() -> None:
    # sorted greedy packing: 8 x 100 tokens then 2 x 400 under a 800-token budget
    lengths = [100] * 8 + [400] * 2
    batches = token_balanced_batches(lengths, 800, shuffle=False)
    assert batches == [list(range(8)), [8, 9]]
    # the number of sequences per batch follows their length (the paper's dynamic batch size)
    rng = random.Random(0)
    lengths = [rng.randint(10, 500) for _ in range(1000)]
    batches = token_balanced_batches(lengths, 4096, shuffle=True, seed=3)
    assert batches == token_balanced_batches(lengths, 4096, shuffle=True, seed=3)
    assert batches != token_balanced_batches(lengths, 4096, shuffle=True, seed=4)
    sizes = {len(b) for b in batches}
    # long sequences: few per batch; short ones: many
    assert min(sizes) <= 4096 // 450 and max(sizes) >= 4096 // 60
    waste = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)
    assert waste / sum(lengths) < 0.05  # sorting keeps padding small


def test_token_balanced_batches_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="max_tokens must be positive"):
        token_balanced_batches([1], 0)
    with pytest.raises(ValueError, match="non-negative"):
        token_balanced_batches([-1], 10)
    assert token_balanced_batches([], 10) == []


# ---------------------------------------------------------------------------------------------------------
# sharding across ranks: global_batches (SFT, RM) and IndexStream (PPO)
# ---------------------------------------------------------------------------------------------------------


def test_global_batches_token_balanced_epochs_and_ranks() -> None:
    rng = random.Random(1)
    lengths = [rng.randint(1, 100) for _ in range(200)]
    first = [step[0] for step in global_batches(lengths, 1, 0, 0, max_tokens=512)]
    check_batches(first, lengths, 512)
    second = [step[0] for step in global_batches(lengths, 1, 1, 0, max_tokens=512)]
    assert second != first
    check_batches(second, lengths, 512)
    steps = global_batches(lengths, 3, 0, 0, max_tokens=512)
    assert all(len(step) == 3 for step in steps)  # every rank has a batch at every step
    seen = [i for step in steps for batch in step for i in batch]
    assert len(seen) == len(set(seen))  # no index on two ranks
    assert len(steps) == len(first) // 3  # the last len % world batches are dropped
    with pytest.raises(ValueError, match="batch_size or max_tokens"):
        global_batches(lengths, 1, 0, 0)


# The orders the three implementations gave before they became these two (captured from commit cea1380's
# trainers/common.py global_batches, data/batching.py TokenBalancedBatchSampler and ppo/data.py
# IndexStream). Resuming a run, and every result made so far, depend on exactly these indices.
LENGTHS = [4, 10, 9, 3, 6, 10, 8, 11, 10, 2, 10, 1, 8, 5]
# (n, batch_size, world, seed, epoch) -> global_batches([1] * n, world, epoch, seed, batch_size=batch_size)
FIXED = {
    (7, 3, 1, 0, 0): [[[4, 2, 1]], [[0, 5, 3]], [[6]]],
    (9, 4, 2, 1, 0): [[[5, 6, 7, 4], [3, 0, 8, 1]]],
    (10, 2, 3, 5, 1): [[[5, 8], [3, 4], [0, 2]], [[6, 9], [7], [1]]],
    (11, 3, 2, 2, 3): [[[10, 2, 8], [7, 1, 3]], [[6, 0, 5], [4, 9]]],
}
# (world, seed, epoch) -> global_batches(LENGTHS, world, epoch, seed, max_tokens=20)
TOKENS = {
    (1, 0, 0): [[[7]], [[2, 1]], [[11, 9, 3, 0]], [[8]], [[12, 6]], [[13, 4]], [[10, 5]]],
    (2, 3, 1): [[[13, 4], [2, 5]], [[11, 9, 3, 0], [1]], [[12, 6], [7]]],
    (3, 4, 2): [[[5, 8], [13, 4], [1]], [[2, 10], [7], [11, 9, 3, 0]]],
}
# (world, seed, epoch) -> per rank: TokenBalancedBatchSampler(LENGTHS, 20, seed=seed, num_replicas=world, rank=r)
# after set_epoch(epoch)
SAMPLER = {
    (1, 0, 0): [[[7], [2, 1], [11, 9, 3, 0], [8], [12, 6], [13, 4], [10, 5]]],
    (2, 3, 1): [[[13, 4], [11, 9, 3, 0], [12, 6]], [[2, 5], [1], [7]]],
    (3, 4, 2): [[[5, 8], [2, 10]], [[13, 4], [7]], [[1], [11, 9, 3, 0]]],
}
# (n, seed, world, k, calls) -> per rank: [IndexStream(n, seed, rank=r, world=world).take(k) for each call]
STREAM = {
    (5, 0, 1, 2, 4): [[[4, 0], [1, 3], [2, 0], [4, 2]]],
    (5, 3, 2, 2, 3): [[[1, 3], [2, 3], [4, 1]], [[0, 4], [0, 1], [2, 3]]],
    (7, 11, 3, 1, 4): [[[4], [6], [5], [4]], [[0], [3], [5], [1]], [[2], [1], [2], [0]]],
}


def test_global_batches_fixed_size_order_is_unchanged() -> None:
    """On one process, exactly the old steps. On several, each step holds the same examples as before (the same
    global batch of the seeded shuffle), each rank now taking its rank_share of it rather than a contiguous
    slice."""
    for (n, batch_size, world, seed, epoch), expect in FIXED.items():
        got = global_batches([1] * n, world, epoch, seed, batch_size=batch_size)
        if world == 1:
            assert got == expect
        assert [sorted(i for p in step for i in p) for step in got] == [
            sorted(i for p in step for i in p) for step in expect
        ]
        order = list(range(n))
        random.Random(seed + epoch).shuffle(order)
        glob = [order[i : i + batch_size * world] for i in range(0, n, batch_size * world)]
        assert got == [[g[r::world] for r in range(world)] for g in glob if len(g) >= world]


def test_rank_share_is_every_world_th_item() -> None:
    items = list(range(10))
    assert rank_share(items, 0, 1) == items
    assert [rank_share(items, r, 4) for r in range(4)] == [[0, 4, 8], [1, 5, 9], [2, 6], [3, 7]]
    assert rank_share(range(3), 2, 4) == [2] and rank_share(range(3), 3, 4) == []
    with pytest.raises(ValueError, match="rank 2"):
        rank_share(items, 2, 2)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_every_sharding_is_the_rank_share_of_its_global_batch(world: int) -> None:
    """One rule for what a rank takes of a global batch: the fixed-size training steps (whose ragged last step
    gave, say, 3, 3, 3 and 1 examples to 4 ranks: now 3, 3, 2, 2), the PPO prompt stream and the evaluation
    splits."""
    n, batch_size, seed = 22, 3, 4
    order = list(range(n))
    random.Random(seed).shuffle(order)
    per_step = batch_size * world
    glob = [order[i : i + per_step] for i in range(0, n, per_step)]
    steps = global_batches([1] * n, world, 0, seed, batch_size=batch_size)
    assert steps == [[g[r::world] for r in range(world)] for g in glob if len(g) >= world]
    for parts in steps:
        sizes = [len(p) for p in parts]
        assert max(sizes) - min(sizes) <= 1
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    for r in range(world):
        assert IndexStream(n, seed, rank=r, world=world).take(2) == perm[: 2 * world][r::world]

    class Ctx:
        pass

    ctx = Ctx()
    ctx.world = world
    for r in range(world):
        ctx.rank = r
        mine = [i for idx, real in eval_shards(n, 4, ctx) if real for i in idx]  # type: ignore[arg-type]
        assert mine == list(range(n))[r::world]


def test_global_batches_token_balanced_order_is_unchanged() -> None:
    for (world, seed, epoch), expect in TOKENS.items():
        steps = global_batches(LENGTHS, world, epoch, seed, max_tokens=20)
        assert steps == expect
        # rank r's batches are exactly what the removed per-rank sampler gave rank r
        assert [[step[r] for step in steps] for r in range(world)] == SAMPLER[(world, seed, epoch)]


def test_index_stream_order_is_unchanged_and_resumes() -> None:
    for (n, seed, world, k, calls), expect in STREAM.items():
        for r in range(world):
            s = IndexStream(n, seed, rank=r, world=world)
            head = [s.take(k) for _ in range(2)]
            resumed = IndexStream(n, seed, rank=r, world=world)
            resumed.load_state_dict(s.state_dict())
            assert head + [resumed.take(k) for _ in range(calls - 2)] == expect[r]
    with pytest.raises(ConfigError, match="same data files"):
        IndexStream(4, 0).load_state_dict({"epoch": 0, "pos": 0, "n": 5})
    with pytest.raises(ConfigError, match="no examples"):
        IndexStream(0, 0)
