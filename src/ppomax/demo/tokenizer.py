"""A BPE tokenizer trained from scratch with `tokenizers`: the demo's, and the tiny ones the tests and the
benchmarks build (one implementation; nothing is downloaded)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

# <pad> = 0, <s> = 1 (BOS), </s> = 2 (EOS): the ids tiny model configs in tests and benchmarks assume
SPECIALS = ("<pad>", "<s>", "</s>")


def train_bpe_tokenizer(
    texts: Sequence[str],
    vocab_size: int,
    *,
    extra_specials: Sequence[str] = (),
    style: Literal["byte_level", "metaspace"] = "byte_level",
    add_bos: bool = False,
) -> PreTrainedTokenizerFast:
    """A BPE tokenizer of ``vocab_size`` tokens (specials included) trained on ``texts``, wrapped in
    ``transformers.PreTrainedTokenizerFast`` with ``<pad>``, ``<s>`` (BOS) and ``</s>`` (EOS), then
    ``extra_specials`` as additional special tokens. Save it with ``save_pretrained``.

    ``style="byte_level"``: GPT-2 style, any text round-trips. ``style="metaspace"`` mimics SentencePiece (a
    word-start marker in front of every encoded string; the alphabet is the texts' characters). BOS is added
    to every encoding only with ``add_bos=True``, as Llama tokenizers do.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if style == "byte_level":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok = Tokenizer(models.BPE(unk_token="<pad>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
        alphabet = sorted(set("".join(texts)) | {"▁"})
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[*SPECIALS, *extra_specials],
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    extra = {"additional_special_tokens": list(extra_specials)} if extra_specials else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", **extra
    )
