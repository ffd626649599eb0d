"""Reward models and critics on disk: transformers' ``*ForSequenceClassification`` checkpoints with one label.

:func:`save_value_model` writes a :class:`~ppomax.models.ValueHeadModel` (its backbone and head) as the
sequence classifier of its architecture (e.g. ``LlamaForSequenceClassification``)::

    config.json         the backbone's config with architectures [<Arch>ForSequenceClassification], num_labels 1
                        (id2label {0: LABEL_0}) and pad_token_id (where the score is read)
    model.safetensors   the decoder's weights under the architecture's own prefix (``model.``, ``transformer.``...)
                        and ``score.weight`` [1, H]; no LM head

so that ``AutoModelForSequenceClassification.from_pretrained(dir)(input_ids, attention_mask).logits[:, 0]`` is the
score ppomax computes, and TRL loads it as a reward or value model. :func:`load_value_model` reads any such
checkpoint (ppomax's, TRL's, a Hub reward model of a decoder architecture): the decoder into the architecture's
causal LM (whose LM head, absent from the checkpoint, is freshly initialised unless tied to the embeddings: only
the reward model's LM-loss term would use it) and ``score`` into the value head.

Also read: the value-head directories earlier ppomax versions wrote (a causal LM + ``value_head.safetensors`` +
``ppomax_value_head.json``), whose head keeps its bias when it is not zero, and a LoRA run's value model (PEFT
adapters + the head in those two files; its ``merged/`` directory is a standard checkpoint).
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from ppomax.errors import ModelPathError

from .adapter_dir import is_peft_model
from .hub import resolve_model
from .loading import check_finite, load_causal_lm, to_dtype, weights_error

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel

    from .adapter_dir import CausalLM, TransformersLM

_Model = TypeVar("_Model")

HEAD_WEIGHTS = "value_head.safetensors"
HEAD_META = "ppomax_value_head.json"


def hidden_size_of(backbone: PreTrainedModel | PeftModel) -> int:
    dim = getattr(backbone.get_input_embeddings(), "embedding_dim", None)
    if dim is not None:
        return int(dim)
    return int(backbone.config.get_text_config().hidden_size)


log = logging.getLogger("ppomax")

_LEGACY_FORMAT = "ppomax-value-head"
_CLASSIFIER_SUFFIX = "ForSequenceClassification"


def is_value_head_model(path: str | Path) -> bool:
    """True for a value-head directory of an earlier ppomax version, or a LoRA run's (adapters + head)."""
    p = Path(path)
    return (p / HEAD_META).is_file() and (p / HEAD_WEIGHTS).is_file()


def classifier_architectures(path: str | Path) -> list[str]:
    """The ``*ForSequenceClassification`` architectures ``path/config.json`` names ([] for any other model)."""
    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    archs = config.get("architectures") if isinstance(config, dict) else None
    return [a for a in archs or [] if isinstance(a, str) and a.endswith(_CLASSIFIER_SUFFIX)]


def is_value_model_dir(path: str | Path) -> bool:
    """A directory :func:`load_value_model` reads: a sequence classifier, or a (legacy or LoRA) value-head model."""
    return is_value_head_model(path) or bool(classifier_architectures(path))


@contextmanager
def _skeleton() -> Iterator[None]:
    """Build a model as an empty plain module (meta tensors), only to read its layout. Under ZeRO-3 transformers
    builds every model inside ``deepspeed.zero.Init``, a collective: the rank that saves would enter it alone and
    wait forever. ``set_zero3_state`` is transformers' own way of saying "no zero.Init here"."""
    from transformers.modeling_utils import set_zero3_state

    with set_zero3_state(), torch.device("meta"):
        yield


# ------------------------------------------------------------------------------------------------- saving


def _split(state_dict: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``backbone.*`` / ``value_head.*`` keys of a value-head model's state dict, without their prefixes."""
    backbone = {k[len("backbone.") :]: v for k, v in state_dict.items() if k.startswith("backbone.")}
    head = {k[len("value_head.") :]: v for k, v in state_dict.items() if k.startswith("value_head.")}
    return backbone, head


def save_value_model(
    backbone: CausalLM,
    value_head: torch.nn.Linear,
    out: Path,
    state_dict: dict[str, Tensor] | None = None,
    **kwargs: Any,
) -> None:
    """A value-head model, ``backbone`` + ``value_head`` (``state_dict``: its gathered weights under
    sharded training, keys ``backbone.*`` / ``value_head.*``, else their own), as a sequence classifier in
    ``out``; with LoRA adapters on the backbone, the adapters (PEFT's ``save_pretrained``, ``kwargs`` passed
    on) and the head. An architecture transformers has no sequence classifier for is saved as a value-head
    directory (the backbone as a causal LM + the head), with a warning."""
    out.mkdir(parents=True, exist_ok=True)
    backbone_sd, head_sd = _split(state_dict) if state_dict is not None else (None, None)
    head_sd = head_sd or {k: v.detach() for k, v in value_head.state_dict().items()}
    if is_peft_model(backbone):
        backbone.save_pretrained(str(out), state_dict=backbone_sd, **kwargs)
        save_head(out, head_sd)
        return
    if backbone_sd is None:
        backbone_sd = backbone.state_dict()
    save_classifier(backbone, backbone_sd, head_sd, out, **kwargs)
    if getattr(backbone, "generation_config", None) is not None:  # a classifier's save writes none
        backbone.generation_config.save_pretrained(out)


def save_classifier(
    backbone: PreTrainedModel,
    backbone_sd: dict[str, Tensor],
    head_sd: dict[str, Tensor],
    out: Path,
    **kwargs: Any,
) -> None:
    """The causal LM ``backbone`` (its weights: ``backbone_sd``) and a value head (``head_sd``) as the
    ``*ForSequenceClassification`` checkpoint of the backbone's architecture."""
    bias = head_sd.get("bias")
    if bias is not None and bool(bias.ne(0).any()):
        log.warning(
            "warning: the value head's bias (%.4g; a head of an earlier ppomax version, or of a run it started) has "
            "no place in a sequence classifier's score head: dropped, the saved values are the trained ones minus it",
            float(bias.reshape(-1)[0]),
        )
    classifier, weights, problem = _classifier_weights(backbone, backbone_sd, head_sd["weight"])
    if classifier is None:
        log.warning("warning: %s: %s; saved as a value-head directory ppomax reads", out, problem)
        backbone.save_pretrained(out, state_dict=backbone_sd, **kwargs)
        save_head(out, head_sd)
        return
    classifier.save_pretrained(out, state_dict=weights, **kwargs)


def _classifier_weights(
    backbone: PreTrainedModel, backbone_sd: dict[str, Tensor], score: Tensor
) -> tuple[PreTrainedModel | None, dict[str, Tensor], str]:
    """(the sequence classifier holding these weights, its state dict, "") or (None, {}, why it cannot be built)."""
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(backbone.config)
    config.num_labels = 1
    try:
        with _skeleton():
            classifier = AutoModelForSequenceClassification.from_config(config)
    except (ValueError, KeyError) as exc:
        return None, {}, f"transformers has no sequence classifier for {type(config).__name__} ({exc})"
    classifier.config.architectures = [type(classifier).__name__]
    lm_head = next(
        (name for name, m in backbone.named_modules() if m is backbone.get_output_embeddings()), None
    )
    source, target = backbone.base_model_prefix, classifier.base_model_prefix
    weights: dict[str, Tensor] = {}
    for name, tensor in backbone_sd.items():
        if lm_head and (name == lm_head or name.startswith(f"{lm_head}.")):
            continue
        if name.startswith(f"{source}."):
            weights[f"{target}{name[len(source) :]}"] = tensor
        else:
            weights[name] = tensor
    head_keys = _head_keys(classifier)
    if len(head_keys) != 1:
        return None, {}, f"{type(classifier).__name__}'s head is {head_keys}, not one score layer"
    weights[head_keys[0]] = score.detach().float().reshape(1, -1)
    expected = set(classifier.state_dict())
    odd = sorted(set(weights) ^ expected)
    if odd:
        return None, {}, f"{type(classifier).__name__} and the backbone's weights differ ({odd[0]})"
    classifier.load_state_dict(weights, strict=True, assign=True)
    return classifier, weights, ""


def _head_keys(classifier: PreTrainedModel) -> list[str]:
    """The weights of a sequence classifier outside its decoder: its score head's (``score.weight``)."""
    prefix = f"{classifier.base_model_prefix}."
    return sorted(k for k in classifier.state_dict() if not k.startswith(prefix))


def save_head(out_dir: Path, head_sd: dict[str, Tensor]) -> None:
    """The head's weights and the marker file of a value-head directory, beside a saved backbone (or adapters)."""
    weights = {k: v.detach().cpu().float().contiguous() for k, v in head_sd.items()}
    save_file(weights, str(out_dir / HEAD_WEIGHTS))
    meta = {"format": _LEGACY_FORMAT, "version": 1, "hidden_size": int(weights["weight"].shape[-1])}
    (out_dir / HEAD_META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------------------------- loading


def load_value_model(
    cls: Callable[[TransformersLM, torch.nn.Linear], _Model],
    path: str | Path,
    dtype: str | torch.dtype = "float32",
    trust_remote_code: bool = False,
    key: str | None = None,
) -> _Model:
    """The reward model or critic at ``path`` (a local directory or Hub id; see the module docstring)."""
    lead = f"{key}: " if key else ""
    p = resolve_model(path, key)
    if not p.exists():
        raise ModelPathError(
            f"{lead}reward/critic model not found: {path} (expected a local directory or a Hub id ORG/NAME[@REVISION])"
        )
    if is_value_head_model(p):
        backbone = load_causal_lm(p, dtype=to_dtype(dtype), trust_remote_code=trust_remote_code, key=key)
        return cls(backbone, _legacy_head(p / HEAD_WEIGHTS, hidden_size_of(backbone)))
    archs = classifier_architectures(p)
    if not archs:
        what = _architectures(p)
        raise ModelPathError(
            f"{lead}{path} is not a reward model{f' ({what})' if what else ''}: expected a *ForSequenceClassification "
            "checkpoint with num_labels 1 (as `ppomax train-rm`, TRL's RewardTrainer and Hub reward models save), or "
            "a causal LM to start a fresh value head on (e.g. ppo.critic_init: sft)"
        )
    labels = _num_labels(p)
    if labels != 1:
        raise ModelPathError(
            f"{lead}{path} is a {archs[0]} with {labels} labels: a reward model or critic has one output (num_labels 1)"
        )
    with torch.random.fork_rng(
        devices=[]
    ):  # the LM head the checkpoint lacks is initialised from the global RNG
        backbone = load_causal_lm(
            p, dtype=to_dtype(dtype), trust_remote_code=trust_remote_code, key=key, classifier=archs[0]
        )
    head = _classifier_head(p, backbone, archs[0], lead)
    return cls(backbone, head)


def _architectures(path: Path) -> str:
    try:
        archs = json.loads((path / "config.json").read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return ""
    return ", ".join(str(a) for a in archs)


def _num_labels(path: Path) -> int:
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    if "num_labels" in config:
        return int(config["num_labels"])
    return len(config.get("id2label") or {0: "LABEL_0", 1: "LABEL_1"})  # transformers' default: 2


def _classifier_head(path: Path, backbone: PreTrainedModel, arch: str, lead: str) -> torch.nn.Linear:
    """The score head of the sequence classifier at ``path`` as a float32 value head."""
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(backbone.config)
    config.num_labels = 1
    with _skeleton():
        names = _head_keys(AutoModelForSequenceClassification.from_config(config))
    weight_name = next((n for n in names if n.endswith(".weight")), "score.weight")
    tensors = read_tensors(path, [weight_name, weight_name[: -len("weight")] + "bias"])
    weight = tensors.get(weight_name)
    hidden = hidden_size_of(backbone)
    if weight is None or tuple(weight.shape) != (1, hidden):
        found = "none" if weight is None else list(weight.shape)
        raise ModelPathError(
            f"{lead}{path}: the {arch} holds no {weight_name} of shape [1, {hidden}] (found {found})"
        )
    bias = tensors.get(weight_name[: -len("weight")] + "bias")
    with torch.random.fork_rng(devices=[]):
        head = torch.nn.Linear(hidden, 1, bias=bias is not None)
    with torch.no_grad():
        head.weight.copy_(weight.float())
        if bias is not None:
            head.bias.copy_(bias.float().reshape(1))
    check_finite(torch.nn.ModuleDict({weight_name.rsplit(".", 1)[0]: head}), path)  # names it score.weight
    return head


def read_tensors(path: Path, names: list[str]) -> dict[str, Tensor]:
    """The tensors ``names`` of a checkpoint directory's weights (safetensors, sharded or not, else
    ``pytorch_model.bin`` read as plain tensors); names it does not hold are left out."""
    index = next(
        (
            path / f
            for f in ("model.safetensors.index.json", "pytorch_model.bin.index.json")
            if (path / f).is_file()
        ),
        None,
    )
    files: dict[str, list[str]] = {}
    if index is not None:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        for name in names:
            if name in weight_map:
                files.setdefault(weight_map[name], []).append(name)
    else:
        single = next((f for f in ("model.safetensors", "pytorch_model.bin") if (path / f).is_file()), None)
        if single is not None:
            files[single] = names
    out: dict[str, Tensor] = {}
    for file, wanted in files.items():
        where = path / file
        try:
            if file.endswith(".safetensors"):
                with safe_open(str(where), "pt") as f:
                    held = set(f.keys())
                    out.update({n: f.get_tensor(n) for n in wanted if n in held})
            else:
                state = torch.load(str(where), map_location="cpu", weights_only=True, mmap=True)
                out.update({n: state[n] for n in wanted if n in state})
        except Exception as exc:  # a truncated, corrupt or hostile file: one line naming it
            raise weights_error(where, exc) from None
    return out


def _legacy_head(file: Path, hidden: int) -> torch.nn.Linear:
    """The head of a value-head directory: its bias kept when it is not zero (the values stay exactly those the
    directory was saved with), else a head without bias, like a fresh one."""
    try:
        sd = load_file(str(file))
    except (SafetensorError, OSError) as exc:
        raise ModelPathError(f"{file}: cannot load the value head ({exc})") from None
    weight, bias = sd.get("weight"), sd.get("bias")
    if weight is None or tuple(weight.shape) != (1, hidden) or (bias is not None and bias.numel() != 1):
        shapes = {k: list(v.shape) for k, v in sd.items()}
        raise ModelPathError(
            f"{file}: cannot load the value head (expected weight [1, {hidden}], found {shapes})"
        )
    kept_bias = bias if bias is not None and bool(bias.ne(0).any()) else None
    with torch.random.fork_rng(devices=[]):
        head = torch.nn.Linear(hidden, 1, bias=kept_bias is not None)
    with torch.no_grad():
        head.weight.copy_(weight.float())
        if kept_bias is not None:
            head.bias.copy_(kept_bias.float().reshape(1))
    check_finite(head, file)
    return head
