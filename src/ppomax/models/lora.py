"""LoRA adapters through PEFT (``model.lora``) for the SFT model, the reward model, and the PPO policy and critic.

* :func:`with_adapters` puts adapters on a causal LM (or on a value-head model's backbone, whose head stays fully
  trained) and freezes everything else; ``model.lora: null`` returns the model unchanged, so trainers call it
  unconditionally.
* :class:`AdaptersOff` is the PPO reference under LoRA: the policy's own base, called with its adapters disabled,
  so the frozen weights exist once (the paper's setup holds four full models; this holds one base for two).
* :func:`save_trained` is the one save every trainer's final/best model goes through: ``save_pretrained`` (PEFT
  writes only ``adapter_config.json`` + ``adapter_model.safetensors``, a value-head model adds its head) and, with
  ``model.lora.save_merged``, ``<dir>/merged``: base + adapters merged into plain weights that load with
  ``AutoModelForCausalLM.from_pretrained`` (a value-head model: ``AutoModelForSequenceClassification``) without PEFT.
* An adapter directory is a model path like any other (:mod:`ppomax.models.adapter_dir`), so an SFT run with LoRA
  feeds an RM or PPO run directly.

PEFT is imported only when LoRA is used (``pip install 'ppomax[lora]'``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast, overload

import torch
from torch import Tensor

from ppomax.errors import ConfigError

from .adapter_dir import peft_module, peft_reads_deprecated_names
from .classifier import save_classifier
from .hub import parse_hub_id
from .saving import causal_lm_of, save_generation_config, share_tied_weights
from .value_head import ValueHeadModel, ValueHeadOutput

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase

    from ppomax.config import LoraSettings

    from .adapter_dir import CausalLM

MERGED_DIR = "merged"


def has_adapters(model: torch.nn.Module) -> bool:
    """A PEFT model, or a value-head model whose backbone is one."""
    return hasattr(model.backbone if isinstance(model, ValueHeadModel) else model, "peft_config")


@overload
def with_adapters(
    model: ValueHeadModel, lora: LoraSettings | None, base_path: str | Path, seed: int = 0
) -> ValueHeadModel: ...
@overload
def with_adapters(
    model: CausalLM, lora: LoraSettings | None, base_path: str | Path, seed: int = 0
) -> CausalLM: ...
def with_adapters(
    model: CausalLM | ValueHeadModel, lora: LoraSettings | None, base_path: str | Path, seed: int = 0
) -> CausalLM | ValueHeadModel:
    """``model`` with LoRA adapters (``lora``; None: ``model`` itself): a ``PeftModel`` for a causal LM, the same
    :class:`~ppomax.models.ValueHeadModel` with a ``PeftModel`` backbone for a value-head model.

    Only the adapters (and a value head) are trainable afterwards. ``base_path`` is where the base weights are
    on disk (recorded, absolute, in the saved adapter config so the adapters load again). The adapters'
    random init draws from a generator seeded with ``seed``, leaving the global RNG (sampling) untouched."""
    if lora is None:
        return model
    if isinstance(model, ValueHeadModel):
        model.backbone = with_adapters(model.backbone, lora, base_path, seed)
        model.value_head.requires_grad_(True)
        return model
    peft = peft_module()
    targets = lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules)
    config = peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            with peft_reads_deprecated_names():
                wrapped = peft.get_peft_model(model, config)
        except ValueError as exc:  # PEFT: "Target modules {...} not found in the base model"
            linear = sorted(
                {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
            )
            raise ConfigError(
                f"model.lora.target_modules: {exc}".rstrip(".")
                + f" ({base_path}; its linear layers: {', '.join(linear)})"
            ) from None
    p, settings = Path(base_path), wrapped.peft_config["default"]
    hub = None if p.exists() else parse_hub_id(base_path)
    if hub is not None:  # as PEFT records a Hub base: its id, and the revision apart
        settings.base_model_name_or_path, settings.revision = hub.repo_id, hub.revision
    else:
        settings.base_model_name_or_path = str(p.resolve() if p.exists() else base_path)
    return wrapped


class AdaptersOff:
    """A PEFT model's base as a model of its own: every call runs with the adapters disabled.

    The PPO reference under LoRA (see the module docstring). ``to``/``eval``/``requires_grad_`` are no-ops: the
    policy it wraps is placed and trained by its own trainer, and its base is frozen already."""

    def __init__(self, peft_model: PeftModel) -> None:
        self.model = peft_model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.model.disable_adapter():
            return self.model(*args, **kwargs)

    def to(self, *_args: Any, **_kwargs: Any) -> AdaptersOff:
        return self

    def eval(self) -> AdaptersOff:
        return self

    def requires_grad_(self, _flag: bool = True) -> AdaptersOff:
        return self


class RewardOnCriticBase:
    """The reward model as the frozen base of a LoRA critic that starts from it: the critic's backbone with its
    adapters disabled, read by the reward model's own value head (``head``, a frozen copy taken before the
    critic's head trains), so the reward model's backbone weights exist once.

    Called through the critic itself (as prepared by accelerate: the same precision path); ``to`` places the head
    only (the critic is placed by its own trainer), ``eval``/``requires_grad_`` are no-ops."""

    def __init__(self, critic: ValueHeadModel, head: torch.nn.Linear) -> None:
        self.critic = critic
        self.head = head.requires_grad_(False)

    @property
    def pad_token_id(self) -> int | None:
        """:attr:`ValueHeadModel.pad_token_id` of the critic's backbone, the reward model's."""
        return self.critic.pad_token_id

    def score(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """[B] float32 rewards (:meth:`ValueHeadModel.score`)."""
        return self._forward(input_ids, attention_mask, None).scores

    def values(
        self, input_ids: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None = None
    ) -> Tensor:
        """[B, T] float32 values of every position (:meth:`ValueHeadModel.values`)."""
        return self._forward(input_ids, attention_mask, position_ids).values

    def _forward(
        self, input_ids: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None
    ) -> ValueHeadOutput:
        # built on a critic with adapters only (ppomax.ppo.models.critic_base_is_reward_model)
        with cast("PeftModel", self.critic.backbone).disable_adapter():
            return self.critic(input_ids, attention_mask, value_head=self.head, position_ids=position_ids)

    def to(self, *args: Any, **kwargs: Any) -> RewardOnCriticBase:
        self.head.to(*args, **kwargs)
        return self

    def eval(self) -> RewardOnCriticBase:
        return self

    def requires_grad_(self, _flag: bool = True) -> RewardOnCriticBase:
        return self


# --------------------------------------------------------------------------- saving


def merged_state_dict(
    peft_model: torch.nn.Module, state_dict: dict[str, Tensor] | None = None
) -> dict[str, Tensor]:
    """The base model's state dict with every LoRA layer's update merged in: ``W + scaling * B A`` (transposed
    for ``fan_in_fan_out`` layers such as GPT-2's Conv1D), keys as the plain model names them, every floating
    tensor in float32: the adapters' update is mostly below a bf16 base weight's rounding step, so casting the sum
    back to a bf16 base's dtype would throw most of the training away.

    Computed from ``state_dict`` (the gathered full weights under ZeRO-3/FSDP, keys as ``peft_model.state_dict()``
    names them) or the model's own; the model itself is not touched (PEFT's merge/unmerge would leave its
    weights off by rounding)."""
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    sd = dict(peft_model.state_dict() if state_dict is None else state_dict)
    out: dict[str, Tensor] = {}
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if not isinstance(module, LoraLinear):
            raise ConfigError(
                f"model.lora.save_merged: {name} is a {type(module).__name__} adapter; only linear layers merge "
                "(restrict model.lora.target_modules to linear layers)"
            )
        base_w = sd.pop(f"{name}.base_layer.weight")
        merged = base_w.float()
        for adapter in module.active_adapters:
            a = sd.pop(f"{name}.lora_A.{adapter}.weight").float()
            b = sd.pop(f"{name}.lora_B.{adapter}.weight").float()
            delta = b @ a
            merged = merged + (delta.T if module.fan_in_fan_out else delta) * module.scaling[adapter]
        out[f"{name}.weight"] = merged
        if f"{name}.base_layer.bias" in sd:
            out[f"{name}.bias"] = sd.pop(f"{name}.base_layer.bias")
    out.update({k: v.float() if v.is_floating_point() else v for k, v in sd.items() if ".lora_" not in k})
    prefix = "base_model.model."
    return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in out.items()}


def save_merged(
    model: CausalLM | ValueHeadModel, out_dir: Path, state_dict: dict[str, Tensor] | None = None
) -> None:
    """Base + adapters as plain weights in ``out_dir``: a causal LM, or a value-head model as a sequence classifier
    (:func:`~ppomax.models.classifier.save_classifier`: merged decoder + its head). ``state_dict``: the gathered
    weights of ``model`` (sharded training), else its own."""
    if isinstance(model, ValueHeadModel):
        backbone_sd = head_sd = None
        if state_dict is not None:
            backbone_sd = {k[9:]: v for k, v in state_dict.items() if k.startswith("backbone.")}
            head_sd = {k[11:]: v for k, v in state_dict.items() if k.startswith("value_head.")}
        base = causal_lm_of(model)
        merged = share_tied_weights(merged_state_dict(model.backbone, backbone_sd), base)
        save_classifier(base, merged, head_sd or model.value_head.state_dict(), out_dir)
        return
    base = causal_lm_of(model)
    base.save_pretrained(out_dir, state_dict=share_tied_weights(merged_state_dict(model, state_dict), base))
    # save_pretrained writes the live model's dtype (a bf16 base's); the merged weights are float32
    config = out_dir / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "dtype": "float32"}, indent=2) + "\n")


def save_trained(
    model: CausalLM | ValueHeadModel,
    out_dir: Path,
    state_dict: dict[str, Tensor] | None,
    tokenizer: PreTrainedTokenizerBase | None,
    lora: LoraSettings | None,
) -> None:
    """A trained model's ``save_pretrained`` into ``out_dir`` (with ``lora.save_merged`` and adapters on the model,
    also the merged plain model into ``out_dir/merged``), each directory with the tokenizer and the base model's
    generation config (:func:`~ppomax.models.saving.save_generation_config`). ``state_dict``: the gathered weights
    of ``model`` (sharded training), else its own."""
    adapters = has_adapters(model)
    if state_dict is not None and not adapters:
        state_dict = share_tied_weights(state_dict, model)
    # ppomax never resizes embeddings, so PEFT's "auto" check of the base's vocabulary (the base's config.json, else
    # a Hub lookup: a warning or a network call when the base is an adapter directory or a Hub id) can only answer
    # "unchanged": adapters are saved without copies of frozen base layers.
    extra: dict[str, Any] = {"save_embedding_layers": False} if adapters else {}
    model.save_pretrained(str(out_dir), state_dict=state_dict, **extra)
    dirs = [out_dir]
    if lora is not None and lora.save_merged and adapters:
        save_merged(model, out_dir / MERGED_DIR, state_dict)
        dirs.append(out_dir / MERGED_DIR)
    for path in dirs:
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
        save_generation_config(model, path, tokenizer)


# --------------------------------------------------------------------------- loading
