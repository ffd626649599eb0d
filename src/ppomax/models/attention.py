"""Attention in float32 where a CPU model computes in bfloat16.

On CPU, torch's scaled-dot-product attention is slower in bfloat16 than in float32 (its flash kernel's backward
and its decode steps), while the matmuls around it are 2.4x (AVX512-BF16) to 7x (AMX) faster in bf16
(``bench/attention.py``). Under bf16 autocast (how ppomax trains with ``model.dtype: bfloat16``), or training
bf16 weights (DeepSpeed's bf16 mode), ppomax therefore computes attention in float32 on CPU and returns its output
in bf16, as the bf16 kernel would: a bf16 PPO iteration of a 21.5M-parameter Llama ran 14% faster (generation
-22%, training -13%; BENCHMARKS.md), and its gradients are as close to float32's or closer. Anywhere
else (float32, CUDA, a frozen bf16 model's no-grad forward, where the bf16 kernel is as fast) it is transformers'
own SDPA, unchanged.

It is installed through transformers' attention interface (:func:`use_cpu_float32_attention`) on every model
ppomax loads whose attention is SDPA. The mask function is registered under the same name: without it
transformers builds no padding mask for a custom attention function and left-padded rows would attend to their
padding. The choice is not saved with a model (``save_pretrained`` writes no attention implementation).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar, cast

import torch
from torch import Tensor

if TYPE_CHECKING:
    from transformers import PreTrainedModel

M = TypeVar("M", bound=torch.nn.Module)

NAME = "ppomax_cpu_float32_sdpa"


def _computes_in_bf16(query: Tensor, key: Tensor, value: Tensor) -> bool:
    """Whether SDPA would run in bf16 on CPU here: under CPU bf16 autocast (which casts its inputs to bf16), or
    with bf16 inputs while training (their backward is the slow kernel)."""
    if query.device.type != "cpu":
        return False
    if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16:
        return True
    return torch.is_grad_enabled() and torch.bfloat16 in (query.dtype, key.dtype, value.dtype)


def cpu_float32_sdpa(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    **kwargs: Any,
) -> tuple[Tensor, Any]:
    """transformers' ``sdpa_attention_forward`` (same arguments and result), computed in float32 and returned
    in bf16 where it would otherwise run in bf16 on CPU (:func:`_computes_in_bf16`)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not _computes_in_bf16(query, key, value):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    with torch.autocast("cpu", enabled=False):
        out, weights = sdpa_attention_forward(
            module, query.float(), key.float(), value.float(), attention_mask, **kwargs
        )
    return out.to(torch.bfloat16), weights


def _register() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(NAME, cpu_float32_sdpa)
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])  # the masks SDPA itself gets


def use_cpu_float32_attention(model: M) -> M:
    """Switch a transformers model whose attention is SDPA to :func:`cpu_float32_sdpa`; any other model (eager or
    flash attention asked for, an architecture without transformers' attention interface) is left as it is.
    Returns ``model``."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return model
    can_set = getattr(model, "_can_set_attn_implementation", None)
    if can_set is None or not can_set():
        return model
    _register()
    cast("PreTrainedModel", model).set_attn_implementation(NAME)  # a transformers model: it can set one
    return model
