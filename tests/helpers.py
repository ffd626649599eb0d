"""Test helpers shared by the test files (import as ``from helpers import make_tiny_tokenizer``).

Nothing here downloads anything: tokenizers are trained on a few strings in a fraction of a second.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pytest

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
