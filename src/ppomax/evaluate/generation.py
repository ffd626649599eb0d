"""Both sides' answers to the evaluation prompts (:func:`generate`): sampled with the paper's 6.1 settings or
greedy, through the rollout engine PPO uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from pydantic import ValidationError

from ppomax.config import GenerationConfig
from ppomax.data.chat import Dialogue
from ppomax.errors import UserError
from ppomax.ppo.rollout import HFGenerateEngine, eos_ids_of, rollout

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ppomax.models.adapter_dir import CausalLM


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
    model: CausalLM,
    tokenizer: PreTrainedTokenizerBase,
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
    """Sample one response per prompt with the PPO rollout (:func:`ppomax.ppo.rollout.rollout`: left-padded batches,
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
