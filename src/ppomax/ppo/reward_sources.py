"""Reward sources for PPO, where the scoring pass's raw scores come from: a trained value-head reward model and
programmatic reward functions, summed with weights.

The total raw score of a response is ``reward.model_weight * RM(prompt + response)`` (when ``model.reward`` is set)
plus ``sum_i reward.functions[i].weight * f_i(...)``. It is what the paper calls r(x, y); the trainer then applies
the score re-parameterisation of section 5.3.1 (scaling or normalisation and clipping) before it enters the
token-level rewards.

A reward function is given as ``"package.module:function"`` and called as::

    f(prompts, responses, prompt_ids=..., response_ids=..., **kwargs) -> list[float] | Tensor  # one score each

* ``prompts``, ``responses``: lists of B strings (responses decoded without special tokens);
* ``prompt_ids``: B lists of prompt token ids (no padding); ``response_ids``: B lists of generated token ids, no
  padding and without the final EOS, i.e. the tokens of the response text;
* ``kwargs``: the config's ``kwargs`` mapping for that function;
* a function without ``prompt_ids``/``response_ids`` parameters and without ``**kwargs`` is called without them;
* if the function has a parameter named ``meta``, it also receives ``meta=``: the B metadata dicts of the prompts
  (the fields of each prompt record other than the prompt itself), for rewards that need a ground truth.

Each function's scores are logged as ``reward/<name>_mean``, ``name`` being the config's ``name`` or, by default,
the function's own name (``target_tokens`` for ``my.rewards:target_tokens``): a metric keeps its name whatever
the order of ``reward.functions``.

A function that raises stops the run with one line naming it, the exception and the step. Non-finite scores
(NaN, +inf, -inf) are not rejected here: the trainer leaves those samples out of training and counts them
(``nonfinite/samples_count``; :func:`ppomax.ppo.advantages.compute_advantages`).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from ppomax.algos import score_token_index
from ppomax.config import RewardConfig, RewardFunctionConfig
from ppomax.errors import ConfigError, UserError
from ppomax.models import RewardOnCriticBase

from .experience import Experience
from .models import (
    GapAcrossRanks,
    check_packing_gap,
    computed_dtypes,
    least_precise,
    packing_check_batch,
)
from .packing import pack

RM_KEY = "rm"
# reward/<name>_mean metrics the PPO trainer logs itself: a function of one of these names would overwrite them
RESERVED_NAMES = (RM_KEY, "raw", "final", "running")


class RewardError(UserError):
    """A reward function that cannot be called, raises, or returns something other than one score per
    response."""


def load_reward_function(spec: str) -> Callable[..., Any]:
    """Import ``"package.module:function"``; errors name the spec and what failed."""
    if spec.count(":") != 1:
        raise ConfigError(f"reward function {spec!r}: expected 'package.module:function'")
    module_name, attr = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"reward function {spec!r}: cannot import module {module_name!r} ({exc}); is it on PYTHONPATH?"
        ) from None
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise ConfigError(f"reward function {spec!r}: module {module_name!r} has no callable {attr!r}")
    return fn


@dataclass
class RewardFunction:
    """One programmatic reward with its metric name, weight and keyword arguments (``spec``: where it came from,
    ``"package.module:function"``, for error messages)."""

    name: str
    fn: Callable[..., Any]
    weight: float = 1.0
    kwargs: dict[str, Any] = field(default_factory=dict)
    spec: str = ""

    def __post_init__(self) -> None:
        params: Mapping[str, inspect.Parameter]
        try:
            params = inspect.signature(self.fn).parameters
        except (TypeError, ValueError):  # builtins without a signature
            params = {}
        var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        # The ids go to every function that can take them (named or **kwargs); a plain f(prompts, responses)
        # works too. ``meta`` only to functions that name it.
        self.wants_ids = var_kw or ("prompt_ids" in params and "response_ids" in params)
        self.wants_meta = "meta" in params
        if params:  # a calling-convention mismatch is found here, not as an error raised inside the function
            extra = dict.fromkeys(
                ["meta"] * self.wants_meta + ["prompt_ids", "response_ids"] * self.wants_ids
            )
            try:
                inspect.signature(self.fn).bind([], [], **extra, **self.kwargs)
            except TypeError as exc:
                raise RewardError(
                    f"reward function {self.label} could not be called as "
                    f"f(prompts, responses, prompt_ids=..., response_ids=..., **kwargs): {exc}"
                ) from None

    @property
    def label(self) -> str:
        return f"{self.name!r} ({self.spec})" if self.spec else repr(self.name)

    def __call__(
        self,
        prompts: list[str],
        responses: list[str],
        prompt_ids: list[list[int]],
        response_ids: list[list[int]],
        meta: list[dict[str, Any]],
    ) -> Tensor:
        """Scores as a float32 [B] tensor on the CPU."""
        extra: dict[str, Any] = {"meta": meta} if self.wants_meta else {}
        if self.wants_ids:
            extra.update(prompt_ids=prompt_ids, response_ids=response_ids)
        try:
            out = self.fn(prompts, responses, **extra, **self.kwargs)
        except Exception as exc:  # whatever it raises, the user sees which function and what, in one line
            lines = str(exc).strip().splitlines()
            raise RewardError(
                f"reward function {self.label} raised {type(exc).__name__}"
                + (f": {lines[0]}" if lines else "")
            ) from exc
        try:
            scores = torch.as_tensor(
                out.detach().cpu() if isinstance(out, Tensor) else out, dtype=torch.float32
            )
        except (TypeError, ValueError, RuntimeError) as exc:
            raise RewardError(
                f"reward function {self.label} returned {type(out).__name__}, not numbers"
            ) from exc
        scores = scores.reshape(-1) if scores.dim() > 1 and scores.numel() == len(responses) else scores
        if scores.shape != (len(responses),):
            raise RewardError(
                f"reward function {self.label} returned {tuple(scores.shape)} scores for {len(responses)} responses"
            )
        return scores


def function_name(cfg: RewardFunctionConfig) -> str:
    """The metric name of a configured function: its ``name``, else the function's own name."""
    return cfg.name or cfg.function.split(":")[-1]


def build_reward_functions(
    cfg: RewardConfig, given: Mapping[str, Callable[..., Any]] | None = None
) -> list[RewardFunction]:
    """The configured ``reward.functions``, imported and checked; names must be unique and not reserved. ``given``:
    the callables passed from Python, by the ``function`` value that records each (``<object module:name>``)."""
    out: list[RewardFunction] = []
    for i, spec in enumerate(cfg.functions):
        name = function_name(spec)
        key = f"reward.functions[{i}].name"
        if name in RESERVED_NAMES:
            raise ConfigError(
                f"{key}: {name!r} is taken by a metric of the trainer (reward/{name}_mean); set another name"
            )
        same = next((j for j, f in enumerate(out) if f.name == name), None)
        if same is not None:
            raise ConfigError(
                f"{key}: {name!r} is also the name of reward.functions[{same}]; give each function its own name"
            )
        try:
            fn = (
                given[spec.function]
                if given and spec.function in given
                else load_reward_function(spec.function)
            )
            out.append(RewardFunction(name, fn, spec.weight, dict(spec.kwargs), spec=spec.function))
        except (ConfigError, RewardError) as exc:
            raise ConfigError(f"reward.functions[{i}]: {exc}") from None
    return out


class ScoringModel(Protocol):
    """A reward model (:class:`ppomax.models.ValueHeadModel`, :class:`ppomax.models.RewardOnCriticBase`): the [B]
    score of each padded sequence, the [B, T] values of every position (of packed rows too: position ids and no
    attention mask), and the pad token id its score is never read at."""

    @property
    def pad_token_id(self) -> int | None: ...

    def score(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor: ...

    def values(
        self, input_ids: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None = None
    ) -> Tensor: ...


def packed_scores(model: ScoringModel, batch: Experience) -> Tensor:
    """[B] float32 scores of ``batch``'s rows from one forward over them packed (:mod:`ppomax.ppo.packing`), each
    read at the token where the padded forward reads it (:func:`~ppomax.algos.score_token_index` on the padded
    rows: the last real token that is not the pad id), found in the packed layout: the padded scores, to float
    rounding."""
    packed = pack(batch.sequences, batch.prompt_lens, batch.response_lens, batch.prompt_width)
    column = score_token_index(batch.sequences, batch.attention_mask, model.pad_token_id)
    first = batch.prompt_width - batch.prompt_lens.to(column.device)  # the column of each row's first token
    at = packed.token_index(batch.prompt_lens, (column - first).clamp(min=0))
    values = model.values(packed.input_ids, None, position_ids=packed.position_ids)
    return values.flatten()[at].float()


@torch.no_grad()
def check_packed_scores(
    model: ScoringModel,
    vocab_size: int,
    device: torch.device,
    across_ranks: GapAcrossRanks | None = None,
) -> None:
    """Check once that the reward model's packed scores (:func:`packed_scores`) are its padded ones on a tiny
    batch of random tokens, within the :data:`~ppomax.ppo.models.PACKING_TOLERANCE` of the dtype its forwards
    compute in; else a one-line ConfigError naming ``ppo.pack_sequences`` and its attention implementation (an
    attention that ignores packed position ids lets a sequence attend to the one packed before it), on every
    process by ``across_ranks``."""
    # no pad id among the tokens: each score is then read at its sequence's last token, where a leak shows most
    batch = packing_check_batch(vocab_size, device, avoid_token=model.pad_token_id)
    weights = model.critic if isinstance(model, RewardOnCriticBase) else model
    with computed_dtypes(weights) as dtypes:
        padded = model.score(batch.sequences, batch.attention_mask)
        packed = packed_scores(model, batch)
    dtype = least_precise([*dtypes, padded.dtype])
    check_packing_gap("model.reward", "scores", padded, packed, dtype, weights, across_ranks)


class RewardSources:
    """Scores responses with every configured source and sums them with their weights.

    ``model`` is a value-head reward model (:class:`ScoringModel`, or None); its inputs are the rollout's full
    sequences (left-padded prompt + response up to EOS), so the reward is read at the response's last token, as
    in RM training. Its forwards run on ``chunk_size`` rows at a time (``ppo.micro_batch_size``; None: all rows),
    rows of similar length together (:meth:`Experience.micro_batches`), and with ``pack``
    (``ppo.pack_sequences``) on each chunk's sequences packed (:func:`packed_scores`); a row's score does not
    depend on the rows beside it, so all give the same scores, to float rounding.
    """

    def __init__(
        self,
        model: ScoringModel | None,
        model_weight: float,
        functions: Sequence[RewardFunction],
        chunk_size: int | None = None,
        pack: bool = False,
    ) -> None:
        if model is None and not functions:
            raise ConfigError("no reward source: set model.reward and/or reward.functions")
        self.model = model
        self.model_weight = model_weight
        self.functions = list(functions)
        self.chunk_size = chunk_size
        self.pack = pack

    @torch.no_grad()
    def score_model(self, exp: Experience) -> Tensor:
        """[B] float32 reward-model scores of ``exp``'s full sequences, in its row order."""
        model = self.model
        assert model is not None, "score_model runs with a reward model only"
        chunks = exp.micro_batches(self.chunk_size)
        scores = []
        for rows in chunks:
            chunk = exp if len(chunks) == 1 else exp.select(rows)
            if self.pack:
                scores.append(packed_scores(model, chunk))
            else:
                scores.append(model.score(chunk.sequences, chunk.attention_mask).float())
        return exp.in_row_order(chunks, torch.cat(scores))

    @staticmethod
    def split_ids(exp: Experience, eos_ids: Sequence[int]) -> tuple[list[list[int]], list[list[int]]]:
        """Prompt ids (no padding) and response ids (no padding, final EOS dropped) of an Experience."""
        seqs = exp.sequences.tolist()
        width = exp.prompt_width
        eos = set(eos_ids)
        prompt_ids, response_ids = [], []
        for row, p, r, trunc in zip(
            seqs, exp.prompt_lens.tolist(), exp.response_lens.tolist(), exp.truncated.tolist(), strict=True
        ):
            prompt_ids.append(row[width - p : width])
            resp = row[width : width + r]
            if not trunc and resp and resp[-1] in eos:
                resp = resp[:-1]
            response_ids.append(resp)
        return prompt_ids, response_ids

    def __call__(self, exp: Experience, eos_ids: Sequence[int]) -> tuple[Tensor, dict[str, Tensor]]:
        """``(total [B], parts)`` for an Experience with sequences and texts; ``parts`` maps ``"rm"`` and each
        function's name to its unweighted [B] scores (all float32 on the sequences' device)."""
        device = exp.sequences.device
        total = torch.zeros(exp.batch_size, dtype=torch.float32, device=device)
        parts: dict[str, Tensor] = {}
        if self.model is not None:
            s = self.score_model(exp)
            parts[RM_KEY] = s
            total = total + self.model_weight * s
        if self.functions:
            prompt_ids, response_ids = self.split_ids(exp, eos_ids)
            meta = exp.meta or [{} for _ in range(exp.batch_size)]
            for fn in self.functions:
                s = fn(exp.prompts, exp.responses, prompt_ids, response_ids, meta).to(device)
                parts[fn.name] = s
                total = total + fn.weight * s
        return total, parts
