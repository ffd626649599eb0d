"""The four PPO models (policy, reference, critic, reward model) and the forward passes the trainer runs on them.

* Policy: ``model.policy`` (the SFT model; paper 5.3.3: a policy initialised without SFT fails), with LoRA
  adapters when ``model.lora`` is set.
* Reference: a separate frozen copy, from ``model.reference`` or the policy's path. Under LoRA, when
  ``model.reference`` is unset or the policy's own path, no copy is loaded: the reference is the policy's base
  with its adapters disabled (:class:`ppomax.models.AdaptersOff`), called like any model.
* Critic (paper 5.3.3, ``ppo.critic_init``): an explicit ``model.critic`` checkpoint (a sequence classifier with
  one label: a trained critic or reward model, ppomax's, TRL's or the Hub's), else a copy of the reward model
  (``reward_model``), the SFT backbone with a fresh head (``sft``), or a freshly initialised backbone of the
  policy's architecture with a fresh head (``random``). Its values are its head on every position.
  Under LoRA with ``model.lora.critic``, adapters go on the critic's own backbone (it shares nothing with the
  policy); its value head is always fully trained. None at all with a critic-free ``ppo.advantage_estimator``.
* Reward model: ``model.reward``, a sequence classifier with one label (ppomax's ``train-rm``, TRL's reward trainer,
  a Hub reward model), frozen; it scores a response where transformers' classifier pools (before a trailing EOS
  when EOS is the pad token); optional when reward functions are set. Critic and reward model must share the
  policy's tokenizer (they read its token ids).
  Under LoRA, when the critic is the reward model plus adapters, the reward model is the critic's base with its
  adapters disabled and a frozen copy of the reward model's head (:class:`ppomax.models.RewardOnCriticBase`).

Dropout is switched off in policy and critic (LoRA's adapter dropout included): the PPO ratio of the first
minibatch must be exactly 1, and the old log-probs/values of the scoring pass must be those the update sees.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict, TypeVar

import torch
from accelerate.utils import extract_model_from_parallel
from torch import Tensor

from ppomax.algos import entropy_from_logits, logprobs_from_logits, scoring_reductions
from ppomax.config import PPOConfig
from ppomax.data import pad_id_of
from ppomax.errors import ConfigError
from ppomax.models import (
    AdaptersOff,
    RewardOnCriticBase,
    ValueHeadModel,
    check_same_tokens,
    check_vocab,
    enable_activation_checkpointing,
    init_causal_lm_from_config,
    load_causal_lm,
    position_ids_from_mask,
    with_adapters,
)
from ppomax.models.adapter_dir import is_peft_model
from ppomax.models.lm_head import (
    ResponseLogits,
    ResponsePositions,
    lm_head_on,
    logits_at_targets,
    narrowable_head,
)
from ppomax.models.saving import causal_lm_of
from ppomax.trainers.common import load_run_tokenizer
from ppomax.trainers.inputs import (
    Inputs,
    adopt_causal_lm,
    adopt_value_head,
    copy_causal_lm,
    random_causal_lm_like,
)
from ppomax.trainers.launch import ONE_PROCESS, Engine, reference_dtype, trained_dtype

from .packing import PackedChunk, pack

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ppomax.models.adapter_dir import CausalLM

    from .experience import Experience

_Model = TypeVar("_Model", bound=torch.nn.Module)


class _Loading(TypedDict):
    """How a model is loaded: the dtype of its weights, and whether its repository's own code may run."""

    dtype: str
    trust_remote_code: bool


@dataclass
class PPOModels:
    tokenizer: PreTrainedTokenizerBase
    policy: CausalLM
    reference: CausalLM | AdaptersOff
    critic: ValueHeadModel | None
    """None without a critic (``ppo.advantage_estimator`` other than gae)."""
    reward_model: ValueHeadModel | RewardOnCriticBase | None


def disable_dropout(model: torch.nn.Module) -> None:
    """Zero every dropout probability (modules and the ``*dropout``/``*pdrop`` config fields HF attention reads)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        cfg = getattr(m, "config", None)
        if cfg is not None:
            for key in list(vars(cfg)):
                if (key.endswith("dropout") or key.endswith("pdrop")) and isinstance(
                    getattr(cfg, key), float
                ):
                    setattr(cfg, key, 0.0)
        for attr in ("attention_dropout", "dropout"):
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, 0.0)


def _freeze(model: _Model) -> _Model:
    model.eval()
    model.requires_grad_(False)
    return model


def build_critic(
    cfg: PPOConfig,
    policy_path: str,
    critic_path: str | None,
    given: Inputs | None = None,
    untrained: CausalLM | None = None,
) -> ValueHeadModel:
    """The critic per ``model.critic`` / ``ppo.critic_init`` (see the module docstring); from the objects
    ``given`` where there are (``untrained``: a copy of a policy object, for an SFT-initialised critic)."""
    m, seed, given = cfg.model, cfg.seed, given or Inputs()
    lora = m.lora if m.lora is not None and m.lora.critic else None
    # trained in full: float32 master weights; under LoRA the frozen base stays in model.dtype
    kw: _Loading = {
        "dtype": trained_dtype(m.dtype, lora is not None),
        "trust_remote_code": m.trust_remote_code,
    }
    init = cfg.ppo.critic_init
    if critic_path:
        base, obj = given.base_path("model.critic", critic_path), given.get("model.critic")
        if obj is not None:
            critic = adopt_value_head(obj, kw["dtype"], "model.critic")
        else:
            critic = ValueHeadModel.from_pretrained(critic_path, key="model.critic", **kw)
    elif init == "reward_model":
        assert m.reward, "check_runnable guarantees model.reward for critic_init=reward_model"
        base, obj = given.base_path("model.reward", m.reward), given.get("model.reward")
        if obj is not None:  # the critic trains its own copy
            critic = adopt_value_head(copy.deepcopy(obj), kw["dtype"], "model.reward")
        else:
            critic = ValueHeadModel.from_pretrained(m.reward, key="model.reward", **kw)
    elif init == "sft":
        base = given.base_path("model.policy", policy_path)
        if untrained is not None:
            critic = ValueHeadModel(copy_causal_lm(untrained, kw["dtype"], "model.policy"), seed=seed)
        else:
            critic = ValueHeadModel.from_causal_lm(policy_path, seed=seed, key="model.policy", **kw)
    else:  # config validation refuses adapters on this random backbone
        obj = given.get("model.policy")
        if obj is not None:
            backbone = random_causal_lm_like(obj, kw["dtype"], seed)
        else:
            backbone = init_causal_lm_from_config(policy_path, seed=seed, key="model.policy", **kw)
        base, critic = given.base_path("model.policy", policy_path), ValueHeadModel(backbone, seed=seed)
    return with_adapters(critic, lora, base, seed=seed + 1)


def critic_base_is_reward_model(cfg: PPOConfig) -> bool:
    """Whether the critic is the reward model plus LoRA adapters (``model.lora.critic``, the critic loaded from
    ``model.reward``): its frozen base is then the reward model's backbone, which is not loaded a second time
    (:class:`~ppomax.models.RewardOnCriticBase`)."""
    m = cfg.model
    if m.reward is None or m.lora is None or not m.lora.critic or not cfg.ppo.uses_critic:
        return False
    source = m.critic or (m.reward if cfg.ppo.critic_init == "reward_model" else None)
    return source is not None and Path(source).resolve() == Path(m.reward).resolve()


def build_reference(
    cfg: PPOConfig,
    policy: CausalLM,
    given: Inputs | None = None,
    untrained: CausalLM | None = None,
    engine: Engine = ONE_PROCESS,
) -> CausalLM | AdaptersOff:
    """The frozen reference: the policy's base with adapters off (LoRA, and ``model.reference`` unset or the
    policy's path), else a model loaded from ``model.reference`` or the policy's path (or the object given for
    ``model.reference``; ``untrained``: a copy of the policy object, taken before it trains), in the dtype the policy
    reads its weights in on the run's ``engine`` (:func:`~ppomax.trainers.launch.reference_dtype`: identical
    weights, identical log-probs)."""
    m, given = cfg.model, given or Inputs()
    assert m.policy
    same = m.reference is None or Path(m.reference).resolve() == Path(m.policy).resolve()
    if m.lora is not None and same:
        assert is_peft_model(policy), "with_adapters put adapters on the policy"
        return AdaptersOff(policy)
    dtype = reference_dtype(m.dtype, m.lora is not None, engine)
    key = "model.reference" if m.reference else "model.policy"
    obj = given.get("model.reference") if m.reference else untrained
    if obj is not None:
        return _freeze(adopt_causal_lm(obj, dtype, key))
    return _freeze(
        load_causal_lm(m.reference or m.policy, dtype=dtype, trust_remote_code=m.trust_remote_code, key=key)
    )


def load_models(cfg: PPOConfig, given: Inputs | None = None, engine: Engine = ONE_PROCESS) -> PPOModels:
    """Load everything ``cfg.model`` names (or take the objects ``given`` for its keys), the critic only where
    ``ppo.advantage_estimator`` needs one (a resumed run then loads its checkpoint's weights into policy and critic;
    the reference and the reward model always come from the config: the reference is the *original* policy), for
    the run's ``engine`` (default: one process)."""
    m, given = cfg.model, given or Inputs()
    # trained models in float32 (master weights; model.dtype is their autocast dtype), the reward model (and a
    # LoRA base) in model.dtype, the reference in the policy's (build_reference)
    kw: _Loading = {"dtype": m.dtype, "trust_remote_code": m.trust_remote_code}
    trained: _Loading = {**kw, "dtype": trained_dtype(m.dtype, m.lora is not None)}
    assert m.policy
    tokenizer, tokenizer_key = load_run_tokenizer(cfg, given)
    policy, untrained = given.get("model.policy"), None
    if policy is not None:
        policy = adopt_causal_lm(policy, trained["dtype"], "model.policy")
        if (m.reference is None and m.lora is None) or (cfg.ppo.uses_critic and _critic_from_sft(cfg)):
            untrained = copy.deepcopy(policy)  # what the reference or an SFT critic start from
    else:
        policy = load_causal_lm(m.policy, **trained, key="model.policy")
    policy = with_adapters(policy, m.lora, given.base_path("model.policy", m.policy), seed=cfg.seed)
    critic = build_critic(cfg, m.policy, m.critic, given, untrained) if cfg.ppo.uses_critic else None
    # after the critic, which copies `untrained`: the reference may keep it itself
    reference = build_reference(cfg, policy, given, untrained, engine)
    reward_model: ValueHeadModel | RewardOnCriticBase | None = None
    if critic is not None and critic_base_is_reward_model(cfg):
        # the head is copied before any update: the critic's own head trains away from it
        reward_model = RewardOnCriticBase(critic, copy.deepcopy(critic.value_head))
    elif (given_reward := given.get("model.reward")) is not None:
        reward_model = _freeze(adopt_value_head(given_reward, m.dtype, "model.reward"))
    elif m.reward:
        reward_model = _freeze(ValueHeadModel.from_pretrained(m.reward, key="model.reward", **kw))
    # every model reads the policy's token ids (those loaded from model.policy's files are checked once); the
    # reward model on the critic's base is checked as the critic, loaded from model.reward
    reward_weights = reward_model.critic if isinstance(reward_model, RewardOnCriticBase) else reward_model
    checked: dict[str, torch.nn.Module | AdaptersOff | None] = {
        "model.policy": policy,
        "model.reward": reward_weights,
    }
    checked |= {"model.reference": reference} if m.reference else {}
    checked |= {"model.critic": critic} if m.critic else {}
    for key, model in checked.items():
        if model is not None and not isinstance(model, AdaptersOff):
            check_vocab(model, tokenizer, key, tokenizer_key)
    for key in ("model.reward", "model.critic"):
        path = getattr(m, key.split(".")[1])
        if path and checked.get(key) is not None:
            check_same_tokens(path, tokenizer, key, tokenizer_key, m.trust_remote_code)
    if critic is not None:
        critic.use_pad_token(pad_id_of(tokenizer))
    for model in (policy, critic) if critic is not None else (policy,):
        disable_dropout(model)
        if m.gradient_checkpointing:
            enable_activation_checkpointing(model)
            model.train()  # HF checkpoints only in train mode; dropout is already off
        else:
            model.eval()
    return PPOModels(tokenizer, policy, reference, critic, reward_model)


def _critic_from_sft(cfg: PPOConfig) -> bool:
    return not cfg.model.critic and cfg.ppo.critic_init == "sft"


class Forward:
    """Forward passes over a batch laid out as in :class:`~ppomax.ppo.experience.Experience`.

    Padded (the default), every call passes position ids counted from the attention mask (as ``generate`` did),
    so a row's outputs do not depend on the padding around it.

    Packed (``pack``: ``ppo.pack_sequences``), the rows' real tokens are packed into fewer rows
    (:mod:`ppomax.ppo.packing`) and the model is called with their position ids, no attention mask and no cache
    (the two conditions under which transformers' attention keeps packed sequences apart); the outputs are
    gathered back into the padded layout, so every caller reads the same ``[B, R, ...]`` tensors either way.
    :func:`check_packed_forwards` checks once that a model's attention honours the packing.

    Either way the LM head runs only on the positions whose logits are read, those before the rows' real
    response tokens (:class:`~ppomax.models.lm_head.ResponsePositions`; not the prompt, not the padding after a
    short response), through the model's own forward (:func:`lm_head_on`), and :meth:`response_logits` returns
    them as they are, [1, K, V] (:class:`~ppomax.models.lm_head.ResponseLogits`): :meth:`logprobs`,
    :meth:`entropy` and the exact KL compute on those K positions and put their [K] results in the [B, R]
    layout (zeros past a row's response, off the response mask). A model without the hook's conditions (an
    output embedding module and ``logits_to_keep``) gets its head on every packed position, or padded on the
    ``R + 1`` last columns of each row where it takes ``logits_to_keep``: [B, R, V] logits.
    """

    def __init__(self, temperature: float, pack: bool = False) -> None:
        self.temperature = temperature
        self.pack = pack

    def response_logits(self, model: torch.nn.Module | AdaptersOff, batch: Experience) -> ResponseLogits:
        """The logits predicting ``batch``'s real response tokens (from columns P-1 .. P+R-2 of their rows)."""
        if self.pack:
            return self._packed_logits(model, batch)
        return self._padded_logits(model, batch)

    @staticmethod
    def _padded_logits(model: torch.nn.Module | AdaptersOff, batch: Experience) -> ResponseLogits:
        seqs, mask = batch.sequences, batch.attention_mask
        r = batch.response_width
        head, keeps = _lm_head(model)
        positions = ResponsePositions.padded(batch.response_lens, batch.prompt_width, seqs.shape[1])
        positions = positions.to(seqs.device)
        # without a head to narrow, the head on the R + 1 last columns where the model takes logits_to_keep
        keep = 0 if head is not None else r + 1
        with lm_head_on(head, positions, seqs.shape) as selected:
            out = model(
                input_ids=seqs,
                attention_mask=mask,
                position_ids=position_ids_from_mask(mask),
                use_cache=False,
                **({"logits_to_keep": keep} if keeps else {}),
            )
        logits = selected(out.logits)
        if logits is not None:
            return ResponseLogits(logits, positions)
        return ResponseLogits(out.logits[:, -(r + 1) : -1])

    @staticmethod
    def _packed_logits(model: torch.nn.Module | AdaptersOff, batch: Experience) -> ResponseLogits:
        packed = _pack(batch)
        head, keeps = _lm_head(model)
        kwargs: dict[str, Any] = {"logits_to_keep": 0} if keeps else {}
        with lm_head_on(head, packed.response_positions, packed.input_ids.shape) as selected:
            out = model(
                input_ids=packed.input_ids,
                attention_mask=None,
                position_ids=packed.position_ids,
                use_cache=False,
                **kwargs,
            )
        logits = selected(out.logits)
        if logits is not None:
            return ResponseLogits(logits, packed.response_positions)
        return ResponseLogits(packed.gather(out.logits))

    def logprobs(self, logits: ResponseLogits, labels: Tensor, raw: bool = False) -> Tensor:
        """[B, R] log-probs of the response tokens ``labels`` [B, R] under the logits the ratio/KL use
        (temperature-scaled unless ``raw``)."""
        t = 1.0 if raw else self.temperature
        return logits.rows(logprobs_from_logits(logits.values, logits.tokens(labels), t))

    def entropy(self, logits: ResponseLogits) -> Tensor:
        """[B, R] entropy of the temperature-scaled policy at each response token."""
        return logits.rows(entropy_from_logits(logits.values, self.temperature))

    def scoring_stats(
        self, logits: ResponseLogits | None, ref_logits: ResponseLogits | None, labels: Tensor
    ) -> dict[str, Tensor]:
        """[B, R] each, no gradient, of :func:`ppomax.algos.scoring_reductions` under the convention of
        :meth:`logprobs`: the policy's ``logprobs``, ``raw_logprobs`` and ``entropy`` and, with the reference's
        logits of the same rows, ``ref_logprobs``, ``ref_raw_logprobs`` and the exact KL ``exact_kl`` (the
        quantity the sampled KL estimators estimate, without their noise and without the bias of tokens drawn
        with top-p and a repetition penalty rather than from the policy); ``logits`` None: the reference's
        log-probs alone."""
        if logits is None:
            if ref_logits is None:
                raise ValueError("scoring_stats needs the policy's or the reference's logits")
            ref_out = scoring_reductions(
                ref_logits.values.detach(), ref_logits.tokens(labels), self.temperature, entropy=False
            )
            return {f"ref_{name}": ref_logits.rows(value) for name, value in ref_out.items()}
        ref = None if ref_logits is None else ref_logits.like(logits).values.detach()
        out = scoring_reductions(logits.values.detach(), logits.tokens(labels), self.temperature, ref)
        return {name: logits.rows(value) for name, value in out.items()}

    def values(self, critic: torch.nn.Module, batch: Experience) -> Tensor:
        """[B, R] critic values V(s_j): the value read at the column before response token j."""
        if self.pack:
            return self._packed_values(critic, batch)
        return self._padded_values(critic, batch)

    @staticmethod
    def _padded_values(critic: torch.nn.Module, batch: Experience) -> Tensor:
        v = critic(batch.sequences, batch.attention_mask).values
        return v[:, batch.prompt_width - 1 : -1]

    @staticmethod
    def _packed_values(critic: torch.nn.Module, batch: Experience) -> Tensor:
        packed = _pack(batch)
        return packed.gather(critic(packed.input_ids, None, position_ids=packed.position_ids).values)

    @staticmethod
    def lm_loss_inputs(model: torch.nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """(logits [1, K, V], labels [1, K], mask [1, K]) of the K trained tokens of a right-padded SFT batch
        (PPO-ptx), the LM head on their positions only (:func:`~ppomax.models.lm_head.logits_at_targets`)."""
        mask = batch["attention_mask"]
        logits, labels = logits_at_targets(
            model,
            batch["labels"][:, 1:] != -100,
            input_ids=batch["input_ids"],
            attention_mask=mask,
            position_ids=position_ids_from_mask(mask),
        )
        return logits, labels, torch.ones_like(labels, dtype=torch.bool)


def _lm_head(model: torch.nn.Module | AdaptersOff) -> tuple[torch.nn.Module | None, bool]:
    """:func:`~ppomax.models.lm_head.narrowable_head` of the model inside the engine's or AdaptersOff's wrapper."""
    return narrowable_head(
        extract_model_from_parallel(model.model if isinstance(model, AdaptersOff) else model)
    )


def _pack(batch: Experience) -> PackedChunk:
    return pack(batch.sequences, batch.prompt_lens, batch.response_lens, batch.prompt_width)


# (prompt, response) lengths of the batch the packing checks run: packed into rows of 8, the two short
# sequences share the second row, the last one starting mid-row
_CHECK_LENGTHS = ((3, 5), (2, 2), (1, 2))
PACKING_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6}
"""Largest packed-vs-padded gap (per-token log-probs, values) check_packed_forwards accepts, by the dtype the
forward computes in (:func:`computed_dtypes`); 0.05 for 16-bit ones (their rounding, not a leak between sequences,
which moves a real model's log-probs by nats)."""


def packing_check_batch(vocab_size: int, device: torch.device, avoid_token: int | None = None) -> Experience:
    """The tiny batch the packing checks run (:func:`check_packed_forwards`, and the reward model's
    ``check_packed_scores``): rows of :data:`_CHECK_LENGTHS` of random tokens (seed 0) below ``vocab_size``, laid
    out as the experience buffer lays them out; ``avoid_token`` (a pad id) replaced by the next id."""
    from .experience import Experience

    p_w, r_w = max(p for p, _ in _CHECK_LENGTHS), max(r for _, r in _CHECK_LENGTHS)
    mask = torch.zeros(len(_CHECK_LENGTHS), p_w + r_w, dtype=torch.long)
    for i, (p, r) in enumerate(_CHECK_LENGTHS):
        mask[i, p_w - p : p_w + r] = 1
    tokens = torch.randint(0, vocab_size, mask.shape, generator=torch.Generator().manual_seed(0))
    if avoid_token is not None:
        tokens[tokens == avoid_token] = (avoid_token + 1) % vocab_size
    return Experience(
        sequences=(tokens * mask).to(device),
        attention_mask=mask.to(device),
        response_mask=mask[:, p_w:].bool().to(device),
        prompt_width=p_w,
        prompt_lens=torch.tensor([p for p, _ in _CHECK_LENGTHS]),
        response_lens=torch.tensor([r for _, r in _CHECK_LENGTHS]),
        truncated=torch.zeros(len(_CHECK_LENGTHS), dtype=torch.bool, device=device),
    )


GapAcrossRanks = Callable[[Tensor], Tensor]
"""A process's packed-vs-padded gap (a float32 scalar) -> the largest of every process's (NaN if any is NaN), so
that all processes refuse packing together: one that went on alone would wait forever in the next collective
(ZeRO-3 and FSDP gather parameters in every forward)."""


@torch.no_grad()
def check_packed_forwards(
    fwd: Forward,
    models: dict[str, torch.nn.Module | AdaptersOff | None],
    vocab_size: int,
    device: torch.device,
    across_ranks: GapAcrossRanks | None = None,
) -> None:
    """Check once that each model's packed forward gives its padded forward's per-token log-probs (causal LMs)
    or values (``model.critic``) on a tiny batch of random tokens below ``vocab_size`` and every model's
    embedding count, within the :data:`PACKING_TOLERANCE` of the dtype the forwards compute in; else a
    one-line ConfigError naming ``ppo.pack_sequences`` and the model's attention implementation (on every
    process, by ``across_ranks``). An attention that ignores packed position ids (a model's own code, a custom
    kernel) lets a sequence attend to the one packed before it, which silently changes every output."""
    present = {key: model for key, model in models.items() if model is not None}
    rows = [vocab_size, *(_embedding_rows(model) for model in present.values())]
    batch = packing_check_batch(min(rows), device)
    on = batch.response_mask
    for key, model in present.items():
        inner = model.model if isinstance(model, AdaptersOff) else model
        with computed_dtypes(inner) as dtypes:
            if isinstance(model, ValueHeadModel):
                padded, packed = fwd._padded_values(model, batch), fwd._packed_values(model, batch)
                what, output = "values", padded.dtype
            else:
                logits = fwd._padded_logits(model, batch)
                padded = fwd.logprobs(logits, batch.responses_ids, raw=True)
                packed = fwd.logprobs(fwd._packed_logits(model, batch), batch.responses_ids, raw=True)
                what, output = "log-probs", logits.values.dtype
        dtype = least_precise([*dtypes, output])
        check_packing_gap(key, what, padded[on], packed[on], dtype, inner, across_ranks)


def _embedding_rows(model: torch.nn.Module | AdaptersOff) -> int:
    """The rows of the embedding table of ``model`` (an engine's wrapper, a value-head model, a PEFT model or
    the base under its adapters)."""
    inner = extract_model_from_parallel(model.model if isinstance(model, AdaptersOff) else model)
    # num_embeddings, not the weight's shape: ZeRO-3 partitions the weight (its local shape is empty)
    rows: int = getattr(causal_lm_of(inner).get_input_embeddings(), "num_embeddings")  # noqa: B009 (typed)
    return rows


@contextmanager
def computed_dtypes(model: object) -> Iterator[set[torch.dtype]]:
    """The floating dtypes of the tensors ``model``'s leaf modules output within the block: the precision its
    forward computes in, whatever its weights' dtype (under autocast, float32 weights give bfloat16 matmuls;
    accelerate then converts the outputs back to float32)."""
    seen: set[torch.dtype] = set()

    def record(_module: torch.nn.Module, _inputs: Any, output: Any) -> None:
        if isinstance(output, Tensor) and output.is_floating_point():
            seen.add(output.dtype)

    modules = model.modules() if isinstance(model, torch.nn.Module) else ()
    handles = [m.register_forward_hook(record) for m in modules if next(m.children(), None) is None]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def least_precise(dtypes: Iterable[torch.dtype]) -> torch.dtype:
    """The floating dtype of ``dtypes`` with the coarsest rounding (the largest machine epsilon)."""
    return max(dtypes, key=lambda d: torch.finfo(d).eps)


def check_packing_gap(
    key: str,
    what: str,
    padded: Tensor,
    packed: Tensor,
    dtype: torch.dtype,
    model: object,
    across_ranks: GapAcrossRanks | None = None,
) -> None:
    """A one-line ConfigError naming ``ppo.pack_sequences``, ``key`` and ``model``'s attention implementation
    where ``packed`` outputs are further from ``padded`` than :data:`PACKING_TOLERANCE` allows for ``dtype``, the
    dtype they were computed in (or NaN), on this process or, through ``across_ranks``, on any."""
    tolerance = PACKING_TOLERANCE.get(dtype, 0.05)
    gap_here = (padded.float() - packed.float()).abs().max()
    gap = float(across_ranks(gap_here) if across_ranks is not None else gap_here)
    if not gap <= tolerance:  # NaN too
        impl = getattr(getattr(model, "config", None), "_attn_implementation", None) or "unknown"
        raise ConfigError(
            f"ppo.pack_sequences: {key}'s packed forward gives {what} {gap:.3g} away from its padded "
            f"forward (tolerance {tolerance:g}): its attention implementation ({impl}) does not keep packed "
            "sequences apart; load the model with transformers' sdpa, eager or flash_attention_2 attention, "
            "or set ppo.pack_sequences: false"
        )
