"""Training loops: SFT / pretraining (:func:`train_sft`) and reward models (:func:`train_rm`), built on accelerate.

Each runs unchanged on one CPU or under ``accelerate launch`` (DDP, DeepSpeed, FSDP) on one run engine,
:mod:`ppomax.trainers.run` (run directory, checkpoints, resume, signals); :mod:`ppomax.trainers.common` batches
across ranks. PPO, on the same run engine, is :mod:`ppomax.ppo`.
"""

from .reward_model import train_rm
from .sft import train_sft

__all__ = ["train_rm", "train_sft"]
