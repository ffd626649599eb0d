"""The stages of `ppomax demo` (see :mod:`ppomax.demo`): each takes its output directory and its inputs'
directories, and leaves a trained artefact there. They call the same trainers and loaders a user calls.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ppomax.demo.outcome import GOLD_REWARD
from ppomax.demo.profiles import DemoProfile
from ppomax.demo.tokenizer import train_bpe_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ppomax.config import PPOConfig
    from ppomax.models import ValueHeadModel

# The gold reward as a PPO reward function of weight 0 (logged as reward/gold_mean, never optimised); the world
# directory is added as its kwargs.
GOLD_FUNCTION = {"function": "ppomax.demo.world.reward:gold", "name": GOLD_REWARD, "weight": 0.0}


def _logging(d: Path, progress: bool) -> dict[str, Any]:
    return {"out_dir": str(d), "report_to": [], "progress": progress, "log_every": 1}


# ------------------------------------------------------------------------------------------------ world


def make_world(d: Path, seed: int, prof: DemoProfile) -> None:
    from ppomax.demo.world import WorldConfig, build_world, write_world

    write_world(build_world(WorldConfig(seed=seed, **prof.world)), d)


# -------------------------------------------------------------------------------------------- tokenizer


def train_tokenizer(d: Path, world: Path, prof: DemoProfile) -> None:
    """Byte-level BPE (GPT-2 style, so any text round-trips) trained on the world's pretraining text, with
    ``<pad>``, ``<s>`` (BOS, not added automatically) and ``</s>`` (EOS)."""
    texts = [json.loads(line)["text"] for line in (world / "pretrain.jsonl").read_text().splitlines() if line]
    train_bpe_tokenizer(texts, prof.vocab_size).save_pretrained(d)


# ---------------------------------------------------------------------------------------------- models


def init_model_dir(d: Path, tok_dir: Path, prof: DemoProfile) -> Path:
    """A directory with a tiny LlamaConfig and the tokenizer: what pretraining with init_from_config reads."""
    from transformers import AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=prof.hidden_size,
        intermediate_size=prof.intermediate_size,
        num_hidden_layers=prof.num_layers,
        num_attention_heads=prof.num_heads,
        num_key_value_heads=prof.num_heads,
        max_position_embeddings=prof.max_positions,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    d.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def pack_texts(texts: list[str], tokenizer: PreTrainedTokenizerBase, block: int, seed: int) -> list[str]:
    """Shuffle texts and join them, separated by EOS, into records of at most ``block`` tokens (GPT-style
    packing): fixed-size batches then carry no padding, which halves pre-training time on this corpus of
    short texts. The trainer still appends one EOS per record; a text longer than a block stays alone."""
    import random

    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    lens = [len(x) + 1 for x in tokenizer([texts[i] for i in order], add_special_tokens=False)["input_ids"]]
    eos = tokenizer.eos_token
    records: list[str] = []
    cur: list[str] = []
    cur_len = 0
    for i, n in zip(order, lens, strict=True):
        if cur and cur_len + n > block:
            records.append(eos.join(cur))
            cur, cur_len = [], 0
        cur.append(texts[i])
        cur_len += n
    if cur:
        records.append(eos.join(cur))
    return records


def pretrain(d: Path, world: Path, tok: Path, prof: DemoProfile, seed: int, progress: bool) -> Path:
    from transformers import AutoTokenizer

    from ppomax.config import SFTConfig
    from ppomax.trainers.sft import train_sft

    init = init_model_dir(d / "init", tok, prof)
    texts = [json.loads(line)["text"] for line in (world / "pretrain.jsonl").read_text().splitlines() if line]
    block = prof.max_positions
    packed = pack_texts(texts, AutoTokenizer.from_pretrained(str(tok)), block - 1, seed)
    with (d / "pretrain_packed.jsonl").open("w") as fh:
        fh.writelines(json.dumps({"text": t}) + "\n" for t in packed)
    cfg = SFTConfig.model_validate(
        {
            "seed": seed,
            "objective": "pretrain",
            "init_from_config": True,
            "model": {"policy": str(init)},
            "data": {
                "train": str(d / "pretrain_packed.jsonl"),
                "max_prompt_tokens": block // 2,
                "max_response_tokens": block - block // 2,
            },
            "epochs": prof.pretrain_epochs,
            "batch_size": prof.pretrain_batch,
            "optim": {
                "lr": prof.pretrain_lr,
                "schedule": "cosine",
                "warmup_ratio": 0.05,
                "weight_decay": 0.01,
            },
            "logging": _logging(d, progress) | {"log_every": 10},
        }
    )
    return train_sft(cfg)


def sft(d: Path, world: Path, pre: Path, prof: DemoProfile, seed: int, progress: bool) -> Path:
    from ppomax.config import SFTConfig
    from ppomax.trainers.sft import train_sft

    cfg = SFTConfig.model_validate(
        {
            "seed": seed,
            "model": {"policy": str(pre / "final")},
            "data": {
                "train": str(world / "sft_train.jsonl"),
                "valid": str(world / "sft_valid.jsonl"),
                "max_prompt_tokens": prof.max_prompt_tokens,
                "max_response_tokens": prof.max_new_tokens,
            },
            "epochs": prof.sft_epochs,
            "batch_size": prof.sft_batch,
            "optim": {
                "lr": prof.sft_lr,
                "schedule": "cosine",
                "warmup_ratio": 0.05,
            },  # cosine to 10%: paper 5.1
            "logging": _logging(d, progress) | {"log_every": 5},
        }
    )
    return train_sft(cfg)


def reward_model(d: Path, world: Path, sft_dir: Path, prof: DemoProfile, seed: int, progress: bool) -> Path:
    from ppomax.config import RMConfig
    from ppomax.trainers.reward_model import train_rm

    cfg = RMConfig.model_validate(
        {
            "seed": seed,
            "model": {"policy": str(sft_dir / "final")},
            "data": {
                "train": str(world / "prefs_train.jsonl"),
                "valid": str(world / "prefs_valid.jsonl"),
                "max_prompt_tokens": prof.max_prompt_tokens,
                "max_response_tokens": prof.max_new_tokens,
            },
            "epochs": prof.rm_epochs,
            "batch_size": prof.rm_batch,
            "beta_rm": 1.0,  # paper 4.2
            "optim": {"lr": prof.rm_lr, "schedule": "cosine", "warmup_ratio": 0.1},  # warmup 10%: paper 4.2
            "logging": _logging(d, progress) | {"log_every": 5, "eval_every": 0},
        }
    )
    return train_rm(cfg)


def ppo_config(
    d: Path,
    preset: str,
    world: Path,
    sft_dir: Path,
    rm_dir: Path,
    prof: DemoProfile,
    seed: int,
    progress: bool,
    extra: Sequence[str] = (),
    pretrain_dir: Path | None = None,
) -> PPOConfig:
    """The preset with the demo's sizes and learning rates (same for both presets) and the gold reward as a
    weight-0 reward function (logged, not optimised).

    ``extra``: further ``--set`` overrides after the profile's (the variants of `ppomax ablate`); in their values
    ``{world}``, ``{sft}``, ``{rm}`` and ``{pretrain}`` stand for those stages' model or data paths
    (:data:`PLACEHOLDERS`)."""
    from ppomax.config import PPOConfig, apply_overrides, deep_merge, read_preset

    overrides = {
        "seed": seed,
        "model": {"policy": str(sft_dir / "final"), "reward": str(rm_dir / "final")},
        "data": {"prompts": str(world / "prompts_train.jsonl"), "max_prompt_tokens": prof.max_prompt_tokens},
        "generation": {"max_new_tokens": prof.max_new_tokens},
        "reward": {
            "model_weight": 1.0,
            "functions": [{**GOLD_FUNCTION, "kwargs": {"world": str(world)}}],
        },
        "optim": {"policy_lr": prof.policy_lr, "critic_lr": prof.critic_lr},
        "ppo": {
            "iterations": prof.ppo_iterations,
            "rollout_batch_size": prof.rollout_batch,
            "buffer_size": prof.buffer_size,
            "minibatch_size": prof.minibatch_size,
            "ppo_epochs": prof.ppo_epochs,
        },
        "logging": _logging(d, progress),
        "collapse": {"action": "warn"},  # vanilla is expected to collapse: let it run to the end and show it
    }
    data = deep_merge(read_preset(preset), overrides)
    data = apply_overrides(data, list(prof.ppo_overrides.get(preset, ())))
    paths = {
        "world": str(world),
        "sft": str(sft_dir / "final"),
        "rm": str(rm_dir / "final"),
        "pretrain": str(pretrain_dir / "final") if pretrain_dir else "",
    }
    data = apply_overrides(data, [fill_placeholders(o, paths) for o in extra])
    return PPOConfig.model_validate(data)


# What an override of `ppomax ablate`'s variant table may name, as ``{name}`` in its value.
PLACEHOLDERS = {
    "world": "the hh-mini world directory (its data files: {world}/sft_train.jsonl)",
    "sft": "the SFT model",
    "rm": "the reward model",
    "pretrain": "the pre-trained model (before SFT)",
}


def fill_placeholders(override: str, paths: dict[str, str]) -> str:
    """``override`` with each ``{name}`` of :data:`PLACEHOLDERS` replaced by its path."""
    for name in PLACEHOLDERS:
        token = "{" + name + "}"
        if token in override:
            if not paths.get(name):
                raise ValueError(f"{override}: no path for {token}")
            override = override.replace(token, paths[name])
    return override


def ppo(
    d: Path,
    preset: str,
    world: Path,
    sft_dir: Path,
    rm_dir: Path,
    prof: DemoProfile,
    seed: int,
    progress: bool,
    extra: Sequence[str] = (),
    pretrain_dir: Path | None = None,
) -> Path:
    from ppomax.ppo import train_ppo

    out = train_ppo(ppo_config(d, preset, world, sft_dir, rm_dir, prof, seed, progress, extra, pretrain_dir))
    if not (d / "final" / "policy").is_dir():  # stopped by a signal: checkpoint saved, stage not done
        raise KeyboardInterrupt
    return out


# ------------------------------------------------------------------------------------------ evaluation


def rm_accuracy(
    rm: ValueHeadModel, tok: PreTrainedTokenizerBase, world: Path, prof: DemoProfile, batch_size: int = 64
) -> dict[str, Any]:
    """The RM's pairwise accuracy on held-out pairs against the annotators' labels and the gold labels, and
    the margins r(chosen) - r(rejected) (paper fig. 2)."""
    import torch

    from ppomax.data import load_preference_pairs, pad_id_of, pad_right, tokenize_pair

    rm.eval()
    pairs = load_preference_pairs(world / "prefs_test.jsonl")
    labels = [json.loads(x) for x in (world / "gold_labels_test.jsonl").read_text().splitlines() if x]
    feats = [
        tokenize_pair(
            tok, p, max_prompt_tokens=prof.max_prompt_tokens, max_response_tokens=prof.max_new_tokens
        )
        for p in pairs
    ]
    pad = pad_id_of(tok)
    margins: list[float] = []
    with torch.no_grad():
        for s in range(0, len(feats), batch_size):
            chunk = feats[s : s + batch_size]
            ids_c, m_c = pad_right([f["prompt_ids"] + f["chosen_ids"] for f in chunk], pad)
            ids_r, m_r = pad_right([f["prompt_ids"] + f["rejected_ids"] for f in chunk], pad)
            margins += (rm.score(ids_c, m_c) - rm.score(ids_r, m_r)).tolist()
    agrees = [bool(lab["gold_agrees"]) for lab in labels]
    # pairs the gold reward scores equally have no gold preference: left out of the gold accuracy
    decided = [lab.get("gold_chosen") != lab.get("gold_rejected") for lab in labels]
    n = len(margins)

    def acc(idx: list[int]) -> dict[str, float]:
        gold_idx = [i for i in idx if decided[i]]
        return {
            "n": len(idx),
            "accuracy_annotator": sum(margins[i] > 0 for i in idx) / max(1, len(idx)),
            "accuracy_gold": sum((margins[i] > 0) == agrees[i] for i in gold_idx) / max(1, len(gold_idx)),
        }

    by_type: dict[str, list[int]] = {}
    for i, lab in enumerate(labels):
        by_type.setdefault(str(lab.get("pair_type", "all")), []).append(i)
    return {
        **acc(list(range(n))),
        "gold_agreement_of_labels": sum(a for a, d in zip(agrees, decided, strict=True) if d)
        / max(1, sum(decided)),
        "by_pair_type": {k: acc(v) for k, v in sorted(by_type.items())},
        "margins": margins,
        "gold_agrees": agrees,
    }


def evaluate_all(
    d: Path,
    world: Path,
    sft_dir: Path,
    rm_dir: Path,
    ppo_dirs: dict[str, Path],
    prof: DemoProfile,
    seed: int,
    progress: bool,
) -> None:
    """Each PPO policy against SFT on held-out prompts (gold judge and RM), plus the RM's accuracy."""
    from ppomax.demo.world.reward import gold_judge
    from ppomax.evaluate import EvalSettings, evaluate_models, load_eval_prompts, write_json
    from ppomax.models import ValueHeadModel, load_causal_lm, load_tokenizer

    prompts, subsets = load_eval_prompts(world / "prompts_test.jsonl", prof.eval_prompts)
    tok = load_tokenizer(sft_dir / "final")
    base = load_causal_lm(sft_dir / "final")
    rm = ValueHeadModel.from_pretrained(rm_dir / "final")
    judges = {"gold": ("gold", gold_judge(str(world))), "rm": ("reward-model", rm)}
    settings = EvalSettings(
        max_new_tokens=prof.eval_max_new_tokens,
        max_prompt_tokens=prof.max_prompt_tokens,
        tie_margin=prof.tie_margin,
        seed=seed,
    )
    cache: dict[str, Any] = {}  # SFT answers and scores computed once for both policies
    for name, pdir in ppo_dirs.items():
        policy = load_causal_lm(pdir / "final" / "policy")
        res = evaluate_models(
            policy, base, tok, prompts, subsets, judges, settings, progress=progress, baseline_cache=cache
        )
        write_json(res, d / f"{name}_vs_sft.json")
    write_json(rm_accuracy(rm, tok, world, prof), d / "rm_accuracy.json")


def write_demo_report(
    d: Path,
    world: Path,
    ppo_dirs: dict[str, Path],
    ev: Path,
    prof: DemoProfile,
    seed: int,
    timings: dict[str, float],
    out: Path,
) -> None:
    from ppomax.demo.outcome import outcome, policy_records
    from ppomax.demo.report import write_report
    from ppomax.monitor import read_metrics

    runs: dict[str, Sequence[dict[str, Any]]] = {
        name: policy_records(read_metrics(p / "metrics.jsonl")) for name, p in ppo_dirs.items()
    }
    evals = {name: json.loads((ev / f"{name}_vs_sft.json").read_text()) for name in ppo_dirs}
    rm_stats = json.loads((ev / "rm_accuracy.json").read_text())
    meta = {
        "profile": prof.name,
        "seed": seed,
        "output": str(out),
        "stage seconds": ", ".join(f"{k} {v:.0f}" for k, v in timings.items()),
    }
    path = write_report(
        d,
        runs,
        evals,
        rm_stats,
        baseline="sft",
        gold_judge="gold",
        rm_judge="rm",
        n_samples=prof.n_samples,
        meta=meta | {"settings": json.dumps(prof.to_dict())},
    )
    res = outcome(runs, evals)
    res["rm_accuracy"] = {k: rm_stats[k] for k in ("n", "accuracy_annotator", "accuracy_gold")}
    res["eval"] = {
        name: {
            "gold_policy": e["judges"]["gold"]["mean_policy"],
            "gold_sft": e["judges"]["gold"]["mean_baseline"],
            "rm_policy": e["judges"]["rm"]["mean_policy"],
            "rm_sft": e["judges"]["rm"]["mean_baseline"],
            "kl_per_token": e["policy"]["kl_per_token"],
            "perplexity": e["policy"]["perplexity"],
            "length_tokens": e["policy"]["length_tokens"],
            "sft_length_tokens": e["baseline"]["length_tokens"],
            "win_tie_lose": {
                s: [r["win"], r["tie"], r["lose"]] for s, r in e["judges"]["gold"]["win_tie_lose"].items()
            },
        }
        for name, e in evals.items()
    }
    res["report"] = str(path)
    res["seed"] = seed
    res["profile"] = prof.name
    res["timings"] = timings
    (d / "summary.json").write_text(json.dumps(res, indent=1, default=str))
