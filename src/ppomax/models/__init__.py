"""Models: tokenizer and causal-LM loading (local directories or Hub ids ``org/name[@revision]``) and the
value-head model (RM / critic, saved as a ``*ForSequenceClassification`` checkpoint).

Typical use::

    tok = load_tokenizer("sft/final")                       # pad token ensured, padding_side="left"
    policy = load_causal_lm("sft/final", dtype="bfloat16")
    rm = ValueHeadModel.from_pretrained("rm/best")          # a reward model: ppomax's, TRL's or a Hub one
    critic = ValueHeadModel.from_causal_lm("sft/final")     # fresh head on the SFT model
    policy = with_adapters(policy, cfg.model.lora, "sft/final")  # LoRA (cfg.model.lora: null = unchanged)
    rewards = rm.score(input_ids, attention_mask)           # [B], value at the last non-pad token
"""

from .adapter_dir import is_adapter_dir
from .classifier import HEAD_META, HEAD_WEIGHTS, is_value_head_model, is_value_model_dir
from .hub import is_model_spec, parse_hub_id, resolve_model
from .loading import (
    DTYPES,
    check_finite,
    check_model_dir,
    check_same_tokens,
    check_vocab,
    enable_activation_checkpointing,
    init_causal_lm_from_config,
    load_causal_lm,
    load_tokenizer,
    model_summary,
    to_dtype,
    weights_error,
)
from .lora import (
    MERGED_DIR,
    AdaptersOff,
    RewardOnCriticBase,
    has_adapters,
    save_trained,
    with_adapters,
)
from .value_head import (
    ValueHeadModel,
    ValueHeadOutput,
    position_ids_from_mask,
)

__all__ = [
    "DTYPES",
    "HEAD_META",
    "HEAD_WEIGHTS",
    "MERGED_DIR",
    "AdaptersOff",
    "RewardOnCriticBase",
    "ValueHeadModel",
    "ValueHeadOutput",
    "check_finite",
    "check_model_dir",
    "check_same_tokens",
    "check_vocab",
    "enable_activation_checkpointing",
    "has_adapters",
    "init_causal_lm_from_config",
    "is_adapter_dir",
    "is_model_spec",
    "is_value_head_model",
    "is_value_model_dir",
    "load_causal_lm",
    "load_tokenizer",
    "model_summary",
    "parse_hub_id",
    "position_ids_from_mask",
    "resolve_model",
    "save_trained",
    "to_dtype",
    "weights_error",
    "with_adapters",
]
