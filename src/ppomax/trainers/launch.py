"""How a launch is read and its Accelerator built: one process, DDP, DeepSpeed ZeRO or FSDP.

``accelerate launch --config_file configs/accelerate/<engine>.yaml`` tells every process which engine to use
through environment variables (``ACCELERATE_USE_DEEPSPEED``, ``ACCELERATE_USE_FSDP``, the DeepSpeed fields);
:func:`launch_engine` reads them and :func:`build_accelerator` honours them or refuses, never downgrading a
sharded config to something else in silence. A run reads its engine from its Accelerator (:class:`Engine`):
everything that differs between engines (preparing models, who steps, gradient sync, saving, checkpoints) asks
it. What each engine does on a machine without CUDA:

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
import dataclasses
import importlib.util
import logging
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator

from ppomax.console import console
from ppomax.errors import ConfigError

from .quiet import quiet_known_library_messages

if TYPE_CHECKING:
    from ppomax.models.lora import AdaptersOff, RewardOnCriticBase

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


@dataclasses.dataclass(frozen=True)
class Engine:
    """The run's engine and what ppomax does differently on it, read from the run's Accelerator
    (:meth:`of`): the rest of ppomax asks these facts and methods instead of comparing accelerate's
    ``distributed_type`` or looking for DeepSpeed plugins itself. A new engine is its facts here and its accelerate
    config (configs/accelerate/).

    ``name``: ``ddp`` (a single process included), ``deepspeed`` or ``fsdp`` (:func:`launch_engine`);
    ``zero_stage``: DeepSpeed's ZeRO stage (0 elsewhere); ``processes``: the run's number of processes."""

    name: str = "ddp"
    zero_stage: int = 0
    processes: int = 1

    @classmethod
    def of(cls, accelerator: Accelerator) -> Engine:
        from accelerate.utils import DistributedType

        kind = accelerator.distributed_type
        if kind == DistributedType.DEEPSPEED:
            stage = int(accelerator.state.deepspeed_plugin.zero_stage)
            return cls("deepspeed", stage, accelerator.num_processes)
        return cls("fsdp" if kind == DistributedType.FSDP else "ddp", 0, accelerator.num_processes)

    @property
    def owns_step(self) -> bool:
        """The prepared model is the engine's own (DeepSpeed): its backward accumulates until its step (ppomax
        ends every optimiser step: unmanaged gradient accumulation, :func:`configure_deepspeed`), and its step
        clips by its ``gradient_clipping``, measures the global gradient norm and skips a non-finite step itself
        (weights and optimiser state untouched). Elsewhere accelerate's backward, ppomax's clip, the optimiser's
        step."""
        return self.name == "deepspeed"

    @property
    def autocasts(self) -> bool:
        """Mixed precision is accelerate's autocast over float32 master weights (DDP, FSDP); DeepSpeed's engines
        hold ``model.dtype`` parameters and run without autocast."""
        return self.name != "deepspeed"

    @property
    def shards_parameters(self) -> bool:
        """Each process holds a shard of a trained model's parameters (ZeRO-3, FSDP)."""
        return self.zero_stage == 3 or self.name == "fsdp"

    @property
    def sharded_forward(self) -> bool:
        """Every forward is a collective (parameters sharded over several processes): generation must then run
        the same number of forward passes on every rank (``generate(synced_gpus=True)``)."""
        return self.processes > 1 and self.shards_parameters

    @property
    def gathers_for_save(self) -> bool:
        """A trained model's full weights are the engine's to gather (``accelerator.get_state_dict``, a
        collective: every rank calls it): DeepSpeed and FSDP hold them their own way."""
        return self.name in ("deepspeed", "fsdp")

    @property
    def syncs_each_backward(self) -> bool:
        """Every backward all-reduces the gradients over the processes (DDP, FSDP) unless inside
        :meth:`no_sync`; a DeepSpeed engine reduces them at its step."""
        return self.processes > 1 and not self.owns_step

    def no_sync(self, accelerator: Accelerator, *models: Any) -> contextlib.AbstractContextManager[Any]:
        """The gradient all-reduce of ``models``' backwards deferred (all but a step's last micro-batch): the
        gradients accumulate locally and the last backward reduces their sum."""
        if not self.syncs_each_backward:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        for model in models:
            stack.enter_context(accelerator.no_sync(model))
        return stack

    def full_state_dict(
        self, accelerator: Accelerator, model: torch.nn.Module
    ) -> dict[str, torch.Tensor] | None:
        """The prepared ``model``'s full weights gathered where the engine holds them its own way
        (:attr:`gathers_for_save`; a collective: call it on every rank), else None (the model's own)."""
        return accelerator.get_state_dict(model) if self.gathers_for_save else None

    def reading_checkpoint(self) -> contextlib.AbstractContextManager[None]:
        """The context a checkpoint is loaded in (``accelerator.load_state``): under DeepSpeed, whose checkpoint
        files are pickles, tensors only (:func:`deepspeed_loads_tensors_only`)."""
        return deepspeed_loads_tensors_only() if self.name == "deepspeed" else contextlib.nullcontext()

    def discard_gradients(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Forget the gradients the prepared ``model`` accumulated since its last step, without stepping (a
        skipped step). A DeepSpeed engine keeps them in its ZeRO optimiser's own buffers, which ``zero_grad``
        leaves: they are dropped as the engine's own step drops them when it skips a step
        (:func:`_drop_deepspeed_gradients`)."""
        if self.owns_step:
            _drop_deepspeed_gradients(model)
        else:
            optimizer.zero_grad(set_to_none=True)

    def prepare_trained(
        self,
        accelerator: Accelerator,
        models: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]],
        micro_batch_size: int,
        max_grad_norm: float | None,
        grad_norm_key: str,
    ) -> dict[str, tuple[Any, Any]]:
        """``{name: (model, optimizer)}`` prepared for training, in order (checkpoints keep the models in this
        order). Under DeepSpeed with several models the names are those given to :func:`build_accelerator`
        (``trained``).

        DDP: one ``prepare`` call. FSDP2: one call per model (accelerate's FSDP2 takes one model and its optimiser
        per call). DeepSpeed: one engine per model, each under its own plugin where there are several, with
        ppomax ending each optimiser step (:func:`configure_deepspeed`)."""
        if self.name == "deepspeed":
            state = accelerator.state
            named = isinstance(state.deepspeed_plugins, dict)  # one plugin per model (build_accelerator)
            out = {}
            for name, (model, optimizer) in models.items():
                if named:
                    state.select_deepspeed_plugin(name)
                configure_deepspeed(state.deepspeed_plugin, micro_batch_size, max_grad_norm, grad_norm_key)
                out[name] = tuple(accelerator.prepare(model, optimizer))
            if named:
                state.select_deepspeed_plugin(next(iter(models)))
            return out
        if self.name == "fsdp":
            return {name: tuple(accelerator.prepare(m, o)) for name, (m, o) in models.items()}
        flat = accelerator.prepare(*(x for pair in models.values() for x in pair))
        return {name: (flat[2 * i], flat[2 * i + 1]) for i, name in enumerate(models)}

    def prepare_frozen(
        self,
        accelerator: Accelerator,
        model: torch.nn.Module | AdaptersOff | RewardOnCriticBase,
        micro_batch_size: int,
    ) -> Any:
        """An inference-only model (PPO's reference and reward model): under ZeRO-3 a DeepSpeed inference engine
        with partitioned parameters (no optimiser, not checkpointed: it never changes), else the model itself on
        this process's device (replicated; FSDP shards only models prepared with an optimiser), its forward under
        the autocast accelerate runs the trained models' forwards in (:func:`autocast_like_trained`)."""
        if not isinstance(model, torch.nn.Module):  # a LoRA base with adapters off, run by its trained model
            return model.to(accelerator.device)
        if self.zero_stage != 3:
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


# The engine of a run in one process, without accelerate launch.
ONE_PROCESS = Engine()


def reference_dtype(dtype: str, adapters: bool, engine: Engine) -> str:
    """The dtype PPO's reference is loaded in: the one the policy's forward reads its own weights in, so that the
    two forwards (under the same autocast: :meth:`Engine.prepare_frozen`) are bit-identical while the policy is
    the reference. Float32 masters for a policy trained in full under accelerate's autocast, ``dtype`` for a LoRA
    base and where the engine holds ``dtype`` parameters without autocast (:attr:`Engine.autocasts`)."""
    return trained_dtype(dtype, adapters) if engine.autocasts else dtype


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
    trained: Sequence[str] = ("model",),
    dtype: str = "float32",
    frozen: bool = False,
    log_with: list[Any] | None = None,
) -> Accelerator:
    """The Accelerator of a run that trains the models named in ``trained`` (one per optimiser), on the engine
    the launch asked for (:func:`launch_engine`; see the module docstring), in ``dtype``'s mixed precision.
    ``frozen``: the run also has inference-only models (PPO's reference), which under DeepSpeed get a plugin of
    their own (:meth:`Engine.prepare_frozen`) even beside a single trained model. ``log_with``: the experiment trackers
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
            cpu=_cpu_distributed(),
            mixed_precision=precision,
            log_with=log_with or None,
        )
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("a DeepSpeed accelerate config needs DeepSpeed: pip install 'ppomax[deepspeed]'")
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    _deepspeed_logs_to_stderr()
    kwargs: dict[str, Any] = {
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
    plugin: Any, micro_batch_size: int, max_grad_norm: float | None, grad_norm_key: str
) -> None:
    """Fill what DeepSpeed needs and cannot infer (no dataloader goes through ``prepare``: ranks shard batches
    themselves): the micro-batch size (bookkeeping only) and the gradient clip, which DeepSpeed applies inside
    its step. A clip the DeepSpeed config sets that differs from ppomax's ``grad_norm_key`` is an error naming
    both: one of them would be silently ignored. ppomax, not DeepSpeed, decides where an optimiser step ends
    (:mod:`ppomax.trainers.optimised`: a step's micro-batches, each model its own backward), with DeepSpeed's
    unmanaged gradient accumulation: every ``step()`` is a boundary."""
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
    cfg["gradient_accumulation_steps"] = 1
    cfg["managed_gradient_accumulation"] = False


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


def _drop_deepspeed_gradients(engine: Any) -> None:
    """What a DeepSpeed engine's step does with the step's gradients when it skips the step (ZeRO's overflow
    path in deepspeed/runtime/zero: stage_1_and_2.py and stage3.py ``step``), without the step: DeepSpeed has
    no public call for it. ZeRO-1/2 accumulate each backward's reduced gradients in ``all_grad_tensors``
    (``averaged_gradients`` once final) or, offloaded, in CPU buffers counted by ``micro_step_id``; ZeRO-3 in
    ``averaged_gradients`` and its partitions, overwritten after ``zero_grad`` (``micro_step_id`` 0).
    tests/test_optimised.py checks that the step after a skipped one holds its own gradient only."""
    zero = engine.optimizer
    zero.zero_grad(set_to_none=True)
    engine.zero_grad()
    stage = engine.zero_optimization_stage()
    if stage in (1, 2):
        from deepspeed.runtime.zero.stage_1_and_2 import INITIAL_MICRO_STEP_ID

        zero._release_preflattened_grad_buffers()
        if zero.cpu_offload:
            zero.reset_cpu_buffers()
            zero._offload_accumulated_param_ids = set()
        for buffers in (zero.averaged_gradients, zero.all_grad_tensors):
            for key in buffers:
                buffers[key] = None
        zero.micro_step_id = INITIAL_MICRO_STEP_ID
    elif stage == 3:
        if zero.offload_optimizer:
            zero.reset_cpu_buffers()
        else:
            zero.averaged_gradients = {}


@contextlib.contextmanager
def deepspeed_loads_tensors_only() -> Iterator[None]:
    """Resume never unpickles code: DeepSpeed reads its checkpoint files with ``torch.load(weights_only=False)``
    (a crafted ``*_optim_states.pt`` would run); inside this context it reads them with ``weights_only=True``,
    allowing only the three DeepSpeed classes its own checkpoints hold (found by loading ZeRO-2 and ZeRO-3
    checkpoints of every kind ppomax writes: fp32, bf16, LoRA)."""
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
