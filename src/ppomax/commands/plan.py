"""`ppomax plan`: memory per device of each role under DDP, ZeRO-2, ZeRO-3, ZeRO-3 with offload and LoRA, from a
model's config.json (parameters counted exactly on the meta device: no weights are read; a Hub id's config.json is
downloaded alone) and a run's config."""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ppomax.commands.common import add_config_args
from ppomax.errors import ConfigError, ModelPathError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from ppomax.config import CommandConfig, RunKind
    from ppomax.plan import Role, Shape, Workload

DEFAULT_LORA_R = 8


def local_config(path: str | Path) -> Path:
    """The local directory holding the config of ``path``: itself, or a Hub id's snapshot with its config files
    (:func:`ppomax.models.resolve_model`)."""
    from ppomax.models import resolve_model

    return resolve_model(path, files="config")


def adapter_settings(path: str | Path) -> dict[str, Any] | None:
    """The ``adapter_config.json`` of a LoRA run's model directory (PEFT adapters, no config.json of their own:
    :func:`ppomax.models.adapter_dir.is_adapter_dir`), None for any other directory."""
    from ppomax.models.adapter_dir import adapter_settings as read_settings
    from ppomax.models.adapter_dir import is_adapter_dir

    p = local_config(path)
    return read_settings(p) if is_adapter_dir(p) else None


def config_dir(path: str | Path) -> Path:
    """The directory whose config.json describes the model at ``path``: ``path`` itself, or for LoRA adapters
    their base (``base_model_name_or_path``, the model ppomax loads them onto)."""
    from ppomax.models.adapter_dir import adapter_base

    p = local_config(path)
    adapters = adapter_settings(p)
    if adapters is None:
        return p
    base = local_config(adapter_base(adapters["base_model_name_or_path"], adapters.get("revision")))
    if not (base / "config.json").is_file():
        raise ModelPathError(f"{p}: LoRA adapters whose base model {base} has no config.json here")
    return base


def _meta_model(path: str, trust_remote_code: bool) -> PreTrainedModel:
    """The model of ``path/config.json`` (of an adapter directory's base) built on the meta device: exact
    parameter shapes, no memory, no weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    p = config_dir(path)
    if not (p / "config.json").is_file():
        raise ModelPathError(f"{p}: no config.json (ppomax plan reads a model directory's config.json only)")
    try:
        config = AutoConfig.from_pretrained(str(p), trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelPathError(f"{p}: cannot build a causal LM from its config.json: {exc}") from None


def shape_of(model: PreTrainedModel) -> Shape:
    """:class:`ppomax.plan.Shape` of a (meta) causal LM: counts from its parameters, dimensions from its config."""
    from ppomax.plan import Shape

    cfg = model.config.get_text_config()
    hidden = int(cfg.hidden_size)
    heads = int(cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or hidden // heads)
    inter = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * hidden
    params = list(model.parameters())  # tied parameters once
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    untied = out_emb is not None and (in_emb is None or out_emb.weight is not in_emb.weight)
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return Shape(
        params=sum(p.numel() for p in params),
        layers=int(cfg.num_hidden_layers),
        hidden=hidden,
        intermediate=int(inter),
        heads=heads,
        kv_heads=int(getattr(cfg, "num_key_value_heads", None) or heads),
        head_dim=head_dim,
        vocab=int(cfg.vocab_size),
        gated_mlp=any("gate" in name for name, _ in model.named_parameters()),
        lm_head_params=sum(p.numel() for p in out_emb.parameters()) if untied else 0,
        largest_module_params=int(largest),
        small_params=sum(p.numel() for p in params if p.numel() <= 10 * hidden),
    )


def _linear_dims(module: Any) -> tuple[int, int] | None:
    """(in, out) of a linear layer LoRA can adapt: torch Linear or GPT-2's Conv1D (weight [in, out])."""
    import torch

    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
        n_in, n_out = module.weight.shape
        return int(n_in), int(n_out)
    return None


def default_lora_targets(model: PreTrainedModel) -> list[str] | str:
    """PEFT's default target modules for the architecture, else every linear layer."""
    try:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as MAPPING
    except ImportError:
        return "all-linear"
    return list(MAPPING.get(model.config.model_type, [])) or "all-linear"


def lora_params(model: PreTrainedModel, r: int, targets: list[str] | str, what: str) -> int:
    """Trainable LoRA parameters, r * (in + out) per adapted layer, matching modules as PEFT does: a name equal
    to a target or ending in ``.target``; a string is a regular expression (full match), ``all-linear`` every
    linear layer but the output embedding."""
    out_emb = model.get_output_embeddings()
    total, matched, names = 0, 0, set()
    for name, module in model.named_modules():
        dims = _linear_dims(module)
        if dims is None or module is out_emb:
            continue
        names.add(name.rsplit(".", 1)[-1])
        if targets == "all-linear":
            hit = True
        elif isinstance(targets, str):
            hit = re.fullmatch(targets, name) is not None
        else:
            hit = any(name == t or name.endswith("." + t) for t in targets)
        if hit:
            total += r * (dims[0] + dims[1])
            matched += 1
    if not matched:
        raise ConfigError(
            f"{what}: no linear layer of the model matches {targets!r}; its linear layers are named "
            f"{', '.join(sorted(names))}"
        )
    return total


def workload_of(cfg: CommandConfig, kind: str) -> Workload:
    """Per-device batch shapes of each phase, read from the config (see :class:`ppomax.plan.Workload`)."""
    from ppomax.config import PPOConfig, SFTConfig
    from ppomax.plan import Workload

    m = cfg.model
    common: dict[str, Any] = {
        "kind": kind,
        "dtype": m.dtype,
        "gradient_checkpointing": m.gradient_checkpointing,
    }
    if isinstance(cfg, PPOConfig):
        p, g, pd = cfg.ppo, cfg.generation, cfg.data
        rows = min(p.micro_batch_size or p.minibatch_size, p.minibatch_size)
        ptx_rows = 0
        if p.ptx_coef > 0:  # the PPO-ptx batch is split over the minibatch's micro-batches
            ptx_rows = math.ceil(p.ptx_batch_size / math.ceil(p.minibatch_size / rows))
        return Workload(
            **common,
            train_rows=rows,
            train_seq=pd.max_prompt_tokens + g.max_new_tokens,
            logit_positions=g.max_new_tokens,  # the head runs on the response tokens only (Forward)
            rollout_rows=p.rollout_batch_size,
            prompt_tokens=pd.max_prompt_tokens,
            response_tokens=g.max_new_tokens,
            score_rows=min(p.micro_batch_size or p.rollout_batch_size, p.rollout_batch_size),
            sampling_logits=g.logprobs_from == "generate",
            ptx_rows=ptx_rows,
            ptx_seq=pd.max_prompt_tokens + pd.max_ptx_response_tokens,
            # as ppomax.ppo.fused.fuses_scoring, with a critic to fuse
            fused_update=p.uses_critic and p.one_step_update,
        )
    d = cfg.data
    seq = d.max_prompt_tokens + d.max_response_tokens
    if isinstance(cfg, SFTConfig):
        return Workload(**common, train_rows=cfg.batch_size, train_seq=seq, logit_positions=seq - 1)
    rows = 2 * cfg.batch_size  # chosen and rejected in one forward
    if cfg.max_tokens_per_batch:
        rows = max(2, cfg.max_tokens_per_batch // seq)
    return Workload(
        **common, train_rows=rows, train_seq=seq, logit_positions=seq - 1 if cfg.beta_rm > 0 else 0
    )


class _Models:
    """Meta models and shapes by directory (a directory named twice is built once)."""

    def __init__(self, trust_remote_code: bool) -> None:
        self.trust = trust_remote_code
        self.cache: dict[str, tuple[PreTrainedModel, Shape]] = {}

    def get(self, path: str) -> tuple[PreTrainedModel, Shape]:
        key = str(Path(path).resolve())
        if key not in self.cache:
            model = _meta_model(path, self.trust)
            self.cache[key] = (model, shape_of(model))
        return self.cache[key]


def build_roles(
    cfg: CommandConfig, kind: str, model_dir: str, lora_r: int, lora_targets: list[str] | str | None
) -> tuple[list[Role], list[str]]:
    """The roles of the run and header lines saying where each shape came from."""
    from ppomax.config import RMConfig, SFTConfig
    from ppomax.plan import Lora, Role

    models = _Models(cfg.model.trust_remote_code)
    policy_model, ps = models.get(model_dir)
    notes: list[str] = []
    what = "--lora-targets / model.lora.target_modules"

    def lora(model: PreTrainedModel) -> Lora:
        targets = lora_targets if lora_targets is not None else default_lora_targets(model)
        n = lora_params(model, lora_r, targets, what)
        return Lora(lora_r, tuple([targets] if isinstance(targets, str) else targets), n)

    def other(path: str | None) -> tuple[PreTrainedModel, Shape, str]:
        if not path:
            return policy_model, ps, ""
        try:
            local = local_config(path)
        except ModelPathError as exc:  # a Hub id not in the cache, offline
            return policy_model, ps, f"{exc}: assumed the policy's shape"
        if (local / "config.json").is_file() or adapter_settings(local) is not None:
            model, shape = models.get(path)
            return model, shape, ""
        return policy_model, ps, f"{path} has no config.json here: assumed the policy's shape"

    if isinstance(cfg, SFTConfig):
        return [Role("model", ps, True, ps.params, True, lora=lora(policy_model))], notes
    if isinstance(cfg, RMConfig):
        frozen_head = ps.lm_head_params if cfg.beta_rm == 0 else 0
        vh = ps.hidden + 1
        role = Role("reward", ps, True, ps.params + vh - frozen_head, cfg.beta_rm > 0, vh, lora(policy_model))
        return [role], notes
    m = cfg.model
    roles = [Role("policy", ps, True, ps.params, True, lora=lora(policy_model))]
    same_base = not m.reference or Path(m.reference).resolve() == Path(model_dir).resolve()
    _, rs, note = other(m.reference)
    roles.append(
        Role(
            "reference",
            rs,
            False,
            0,
            True,
            shares_policy_base=same_base,
            policy_precision=True,
            phase="score",
            note=note,
        )
    )
    if cfg.ppo.uses_critic:  # a critic-free advantage estimator builds no critic
        critic_path = m.critic or (m.reward if cfg.ppo.critic_init == "reward_model" else None)
        cm, cs, note = other(critic_path)
        vh = cs.hidden + 1
        # the critic never uses its LM head: frozen unless tied (ValueHeadModel.freeze_lm_head)
        trainable = cs.params - cs.lm_head_params + vh
        roles.append(Role("critic", cs, True, trainable, False, vh, lora(cm), note=note))
    if m.reward:
        _, ws, note = other(m.reward)
        # under LoRA (model.lora's, else the defaults), a critic that is the reward model plus adapters holds the
        # reward model's backbone
        from ppomax.config import PPOLoraSettings
        from ppomax.ppo.models import critic_base_is_reward_model

        with_lora = cfg.model_copy(
            update={"model": m.model_copy(update={"lora": m.lora or PPOLoraSettings.model_validate({})})}
        )
        shared = critic_base_is_reward_model(with_lora)
        roles.append(
            Role(
                "reward",
                ws,
                False,
                0,
                False,
                ws.hidden + 1,
                shares_critic_base=shared,
                phase="score",
                note=note,
            )
        )
    return roles, notes


def _lora_settings(
    cfg: CommandConfig, args: argparse.Namespace, adapters: tuple[str, dict[str, Any]] | None = None
) -> tuple[int, list[str] | str | None, str]:
    """(r, targets or None for the architecture's default, where they came from): flags over ``model.lora`` over
    ``adapters`` (the model directory's own LoRA adapters: (its path, its adapter_config.json))."""
    section = getattr(cfg.model, "lora", None)  # the config field exists once LoRA training does
    r = getattr(section, "r", None) if section is not None else None
    targets = getattr(section, "target_modules", None) if section is not None else None
    source = "model.lora" if section is not None else "defaults"
    if section is None and adapters is not None:
        path, settings = adapters
        r, targets, source = settings.get("r"), settings.get("target_modules"), f"{path}/adapter_config.json"
        targets = sorted(targets) if isinstance(targets, list) else targets  # PEFT writes a set as a list
    if args.lora_r is not None:
        r, source = args.lora_r, "flags"
    if args.lora_targets:
        targets, source = [t.strip() for t in args.lora_targets.split(",") if t.strip()], "flags"
    if isinstance(targets, list | tuple) and list(targets) == ["all-linear"]:
        targets = "all-linear"
    return int(r or DEFAULT_LORA_R), (list(targets) if isinstance(targets, list | tuple) else targets), source


def _run(args: argparse.Namespace) -> int:
    from ppomax.config import load_config
    from ppomax.plan import cpu_run, format_cpu_run, format_plan, plan, plan_json

    kind: RunKind = args.kind
    cfg = load_config(kind, path=args.config, preset=args.preset, overrides=args.overrides)
    model_dir = args.model or cfg.model.policy
    if not model_dir:
        raise ConfigError(
            "--model PATH or model.policy: required (a directory with the model's config.json, or a Hub id)"
        )
    adapters = adapter_settings(model_dir)
    lora_r, lora_targets, lora_source = _lora_settings(
        cfg, args, (model_dir, adapters) if adapters is not None else None
    )
    roles, notes = build_roles(cfg, args.kind, model_dir, lora_r, lora_targets)
    workload = workload_of(cfg, args.kind)
    plans = plan(roles, workload, args.devices)
    cpu = cpu_run(plans, "lora" if getattr(cfg.model, "lora", None) is not None else "ddp")
    if args.json:
        doc = {
            "model": model_dir,
            "kind": args.kind,
            "devices": args.devices,
            "gpu_memory_gib": args.gpu_memory,
            "roles": {
                r.name: {"params": r.shape.params + r.value_head, "trainable": r.trainable} for r in roles
            },
            "shapes": {r.name: asdict(r.shape) for r in roles},
            "lora": {r.name: asdict(r.lora) for r in roles if r.lora is not None},
            "workload": asdict(workload),
            "strategies": plan_json(plans, args.gpu_memory),
            "cpu_run": cpu,
        }
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        return 0
    w = workload
    of = f"{model_dir} (LoRA adapters on {config_dir(model_dir)})" if adapters is not None else model_dir
    header = [f"ppomax plan: {args.kind} run of {of} on {args.devices} device(s), {w.dtype}"]
    for r in roles:
        trained = f", {r.trainable:,} trained" if r.trained else ", frozen"
        lora = (
            f", LoRA r={r.lora.r} on {','.join(r.lora.targets)}: {r.lora.params:,} adapter params"
            if r.lora
            else ""
        )
        header.append(f"  {r.name}: {r.shape.params + r.value_head:,} params{trained}{lora}")
    header.append(f"  LoRA settings from {lora_source} (--lora-r, --lora-targets or model.lora)")
    tokens = f"{w.train_rows} rows x {w.train_seq} tokens per micro-batch"
    if w.kind == "ppo":
        tokens = (
            f"rollout {w.rollout_rows} rows x ({w.prompt_tokens} prompt + {w.response_tokens} new) tokens, "
            f"scoring {w.score_rows} rows, updates {tokens}"
        )
    header.append(
        f"  batches per device: {tokens}{', gradient checkpointing' if w.gradient_checkpointing else ''}"
    )
    header += [f"  {n}" for n in notes]
    text = format_plan(plans, header, args.gpu_memory)
    text += (
        "\nActivations and KV cache are estimates (ppomax.plan); add ~1-2 GiB per device for the CUDA context, "
        "allocator fragmentation and communication buffers.\n"
    )
    if args.devices == 1:
        text += format_cpu_run(cpu)
    sys.stdout.write(text)
    return 0


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of GiB, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number of GiB > 0, got {text!r}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="memory per device of each model under DDP, ZeRO-2/3, offload and LoRA (before renting GPUs)",
        description="Memory per device each role (policy, critic, reference, reward model; or the model SFT/RM "
        "trains) needs under DDP, ZeRO-2, ZeRO-3, ZeRO-3 with CPU offload and LoRA, for the config's batch "
        "sizes and lengths. Reads only config.json files: no weights are loaded.",
    )
    p.add_argument(
        "--model",
        metavar="PATH",
        help="the policy's (SFT/RM: the model's) directory or Hub id ORG/NAME[@REVISION]; default model.policy",
    )
    p.add_argument("--kind", choices=("ppo", "sft", "rm"), default="ppo", help="which command's config")
    add_config_args(p, presets=True)
    p.add_argument(
        "--devices", type=_positive_int, default=1, metavar="N", help="devices the run shards over"
    )
    p.add_argument(
        "--gpu-memory", type=_positive_float, metavar="GIB", help="say whether the peak fits in GIB"
    )
    p.add_argument(
        "--lora-r",
        type=_positive_int,
        metavar="R",
        help=f"LoRA rank (default model.lora.r, else {DEFAULT_LORA_R})",
    )
    p.add_argument(
        "--lora-targets",
        metavar="A,B",
        help="LoRA target modules, comma-separated, or all-linear (default model.lora.target_modules, else "
        "PEFT's default for the architecture)",
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON (bytes per device)")
    p.set_defaults(func=_run)
