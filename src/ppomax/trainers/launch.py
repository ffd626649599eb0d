"""How a launch is read and its Accelerator built: one process, DDP, DeepSpeed ZeRO or FSDP.

``accelerate launch --config_file configs/accelerate/<engine>.yaml`` tells every process which engine to use
through environment variables (``ACCELERATE_USE_DEEPSPEED``, ``ACCELERATE_USE_FSDP``, the DeepSpeed fields);
:func:`launch_engine` reads them and :func:`build_accelerator` honours them or refuses, never downgrading a
sharded config to something else in silence. What each engine does on a machine without CUDA:

* DDP: accelerate's CPU mode (``cpu=True``) with gloo; ``accelerate launch --multi_gpu`` (or torchrun, mpirun)
  starts the processes.
* DeepSpeed: runs on CPU with its CPU accelerator over gloo, but accelerate picks no backend for it there (it
  then reports one process on every rank), so the backend is named explicitly. Optimisers are ppomax's own
  (plain torch AdamW): the CPU has no compiled DeepSpeed Adam.
* FSDP: accelerate enables it only on GPU device types; on CPU it would be plain DDP, so it is an error.

PPO trains two models (policy and critic), each with its own optimiser and learning rate. Under DeepSpeed each
is its own engine (accelerate's multi-plugin API: one :class:`~accelerate.utils.DeepSpeedPlugin` per model,
selected before its ``prepare``), which is also how OpenRLHF and MOSS-RLHF hold them: one ZeRO engine per
trained model, the frozen ones as inference engines (``frozen``: under ZeRO-3 partitioned, no optimiser state).
One engine for both would force one optimiser, one learning rate and one gradient clip on two models.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import logging
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from accelerate import Accelerator

from ppomax.console import console
from ppomax.errors import ConfigError

from .quiet import quiet_known_library_messages

# How many processes a launcher started: torchrun / accelerate (WORLD_SIZE), MPICH/Intel MPI, Open MPI, MVAPICH
# (the variables accelerate itself reads, accelerate.utils.environment.get_cpu_distributed_information).
WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
# The DeepSpeed plugin of each trained model, and the one the frozen models (reference, reward) run under.
FROZEN = "frozen"
# model.dtype -> accelerate's mixed_precision; trained models are loaded in TRAINED_DTYPE (master weights).
MIXED_PRECISION = {"float32": "no", "bfloat16": "bf16", "float16": "fp16"}
TRAINED_DTYPE = "float32"
_warned: set[str] = set()


def _flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() in ("1", "true", "yes", "y", "on")


def _launched_world(env: Mapping[str, str]) -> int:
    for var in WORLD_SIZE_VARS:
        if env.get(var, "").strip().isdigit():
            return int(env[var])
    return 1


def launch_engine(env: Mapping[str, str]) -> str:
    """``deepspeed``, ``fsdp`` or ``ddp`` (which includes a single process), as ``accelerate launch`` set it."""
    if _flag(env, "ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    if _flag(env, "ACCELERATE_USE_FSDP"):
        return "fsdp"
    return "ddp"


def launch_mismatch(env: Mapping[str, str]) -> str | None:
    """The one-line warning for a launch that asked for several processes but started only this one, else None.

    ``accelerate launch --cpu --num_processes N`` (or ``--num_machines N``, or an accelerate config with
    ``use_cpu``) takes accelerate's simple launcher: without ``--mpirun_hostfile`` it starts one process, handing it
    ``ACCELERATE_USE_CPU`` and a rendezvous address (``MASTER_ADDR``, set only when N > 1) but no world size, so
    torch.distributed sees one process and the run silently trains alone. ``--multi_gpu`` goes through torchrun,
    which sets ``WORLD_SIZE`` in every process; mpirun sets its own size variables.
    """
    if _flag(env, "ACCELERATE_USE_CPU") and env.get("MASTER_ADDR") and _launched_world(env) == 1:
        return (
            "`accelerate launch --cpu` with more than one process starts one process only (it needs mpirun, "
            "--mpirun_hostfile), so this run trains alone; for N processes on this machine's CPUs use "
            "`accelerate launch --multi_gpu --num_processes N -m ppomax ...` (gloo DDP, no GPU needed)"
        )
    return None


def trained_dtype(dtype: str, adapters: bool) -> str:
    """The dtype a trained model is loaded in: float32 master weights when it is trained in full (``dtype`` is
    then its autocast dtype); a LoRA base is frozen and stays in ``dtype`` (PEFT keeps the adapters in float32)."""
    return dtype if adapters else TRAINED_DTYPE


def reference_dtype(dtype: str, adapters: bool, engine: str) -> str:
    """The dtype PPO's reference is loaded in: the one the policy's forward reads its own weights in, so that the
    two forwards (under the same autocast: :func:`prepare_frozen`) are bit-identical while the policy is the
    reference. Float32 masters for a policy trained in full under accelerate's autocast, ``dtype`` for a LoRA
    base and under DeepSpeed, whose engines hold ``dtype`` parameters and run without autocast."""
    return dtype if engine == "deepspeed" else trained_dtype(dtype, adapters)


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        console().warning("warning: %s", message)


def _cpu_distributed() -> bool:
    """Whether to build a DDP Accelerator with ``cpu=True``: a multi-process launch (torchrun, ``accelerate launch
    --multi_gpu``, mpirun) on a machine without CUDA, so accelerate runs DDP on CPU with gloo (it would otherwise
    start independent single processes). A launch that started fewer processes than asked is reported here
    (:func:`launch_mismatch`), once per process."""
    warning = launch_mismatch(os.environ)
    if warning is not None:
        _warn_once(warning)
    launched = _launched_world(os.environ) > 1 or os.environ.get("LOCAL_RANK") is not None
    return launched and not torch.cuda.is_available()


def mixed_precision(dtype: str, env: Mapping[str, str]) -> str:
    """accelerate's ``mixed_precision`` for ``model.dtype`` (trained models keep float32 master weights and run
    under autocast; the engines' own bf16/fp16 modes under DeepSpeed and FSDP). A launch that asked for another
    (``accelerate launch --mixed_precision`` or its config) is an error naming both: one would be ignored."""
    wanted = MIXED_PRECISION[dtype]
    launched = env.get("ACCELERATE_MIXED_PRECISION", "no").strip().lower() or "no"
    if launched not in ("no", wanted):
        raise ConfigError(
            f"the launch's mixed precision ({launched}, from accelerate launch --mixed_precision or its config) "
            f"differs from model.dtype ({dtype}); make them agree (model.dtype float32 = no, bfloat16 = bf16, "
            "float16 = fp16)"
        )
    return wanted


def emulated_precision_warning(dtype: str, cuda: bool, native: Mapping[str, bool]) -> str | None:
    """The one-line warning for ``model.dtype`` bfloat16/float16 on a CPU whose matmuls in that dtype are not
    native, else None. ``native``: the CPU's ``avx512_bf16``, ``amx_tile`` and ``amx_fp16`` (torch.cpu). Without
    them torch falls back to slow generic kernels: on a 2-core AVX2 CPU a 512^3 bf16 matmul measured 1.3
    GFLOP/s against 93 in float32 (BENCHMARKS.md), so half precision there slows every phase down instead of
    speeding it up."""
    if cuda or dtype == "float32":
        return None
    if dtype == "bfloat16" and (native.get("avx512_bf16") or native.get("amx_tile")):
        return None
    if dtype == "float16" and native.get("amx_fp16"):
        return None
    extension = "AVX512-BF16 or AMX" if dtype == "bfloat16" else "AMX-FP16"
    return (
        f"model.dtype: {dtype} on a CPU without native {dtype} matmuls (no {extension}): torch emulates them, "
        "many times slower than float32 (BENCHMARKS.md: ~70x on an AVX2 CPU); use model.dtype: float32 here"
    )


def cpu_half_precision_support() -> dict[str, bool]:
    """This CPU's native half-precision matmul extensions, as torch sees them."""
    cpu = torch.cpu
    checks = {
        "avx512_bf16": "_is_avx512_bf16_supported",
        "amx_tile": "_is_amx_tile_supported",
        "amx_fp16": "_is_amx_fp16_supported",
    }
    return {k: bool(getattr(cpu, fn, lambda: False)()) for k, fn in checks.items()}


def _forget_other_precision(precision: str) -> None:
    """accelerate keeps one AcceleratorState per process and refuses a second Accelerator with another mixed
    precision; a process that runs several trainings one after another (a notebook, the demo, the tests) starts
    each from its own settings. The process group (PartialState) is kept."""
    from accelerate.state import AcceleratorState

    shared = AcceleratorState._shared_state
    if shared and shared.get("_mixed_precision") != precision:
        AcceleratorState._reset_state(reset_partial_state=False)


def build_accelerator(
    grad_accum: int = 1,
    trained: Sequence[str] = ("model",),
    dtype: str = "float32",
    frozen: bool = False,
    log_with: list[Any] | None = None,
) -> Accelerator:
    """The Accelerator of a run that trains the models named in ``trained`` (one per optimiser), on the engine
    the launch asked for (:func:`launch_engine`; see the module docstring), in ``dtype``'s mixed precision.
    ``frozen``: the run also has inference-only models (PPO's reference), which under DeepSpeed get a plugin of
    their own (:func:`prepare_frozen`) even beside a single trained model. ``log_with``: the experiment trackers
    (:func:`ppomax.trainers.trackers.log_with`)."""
    quiet_known_library_messages()
    engine = launch_engine(os.environ)
    precision = mixed_precision(dtype, os.environ)
    _forget_other_precision(precision)
    cuda = torch.cuda.is_available()
    slow = emulated_precision_warning(dtype, cuda, {} if cuda else cpu_half_precision_support())
    if slow is not None:
        _warn_once(slow)
    if engine == "fsdp" and not cuda:
        raise ConfigError(
            "an FSDP accelerate config needs CUDA GPUs (accelerate runs FSDP only on GPU devices, so on this "
            "machine it would silently be plain DDP); on CPU use configs/accelerate/zero2.yaml or zero3.yaml "
            "(DeepSpeed runs on CPU) or `accelerate launch --multi_gpu` (DDP)"
        )
    if engine != "deepspeed":
        return Accelerator(
            gradient_accumulation_steps=grad_accum,
            cpu=_cpu_distributed(),
            mixed_precision=precision,
            log_with=log_with or None,
        )
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("a DeepSpeed accelerate config needs DeepSpeed: pip install 'ppomax[deepspeed]'")
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    _deepspeed_logs_to_stderr()
    kwargs: dict[str, Any] = {
        "gradient_accumulation_steps": grad_accum,
        "mixed_precision": precision,
        "log_with": log_with or None,
    }
    if not cuda:
        kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
    if len(trained) > 1 or frozen:
        base = DeepSpeedPlugin()  # the launch's DeepSpeed settings (accelerate config or its json file)
        names = [*trained, FROZEN]
        kwargs["deepspeed_plugins"] = {name: copy.deepcopy(base) for name in names}
    return Accelerator(**kwargs)


def _deepspeed_logs_to_stderr() -> None:
    """DeepSpeed logs to stdout; ppomax's stdout carries only results (the final path), so send them to stderr.
    (Its accelerator is named before it is first imported: :func:`quiet_known_library_messages`.)"""
    from deepspeed.utils import logger

    for handler in logger.handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(sys.stderr)


def configure_deepspeed(
    plugin: Any, micro_batch_size: int, max_grad_norm: float | None, grad_norm_key: str, caller_steps: bool
) -> None:
    """Fill what DeepSpeed needs and cannot infer (no dataloader goes through ``prepare``: ranks shard batches
    themselves): the micro-batch size (bookkeeping only) and the gradient clip, which DeepSpeed applies inside
    its step. A clip the DeepSpeed config sets that differs from ppomax's ``grad_norm_key`` is an error naming
    both: one of them would be silently ignored. ``caller_steps``: ppomax, not DeepSpeed, decides where an
    optimiser step ends (PPO's micro-batches, each model its own backward), with DeepSpeed's unmanaged gradient
    accumulation: every ``step()`` is a boundary."""
    cfg = plugin.deepspeed_config
    if plugin.is_auto("train_micro_batch_size_per_gpu") or "train_micro_batch_size_per_gpu" not in cfg:
        cfg["train_micro_batch_size_per_gpu"] = max(1, micro_batch_size)
    clip = 0.0 if max_grad_norm is None else float(max_grad_norm)
    current = cfg.get("gradient_clipping", "auto")
    if current not in ("auto", None) and float(current) not in (0.0, clip):
        raise ConfigError(
            f"the DeepSpeed config's gradient_clipping ({current}) differs from {grad_norm_key} ({max_grad_norm}); "
            f"set {grad_norm_key} and remove gradient_clipping from the DeepSpeed config"
        )
    cfg["gradient_clipping"] = clip
    if caller_steps:
        cfg["gradient_accumulation_steps"] = 1
        cfg["managed_gradient_accumulation"] = False


def zero_stage(accelerator: Accelerator) -> int:
    """The ZeRO stage of the active DeepSpeed plugin (0 when the run is not on DeepSpeed)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return 0
    return int(accelerator.state.deepspeed_plugin.zero_stage)


def prepare_trained(
    accelerator: Accelerator,
    models: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]],
    micro_batch_size: int,
    max_grad_norm: float | None,
    grad_norm_key: str,
) -> dict[str, tuple[Any, Any]]:
    """``{name: (model, optimizer)}`` prepared for training on the launch's engine, in order (checkpoints keep
    the models in this order). The names are those given to :func:`build_accelerator` (``trained``).

    DDP: one ``prepare`` call. FSDP2: one call per model (accelerate's FSDP2 takes one model and its optimiser per
    call). DeepSpeed: one engine per model, each under its own plugin, with ppomax ending each optimiser step
    (:func:`configure_deepspeed`: ``caller_steps``)."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        out = {}
        for name, (model, optimizer) in models.items():
            accelerator.state.select_deepspeed_plugin(name)
            configure_deepspeed(
                accelerator.state.deepspeed_plugin,
                micro_batch_size,
                max_grad_norm,
                grad_norm_key,
                caller_steps=True,
            )
            out[name] = tuple(accelerator.prepare(model, optimizer))
        accelerator.state.select_deepspeed_plugin(next(iter(models)))
        return out
    if kind == DistributedType.FSDP:
        return {name: tuple(accelerator.prepare(m, o)) for name, (m, o) in models.items()}
    flat = accelerator.prepare(*(x for pair in models.values() for x in pair))
    return {name: (flat[2 * i], flat[2 * i + 1]) for i, name in enumerate(models)}


def prepare_frozen(accelerator: Accelerator, model: torch.nn.Module, micro_batch_size: int) -> Any:
    """An inference-only model (PPO's reference and reward model) on the launch's engine: under ZeRO-3 a DeepSpeed
    inference engine with partitioned parameters (no optimiser, not checkpointed: it never changes), else the
    model itself on this process's device (replicated; FSDP shards only models prepared with an optimiser),
    its forward under the autocast accelerate runs the trained models' forwards in (:func:`autocast_like_trained`).
    """
    if not isinstance(model, torch.nn.Module):  # a LoRA base with adapters off, run by its trained model
        return model.to(accelerator.device)
    if zero_stage(accelerator) != 3:
        return autocast_like_trained(accelerator, model.to(accelerator.device))
    import deepspeed

    plugin = accelerator.state.deepspeed_plugins[FROZEN]
    zero = plugin.deepspeed_config.get("zero_optimization", {})
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": max(1, micro_batch_size),
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3},
    }
    offload = zero.get("offload_param", {})
    if isinstance(offload, dict) and offload.get("device", "none") not in ("none", None):
        config["zero_optimization"]["offload_param"] = {"device": offload["device"]}
    for precision in ("bf16", "fp16"):
        section = plugin.deepspeed_config.get(precision, {})
        if isinstance(section, dict) and section.get("enabled") is True:
            config[precision] = {"enabled": True}
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine


def autocast_like_trained(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with its forward wrapped as accelerate's ``prepare`` wraps a trained model's under native mixed
    precision (autocast, outputs converted to float32), so that a frozen model computes in the same precision
    path as the trained ones; unchanged without native mixed precision (float32, DeepSpeed)."""
    if not accelerator.native_amp:
        return model
    from accelerate.utils import convert_outputs_to_fp32, get_mixed_precision_context_manager

    autocast = get_mixed_precision_context_manager(accelerator.native_amp, accelerator.autocast_handler)
    model.forward = convert_outputs_to_fp32(autocast(model.forward))
    return model


def sharded_forward(accelerator: Accelerator) -> bool:
    """Whether every forward is a collective (ZeRO-3 or FSDP over several processes): generation must then run
    the same number of forward passes on every rank (``generate(synced_gpus=True)``)."""
    from accelerate.utils import DistributedType

    if accelerator.num_processes == 1:
        return False
    return zero_stage(accelerator) == 3 or accelerator.distributed_type == DistributedType.FSDP


@contextlib.contextmanager
def deepspeed_loads_tensors_only(accelerator: Accelerator) -> Iterator[None]:
    """Resume never unpickles code: DeepSpeed reads its checkpoint files with ``torch.load(weights_only=False)``
    (a crafted ``*_optim_states.pt`` would run); inside this context it reads them with ``weights_only=True``,
    allowing only the three DeepSpeed classes its own checkpoints hold (found by loading ZeRO-2 and ZeRO-3
    checkpoints of every kind ppomax writes: fp32, bf16, LoRA)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        yield
        return
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    allowed = [LossScaler, ZeroStageEnum, fragment_address]
    original = TorchCheckpointEngine.load

    def load(self: Any, path: str, map_location: Any = None) -> Any:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)

    TorchCheckpointEngine.load = load
    try:
        yield
    finally:
        TorchCheckpointEngine.load = original
