"""The critic-free advantage estimators of ppomax.algos (GRPO, RLOO, REINFORCE++) against independent computations:
plain Python loops over groups and tokens, hand-computed cases, and the edge cases (a group whose rewards are all
equal, one-token responses, masked tokens, rows left out of training, two ranks)."""

from __future__ import annotations

import math

import pytest
import torch

from ppomax.algos import (
    discounted_returns,
    grpo_advantages,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
    sequence_rewards,
    token_level_rewards,
)
from test_algos import _gen, _ragged_mask, _run_two_ranks, _scatter_rows


def _row_sums(rewards: torch.Tensor, mask: torch.Tensor) -> list[float]:
    return [
        sum(float(rewards[i, j]) for j in range(rewards.shape[1]) if mask[i, j])
        for i in range(rewards.shape[0])
    ]


def _grpo_loop(r: list[float], members: list[bool], eps: float) -> list[float]:
    """Textbook GRPO for one group: (R_i - mean) / (sample std + eps) over the members; 0 for the others."""
    vals = [x for x, m in zip(r, members, strict=True) if m]
    if len(vals) < 2:
        return [0.0] * len(r)
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
    return [(x - mean) / (std + eps) if m else 0.0 for x, m in zip(r, members, strict=True)]


def _rloo_loop(r: list[float], members: list[bool]) -> list[float]:
    """Textbook RLOO for one group: R_i minus the mean of the other members' rewards."""
    out = []
    for i, (x, m) in enumerate(zip(r, members, strict=True)):
        others = [y for j, (y, mj) in enumerate(zip(r, members, strict=True)) if mj and j != i]
        out.append(x - sum(others) / len(others) if m and others else 0.0)
    return out


def _batch(layout: str, seed: int = 0):
    """3 groups of 4: ragged lengths (one-token responses, an empty row), garbage in padding."""
    g = _gen(seed)
    lengths = [5, 1, 3, 1, 0, 4, 2, 6, 1, 1, 1, 1]
    mask = _ragged_mask(lengths, 6, layout, g)
    rewards = torch.randn(12, 6, generator=g, dtype=torch.float64)
    rewards[~mask] = float("nan")  # padding must never leak
    return rewards, mask


@pytest.mark.parametrize("layout", ["right", "left", "holes"])
def test_grpo_and_rloo_match_group_loops(layout: str) -> None:
    rewards, mask = _batch(layout)
    seq = _row_sums(rewards, mask)
    torch.testing.assert_close(
        sequence_rewards(rewards, mask), torch.tensor(seq, dtype=torch.float64).nan_to_num(0.0)
    )
    members = [bool(mask[i].any()) for i in range(12)]
    grpo = grpo_advantages(rewards, mask.float(), group_size=4)
    rloo = rloo_advantages(rewards, mask, group_size=4)
    exp_g, exp_r = [], []
    for k in range(3):
        sl = slice(4 * k, 4 * k + 4)
        exp_g += _grpo_loop(seq[sl], members[sl], 1e-4)
        exp_r += _rloo_loop(seq[sl], members[sl])
    for i in range(12):
        for j in range(6):
            want_g = exp_g[i] if mask[i, j] else 0.0
            want_r = exp_r[i] if mask[i, j] else 0.0
            assert grpo[i, j].item() == pytest.approx(want_g, abs=1e-12), (i, j)
            assert rloo[i, j].item() == pytest.approx(want_r, abs=1e-12), (i, j)
    assert not grpo.requires_grad and not rloo.requires_grad


def test_grpo_rloo_hand_cases() -> None:
    # one group of 4 one-token responses with rewards 1, 0, 1, 0 (mean 0.5, sample std 1/sqrt(3))
    mask = torch.ones(4, 1, dtype=torch.bool)
    r = torch.tensor([[1.0], [0.0], [1.0], [0.0]])
    s = 1 / math.sqrt(3)
    torch.testing.assert_close(
        grpo_advantages(r, mask, 4, eps=0.0), torch.tensor([[0.5 / s], [-0.5 / s], [0.5 / s], [-0.5 / s]])
    )
    # RLOO: 1 - (0 + 1 + 0) / 3 = 2/3; 0 - (1 + 1 + 0) / 3 = -2/3 (= 4/3 * (R_i - 0.5))
    torch.testing.assert_close(
        rloo_advantages(r, mask, 4), torch.tensor([[2 / 3], [-2 / 3], [2 / 3], [-2 / 3]])
    )
    # two groups of 2, the sequence reward summed over tokens: [1 + 2, 0.5] vs [4, 4] (all equal: no signal)
    mask = torch.tensor([[True, True], [True, False], [True, False], [True, True]])
    r = torch.tensor([[1.0, 2.0], [0.5, 9.0], [4.0, 9.0], [1.5, 2.5]])
    rloo = rloo_advantages(r, mask, 2)
    torch.testing.assert_close(rloo, torch.tensor([[2.5, 2.5], [-2.5, 0.0], [0.0, 0.0], [0.0, 0.0]]))
    grpo = grpo_advantages(r, mask, 2)
    std = math.sqrt(2 * 1.25**2)  # sample std of [3, 0.5]
    a = 1.25 / (std + 1e-4)
    torch.testing.assert_close(grpo, torch.tensor([[a, a], [-a, 0.0], [0.0, 0.0], [0.0, 0.0]]))


def test_grpo_std_normalisation_is_a_switch() -> None:
    """A group of near-ties (rewards spanning 0.003) gets +-1.08 with DeepSeekMath's std normalisation and its
    centred rewards without it (Dr. GRPO); the sign pattern is the same."""
    mask = torch.ones(4, 1, dtype=torch.bool)
    r = torch.tensor([[0.0], [0.001], [0.002], [0.003]], dtype=torch.float64)
    scaled = grpo_advantages(r, mask, 4)
    assert scaled[0, 0].item() == pytest.approx(-1.08, abs=0.01) and scaled[3, 0].item() == pytest.approx(
        1.08, abs=0.01
    )
    centred = grpo_advantages(r, mask, 4, scale=False)
    torch.testing.assert_close(centred, r - 0.0015)
    rewards, lmask = _batch("right", 3)
    loop = []
    for k in range(3):
        rows = list(range(4 * k, 4 * k + 4))
        sums = _row_sums(rewards[rows], lmask[rows])
        members = [bool(lmask[i].any()) for i in rows]
        vals = [x for x, m in zip(sums, members, strict=True) if m]
        mean = sum(vals) / len(vals)
        loop += [x - mean if m and len(vals) > 1 else 0.0 for x, m in zip(sums, members, strict=True)]
    got = grpo_advantages(rewards, lmask, 4, scale=False)
    for i in range(12):
        for j in range(6):
            assert got[i, j].item() == pytest.approx(loop[i] if lmask[i, j] else 0.0, abs=1e-12)


def test_group_std_zero_gives_zero_not_nan() -> None:
    mask = torch.ones(6, 3, dtype=torch.bool)
    r = torch.full((6, 3), 0.7)
    for eps in (1e-4, 0.0):
        out = grpo_advantages(r, mask, 3, eps=eps)
        assert torch.isfinite(out).all() and torch.equal(out, torch.zeros_like(out))
    assert torch.equal(rloo_advantages(r, mask, 3), torch.zeros(6, 3))


def test_rows_left_out_are_no_group_members() -> None:
    """A row without a masked token (a NaN score left out of training) neither gets an advantage nor enters its
    group's mean/std/baseline; a group left with one member has no baseline."""
    mask = torch.tensor([[True], [True], [False], [True], [True], [False]])
    r = torch.tensor([[2.0], [0.0], [1e6], [5.0], [3.0], [-1e6]])
    grpo = grpo_advantages(r, mask, 3)
    rloo = rloo_advantages(r, mask, 3)
    a = 1.0 / (math.sqrt(2.0) + 1e-4)  # [2, 0]: mean 1, sample std sqrt(2)
    torch.testing.assert_close(
        grpo.flatten(), torch.tensor([a, -a, 0.0, 1.0 / (math.sqrt(2.0) + 1e-4), -a, 0.0])
    )
    torch.testing.assert_close(rloo.flatten(), torch.tensor([2.0, -2.0, 0.0, 2.0, -2.0, 0.0]))
    lone = torch.tensor([[True], [False]])
    assert torch.equal(grpo_advantages(torch.ones(2, 1), lone, 2), torch.zeros(2, 1))
    assert torch.equal(rloo_advantages(torch.ones(2, 1), lone, 2), torch.zeros(2, 1))


def test_groups_must_divide_the_batch() -> None:
    with pytest.raises(ValueError, match="groups of 4"):
        grpo_advantages(torch.zeros(6, 2), torch.ones(6, 2), 4)
    with pytest.raises(ValueError, match="groups of 0"):
        rloo_advantages(torch.zeros(6, 2), torch.ones(6, 2), 0)


def test_sequence_reward_is_score_plus_kl_penalty() -> None:
    """R_i over token_level_rewards is the re-parameterised score plus the response's KL penalty sum."""
    g = _gen(3)
    mask = _ragged_mask([4, 1, 3], 5, "holes", g)
    kl = torch.randn(3, 5, generator=g, dtype=torch.float64)
    scores = torch.tensor([1.0, -2.0, 0.25], dtype=torch.float64)
    rewards = token_level_rewards(scores, kl, mask, kl_coef=0.1)
    expect = [scores[i].item() - 0.1 * sum(kl[i, j].item() for j in range(5) if mask[i, j]) for i in range(3)]
    torch.testing.assert_close(sequence_rewards(rewards, mask), torch.tensor(expect, dtype=torch.float64))


@pytest.mark.parametrize("layout", ["right", "left", "holes"])
@pytest.mark.parametrize("gamma", [1.0, 0.9, 0.0])
def test_discounted_returns_match_reward_to_go(layout: str, gamma: float) -> None:
    g = _gen(4)
    lengths = [6, 1, 0, 3]
    mask = _ragged_mask(lengths, 6, layout, g)
    rows = [torch.randn(n, generator=g).tolist() for n in lengths]
    rewards = _scatter_rows(rows, mask, fill=float("nan"))
    expect = [[sum(gamma ** (s - t) * r[s] for s in range(t, len(r))) for t in range(len(r))] for r in rows]
    torch.testing.assert_close(
        discounted_returns(rewards, mask, gamma), _scatter_rows(expect, mask, fill=0.0)
    )


def test_reinforce_pp_whitens_returns_over_the_batch() -> None:
    rewards, mask = _batch("holes", seed=5)
    adv, ret = reinforce_pp_advantages(rewards, mask, gamma=1.0)
    torch.testing.assert_close(ret, discounted_returns(rewards, mask, 1.0))
    sel = [float(ret[i, j]) for i in range(12) for j in range(6) if mask[i, j]]
    mean = sum(sel) / len(sel)
    std = math.sqrt(sum((x - mean) ** 2 for x in sel) / (len(sel) - 1))
    for i in range(12):
        for j in range(6):
            want = (float(ret[i, j]) - mean) / math.sqrt(std**2 + 1e-8) if mask[i, j] else 0.0
            assert adv[i, j].item() == pytest.approx(want, abs=1e-9)
    # a one-token response whose only reward is the score: its return is the score
    one = torch.tensor([[0.0, 3.0]])
    _, r1 = reinforce_pp_advantages(one, torch.tensor([[False, True]]), gamma=0.5)
    assert r1.tolist() == [[0.0, 3.0]]


def test_reinforce_pp_two_ranks_equal_one_global_batch() -> None:
    """The normalisation is over the GLOBAL batch: two ranks' halves give the whole batch's advantages."""
    rewards, mask = _batch("right", seed=6)
    whole, _ = reinforce_pp_advantages(rewards, mask, gamma=0.95)
    shards = [(rewards[:5], mask[:5]), (rewards[5:], mask[5:])]
    parts = _run_two_ranks(lambda s, ar: reinforce_pp_advantages(s[0], s[1], 0.95, all_reduce=ar)[0], shards)
    torch.testing.assert_close(torch.cat(parts), whole)


@pytest.mark.parametrize("layout", ["right", "left", "holes"])
def test_reinforce_pp_baseline_is_reinforce_pp_of_group_centred_scores(layout: str) -> None:
    """Token rewards = KL penalties + the score at the last token: the baseline variant subtracts each group's
    mean score (over its members) from its members' scores, then whitens the return over the batch; built here
    from the penalties and the centred scores with plain loops."""
    g = _gen(6)
    lengths = [5, 1, 3, 0, 4, 2, 6, 1]  # 2 groups of 4; row 3 is no member
    mask = _ragged_mask(lengths, 6, layout, g)
    kl = torch.randn(8, 6, generator=g, dtype=torch.float64)
    scores = torch.randn(8, generator=g, dtype=torch.float64)
    scores[3] = float("nan")  # a row left out of training: in no mean
    rewards = token_level_rewards(scores, kl, mask, kl_coef=0.1)
    centred = []
    for k in range(2):
        rows = [i for i in range(4 * k, 4 * k + 4) if lengths[i]]
        mean = sum(scores[i].item() for i in rows) / len(rows)
        centred += [scores[i].item() - mean if lengths[i] else 0.0 for i in range(4 * k, 4 * k + 4)]
    expect_rewards = token_level_rewards(torch.tensor(centred, dtype=torch.float64), kl, mask, kl_coef=0.1)
    adv, ret = reinforce_pp_baseline_advantages(rewards, mask, scores, 4, gamma=0.9)
    want_adv, want_ret = reinforce_pp_advantages(expect_rewards, mask, gamma=0.9)
    torch.testing.assert_close(ret, want_ret)
    torch.testing.assert_close(adv, want_adv)
    # a shift of every score of one group changes nothing: the baseline removes it
    shifted = token_level_rewards(
        scores + torch.tensor([3.0] * 4 + [0.0] * 4, dtype=torch.float64), kl, mask, 0.1
    )
    moved = reinforce_pp_baseline_advantages(shifted, mask, scores + 3.0 * (torch.arange(8) < 4), 4, 0.9)[0]
    torch.testing.assert_close(moved, adv)
    with pytest.raises(ValueError, match="groups of 3"):
        reinforce_pp_baseline_advantages(rewards, mask, scores, 3, 1.0)
