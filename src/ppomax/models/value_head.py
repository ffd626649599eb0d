"""A causal LM with a scalar value head: the reward model (paper 3.1) and the PPO critic.

The paper's RM is the pretrained transformer "with the last unembedding layer removed" plus a linear layer
on the final transformer layer, reading the value at the last token. In memory the LM head is *kept* (unused
unless asked) because eq. 2 trains the RM with an LM loss on the chosen answer through the same trunk
(``beta_rm``); the head is transformers' ``score`` head of a ``*ForSequenceClassification`` model:
``Linear(hidden_size, 1, bias=False)``, kept in float32.

* values [B, T]: the head on every position's final hidden state (a critic's per-token values, as TRL's value
  model computes them);
* scores [B]: the value where transformers' ``*ForSequenceClassification`` pools, the last attended token that is
  not ``config.pad_token_id`` (:func:`ppomax.algos.score_token_index`), so a reward model scores a sequence exactly
  as ``AutoModelForSequenceClassification`` does.

On disk (:mod:`ppomax.models.classifier`) a reward model or critic is a standard ``*ForSequenceClassification``
checkpoint with ``num_labels: 1``, which transformers and TRL load as they load any Hub reward model.

Position ids are computed from the attention mask, so a left-padded row gives the same values as the same
row right-padded (absolute-position models such as GPT-2 would otherwise shift every position).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import torch
from torch import Tensor
from transformers import PreTrainedModel

from ppomax.algos import score_token_index

from .adapter_dir import is_peft_model
from .classifier import hidden_size_of, load_value_model, save_value_model
from .lm_head import logits_at_targets
from .loading import enable_activation_checkpointing, load_causal_lm, to_dtype

if TYPE_CHECKING:
    from .adapter_dir import CausalLM

# the files of the value-head directories earlier ppomax versions wrote (read by ppomax.models.classifier)
# a run's checkpoint layout key (RunContext.layout): whether its value heads have a bias; absent in checkpoints of
# runs started by earlier ppomax versions, whose heads had one
HEAD_BIAS = "value_head_bias"


class ValueHeadOutput(NamedTuple):
    """values: [B, T] float32, one per position (the value of the prefix ending there);
    scores: [B] float32, the value where the sequence is scored (the reward r(x, y));
    lm_logits: [B, T, V] when asked for ([1, K, V] at ``lm_targets`` when given), else None.

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


def _decoder(backbone: CausalLM) -> torch.nn.Module:
    """The decoder stack without the LM head; under a PEFT wrapper (LoRA), the wrapped model's (its adapted
    layers are injected in place, so they run)."""
    # PEFT types its base as a Module; what it wraps here is always a transformers model
    inner = cast("PreTrainedModel", backbone.get_base_model()) if is_peft_model(backbone) else backbone
    return inner.base_model


class ValueHeadModel(torch.nn.Module):
    """Causal LM backbone + ``Linear(hidden_size, 1, bias=False)`` value head (float32, for precise values).

    A head with a bias is what value-head directories of earlier ppomax versions hold (kept when it is not zero)
    and what checkpoints of runs they started hold (:meth:`add_head_bias`)."""

    def __init__(self, backbone: CausalLM, value_head: torch.nn.Linear | None = None, seed: int = 0):
        super().__init__()
        self.backbone = backbone
        if value_head is None:
            value_head = self.new_head(hidden_size_of(backbone), seed)
        self.value_head = value_head

    @staticmethod
    def new_head(hidden_size: int, seed: int = 0) -> torch.nn.Linear:
        """A fresh head without bias (transformers' ``score``): weights N(0, 1/(H+1)) from a seeded generator.

        The 1/sqrt(H+1) std (as in OpenAI's lm-human-preferences reward head) gives initial values of
        order 1 when the final hidden state has unit-scale features, so the first updates are neither
        saturated nor vanishing; the seeded generator leaves the global RNG untouched.
        """
        with torch.random.fork_rng(devices=[]):  # nn.Linear's own init would draw from the global RNG
            head = torch.nn.Linear(hidden_size, 1, bias=False)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            head.weight.copy_(torch.randn(1, hidden_size, generator=gen) / (hidden_size + 1) ** 0.5)
        return head

    def add_head_bias(self) -> None:
        """Give the head a (zero) bias if it has none: the layout of a checkpoint written by a run an earlier ppomax
        version started (its weights, and its optimiser's state, hold a trained bias), so that run resumes."""
        head = self.value_head
        if head.bias is not None:
            return
        with torch.random.fork_rng(devices=[]):
            new = torch.nn.Linear(head.in_features, 1, device=head.weight.device, dtype=head.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(head.weight)
            new.bias.zero_()
        new.requires_grad_(head.weight.requires_grad)
        self.value_head = new

    def match_checkpoint(self, layout: dict[str, Any] | None) -> dict[str, Any]:
        """Lay the head out as the checkpoint a run resumes from holds it (``layout``: the run's recorded layout,
        None for a fresh run; a checkpoint without :data:`HEAD_BIAS` has heads with a bias); returns the layout to
        record with this run's checkpoints."""
        if layout is not None and layout.get(HEAD_BIAS, True):
            self.add_head_bias()
        return {HEAD_BIAS: self.value_head.bias is not None}

    @property
    def config(self):  # the backbone's HF config (used by accelerate/DeepSpeed auto settings)
        return self.backbone.config

    @property
    def pad_token_id(self) -> int | None:
        """The pad token id of the backbone's config: the token the score is never read at (transformers' pooling)."""
        value = self.backbone.config.get_text_config().pad_token_id
        return None if value is None else int(value)

    def use_pad_token(self, pad_token_id: int | None) -> None:
        """Record the tokenizer's pad token id in the config when it has none (as TRL's reward trainer does): the
        score is read, and the saved checkpoint pools, as the data is padded."""
        if self.pad_token_id is None and pad_token_id is not None:
            self.backbone.config.get_text_config().pad_token_id = int(pad_token_id)

    def activation_checkpointing_enable(self, **kwargs) -> None:
        enable_activation_checkpointing(self.backbone, **kwargs)

    gradient_checkpointing_enable = activation_checkpointing_enable  # its name before transformers 5

    # ------------------------------------------------------------------ forward

    def _hidden_and_logits(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        position_ids: Tensor | None,
        return_lm_logits: bool,
        lm_targets: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        if position_ids is None and attention_mask is not None:
            position_ids = position_ids_from_mask(attention_mask)
        if not return_lm_logits:
            # The decoder alone: no [B, T, V] logits and no per-layer hidden states materialised.
            base = _decoder(self.backbone)
            out = base(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            )
            return out.last_hidden_state, None
        # The full model, capturing the LM head's input: exactly the final hidden state whatever the
        # architecture (final norm, logit scaling or soft-capping are all the backbone's own business). The
        # capture runs before logits_at_targets' narrowing (prepended): the value head reads every position.
        captured: list[Tensor] = []
        handle = self.backbone.get_output_embeddings().register_forward_pre_hook(
            lambda _m, args: captured.append(args[0]), prepend=True
        )
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        try:
            if lm_targets is not None:
                logits = logits_at_targets(self.backbone, lm_targets, **inputs)[0]
            else:
                logits = self.backbone(**inputs, use_cache=False).logits
        finally:
            handle.remove()
        return captured[0], logits

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        return_lm_logits: bool = False,
        value_head: torch.nn.Linear | None = None,
        position_ids: Tensor | None = None,
        lm_targets: Tensor | None = None,
    ) -> ValueHeadOutput:
        """input_ids, attention_mask: [B, T] (any padding side) -> values [B, T], scores [B], lm_logits.
        ``value_head``: another head to read the backbone with (:class:`ppomax.models.lora.RewardOnCriticBase`).
        ``position_ids`` (default: counted from the mask) with ``attention_mask=None``: packed sequences
        (:mod:`ppomax.ppo.packing`), each attending to itself only; the score is then read as without a mask
        (the last token that is not padding), which for packed rows means nothing: read ``values``.
        ``lm_targets`` [B, T-1] (with ``return_lm_logits``): the LM head runs only where the token at t + 1 is
        marked (:func:`~ppomax.models.lm_head.logits_at_targets`), ``lm_logits`` [1, K, V] in their order."""
        hidden, logits = self._hidden_and_logits(
            input_ids, attention_mask, position_ids, return_lm_logits, lm_targets
        )
        head = self.value_head if value_head is None else value_head
        values = head(hidden.to(head.weight.dtype)).squeeze(-1).float()
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        idx = score_token_index(input_ids, mask, self.pad_token_id)
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
        """Scalar reward per row, [B] float32 (paper 3.1): the value where transformers' sequence classifier reads
        it (:func:`ppomax.algos.score_token_index`)."""
        return self.forward(input_ids, attention_mask).scores

    def values(
        self, input_ids: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None = None
    ) -> Tensor:
        """[B, T] float32 value of every position, the score among them; ``attention_mask=None`` with
        ``position_ids``: packed sequences (:meth:`forward`), whose scores are read from these values
        (:mod:`ppomax.ppo.reward_sources`)."""
        return self.forward(input_ids, attention_mask, position_ids=position_ids).values

    # ------------------------------------------------------------------ save / load

    def save_pretrained(
        self, out_dir: str | Path, state_dict: dict[str, Tensor] | None = None, **kwargs: Any
    ) -> None:
        """A ``*ForSequenceClassification`` checkpoint (:func:`ppomax.models.classifier.save_value_model`); under
        LoRA the adapters and the head. ``state_dict`` (keys ``backbone.*`` / ``value_head.*``) is for sharded
        training, where the caller gathered the full weights (e.g. ``accelerator.get_state_dict``); ``kwargs`` go
        to transformers' ``save_pretrained``."""
        save_value_model(self.backbone, self.value_head, Path(out_dir), state_dict, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: str | torch.dtype = "float32",
        trust_remote_code: bool = False,
        key: str | None = None,
    ) -> ValueHeadModel:
        """A reward model or critic: a ``*ForSequenceClassification`` checkpoint with one label (ppomax's, TRL's, a
        Hub reward model's; a local directory or a Hub id), or a value-head directory of an earlier ppomax version.
        ``key``: the config key that named ``path`` (errors name it)."""
        return load_value_model(cls, path, dtype, trust_remote_code, key)

    @classmethod
    def from_causal_lm(
        cls,
        path: str | Path,
        dtype: str | torch.dtype = "float32",
        trust_remote_code: bool = False,
        seed: int = 0,
        key: str | None = None,
    ) -> ValueHeadModel:
        """A fresh seeded head on a causal-LM checkpoint (an SFT model; a local directory or a Hub id)."""
        backbone = load_causal_lm(path, dtype=to_dtype(dtype), trust_remote_code=trust_remote_code, key=key)
        return cls(backbone, seed=seed)
