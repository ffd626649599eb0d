"""The tables of ppomax's interchangeable parts: advantage estimators, policy-loss aggregations, KL estimators.

Each table maps a name (the config value) to a spec: the properties the config checks combinations against and the
trainer acts on (whether the estimator trains a critic, whether it needs groups of responses per prompt, ...) and
its source. Specs are declared here, without torch, so that :mod:`ppomax.config` validates names and combinations
without importing it; the function is attached where it is written, with the table's :meth:`Table.implements`
decorator (as verl's ``register_adv_est``), and looked up by name with :meth:`Table.function`. A name the table does
not declare is an error listing the declared ones, never a fallback to another entry.

Adding an advantage estimator is one spec below and one decorated function (:mod:`ppomax.algos.estimators`): the
config's choices, its checks (critic, groups) and the update's dispatch follow from the table.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Literal, Protocol, TypeVar


class _Spec(Protocol):
    @property
    def name(self) -> str: ...


S = TypeVar("S", bound=_Spec)
F = TypeVar("F", bound=Callable[..., Any])


class Table(Generic[S]):
    """Specs by name, and the function implementing each (attached by :meth:`implements` in ``module``, which
    :meth:`function` imports on first use)."""

    def __init__(self, kind: str, specs: tuple[S, ...], module: str) -> None:
        self.kind = kind
        self._specs = {s.name: s for s in specs}
        self._module = module
        self._functions: dict[str, Callable[..., Any]] = {}

    def names(self) -> tuple[str, ...]:
        return tuple(self._specs)

    def spec(self, name: str) -> S:
        if name not in self._specs:
            raise ValueError(f"unknown {self.kind} {name!r}; expected one of: {', '.join(self._specs)}")
        return self._specs[name]

    def implements(self, name: str) -> Callable[[F], F]:
        """Decorator: ``fn`` is the function of the declared entry ``name`` (one function per entry)."""
        self.spec(name)

        def register(fn: F) -> F:
            if name in self._functions:
                raise ValueError(f"{self.kind} {name!r} is implemented twice")
            self._functions[name] = fn
            return fn

        return register

    def function(self, name: str) -> Callable[..., Any]:
        self.spec(name)
        if name not in self._functions:
            importlib.import_module(self._module)
        if name not in self._functions:
            raise ValueError(
                f"{self.kind} {name!r} is declared but {self._module} implements no function for it"
            )
        return self._functions[name]


# ------------------------------------------------------------------------------------------ advantage estimators


@dataclass(frozen=True)
class AdvantageEstimatorSpec:
    name: str
    critic: bool
    """Needs values: a critic is built, trained and saved."""
    groups: Literal["required", "any", "refused"]
    """``generation.samples_per_prompt``: ``required`` >= 2 (the estimator compares a prompt's responses),
    ``refused`` = 1 (it would ignore the groups: no baseline from them), ``any``."""
    source: str
    reads: tuple[str, ...] = ()
    """The ``ppo`` keys of its own that it reads: another estimator with one of them off its default is a
    config error naming both keys."""


ADVANTAGE_ESTIMATORS: Table[AdvantageEstimatorSpec] = Table(
    "advantage_estimator",
    (
        AdvantageEstimatorSpec("gae", True, "any", "GAE with a critic, paper eq. 9-11 / app. C.3"),
        AdvantageEstimatorSpec(
            "grpo",
            False,
            "required",
            "group-normalised sequence reward, Shao et al. 2024 (DeepSeekMath) 4.1.2",
            reads=("group_std_norm",),
        ),
        AdvantageEstimatorSpec("rloo", False, "required", "leave-one-out baseline, Ahmadian et al. 2024"),
        AdvantageEstimatorSpec(
            "reinforce_pp", False, "refused", "return whitened over the global batch, Hu 2025 (REINFORCE++)"
        ),
        AdvantageEstimatorSpec(
            "reinforce_pp_baseline",
            False,
            "required",
            "the group's mean score subtracted, then the return whitened over the global batch: Hu 2025 "
            "(REINFORCE++ w/ baseline) as OpenRLHF's reinforce_baseline",
        ),
    ),
    "ppomax.algos.estimators",
)


# ------------------------------------------------------------------------------------ policy-loss aggregations


@dataclass(frozen=True)
class LossAggregationSpec:
    name: str
    unit: Literal["token", "sequence"]
    """What the loss averages over last: micro-batches are weighted by their share of it, so that accumulated
    gradients are those of the whole minibatch."""
    source: str


LOSS_AGGREGATIONS: Table[LossAggregationSpec] = Table(
    "loss_aggregation",
    (
        LossAggregationSpec(
            "token_mean", "token", "mean over every response token of the minibatch: MOSS-RLHF code, DAPO"
        ),
        LossAggregationSpec(
            "seq_mean_token_mean",
            "sequence",
            "mean over responses of each response's token mean: Shao et al. 2024 (DeepSeekMath) eq. 3",
        ),
        LossAggregationSpec(
            "seq_mean_token_sum_norm",
            "sequence",
            "mean over responses of each response's token sum / generation.max_new_tokens: Liu et al. 2025 "
            "(Dr. GRPO)",
        ),
    ),
    "ppomax.algos.losses",
)


# ---------------------------------------------------------------------------------------------- KL estimators


@dataclass(frozen=True)
class KLEstimatorSpec:
    name: str
    as_loss: bool
    """Usable as a loss term (``ppo.kl.acts_in: loss``): its expected gradient is a KL's."""
    source: str


KL_ESTIMATORS: Table[KLEstimatorSpec] = Table(
    "kl.estimator",
    (
        KLEstimatorSpec("k1", False, "log pi - log ref, Schulman 2020; paper eq. 19, MOSS-RLHF code"),
        KLEstimatorSpec("k2", True, "(log ref - log pi)^2 / 2, Schulman 2020"),
        KLEstimatorSpec("k3", True, "(ref/pi - 1) - log(ref/pi), Schulman 2020; DeepSeekMath eq. 4"),
    ),
    "ppomax.algos.reward_shaping",
)
