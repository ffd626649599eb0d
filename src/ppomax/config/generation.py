"""``generation``: how PPO samples its rollouts (PPO-max's defaults, each naming its source)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ppomax.config.section import Section


class GenerationConfig(Section):
    """Sampling settings for rollouts. Defaults are PPO-max's; each description names its source."""

    max_new_tokens: int = Field(
        128,
        gt=0,
        description="MOSS-RLHF code (maxlen_res default 128; the paper evaluates with up to 2048, 6.1).",
    )
    temperature: float = Field(0.8, gt=0, description="Paper 6.1 (its generation settings) / MOSS-RLHF code.")
    top_p: float = Field(
        0.9, gt=0, le=1, description="Paper 6.1 (nucleus sampling, p = 0.9) / MOSS-RLHF code."
    )
    top_k: int = Field(
        0, ge=0, description="0 = off. Ours: off (neither the paper nor MOSS-RLHF code uses it)."
    )
    repetition_penalty: float = Field(
        1.1,
        gt=0,
        description="1.0 = off. Paper 6.1 (beta = 1.1, on previously generated tokens) / MOSS-RLHF code.",
    )
    logprobs_from: Literal["sampling", "raw", "generate"] = Field(
        "sampling",
        description="Log-probs for the ratio and KL from temperature-scaled logits (the distribution actually "
        "sampled from) or from raw logits; generate: as sampling, the policy's logits (log-probs, entropy, exact KL) "
        "taken from the sampling pass (no second forward; held until the scoring pass). Ours: sampling (MOSS-RLHF "
        "code uses raw logits).",
    )
    truncated_response: Literal["score", "penalty"] = Field(
        "score",
        description="A response that hits max_new_tokens without EOS: scored as is, or given `truncated_penalty`. "
        "Ours: score.",
    )
    truncated_penalty: float = Field(-1.0, description="Ours: used only with truncated_response: penalty.")
    compile: bool = Field(
        False,
        description="Sample with a static KV cache and the decoding step compiled by torch.compile (HF generate's "
        "CompileConfig; on CPU inductor, which needs a C++ compiler). Measured on CPU (BENCHMARKS.md): ~15% faster "
        "generation of a 21.5M-parameter Llama after a cold compilation of ~20 s, which only pays back after ~35 "
        "generate calls, and no gain at 4.5M. Single-process and DDP only (not with a policy sharded by ZeRO-3 or "
        "FSDP). Ours: off.",
    )
    samples_per_prompt: int = Field(
        1,
        ge=1,
        description="Responses sampled per prompt, generated and trained on together as a group (the n of GRPO and "
        "RLOO, ppo.advantage_estimator); ppo.rollout_batch_size, buffer_size and minibatch_size count responses "
        "and must be multiples of it. Ours: 1, one response per prompt as in the paper.",
    )
