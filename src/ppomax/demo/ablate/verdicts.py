"""One verdict per claim of the paper's fig. 6, 7, 8 and 12 and the demo's two (:func:`verdicts`), each decided
on the seeds by a paired test (:func:`paired`): reproduced, not reproduced, or within the seeds' noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from statistics import fmean
from typing import Any

from ppomax.demo.markdown import fmt_list, fmt_num
from ppomax.demo.outcome import finite

# One-sided 95% quantiles of Student's t by degrees of freedom: a paired difference over n seeds is decided when
# its t statistic passes the quantile of n - 1 (with 3 seeds, t >= 2.92: a sign on 3 seeds alone is no verdict).
T95 = {1: 6.314, 2: 2.920, 3: 2.353, 4: 2.132, 5: 2.015, 6: 1.943, 7: 1.895, 8: 1.860, 9: 1.833, 10: 1.812}
HOLDS, FAILS, NOISE, CONTEXT = "holds", "fails", "within noise", "context"
# within the noise: the default seeds (0 1 2, their runs reused from the cache) and two more
MORE_SEEDS = "--seeds 0 1 2 3 4"


def paired(xs: Sequence[Any], ys: Sequence[Any], better: str = "higher") -> dict[str, Any]:
    """The paired difference of ``xs`` against ``ys`` (the same seeds, in order), signed so that positive means
    ``xs`` is better (``better``: higher or lower), and its one-sided paired t-test at 95%: ``decision`` is
    :data:`HOLDS` (better beyond the seed-to-seed noise), :data:`FAILS` (worse beyond it) or :data:`NOISE`.
    Seeds where either side is missing are dropped; one seed decides nothing."""
    sign = 1.0 if better == "higher" else -1.0
    d = [
        sign * (float(x) - float(y))
        for x, y in zip(xs, ys, strict=True)
        if finite(x) is not None and finite(y) is not None
    ]
    n = len(d)
    out: dict[str, Any] = {"n": n, "diffs": d, "mean": fmean(d) if d else float("nan"), "sd": 0.0, "t": None}
    if n < 2:
        out["decision"] = NOISE
        return out
    sd = (sum((x - out["mean"]) ** 2 for x in d) / (n - 1)) ** 0.5
    out["sd"] = sd
    crit = T95.get(n - 1, 1.645)
    if sd == 0:
        out["decision"] = HOLDS if out["mean"] > 0 else FAILS if out["mean"] < 0 else NOISE
        return out
    out["t"] = out["mean"] / (sd / n**0.5)
    out["decision"] = HOLDS if out["t"] >= crit else FAILS if out["t"] <= -crit else NOISE
    return out


def unanimous(flags: Sequence[bool]) -> str:
    """A yes/no comparison over seeds: :data:`HOLDS` when every seed says yes, :data:`FAILS` when most say no,
    else :data:`NOISE`."""
    if flags and all(flags):
        return HOLDS
    return FAILS if sum(not f for f in flags) * 2 > len(flags) else NOISE


def combine(decisions: Sequence[str], seeds: int = 0) -> str:
    """A claim's verdict from its comparisons (context lines aside): reproduced when every one holds, not
    reproduced when one fails, else within the noise (with fewer than 5 ``seeds`` behind it: asking for 5)."""
    ds = [d for d in decisions if d != CONTEXT]
    if ds and all(d == HOLDS for d in ds):
        return "reproduced"
    if any(d == FAILS for d in ds):
        return "not reproduced"
    return f"within noise (run {MORE_SEEDS})" if seeds < 5 else f"within noise ({seeds} seeds)"


def _per_seed(nums: dict[str, dict[int, dict[str, Any]]], name: str, key: str) -> list[Any]:
    return [nums[name][s].get(key) for s in sorted(nums.get(name, {}))]


def verdicts(nums: dict[str, dict[int, dict[str, Any]]]) -> list[dict[str, Any]]:
    """One verdict per claim, from the runs present (a claim whose variants did not run is "not run").

    A comparison holds on a seed when the variant is better than its baseline there; a claim is "reproduced" when
    every comparison it makes holds on a majority of the seeds that ran both sides."""
    c = _Claims(nums)
    for claim in (_fig6, _fig7, _fig8, _fig12, _demo, _whitening):
        claim(c)
    return c.out


class _Claims:
    """The verdicts so far (``out``) and how a claim compares the runs of ``nums`` (variant -> seed -> numbers)."""

    def __init__(self, nums: dict[str, dict[int, dict[str, Any]]]) -> None:
        self.nums = nums
        self.out: list[dict[str, Any]] = []

    def have(self, *names: str) -> bool:
        return all(n in self.nums and self.nums[n] for n in names)

    def common(self, *names: str) -> list[int]:
        seeds = set.intersection(*(set(self.nums[n]) for n in names))
        return sorted(seeds)

    def cmp(self, a: str, b: str, key: str, better: str = "lower") -> tuple[str, str]:
        seeds = self.common(a, b)
        va = [self.nums[a][s].get(key) for s in seeds]
        vb = [self.nums[b][s].get(key) for s in seeds]
        p = paired(va, vb, better)
        t = "n/a" if p["t"] is None else f"{p['t']:.2f}"
        return p["decision"], (
            f"{key} {a} {fmt_list(va)} vs {b} {fmt_list(vb)} (seeds {'/'.join(map(str, seeds))}; {better} is better, "
            f"paired difference {fmt_num(p['mean'], '+.3f')} ± {fmt_num(p['sd'], '.3f')} sd, t {t}: {p['decision']})"
        )

    def verdict(self, claim: str, figure: str, checks: list[tuple[str, str]], explain: str) -> None:
        result = combine([c[0] for c in checks], len(set().union(*self.nums.values())))
        self.out.append(
            {
                "claim": claim,
                "figure": figure,
                "verdict": result,
                "numbers": "; ".join(c[1] for c in checks),
                "explanation": explain if result == "not reproduced" else "",
            }
        )

    def not_run(self, claim: str, figure: str, names: Sequence[str]) -> None:
        missing = [n for n in names if not self.have(n)]
        self.out.append(
            {
                "claim": claim,
                "figure": figure,
                "verdict": "not run",
                "numbers": f"missing: {', '.join(missing)}",
                "explanation": "",
            }
        )


def _fig6(c: _Claims) -> None:
    """Fig. 6: reward and advantage normalisation (each with its clip) against vanilla PPO."""
    # (a) fig. 6: the paper's curves (reward normalisation at delta 0.3 and 0.8, advantage normalisation with its
    # clip at 0.5 and 0.12); the unclipped advantage normalisation (ours) is context
    names = ("vanilla", "reward_norm_0.3", "reward_norm_0.8", "adv_norm_0.5", "adv_norm_0.12")
    claim = "(a) reward normalisation + clipping and advantage normalisation stabilise early training"
    if c.have(*names):
        checks = []
        for v in names[1:]:
            checks.append(c.cmp(v, "vanilla", "kl_mid"))
            checks.append(c.cmp(v, "vanilla", "gold_drop_early"))
        seeds = c.common(*names)
        shown = [*names, *(["adv_norm"] if c.have("adv_norm") else [])]
        lengths = {
            n: [c.nums[n][s]["trajectories"]["length"]["end"] for s in seeds if s in c.nums[n]] for n in shown
        }
        checks.append(
            (
                CONTEXT,
                "(context) length end " + ", ".join(f"{n} {fmt_list(x, '.1f')}" for n, x in lengths.items()),
            )
        )
        c.verdict(
            claim,
            "fig. 6",
            checks,
            "without a KL term nothing pulls the policy back, and re-scaling the score (reward normalisation) or "
            "the advantages makes the RM's length bias, the largest part of its score's variance, a unit-scale "
            "signal: see the lengths; the tricks can lower KL, yet gold does not fall less than vanilla's beyond "
            "the seeds' noise. The paper's 'early' is ~100 of 1000 steps at lr 5e-7; hh-mini's runs drift within "
            "20 of 80 at lr 1e-4.",
        )
    else:
        c.not_run(claim, "fig. 6", names)


def _fig7(c: _Claims) -> None:
    """Fig. 7: the KL penalty and the entropy bonus against vanilla; the reference as the old policy."""
    # (b) fig. 7: "only a penalty of the policy entropy or KL divergence can provide a long-lasting stable
    # optimization" (the entropy bonus at fig. 16's coefficient and clip), and the reference as old policy trades
    # reward for stability
    names = ("vanilla", "kl_penalty", "entropy_bonus", "kl_reference_as_old")
    claim = (
        "(b) the KL penalty and the entropy bonus give long-lasting stability; importance sampling (reference as "
        "old policy) trades reward for stability"
    )
    if c.have(*names):
        seeds = c.common(*names)
        checks = []
        for v in ("kl_penalty", "entropy_bonus"):
            flags = [c.nums[v][s]["over_optimised"] for s in seeds]
            va_oo = [c.nums["vanilla"][s]["over_optimised"] for s in seeds]
            decision = unanimous([not x for x in flags])
            checks.append(
                (decision, f"over-optimised: {v} {fmt_list(flags)} vs vanilla {fmt_list(va_oo)}: {decision}")
            )
            checks.append(c.cmp(v, "vanilla", "gold_fall"))
        rm_kl = [c.nums["kl_penalty"][s]["trajectories"]["rm"]["end"] for s in seeds]
        rm_is = [c.nums["kl_reference_as_old"][s]["trajectories"]["rm"]["end"] for s in seeds]
        p = paired(rm_is, rm_kl, "lower")
        checks.append(
            (
                p["decision"],
                f"RM reward end kl_reference_as_old {fmt_list(rm_is)} vs kl_penalty {fmt_list(rm_kl)} (lower, paired "
                f"difference {fmt_num(p['mean'], '+.3f')} ± {fmt_num(p['sd'], '.3f')} sd: {p['decision']})",
            )
        )
        checks.append(c.cmp("kl_reference_as_old", "kl_penalty", "kl_mid"))
        c.verdict(
            claim,
            "fig. 7",
            checks,
            "see the numbers: a comparison that fails names which part of the claim does not hold here. The "
            "entropy bonus constrains no distance to the reference, and on hh-mini the RM's exploit (length) needs "
            "no low entropy; with the reference as the old policy every ratio is pi/pi_ref, so the clip bounds the "
            "distance to the reference itself, which at this learning rate may already be the binding constraint "
            "with or without the penalty.",
        )
    else:
        c.not_run(claim, "fig. 7", names)


def _fig8(c: _Claims) -> None:
    """Fig. 8: critic pre-training against vanilla; a policy that skipped SFT against PPO-max."""
    # (c) fig. 8
    names = ("vanilla", "critic_pretrain", "ppo_max", "policy_pretrained")
    claim = "(c) critic pre-training smooths early training; a policy without SFT fails"
    if c.have(*names):
        seeds = c.common(*names)
        wl = [c.nums["policy_pretrained"][s]["win_tie_lose"] for s in seeds]
        loses = unanimous([w[2] > w[0] for w in wl])
        checks = [
            c.cmp("critic_pretrain", "vanilla", "rm_roughness_early"),
            c.cmp("critic_pretrain", "vanilla", "kl_mid"),
            c.cmp("policy_pretrained", "ppo_max", "eval_gold_policy", better="lower"),
            (
                loses,
                f"policy_pretrained vs SFT win/tie/lose {', '.join('/'.join(map(str, w)) for w in wl)}: {loses}",
            ),
        ]
        c.verdict(
            claim,
            "fig. 8",
            checks,
            "hh-mini's critic starts from the RM, which already predicts the score at the last token, and 80 "
            "iterations on a 1M model leave little 'early' phase to smooth; and the pre-trained model answers "
            "dialogues too (its corpus holds dialogues), so it is a weaker but not an incapable policy.",
        )
    else:
        c.not_run(claim, "fig. 8", names)


def _fig12(c: _Claims) -> None:
    """Fig. 12: PPO-ptx's alignment tax against PPO-max's."""
    # (d) fig. 12
    names = ("ppo_max", "ppo_ptx")
    claim = "(d) PPO-ptx lowers the alignment tax (held-out pretraining-text loss)"
    if c.have(*names):
        seeds = c.common(*names)
        tax_max = [
            c.nums["ppo_max"][s]["heldout_loss"] - c.nums["ppo_max"][s]["heldout_loss_sft"] for s in seeds
        ]
        tax_ptx = [
            c.nums["ppo_ptx"][s]["heldout_loss"] - c.nums["ppo_ptx"][s]["heldout_loss_sft"] for s in seeds
        ]
        p = paired(tax_ptx, tax_max, "lower")
        c.verdict(
            claim,
            "fig. 12",
            [
                (
                    p["decision"],
                    f"loss - SFT's (nats/token): ppo_ptx {fmt_list(tax_ptx, '+.4f')} vs ppo_max {fmt_list(tax_max, '+.4f')} "
                    f"(paired difference {fmt_num(p['mean'], '+.4f')} ± {fmt_num(p['sd'], '.4f')} sd: {p['decision']})",
                )
            ],
            "PPO-max's KL penalty (0.5) already keeps the policy so close to SFT that there is little tax to lower, "
            "and the ptx loss here is on SFT demonstrations, not on the pretraining corpus the loss is measured on.",
        )
    else:
        c.not_run(claim, "fig. 12", names)


def _demo(c: _Claims) -> None:
    """The demo's two: vanilla over-optimises the RM, PPO-max beats SFT."""
    # the demo's two
    if c.have("vanilla"):
        seeds = sorted(c.nums["vanilla"])
        oo = [c.nums["vanilla"][s]["over_optimised"] for s in seeds]
        c.verdict(
            "(demo) vanilla PPO over-optimises the reward model",
            "fig. 4",
            [
                (
                    unanimous(oo),
                    f"over-optimised per seed {fmt_list(oo)}; gold fall {fmt_list(_per_seed(c.nums, 'vanilla', 'gold_fall'))}",
                )
            ],
            "in this run length the policy found no exploit of this seed's RM that lowers the gold reward "
            "(compare its KL and length: a vanilla run that barely moved has nothing to over-optimise with).",
        )
    if c.have("ppo_max"):
        seeds = sorted(c.nums["ppo_max"])
        wl = [c.nums["ppo_max"][s]["win_tie_lose"] for s in seeds]
        c.verdict(
            "(demo) PPO-max beats SFT by the gold judge",
            "fig. 10",
            [
                (
                    unanimous([w[0] > w[2] for w in wl]),
                    f"win/tie/lose {', '.join('/'.join(map(str, w)) for w in wl)}",
                )
            ],
            "PPO-max's gains over SFT are small on this world (a few hundredths of gold reward): one sampled answer "
            "per prompt and a tie margin of 0.1 make the count noisy.",
        )


def _whitening(c: _Claims) -> None:
    """Ours: advantage whitening on top of PPO-max."""
    # ours: advantage whitening on top of the paper's PPO-max
    if c.have("ppo_max", "ppo_max_adv_norm"):
        c.verdict(
            "(ours) advantage whitening helps PPO-max (more end gold, less gold fall)",
            "whitening",
            [
                c.cmp("ppo_max_adv_norm", "ppo_max", "gold_end", "higher"),
                c.cmp("ppo_max_adv_norm", "ppo_max", "gold_fall"),
            ],
            "whitening does not measurably help PPO-max here: it stays off (the paper's PPO-max has none).",
        )
