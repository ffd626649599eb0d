"""Pattern-collapse monitor (paper 5.2, fig. 4), fed the metrics of every policy iteration.

The paper finds that the reward and the losses do not reveal over-optimisation, but three metrics do: before a
vanilla PPO run collapses, the policy "uniformly delivers longer responses and exhibits lower perplexity for such
generative patterns" while its KL to the reference grows. This module watches exactly that joint movement:

* response length rises to ``length_ratio`` x its baseline,
* policy perplexity (on its own responses) falls to ``ppl_ratio`` x its baseline,
* KL(policy || reference) per token exceeds ``kl_per_token`` (the exact KL where logged: :func:`kl_of`).

The baseline is the mean over the first ``window`` policy iterations, the current value the mean over the last
``window``. A warning fires when all three signals hold (the paper's signature), once per episode: it re-arms when
the signature goes away. Thresholds are ours (the paper gives curves, not numbers) and are config keys.

On hh-mini the joint signature comes late or never: a policy that games the reward model there often keeps its
length (the RM's length bias is only one of the things it can exploit), so over-optimisation shows first as *drift*,
which fires too (``drift_kl_per_token``, null = off):

* KL(policy || reference) per token (current mean) at least ``drift_kl_per_token`` and still rising (above the mean
  of the ``window`` iterations before the current ones), while
* the RM reward (``reward/raw_mean``, what PPO maximises) is above its baseline.

That is the policy still moving away from the reference to buy reward, the regime in which, in the paper's fig. 6
and in every vanilla run of the demo, the true quality falls while the RM reward keeps rising. The monitor reads
the exact KL over the vocabulary where the run logs it (:func:`kl_of`): the sampled estimators read the same KL
differently (k1, k3, tokens drawn with top-p and a repetition penalty).

The default 0.05 nats/token was chosen on `ppomax ablate --only monitor ppo_max vanilla --seeds 0 1 2` (30 runs on
hh-mini, judged against the gold reward; 24 runs out of the sample a threshold was first chosen on: PPO-max with KL
coefficients 0.05, 0.1 and 0.2, answers capped at 20 and 80 tokens, vanilla at a third and PPO-max at three times
the learning rate). At 0.05 it fired on all 23 over-optimised runs, 2 to 21 steps before their gold reward had
fallen 0.1 below its peak, and never on the demo's PPO-max (its exact KL peaks at 0.03-0.05 per iteration, below
that as a 5-iteration mean); the former 0.15 missed 2 (PPO-max at KL coefficient 0.2, gold falling at 0.07
nats/token) and fired after gold's fall on 9 of the 21 it caught. Both fire on healthy runs that drift as far
(mostly PPO-max at three times the learning rate, KL 0.08-0.13: 4 of the 7 healthy runs at 0.05, 2 at 0.15): the
signal is "drifting while the reward rises", which preceded every fall seen, not proof of one; hence a warning by
default (``collapse.action: warn``). The answer-length caps did not bind on hh-mini (its answers are ~10 tokens),
so how a per-token level carries to much longer answers is not measured.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from statistics import fmean
from typing import Any

LENGTH, PPL, KL = "response/length_mean", "ppl/policy", "kl/per_token"
EXACT_KL = "kl/exact_per_token"  # what the monitor reads as the KL, where the run logs it (see kl_of)
REWARD = (
    "reward/raw_mean"  # the score PPO maximises (reward model plus weighted functions), before the KL term
)


def kl_of(metrics: dict[str, Any]) -> float:
    """The KL per token the monitor compares with its thresholds: the exact KL over the vocabulary
    (``kl/exact_per_token``) where the run logs it, else the KL estimator's (``kl/per_token``: metrics that
    carry no exact KL, such as a run's from before ppomax logged it). The
    estimators read the same KL differently (k1 and k3, and tokens sampled with top-p and a repetition penalty
    are no sample of the policy), so the exact KL is what one threshold can hold for every run."""
    return float(metrics[EXACT_KL] if EXACT_KL in metrics else metrics[KL])


@dataclass(frozen=True)
class CollapseSignal:
    """What the monitor saw when it fired."""

    step: int
    length_ratio: float
    ppl_ratio: float
    kl_per_token: float
    kind: str = "signature"  # "signature": the paper's joint movement; "drift": KL still rising, reward up

    def message(self) -> str:
        what = (
            "possible pattern collapse (paper 5.2)"
            if self.kind == "signature"
            else "the policy keeps drifting from the reference while the reward rises (over-optimisation)"
        )
        return (
            f"step {self.step}: {what}: response length x{self.length_ratio:.2f}, "
            f"policy perplexity x{self.ppl_ratio:.2f} of their first iterations, KL {self.kl_per_token:.3g} "
            "nats/token. The reward model is probably being exploited; compare samples, or raise ppo.kl.coef."
        )


class CollapseMonitor:
    """Feed it each iteration's metrics with :meth:`update`; it returns a :class:`CollapseSignal` when it fires."""

    def __init__(
        self,
        window: int,
        length_ratio: float,
        ppl_ratio: float,
        kl_per_token: float,
        drift_kl_per_token: float | None = None,
    ) -> None:
        self.window = window
        self.length_ratio = length_ratio
        self.ppl_ratio = ppl_ratio
        self.kl_per_token = kl_per_token
        self.drift_kl_per_token = drift_kl_per_token
        self.baseline: list[dict[str, float]] = []
        # the current window and, for the drift rule's trend, the one before it
        self.recent: deque[dict[str, float]] = deque(maxlen=2 * window)
        self.firing = False
        self.fired = 0

    @property
    def armed(self) -> bool:
        """Whether the signature is checked yet: after ``window`` baseline iterations and ``window`` current ones
        (the drift rule needs ``window`` more for its trend)."""
        return len(self.baseline) == self.window and len(self.recent) >= self.window

    def update(self, step: int, metrics: dict[str, Any]) -> CollapseSignal | None:
        """Record one policy iteration; return a signal the first time the collapse signature (or drift) holds."""
        keys = (LENGTH, PPL) + ((REWARD,) if self.drift_kl_per_token is not None else ())
        point = {k: float(metrics[k]) for k in keys}
        point[KL] = kl_of(metrics)
        if len(self.baseline) < self.window:
            self.baseline.append(point)
            return None
        self.recent.append(point)
        if len(self.recent) < self.window:
            return None
        current = list(self.recent)[-self.window :]
        base = {k: fmean(p[k] for p in self.baseline) for k in point}
        now = {k: fmean(p[k] for p in current) for k in point}
        length_ratio = now[LENGTH] / max(base[LENGTH], 1e-9)
        ppl_ratio = now[PPL] / max(base[PPL], 1e-9)
        signature = (
            length_ratio >= self.length_ratio and ppl_ratio <= self.ppl_ratio and now[KL] >= self.kl_per_token
        )
        drift = False
        if self.drift_kl_per_token is not None and len(self.recent) == 2 * self.window:
            before = fmean(p[KL] for p in list(self.recent)[: self.window])
            drift = now[KL] >= self.drift_kl_per_token and now[KL] > before and now[REWARD] > base[REWARD]
        collapsing = signature or drift
        signal = None
        if collapsing and not self.firing:
            self.fired += 1
            kind = "signature" if signature else "drift"
            signal = CollapseSignal(step, length_ratio, ppl_ratio, now[KL], kind)
        self.firing = collapsing
        return signal

    def state_dict(self) -> dict[str, Any]:
        return {
            "baseline": self.baseline,
            "recent": list(self.recent),
            "firing": self.firing,
            "fired": self.fired,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.baseline = list(state["baseline"])
        self.recent = deque(state["recent"], maxlen=2 * self.window)
        self.firing = bool(state["firing"])
        self.fired = int(state["fired"])
