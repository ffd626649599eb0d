"""Every formula of ppomax.algos against an independent computation (plain loops, hand cases, textbook)."""

from __future__ import annotations

import math
import threading

import pytest
import torch
from torch.nn import functional as F

from ppomax.algos import (
    AdaptiveKLController,
    RunningMoments,
    aggregate_loss,
    entropy_bonus_loss,
    entropy_from_logits,
    gae,
    kl_from_logits,
    kl_loss,
    kl_per_token,
    last_token_index,
    lm_nll,
    logprobs_from_logits,
    masked_max,
    masked_mean,
    masked_min,
    masked_sum,
    masked_whiten,
    normalize_advantages,
    pairwise_rm_loss,
    policy_loss,
    reparameterize_scores,
    score_token_index,
    token_level_rewards,
    token_weights,
    trainable_rows,
    value_loss,
)

# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ragged_mask(lengths: list[int], width: int, layout: str, g: torch.Generator) -> torch.Tensor:
    """Bool mask [B, width] with `lengths[i]` real tokens per row in the given layout.

    right: real tokens first; left: real tokens last; holes: real tokens at random positions (padding
    inside and around the response).
    """
    mask = torch.zeros(len(lengths), width, dtype=torch.bool)
    for i, n in enumerate(lengths):
        if layout == "right":
            mask[i, :n] = True
        elif layout == "left":
            mask[i, width - n :] = True
        else:
            pos = torch.randperm(width, generator=g)[:n]
            mask[i, pos] = True
    return mask


def _scatter_rows(rows: list[list[float]], mask: torch.Tensor, fill: float) -> torch.Tensor:
    """Place per-row values at the True positions of `mask` (in order); `fill` elsewhere."""
    out = torch.full(mask.shape, fill, dtype=torch.float64)
    for i, row in enumerate(rows):
        idx = mask[i].nonzero().flatten().tolist()
        assert len(idx) == len(row)
        for j, v in zip(idx, row, strict=True):
            out[i, j] = v
    return out


def _selected(x: torch.Tensor, mask: torch.Tensor) -> list[float]:
    return [float(x[i, j]) for i in range(x.shape[0]) for j in range(x.shape[1]) if bool(mask[i, j])]


def _sample_std(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _run_two_ranks(fn, shards):
    """Run fn(shard, all_reduce) on two threads whose all_reduce really sums the two ranks' tensors.

    A faithful stand-in for torch.distributed with world size 2: each call blocks until both ranks
    have contributed, then both get the sum. The hook sees exactly what a real collective would.
    """
    barrier = threading.Barrier(2)
    slots: list[torch.Tensor | None] = [None, None]
    calls = [0, 0]
    results: list[object] = [None, None]
    errors: list[BaseException] = []

    def make_hook(rank: int):
        def hook(t: torch.Tensor) -> torch.Tensor:
            calls[rank] += 1
            slots[rank] = t.clone()
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()
            return total

        return hook

    def worker(rank: int) -> None:
        try:
            results[rank] = fn(shards[rank], make_hook(rank))
        except BaseException as e:  # surfaced in the main thread
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    if errors:
        raise errors[0]
    assert calls[0] == calls[1] > 0
    return results


# ---------------------------------------------------------------------------------------------------------
# masked statistics
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("float_mask", [False, True])
def test_masked_sum_mean_match_loops(float_mask: bool) -> None:
    g = _gen(1)
    x = torch.randn(4, 7, generator=g, dtype=torch.float64)
    mask = _ragged_mask([7, 3, 0, 5], 7, "holes", g)
    x[~mask] = float("nan")  # padding must not leak, not even NaN
    m = mask.double() if float_mask else mask
    vals = _selected(x, mask)
    assert masked_sum(x, m).item() == pytest.approx(sum(vals))
    assert masked_mean(x, m).item() == pytest.approx(sum(vals) / len(vals))
    per_row = masked_mean(x, m, dim=1)
    for i in range(4):
        row = [float(x[i, j]) for j in range(7) if mask[i, j]]
        expect = sum(row) / len(row) if row else 0.0  # empty row: 0, not NaN
        assert per_row[i].item() == pytest.approx(expect)


def test_masked_mean_empty_mask_is_zero() -> None:
    x = torch.randn(2, 3)
    assert masked_mean(x, torch.zeros(2, 3)).item() == 0.0
    assert torch.all(masked_whiten(x, torch.zeros(2, 3)) == 0)


def test_masked_min_and_max_ignore_padding_and_read_0_on_an_empty_mask() -> None:
    x = torch.tensor([[3.0, -1.0, -50.0], [2.0, 0.5, float("nan")]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    assert masked_min(x, mask).item() == -1.0 and masked_max(x, mask).item() == 3.0
    assert masked_min(x, torch.zeros_like(mask)).item() == 0.0 == masked_max(x, torch.zeros_like(mask)).item()


def test_masked_mean_bf16_is_accumulated_in_float32() -> None:
    x = torch.full((1, 1001), 1.0, dtype=torch.bfloat16)
    mask = torch.ones(1, 1001)
    out = masked_mean(x, mask)
    assert out.dtype == torch.float32
    assert out.item() == 1.0
    assert masked_sum(x, mask).item() == 1001.0  # exact; a bf16 sum would round


def test_masked_whiten_uses_the_unbiased_variance_of_the_selection() -> None:
    g = _gen(2)
    x = torch.randn(5, 9, generator=g, dtype=torch.float64) * 3 + 1
    mask = _ragged_mask([9, 4, 1, 6, 2], 9, "holes", g)
    sel = torch.tensor(_selected(x, mask), dtype=torch.float64)
    expect = (sel - sel.mean()) / torch.sqrt(torch.var(sel, correction=1) + 1e-8)
    torch.testing.assert_close(
        torch.tensor(_selected(masked_whiten(x, mask), mask), dtype=torch.float64), expect
    )
    # one token: variance 0 (not NaN), so the token whitens to 0
    one = torch.zeros(1, 3, dtype=torch.bool)
    one[0, 1] = True
    assert masked_whiten(x[:1, :3], one).tolist() == [[0.0, 0.0, 0.0]]


def test_masked_whiten_mean0_var1_and_zero_padding() -> None:
    g = _gen(3)
    x = torch.randn(6, 11, generator=g, dtype=torch.float64) * 5 + 7
    mask = _ragged_mask([11, 2, 8, 5, 9, 1], 11, "left", g)
    w = masked_whiten(x, mask)
    sel = torch.tensor(_selected(w, mask), dtype=torch.float64)
    assert sel.mean().item() == pytest.approx(0.0, abs=1e-9)
    assert sel.var().item() == pytest.approx(1.0, abs=1e-6)
    assert torch.all(w[~mask] == 0)
    # shift_mean=False rescales only: the mean is kept, the spread is unit.
    w2 = masked_whiten(x, mask, shift_mean=False)
    orig = torch.tensor(_selected(x, mask), dtype=torch.float64)
    sel2 = torch.tensor(_selected(w2, mask), dtype=torch.float64)
    assert sel2.mean().item() == pytest.approx(orig.mean().item(), rel=1e-9)
    assert sel2.var().item() == pytest.approx(1.0, abs=1e-6)
    assert torch.all(w2[~mask] == 0)


def test_all_reduce_two_ranks_equals_single_batch() -> None:
    g = _gen(4)
    x = torch.randn(8, 6, generator=g, dtype=torch.float64) * 2 - 1
    mask = _ragged_mask([6, 1, 3, 5, 2, 6, 4, 3], 6, "holes", g)
    shards = [(x[:3], mask[:3]), (x[3:], mask[3:])]  # unequal token counts per rank

    mean = _run_two_ranks(lambda s, ar: masked_mean(s[0], s[1], all_reduce=ar), shards)
    for r in range(2):
        assert mean[r].item() == pytest.approx(masked_mean(x, mask).item())

    whitened = _run_two_ranks(lambda s, ar: masked_whiten(s[0], s[1], all_reduce=ar), shards)
    torch.testing.assert_close(torch.cat(whitened), masked_whiten(x, mask))

    adv = _run_two_ranks(lambda s, ar: normalize_advantages(s[0], s[1], True, 0.5, all_reduce=ar), shards)
    torch.testing.assert_close(torch.cat(adv), normalize_advantages(x, mask, True, 0.5))


def test_all_reduce_with_the_simple_precomputed_other_rank_hook() -> None:
    # The brief's simplest form: rank 0 adds a fixed tensor standing for rank 1's [sum, count].
    x = torch.tensor([[1.0, 2.0, 99.0]])
    mask = torch.tensor([[1, 1, 0]])
    other = torch.tensor([10.0 + 20.0 + 30.0, 3.0])  # rank 1 holds 10, 20, 30
    out = masked_mean(x, mask, all_reduce=lambda t: t + other)
    assert out.item() == pytest.approx((1 + 2 + 10 + 20 + 30) / 5)


def test_masked_mean_all_reduce_keeps_local_gradient() -> None:
    x = torch.tensor([[1.0, 2.0]], requires_grad=True)
    out = masked_mean(x, torch.ones(1, 2), all_reduce=lambda t: t * 2)  # "two identical ranks"
    out.backward()
    assert out.item() == pytest.approx(1.5)
    torch.testing.assert_close(x.grad, torch.full((1, 2), 1 / 4))  # d(global sum / global count)/dx_local


# ---------------------------------------------------------------------------------------------------------
# RunningMoments
# ---------------------------------------------------------------------------------------------------------


def test_token_weights_make_micro_batch_means_the_whole_batch_mean() -> None:
    """Rows split 3 + 1 (and 1 + 2 + 1, and with an empty chunk), ragged masks: sum_i w_i * masked_mean(chunk_i)
    equals masked_mean of the whole batch, value and gradient; equal weights (the naive mean of means) do not."""
    g = _gen(21)
    x = torch.randn(4, 7, generator=g, dtype=torch.float64, requires_grad=True)
    mask = _ragged_mask([7, 1, 4, 2], 7, "holes", g)
    whole = masked_mean(x, mask)
    (g_whole,) = torch.autograd.grad(whole, x)
    for splits in ([[0, 1, 2], [3]], [[0], [1, 2], [3]], [[0, 1], [], [2, 3]]):
        counts = torch.stack([mask[rows].sum() for rows in splits]).double()
        w = token_weights(counts)
        parts = [masked_mean(x[rows], mask[rows]) for rows in splits]
        acc = sum(wi * p for wi, p in zip(w, parts, strict=True))
        (g_acc,) = torch.autograd.grad(acc, x)
        assert acc.item() == pytest.approx(whole.item(), rel=1e-12)
        torch.testing.assert_close(g_acc, g_whole)
        assert w.sum().item() == pytest.approx(1.0)
    naive = sum(masked_mean(x[rows], mask[rows]) for rows in ([0, 1, 2], [3])) / 2
    assert abs(naive.item() - whole.item()) > 1e-3
    assert torch.equal(token_weights(torch.zeros(3)), torch.zeros(3))
    # several kinds of unit at once: one row each
    two = token_weights(torch.tensor([[3.0, 1.0], [1.0, 1.0]]))
    torch.testing.assert_close(two, torch.tensor([[0.75, 0.25], [0.5, 0.5]], dtype=torch.float32))


def test_token_weights_across_two_ranks_average_to_the_global_mean() -> None:
    """Each rank weights its micro-batches by their share of all ranks' tokens times R: the mean over ranks of
    sum_i w_i * mean_i (what DDP's gradient averaging computes) is the mean over every token."""
    g = _gen(22)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64)
    mask = _ragged_mask([5, 1, 3, 2, 4, 1], 5, "right", g)
    shards = [([[0, 1], [2]], x[:3], mask[:3]), ([[0], [1, 2]], x[3:], mask[3:])]

    def rank_value(shard, hook):
        splits, xs, ms = shard
        w = token_weights(torch.stack([ms[rows].sum() for rows in splits]).double(), hook)
        return sum(wi * masked_mean(xs[rows], ms[rows]) for wi, rows in zip(w, splits, strict=True))

    values = _run_two_ranks(rank_value, shards)
    assert (values[0] + values[1]).item() / 2 == pytest.approx(masked_mean(x, mask).item(), rel=1e-12)


def test_running_moments_matches_var_of_concatenation() -> None:
    g = _gen(5)
    rm = RunningMoments()
    assert rm.mean == 0.0 and rm.std == 1.0 and rm.count == 0  # identity before any data
    seen = []
    for step in range(200):
        n = int(torch.randint(1, 40, (1,), generator=g))
        # drifting, differently scaled batches (what reward scores do during PPO)
        batch = torch.randn(n, generator=g, dtype=torch.float64) * (1 + step / 50) + step / 10
        mean_b, std_b = rm.update(batch.float())
        batch32 = batch.float().double()
        seen.append(batch32)
        assert mean_b == pytest.approx(batch32.mean().item(), rel=1e-9, abs=1e-12)
        assert std_b == pytest.approx(batch32.std().item() if n > 1 else 0.0, rel=1e-9, abs=1e-12)
    allv = torch.cat(seen)
    assert rm.count == allv.numel()
    assert rm.mean == pytest.approx(allv.mean().item(), rel=1e-12)
    assert rm.var == pytest.approx(torch.var(allv).item(), rel=1e-10)
    assert rm.std == pytest.approx(torch.std(allv).item(), rel=1e-10)

    clone = RunningMoments()
    clone.load_state_dict(rm.state_dict())
    assert all(isinstance(v, float) for v in rm.state_dict().values())
    assert (clone.mean, clone.var, clone.count) == (rm.mean, rm.var, rm.count)


def test_running_moments_mask_and_empty_batch() -> None:
    rm = RunningMoments()
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, -50.0, 4.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    mean_b, _ = rm.update(x, mask)
    assert mean_b == pytest.approx(2.5)
    assert rm.var == pytest.approx(torch.tensor([1.0, 2.0, 3.0, 4.0]).var().item())
    before = rm.state_dict()
    assert rm.update(torch.empty(0)) == (0.0, 0.0)
    assert rm.state_dict() == before


def test_running_moments_two_ranks() -> None:
    g = _gen(6)
    batches = [torch.randn(n, generator=g, dtype=torch.float64) + i for i, n in enumerate([5, 9, 2, 7])]

    def run(shards, ar):
        rm = RunningMoments(all_reduce=ar)
        for b in shards:
            rm.update(b)
        return rm

    # each rank sees a different slice of every batch
    ranks = _run_two_ranks(run, [[b[:2] for b in batches], [b[2:] for b in batches]])
    allv = torch.cat(batches)
    for rm in ranks:
        assert rm.count == allv.numel()
        assert rm.mean == pytest.approx(allv.mean().item())
        assert rm.var == pytest.approx(allv.var().item())


# ---------------------------------------------------------------------------------------------------------
# KL estimators
# ---------------------------------------------------------------------------------------------------------


def test_kl_estimators_sign_conventions_by_hand() -> None:
    logp = torch.tensor([[-1.0, -3.0]])
    ref = torch.tensor([[-2.0, -1.0]])
    # token 0: log r = ref - logp = -1; token 1: log r = +2
    torch.testing.assert_close(kl_per_token(logp, ref, "k1"), torch.tensor([[1.0, -2.0]]))
    torch.testing.assert_close(kl_per_token(logp, ref, "k2"), torch.tensor([[0.5, 2.0]]))
    k3 = [math.exp(-1) - 1 + 1, math.exp(2) - 1 - 2]
    torch.testing.assert_close(kl_per_token(logp, ref, "k3"), torch.tensor([k3]))
    with pytest.raises(ValueError, match=r"kl\.estimator"):
        kl_per_token(logp, ref, "k4")  # type: ignore[arg-type]


def test_k3_unclamped_reads_its_exp_and_the_clamp_bounds_it_with_a_finite_gradient() -> None:
    """k3 at a log-ratio log(ref/pi) of 5 is e^5 - 1 - 5 = 142.4 and overflows float32 past 88.7; ``clamp`` (verl's
    low_var_kl: the log-ratio to +-20, then the estimate to [-c, c]) bounds both, and the gradient stays finite
    (0 on a clamped token)."""
    logp = torch.tensor([[-6.0, -100.0, -1.0]], requires_grad=True)
    ref = torch.tensor([[-1.0, 0.0, -1.5]])
    raw = kl_per_token(logp, ref, "k3")
    assert raw[0, 0].item() == pytest.approx(math.exp(5) - 1 - 5, rel=1e-5)
    assert math.isinf(raw[0, 1].item())
    clamped = kl_per_token(logp, ref, "k3", clamp=10.0)
    torch.testing.assert_close(clamped[0, :2], torch.tensor([10.0, 10.0]))
    assert clamped[0, 2].item() == pytest.approx(raw[0, 2].item())  # inside the bound: unchanged
    clamped.sum().backward()
    assert logp.grad is not None and torch.isfinite(logp.grad).all()
    assert logp.grad[0, :2].abs().sum() == 0 and logp.grad[0, 2] != 0
    k1 = kl_per_token(torch.tensor([[-30.0]]), torch.tensor([[0.0]]), "k1", clamp=10.0)
    assert k1.item() == -10.0


def test_kl_estimators_monte_carlo_vs_exact_categorical_kl() -> None:
    g = _gen(7)
    pi = torch.tensor([0.6, 0.3, 0.05, 0.05], dtype=torch.float64)
    ref = torch.tensor([0.2, 0.2, 0.3, 0.3], dtype=torch.float64)
    exact = sum(p * math.log(p / q) for p, q in zip(pi.tolist(), ref.tolist(), strict=True))
    samples = torch.multinomial(pi, 400_000, replacement=True, generator=g)
    logp, logref = pi.log()[samples][None], ref.log()[samples][None]
    k1 = kl_per_token(logp, logref, "k1").mean().item()
    k2 = kl_per_token(logp, logref, "k2")
    k3 = kl_per_token(logp, logref, "k3")
    # k1 and k3 are unbiased for KL(pi || ref)
    assert k1 == pytest.approx(exact, abs=6e-3)
    assert k3.mean().item() == pytest.approx(exact, abs=6e-3)
    # k2 is biased: its expectation is E_pi[(log r)^2 / 2], close to KL for nearby distributions
    e_k2 = sum(p * 0.5 * math.log(q / p) ** 2 for p, q in zip(pi.tolist(), ref.tolist(), strict=True))
    assert k2.mean().item() == pytest.approx(e_k2, abs=6e-3)
    assert e_k2 == pytest.approx(exact, rel=0.25)
    assert bool((k2 >= 0).all()) and bool((k3 >= 0).all())
    # the other direction, KL(ref || pi), is far from the estimates: the test tells the two apart
    reverse = sum(q * math.log(q / p) for p, q in zip(pi.tolist(), ref.tolist(), strict=True))
    assert abs(reverse - exact) > 0.1


@pytest.mark.parametrize("float_mask", [False, True])
def test_loss_aggregations_vs_loops(float_mask: bool) -> None:
    """token_mean over all tokens, seq_mean_token_mean (each response's mean, then over responses) and
    seq_mean_token_sum_norm (each response's sum / the constant, then over responses); an empty row is in no
    mean, and padding (NaN here) never leaks."""
    x = torch.tensor(
        [[1.0, 2.0, 3.0, 9.0], [4.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [-1.0, 1.0, 5.0, 7.0]]
    )
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    x = torch.where(mask, x, torch.full_like(x, float("nan")))
    m = mask.float() if float_mask else mask
    rows = [[x[i, j].item() for j in range(4) if mask[i, j]] for i in range(4)]
    rows = [r for r in rows if r]
    flat = [v for r in rows for v in r]
    assert aggregate_loss(x, m, "token_mean").item() == pytest.approx(sum(flat) / len(flat))
    expect = sum(sum(r) / len(r) for r in rows) / len(rows)
    assert aggregate_loss(x, m, "seq_mean_token_mean").item() == pytest.approx(expect)
    expect = sum(sum(r) / 8 for r in rows) / len(rows)
    assert aggregate_loss(x, m, "seq_mean_token_sum_norm", horizon=8).item() == pytest.approx(expect)
    with pytest.raises(ValueError, match="constant length"):
        aggregate_loss(x, m, "seq_mean_token_sum_norm")
    with pytest.raises(ValueError, match="unknown loss_aggregation 'seq_mean'"):
        aggregate_loss(x, m, "seq_mean")


def test_policy_kl_and_entropy_losses_use_the_aggregation() -> None:
    """The surrogate, the KL loss and the entropy bonus are the aggregation of their per-token terms: on-policy
    (ratio 1) the surrogate's per-token term is -A, so the loss is aggregate(-A)."""
    g = _gen(11)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    adv = torch.randn(3, 5, generator=g)
    lp = -torch.rand(3, 5, generator=g)
    ref = -torch.rand(3, 5, generator=g)
    for mode in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"):
        loss, _ = policy_loss(lp, lp, adv, mask, 0.2, aggregation=mode, horizon=10)
        torch.testing.assert_close(loss, aggregate_loss(-adv, mask, mode, 10))
        kl, km = kl_loss(lp, ref, mask, 0.5, "k3", aggregation=mode, horizon=10)
        torch.testing.assert_close(kl, 0.5 * aggregate_loss(kl_per_token(lp, ref, "k3"), mask, mode, 10))
        torch.testing.assert_close(km["kl_mean"], masked_mean(kl_per_token(lp, ref, "k3"), mask))
        ent = torch.rand(3, 5, generator=g)
        eb, _ = entropy_bonus_loss(ent, mask, 0.1, None, aggregation=mode, horizon=10)
        torch.testing.assert_close(eb, -0.1 * aggregate_loss(ent, mask, mode, 10))


def test_kl_from_logits_vs_categorical_sums() -> None:
    """The exact KL at each position against sum_v p log(p / q) over plain Python probabilities."""
    g = _gen(5)
    logits = torch.randn(2, 3, 6, generator=g, dtype=torch.float64) * 2
    ref = torch.randn(2, 3, 6, generator=g, dtype=torch.float64) * 2
    got = kl_from_logits(logits, ref)
    assert got.shape == (2, 3) and got.dtype == torch.float64
    for b in range(2):
        for t in range(3):
            zp, zq = logits[b, t].tolist(), ref[b, t].tolist()
            sp, sq = sum(math.exp(z) for z in zp), sum(math.exp(z) for z in zq)
            p, q = [math.exp(z) / sp for z in zp], [math.exp(z) / sq for z in zq]
            expect = sum(pv * math.log(pv / qv) for pv, qv in zip(p, q, strict=True))
            assert got[b, t].item() == pytest.approx(expect, rel=1e-10, abs=1e-12)
    # identical distributions (even shifted logits): exactly 0 after the clamp, never negative
    assert kl_from_logits(logits, logits + 3.0).abs().max().item() < 1e-12
    assert bool((kl_from_logits(logits.float(), logits.float()) >= 0).all())
    # a token pi rules out contributes nothing; one only ref rules out makes the KL infinite
    masked = kl_from_logits(torch.tensor([[[0.0, 0.0, -math.inf]]]), torch.tensor([[[0.0, 1.0, 0.0]]]))
    expect = 0.5 * math.log(0.5 / (1 / (2 + math.e))) + 0.5 * math.log(0.5 / (math.e / (2 + math.e)))
    assert masked.item() == pytest.approx(expect, rel=1e-6)
    assert math.isinf(kl_from_logits(torch.zeros(1, 1, 2), torch.tensor([[[0.0, -math.inf]]])).item())
    # bf16 logits give a float32 result
    assert kl_from_logits(logits.bfloat16(), ref.bfloat16()).dtype == torch.float32


# ---------------------------------------------------------------------------------------------------------
# token-level rewards and GAE
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["right", "left", "holes"])
def test_last_token_index_vs_loop(layout: str) -> None:
    mask = _ragged_mask([5, 1, 0, 3, 6], 6, layout, _gen(7))
    expect = [max((j for j in range(6) if mask[i, j]), default=0) for i in range(5)]  # empty row: 0
    for m in (mask, mask.long(), mask.float()):
        out = last_token_index(m)
        assert out.dtype == torch.long and out.tolist() == expect


@pytest.mark.parametrize("layout", ["right", "left", "holes"])
@pytest.mark.parametrize("pad", [None, 2])
def test_score_token_index_is_transformers_pooling_vs_loop(layout: str, pad: int | None) -> None:
    """The rightmost position that is attended and not the pad id (transformers' sequence-classifier pooling);
    with EOS as pad (2), rows ending in EOS are read before it."""
    g = _gen(9)
    mask = _ragged_mask([6, 4, 1, 0, 5], 6, layout, g)
    ids = torch.randint(3, 9, (5, 6), generator=g)
    ids[0, 5] = ids[1, 2] = ids[4, 1] = 2  # EOS: trailing, inside, and anywhere in a row
    ids[~mask] = 2 if pad is None else pad
    out = score_token_index(ids, mask.long(), pad)
    expect = [
        max((j for j in range(6) if mask[i, j] and (pad is None or ids[i, j] != pad)), default=0)
        for i in range(5)
    ]
    assert out.dtype == torch.long and out.tolist() == expect


@pytest.mark.parametrize("layout", ["right", "left", "holes"])
def test_token_level_rewards_vs_loop(layout: str) -> None:
    g = _gen(8)
    lengths = [5, 1, 0, 3]
    mask = _ragged_mask(lengths, 6, layout, g)
    kl = torch.randn(4, 6, generator=g, dtype=torch.float64)
    kl[~mask] = 1e6  # garbage in padding must not leak
    scores = torch.tensor([2.0, -1.0, 7.0, 0.5], dtype=torch.float64)
    out = token_level_rewards(scores, kl, mask.float(), kl_coef=0.1)
    for i in range(4):
        idx = [j for j in range(6) if mask[i, j]]
        for j in range(6):
            expect = -0.1 * kl[i, j].item() if j in idx else 0.0
            if idx and j == idx[-1]:
                expect += scores[i].item()
            assert out[i, j].item() == pytest.approx(expect)
    assert torch.all(out[2] == 0)  # empty response: no score, no penalty


def _gae_reference(rewards: list[float], values: list[float], gamma: float, lam: float):
    """Textbook per-sequence GAE, straight from eq. 8-9: A_t = sum_l (gamma lam)^l delta_{t+l}."""
    n = len(rewards)
    v_next = [*values[1:], 0.0]
    deltas = [rewards[t] + gamma * v_next[t] - values[t] for t in range(n)]
    adv = [sum((gamma * lam) ** (k - t) * deltas[k] for k in range(t, n)) for t in range(n)]
    return adv, [a + v for a, v in zip(adv, values, strict=True)]


@pytest.mark.parametrize("layout", ["right", "left", "holes"])
@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.9, 0.5), (0.99, 1.0), (1.0, 0.0)])
def test_gae_matches_per_sequence_reference(layout: str, gamma: float, lam: float) -> None:
    g = _gen(9)
    lengths, width = [7, 1, 4, 0, 9, 2], 9
    mask = _ragged_mask(lengths, width, layout, g)
    r_rows = [torch.randn(n, generator=g).tolist() for n in lengths]
    v_rows = [torch.randn(n, generator=g).tolist() for n in lengths]
    rewards = _scatter_rows(r_rows, mask, fill=float("nan"))
    values = _scatter_rows(v_rows, mask, fill=1e9)
    adv, ret = gae(rewards, values, mask.float(), gamma, lam)
    exp_a, exp_r = [], []
    for r, v in zip(r_rows, v_rows, strict=True):
        a, rt = _gae_reference(r, v, gamma, lam)
        exp_a.append(a)
        exp_r.append(rt)
    torch.testing.assert_close(adv, _scatter_rows(exp_a, mask, fill=0.0))
    torch.testing.assert_close(ret, _scatter_rows(exp_r, mask, fill=0.0))
    assert not adv.requires_grad


def test_gae_hand_case_and_limits() -> None:
    # 3 tokens, gamma = 1, lam = 0.5: deltas = r + V' - V
    r, v = [0.0, 0.0, 1.0], [0.5, 0.25, 0.75]
    d = [0 + 0.25 - 0.5, 0 + 0.75 - 0.25, 1 + 0 - 0.75]  # [-0.25, 0.5, 0.25]
    a2 = d[2]
    a1 = d[1] + 0.5 * a2
    a0 = d[0] + 0.5 * a1
    adv, ret = gae(torch.tensor([r]), torch.tensor([v]), torch.ones(1, 3), 1.0, 0.5)
    torch.testing.assert_close(adv, torch.tensor([[a0, a1, a2]]))
    torch.testing.assert_close(ret, torch.tensor([[a0 + 0.5, a1 + 0.25, a2 + 0.75]]))
    # eq. 11: lam = 1, gamma = 1 -> returns are the reward-to-go (Monte Carlo)
    _, ret1 = gae(torch.tensor([r]), torch.tensor([v]), torch.ones(1, 3), 1.0, 1.0)
    torch.testing.assert_close(ret1, torch.tensor([[1.0, 1.0, 1.0]]))
    # eq. 10: lam = 0 -> one-step TD error
    adv0, _ = gae(torch.tensor([r]), torch.tensor([v]), torch.ones(1, 3), 1.0, 0.0)
    torch.testing.assert_close(adv0, torch.tensor([d]))


def test_gae_bf16_inputs_give_float32() -> None:
    r = torch.randn(2, 5).bfloat16()
    v = torch.randn(2, 5).bfloat16()
    adv, _ = gae(r, v, torch.ones(2, 5), 1.0, 0.95)
    assert adv.dtype == torch.float32
    ref, _ = gae(r.float(), v.float(), torch.ones(2, 5), 1.0, 0.95)
    torch.testing.assert_close(adv, ref)


# ---------------------------------------------------------------------------------------------------------
# advantage normalisation
# ---------------------------------------------------------------------------------------------------------


def test_normalize_advantages_switches() -> None:
    g = _gen(10)
    a = torch.randn(3, 5, generator=g, dtype=torch.float64) * 4 + 2
    mask = _ragged_mask([5, 2, 4], 5, "holes", g)
    a_nan = a.clone()
    a_nan[~mask] = float("nan")
    off = normalize_advantages(a_nan, mask, normalize=False, clip=None)
    torch.testing.assert_close(off, torch.where(mask, a, torch.zeros(())))
    clipped = normalize_advantages(a_nan, mask, normalize=False, clip=1.5)
    for i in range(3):
        for j in range(5):
            expect = max(-1.5, min(1.5, a[i, j].item())) if mask[i, j] else 0.0
            assert clipped[i, j].item() == pytest.approx(expect)
    normed = normalize_advantages(a_nan, mask, normalize=True, clip=None)
    sel = torch.tensor(_selected(normed, mask), dtype=torch.float64)
    assert sel.mean().item() == pytest.approx(0.0, abs=1e-9)
    assert sel.var().item() == pytest.approx(1.0, abs=1e-6)
    both = normalize_advantages(a_nan, mask, normalize=True, clip=0.5)
    torch.testing.assert_close(both, normed.clamp(-0.5, 0.5))


# ---------------------------------------------------------------------------------------------------------
# policy and value losses
# ---------------------------------------------------------------------------------------------------------


def test_policy_loss_clipped_vs_loop_and_gradients() -> None:
    eps = 0.2
    # ratios chosen to hit every case: inside the band, above/below it with A > 0 and A < 0
    log_ratio = [math.log(x) for x in [1.1, 1.5, 0.5, 1.5, 0.5, 0.9, 3.0]]
    adv_l = [1.0, 2.0, 1.0, -1.0, -2.0, -0.5, 0.0]
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0]], dtype=torch.float32)
    old = torch.randn(1, 8, dtype=torch.float64)
    new = (old.detach() + torch.tensor([[*log_ratio, 5.0]], dtype=torch.float64)).requires_grad_(True)
    old.requires_grad_(True)
    adv = torch.tensor([[*adv_l, 100.0]], dtype=torch.float64, requires_grad=True)

    loss, metrics = policy_loss(new, old, adv, mask, clip_ratio=eps)
    obj, clipped_count, grads = [], 0, []
    for lr, a in zip(log_ratio, adv_l, strict=True):
        ratio = math.exp(lr)
        surr1, surr2 = ratio * a, max(1 - eps, min(1 + eps, ratio)) * a
        obj.append(min(surr1, surr2))
        clipped_count += surr2 < surr1  # the clipped branch is the active (smaller) one
        grads.append(-a * ratio / 7 if surr1 <= surr2 else 0.0)  # d(-obj)/d logp
    assert loss.item() == pytest.approx(-sum(obj) / 7)
    assert clipped_count == 2  # by hand: (ratio 1.5, A=2) and (ratio 0.5, A=-2)
    assert metrics["pg_clipfrac"].item() == pytest.approx(clipped_count / 7)
    ratios = [math.exp(x) for x in log_ratio]
    assert metrics["ratio_mean"].item() == pytest.approx(sum(ratios) / 7)
    assert metrics["ratio_max"].item() == pytest.approx(3.0)  # the padded ratio e^5 is ignored
    assert metrics["ratio_min"].item() == pytest.approx(0.5)
    assert metrics["approx_kl"].item() == pytest.approx(sum(x - 1 - math.log(x) for x in ratios) / 7)
    assert metrics["ratio_clamped"].item() == 0.0

    loss.backward()
    torch.testing.assert_close(new.grad[0, :7], torch.tensor(grads, dtype=torch.float64))
    assert new.grad[0, 7].item() == 0.0
    assert old.grad is None and adv.grad is None
    assert all(not v.requires_grad for v in metrics.values())


def test_policy_loss_clipfrac_hand_count() -> None:
    # rows: ratio 1.5 with A=+1 (clipped), ratio 0.5 with A=+1 (not clipped: min picks the unclipped),
    # ratio 0.5 with A=-1 (clipped), ratio 1.5 with A=-1 (not clipped), ratio 1.0 (never)
    ratios = torch.tensor([[1.5, 0.5, 0.5, 1.5, 1.0]])
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 1.0]])
    _, m = policy_loss(ratios.log(), torch.zeros(1, 5), adv, torch.ones(1, 5), clip_ratio=0.2)
    assert m["pg_clipfrac"].item() == pytest.approx(2 / 5)


def test_policy_loss_unclipped() -> None:
    ratios = torch.tensor([[1.5, 0.5, 3.0]])
    adv = torch.tensor([[1.0, -2.0, 0.5]])
    loss, m = policy_loss(ratios.log(), torch.zeros(1, 3), adv, torch.ones(1, 3), clip_ratio=None)
    assert loss.item() == pytest.approx(-(1.5 * 1 + 0.5 * -2 + 3 * 0.5) / 3)
    assert m["pg_clipfrac"].item() == 0.0


def test_policy_loss_huge_log_ratio_is_clamped_finite_and_counted() -> None:
    """exp(200) overflows float32 before the clip: the log-ratio is clamped to +-20 first, so loss, gradient
    and metrics stay finite and the clamped tokens are counted (a padded huge ratio is neither counted nor
    allowed to poison the gradient)."""
    log_ratio = torch.tensor([[0.1, 200.0, -200.0, 30.0, 20.0, 500.0]])
    adv = torch.tensor([[1.0, -1.0, 1.0, 1.0, -1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]], dtype=torch.float32)
    for clip in (0.2, None):
        new = log_ratio.clone().requires_grad_(True)
        loss, m = policy_loss(new, torch.zeros(1, 6), adv, mask, clip_ratio=clip)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(new.grad).all()
        assert all(torch.isfinite(v) for v in m.values())
        assert m["ratio_clamped"].item() == 3.0  # 200, -200, 30; 20 sits on the bound; 500 is padding
        assert m["ratio_max"].item() == pytest.approx(math.exp(20.0), rel=1e-6)
        # the clamped tokens carry no gradient; the in-range ones keep the exact one
        assert new.grad[0, 1].item() == new.grad[0, 2].item() == new.grad[0, 3].item() == 0.0
        assert new.grad[0, 0].item() == pytest.approx(-math.exp(0.1) / 5)


def _dual_clip_objective(ratio: float, a: float, eps: float, c: float) -> tuple[float, float, bool]:
    """(objective, d(-objective)/d log-ratio, whether the dual clip binds) of one token, from Ye et al. 2020:
    max(min(rA, clip(r)A), cA) for A < 0, min(rA, clip(r)A) otherwise."""
    surr1, surr2 = ratio * a, max(1 - eps, min(1 + eps, ratio)) * a
    ppo = min(surr1, surr2)
    if a < 0 and c * a > ppo:
        return c * a, 0.0, True
    return ppo, (-a * ratio if surr1 <= surr2 else 0.0), False


def test_policy_loss_dual_clip_vs_loop_and_gradients() -> None:
    eps, c = 0.2, 3.0
    g = _gen(3)
    # ratios from ~0.05 to ~20: below, inside and above the clip band, and above c, with A of both signs
    log_ratio = torch.linspace(-3.0, 3.0, 25, dtype=torch.float64)
    adv = torch.randn(25, generator=g, dtype=torch.float64) * 2
    adv[::4] = -adv[::4].abs()
    adv[1::4] = adv[1::4].abs()
    mask = torch.ones(1, 26, dtype=torch.bool)
    mask[0, -1] = False  # a padded token with a huge ratio and A < 0: neither counted nor in the gradient
    new = torch.cat([log_ratio, torch.tensor([8.0], dtype=torch.float64)]).unsqueeze(0).requires_grad_(True)
    a_all = torch.cat([adv, torch.tensor([-5.0], dtype=torch.float64)]).unsqueeze(0)

    loss, m = policy_loss(new, torch.zeros_like(new), a_all, mask, clip_ratio=eps, dual_clip=c)
    rows = [
        _dual_clip_objective(math.exp(x), a, eps, c)
        for x, a in zip(log_ratio.tolist(), adv.tolist(), strict=True)
    ]
    binds = sum(b for _, _, b in rows)
    assert 0 < binds < 25 and any(a < 0 and not b for (_, _, b), a in zip(rows, adv.tolist(), strict=True))
    assert loss.item() == pytest.approx(-sum(o for o, _, _ in rows) / 25)
    assert m["dual_clip_frac"].item() == pytest.approx(binds / 25)
    loss.backward()
    torch.testing.assert_close(
        new.grad[0, :25], torch.tensor([d / 25 for _, d, _ in rows], dtype=torch.float64)
    )
    assert new.grad[0, 25].item() == 0.0
    # A >= 0 and the tokens where it does not bind: the ordinary clipped surrogate, token by token
    plain, pm = policy_loss(new.detach(), torch.zeros_like(new), a_all, mask, clip_ratio=eps)
    assert pm["dual_clip_frac"].item() == 0.0 and pm["pg_clipfrac"].item() == m["pg_clipfrac"].item()
    assert loss.item() <= plain.item() + 1e-12  # a lower bound on the objective: the loss can only fall
    assert binds == sum(
        a < 0 and math.exp(x) > c for x, a in zip(log_ratio.tolist(), adv.tolist(), strict=True)
    )


def test_policy_loss_dual_clip_by_hand() -> None:
    """eps 0.2, c 3: (r 5, A -1) binds: objective max(min(-5, -1.2), -3) = -3, no gradient; (r 2, A -1) does
    not: -2; (r 5, A +1) is clipped as usual: 1.2; (r 0.5, A -1): clipped, -0.8."""
    ratios = torch.tensor([[5.0, 2.0, 5.0, 0.5]], dtype=torch.float64)
    adv = torch.tensor([[-1.0, -1.0, 1.0, -1.0]], dtype=torch.float64)
    new = ratios.log().requires_grad_(True)
    loss, m = policy_loss(new, torch.zeros_like(new), adv, torch.ones(1, 4), clip_ratio=0.2, dual_clip=3.0)
    assert loss.item() == pytest.approx(-(-3.0 - 2.0 + 1.2 - 0.8) / 4)
    assert m["dual_clip_frac"].item() == pytest.approx(1 / 4)
    assert m["pg_clipfrac"].item() == pytest.approx(2 / 4)  # disjoint from the dual clip
    loss.backward()
    torch.testing.assert_close(new.grad, torch.tensor([[0.0, 2.0 / 4, 0.0, 0.0]], dtype=torch.float64))


def test_policy_loss_dual_clip_needs_a_clip_and_c_above_1() -> None:
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss(x, x, x, torch.ones(1, 2), clip_ratio=None, dual_clip=3.0)
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss(x, x, x, torch.ones(1, 2), clip_ratio=0.2, dual_clip=1.0)


# ---------------------------------------------------------------------------------------------------------
# KL control: the adaptive coefficient and KL as a loss term
# ---------------------------------------------------------------------------------------------------------


def test_adaptive_kl_controller_hand_computed_sequence() -> None:
    """Ziegler et al. 2019 sec. 2.2, target 6 nats, horizon 10000, 64 responses an iteration (K = 0.0064):
    KL 12 -> error +1 clipped to +0.2; 6 -> 0; 3 -> -0.5 clipped to -0.2; 6.6 -> +0.1; inf -> +0.2."""
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    k = 64 / 10000
    expected, beta = [], 0.1
    for err in (0.2, 0.0, -0.2, 0.1, 0.2):
        beta *= 1 + k * err
        expected.append(beta)
    got = [ctl.update(kl, 64) for kl in (12.0, 6.0, 3.0, 6.6, math.inf)]
    assert got == pytest.approx(expected, rel=1e-12) and ctl.value == got[-1]
    assert expected[0] == pytest.approx(0.100128)
    assert ctl.update(math.nan, 64) == got[-1]  # nothing measured: unchanged
    # above target beta rises, below it falls, monotonically
    up, down = AdaptiveKLController(1.0, 1.0, 100), AdaptiveKLController(1.0, 1.0, 100)
    ups = [up.update(2.0, 10) for _ in range(5)]
    downs = [down.update(0.5, 10) for _ in range(5)]
    assert ups == sorted(ups) and ups[0] > 1.0 and downs == sorted(downs, reverse=True) and downs[0] < 1.0


def test_adaptive_kl_controller_state_round_trip_and_bounds() -> None:
    a = AdaptiveKLController(0.05, 2.0, 1000)
    for kl in (5.0, 1.0, 2.5):
        a.update(kl, 128)
    b = AdaptiveKLController(0.05, 2.0, 1000)
    b.load_state_dict(a.state_dict())
    assert [a.update(kl, 128) for kl in (0.3, 9.0)] == [b.update(kl, 128) for kl in (0.3, 9.0)]
    with pytest.raises(ValueError):
        AdaptiveKLController(0.0, 2.0, 1000)  # a multiplicative controller cannot leave 0
    with pytest.raises(ValueError, match="n_steps / horizon"):
        a.update(1.0, 5000)  # K = 5: beta could reach 0 in one step


def _kl_estimate_by_formula(lp: torch.Tensor, ref: torch.Tensor, estimator: str) -> torch.Tensor:
    r = torch.exp(ref) / torch.exp(lp)
    return {"k1": torch.log(1 / r), "k2": 0.5 * torch.log(r) ** 2, "k3": r - 1 - torch.log(r)}[estimator]


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_loss_value_and_gradient_vs_an_independent_formula(estimator: str) -> None:
    g = _gen(7)
    lp0 = -torch.rand(3, 6, generator=g, dtype=torch.float64) * 3
    ref = -torch.rand(3, 6, generator=g, dtype=torch.float64) * 3
    mask = _ragged_mask([6, 2, 4], 6, "holes", g)
    lp = lp0.clone().requires_grad_(True)
    ref_leaf = ref.clone().requires_grad_(True)
    loss, m = kl_loss(lp, ref_leaf, mask, 0.3, estimator)
    loss.backward()
    # independent: the per-token formula from probabilities, summed over the selected tokens by a loop
    leaf = lp0.clone().requires_grad_(True)
    k = _kl_estimate_by_formula(leaf, ref, estimator)
    picked = [k[i, j] for i in range(3) for j in range(6) if mask[i, j]]
    expect = 0.3 * sum(picked) / len(picked)
    expect.backward()
    assert loss.item() == pytest.approx(expect.item(), rel=1e-12)
    assert m["kl_loss"].item() == pytest.approx(expect.item()) and m["kl_mean"].item() == pytest.approx(
        expect.item() / 0.3
    )
    torch.testing.assert_close(lp.grad, leaf.grad)
    # and by hand: d k1 = 1, d k2 = log pi - log ref, d k3 = 1 - ref/pi, over the masked tokens' mean
    by_hand = {"k1": torch.ones_like(lp0), "k2": lp0 - ref, "k3": 1 - torch.exp(ref - lp0)}[estimator]
    torch.testing.assert_close(lp.grad, torch.where(mask, 0.3 * by_hand / len(picked), 0.0))
    assert ref_leaf.grad is None  # the reference is detached


def test_kl_loss_expected_gradients_by_exact_enumeration() -> None:
    """What each estimator's gradient means on-policy (the docstring of kl_loss), exactly on a categorical
    pi = softmax(theta) over 6 tokens: sum_y pi(y) grad k(y) (the sampling distribution held fixed) is 0 for
    k1, grad KL(pi || ref) for k2 and grad KL(ref || pi) for k3."""
    g = _gen(11)
    theta0 = torch.randn(6, generator=g, dtype=torch.float64)
    ref = torch.log_softmax(torch.randn(6, generator=g, dtype=torch.float64), -1)
    pi = torch.softmax(theta0, -1)
    expected = {}
    for est in ("k1", "k2", "k3"):
        theta = theta0.clone().requires_grad_(True)
        lp = torch.log_softmax(theta, -1)
        # each token y is one sample, weighted by its (fixed) probability: E_{y~pi}[grad kl_loss(y)]
        weighted = sum(
            pi[y] * kl_loss(lp[y].view(1, 1), ref[y].view(1, 1), torch.ones(1, 1), 1.0, est)[0]
            for y in range(6)
        )
        (expected[est],) = torch.autograd.grad(weighted, theta)
    theta = theta0.clone().requires_grad_(True)
    lp = torch.log_softmax(theta, -1)
    (reverse,) = torch.autograd.grad((lp.exp() * (lp - ref)).sum(), theta)  # KL(pi || ref)
    theta = theta0.clone().requires_grad_(True)
    lp = torch.log_softmax(theta, -1)
    (forward,) = torch.autograd.grad((ref.exp() * (ref - lp)).sum(), theta)  # KL(ref || pi)
    torch.testing.assert_close(expected["k1"], torch.zeros(6, dtype=torch.float64))
    torch.testing.assert_close(expected["k2"], reverse)
    torch.testing.assert_close(expected["k3"], forward)
    assert not torch.allclose(reverse, forward)


def test_value_loss_vs_loop_and_gradients() -> None:
    c = 0.2
    vals = [1.0, 1.0, 0.5, 2.0, 0.0]
    olds = [0.5, 1.1, 1.0, 1.9, 0.0]
    rets = [2.0, 0.0, 0.6, 0.0, 1.0]
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    values = torch.tensor([[*vals, 50.0]], requires_grad=True)
    old_values = torch.tensor([[*olds, 0.0]], requires_grad=True)
    returns = torch.tensor([[*rets, -50.0]], requires_grad=True)

    loss, m = value_loss(values, old_values, returns, mask, value_clip=c)
    terms, n_clip, grads = [], 0, []
    for v, o, r in zip(vals, olds, rets, strict=True):
        vc = o + max(-c, min(c, v - o))
        l1, l2 = (v - r) ** 2, (vc - r) ** 2
        terms.append(max(l1, l2))
        n_clip += l2 > l1
        grads.append((v - r) / 5 if l1 >= l2 else (0.0 if abs(v - o) > c else (vc - r) / 5))
    assert loss.item() == pytest.approx(0.5 * sum(terms) / 5)
    assert m["vf_clipfrac"].item() == pytest.approx(n_clip / 5)
    assert n_clip == 2  # by hand: tokens 0 and 2 moved more than c away from old, towards worse
    assert m["value_mean"].item() == pytest.approx(sum(vals) / 5)
    loss.backward()
    torch.testing.assert_close(values.grad[0, :5], torch.tensor(grads))
    assert values.grad[0, 5].item() == 0.0
    assert old_values.grad is None and returns.grad is None

    plain, m2 = value_loss(values, old_values, returns, mask, value_clip=None)
    assert plain.item() == pytest.approx(0.5 * sum((v - r) ** 2 for v, r in zip(vals, rets, strict=True)) / 5)
    assert m2["vf_clipfrac"].item() == 0.0


# ---------------------------------------------------------------------------------------------------------
# entropy, log-probs, NLL
# ---------------------------------------------------------------------------------------------------------


def test_entropy_from_logits_vs_definition() -> None:
    g = _gen(11)
    logits = torch.randn(3, 4, 10, generator=g, dtype=torch.float64) * 3
    p = logits.softmax(-1)
    expect = -(p * p.log()).sum(-1)
    torch.testing.assert_close(entropy_from_logits(logits), expect)
    # huge logits: finite and right (a near one-hot distribution has near-zero entropy)
    big = entropy_from_logits(torch.tensor([[[1000.0, 0.0, -1000.0]]]))
    assert torch.isfinite(big).all() and big.item() == pytest.approx(0.0, abs=1e-6)
    # -inf logits (masked vocabulary) are zero-probability and contribute nothing
    masked = entropy_from_logits(torch.tensor([[[0.0, 0.0, -math.inf]]]))
    assert masked.item() == pytest.approx(math.log(2))
    # bf16 input is computed in float32
    out = entropy_from_logits(logits.bfloat16())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expect.float(), atol=0.05, rtol=0.02)


def test_entropy_bonus_loss_clip_and_gradient() -> None:
    ent = torch.tensor([[0.5, 2.0, 1.0, 9.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, m = entropy_bonus_loss(ent, mask, coef=0.1, clip=1.2)
    assert loss.item() == pytest.approx(-0.1 * (0.5 + 1.2 + 1.0) / 3)
    assert m["entropy"].item() == pytest.approx((0.5 + 2.0 + 1.0) / 3)
    assert m["entropy_clipfrac"].item() == pytest.approx(1 / 3)
    loss.backward()
    # only tokens below the clip are pushed up; the one above it and the padded one get no gradient
    torch.testing.assert_close(ent.grad, torch.tensor([[-0.1 / 3, 0.0, -0.1 / 3, 0.0]]))
    unclipped, _ = entropy_bonus_loss(ent, mask, coef=0.1, clip=None)
    assert unclipped.item() == pytest.approx(-0.1 * 3.5 / 3)


@pytest.mark.parametrize("temperature", [1.0, 0.8])
def test_logprobs_from_logits_vs_log_softmax_gather(temperature: float) -> None:
    g = _gen(12)
    logits = torch.randn(3, 5, 17, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 17, (3, 5), generator=g)
    expect = torch.log_softmax(logits / temperature, -1).gather(-1, labels[..., None]).squeeze(-1)
    out = logprobs_from_logits(logits, labels, temperature=temperature)
    torch.testing.assert_close(out, expect)
    # gradients agree too
    (g1,) = torch.autograd.grad(out.sum(), logits)
    (g2,) = torch.autograd.grad(expect.sum(), logits)
    torch.testing.assert_close(g1, g2)


def test_logprobs_from_logits_padding_labels_and_bf16() -> None:
    logits = torch.randn(2, 3, 7)
    labels = torch.tensor([[1, 2, -100], [-100, 0, 6]])
    out = logprobs_from_logits(logits, labels)  # -100 must not crash
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    ok = labels >= 0
    ref = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    torch.testing.assert_close(out[ok], ref[ok])
    bf = logprobs_from_logits(logits.bfloat16(), labels)
    assert bf.dtype == torch.float32


@pytest.mark.parametrize("slice_elements", [1, 13 * 3, 13 * 10, 13 * 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_vocab_reductions_by_slices_vs_log_softmax(monkeypatch, slice_elements, dtype, temperature) -> None:
    """Without a gradient the log-probs, entropy and exact KL go through the logits a few rows x positions at
    a time (one position per slice up to two rows with a remainder, here); each equals the log_softmax of
    the whole tensor in float64, for non-contiguous bf16/fp32 logits, padding labels and any temperature."""
    from ppomax.algos import vocab

    g = _gen(21)
    wide = (torch.randn(5, 9, 13, generator=g) * 4).to(dtype)
    logits, ref_logits = wide[:, 1:8], wide.flip(0)[:, 2:9]  # [5, 7, 13] views, not contiguous
    labels = torch.randint(0, 13, (5, 7), generator=g)
    labels[0, 3] = labels[4, 6] = -100
    z, ref_z = logits.double() / temperature, ref_logits.double() / temperature
    logp, ref_logp = z.log_softmax(-1), ref_z.log_softmax(-1)
    want_lp = logp.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    want_ent = -(logp.exp() * logp).sum(-1)
    want_kl = F.kl_div(ref_logp, logp, log_target=True, reduction="none").sum(-1)
    seen: list[tuple[int, ...]] = []
    real = vocab._logprobs
    monkeypatch.setattr(
        vocab, "_logprobs", lambda x, *a, **k: seen.append(tuple(x.shape)) or real(x, *a, **k)
    )
    monkeypatch.setattr(vocab, "VOCAB_SLICE_ELEMENTS", slice_elements)
    with torch.no_grad():
        lp = logprobs_from_logits(logits, labels, temperature)
        ent = entropy_from_logits(logits, temperature)
        kl = kl_from_logits(logits, ref_logits, temperature)
    assert len(seen) > 1 and all(s[0] * s[1] * s[2] <= max(13, slice_elements) for s in seen)
    tol = {"atol": 1e-5, "rtol": 1e-5}
    for got, want in ((lp, want_lp), (ent, want_ent), (kl, want_kl)):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want.float(), **tol)


@pytest.mark.parametrize("slice_elements", [1, 13 * 3, 1 << 24])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_scoring_reductions_in_one_pass_vs_log_softmax(
    monkeypatch, slice_elements, dtype, temperature
) -> None:
    """The scoring pass's log-probs (at the temperature and raw), entropy, the reference's log-probs and the exact
    KL from one log-softmax per model and slice: each equals the float64 log_softmax of the whole tensor, for
    non-contiguous bf16/fp32 logits, padding labels, a -inf logit of either model's and any temperature; the
    reference-less and entropy-less calls give the same columns."""
    from ppomax.algos import scoring_reductions, vocab

    monkeypatch.setattr(vocab, "VOCAB_SLICE_ELEMENTS", slice_elements)
    g = _gen(24)
    data = torch.randn(5, 9, 13, generator=g) * 4
    data[1, 3, 5] = -math.inf  # the policy's (position 2 of row 1), a token it rules out
    wide = data.to(dtype)
    logits, ref_logits = wide[:, 1:8], wide.flip(0)[:, 2:9]  # [5, 7, 13] views, not contiguous
    labels = torch.randint(0, 13, (5, 7), generator=g)
    labels[0, 3] = labels[4, 6] = -100
    index = labels.clamp(min=0)[..., None]

    def log_softmax(x: torch.Tensor, t: float) -> torch.Tensor:
        return (x.double() / t).log_softmax(-1)

    logp, ref_logp = log_softmax(logits, temperature), log_softmax(ref_logits, temperature)
    p = logp.exp()
    want = {
        "logprobs": logp.gather(-1, index).squeeze(-1),
        "raw_logprobs": log_softmax(logits, 1.0).gather(-1, index).squeeze(-1),
        "entropy": -torch.where(p > 0, p * logp, 0.0).sum(-1),
        "ref_logprobs": ref_logp.gather(-1, index).squeeze(-1),
        "ref_raw_logprobs": log_softmax(ref_logits, 1.0).gather(-1, index).squeeze(-1),
        "exact_kl": torch.where(p > 0, p * (logp - ref_logp), 0.0).sum(-1),
    }
    with torch.no_grad():
        got = scoring_reductions(logits, labels, temperature, ref_logits)
        alone = scoring_reductions(logits, labels, temperature)
        no_entropy = scoring_reductions(ref_logits, labels, temperature, entropy=False)
    assert set(got) == set(want) and set(alone) == {"logprobs", "raw_logprobs", "entropy"}
    for name, value in want.items():
        assert got[name].dtype == torch.float32 and got[name].shape == (5, 7), name
        torch.testing.assert_close(got[name], value.float(), atol=1e-5, rtol=1e-5, msg=name)
    for name in alone:
        torch.testing.assert_close(alone[name], got[name], atol=0, rtol=0)
    assert set(no_entropy) == {"logprobs", "raw_logprobs"}
    torch.testing.assert_close(no_entropy["logprobs"], got["ref_logprobs"], atol=0, rtol=0)
    assert got["exact_kl"].min() >= 0


@pytest.mark.parametrize("slice_elements", [11, 11 * 6, 1 << 24])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.8])
def test_logprobs_under_autograd_by_slices_vs_log_softmax_gather(
    monkeypatch, slice_elements, dtype, temperature
) -> None:
    """Under autograd the log-probs save only the logits and logsumexp and recompute softmax per slice in the
    backward: their values and gradients are those of log_softmax + gather (float64), for bf16 and fp32
    logits, non-contiguous, with padding labels; the logits are left as they were."""
    from ppomax.algos import vocab

    monkeypatch.setattr(vocab, "VOCAB_SLICE_ELEMENTS", slice_elements)
    g = _gen(22)
    wide = (torch.randn(3, 6, 11, generator=g) * 3).to(dtype).requires_grad_(True)
    logits = wide[:, 1:5]
    labels = torch.randint(0, 11, (3, 4), generator=g)
    labels[1, 2] = -100
    weights = torch.randn(3, 4, generator=g).double()
    before = logits.detach().clone()
    out = logprobs_from_logits(logits, labels, temperature)
    assert out.dtype == torch.float32
    (got,) = torch.autograd.grad((out.double() * weights).sum(), wide)
    assert torch.equal(logits.detach(), before)
    exact = wide.detach().double().requires_grad_(True)
    lp = (exact[:, 1:5] / temperature).log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    (want,) = torch.autograd.grad((lp * weights).sum(), exact)
    torch.testing.assert_close(out, lp.detach().float(), atol=1e-5, rtol=1e-5)
    assert got.dtype == dtype
    tol = {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}
    torch.testing.assert_close(got.double(), want, **tol)


@pytest.mark.parametrize("slice_elements", [11, 11 * 6, 1 << 24])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.8])
def test_entropy_under_autograd_by_slices_vs_definition(
    monkeypatch, slice_elements, dtype, temperature
) -> None:
    """Under autograd the entropy saves only the logits and two statistics per position and recomputes softmax
    per slice in the backward: its values and gradients are those of -sum p log p (float64), for bf16 and fp32
    logits, non-contiguous, with a -inf logit (zero probability: no gradient either)."""
    from ppomax.algos import vocab

    monkeypatch.setattr(vocab, "VOCAB_SLICE_ELEMENTS", slice_elements)
    g = _gen(23)
    data = torch.randn(3, 6, 11, generator=g) * 3
    data[2, 3, 4] = -math.inf
    wide = data.to(dtype).requires_grad_(True)
    logits = wide[:, 1:5]
    weights = torch.randn(3, 4, generator=g).double()
    out = entropy_from_logits(logits, temperature)
    assert out.dtype == torch.float32
    (got,) = torch.autograd.grad((out.double() * weights).sum(), wide)
    # -inf as -1e4 in float64: exp underflows to exactly 0, and the reference's gradient stays finite
    exact = wide.detach().double().nan_to_num(neginf=-1e4).requires_grad_(True)
    logp = (exact[:, 1:5] / temperature).log_softmax(-1)
    ent = -(logp.exp() * logp).sum(-1)
    (want,) = torch.autograd.grad((ent * weights).sum(), exact)
    torch.testing.assert_close(out, ent.detach().float(), atol=1e-5, rtol=1e-5)
    assert got.dtype == dtype and got[2, 3, 4] == 0
    tol = {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}
    torch.testing.assert_close(got.double(), want, **tol)


def test_logprobs_and_entropy_under_autograd_save_no_vocabulary_sized_copy() -> None:
    """What autograd keeps for the backward of the log-probs and entropy of bf16 logits at a temperature: the
    logits themselves and per-position tensors, no float32 (upcast, scaled, softmax) [B, T, V] tensor."""
    logits = torch.randn(2, 3, 50, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 50, (2, 3))
    saved: list[torch.Tensor] = []

    def keep(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        loss = logprobs_from_logits(logits, labels, 0.8).sum() + entropy_from_logits(logits, 0.8).sum()
    big = [t for t in saved if t.numel() >= logits.numel()]
    assert big and all(t.dtype == torch.bfloat16 and t.data_ptr() == logits.data_ptr() for t in big)
    loss.backward()
    assert logits.grad is not None and logits.grad.shape == logits.shape


def test_lm_nll_vs_cross_entropy() -> None:
    g = _gen(13)
    logits = torch.randn(2, 6, 11, generator=g)
    labels = torch.randint(0, 11, (2, 6), generator=g)
    mask = _ragged_mask([4, 2], 6, "left", g)
    ce = F.cross_entropy(
        logits.reshape(-1, 11), labels.masked_fill(~mask, -100).reshape(-1), ignore_index=-100
    )
    assert lm_nll(logits, labels, mask).item() == pytest.approx(ce.item(), rel=1e-6)
    # the sum (a mean over several batches adds sums and counts) is the mean times the token count
    total = lm_nll(logits, labels, mask, reduction="sum")
    assert total.item() == pytest.approx(ce.item() * int(mask.sum()), rel=1e-6)


# ---------------------------------------------------------------------------------------------------------
# reward model loss
# ---------------------------------------------------------------------------------------------------------


def test_pairwise_rm_loss_by_hand() -> None:
    rw = torch.tensor([2.0, 0.0, 1.0, 500.0], requires_grad=True)
    rl = torch.tensor([1.0, 0.0, 3.0, -500.0])
    nll = torch.tensor(2.5, requires_grad=True)

    def log_sigmoid(d: float) -> float:
        return -math.log1p(math.exp(-d))

    margins = [1.0, 0.0, -2.0, 1000.0]
    rm_term = -sum(log_sigmoid(d) for d in margins) / 4
    loss, m = pairwise_rm_loss(rw, rl, nll, beta_rm=0.5, lam=2.0)
    assert loss.item() == pytest.approx(2.0 * rm_term + 0.5 * 2.5)
    assert m["rm_loss"].item() == pytest.approx(rm_term)
    assert m["lm_loss"].item() == pytest.approx(2.5)
    assert m["accuracy"].item() == pytest.approx(2 / 4)  # the tie counts as wrong
    assert m["margin_mean"].item() == pytest.approx(sum(margins) / 4)
    loss.backward()
    assert torch.isfinite(rw.grad).all()
    assert nll.grad.item() == pytest.approx(0.5)
    # d/d r_w of -lam * log sigmoid(d) / B = -lam * (1 - sigmoid(d)) / B
    sig = [1 / (1 + math.exp(-d)) for d in margins]
    torch.testing.assert_close(rw.grad, torch.tensor([-2.0 * (1 - s) / 4 for s in sig]))

    no_lm, m2 = pairwise_rm_loss(rw.detach(), rl, None)
    assert no_lm.item() == pytest.approx(rm_term)
    assert m2["lm_loss"].item() == 0.0
    beta0, _ = pairwise_rm_loss(rw.detach(), rl, torch.tensor(9.0), beta_rm=0.0)
    assert beta0.item() == pytest.approx(rm_term)


# ---------------------------------------------------------------------------------------------------------
# score re-parameterisation (paper 5.3.1, eq. 18)
# ---------------------------------------------------------------------------------------------------------


def _reparam_by_hand(
    scores: list[float], seen: list[float], transform: str, clip: float | None
) -> list[float]:
    """Eq. 18 and reward scaling written out with the statistics module, one score at a time."""
    import statistics

    mean, std = statistics.fmean(seen), statistics.stdev(seen)
    out = []
    for r in scores:
        x = {"none": r, "scale": r / std, "normalize": (r - mean) / std}[transform]
        if clip is not None:
            x = min(max(x, -clip), clip)
        out.append(x)
    return out


@pytest.mark.parametrize(
    ("transform", "clip"),
    [("none", None), ("scale", None), ("scale", 1.0), ("normalize", None), ("normalize", 0.8)],
)
def test_reparameterize_scores_against_eq_18_by_hand(transform: str, clip: float | None) -> None:
    seen = [1.0, 3.0, 5.0, 7.0, -2.0, 11.0]
    moments = RunningMoments()
    moments.update(torch.tensor(seen[:3]))
    moments.update(torch.tensor(seen[3:]))
    scores = [4.0, 20.0, -20.0, 5.0, 0.0]
    out = reparameterize_scores(torch.tensor(scores), moments.mean, moments.std, transform, clip)
    expect = _reparam_by_hand(scores, seen, transform, clip)
    torch.testing.assert_close(out, torch.tensor(expect), atol=1e-6, rtol=1e-6)
    if clip is not None:
        assert out.abs().max().item() == pytest.approx(clip)  # the outliers hit the bound in std units


def test_reparameterize_scores_before_any_statistics_is_the_identity() -> None:
    """Before two scores were seen the running moments are mean 0, std 1 (RunningMoments' documented start)."""
    fresh = RunningMoments()
    x = torch.tensor([3.0, -1.5])
    for transform in ("none", "scale", "normalize"):
        torch.testing.assert_close(reparameterize_scores(x, fresh.mean, fresh.std, transform, None), x)


def test_reparameterize_scores_refuses_a_clip_in_raw_units() -> None:
    with pytest.raises(ValueError, match="running-std units"):
        reparameterize_scores(torch.tensor([1.0]), 0.0, 1.0, "none", 1.0)
    with pytest.raises(ValueError, match="transform"):
        reparameterize_scores(torch.tensor([1.0]), 0.0, 1.0, "whiten", None)  # type: ignore[arg-type]


def test_trainable_rows_by_hand() -> None:
    nan, inf = float("nan"), float("inf")
    scores = torch.tensor([1.0, nan, inf, -inf, -3.0])
    assert trainable_rows(scores).tolist() == [True, False, False, False, True]
    replaced = torch.tensor([False, True, False, True, False])
    assert trainable_rows(scores, replaced).tolist() == [True, True, False, True, True]


@pytest.mark.parametrize("shape", [(6, 11), (2, 3, 11)])
def test_logprobs_entropy_and_exact_kl_under_autograd_in_any_shape(shape) -> None:
    """The log-probs, the entropy and the exact KL are differentiable in any layout ([T, V] as well as [B, T, V])
    and their gradients equal those of the float64 definitions (the no-gradient path works in place and writes
    into reused buffers with ``out=``, which autograd cannot record)."""
    g = _gen(31)
    base, ref_base = torch.randn(*shape, generator=g) * 3, torch.randn(*shape, generator=g) * 3
    weights = torch.rand(*shape[:-1], generator=g)
    labels = torch.randint(0, shape[-1], shape[:-1], generator=g)
    got, want = [], []
    for dtype, out in ((torch.float32, got), (torch.float64, want)):
        logits = base.to(dtype, copy=True).requires_grad_(True)
        if dtype == torch.float32:
            lp = logprobs_from_logits(logits, labels, 0.7)
        else:
            lp = (logits / 0.7).log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        (lp * weights.to(dtype)).sum().backward()
        out.append(logits.grad)
    for dtype, out in ((torch.float32, got), (torch.float64, want)):
        logits = base.to(dtype, copy=True).requires_grad_(True)
        ref = ref_base.to(dtype, copy=True).requires_grad_(True)
        if dtype == torch.float32:
            ent, kl = entropy_from_logits(logits, 0.7), kl_from_logits(logits, ref, 0.7)
        else:
            logp, ref_logp = (logits / 0.7).log_softmax(-1), (ref / 0.7).log_softmax(-1)
            ent = -(logp.exp() * logp).sum(-1)
            kl = (logp.exp() * (logp - ref_logp)).sum(-1)
        (ent * weights.to(dtype)).sum().backward(retain_graph=True)
        out.append(logits.grad.clone())
        logits.grad = None
        (kl * weights.to(dtype)).sum().backward()
        out += [logits.grad, ref.grad]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b.float(), atol=1e-5, rtol=1e-4)
