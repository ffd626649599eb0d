"""Step 1 of the PPO iteration, the rollout: sample responses to a batch of left-padded prompts and package them
as an :class:`Experience`.

Generation goes through a pluggable :class:`RolloutEngine`; the default, :class:`HFGenerateEngine`, calls Hugging
Face ``generate`` with the KV cache on. It samples from exactly the distribution ``generation`` describes: the
repetition penalty (on the tokens generated so far only, never on the prompt or its padding, as in MOSS-RLHF),
then temperature, top-k (0 = off) and top-p, nothing else; a response stops at EOS or ``max_new_tokens``. The
model's own ``generation_config`` (a checkpoint's top_k, temperature, min_length, bad words, stop strings...)
takes no part. Greedy decoding (evaluation) applies the same repetition penalty. Another engine (vLLM, a
compiled loop, a test double) only has to return the prompt followed by the generated tokens. Whatever the
engine returns, :func:`finish_rollout` applies the same rule: a response ends at its first EOS (EOS included);
everything after it is replaced by padding and masked out, and a response without EOS is marked ``truncated``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch
from torch import Tensor

from ppomax.config import GenerationConfig
from ppomax.errors import UserError

from .experience import Experience

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from ppomax.models.adapter_dir import CausalLM


class RolloutEngine(Protocol):
    """Anything that continues prompts: returns ``[B, P + R']`` ids, the ``[B, P]`` prompts then up to
    ``max_new_tokens`` new tokens (any padding after EOS is fine: :func:`finish_rollout` masks it).

    For ``generation.logprobs_from: generate`` an engine also needs ``generate_with_logits`` (same arguments),
    returning ``(ids, logits)``: ``logits`` [B, R', V] the model's raw logits at each generated token's step
    (before any sampling processor), as :class:`HFGenerateEngine` does."""

    def generate(
        self, model: CausalLM, input_ids: Tensor, attention_mask: Tensor, *, greedy: bool = False
    ) -> Tensor: ...


def eos_ids_of(tokenizer: PreTrainedTokenizerBase, model: torch.nn.Module | None = None) -> list[int]:
    """Every id that ends a response: the tokenizer's EOS plus the model's ``generation_config`` EOS ids
    (chat models often list several, e.g. Llama 3's end-of-turn token)."""
    ids: list[int] = []
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.append(int(tokenizer.eos_token_id))
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None) if gen is not None else None
    for e in [extra] if isinstance(extra, int) else (extra or []):
        if int(e) not in ids:
            ids.append(int(e))
    if not ids:
        raise UserError("the tokenizer has no EOS token: responses could never end; set tokenizer.eos_token")
    return ids


class HFGenerateEngine:
    """Hugging Face ``generate`` with the KV cache. Sampling settings come from ``generation`` (section of
    :class:`~ppomax.config.PPOConfig`); ``greedy=True`` (evaluation) decodes greedily with the same length limit
    and repetition penalty. ``synced``: the model's forward is a collective (ZeRO-3 or FSDP over several
    processes), so every rank keeps stepping until all ranks are done (``synced_gpus``)."""

    def __init__(
        self, gen: GenerationConfig, eos_ids: Sequence[int], pad_id: int, synced: bool = False
    ) -> None:
        if gen.compile and synced:
            raise UserError(
                "generation.compile: true needs an unsharded policy; under ZeRO-3 or FSDP over several "
                "processes its forward is a collective that cannot be compiled here: set generation.compile: false"
            )
        self.gen = gen
        self.eos_ids = list(eos_ids)
        self.pad_id = pad_id
        self.synced = synced

    def generation_config(self, greedy: bool, device_type: str = "cpu") -> Any:
        """HF settings with every knob ppomax controls set explicitly, to HF's own "off" values where the
        config says off (top_k 0, top_p 1, temperature 1). HF's built-in repetition penalty stays off (1.0):
        it would also penalise the prompt; :meth:`logits_processors` applies the penalty instead.
        ``generation.compile``: a static cache and HF's compiled decoding step, on any device (HF compiles only
        on accelerators unless told), CUDA graphs on CUDA (HF's default mode), inductor's default mode on CPU;
        otherwise HF never compiles."""
        from transformers import CompileConfig
        from transformers import GenerationConfig as HFGenerationConfig

        g = self.gen
        kwargs: dict[str, Any] = dict(
            max_new_tokens=g.max_new_tokens,
            eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id,
            num_beams=1,
            num_return_sequences=1,
            repetition_penalty=1.0,
            use_cache=True,
            do_sample=not greedy,
        )
        if not greedy:
            kwargs.update(temperature=g.temperature, top_p=g.top_p, top_k=g.top_k)
        if g.compile:
            compiled = CompileConfig() if device_type == "cuda" else CompileConfig(mode="default")
            compiled._compile_all_devices = True  # type: ignore[assignment]  # transformers declares it None
            kwargs.update(cache_implementation="static", compile_config=compiled)
        else:
            kwargs.update(disable_compile=True)
        return HFGenerationConfig(**kwargs)

    def logits_processors(self, prompt_width: int) -> list[Any]:
        """The repetition penalty on the response only: HF's processor ignores the first ``prompt_width``
        columns (the left-padded prompts), so neither a prompt's tokens nor its padding (often = EOS) are
        penalised and a prompt's padding cannot change its continuation."""
        if self.gen.repetition_penalty == 1.0:
            return []
        from transformers import RepetitionPenaltyLogitsProcessor

        penalty = float(self.gen.repetition_penalty)
        return [RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=prompt_width)]

    @torch.no_grad()
    def generate(
        self, model: CausalLM, input_ids: Tensor, attention_mask: Tensor, *, greedy: bool = False
    ) -> Tensor:
        return self._generate(model, input_ids, attention_mask, greedy)

    @torch.no_grad()
    def generate_with_logits(
        self, model: CausalLM, input_ids: Tensor, attention_mask: Tensor, *, greedy: bool = False
    ) -> tuple[Tensor, Tensor]:
        """:meth:`generate`, plus the [B, R', V] float32 raw logits HF ``generate`` saw at each step (its
        ``output_logits``: before the repetition penalty, temperature and top-p)."""
        out = self._generate(model, input_ids, attention_mask, greedy, with_logits=True)
        return out.sequences, torch.stack(out.logits, dim=1)

    def _generate(
        self,
        model: CausalLM,
        input_ids: Tensor,
        attention_mask: Tensor,
        greedy: bool,
        with_logits: bool = False,
    ) -> Any:
        from transformers import LogitsProcessorList

        config = self.generation_config(greedy, input_ids.device.type)
        if with_logits:
            config.return_dict_in_generate = config.output_logits = True
        with _without_model_generation_config(model):
            return model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                generation_config=config,
                logits_processor=LogitsProcessorList(self.logits_processors(input_ids.shape[1])),
                synced_gpus=self.synced,
            )


@contextmanager
def _without_model_generation_config(model: CausalLM) -> Iterator[None]:
    """Hide the model's ``generation_config`` from ``generate`` for the duration of one call.

    HF fills every field our settings leave unset (``None``) from the model's ``generation_config``, and many
    knobs (min_p, suppress_tokens, stop_strings, max_time, sequence_bias...) can only be "off" as ``None``:
    a checkpoint's ``generation_config.json`` would silently change what PPO samples. With a blank one in its
    place, unset fields fall back to HF's global defaults, which are all "off" (top_k 50 aside, which
    :meth:`HFGenerateEngine.generation_config` sets whenever it samples).

    A PEFT model's ``generate`` copies its ``generation_config`` (its base's, unless set on the wrapper) onto its
    base, so it is swapped on the base: swapped on the wrapper, the blank one would stay on the base, and be saved
    with it."""
    from transformers import GenerationConfig as HFGenerationConfig

    from ppomax.models.adapter_dir import is_peft_model

    # PEFT types the model it wraps as any Module: a policy's is a transformers model
    target = cast("PreTrainedModel", model.get_base_model()) if is_peft_model(model) else model
    own = target.generation_config
    target.generation_config = HFGenerationConfig()
    try:
        yield
    finally:
        target.generation_config = own


def finish_rollout(
    prompt_ids: Tensor, prompt_mask: Tensor, sequences: Tensor, eos_ids: Sequence[int], pad_id: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Cut every response at its first EOS and trim the batch to its longest response.

    prompt_ids, prompt_mask: [B, P] left-padded prompts; sequences: [B, P + R'] from an engine.
    Returns ``(sequences [B, P+R], attention_mask [B, P+R], response_mask [B, R] bool, truncated [B] bool,
    response_lens [B] long on the CPU)`` with R = the longest response (at least 1 column). Vectorised: the first
    EOS is found with a cumulative sum, not a loop over tokens.
    """
    width = prompt_ids.shape[1]
    response = sequences[:, width:]
    if response.shape[1] == 0:
        response = response.new_full((response.shape[0], 1), pad_id)
        is_eos = torch.zeros_like(response, dtype=torch.bool)
        keep = torch.zeros_like(is_eos)
    else:
        is_eos = torch.isin(response, torch.as_tensor(list(eos_ids), device=response.device))
        seen = is_eos.long().cumsum(dim=1)
        # Keep tokens up to and including the first EOS: before it nothing is counted, at it exactly one.
        keep = (seen - is_eos.long()) == 0
    truncated = ~is_eos.any(dim=1)
    lens = keep.sum(dim=1).cpu()
    r = max(int(lens.max()), 1) if len(lens) else 1
    keep = keep[:, :r]
    response = response[:, :r].masked_fill(~keep, pad_id)
    full = torch.cat([prompt_ids, response], dim=1)
    mask = torch.cat([prompt_mask.long(), keep.long()], dim=1)
    return full, mask, keep, truncated, lens


def rollout(
    engine: RolloutEngine,
    model: CausalLM,
    tokenizer: PreTrainedTokenizerBase,
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    eos_ids: Sequence[int],
    pad_id: int,
    prompts: list[str] | None = None,
    meta: list[dict[str, Any]] | None = None,
    greedy: bool = False,
    keep_logits: bool = False,
) -> Experience:
    """Generate responses for left-padded prompts ``input_ids`` / ``attention_mask`` ([B, P]) and return the
    first stage of an :class:`Experience` (tokens, masks, lengths, texts). ``model`` is the unwrapped policy.

    ``keep_logits`` (``generation.logprobs_from: generate``): the sampling pass's own raw logits at the
    response positions (``engine.generate_with_logits``) are kept in ``sampling_logits``, so that the scoring
    pass reads the policy's log-probs, entropy and exact KL from them instead of running the policy."""
    was_training = getattr(model, "training", False)
    model.eval()
    logits = None
    try:
        if not keep_logits:
            out = engine.generate(model, input_ids, attention_mask, greedy=greedy)
        else:
            with_logits = getattr(engine, "generate_with_logits", None)
            if with_logits is None:
                raise UserError(
                    f"generation.logprobs_from: generate needs a rollout engine that returns the sampling "
                    f"logits (generate_with_logits); {type(engine).__name__} does not: use sampling"
                )
            out, logits = with_logits(model, input_ids, attention_mask, greedy=greedy)
    finally:
        if was_training:
            model.train()
    seqs, mask, resp_mask, truncated, lens = finish_rollout(input_ids, attention_mask, out, eos_ids, pad_id)
    width = input_ids.shape[1]
    if logits is not None:
        logits = _response_columns(logits, resp_mask.shape[1])
    rows = seqs[:, width:].tolist()
    texts = tokenizer.batch_decode(
        [row[:n] for row, n in zip(rows, lens.tolist(), strict=True)], skip_special_tokens=True
    )
    return Experience(
        sequences=seqs,
        attention_mask=mask,
        response_mask=resp_mask,
        prompt_width=width,
        prompt_lens=attention_mask.sum(dim=1).cpu(),
        response_lens=lens,
        truncated=truncated,
        prompts=list(prompts) if prompts is not None else [],
        responses=texts,
        meta=list(meta) if meta is not None else [{} for _ in texts],
        sampling_logits=logits,
    )


def _response_columns(logits: Tensor, width: int) -> Tensor:
    """The sampling pass's [B, R', V] logits at the ``width`` response columns that :func:`finish_rollout`
    kept (R' >= width, but for a zero-width response, where it keeps one pad column: zeros there)."""
    if logits.shape[1] < width:
        logits = torch.nn.functional.pad(logits, (0, 0, 0, width - logits.shape[1]))
    return logits[:, :width]
