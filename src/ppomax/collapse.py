"""Pattern-collapse monitor (paper 5.2, fig. 4).

The paper finds that the reward and the losses do not reveal over-optimisation, but three metrics do: before a
vanilla PPO run collapses, the policy "uniformly delivers longer responses and exhibits lower perplexity for such
generative patterns" while its KL to the reference grows. This module watches exactly that joint movement:

* response length rises to ``length_ratio`` x its baseline,
* policy perplexity (on its own responses) falls to ``ppl_ratio`` x its baseline,
* KL(policy || reference) per token exceeds ``kl_per_token``.

The baseline is the mean over the first ``window`` policy iterations, the current value the mean over the last
``window``. A warning fires when all three signals hold (the paper's signature), once per episode: it re-arms when
the signature goes away. Thresholds are ours (the paper gives curves, not numbers) and are config keys.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from statistics import fmean
from typing import Any

LENGTH, PPL, KL = "response/length_mean", "ppl/policy", "kl/per_token"


@dataclass(frozen=True)
class CollapseSignal:
    """What the monitor saw when it fired."""

    step: int
    length_ratio: float
    ppl_ratio: float
    kl_per_token: float

    def message(self) -> str:
        return (
            f"step {self.step}: possible pattern collapse (paper 5.2): response length x{self.length_ratio:.2f}, "
            f"policy perplexity x{self.ppl_ratio:.2f} of their first iterations, KL {self.kl_per_token:.3g} "
            "nats/token. The reward model is probably being exploited; compare samples, or raise ppo.kl_coef."
        )


class CollapseMonitor:
    """Feed it each iteration's metrics with :meth:`update`; it returns a :class:`CollapseSignal` when it fires."""

    def __init__(self, window: int, length_ratio: float, ppl_ratio: float, kl_per_token: float) -> None:
        self.window = window
        self.length_ratio = length_ratio
        self.ppl_ratio = ppl_ratio
        self.kl_per_token = kl_per_token
        self.baseline: list[dict[str, float]] = []
        self.recent: deque[dict[str, float]] = deque(maxlen=window)
        self.firing = False
        self.fired = 0

    def update(self, step: int, metrics: dict[str, Any]) -> CollapseSignal | None:
        """Record one policy iteration; return a signal the first time the collapse signature holds."""
        point = {k: float(metrics[k]) for k in (LENGTH, PPL, KL)}
        if len(self.baseline) < self.window:
            self.baseline.append(point)
            return None
        self.recent.append(point)
        if len(self.recent) < self.window:
            return None
        base = {k: fmean(p[k] for p in self.baseline) for k in point}
        now = {k: fmean(p[k] for p in self.recent) for k in point}
        length_ratio = now[LENGTH] / max(base[LENGTH], 1e-9)
        ppl_ratio = now[PPL] / max(base[PPL], 1e-9)
        collapsing = (
            length_ratio >= self.length_ratio and ppl_ratio <= self.ppl_ratio and now[KL] >= self.kl_per_token
        )
        signal = None
        if collapsing and not self.firing:
            self.fired += 1
            signal = CollapseSignal(step, length_ratio, ppl_ratio, now[KL])
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
        self.recent = deque(state["recent"], maxlen=self.window)
        self.firing = bool(state["firing"])
        self.fired = int(state["fired"])
