"""Loading tokenizers and causal LMs, with errors a user can act on.

A model path is a local directory or a Hub id ``org/name[@revision]``, resolved to a local directory first
(:func:`ppomax.models.hub.resolve_model`: downloaded into the Hugging Face cache when missing, unless
``HF_HUB_OFFLINE`` is set); everything here then reads that directory. A path that cannot be loaded fails with a
:class:`ModelPathError` that names the config key and the path and says what was expected.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from ppomax.errors import ModelPathError

from .adapter_dir import is_adapter_dir, load_adapter_dir
from .attention import use_cpu_float32_attention
from .hub import first_line as _first_line
from .hub import resolve_model
from .saving import causal_lm_of

if TYPE_CHECKING:
    from .adapter_dir import TransformersLM

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# from_pretrained arguments transformers keeps in a tokenizer's init_kwargs (and so in the tokenizer_config.json that
# save_pretrained writes)
_LOAD_FLAGS = ("local_files_only", "is_local", "trust_remote_code", "revision", "token", "cache_dir")


def to_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32" | "bfloat16" | "float16"`` (or a torch dtype) -> torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ModelPathError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}") from None


def _not_found(path: str | Path, what: str, key: str | None = None) -> ModelPathError:
    """``key`` (the config key or option that named ``path``, e.g. ``model.policy``) leads the message."""
    lead = f"{key}: {path} not found" if key else f"{what} not found: {path}"
    return ModelPathError(
        f"{lead} (expected a local directory written by save_pretrained, or a Hub id ORG/NAME[@REVISION])"
    )


def _lead(key: str | None) -> str:
    return f"{key}: " if key else ""


def check_model_dir(
    path: str | Path, what: str = "model", need_weights: bool = True, key: str | None = None
) -> None:
    """Raise :class:`ModelPathError` if a local ``path`` is not a Hugging Face model directory.

    A path that does not exist is left to the loader (whose error says so).
    """
    p, lead = Path(path), _lead(key)
    if not p.exists():
        return
    if not p.is_dir():
        raise ModelPathError(
            f"{lead}{what} path {p} is a file; expected a directory written by save_pretrained"
        )
    if not (p / "config.json").is_file():
        raise ModelPathError(
            f"{lead}{what} directory {p} has no config.json: not a Hugging Face model directory"
        )
    if need_weights and not any((p / f).is_file() for f in _WEIGHT_FILES):
        raise ModelPathError(
            f"{lead}{what} directory {p} has a config.json but no weights (model.safetensors); "
            "to start from random weights (pretraining from scratch) set init_from_config: true"
        )


def load_tokenizer(
    path: str | Path, trust_remote_code: bool = False, key: str | None = None
) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local directory or Hub id, with a pad token (EOS if it has none) and left padding.
    ``key``: the config key (or option) that named ``path``, which every error names.

    Left padding is what generation needs; trainers that pad on the right do it themselves
    (the data collators pad explicitly), so this default never silently changes training.
    """
    p, lead = resolve_model(path, key, files="tokenizer"), _lead(key)
    if not p.exists():  # never handed to transformers, which would look a bare name up on the Hub
        raise _not_found(path, "tokenizer", key)
    if p.is_dir() and not any((p / f).is_file() for f in _TOKENIZER_FILES):
        raise ModelPathError(
            f"{lead}tokenizer directory {p} holds no tokenizer files ({', '.join(_TOKENIZER_FILES)}); "
            "save one there with tokenizer.save_pretrained or set model.tokenizer"
        )
    try:
        tok = AutoTokenizer.from_pretrained(str(p), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelPathError(f"{lead}cannot load a tokenizer from {path}: {_first_line(exc)}") from None
    return prepare_tokenizer(tok, path, key)


def prepare_tokenizer(
    tok: PreTrainedTokenizerBase, where: str | Path, key: str | None = None
) -> PreTrainedTokenizerBase:
    """A tokenizer as every trainer uses it: with a pad token (EOS if it has none) and left padding (set on
    ``tok``, which is returned)."""
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ModelPathError(
                f"{_lead(key)}tokenizer at {where} has neither a pad token nor an EOS token; add one "
                "(tokenizer.add_special_tokens({'pad_token': ...})) and save it again"
            )
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    for (
        flag
    ) in _LOAD_FLAGS:  # how it was loaded here, not what it is: never written into a saved tokenizer_config
        tok.init_kwargs.pop(flag, None)
    return tok


def load_causal_lm(
    path: str | Path,
    dtype: str | torch.dtype = "float32",
    trust_remote_code: bool = False,
    key: str | None = None,
    classifier: str | None = None,
) -> TransformersLM:
    """``AutoModelForCausalLM.from_pretrained`` of a local directory or Hub id
    (:func:`~ppomax.models.hub.resolve_model`); a directory of LoRA adapters loads as its base with the adapters
    merged in (:func:`ppomax.models.adapter_dir.load_adapter_dir`). ``key``: the config key (or option) that named
    ``path``, which every error names.

    Weights whose shapes disagree with ``config.json`` (e.g. its ``vocab_size``) are one line naming the file
    and both shapes, instead of transformers' load report and error; the report of a load that succeeds (keys
    missing from the weights, or unexpected) is logged as transformers logs it. ``classifier``: ``path`` is that
    sequence classifier (its decoder is loaded: the LM head it lacks and the head it has are expected, any other
    missing weight is an error)."""
    spec, path = path, resolve_model(path, key)
    if not path.exists():  # never handed to transformers, which would look a bare name up on the Hub
        raise _not_found(spec, "model", key)
    if is_adapter_dir(path):
        return load_adapter_dir(
            path, lambda base: load_causal_lm(base, dtype=dtype, trust_remote_code=trust_remote_code)
        )
    lead = _lead(key)
    check_model_dir(path, "model", key=key)
    try:
        with _held_load_reports() as reports:
            loaded = AutoModelForCausalLM.from_pretrained(
                str(path),
                dtype=to_dtype(dtype),
                trust_remote_code=trust_remote_code,
                ignore_mismatched_sizes=True,  # reported below, in one line
                output_loading_info=True,
            )
            # output_loading_info: transformers returns (model, loading info); its annotations say model
            model, info = cast("tuple[TransformersLM, dict[str, Any]]", loaded)
    except (pickle.UnpicklingError, SafetensorError, EOFError, RuntimeError) as exc:
        raise weights_error(_weights_file(path), exc) from None
    except OSError as exc:
        raise ModelPathError(f"{lead}cannot load a causal LM from {spec}: {_first_line(exc)}") from None
    except ValueError as exc:  # e.g. an architecture AutoModelForCausalLM does not know
        if classifier:
            raise ModelPathError(
                f"{lead}{spec} is a {classifier}, which has no causal LM: reward models and critics here are decoder "
                f"LMs with a score head, reading the policy's token ids ({_first_line(exc)})"
            ) from None
        raise ModelPathError(f"{lead}cannot load a causal LM from {spec}: {_first_line(exc)}") from None
    mismatched = info.get("mismatched_keys") or ()
    if mismatched:
        embedding = model.get_input_embeddings().weight  # named first: its rows are the vocabulary
        first = {n for n, t in model.named_parameters() if t is embedding}
        ordered = sorted(mismatched, key=lambda m: (m[0] not in first, m[0]))
        raise ModelPathError(lead + _shape_mismatch(path, model.config, ordered))
    if classifier:
        _check_classifier_decoder(model, info, spec, classifier, lead)
        reports.records.clear()
    reports.replay()
    check_finite(model, path)
    return use_cpu_float32_attention(model)


def _check_classifier_decoder(
    model: PreTrainedModel, info: dict[str, Any], spec: str | Path, classifier: str, lead: str
) -> None:
    """A sequence classifier loaded into its causal LM must fill all of it but the LM head (a classifier has
    none): anything else missing means it is not a decoder LM with a score head (e.g. an encoder such as BERT)."""
    lm_head = next((n for n, m in model.named_modules() if m is model.get_output_embeddings()), "")
    missing = sorted(k for k in info.get("missing_keys") or () if not (lm_head and k.startswith(lm_head)))
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ModelPathError(
            f"{lead}{spec} is a {classifier} whose weights do not fill its causal LM ({missing[0]}{more} missing): "
            "reward models and critics here are decoder LMs with a score head, reading the policy's token ids"
        )


class _HeldReports(logging.Filter):
    """Holds transformers' "LOAD REPORT" log records back until the load is known to have succeeded."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in str(record.msg):
            self.records.append(record)
            return False
        return True

    def replay(self) -> None:
        for record in self.records:
            logging.getLogger(record.name).handle(record)
        self.records.clear()


# transformers logs its load report through the logger of the module that loads (modeling_utils)
_REPORT_LOGGERS = ("transformers.modeling_utils", "transformers.utils.loading_report")


@contextlib.contextmanager
def _held_load_reports() -> Iterator[_HeldReports]:
    held = _HeldReports()
    loggers = [logging.getLogger(name) for name in _REPORT_LOGGERS]
    for logger in loggers:
        logger.addFilter(held)
    try:
        yield held
    finally:
        for logger in loggers:
            logger.removeFilter(held)


def _shape_mismatch(path: str | Path, config: Any, mismatched: list[tuple[str, Any, Any]]) -> str:
    """One line for weights whose shapes disagree with ``config.json``: the first tensor, both shapes (the
    vocabulary sizes when its rows are the vocabulary)."""
    name, saved, built = mismatched[0]
    saved, built = list(saved), list(built)
    weights = _weights_file(path)
    more = f" (and {len(mismatched) - 1} more tensors)" if len(mismatched) > 1 else ""
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and built and built[0] == vocab and saved and saved[0] != vocab:
        return (
            f"{Path(path) / 'config.json'}: vocab_size is {vocab} but the weights ({weights}) have {saved[0]} rows "
            f"in {name}{more}; set vocab_size to {saved[0]}, or use the config.json saved with these weights"
        )
    return (
        f"{Path(path) / 'config.json'} does not match the weights ({weights}): {name} is {saved} there, {built} by "
        f"config.json{more}; use the config.json saved with these weights"
    )


def check_finite(model: torch.nn.Module, path: str | Path) -> None:
    """Raise :class:`ModelPathError` if a parameter or buffer holds NaN/inf (e.g. saved by a run that diverged).

    One pass over the weights at load time, so that such a model stops here with its path, not at its first
    forward pass (``torch.multinomial`` on NaN probabilities) or, worse, after training on NaN scores."""
    bad = [
        name
        for name, t in itertools.chain(model.named_parameters(), model.named_buffers())
        if t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]
    if bad:
        more = f" and {len(bad) - 1} other tensors" if len(bad) > 1 else ""
        raise ModelPathError(
            f"{path}: the weights hold NaN or inf values ({bad[0]}{more}): not a usable model "
            "(saved by a run that diverged?); use an earlier checkpoint"
        )


def _weights_file(path: str | Path) -> Path:
    """The weight file ``from_pretrained`` reads first (the index of a sharded checkpoint: one of its shards)."""
    p = Path(path)
    return next((p / f for f in _WEIGHT_FILES if (p / f).is_file()), p)


def weights_error(where: str | Path, exc: BaseException) -> ModelPathError:
    """The one-line error for ``exc`` raised while reading weights from ``where``: a weight file, or a directory
    (a run's checkpoint, whose reader does not say which of its files failed: its pickles or safetensors are named).

    :class:`pickle.UnpicklingError` is ``torch.load(weights_only=True)`` (transformers' and accelerate's default)
    refusing objects other than tensors: such a file is never unpickled, and says so."""
    p = Path(where)
    hostile = isinstance(exc, pickle.UnpicklingError)
    if p.is_dir():
        suffixes = (
            (".bin", ".pkl", ".pt")
            if hostile
            else (".safetensors",)
            if isinstance(exc, SafetensorError)
            else ()
        )
        files = sorted(f.name for f in p.iterdir() if f.name.endswith(suffixes)) if suffixes else []
        p = Path(f"{p} ({', '.join(files)})") if files else p
    if hostile:
        return ModelPathError(
            f"{p}: refused: a pickle that holds objects other than tensors, which could run code (weights are only "
            "ever read as plain tensors); use safetensors files from a copy you trust"
        )
    if isinstance(exc, SafetensorError | EOFError):
        return ModelPathError(f"{p}: unreadable weights, truncated or corrupt ({_first_line(exc)})")
    return ModelPathError(f"{p}: cannot load the weights ({_first_line(exc)})")


def init_causal_lm_from_config(
    path: str | Path,
    dtype: str | torch.dtype = "float32",
    trust_remote_code: bool = False,
    seed: int = 0,
    key: str | None = None,
) -> TransformersLM:
    """A causal LM with random (seeded) weights from ``path/config.json``: pretraining from scratch."""
    p, lead = resolve_model(path, key, files="config"), _lead(key)
    if not (p / "config.json").is_file():
        if not p.exists():
            raise _not_found(path, "model config", key)
        raise ModelPathError(f"{lead}{p} has no config.json to build a model from")
    try:
        config = AutoConfig.from_pretrained(str(p), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        raise ModelPathError(f"{lead}cannot read the model config in {p}: {_first_line(exc)}") from None
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    finally:
        torch.random.set_rng_state(state)
    return use_cpu_float32_attention(model.to(to_dtype(dtype)))


def enable_activation_checkpointing(model: torch.nn.Module, **kwargs: Any) -> None:
    """Activation (gradient) checkpointing on ``model`` under transformers' current name
    (``activation_checkpointing_enable``; ``gradient_checkpointing_enable`` is its deprecated alias, which warns)."""
    current = "activation_checkpointing_enable"
    getattr(model, current if hasattr(model, current) else "gradient_checkpointing_enable")(**kwargs)


def model_summary(model: torch.nn.Module) -> dict[str, Any]:
    """Parameter counts (total, trainable) for logs and reports; under DeepSpeed ZeRO-3 the full sizes of the
    partitioned parameters (``ds_numel``: their local tensors are empty)."""
    sizes = [(getattr(p, "ds_numel", None) or p.numel(), p.requires_grad) for p in model.parameters()]
    return {"params": sum(n for n, _ in sizes), "trainable_params": sum(n for n, trained in sizes if trained)}


def check_vocab(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, model_key: str, tokenizer_key: str
) -> None:
    """Every id of the tokenizer must index the model's embedding table (a value-head model's: its backbone's),
    else training or generation dies in an index error deep in torch. The check every command runs where it
    pairs a model with a tokenizer; ``model_key``/``tokenizer_key`` name where each came from."""
    table: Any = causal_lm_of(model).get_input_embeddings()  # an Embedding, or a remote-code model's own
    emb = table.num_embeddings
    if len(tokenizer) > emb:
        source = "its tokenizer" if model_key == tokenizer_key else f"the tokenizer ({tokenizer_key})"
        raise ModelPathError(
            f"{model_key}: {source} has {len(tokenizer)} tokens but the model's embedding table has {emb} rows; "
            "use the tokenizer the model was trained with (model.tokenizer) or resize the model's embeddings"
        )


def check_same_tokens(
    model_path: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    model_key: str,
    tokenizer_key: str,
    trust_remote_code: bool = False,
) -> None:
    """A reward model or critic scores the policy's token ids, so the tokenizer saved with it (when there is one)
    must give every token of ``tokenizer`` the same id; a model of another tokenizer (often a Hub reward model of
    another family) is one line saying so, not scores of garbled text. Without a tokenizer of its own, only
    :func:`check_vocab`'s size check applies."""
    p = resolve_model(model_path, model_key, files="tokenizer")
    if not any((p / f).is_file() for f in _TOKENIZER_FILES):
        return
    try:
        own = AutoTokenizer.from_pretrained(str(p), trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return
    ours, theirs = tokenizer.get_vocab(), own.get_vocab()
    differ = sorted((i, t) for t, i in ours.items() if theirs.get(t) != i)
    if differ:
        i, token = differ[0]
        raise ModelPathError(
            f"{model_key}: its tokenizer is not the one of {tokenizer_key}: {len(differ)} of {len(ours)} tokens have "
            f"another id there or none (e.g. {token!r}, id {i}); ppomax scores the policy's token ids, so a reward "
            "model or critic must share the policy's vocabulary (one trained from the same base model)"
        )
