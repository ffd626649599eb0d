"""The policy against the baseline on the same prompts (:func:`evaluate_models`): both answer, every judge scores
both, and each side's judge-free statistics (paper 5.2) are measured.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from ppomax.algos import kl_per_token, masked_mean, response_statistics, response_sums
from ppomax.data.chat import Dialogue
from ppomax.evaluate.generation import Generation, generate
from ppomax.evaluate.judging import win_tie_lose
from ppomax.evaluate.scoring import TokenStats, reward_model_scores, token_logits_stats

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ppomax.models.adapter_dir import CausalLM

DEFAULT_MAX_PROMPT_TOKENS = 256  # data.max_prompt_tokens' default


@dataclass
class EvalSettings:
    """Sampling and judging settings of one evaluation (defaults: paper 6.1 sampling)."""

    max_new_tokens: int = 48
    temperature: float = 0.8
    top_p: float = 0.9
    repetition_penalty: float = 1.1
    greedy: bool = False
    max_prompt_tokens: int | None = None
    """None: the policy run's data.max_prompt_tokens (:func:`run_data_config`), else 256."""
    batch_size: int = 32
    tie_margin: float = 0.05
    seed: int = 0
    limit: int | None = None
    on_bad_line: Literal["fail", "skip"] = "fail"
    """A prompt record ppomax cannot read: stop with its ``path:line`` ("fail") or skip and count it."""


def _side_stats(gen: Generation, stats: TokenStats) -> dict[str, float]:
    """Paper 5.2's statistics of one side, through the same sums as PPO's periodic evaluation
    (:func:`ppomax.algos.response_sums`, :func:`ppomax.algos.response_statistics`), in float64 over the whole
    evaluation; the KL ones when ``stats`` has a reference. Lengths and words are the responses' own (EOS not
    counted)."""
    n = len(gen.responses)
    logp = stats.logp.double()
    with_kl = stats.kl is not None and stats.ref_logp is not None
    if stats.kl is not None and stats.ref_logp is not None:
        ref, kl = stats.ref_logp.double(), stats.kl.double()
    else:
        ref, kl = logp, torch.zeros_like(logp)
    truncated = torch.tensor([not f for f in gen.finished], dtype=torch.bool)
    no_scores = torch.zeros(n, dtype=torch.float64)  # the judges score the responses on their own
    m = response_statistics(response_sums(no_scores, kl, logp, ref, stats.mask, truncated).tolist())
    out = {
        "n": n,
        "perplexity": m["ppl_policy"],
        "length_tokens": sum(gen.lengths) / n if n else 0.0,
        "length_words": sum(len(r.split()) for r in gen.responses) / n if n else 0.0,
        "truncated_rate": m["truncated_frac"],
    }
    if with_kl:
        out["kl_per_token"] = m["kl_per_token"]
        out["kl_per_sequence"] = m["kl_per_sequence"]
        # the sampled log-ratio log pi - log pi_baseline (the k1 estimator, paper eq. 19), per token
        out["kl_k1_per_token"] = float(masked_mean(kl_per_token(logp, ref, "k1"), stats.mask))
    return out


def evaluate_models(
    policy: CausalLM,
    baseline: CausalLM,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str | Dialogue],
    subsets: Sequence[str] | None,
    judges: dict[str, Any],
    settings: EvalSettings | None = None,
    progress: bool = False,
    baseline_cache: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate loaded models. ``judges`` maps a name to ``(kind, judge)``: ``("reward-model", model)`` scores
    the token ids with a value-head model; any other kind is a text scorer ``judge(prompts, responses) ->
    scores`` (e.g. ``("gold", ...)``, the demo's gold reward).

    ``baseline_cache``: pass the same dict when evaluating several policies against one baseline with the same
    prompts, settings and judges; the baseline's responses, statistics and scores are then computed once.

    Returns a JSON-able dict: ``settings``, ``n_prompts``, ``policy`` / ``baseline`` statistics (perplexity,
    length; the policy also KL to the baseline), ``judges[name]`` with ``win_tie_lose`` (of the policy against
    the baseline), ``mean_policy`` and ``mean_baseline``, and ``samples`` (every prompt with both responses and
    their scores).
    """
    from ppomax.data import pad_id_of

    s = settings or EvalSettings()
    pad_id = pad_id_of(tokenizer)
    gen_kwargs: dict[str, Any] = dict(
        max_new_tokens=s.max_new_tokens,
        temperature=s.temperature,
        top_p=s.top_p,
        repetition_penalty=s.repetition_penalty,
        greedy=s.greedy,
        batch_size=s.batch_size,
        max_prompt_tokens=s.max_prompt_tokens or DEFAULT_MAX_PROMPT_TOKENS,
        seed=s.seed,
    )
    bar = None
    cache = baseline_cache if baseline_cache is not None else {}
    if "gen" not in cache:
        cache["judge_scores"] = {}
    if progress:
        from tqdm.auto import tqdm

        n_gen = len(prompts) * (1 if "gen" in cache else 2)
        bar = tqdm(total=n_gen, desc="eval: generate", unit="resp", leave=False)
    gen_p = generate(policy, tokenizer, prompts, progress=bar, **gen_kwargs)
    if "gen" not in cache:
        cache["gen"] = generate(baseline, tokenizer, prompts, progress=bar, **gen_kwargs)
        cache["stats"] = token_logits_stats(
            baseline,
            cache["gen"].prompt_ids,
            cache["gen"].response_ids,
            pad_id=pad_id,
            batch_size=s.batch_size,
        )
    gen_b, st_b = cache["gen"], cache["stats"]
    if bar is not None:
        bar.close()
    st_p = token_logits_stats(
        policy,
        gen_p.prompt_ids,
        gen_p.response_ids,
        pad_id=pad_id,
        ref_model=baseline,
        batch_size=s.batch_size,
    )
    result: dict[str, Any] = {
        "settings": s.__dict__.copy(),
        "n_prompts": len(prompts),
        "policy": _side_stats(gen_p, st_p),
        "baseline": _side_stats(gen_b, st_b),
        "judges": {},
    }

    def judge_scores(kind: str, judge: Any, gen: Generation) -> list[float]:
        if kind == "reward-model":
            return reward_model_scores(
                judge, gen.prompt_ids, gen.response_ids, pad_id=pad_id, batch_size=s.batch_size
            )
        return [float(x) for x in judge(list(gen.prompts), list(gen.responses))]

    per_sample: dict[str, tuple[list[float], list[float]]] = {}
    for name, (kind, judge) in judges.items():
        a = judge_scores(kind, judge, gen_p)
        if name not in cache["judge_scores"]:
            cache["judge_scores"][name] = judge_scores(kind, judge, gen_b)
        b = cache["judge_scores"][name]
        per_sample[name] = (a, b)
        wtl = win_tie_lose(a, b, subsets, s.tie_margin)
        result["judges"][name] = {
            "kind": kind,
            "win_tie_lose": wtl,
            "mean_policy": wtl["overall"]["mean_a"],
            "mean_baseline": wtl["overall"]["mean_b"],
        }
    result["samples"] = [
        {
            "prompt": p,
            "subset": subsets[i] if subsets else None,
            "policy": gen_p.responses[i],
            "baseline": gen_b.responses[i],
            "scores": {name: [ab[0][i], ab[1][i]] for name, ab in per_sample.items()},
        }
        for i, p in enumerate(gen_p.prompts)
    ]
    return result
