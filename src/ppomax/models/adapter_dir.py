"""Directories of LoRA adapters as PEFT writes them (``adapter_config.json`` + weights, no full ``config.json``):
recognising one, the base it names, and loading it as a plain causal LM. Depends on nothing else in
:mod:`ppomax.models` but the Hub ids, so that :mod:`~ppomax.models.loading` (which loads an adapter directory like
any model path) and :mod:`~ppomax.models.lora` (which writes them) both build on it.

PEFT is imported only when adapters are used (``pip install 'ppomax[lora]'``).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from ppomax.errors import ConfigError, ModelPathError

from .hub import parse_hub_id

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import GenerationMixin, PreTrainedModel
    from typing_extensions import TypeIs

    class TransformersLM(PreTrainedModel, GenerationMixin):
        """A transformers causal LM as ``AutoModelForCausalLM`` builds it: a model with ``generate``."""

    CausalLM: TypeAlias = TransformersLM | PeftModel
    """A causal LM as trainers hold it: a transformers model, or a PEFT model wrapping one (LoRA)."""

ADAPTER_CONFIG = "adapter_config.json"


def peft_module() -> Any:
    """The ``peft`` package, or a one-line error saying how to install it."""
    try:
        import peft
    except ImportError:
        raise ConfigError("model.lora needs PEFT: pip install 'ppomax[lora]'") from None
    return peft


def is_peft_model(model: object) -> TypeIs[PeftModel]:
    """``model`` is a PEFT model (told without importing PEFT, which only LoRA runs need)."""
    return hasattr(model, "peft_config")


@contextmanager
def peft_reads_deprecated_names() -> Iterator[None]:
    """PEFT reads ``model.is_gradient_checkpointing`` whenever it wraps a model, a name transformers 5 deprecated: a
    FutureWarning on every LoRA run that says nothing about the user's code. Only that warning is ignored."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning
        )
        yield


def is_adapter_dir(path: str | Path) -> bool:
    """True for a directory PEFT's ``save_pretrained`` wrote (adapters only, no full ``config.json``)."""
    p = Path(path)
    return (p / ADAPTER_CONFIG).is_file() and not (p / "config.json").is_file()


def adapter_base(base: str, revision: str | None) -> str:
    """The model path of an adapter config's base: ``base_model_name_or_path``, with its ``revision`` as
    ``@revision`` when the base is a Hub id."""
    if revision and not Path(base).exists() and parse_hub_id(base) is not None and "@" not in base:
        return f"{base}@{revision}"
    return base


def adapter_settings(path: str | Path) -> dict[str, Any]:
    """The ``adapter_config.json`` of the adapter directory ``path``, which must name its base model."""
    file = Path(path) / ADAPTER_CONFIG
    try:
        settings = json.loads(file.read_text(encoding="utf-8"))
        base = settings["base_model_name_or_path"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelPathError(f"{file}: not a readable PEFT adapter config ({exc})") from None
    if not base:
        raise ModelPathError(f"{file}: base_model_name_or_path is empty: no base model")
    return settings


def load_adapter_dir(path: str | Path, load_base: Callable[[str], Any]) -> Any:
    """A plain causal LM from an adapter directory: its base (``base_model_name_or_path``, loaded by
    ``load_base``: :func:`ppomax.models.loading.load_causal_lm`, which calls this for adapter directories) with
    the adapters merged in."""
    p = Path(path)
    settings = adapter_settings(p)
    base_path = adapter_base(settings["base_model_name_or_path"], settings.get("revision"))
    try:
        base = load_base(base_path)
    except ModelPathError as exc:
        raise ModelPathError(f"{p}: LoRA adapters whose base model cannot be loaded: {exc}") from None
    peft = peft_module()
    try:
        with peft_reads_deprecated_names():
            return peft.PeftModel.from_pretrained(base, str(p)).merge_and_unload()
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ModelPathError(f"{p}: cannot load the LoRA adapters onto {base_path}: {exc}") from None
