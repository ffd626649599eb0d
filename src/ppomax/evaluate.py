"""Policy-against-baseline evaluation: `ppomax eval` and the demo's judge (paper 6.1-6.2, fig. 10).

Both policies answer the same held-out prompts once each (nucleus sampling with the paper's 6.1 settings:
top-p 0.9, temperature 0.8, repetition penalty 1.1, or greedy). Then, per judge:

* **win / tie / lose** of the policy against the baseline, overall and per subset (``helpful`` / ``harmless``,
  from each prompt's ``subset`` field): the policy wins a prompt when its score exceeds the baseline's by more
  than ``tie_margin``, loses when it is lower by more than ``tie_margin``, else it is a tie;
* the **mean reward** of each side.

A judge is a value-head reward model (kind ``reward-model``: the score of a response is the scalar at its last
token, the EOS of a finished response, as in training, paper eq. 2) or any text scorer ``f(prompts, responses)
-> scores`` under a kind of its own (``ppomax eval --judge gold`` passes the hh-mini world's gold reward, which
lives in :mod:`ppomax.demo`: this module never imports the demo).

Judge-free statistics of each side (paper 5.2's monitoring metrics, measured on the evaluation responses):

* **KL to the baseline**: at every token position of the policy's own responses, the exact
  ``KL(pi_policy(.|s_t) || pi_baseline(.|s_t))`` over the vocabulary (no estimator noise, always >= 0), averaged
  over tokens (``kl_per_token``) and summed per response then averaged (``kl_per_sequence``). The sampled
  log-ratio ``log pi_policy(a_t|s_t) - log pi_baseline(a_t|s_t)`` (the k1 estimator the PPO penalty uses,
  paper eq. 19) is reported beside it as ``kl_k1_per_token``. Both use raw (temperature 1) logits: the
  models' own distributions, whatever the sampling settings.
* **perplexity** of a model on its own responses, ``exp(-mean log pi(a_t|s_t))`` pooled over tokens (the
  paper's 5.2 perplexity; collapsed policies show a low one).
* **length**: response tokens (EOS not counted) and words; the share of responses cut at ``max_new_tokens``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from ppomax.algos import (
    kl_from_logits,
    kl_per_token,
    logprobs_from_logits,
    masked_mean,
    response_statistics,
    response_sums,
)
from ppomax.config import GenerationConfig
from ppomax.data.chat import ChatFormat, Dialogue, resolve_chat_format
from ppomax.data.sources import Source, describe
from ppomax.errors import UserError
from ppomax.rollout import HFGenerateEngine, eos_ids_of, rollout

SUBSETS = ("helpful", "harmless")
DEFAULT_MAX_PROMPT_TOKENS = 256  # data.max_prompt_tokens' default


# --------------------------------------------------------------------------------------------------- generation


@dataclass
class Generation:
    """One model's responses to a list of prompts. Token lists hold no padding; a finished response ends
    with EOS (kept in ``response_ids``, not counted in the token length); ``responses`` are the rollout's texts
    (special tokens skipped), stripped."""

    prompts: list[str]
    responses: list[str]
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    finished: list[bool] = field(default_factory=list)

    @property
    def lengths(self) -> list[int]:
        return [len(r) - (1 if f else 0) for r, f in zip(self.response_ids, self.finished, strict=True)]


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str | Dialogue],
    *,
    max_new_tokens: int = 48,
    temperature: float = 0.8,
    top_p: float = 0.9,
    repetition_penalty: float = 1.1,
    greedy: bool = False,
    batch_size: int = 32,
    max_prompt_tokens: int = 256,
    seed: int = 0,
    progress: Any = None,
) -> Generation:
    """Sample one response per prompt with the PPO rollout (:func:`ppomax.rollout.rollout`: left-padded batches,
    KV cache, cut at the first EOS). ``seed`` fixes the sampling noise, so the same model on the same prompts
    answers identically. ``progress`` is an optional tqdm to update. ``prompts``: dialogues (what
    :func:`load_eval_prompts` returns; truncated by turns to ``max_prompt_tokens``) or texts."""
    from ppomax.data import pad_id_of, pad_left, tokenize_prompt

    model.eval()
    device = next(model.parameters()).device
    eos = eos_ids_of(tokenizer, model)
    pad_id = pad_id_of(tokenizer)
    prompt_ids = [tokenize_prompt(tokenizer, p, max_prompt_tokens) for p in prompts]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    # The rollout engine's sampling rules (top-k off, the model's own generation_config ignored).
    try:
        settings = GenerationConfig(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=0,
            repetition_penalty=repetition_penalty,
        )
    except ValidationError as err:
        bad = "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg']} (got {e.get('input')!r})" for e in err.errors()
        )
        raise UserError(f"invalid sampling settings: {bad}") from None
    engine = HFGenerateEngine(settings, eos, pad_id)
    out_ids: list[list[int]] = []
    finished: list[bool] = []
    responses: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompt_ids[start : start + batch_size]
        input_ids, attention_mask = pad_left(chunk, pad_id)
        # HF sampling draws from the global RNG: seed it per batch from our generator so results do not
        # depend on what ran before in the process.
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        # the training rollout itself: same engine, same EOS cut, same decoded text as PPO's rewards see
        exp = rollout(
            engine,
            model,
            tokenizer,
            input_ids.to(device),
            attention_mask.to(device),
            eos_ids=eos,
            pad_id=pad_id,
            greedy=greedy,
        )
        rows = exp.sequences[:, exp.prompt_width :].tolist()
        for row, n, cut, text in zip(
            rows, exp.response_lens.tolist(), exp.truncated.tolist(), exp.responses, strict=True
        ):
            out_ids.append(row[:n])  # up to and including the first EOS
            finished.append(not cut)
            responses.append(text.strip())
        if progress is not None:
            progress.update(len(chunk))
    return Generation(prompt_texts(prompts), responses, prompt_ids, out_ids, finished)


def prompt_texts(prompts: Sequence[str | Dialogue]) -> list[str]:
    """The texts of prompts given as dialogues or texts."""
    return [p.text if isinstance(p, Dialogue) else p for p in prompts]


# ----------------------------------------------------------------------------------------------- model scoring


def _right_padded(prompt_ids: Sequence[list[int]], response_ids: Sequence[list[int]], pad_id: int):
    from ppomax.data import pad_right

    seqs = [p + r for p, r in zip(prompt_ids, response_ids, strict=True)]
    return pad_right(seqs, pad_id)


@dataclass
class TokenStats:
    """Per response token of one model's responses, right-padded to the longest: [N, R] CPU tensors.

    ``mask`` marks the response tokens (EOS included); ``logp`` is the log-prob of each sampled token under the
    model (raw logits); with a reference model, ``ref_logp`` is the same under the reference and ``kl`` the exact
    KL(model || reference) over the vocabulary at that position. Off the mask all three are 0."""

    mask: torch.Tensor
    logp: torch.Tensor
    ref_logp: torch.Tensor | None = None
    kl: torch.Tensor | None = None


def _response_positions(
    prompt_ids: Sequence[list[int]], response_ids: Sequence[list[int]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pos, mask)`` [B, R]: the position of the logits that predict response token j of row i in the
    right-padded ``prompt + response`` rows (``len(prompt_i) - 1 + j``), and whether that token exists."""
    width = max((len(r) for r in response_ids), default=0)
    j = torch.arange(width, device=device)
    starts = torch.tensor([len(p) - 1 for p in prompt_ids], device=device)
    ends = torch.tensor([len(r) for r in response_ids], device=device)
    mask = j[None, :] < ends[:, None]
    pos = torch.where(mask, starts[:, None] + j[None, :], 0)
    return pos, mask


def _at(logits: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    return logits.gather(1, pos[..., None].expand(-1, -1, logits.shape[-1]))


@torch.no_grad()
def token_logits_stats(
    model: Any,
    prompt_ids: Sequence[list[int]],
    response_ids: Sequence[list[int]],
    *,
    pad_id: int,
    ref_model: Any = None,
    batch_size: int = 32,
) -> TokenStats:
    """The :class:`TokenStats` of ``model`` (and, with ``ref_model``, against it) on the given responses: the
    log-probs are :func:`ppomax.algos.logprobs_from_logits`, the KL :func:`ppomax.algos.kl_from_logits`."""
    model.eval()
    if ref_model is not None:
        ref_model.eval()
    device = next(model.parameters()).device
    from ppomax.data import pad_right

    width = max((len(r) for r in response_ids), default=0)
    parts: dict[str, list[torch.Tensor]] = {"mask": [], "logp": [], "ref_logp": [], "kl": []}
    for start in range(0, len(prompt_ids), batch_size):
        p_chunk = list(prompt_ids[start : start + batch_size])
        r_chunk = list(response_ids[start : start + batch_size])
        input_ids, attention_mask = _right_padded(p_chunk, r_chunk, pad_id)
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        pos, mask = _response_positions(p_chunk, r_chunk, device)
        labels = pad_right(r_chunk, 0)[0].to(device)
        logits = _at(model(input_ids=input_ids, attention_mask=attention_mask).logits, pos)
        got = {"logp": logprobs_from_logits(logits, labels)}
        if ref_model is not None:
            ref = _at(ref_model(input_ids=input_ids, attention_mask=attention_mask).logits, pos)
            got["ref_logp"] = logprobs_from_logits(ref, labels)
            got["kl"] = kl_from_logits(logits, ref)
        got = {k: torch.where(mask, v, 0.0) for k, v in got.items()}
        # every batch padded to the longest response of all, so that the batches stack
        for key, value in {"mask": mask, **got}.items():
            parts[key].append(torch.nn.functional.pad(value, (0, width - value.shape[1])).cpu())
    if not parts["mask"]:
        return TokenStats(torch.zeros(0, 0, dtype=torch.bool), torch.zeros(0, 0))
    out = {k: torch.cat(v) if v else None for k, v in parts.items()}
    return TokenStats(out["mask"], out["logp"], out["ref_logp"], out["kl"])


@torch.no_grad()
def reward_model_scores(
    reward_model: Any,
    prompt_ids: Sequence[list[int]],
    response_ids: Sequence[list[int]],
    *,
    pad_id: int,
    batch_size: int = 32,
) -> list[float]:
    """Scalar reward of each prompt+response at its last token (paper eq. 2): ``ValueHeadModel.score``."""
    reward_model.eval()
    device = next(reward_model.parameters()).device
    scores: list[float] = []
    for start in range(0, len(prompt_ids), batch_size):
        input_ids, attention_mask = _right_padded(
            prompt_ids[start : start + batch_size], response_ids[start : start + batch_size], pad_id
        )
        scores.extend(reward_model.score(input_ids.to(device), attention_mask.to(device)).tolist())
    return [float(s) for s in scores]


# ----------------------------------------------------------------------------------------------------- judging


def win_tie_lose(
    scores_a: Sequence[float],
    scores_b: Sequence[float],
    subsets: Sequence[str] | None = None,
    tie_margin: float = 0.05,
) -> dict[str, dict[str, float]]:
    """Win/tie/lose of A against B: A wins when ``a > b + tie_margin``, loses when ``a < b - tie_margin``.

    Returns ``{"overall": {...}, "helpful": {...}, "harmless": {...}}`` (a subset key only when it occurs,
    ``overall`` always), each with counts ``n, win, tie, lose``, rates ``win_rate, tie_rate, lose_rate`` and
    the mean scores ``mean_a, mean_b``.
    """
    if len(scores_a) != len(scores_b):
        raise ValueError(f"scores_a has {len(scores_a)} entries, scores_b {len(scores_b)}")
    if subsets is not None and len(subsets) != len(scores_a):
        raise ValueError(f"subsets has {len(subsets)} entries for {len(scores_a)} scores")
    groups: dict[str, list[int]] = {"overall": list(range(len(scores_a)))}
    for i, s in enumerate(subsets or []):
        groups.setdefault(str(s), []).append(i)
    out: dict[str, dict[str, float]] = {}
    for name, idx in groups.items():
        win = sum(1 for i in idx if scores_a[i] > scores_b[i] + tie_margin)
        lose = sum(1 for i in idx if scores_a[i] < scores_b[i] - tie_margin)
        n = len(idx)
        out[name] = {
            "n": n,
            "win": win,
            "tie": n - win - lose,
            "lose": lose,
            "win_rate": win / n if n else 0.0,
            "tie_rate": (n - win - lose) / n if n else 0.0,
            "lose_rate": lose / n if n else 0.0,
            "mean_a": sum(scores_a[i] for i in idx) / n if n else 0.0,
            "mean_b": sum(scores_b[i] for i in idx) / n if n else 0.0,
        }
    return out


# -------------------------------------------------------------------------------------------------- evaluation


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


def _side_stats(gen: Generation, stats: TokenStats) -> dict[str, float]:
    """Paper 5.2's statistics of one side, through the same sums as PPO's periodic evaluation
    (:func:`ppomax.algos.response_sums`, :func:`ppomax.algos.response_statistics`), in float64 over the whole
    evaluation; the KL ones when ``stats`` has a reference. Lengths and words are the responses' own (EOS not
    counted)."""
    n = len(gen.responses)
    logp = stats.logp.double()
    with_kl = stats.kl is not None and stats.ref_logp is not None
    ref = stats.ref_logp.double() if with_kl else logp
    kl = stats.kl.double() if with_kl else torch.zeros_like(logp)
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
    policy: Any,
    baseline: Any,
    tokenizer: Any,
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
    gen_kwargs = dict(
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


def load_eval_prompts(
    path: Any,
    limit: int | None = None,
    *,
    chat_format: str = "auto",
    tokenizer: Any = None,
) -> tuple[list[Dialogue | str], list[str] | None]:
    """Prompts (dialogues, rendered in ``chat_format`` with ``tokenizer``: :func:`ppomax.data.load_prompts`) and
    their subsets (``None`` when no record names one) from any prompts source of ppomax.data (a file, a
    directory, a glob, a Hub dataset, a mapping of load_dataset's arguments: :mod:`ppomax.data.sources`)."""
    from ppomax.data import load_prompts

    examples = load_prompts(path, format=chat_format, tokenizer=tokenizer)
    if limit is not None:
        examples = examples[:limit]
    if not examples:
        raise UserError(f"{describe(path)}: no prompts")
    prompts = [e.dialogue or e.prompt for e in examples]
    subsets = [e.meta.get("subset") for e in examples]
    if all(s is None for s in subsets):
        return prompts, None
    return prompts, [str(s) if s is not None else "helpful" for s in subsets]


def run_data_config(model_dir: str | os.PathLike[str]) -> tuple[dict[str, Any], Path] | None:
    """``(data section, config path)`` of the run that saved ``model_dir`` (``<run>/final``,
    ``<run>/final/policy``, ...): its ``config.yaml`` in ``model_dir`` or up to two levels above; None without
    one (a Hub id has none). Evaluation renders and cuts prompts as that run did (``chat_format``,
    ``max_prompt_tokens``)."""
    import yaml

    if not Path(model_dir).exists():
        return None
    start = Path(model_dir).absolute()
    for d in (start, start.parent, start.parent.parent):
        path = d / "config.yaml"
        if not path.is_file():
            continue
        try:
            cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise UserError(f"{path}: cannot read the run's config: {type(e).__name__}") from None
        data = cfg.get("data") if isinstance(cfg, dict) else None
        if isinstance(data, dict):
            return data, path
    return None


def eval_chat_format(
    policy_dir: str | os.PathLike[str], tokenizer: Any, override: str | None = None
) -> tuple[ChatFormat, str]:
    """The chat format of an evaluation and why: ``override`` (``--chat-format``), else the policy's run config
    (:func:`run_data_config`: the format PPO's own evaluation used), else ``auto``; ``auto`` resolved with
    ``tokenizer`` (:func:`ppomax.data.resolve_chat_format`)."""
    if override is not None:
        return resolve_chat_format(override, tokenizer, "--chat-format")
    found = run_data_config(policy_dir)
    if found is not None and "chat_format" in found[0]:
        return resolve_chat_format(str(found[0]["chat_format"]), tokenizer, f"data.chat_format in {found[1]}")
    fmt, why = resolve_chat_format("auto", tokenizer, "--chat-format")
    return fmt, f"{why} (default: no run config.yaml at or above the policy)"


def evaluate(
    policy_dir: str | os.PathLike[str],
    baseline_dir: str | os.PathLike[str],
    prompts_file: Any,
    judges: Mapping[str, tuple[str, Any]],
    settings: EvalSettings | None = None,
    tokenizer_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
    chat_format: str | None = None,
) -> dict[str, Any]:
    """`ppomax eval` as a function: load both policies (and any reward-model judge given as a path) and
    run :func:`evaluate_models` with ``judges`` as it takes them. Prompts are rendered in the chat format of
    :func:`eval_chat_format` (``chat_format``: the override), recorded in the result as ``chat_format`` and
    ``chat_format_reason``."""
    from ppomax.models import ValueHeadModel, check_same_tokens, check_vocab, load_causal_lm, load_tokenizer

    s = settings or EvalSettings()
    if s.max_prompt_tokens is None:  # cut as the policy's run cut its prompts
        found = run_data_config(policy_dir)
        budget = found[0].get("max_prompt_tokens") if found is not None else None
        s = dataclasses.replace(s, max_prompt_tokens=int(budget or DEFAULT_MAX_PROMPT_TOKENS))
    tokenizer_key = "--tokenizer" if tokenizer_dir else "--policy"
    tokenizer = load_tokenizer(str(tokenizer_dir or policy_dir), key=tokenizer_key)
    fmt, why = eval_chat_format(policy_dir, tokenizer, chat_format)
    # held-out prompts: a Hub dataset (or a source with several splits) names its split
    source = (
        prompts_file if isinstance(prompts_file, Source) else Source(prompts_file, "--prompts", held_out=True)
    )
    prompts, subsets = load_eval_prompts(source, s.limit, chat_format=fmt, tokenizer=tokenizer)
    policy = load_causal_lm(str(policy_dir), key="--policy")
    check_vocab(policy, tokenizer, "--policy", tokenizer_key)
    baseline = load_causal_lm(str(baseline_dir), key="--baseline")
    check_vocab(baseline, tokenizer, "--baseline", tokenizer_key)
    loaded: dict[str, tuple[str, Any]] = {}
    for name, (kind, judge) in judges.items():
        if kind == "reward-model" and isinstance(judge, str | os.PathLike):
            path, judge = judge, ValueHeadModel.from_pretrained(judge, key=f"--judge {name}")
            check_vocab(judge, tokenizer, f"--judge {name}", tokenizer_key)
            check_same_tokens(path, tokenizer, f"--judge {name}", tokenizer_key)
        loaded[name] = (kind, judge)
    result = evaluate_models(policy, baseline, tokenizer, prompts, subsets, loaded, s, progress=progress)
    result["policy"]["path"] = str(policy_dir)
    result["baseline"]["path"] = str(baseline_dir)
    result["prompts_file"] = source.name
    result["chat_format"] = fmt
    result["chat_format_reason"] = why
    return result


def format_table(result: dict[str, Any], policy_name: str = "policy", baseline_name: str = "baseline") -> str:
    """A plain-text summary of :func:`evaluate`'s result."""
    lines = []
    for name, j in result["judges"].items():
        lines.append(
            f"judge {name}: {policy_name} vs {baseline_name} (tie margin {result['settings']['tie_margin']})"
        )
        lines.append(
            f"  {'subset':<10} {'n':>4} {'win':>6} {'tie':>6} {'lose':>6}  {'mean ' + policy_name:>14} "
            f"{'mean ' + baseline_name:>14}"
        )
        for subset, r in j["win_tie_lose"].items():
            lines.append(
                f"  {subset:<10} {r['n']:>4} {r['win_rate']:>6.0%} {r['tie_rate']:>6.0%} {r['lose_rate']:>6.0%}  "
                f"{r['mean_a']:>14.3f} {r['mean_b']:>14.3f}"
            )
    p, b = result["policy"], result["baseline"]
    lines.append(
        f"{'':<12} {'perplexity':>10} {'len(tok)':>9} {'len(words)':>10} {'cut':>5} {'KL/token':>9} {'KL/seq':>8}"
    )
    lines.append(
        f"{policy_name:<12} {p['perplexity']:>10.3f} {p['length_tokens']:>9.1f} {p['length_words']:>10.1f} "
        f"{p['truncated_rate']:>5.0%} {p['kl_per_token']:>9.4f} {p['kl_per_sequence']:>8.3f}"
    )
    lines.append(
        f"{baseline_name:<12} {b['perplexity']:>10.3f} {b['length_tokens']:>9.1f} {b['length_words']:>10.1f} "
        f"{b['truncated_rate']:>5.0%} {'-':>9} {'-':>8}"
    )
    return "\n".join(lines)


def write_json(result: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(result, indent=1), encoding="utf-8")
    return p
