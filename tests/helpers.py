"""Test helpers shared by the test files (import as ``from helpers import make_tiny_tokenizer``).

Nothing here downloads anything: tokenizers are trained on a few strings in a fraction of a second.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ppomax.checkpoint import step_dirs

DEFAULT_TEXTS = [
    "\n\nHuman: What is the capital of France?\n\nAssistant: The capital of France is Paris.",
    "\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour, water, salt and yeast, knead, let it rise, bake.",
    "\n\nHuman: Tell me a joke.\n\nAssistant: I'm sorry, I can't help with that. Here is a safer idea instead.",
    "The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9 + - = ? ! , .",
]


def set_args(*overrides: str) -> list[str]:
    """``--set`` before each ``KEY=VALUE``: a train command's arguments for these overrides."""
    return [arg for item in overrides for arg in ("--set", item)]


#: a small ChatML-style template (same shape as Qwen's) for chat_template tests
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tiny_tokenizer(
    tmp_path: Path,
    texts: list[str] | None = None,
    *,
    vocab_size: int = 400,
    add_bos: bool = False,
    style: Literal["byte_level", "metaspace"] = "byte_level",
    chat_template: str | None = None,
    name: str = "tiny-tokenizer",
) -> Path:
    """Train a tiny BPE tokenizer, save it with ``save_pretrained`` under ``tmp_path/name`` and return that path.

    Special tokens: ``<pad>`` (0), ``<s>`` (1, BOS), ``</s>`` (2, EOS), plus ``<|im_start|>``/``<|im_end|>``.
    ``add_bos=True`` makes encoding add BOS like Llama tokenizers do. ``style="metaspace"`` mimics SentencePiece
    (a word-start marker put in front of every encoded string). Load it back with
    ``transformers.AutoTokenizer.from_pretrained(path)``. Trained by the demo's
    :func:`ppomax.demo.tokenizer.train_bpe_tokenizer`.
    """
    from ppomax.demo.tokenizer import train_bpe_tokenizer

    wrapped = train_bpe_tokenizer(
        texts or DEFAULT_TEXTS,
        vocab_size,
        extra_specials=("<|im_start|>", "<|im_end|>"),
        style=style,
        add_bos=add_bos,
    )
    if chat_template is not None:
        wrapped.chat_template = chat_template
    out = Path(tmp_path) / name
    wrapped.save_pretrained(out)
    return out


def open_files_under(root: Path) -> list[str]:
    """The files under ``root`` this process holds open (deleted ones too: they still take their space)."""
    fds = Path("/proc/self/fd")
    if not fds.is_dir():
        pytest.skip("no /proc/self/fd to list open files")
    out = []
    for fd in fds.iterdir():
        try:
            target = str(fd.readlink())
        except OSError:
            continue
        if target.startswith(str(root)):
            out.append(target)
    return out


def float_leaves(obj, path="summary"):
    """``(dotted path, value)`` of every float in a nested dict/list (a report's summary.json)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from float_leaves(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from float_leaves(v, f"{path}[{i}]")
    elif isinstance(obj, float):
        yield path, obj


# -------------------------------------------------------------------- a run equals the same run uninterrupted

TIMING_PREFIXES = ("time/", "perf/")
TIMING_SUFFIXES = ("_per_s",)


def comparable_metrics(path: Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` without their timing fields (all two equal runs may differ in)."""
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            records.append(
                {
                    k: v
                    for k, v in json.loads(line).items()
                    if not k.startswith(TIMING_PREFIXES) and not k.endswith(TIMING_SUFFIXES)
                }
            )
    return records


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if torch.equal(a, b):
        return True
    if not a.is_floating_point():
        return False
    nan_a, nan_b = a.isnan(), b.isnan()
    return torch.equal(nan_a, nan_b) and torch.equal(a[~nan_a], b[~nan_b])


def _first_difference(a: Any, b: Any, key: str = "") -> str | None:
    """Where the nested values ``a`` (the reference) and ``b`` first differ, exactly (NaN equals NaN): the
    dotted key of the first differing tensor or value and how it differs; None when equal."""
    at = key or "the value"
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if _same_tensor(a, b):
            return None
        if a.shape != b.shape or a.dtype != b.dtype:
            return f"{at}: {b.dtype}{list(b.shape)} != {a.dtype}{list(a.shape)}"
        gap = (a.double() - b.double()).abs().nan_to_num(nan=math.inf).max().item()
        return f"{at} differs (max |difference| {gap:.3g})"
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return None if np.array_equal(a, b) else f"{at} differs"
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            extra, missing = sorted(map(str, b.keys() - a.keys())), sorted(map(str, a.keys() - b.keys()))
            return f"{at}: keys {extra} not in the reference, {missing} missing"
        for k in sorted(a, key=str):
            diff = _first_difference(a[k], b[k], f"{key}.{k}" if key else str(k))
            if diff:
                return diff
        return None
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        if len(a) != len(b):
            return f"{at}: {len(b)} items != {len(a)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            diff = _first_difference(x, y, f"{key}[{i}]")
            if diff:
                return diff
        return None
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return None
    if type(a) is type(b) and type(a).__eq__ is object.__eq__ and hasattr(a, "__dict__"):
        return _first_difference(vars(a), vars(b), key)  # a saved object without equality (a loss scaler)
    return None if type(a) is type(b) and a == b else f"{at}: {b!r} != {a!r}"


def _load(path: Path) -> Any:
    """A file of a run directory as values to compare: tensors, JSON, torch-saved states (the test's own
    files, so the RNG states' numpy arrays may be unpickled), else its bytes."""
    if path.suffix == ".safetensors":
        return load_file(str(path))
    if path.suffix == ".json":
        return json.loads(path.read_text(encoding="utf-8"))
    if path.suffix in (".bin", ".pt", ".pkl"):
        return torch.load(path, map_location="cpu", weights_only=False)
    return path.read_bytes()


def _directory_difference(ref: Path, run: Path, name: str) -> str | None:
    """The first difference between the files under ``ref`` and ``run`` (``name``: what to call them)."""
    files = {p.relative_to(ref) for p in ref.rglob("*") if p.is_file()}
    others = {p.relative_to(run) for p in run.rglob("*") if p.is_file()}
    if files != others:
        extra, missing = sorted(map(str, others - files)), sorted(map(str, files - others))
        return f"{name}: files {extra} not in the reference, {missing} missing"
    for f in sorted(files):
        diff = _first_difference(_load(ref / f), _load(run / f))
        if diff:
            return f"{name}/{f}: {diff}"
    return None


def _newest_checkpoint(run: Path) -> Path | None:
    found = step_dirs(run / "checkpoints")
    return found[-1][1] if found else None


def run_differences(ref: Path, run: Path) -> str | None:
    """None when the run in ``run`` ended exactly as the run in ``ref`` (the same run, uninterrupted): its
    metrics (all but timing fields), its newest checkpoint (weights, optimiser, scheduler and RNG states,
    ppomax_state.json) and its final/ and best/ models (weights, configs, tokenizer, evaluation record), each
    value bit for bit; else the first difference, naming the file and the tensor or key."""
    a, b = comparable_metrics(ref / "metrics.jsonl"), comparable_metrics(run / "metrics.jsonl")
    if [r.get("step") for r in a] != [r.get("step") for r in b]:
        return f"metrics steps {[r.get('step') for r in b]} != {[r.get('step') for r in a]}"
    for ra, rb in zip(a, b, strict=True):
        diff = _first_difference(ra, rb)
        if diff:
            return f"metrics at step {ra.get('step')}: {diff}"
    ckpt_a, ckpt_b = _newest_checkpoint(ref), _newest_checkpoint(run)
    if (ckpt_a and ckpt_a.name) != (ckpt_b and ckpt_b.name):
        return f"newest checkpoint {ckpt_b and ckpt_b.name} != {ckpt_a and ckpt_a.name}"
    if ckpt_a and ckpt_b:
        diff = _directory_difference(ckpt_a, ckpt_b, f"checkpoints/{ckpt_a.name}")
        if diff:
            return diff
    for sub in ("final", "best"):
        if (ref / sub).is_dir() != (run / sub).is_dir():
            return f"{sub}/ {'missing' if (ref / sub).is_dir() else 'not in the reference'}"
        if (ref / sub).is_dir():
            diff = _directory_difference(ref / sub, run / sub, sub)
            if diff:
                return diff
    return None


def assert_same_run(ref: Path, run: Path) -> None:
    """The run in ``run`` (interrupted and resumed, or moved, or run again) ended exactly as ``ref``
    (:func:`run_differences`)."""
    diff = run_differences(ref, run)
    assert diff is None, diff


def dense_logits(logits: Any) -> torch.Tensor:
    """[B, R, V] of a ``ResponseLogits`` (zeros past each row's response), to compare with a whole forward's."""
    if logits.positions is None:
        return logits.values
    return logits.positions.scatter(logits.values[0])
