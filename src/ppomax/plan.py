"""Memory per device of a run before it starts (``ppomax plan``): pure arithmetic on parameter counts, shapes and
the config's batch sizes, per training strategy. Nothing here touches torch; :mod:`ppomax.commands.plan` reads the
model's shape (parameters counted exactly on the meta device) and the config.

The components of one role (policy, critic, reference, reward model; or the one model SFT/RM trains):

* model states: weights, gradients and optimiser states, after ZeRO (Rajbhandari et al. 2020, "ZeRO: Memory
  Optimizations Toward Training Trillion Parameter Models", section 3.1): mixed-precision AdamW holds 2 bytes of
  fp16/bf16 weights, 2 of gradients and K = 12 of optimiser states (fp32 master weights, momentum, variance) per
  trained parameter; stage 2 divides gradients and optimiser states by the number of devices N, stage 3 the
  weights too. fp32 training holds 4 + 4 + 8 (no master copy).
* activations: what autograd saves for the backward of one micro-batch (counted per layer, in the manner of
  Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", section 4, for a
  Llama-style block with SDPA attention), plus the LM head's logits; an estimate, not a measurement.
* the generation KV cache: 2 (K and V) * layers * kv_heads * head_dim * tokens * bytes, with what generate()
  holds beside it (:func:`generation_bytes`).

``bench/plan_memory.py`` checks these numbers against the resident memory of a CPU run of a ~20M-parameter Llama:
model states to within 1%, activations and the generation peak to within about 15% (the plan errs high).

Model states stay allocated for the whole run; activations, the KV cache and inference working sets come and
go phase by phase (generation, scoring, the policy update, the critic update), so the peak of a device is all
roles' model states plus the largest transient (:attr:`StrategyMemory.peak`); a fused PPO update (one epoch over
one minibatch) holds the policy's and the critic's activations at once. CUDA context, allocator fragmentation and
communication buffers (DDP's gradient buckets, up to one more gradient copy) come on top; a CPU run's host memory
is that peak plus the process's own runtime (:func:`cpu_run`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

GIB = 1024**3
STRATEGIES = ("ddp", "zero2", "zero3", "zero3_offload", "lora")
STRATEGY_TITLES = {
    "ddp": "DDP (everything replicated)",
    "zero2": "DeepSpeed ZeRO-2 (gradients and optimiser states sharded)",
    "zero3": "DeepSpeed ZeRO-3 (weights, gradients and optimiser states sharded)",
    "zero3_offload": "DeepSpeed ZeRO-3 with CPU offload of parameters and optimiser",
    "lora": "LoRA (adapters trained, base weights frozen and replicated)",
}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
FP32 = 4
CPU_RUNTIME = int(0.45 * GIB)
"""Host memory a ppomax process holds besides models and tensors: Python, torch, transformers, accelerate, PEFT
and a tokenizer. Measured: the resident set of the CLI after its imports and SmolLM2's 49k-token tokenizer,
before any weights, 0.43 GiB (torch 2.13, transformers 5.25). A CPU run's line only (:func:`cpu_run`); on a GPU
the CUDA context takes device memory instead."""


@dataclass(frozen=True)
class Shape:
    """What the arithmetic needs of one model (read from its config.json and its meta-device parameters)."""

    params: int
    """All parameters, tied ones counted once."""
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    gated_mlp: bool = True
    """SwiGLU-style MLP (gate and up projections), as Llama; False: one up projection and an activation (GPT-2)."""
    lm_head_params: int = 0
    """Parameters of an output embedding not tied to the input one (0 when tied)."""
    largest_module_params: int = 0
    """The most parameters one module owns directly (usually the embedding): ZeRO-3 gathers a module at a time."""
    small_params: int = 0
    """Parameters in tensors of at most 10 * hidden elements (norms, biases): ZeRO-3 keeps those unpartitioned
    (accelerate's ``stage3_param_persistence_threshold: auto`` = 10 * hidden_size)."""


@dataclass(frozen=True)
class Lora:
    """LoRA adapters on ``targets``: ``params`` trainable parameters per model (r * (in + out) per layer)."""

    r: int
    targets: tuple[str, ...]
    params: int


@dataclass(frozen=True)
class Workload:
    """Per-device batch shapes of each phase (rows and tokens per row), from the config."""

    kind: str
    """ppo, sft or rm."""
    dtype: str
    gradient_checkpointing: bool
    train_rows: int
    """Rows per forward/backward (PPO: micro_batch_size or minibatch_size; SFT: batch_size; RM: 2 * pairs)."""
    train_seq: int
    """Tokens per training row (prompt + response)."""
    logit_positions: int
    """Positions per training row whose LM-head logits are kept for the loss (0: no LM head, a value-head RM
    trained without the LM term)."""
    rollout_rows: int = 0
    prompt_tokens: int = 0
    response_tokens: int = 0
    score_rows: int = 0
    """Rows per scoring forward (PPO: micro_batch_size or the rollout batch)."""
    ptx_rows: int = 0
    ptx_seq: int = 0
    """PPO-ptx rows added to each policy micro-batch, and their length (full logits)."""
    sampling_logits: bool = False
    """``generation.logprobs_from: generate``: ``generate()`` returns the float32 logits of every step (a tuple,
    then stacked: two copies at its end), and the rollout holds them until the scoring pass."""
    fused_update: bool = False
    """PPO's update is fused with the scoring pass (one epoch over one minibatch, one micro-batch): the policy's
    and the critic's forwards both run before either backward, so their activations coexist."""


def state_bytes(params: int, trainable: int, dtype: str) -> dict[str, int]:
    """Unsharded model states of one model: weights of all ``params``, gradients and AdamW states of the
    ``trainable`` ones. ZeRO paper section 3.1: mixed precision (bf16/fp16) holds 2 + 2 + 12 bytes per trained
    parameter (fp32 master weights, momentum, variance); fp32 holds 4 + 4 + 8."""
    w = DTYPE_BYTES[dtype]
    optim = (3 if w != FP32 else 2) * FP32
    return {"weights": w * params, "grads": w * trainable, "optim": optim * trainable}


def kv_cache_bytes(layers: int, kv_heads: int, head_dim: int, tokens: int, dtype_bytes: int) -> int:
    """KV cache of ``tokens`` (rows * (prompt + new tokens)): 2 (K and V) * layers * kv_heads * head_dim * tokens
    * bytes (Pope et al. 2022, "Efficiently Scaling Transformer Inference", section 2)."""
    return 2 * layers * kv_heads * head_dim * tokens * dtype_bytes


def generation_bytes(
    s: Shape, rows: int, prompt: int, new: int, act_bytes: int, sampling_logits: bool = False
) -> int:
    """Peak of ``generate()``: the larger of the full KV cache plus one layer's K and V twice (Hugging Face's
    DynamicCache grows by concatenation, so a layer's old and new tensors coexist for a moment) and the prompt's
    cache plus the prefill's working set (:func:`inference_bytes`, logits of the last position only). With
    ``sampling_logits`` (:attr:`Workload.sampling_logits`) the full cache comes with two float32 copies of every
    step's logits."""
    full = kv_cache_bytes(s.layers, s.kv_heads, s.head_dim, rows * (prompt + new), act_bytes)
    logits = 2 * rows * new * s.vocab * FP32 if sampling_logits else 0
    prefill = kv_cache_bytes(s.layers, s.kv_heads, s.head_dim, rows * prompt, act_bytes)
    prefill += inference_bytes(s, rows, prompt, 1, act_bytes)
    return max(full + full // s.layers + logits, prefill)


def layer_saved_elements(s: Shape) -> int:
    """Elements autograd saves per token and decoder layer (SDPA attention, which saves no [T, T] scores).

    Each of the two RMSNorms: its input, the normalised input and the output (3h). Attention: RoPE'd q (h), k
    and v (2 kv_dim) and the SDPA output (h) kept by SDPA, the contiguous copy o_proj keeps (h). Gated MLP: gate
    output, its activation, up output and their product (4I); an ungated MLP: the up output and its activation
    (2I). Korthikanti et al. 2022 (section 4.1) count the same way for GPT blocks (34 s b h bytes at 16 bits)."""
    kv_dim = s.kv_heads * s.head_dim
    attention = s.heads * s.head_dim * 3 + 2 * kv_dim
    mlp = (4 if s.gated_mlp else 2) * s.intermediate
    return 2 * 3 * s.hidden + attention + mlp


def trunk_activation_bytes(s: Shape, tokens: int, act_bytes: int, checkpointing: bool) -> int:
    """Saved activations of the decoder trunk for ``tokens`` (rows * sequence length) tokens, plus the embedding
    output and the final norm (4h). With gradient checkpointing each layer keeps only its input (h) and one
    layer's activations are live again during its recomputation."""
    per_token = s.layers * layer_saved_elements(s) if not checkpointing else s.layers * s.hidden
    if checkpointing:
        per_token += layer_saved_elements(s)
    return tokens * (per_token + 4 * s.hidden) * act_bytes


def vocab_slice_bytes(elements: int, slices: int) -> int:
    """The float32 temporaries of :mod:`ppomax.algos.vocab`'s reductions over the vocabulary, which work through
    the logits ``VOCAB_SLICE_ELEMENTS`` at a time: ``slices`` slice-sized tensors (or the whole, when smaller)."""
    from ppomax.algos.vocab import VOCAB_SLICE_ELEMENTS

    return min(elements, VOCAB_SLICE_ELEMENTS) * FP32 * slices


TRAIN_SLICES = 2
"""Slice-sized float32 temporaries of a training forward's log-probs and their backward (the softmax recomputed
per slice into the gradient; bench/logprob_memory.py --grad: 441 MiB above 384 MiB of logits, 8x256x49152)."""
SCORE_SLICES = 6
"""Those of the scoring pass: log-probs at the temperature and raw, the entropy and the exact KL
(bench/logprob_memory.py --ops scoring: 368 MiB above the logits, 8x256x49152)."""


def logits_bytes(rows: int, positions: int, vocab: int, act_bytes: int) -> int:
    """LM-head logits of a training forward and their backward: the logits (act_bytes), their float32 copy
    under mixed precision (accelerate converts a model's outputs to float32), the gradient of the float32
    logits, of the LM head's output when that is narrower, and the slice temporaries of
    :func:`ppomax.algos.logprobs_from_logits` (no whole float32 copy, exp or softmax of the logits)."""
    n = rows * positions * vocab
    narrow = act_bytes != FP32
    per_logit = act_bytes + FP32 + (FP32 + act_bytes if narrow else 0)
    return n * per_logit + vocab_slice_bytes(n, TRAIN_SLICES)


def inference_bytes(s: Shape, rows: int, seq: int, logit_positions: int, act_bytes: int) -> int:
    """Working set of a no-gradient forward: one layer's live tensors (residual stream and norm output, then
    q/k/v/output or gate/up/activation) and the logits of ``logit_positions`` per row, their float32 copy under
    mixed precision and the slice temporaries of the scoring pass's reductions over the vocabulary."""
    kv_dim = s.kv_heads * s.head_dim
    layer = 2 * s.hidden + max(2 * s.hidden + 2 * kv_dim, 3 * s.intermediate)
    n = rows * logit_positions * s.vocab
    logits = n * (act_bytes + (FP32 if act_bytes != FP32 else 0)) + vocab_slice_bytes(n, SCORE_SLICES)
    return rows * seq * layer * act_bytes + (logits if logit_positions else 0)


def train_activation_bytes(s: Shape, w: Workload, lm_logits: bool) -> int:
    """One training micro-batch of a model of shape ``s``: trunk activations plus, when its loss reads the LM
    head, the logits (PPO's policy: the response positions; SFT: all; RM with beta_rm > 0: all rows), plus the
    PPO-ptx rows (their full logits)."""
    act = DTYPE_BYTES[w.dtype]
    out = trunk_activation_bytes(s, w.train_rows * w.train_seq, act, w.gradient_checkpointing)
    if lm_logits and w.logit_positions:
        out += logits_bytes(w.train_rows, w.logit_positions, s.vocab, act)
    if lm_logits and w.ptx_rows:
        out += trunk_activation_bytes(s, w.ptx_rows * w.ptx_seq, act, w.gradient_checkpointing)
        out += logits_bytes(w.ptx_rows, w.ptx_seq, s.vocab, act)
    return out


@dataclass(frozen=True)
class Role:
    """One model of a run: its shape, whether it is trained, its trainable parameters (full fine-tuning) and
    whether its LM head is used (its logits computed)."""

    name: str
    shape: Shape
    trained: bool
    trainable: int
    lm_logits: bool
    value_head: int = 0
    """Parameters of a value head on top (critic, reward model): hidden + 1."""
    lora: Lora | None = None
    """Adapters when the strategy is LoRA (policy and critic)."""
    shares_policy_base: bool = False
    """The reference under LoRA: the policy's base with its adapters disabled, no weights of its own."""
    shares_critic_base: bool = False
    """The reward model under LoRA when the critic starts from it: the critic's base with its adapters disabled."""
    policy_precision: bool = False
    """The reference: held in the dtype the policy reads its weights in (float32 masters under DDP's autocast)."""
    phase: str = "train"
    """train (activations of a training micro-batch), score (a no-gradient forward) or generate (KV cache)."""
    note: str = ""


@dataclass
class RoleMemory:
    """Bytes per device of one role under one strategy (``cpu``: host memory per device, offload only)."""

    role: str
    weights: int = 0
    grads: int = 0
    optim: int = 0
    activations: int = 0
    kv_cache: int = 0
    cpu: int = 0
    note: str = ""

    @property
    def states(self) -> int:
        return self.weights + self.grads + self.optim

    @property
    def total(self) -> int:
        """States plus the larger of this role's transients (its activations and its KV cache never coexist)."""
        return self.states + max(self.activations, self.kv_cache)


@dataclass
class StrategyMemory:
    strategy: str
    devices: int
    roles: list[RoleMemory] = field(default_factory=list)
    together: tuple[str, ...] = ()
    """Roles whose activations coexist (a fused PPO update: policy and critic, :attr:`Workload.fused_update`)."""

    @property
    def states(self) -> int:
        return sum(r.states for r in self.roles)

    @property
    def transient(self) -> tuple[int, str]:
        """The largest transient of any phase, with the role and component it comes from."""
        best = (0, "")
        for r in self.roles:
            for name, value in (("activations", r.activations), ("kv cache", r.kv_cache)):
                if value > best[0]:
                    best = (value, f"{r.role} {name}")
        both = [r for r in self.roles if r.role in self.together]
        if len(both) > 1 and sum(r.activations for r in both) > best[0]:
            best = (sum(r.activations for r in both), " + ".join(r.role for r in both) + " activations")
        return best

    @property
    def peak(self) -> int:
        """All model states plus the largest transient: the phases (generation, scoring, each update) run one
        after another, so their transients never add up."""
        return self.states + self.transient[0]

    @property
    def cpu(self) -> int:
        return sum(r.cpu for r in self.roles)


def zero3_working_set(s: Shape, w_bytes: int) -> int:
    """Weights a ZeRO-3 device holds beyond its shard: the small persistent tensors (norms, biases) and the
    largest module gathered with accelerate's prefetch bucket (``stage3_prefetch_bucket_size: auto`` =
    0.9 * hidden^2)."""
    return (s.small_params + s.largest_module_params + int(0.9 * s.hidden**2)) * w_bytes


def role_memory(role: Role, strategy: str, devices: int, w: Workload) -> RoleMemory:
    """Bytes per device of ``role`` under ``strategy`` on ``devices`` devices (see the module docstring)."""
    s, n = role.shape, devices
    wb = DTYPE_BYTES[w.dtype]
    params = s.params + role.value_head
    trainable = role.trainable if role.trained else 0
    out = RoleMemory(role.name, note=role.note)
    if strategy == "lora" and (role.shares_policy_base or role.shares_critic_base):
        whose = "policy" if role.shares_policy_base else "critic"
        out.note = f"the {whose}'s base with adapters disabled: no weights of its own"
    elif strategy == "lora" and role.trained and role.lora is not None:
        # PEFT keeps adapters in fp32 (autocast_adapter_dtype) whatever the base dtype: 4 + 4 + 8 bytes each.
        adapters = role.lora.params + role.value_head
        base = state_bytes(s.params, 0, w.dtype)["weights"]
        fp32 = state_bytes(adapters, adapters, "float32")
        out.weights, out.grads, out.optim = base + fp32["weights"], fp32["grads"], fp32["optim"]
    else:
        full = state_bytes(params, trainable, w.dtype)
        if strategy in ("ddp", "lora"):
            # DDP/FSDP mixed precision is accelerate's autocast over float32 parameters (ppomax loads trained
            # models in float32): 4 + 4 + 8 bytes; the DeepSpeed engines hold bf16/fp16 weights (2 + 2 + 12)
            # (the reference as its policy: ppomax.trainers.launch.reference_dtype)
            kept = state_bytes(params, trainable, "float32") if trainable or role.policy_precision else full
            out.weights, out.grads, out.optim = kept["weights"], kept["grads"], kept["optim"]
        elif strategy == "zero2":
            out.weights, out.grads, out.optim = (
                full["weights"],
                -(-full["grads"] // n),
                -(-full["optim"] // n),
            )
        elif strategy == "zero3":
            sharded = (params - s.small_params) * wb
            out.weights = -(-sharded // n) + zero3_working_set(s, wb)
            out.grads, out.optim = -(-full["grads"] // n), -(-full["optim"] // n)
        elif strategy == "zero3_offload":
            # parameters and optimiser live on the host, in shards; the device keeps the working set and, when
            # training, one reduce bucket of gradients (accelerate's reduce_bucket_size: auto = hidden^2)
            out.weights = zero3_working_set(s, wb)
            out.grads = s.hidden**2 * wb if trainable else 0
            host = (params - s.small_params) * wb + (FP32 * trainable if trainable else 0) + full["optim"]
            out.cpu = -(-host // n)
        else:
            raise ValueError(f"unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    act = DTYPE_BYTES[w.dtype]
    if role.phase == "train" and role.trained:
        out.activations = train_activation_bytes(s, w, role.lm_logits)
        if (
            w.kind == "ppo"
        ):  # a trained PPO model is scored too; its update's activations are larger as a rule
            out.activations = max(out.activations, _score(role, w, act))
    else:
        out.activations = _score(role, w, act)
    if role.name == "policy" and w.rollout_rows:
        out.kv_cache = generation_bytes(
            s, w.rollout_rows, w.prompt_tokens, w.response_tokens, act, w.sampling_logits
        )
    return out


def _score(role: Role, w: Workload, act: int) -> int:
    if not w.score_rows:
        return 0
    seq = w.prompt_tokens + w.response_tokens
    positions = w.response_tokens if role.lm_logits else 0
    return inference_bytes(role.shape, w.score_rows, seq, positions, act)


def plan(roles: list[Role], workload: Workload, devices: int) -> dict[str, StrategyMemory]:
    """Every strategy of :data:`STRATEGIES` for ``roles``: bytes per device."""
    if devices < 1:
        raise ValueError("devices must be >= 1")
    together = tuple(r.name for r in roles if r.trained) if workload.fused_update else ()
    return {
        st: StrategyMemory(st, devices, [role_memory(r, st, devices, workload) for r in roles], together)
        for st in STRATEGIES
    }


def cpu_run(plans: dict[str, StrategyMemory], strategy: str) -> dict[str, int | str]:
    """Host memory of a one-process CPU run under ``strategy`` (``ddp``, or ``lora`` with ``model.lora``): its
    models' peak (:attr:`StrategyMemory.peak`) plus the process's own runtime (:data:`CPU_RUNTIME`)."""
    sm = plans[strategy]
    return {"strategy": strategy, "models": sm.peak, "runtime": CPU_RUNTIME, "peak": sm.peak + CPU_RUNTIME}


def format_cpu_run(run: dict[str, int | str]) -> str:
    """The CPU line of ``ppomax plan``'s table."""
    models, runtime, peak = (int(run[k]) for k in ("models", "runtime", "peak"))
    return (
        f"CPU run of this config (one process, {run['strategy']} as above): {gib(peak):.2f} GiB of host memory = "
        f"{gib(models):.2f} (peak above) + {gib(runtime):.2f} the process's own runtime (Python, torch, "
        "transformers, the tokenizer)\n"
    )


def gib(n: int) -> float:
    return n / GIB


def format_plan(
    plans: dict[str, StrategyMemory], header: list[str], gpu_memory_gib: float | None = None
) -> str:
    """One table per strategy: role x component in GiB per device, the peak, and whether it fits."""
    cols = ("weights", "grads", "optim", "activations", "kv_cache")
    lines = list(header)
    for st, sm in plans.items():
        lines += ["", f"{STRATEGY_TITLES[st]}, {sm.devices} device(s): GiB per device"]
        head = f"  {'role':<10}" + "".join(f"{c.replace('_', ' '):>13}" for c in cols) + f"{'total':>10}"
        offload = st == "zero3_offload"
        lines.append(head + (f"{'host':>10}" if offload else ""))
        for r in sm.roles:
            cells = "".join(f"{gib(getattr(r, c)):>13.3f}" for c in cols)
            row = f"  {r.role:<10}{cells}{gib(r.total):>10.3f}" + (f"{gib(r.cpu):>10.3f}" if offload else "")
            lines.append(row + (f"  ({r.note})" if r.note else ""))
        value, source = sm.transient
        verdict = ""
        if gpu_memory_gib is not None:
            spare = gpu_memory_gib - gib(sm.peak)
            verdict = f": {'fits' if spare >= 0 else 'does NOT fit'} in {gpu_memory_gib:g} GiB ({spare:+.1f})"
        lines.append(
            f"  peak {gib(sm.peak):.3f} GiB = model states {gib(sm.states):.3f} + largest transient "
            f"{gib(value):.3f} ({source}){verdict}"
        )
        if offload:
            lines.append(f"  host memory: {gib(sm.cpu):.3f} GiB per device (times the devices of a node)")
    return "\n".join(lines) + "\n"


def plan_json(plans: dict[str, StrategyMemory], gpu_memory_gib: float | None = None) -> dict:
    """The plan for machines: bytes per device, per strategy and role."""
    out = {}
    for st, sm in plans.items():
        value, source = sm.transient
        entry = {
            "devices": sm.devices,
            "roles": {
                r.role: {**{k: v for k, v in asdict(r).items() if k != "role"}, "total": r.total}
                for r in sm.roles
            },
            "model_states": sm.states,
            "largest_transient": value,
            "largest_transient_source": source,
            "peak": sm.peak,
            "peak_gib": round(gib(sm.peak), 4),
            "host": sm.cpu,
        }
        if gpu_memory_gib is not None:
            entry["fits"] = gib(sm.peak) <= gpu_memory_gib
        out[st] = entry
    return out
