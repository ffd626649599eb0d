"""ppomax: RLHF with PPO-max for Hugging Face causal language models.

The Python API (README: Python API)::

    import ppomax

    sft = ppomax.SFTTrainer({"logging": {"out_dir": "runs/sft"}}, model=model, train_dataset=dataset).train()
    rm = ppomax.RewardTrainer(config, model=sft.model, train_dataset=pairs).train()
    ppo = ppomax.PPOTrainer("ppo_max", model=sft.model, reward_model=rm.model, train_dataset=prompts).train()

Each trainer is the one its CLI command runs; ``train()`` returns a :class:`TrainResult`. The trainers are imported
on first use (``import ppomax`` stays light: the CLI reads ``ppomax.__version__``).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "SFTTrainer": "ppomax.trainers.sft",
    "RewardTrainer": "ppomax.trainers.reward_model",
    "PPOTrainer": "ppomax.ppo",
    "TrainResult": "ppomax.trainers.inputs",
    "SFTConfig": "ppomax.config",
    "RMConfig": "ppomax.config",
    "PPOConfig": "ppomax.config",
    "load_config": "ppomax.config",
}

__all__ = [
    "PPOConfig",
    "PPOTrainer",
    "RMConfig",
    "RewardTrainer",
    "SFTConfig",
    "SFTTrainer",
    "TrainResult",
    "__version__",
    "load_config",
]

if TYPE_CHECKING:
    from ppomax.config import PPOConfig, RMConfig, SFTConfig, load_config
    from ppomax.ppo import PPOTrainer
    from ppomax.trainers.inputs import TrainResult
    from ppomax.trainers.reward_model import RewardTrainer
    from ppomax.trainers.sft import SFTTrainer


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ppomax' has no attribute {name!r}")
    return getattr(import_module(module), name)
