"""Shared pieces of the PPO tests: a tiny setup on disk (policy, reward model, prompts, PTX data) and a few
programmatic rewards, importable by ``reward.functions`` as ``ppo_helpers:NAME`` (the tests directory is on
``sys.path`` under pytest). Everything is built in the test's tmp_path; nothing is downloaded.

Model size: the tiny Llama of ``tiny_lm.make_tiny_lm``: 2 layers, hidden 32, 2 heads, vocabulary ~300 (a BPE
tokenizer trained on a few sentences), about 40k parameters.
"""

from __future__ import annotations

import builtins
import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ppomax.config import PPOConfig, load_config
from ppomax.ppo.experience import Experience
from tiny_lm import make_tiny_lm, write_jsonl

TEXTS = [
    "\n\nHuman: What is the capital of France?\n\nAssistant: The capital of France is Paris.",
    "\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour, water, salt and yeast, knead, let it rise, bake.",
    "\n\nHuman: Tell me a joke.\n\nAssistant: Why did the chicken cross the road? To get to the other side.",
    "\n\nHuman: Count to five.\n\nAssistant: 1 2 3 4 5. Done!",
    "The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9 + - = ? ! , .",
]
QUESTIONS = [
    "What is the capital of France?",
    "How do I bake bread?",
    "Tell me a joke.",
    "Count to five.",
    "What is 2 + 2?",
    "Name a colour.",
    "Where is Paris?",
    "What do dogs eat?",
    "Why is the sky blue?",
    "Say something nice.",
    "What is bread made of?",
    "Who are you?",
]


@dataclass
class PPOSetup:
    root: Path
    policy: Path
    reward: Path
    prompts: Path
    valid: Path
    ptx: Path


def make_setup(tmp_path: Path, *, reference_seed: int | None = None, tie: bool | None = None) -> PPOSetup:
    """Policy (random tiny Llama), a value-head RM on the same backbone, prompt files and PTX examples.
    ``reference_seed`` also writes a *different* tiny model as ``root/reference``; ``tie``: the policy's LM head
    is tied to its input embeddings."""
    from ppomax.models import ValueHeadModel

    policy = make_tiny_lm(tmp_path, TEXTS, name="policy", seed=0, tie=tie)
    rm_dir = tmp_path / "rm"
    ValueHeadModel.from_causal_lm(policy, seed=1).save_pretrained(rm_dir)
    if reference_seed is not None:
        make_tiny_lm(tmp_path, TEXTS, name="reference", seed=reference_seed)
    prompts = write_jsonl(
        tmp_path / "prompts.jsonl", [{"prompt": f"\n\nHuman: {q}\n\nAssistant:"} for q in QUESTIONS]
    )
    valid = write_jsonl(
        tmp_path / "valid.jsonl", [{"prompt": f"\n\nHuman: {q}\n\nAssistant:"} for q in QUESTIONS[:4]]
    )
    ptx = write_jsonl(tmp_path / "ptx.jsonl", [{"text": t} for t in TEXTS[:4]])
    return PPOSetup(tmp_path, policy, rm_dir, prompts, valid, ptx)


FAST = [
    "generation.max_new_tokens=8",
    "ppo.iterations=2",
    "ppo.critic_pretrain_steps=0",
    "ppo.rollout_batch_size=4",
    "ppo.buffer_size=8",
    "ppo.minibatch_size=8",
    "ppo.ppo_epochs=1",
    "optim.warmup_steps=0",
    "optim.policy_lr=1e-3",
    "optim.critic_lr=1e-3",
    "logging.tensorboard=false",
    "logging.progress=false",
]


def config(
    setup: PPOSetup, *overrides: str, preset: str = "ppo_max", out: str = "run", rm: bool = True
) -> PPOConfig:
    """A small, fast PPO config on ``setup``; later overrides win."""
    base = [
        f"model.policy={setup.policy}",
        f"data.prompts={setup.prompts}",
        f"logging.out_dir={setup.root / out}",
        *FAST,
    ]
    if rm:
        base.append(f"model.reward={setup.reward}")
    cfg = load_config("ppo", preset=preset, overrides=[*base, *overrides])
    assert isinstance(cfg, PPOConfig)
    return cfg


def reward_fn(spec: str, weight: float = 1.0, **kwargs: Any) -> str:
    """A ``--set reward.functions=[...]`` override for one function (YAML flow syntax)."""
    return "reward.functions=" + json.dumps([{"function": spec, "weight": weight, "kwargs": kwargs}])


# ----------------------------------------------------------------------------------------------- rewards


def target_tokens(
    prompts: list[str], responses: list[str], *, prompt_ids, response_ids, modulus: int = 10
) -> list[float]:
    """Fraction of response tokens whose id is a multiple of ``modulus`` (about 1/modulus for a random policy);
    an empty response scores 0. Easy to raise: the policy only has to favour ~30 of ~300 tokens."""
    return [sum(t % modulus == 0 for t in ids) / len(ids) if ids else 0.0 for ids in response_ids]


def response_length(prompts: list[str], responses: list[str], **_: Any) -> list[float]:
    return [float(len(r)) for r in responses]


def echo_inputs(prompts, responses, *, prompt_ids, response_ids, meta, path: str) -> list[float]:
    """Records what it was called with (for the interface test) and scores 1.0."""
    Path(path).write_text(
        json.dumps(
            {
                "prompts": prompts,
                "responses": responses,
                "prompt_ids": prompt_ids,
                "response_ids": response_ids,
                "meta": meta,
            }
        )
    )
    return [1.0] * len(prompts)


def nan_from_call(
    prompts, responses, *, prompt_ids, response_ids, counter: str, start: int, stop: int = 10**9
) -> list[float]:
    """Scores like ``target_tokens``, but NaN on calls ``start..stop`` (1-based, inclusive). ``counter`` is a
    file that counts calls across processes/resumes."""
    n = _bump(counter)
    if start <= n <= stop:
        return [float("nan")] * len(prompts)
    return target_tokens(prompts, responses, prompt_ids=prompt_ids, response_ids=response_ids)


def some_nonfinite(prompts, responses, *, prompt_ids, response_ids, finite: int = 2) -> list[float]:
    """Scores like ``target_tokens`` for the first ``finite`` responses of each call; NaN, +inf, -inf, NaN, ...
    for the others."""
    good = target_tokens(prompts, responses, prompt_ids=prompt_ids, response_ids=response_ids)
    bad = [float("nan"), float("inf"), float("-inf")]
    return [s if i < finite else bad[(i - finite) % 3] for i, s in enumerate(good)]


def raises(prompts, responses, *, prompt_ids, response_ids, kind: str = "ValueError") -> list[float]:
    """Raises the builtin exception ``kind`` from inside the function (not a calling-convention error)."""
    raise getattr(builtins, kind)("the scorer broke\nsecond line")


def counted(prompts, responses, *, prompt_ids, response_ids, counter: str) -> list[float]:
    """Scores like ``target_tokens`` and counts its calls in the file ``counter`` (a moment another process
    can see)."""
    _bump(counter)
    return target_tokens(prompts, responses, prompt_ids=prompt_ids, response_ids=response_ids)


def signal_on_call(
    prompts, responses, *, prompt_ids, response_ids, counter: str, at: int, sig: str = "SIGTERM"
) -> list[float]:
    """Scores like ``target_tokens`` and sends ``sig`` to this process on its ``at``-th call (only once, even
    across a resume: the call count lives in the file ``counter``)."""
    if _bump(counter) == at:
        os.kill(os.getpid(), getattr(signal, sig))
    return target_tokens(prompts, responses, prompt_ids=prompt_ids, response_ids=response_ids)


def _bump(counter: str) -> int:
    p = Path(counter)
    n = int(p.read_text()) + 1 if p.exists() else 1
    tmp = p.with_name(f"{p.name}.{os.getpid()}")
    tmp.write_text(str(n))
    os.replace(tmp, p)  # atomic: a process killed here leaves the old count, never an empty file
    return n


def synthetic_experience(scores: list[float], response_width: int = 5) -> Experience:
    """A scored buffer without a model: one row per score, 2 prompt tokens, ``response_width`` response tokens
    (the first row's last two padded), seeded random log-probs, reference log-probs and values."""
    g = torch.Generator().manual_seed(0)
    b, r = len(scores), response_width
    rmask = torch.ones(b, r, dtype=torch.bool)
    rmask[0, 3:] = False
    return Experience(
        torch.randint(3, 50, (b, 2 + r), generator=g),
        torch.cat([torch.ones(b, 2, dtype=torch.long), rmask.long()], 1),
        rmask,
        2,
        torch.full((b,), 2),
        rmask.sum(1),
        torch.zeros(b, dtype=torch.bool),
        logprobs=-torch.rand(b, r, generator=g) * 3,
        ref_logprobs=-torch.rand(b, r, generator=g) * 3,
        values=torch.randn(b, r, generator=g),
        scores=torch.tensor(scores, dtype=torch.float32),
    )
