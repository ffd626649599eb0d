"""The monitoring statistics (ppomax.algos.metrics) against values computed by hand, row by row in plain
Python, on a batch with padding, a non-finite score and two reward sources."""

from __future__ import annotations

import math

import pytest
import torch

from ppomax.algos import response_statistics, response_sums, rollout_statistics

MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
SCORES = torch.tensor([1.0, float("nan"), -2.0])


def _tokens(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows)


def _token_mean(x: torch.Tensor) -> float:
    vals = [x[i, j].item() for i in range(3) for j in range(4) if MASK[i, j]]
    return sum(vals) / len(vals)


def _stats(**over):
    kl = _tokens([[0.1, 0.2, 0.3, 9.0], [0.5, 9.0, 9.0, 9.0], [0.0, -0.1, 9.0, 9.0]]) * MASK
    lp = _tokens([[-1.0, -2.0, -0.5, 7.0], [-3.0, 7.0, 7.0, 7.0], [-0.1, -0.2, 7.0, 7.0]])
    args = {
        "scores": SCORES,
        "final_scores": torch.tensor([0.5, 0.0, -1.0]),
        "response_mask": MASK,
        "kl": kl,
        "raw_logprobs": lp,
        "ref_raw_logprobs": lp - 0.5,
        "entropy": -lp,
        "values": lp * 2,
        "returns": lp * 3,
        "advantages": lp * 4,
        "score_parts": {"rm": torch.tensor([2.0, float("inf"), 0.0]), "fn": torch.tensor([1.0, 2.0, 3.0])},
        "running_mean": 0.25,
        "running_std": 1.5,
    }
    return args | over, rollout_statistics(**(args | over))


def test_rollout_statistics_logs_the_largest_kl_estimate_and_what_a_clamp_cuts():
    _, out = _stats()
    assert out["kl/estimator_max"].item() == pytest.approx(0.5)  # 9.0 sits in padding
    assert "kl/estimator_clamped_count" not in out
    _, out = _stats(kl_clamp=0.25)
    assert out["kl/estimator_clamped_count"].item() == 2  # 0.3 and 0.5


def test_rollout_statistics_values():
    args, out = _stats()
    lp = args["raw_logprobs"]
    assert out["reward/raw_mean"].item() == pytest.approx(-0.5)  # the NaN row is left out
    assert out["reward/raw_std"].item() == pytest.approx(1.5)
    assert out["reward/running_mean"].item() == 0.25 and out["reward/running_std"].item() == 1.5
    assert out["reward/final_mean"].item() == pytest.approx(-0.5 / 3)
    assert out["kl/per_token"].item() == pytest.approx((0.1 + 0.2 + 0.3 + 0.5 + 0.0 - 0.1) / 6)
    assert out["kl/per_sequence"].item() == pytest.approx((0.6 + 0.5 - 0.1) / 3)
    nll = -(-1.0 - 2.0 - 0.5 - 3.0 - 0.1 - 0.2) / 6
    assert out["ppl/policy"].item() == pytest.approx(math.exp(nll))
    assert out["ppl/reference"].item() == pytest.approx(math.exp(nll + 0.5))
    assert out["response/length_mean"].item() == pytest.approx(2.0)
    assert out["policy/entropy"].item() == pytest.approx(nll)
    for key, factor in (("critic/value_mean", 2), ("returns/mean", 3), ("advantages/mean", 4)):
        assert out[key].item() == pytest.approx(factor * _token_mean(lp)), key
    assert out["reward/rm_mean"].item() == pytest.approx(1.0)  # inf left out
    assert out["reward/fn_mean"].item() == pytest.approx(2.0)


def test_rows_left_out_of_training_are_counted_and_enter_only_the_generation_statistics():
    """A NaN final score (compute_advantages' mark of a row left out): counted; out of the final score, returns
    and advantages; still in what describes the generations (length, KL)."""
    args, out = _stats(final_scores=torch.tensor([0.5, float("nan"), -1.0]))
    _, full = _stats()
    assert out["nonfinite/samples_count"].item() == 1 and full["nonfinite/samples_count"].item() == 0
    assert out["reward/final_mean"].item() == pytest.approx(-0.25)
    lp = args["raw_logprobs"]
    kept = [lp[i, j].item() for i in (0, 2) for j in range(4) if MASK[i, j]]
    assert out["returns/mean"].item() == pytest.approx(3 * sum(kept) / len(kept))
    assert out["advantages/mean"].item() == pytest.approx(4 * sum(kept) / len(kept))
    for key in ("response/length_mean", "kl/per_token", "kl/per_sequence", "ppl/policy", "critic/value_mean"):
        assert out[key].item() == full[key].item(), key


def test_rollout_statistics_are_global_through_all_reduce():
    """Two identical ranks (a hook that doubles sums and counts) give the one-rank values."""
    _, one = _stats()
    _, two = _stats(all_reduce=lambda t: 2 * t)
    for key in one:
        assert two[key].item() == pytest.approx(one[key].item(), nan_ok=True), key


def test_response_sums_and_statistics_values():
    mask = MASK
    kl = _tokens([[0.1, 0.2, 0.3, 0.0], [0.5, 0.0, 0.0, 0.0], [0.0, -0.1, 0.0, 0.0]])
    lp = _tokens([[-1.0, -2.0, -0.5, 7.0], [-3.0, 7.0, 7.0, 7.0], [-0.1, -0.2, 7.0, 7.0]])
    scores = torch.tensor([1.0, 2.0, -2.0])
    truncated = torch.tensor([False, True, False])
    half = response_sums(scores[:2], kl[:2], lp[:2], lp[:2] - 1.0, mask[:2], truncated[:2])
    rest = response_sums(scores[2:], kl[2:], lp[2:], lp[2:] - 1.0, mask[2:], truncated[2:])
    assert half.dtype == torch.float64 and half.shape == (8,)
    total = (half + rest).tolist()
    assert total == pytest.approx([1.0, 9.0, 3.0, 6.0, 6.8, 12.8, 1.0, 1.0])
    stats = response_statistics(total)
    assert stats["reward_mean"] == pytest.approx(1 / 3)
    assert stats["reward_std"] == pytest.approx(math.sqrt(3.0 - 1 / 9))
    assert stats["ppl_policy"] == pytest.approx(math.exp(6.8 / 6))
    assert stats["ppl_reference"] == pytest.approx(math.exp(12.8 / 6))
    assert stats["kl_per_token"] == pytest.approx(1 / 6) and stats["kl_per_sequence"] == pytest.approx(1 / 3)
    assert stats["length_mean"] == pytest.approx(2.0) and stats["truncated_frac"] == pytest.approx(1 / 3)
    empty = response_statistics([0.0] * 8)
    assert all(math.isfinite(v) for v in empty.values())


def test_response_statistics_perplexity_keeps_float64():
    """The totals are float64: the perplexity was exp of a float32-rounded mean (2e-7 off at a mean NLL of 5.7),
    while a huge mean NLL still gives inf, not an OverflowError."""
    sums = [0.0, 0.0, 12.0, 1000.0, 5675.123456789, 5000.0, 0.0, 0.0]
    stats = response_statistics(sums)
    assert stats["ppl_policy"] == pytest.approx(math.exp(5.675123456789), rel=1e-12)
    assert stats["ppl_reference"] == pytest.approx(math.exp(5.0), rel=1e-12)
    assert math.isinf(response_statistics([0.0, 0.0, 1.0, 1.0, 1e6, 0.0, 0.0, 0.0])["ppl_policy"])
