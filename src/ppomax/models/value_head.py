"""A causal LM with a scalar value head: the reward model (paper 3.1) and the PPO critic.

The paper's RM is the pretrained transformer "with the last unembedding layer removed" plus a linear layer
on the final transformer layer, reading the value at the last token. Here the LM head is *kept* (unused
unless asked) because eq. 2 trains the RM with an LM loss on the chosen answer through the same trunk,
and because keeping it makes the saved backbone a plain causal-LM checkpoint that loads with
``AutoModelForCausalLM`` (a critic can start from an RM, an RM from an SFT model, without conversions).

On disk (``save_pretrained``)::

    config.json, model.safetensors, ...   the backbone (AutoModelForCausalLM.save_pretrained)
    value_head.safetensors                 {"weight": [1, H], "bias": [1]}
    ppomax_value_head.json                 {"format": "ppomax-value-head", "version": 1, "hidden_size": H}

Position ids are computed from the attention mask, so a left-padded row gives the same values as the same
row right-padded (absolute-position models such as GPT-2 would otherwise shift every position).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from transformers import PreTrainedModel

from ppomax.algos import last_token_index
from ppomax.errors import ModelPathError

from .loading import check_finite, enable_activation_checkpointing, load_causal_lm, to_dtype

HEAD_WEIGHTS = "value_head.safetensors"
HEAD_META = "ppomax_value_head.json"
_FORMAT = "ppomax-value-head"


class ValueHeadOutput(NamedTuple):
    """values: [B, T] float32, one per position (the value of the prefix ending there);
    scores: [B] float32, the value at each row's last non-pad token (the reward r(x, y));
    lm_logits: [B, T, V] when asked for, else None.

    A named tuple, so engines that hook module outputs find its tensors (ZeRO-3 registers backward hooks there)."""

    values: Tensor
    scores: Tensor
    lm_logits: Tensor | None = None


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions that count only real tokens (0 for the first one), as HF ``generate`` does for left padding.

    Pad positions get 0 (their outputs are ignored). Pass these to any forward of a left-padded batch so
    that absolute-position models see the same positions as for an unpadded sequence.
    """
    mask = attention_mask.to(torch.long)
    return (mask.cumsum(-1) - 1).clamp(min=0)


def is_value_head_model(path: str | Path) -> bool:
    """True if ``path`` is a directory saved by :meth:`ValueHeadModel.save_pretrained`."""
    p = Path(path)
    return (p / HEAD_META).is_file() and (p / HEAD_WEIGHTS).is_file()


def _decoder(backbone: PreTrainedModel) -> torch.nn.Module:
    """The decoder stack without the LM head; under a PEFT wrapper (LoRA), the wrapped model's (its adapted
    layers are injected in place, so they run)."""
    inner = backbone.get_base_model() if hasattr(backbone, "peft_config") else backbone
    return inner.base_model


def _hidden_size(backbone: PreTrainedModel) -> int:
    emb = backbone.get_input_embeddings()
    if emb is not None and hasattr(emb, "embedding_dim"):
        return int(emb.embedding_dim)
    return int(backbone.config.hidden_size)


class ValueHeadModel(torch.nn.Module):
    """Causal LM backbone + ``Linear(hidden_size, 1)`` value head (kept in float32 for precise values)."""

    def __init__(self, backbone: PreTrainedModel, value_head: torch.nn.Linear | None = None, seed: int = 0):
        super().__init__()
        self.backbone = backbone
        if value_head is None:
            value_head = self.new_head(_hidden_size(backbone), seed)
        self.value_head = value_head

    @staticmethod
    def new_head(hidden_size: int, seed: int = 0) -> torch.nn.Linear:
        """A fresh head: weights N(0, 1/(H+1)) drawn from a seeded generator, zero bias.

        The 1/sqrt(H+1) std (as in OpenAI's lm-human-preferences reward head) gives initial values of
        order 1 when the final hidden state has unit-scale features, so the first updates are neither
        saturated nor vanishing; the seeded generator leaves the global RNG untouched.
        """
        with torch.random.fork_rng(devices=[]):  # nn.Linear's own init would draw from the global RNG
            head = torch.nn.Linear(hidden_size, 1)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            head.weight.copy_(torch.randn(1, hidden_size, generator=gen) / (hidden_size + 1) ** 0.5)
            head.bias.zero_()
        return head

    @property
    def config(self):  # the backbone's HF config (used by accelerate/DeepSpeed auto settings)
        return self.backbone.config

    def activation_checkpointing_enable(self, **kwargs) -> None:
        enable_activation_checkpointing(self.backbone, **kwargs)

    gradient_checkpointing_enable = activation_checkpointing_enable  # its name before transformers 5

    # ------------------------------------------------------------------ forward

    def _hidden_and_logits(
        self, input_ids: Tensor, attention_mask: Tensor, return_lm_logits: bool
    ) -> tuple[Tensor, Tensor | None]:
        position_ids = position_ids_from_mask(attention_mask)
        if not return_lm_logits:
            # The decoder alone: no [B, T, V] logits and no per-layer hidden states materialised.
            base = _decoder(self.backbone)
            out = base(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            )
            return out.last_hidden_state, None
        # The full model, capturing the LM head's input: exactly the final hidden state whatever the
        # architecture (final norm, logit scaling or soft-capping are all the backbone's own business).
        captured: list[Tensor] = []
        handle = self.backbone.get_output_embeddings().register_forward_hook(
            lambda _m, inputs, _o: captured.append(inputs[0])
        )
        try:
            out = self.backbone(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            )
        finally:
            handle.remove()
        return captured[-1], out.logits

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        return_lm_logits: bool = False,
        value_head: torch.nn.Linear | None = None,
    ) -> ValueHeadOutput:
        """input_ids, attention_mask: [B, T] (any padding side) -> values [B, T], scores [B], lm_logits.
        ``value_head``: another head to read the backbone with (:class:`ppomax.models.lora.RewardOnCriticBase`)."""
        hidden, logits = self._hidden_and_logits(input_ids, attention_mask, return_lm_logits)
        head = self.value_head if value_head is None else value_head
        values = head(hidden.to(head.weight.dtype)).squeeze(-1).float()
        idx = last_token_index(attention_mask)
        scores = values.gather(1, idx.unsqueeze(1)).squeeze(1)
        return ValueHeadOutput(values=values, scores=scores, lm_logits=logits)

    def freeze_lm_head(self) -> None:
        """Freeze the backbone's LM head unless it is tied to the input embeddings: a critic, or an RM trained
        without the LM term, never uses it, so it gets no gradient, no optimiser state and no DDP "unused
        parameter" error."""
        out, inp = self.backbone.get_output_embeddings(), self.backbone.get_input_embeddings()
        if out is not None and (inp is None or out.weight is not inp.weight):
            out.requires_grad_(False)

    def score(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Scalar reward per row: the value at the last non-pad token, [B] float32 (paper 3.1)."""
        return self.forward(input_ids, attention_mask).scores

    # ------------------------------------------------------------------ save / load

    def save_pretrained(
        self,
        out_dir: str | Path,
        state_dict: dict[str, Tensor] | None = None,
        safe_serialization: bool = True,
        **backbone_kwargs: Any,
    ) -> None:
        """Backbone via ``save_pretrained`` (safetensors; ``backbone_kwargs`` passed on) + the head's weights and a
        marker file.

        ``state_dict`` (keys ``backbone.*`` / ``value_head.*``) is for sharded training, where the caller
        gathered the full weights (e.g. ``accelerator.get_state_dict``).
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        backbone_sd = head_sd = None
        if state_dict is not None:
            backbone_sd = {
                k[len("backbone.") :]: v for k, v in state_dict.items() if k.startswith("backbone.")
            }
            head_sd = {
                k[len("value_head.") :]: v for k, v in state_dict.items() if k.startswith("value_head.")
            }
        self.backbone.save_pretrained(
            out, state_dict=backbone_sd, safe_serialization=safe_serialization, **backbone_kwargs
        )
        self.save_head(out, head_sd)

    def save_head(self, out_dir: str | Path, head_sd: dict[str, Tensor] | None = None) -> None:
        """The head's weights (``head_sd``, else its own) and the marker file, beside a saved backbone."""
        out = Path(out_dir)
        head_sd = head_sd or self.value_head.state_dict()
        save_file(
            {k: v.detach().cpu().float().contiguous() for k, v in head_sd.items()}, str(out / HEAD_WEIGHTS)
        )
        meta = {"format": _FORMAT, "version": 1, "hidden_size": int(self.value_head.in_features)}
        (out / HEAD_META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: str | torch.dtype = "float32",
        trust_remote_code: bool = False,
        key: str | None = None,
    ) -> ValueHeadModel:
        """Load a value-head model (a trained RM or critic) saved by :meth:`save_pretrained`; ``key``: the config
        key that named ``path`` (errors name it)."""
        p, lead = Path(path), f"{key}: " if key else ""
        if not is_value_head_model(p):
            if not p.exists():
                raise ModelPathError(f"{lead}reward/critic model not found: {p}")
            raise ModelPathError(
                f"{lead}{p} is not a value-head model (no {HEAD_META} / {HEAD_WEIGHTS}): train one with "
                "`ppomax train-rm`, or start a fresh head on a causal LM (e.g. ppo.critic_init: sft)"
            )
        backbone = load_causal_lm(p, dtype=dtype, trust_remote_code=trust_remote_code, key=key)
        hidden = _hidden_size(backbone)
        try:
            sd = load_file(str(p / HEAD_WEIGHTS))
            with torch.random.fork_rng(devices=[]):
                head = torch.nn.Linear(hidden, 1)
            head.load_state_dict(sd)
        except Exception as exc:  # a corrupt or mismatched head file: say which file, not a deep traceback
            raise ModelPathError(f"{p / HEAD_WEIGHTS}: cannot load the value head ({exc})") from None
        check_finite(head, p / HEAD_WEIGHTS)
        return cls(backbone, head)

    @classmethod
    def from_causal_lm(
        cls,
        path: str | Path,
        dtype: str | torch.dtype = "float32",
        trust_remote_code: bool = False,
        seed: int = 0,
        key: str | None = None,
    ) -> ValueHeadModel:
        """A fresh seeded head on a causal-LM checkpoint (an SFT model, or a saved RM's backbone)."""
        backbone = load_causal_lm(path, dtype=to_dtype(dtype), trust_remote_code=trust_remote_code, key=key)
        return cls(backbone, seed=seed)
