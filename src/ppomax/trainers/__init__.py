"""Training loops: SFT / pretraining (:func:`train_sft`) and reward models (:func:`train_rm`), built on accelerate.

Each runs unchanged on one CPU or under ``accelerate launch`` (DDP, DeepSpeed, FSDP); see
:mod:`ppomax.trainers.common` for the run-directory layout, batching across ranks and resume.
"""

from .reward import train_rm
from .sft import train_sft

__all__ = ["train_rm", "train_sft"]
