"""Data layer: sources (files, directories, globs, Hub datasets: :mod:`ppomax.data.sources`); loaders for
preference pairs, PPO prompts and SFT examples; tokenisation; batching.

Record shapes: :mod:`ppomax.data.formats` and the README's Data section. Typical use::

    stats = LoadStats()
    pairs = load_preference_pairs("hh.jsonl.gz", on_error="skip", stats=stats)
    feats = [tokenize_pair(tok, p, max_prompt_tokens=512, max_response_tokens=256, stats=stats) for p in pairs]
    # a batch of n pairs has 2n rows: give half the token budget
    batches = token_balanced_batches([feature_length(f) for f in feats], max_tokens=8192 // 2, seed=0)
    batch = PreferenceCollator(pad_id_of(tok))([feats[i] for i in batches[0]])
"""

from .batching import (
    IndexStream,
    PreferenceCollator,
    PromptCollator,
    SFTCollator,
    feature_length,
    global_batches,
    pad_id_of,
    pad_left,
    pad_right,
    rank_share,
    token_balanced_batches,
)
from .chat import ASSISTANT, HUMAN, ChatFormat, Dialogue, Renderer, parse_hh, resolve_chat_format
from .features import pair_features, prompt_features, sft_features
from .formats import (
    PreferencePair,
    PromptExample,
    SFTExample,
    load_preference_pairs,
    load_prompts,
    load_sft_examples,
)
from .io import DataError, LoadStats, Record
from .sources import Source, fingerprint, read_records
from .tokenize import (
    IGNORE_INDEX,
    encode,
    fit_prompt,
    special_prefix,
    tokenize_pair,
    tokenize_prompt,
    tokenize_response,
    tokenize_sft,
)

__all__ = [
    "ASSISTANT",
    "HUMAN",
    "IGNORE_INDEX",
    "ChatFormat",
    "DataError",
    "Dialogue",
    "IndexStream",
    "LoadStats",
    "PreferenceCollator",
    "PreferencePair",
    "PromptCollator",
    "PromptExample",
    "Record",
    "Renderer",
    "SFTCollator",
    "SFTExample",
    "Source",
    "encode",
    "feature_length",
    "fingerprint",
    "fit_prompt",
    "global_batches",
    "load_preference_pairs",
    "load_prompts",
    "load_sft_examples",
    "pad_id_of",
    "pad_left",
    "pad_right",
    "pair_features",
    "parse_hh",
    "prompt_features",
    "rank_share",
    "read_records",
    "resolve_chat_format",
    "sft_features",
    "special_prefix",
    "token_balanced_batches",
    "tokenize_pair",
    "tokenize_prompt",
    "tokenize_response",
    "tokenize_sft",
]
