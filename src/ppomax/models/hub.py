"""Model paths: a local directory, or a Hugging Face Hub id ``org/name`` with an optional revision ``org/name@rev``
(a branch, tag or commit), as ``from_pretrained`` takes them.

Every loader resolves its path here first (:func:`resolve_model`): a local directory is used as it is (it wins over
a Hub id of the same name, as in transformers); a Hub id is the snapshot directory of the local Hugging Face cache,
downloaded into it when missing (only the files a loader reads: configs, tokenizer files, safetensors weights, or the
``pytorch_model*.bin`` of a repository without safetensors). ``HF_HUB_OFFLINE=1`` (or ``TRANSFORMERS_OFFLINE=1``)
turns the Hub off: a cached id loads, a missing one is one line saying so. Everything after resolution reads local
files only, so a model directory, a cached snapshot and a fresh download behave the same.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ppomax.errors import ModelPathError

Files = Literal["model", "config", "tokenizer"]

_CONFIGS = ["*.json", "*.py"]
_TOKENIZER = [*_CONFIGS, "*.model", "*.txt", "*.tiktoken", "*.jinja"]
_PATTERNS: dict[str, list[str]] = {
    "config": _CONFIGS,
    "tokenizer": _TOKENIZER,
    "model": [*_TOKENIZER, "*.safetensors"],
}
_LEGACY_WEIGHTS = ["pytorch_model*.bin", "adapter_model.bin"]
_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "adapter_model.safetensors",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "adapter_model.bin",
)
# a Hub repository id (huggingface_hub's rules: letters, digits, - _ .), then an optional @revision
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[^@\s]+))?$")


@dataclass(frozen=True)
class HubId:
    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")


def parse_hub_id(spec: str | os.PathLike[str]) -> HubId | None:
    """``org/name`` or ``org/name@revision`` -> :class:`HubId`; None for anything else (a local path: absolute,
    relative with ``./``, more than one ``/``, or a name huggingface_hub refuses)."""
    text = str(spec)
    m = _HUB_ID.match(text)
    if m is None or "--" in m["repo"] or ".." in m["repo"] or m["repo"].endswith(".git"):
        return None
    return HubId(m["repo"], m["rev"])


def is_model_spec(spec: str | os.PathLike[str]) -> bool:
    """Whether ``spec`` names a model: an existing local path or a Hub id (which may still need downloading)."""
    return Path(spec).exists() or parse_hub_id(spec) is not None


def offline_setting() -> str | None:
    """The environment variable that turns the Hub off (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE``), if one does."""
    from huggingface_hub import constants

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
            return name
    return "HF_HUB_OFFLINE" if constants.HF_HUB_OFFLINE else None


def resolve_model(path: str | os.PathLike[str], key: str | None = None, files: Files = "model") -> Path:
    """The local directory of ``path``: itself when it exists, else the Hub cache's snapshot of the Hub id it is
    (downloaded when missing, unless offline). ``files``: what the caller reads (``config``: config.json and code,
    ``tokenizer``: also the tokenizer's files, ``model``: also the weights). ``key``: the config key or option that
    named ``path``, which every error names. A path that exists nowhere is returned as is: the caller's own checks
    say what is missing there."""
    p = Path(path)
    hub = None if p.exists() else parse_hub_id(path)
    if hub is None:
        return p
    snapshot = _snapshot(hub, key, _PATTERNS[files])
    if files == "model" and not any((snapshot / f).is_file() for f in _WEIGHTS) and offline_setting() is None:
        snapshot = _snapshot(hub, key, _LEGACY_WEIGHTS)  # a repository without safetensors weights
    return snapshot


def _snapshot(hub: HubId, key: str | None, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    lead = f"{key}: " if key else ""
    offline = offline_setting()
    try:
        # root files only: repositories keep other formats (onnx/, original/, gguf) in subfolders
        return Path(
            snapshot_download(
                hub.repo_id,
                revision=hub.revision,
                allow_patterns=patterns,
                ignore_patterns=["*/*"],
                local_files_only=offline is not None,
            )
        )
    except RevisionNotFoundError:
        raise ModelPathError(
            f"{lead}{hub}: the Hub repository {hub.repo_id} has no revision {hub.revision}"
        ) from None
    except GatedRepoError:
        raise ModelPathError(
            f"{lead}{hub}: a gated model on the Hub: accept its terms on huggingface.co and log in (`hf auth login`)"
        ) from None
    except RepositoryNotFoundError:
        raise ModelPathError(
            f"{lead}{hub}: neither a local directory nor a model on the Hub (a private one needs `hf auth login`)"
        ) from None
    except LocalEntryNotFoundError as exc:
        if offline is not None:
            rev = f" --revision {hub.revision}" if hub.revision else ""
            raise ModelPathError(
                f"{lead}{hub} is not in the Hub cache and {offline} is set (and no local directory has that name): "
                f"download it once online (`hf download {hub.repo_id}{rev}`), or give a local directory"
            ) from None
        raise ModelPathError(
            f"{lead}{hub} is not in the Hub cache and the Hub cannot be reached ({first_line(exc)})"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise ModelPathError(f"{lead}{hub}: cannot download it from the Hub ({first_line(exc)})") from None


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message``: an exception in a one-line error."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
