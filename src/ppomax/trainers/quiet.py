"""Two library messages that every run printed and that say nothing a user can act on, stopped where they arise.
Nothing else is filtered: every other warning and log record still shows.

* DeepSpeed's "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.",
  on stdout (which carries only ppomax's results): accelerate imports DeepSpeed whenever it is installed, to
  recognise its engines (``unwrap_model``), also in a run without DeepSpeed, and DeepSpeed then looks for an
  accelerator. Without CUDA ppomax names the CPU (``DS_ACCELERATOR=cpu``, what a DeepSpeed run on CPU needs
  anyway); a value already in the environment is kept.
* accelerate's "Removed shared tensor {...} while saving" on every checkpoint of a model whose LM head is tied to
  its input embeddings: safetensors cannot store one tensor under two names, so ``save_state`` writes it once
  and ``load_state`` (``safetensors.torch.load_model``) ties it back; a resumed run continues exactly.
"""

from __future__ import annotations

import logging
import os

import torch

SHARED_TENSOR_LOGGER = "accelerate.utils.other"


class _SharedTensorNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("Removed shared tensor" in message and "while saving" in message)


def quiet_known_library_messages() -> None:
    """Name DeepSpeed's accelerator where there is no CUDA, and drop accelerate's shared-tensor notice (see the
    module docstring). Idempotent; call it before anything imports DeepSpeed (building the run's Accelerator)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    logger = logging.getLogger(SHARED_TENSOR_LOGGER)
    if not any(isinstance(f, _SharedTensorNotice) for f in logger.filters):
        logger.addFilter(_SharedTensorNotice())
