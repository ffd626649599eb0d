"""``data``: each command's data sources (a path, list, glob, Hub id or ``load_dataset`` mapping) and how their
records are read.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BeforeValidator, Field, ValidationError

from ppomax.config.section import Retired, Section


class DatasetArgs(Section):
    """A data source given as ``datasets.load_dataset``'s own arguments (README: Data)."""

    path: str = Field(
        description="A Hub dataset id, a local directory, or a builder name (json, parquet, csv, arrow) with "
        "data_files."
    )
    name: str | None = Field(None, description="The dataset's configuration (load_dataset's `name`).")
    data_dir: str | None = Field(None, description="A directory of the dataset's repository to read.")
    data_files: str | list[str] | dict[str, str | list[str]] | None = Field(
        None, description="Data files (paths or globs), or a mapping split -> files."
    )
    split: str | None = Field(
        None,
        description="The split to read (a slice too, e.g. train[:1000]); null = train, or for a held-out set the "
        "only split of a local source.",
    )
    revision: str | None = Field(None, description="A Hub revision: a branch, tag or commit.")


def _source(value: Any) -> Any:
    """A data source: a non-empty path/glob/Hub id, a non-empty list of them, or a :class:`DatasetArgs` mapping;
    anything else is one error naming what is allowed (not pydantic's error for each member of the union)."""
    if value is None or isinstance(value, DatasetArgs):
        return value
    if isinstance(value, str):
        if not value.strip():
            raise ValueError("an empty path")
        return value
    if isinstance(value, list):
        if not value or not all(isinstance(v, str) and v.strip() for v in value):
            raise ValueError("a list source holds file paths or globs (non-empty strings)")
        return value
    if isinstance(value, dict):
        try:
            return DatasetArgs.model_validate(value)
        except ValidationError as err:
            e = err.errors()[0]
            key = ".".join(str(p) for p in e["loc"])
            what = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
            raise ValueError(f"{key}: {what} (a mapping has {', '.join(DatasetArgs.model_fields)})") from None
    raise ValueError(
        f"must be a path, a list of paths or a mapping {{{', '.join(DatasetArgs.model_fields)}}}, "
        f"not {type(value).__name__}"
    )


#: a data key's value (:mod:`ppomax.data.sources`)
DataSource = Annotated[str | list[str] | DatasetArgs | None, BeforeValidator(_source)]
_SOURCE_HELP = (
    "a file (.jsonl/.json/.gz, .parquet, .csv, .arrow), directory, glob, list of files, Hub dataset id or "
    "mapping {path, name, data_dir, data_files, split, revision} (README: Data)"
)
_HELD_OUT_HELP = "; a Hub dataset needs the mapping with its split"


class _DataCommon(Section):
    max_prompt_tokens: int = Field(
        256, gt=0, description="Longer prompts lose their oldest turns (system and latest turn kept)."
    )
    on_bad_line: Literal["fail", "skip"] = Field(
        "fail", description="A bad record (a line of a file, a row of a dataset): stop, or skip and count."
    )
    chat_format: Literal["auto", "hh", "chat_template"] = Field(
        "auto",
        description="Prompt format: the tokenizer's chat template, HH-RLHF's Human/Assistant text, or auto (the "
        "chat template when the tokenizer has one, else hh).",
    )
    num_proc: int = Field(
        1,
        gt=0,
        description="Processes that parse and tokenise the data (1 = the training process); the data is the same "
        "for any value.",
    )


class DataConfig(_DataCommon):
    """SFT inputs (the record shapes of the README's Data section)."""

    _retired: ClassVar[Retired] = {"test": (None, "used by train-rm only")}

    train: DataSource = Field(None, description=f"Training examples: {_SOURCE_HELP}.")
    valid: DataSource = Field(
        None,
        description=f"Validation examples, a data source{_HELD_OUT_HELP}; null = valid_fraction of train.",
    )
    valid_fraction: float = Field(0.0, ge=0, lt=1, description="Held out from `train` when `valid` is null.")
    max_response_tokens: int = Field(256, gt=0, description="Longer responses are cut from the right.")


class RMDataConfig(DataConfig):
    """Reward-model inputs: preference pairs, with a test split scored at the end."""

    _retired: ClassVar[Retired] = {}

    train: DataSource = Field(None, description=f"Training preference pairs: {_SOURCE_HELP}.")
    valid: DataSource = Field(
        None, description=f"Validation pairs, a data source{_HELD_OUT_HELP}; null = valid_fraction of train."
    )
    test: DataSource = Field(
        None,
        description=f"Test pairs scored at the end, a data source{_HELD_OUT_HELP}; null = the validation split.",
    )


class PPODataConfig(_DataCommon):
    """PPO inputs: prompts, evaluation prompts and the PPO-ptx corpus."""

    prompts: DataSource = Field(None, description=f"Training prompts: {_SOURCE_HELP}.")
    valid_prompts: DataSource = Field(
        None, description=f"Prompts for periodic evaluation, a data source{_HELD_OUT_HELP}."
    )
    ptx: DataSource = Field(
        None, description="SFT/pretraining examples for the PPO-ptx loss (eq. 17), a data source."
    )
    max_ptx_response_tokens: int = Field(
        256, gt=0, description="PPO-ptx examples: response tokens kept (cut from the right), as in SFT."
    )
