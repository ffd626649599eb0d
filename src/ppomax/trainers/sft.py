"""Supervised fine-tuning (and plain causal-LM pretraining) of a Hugging Face causal LM.

``objective: sft`` (default): the loss is the mean negative log-likelihood of the response tokens only; the
prompt, the human turns of an HH dialogue and padding carry label ``-100`` (:func:`ppomax.data.tokenize_sft`).
``objective: pretrain``: records ``{"text": ...}`` are plain text (HH dialogues included, as text), the loss
covers every token, and each text is split into blocks of ``max_prompt_tokens + max_response_tokens`` tokens.
``init_from_config: true`` starts from random weights built from ``model.policy/config.json`` (the demo
pretrains a tiny Llama from scratch this way); otherwise ``model.policy`` must hold trained weights.

The paper's SFT recipe (5.1) is a cosine schedule decaying to 10% of the peak learning rate: set
``optim.schedule: cosine`` (``optim.min_lr_ratio`` defaults to 0.1). Validation loss and perplexity are logged
every ``logging.eval_every`` steps and at the end, on ``data.valid`` or a ``data.valid_fraction`` hold-out.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from ppomax.algos import lm_nll
from ppomax.config import SFTConfig
from ppomax.data import (
    IGNORE_INDEX,
    DataError,
    LoadStats,
    SFTCollator,
    Source,
    pad_id_of,
    read_records,
    special_prefix,
)
from ppomax.data import sft_features as data_sft_features
from ppomax.data.io import handle_error
from ppomax.data.sources import as_source
from ppomax.errors import ConfigError
from ppomax.models import (
    check_vocab,
    enable_activation_checkpointing,
    init_causal_lm_from_config,
    load_causal_lm,
    model_summary,
    with_adapters,
)
from ppomax.models.lm_head import logits_at_targets
from ppomax.trainers.launch import TRAINED_DTYPE, trained_dtype

from .common import (
    data_files,
    eval_shards,
    load_run_tokenizer,
    load_train_valid,
    log_chat_format,
    reduce_sums,
    to_device,
)
from .inputs import Inputs, TrainResult, adopt_causal_lm, bind
from .loop import LoopSpec, train_loop
from .run import RunContext, open_run

if TYPE_CHECKING:
    from peft import LoraConfig
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from ppomax.data.io import OnError
    from ppomax.data.sources import SourceSpec
    from ppomax.models.adapter_dir import CausalLM


def sft_features(
    source: Source,
    tokenizer: PreTrainedTokenizerBase,
    cfg: SFTConfig,
    stats: LoadStats,
    progress: str | None = None,
) -> list[dict[str, Any]]:
    """Tokenised examples ``{"input_ids", "labels"}`` of a source, for the configured objective."""
    d = cfg.data
    if cfg.objective == "pretrain":
        return pretrain_features(
            source, tokenizer, d.max_prompt_tokens + d.max_response_tokens, d.on_bad_line, stats
        )
    return data_sft_features(
        source,
        tokenizer,
        format=d.chat_format,
        max_prompt_tokens=d.max_prompt_tokens,
        max_response_tokens=d.max_response_tokens,
        on_error=d.on_bad_line,
        stats=stats,
        num_proc=d.num_proc,
        progress=progress,
    )


def pretrain_features(
    source: SourceSpec,
    tokenizer: PreTrainedTokenizerBase,
    block: int,
    on_error: OnError = "fail",
    stats: LoadStats | None = None,
) -> list[dict[str, Any]]:
    """Plain-text records ``{"text": str}``: BOS (if the tokenizer adds one) + text + EOS, cut into blocks of
    ``block`` tokens (no packing across texts, so no example attends to another); loss on every token."""
    stats = stats if stats is not None else LoadStats()
    texts: list[str] = []
    for rec in read_records(source, on_error, stats):
        text = rec.value.get("text") if isinstance(rec.value, dict) else None
        if not isinstance(text, str) or not text.strip():
            handle_error(
                rec.error("pretraining record needs a non-empty string field 'text'"), on_error, stats
            )
            continue
        texts.append(text)
        stats.loaded += 1
    if not texts:
        raise DataError(as_source(source).name, None, "no usable pretraining texts", stats.summary())
    prefix = special_prefix(tokenizer)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    feats = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        seq = [*prefix, *ids, *eos]
        if len(seq) > block:
            stats.notes["text split into blocks"] += 1
        for start in range(0, len(seq), block):
            chunk = seq[start : start + block]
            if len(chunk) >= 2:  # one token predicts nothing
                feats.append({"input_ids": chunk, "labels": list(chunk)})
    return feats


def _targets(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B, T-1], True where the token at t + 1 is trained on (read from the logits at t)."""
    return batch["labels"][:, 1:] != IGNORE_INDEX


def _target_nll(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    targets: torch.Tensor,
    reduction: Literal["mean", "sum"] = "mean",
) -> torch.Tensor:
    """The NLL of the ``targets`` [B, T-1] tokens, the LM head on their positions only (not the prompts' nor the
    padding's)."""
    logits, labels = logits_at_targets(
        model, targets, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    )
    return lm_nll(logits, labels, torch.ones_like(labels, dtype=torch.bool), reduction=reduction)


def sft_counts(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The unit of the SFT loss's mean: target tokens (see :func:`ppomax.trainers.loop.accumulate`)."""
    return {"tokens": _targets(batch).sum()}


def sft_loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], weights: dict[str, torch.Tensor] | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """Mean NLL over the trainable target tokens, times ``weights["tokens"]`` (this micro-batch's share of the
    step's target tokens; 1 alone). Metrics: ``loss``; ``target_tokens`` (per micro-batch)."""
    w = weights or {}
    mask = _targets(batch)
    loss = w.get("tokens", 1.0) * _target_nll(model, batch, mask)
    metrics = {"loss": loss.detach(), "target_tokens": mask.sum().float() * w.get("batches", 1.0)}
    return loss, metrics, batch["attention_mask"].sum()


def evaluate_lm(
    ctx: RunContext,
    model: torch.nn.Module,
    feats: list[dict[str, Any]],
    collate: SFTCollator,
    batch_size: int,
) -> dict[str, float]:
    """Token-weighted validation NLL over all ranks (every example exactly once) and its perplexity."""
    nll, count = 0.0, 0.0
    for idx, real in eval_shards(len(feats), batch_size, ctx):
        batch = to_device(collate([feats[i] for i in idx]), ctx.device)
        mask = _targets(batch)
        batch_nll = _target_nll(model, batch, mask, reduction="sum")
        if real:
            nll += float(batch_nll)
            count += float(mask.sum())
    tot = reduce_sums(ctx.accelerator, {"nll": nll, "count": count})
    loss = tot["nll"] / max(tot["count"], 1.0)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": tot["count"]}


def _load_model(cfg: SFTConfig, inputs: Inputs) -> CausalLM:
    m = cfg.model
    assert m.policy is not None  # SFTTrainer refuses a config without it
    given = inputs.get("model.policy")
    if given is not None:
        if cfg.init_from_config:
            raise ConfigError(
                "init_from_config, model (argument): init_from_config builds random weights from a config.json, "
                "and the model object has its own; set init_from_config: false"
            )
        return adopt_causal_lm(given, trained_dtype(m.dtype, m.lora is not None), "model.policy")
    if cfg.init_from_config:
        return init_causal_lm_from_config(
            m.policy, TRAINED_DTYPE, m.trust_remote_code, seed=cfg.seed, key="model.policy"
        )
    dtype = trained_dtype(m.dtype, m.lora is not None)
    return load_causal_lm(m.policy, dtype, m.trust_remote_code, key="model.policy")


class SFTTrainer:
    """Supervised fine-tuning (or pretraining, ``objective: pretrain``) from Python, as ``ppomax train-sft`` runs it.

    ``config``: an :class:`~ppomax.config.SFTConfig`, a dict of its sections, or a YAML file's path (None: the
    defaults). The other arguments stand for config keys (:mod:`ppomax.trainers.inputs`): ``model`` (a causal LM
    object, or its directory / Hub id: ``model.policy``), ``processing_class`` (a tokenizer: ``model.tokenizer``;
    by default the model's), ``train_dataset`` / ``eval_dataset`` (a ``datasets.Dataset``, a list of records, or a
    data source: ``data.train`` / ``data.valid``), ``peft_config`` (a ``peft.LoraConfig``: ``model.lora``);
    ``callbacks``: objects with ``on_step_end`` / ``on_evaluate`` / ``on_save``. ``resume``: continue the run in
    ``logging.out_dir`` (``allow_data_change``: even if its data changed); ``overwrite``: replace the run there
    (:mod:`ppomax.trainers.run`).

    The run directory is checked and the model and data loaded here; :meth:`train` trains and returns a
    :class:`~ppomax.trainers.inputs.TrainResult`. A model object is trained in place."""

    def __init__(
        self,
        config: SFTConfig | dict[str, Any] | str | Path | None = None,
        *,
        model: str | Path | PreTrainedModel | None = None,
        processing_class: str | Path | PreTrainedTokenizerBase | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        peft_config: LoraConfig | None = None,
        callbacks: list[Any] | None = None,
        resume: bool = False,
        overwrite: bool = False,
        allow_data_change: bool = False,
    ) -> None:
        arguments = {
            "model": model,
            "processing_class": processing_class,
            "train_dataset": train_dataset,
            "eval_dataset": eval_dataset,
        }
        cfg, inputs = bind("sft", config, arguments, peft_config=peft_config, callbacks=callbacks)
        if not cfg.model.policy:
            raise ConfigError("model.policy: required (the base model directory to fine-tune)")
        if not cfg.data.train:
            raise ConfigError(
                "data.train: required (SFT examples, or {'text'} records with objective: pretrain)"
            )
        self.cfg, self.inputs = cfg, inputs
        self.ctx = ctx = open_run(
            cfg,
            "sft",
            resume=resume,
            overwrite=overwrite,
            allow_data_change=allow_data_change,
            data=data_files(cfg, "train", "valid", inputs=inputs),
            callbacks=inputs.callbacks,
        )
        try:
            self._load()
        except BaseException:
            ctx.close()
            raise

    def _load(self) -> None:
        cfg, ctx, inputs = self.cfg, self.ctx, self.inputs
        tokenizer, tokenizer_key = load_run_tokenizer(cfg, inputs)
        model = _load_model(cfg, inputs)
        check_vocab(model, tokenizer, "model.policy", tokenizer_key)
        base = inputs.base_path("model.policy", cfg.model.policy or "")
        model = with_adapters(model, cfg.model.lora, base, seed=cfg.seed)
        if cfg.model.gradient_checkpointing:
            enable_activation_checkpointing(model)
        size = model_summary(model)
        ctx.print(
            f"model: {cfg.model.policy} ({size['params']:,} parameters, {size['trainable_params']:,} trained)"
        )
        if cfg.objective != "pretrain":
            log_chat_format(ctx, cfg.data.chat_format, tokenizer)

        train, valid = load_train_valid(ctx, sft_features, tokenizer, cfg, "data")
        ctx.print(f"{len(train)} training and {len(valid)} validation examples")

        collate = SFTCollator(pad_id_of(tokenizer))
        self.model, self.processing_class = model, tokenizer
        self.train_dataset, self.eval_dataset = train, valid
        self.spec = LoopSpec(
            lengths=[len(f["input_ids"]) for f in train],
            make_batch=lambda idx: to_device(collate([train[i] for i in idx]), ctx.device),
            loss_fn=sft_loss,
            counts=sft_counts,
            batch_size=cfg.batch_size,
            max_tokens=None,
            evaluate=(lambda mdl: evaluate_lm(ctx, mdl, valid, collate, cfg.batch_size)) if valid else None,
        )

    @property
    def out_dir(self) -> Path:
        return self.ctx.out_dir

    @property
    def accelerator(self) -> Any:
        return self.ctx.accelerator

    def train(self) -> TrainResult:
        """Train to the end (from the checkpoint when resuming); the final model is saved in ``out_dir/final``. A
        SIGINT/SIGTERM saves a checkpoint and raises :class:`ppomax.errors.RunStopped`."""
        ctx = self.ctx
        try:
            model, step = train_loop(ctx, self.model, self.spec)
            final = ctx.save_model(model, self.processing_class, ctx.out_dir / "final")
        finally:
            ctx.close()
        ctx.print(f"saved {final}")
        self.model = ctx.accelerator.unwrap_model(model)
        return TrainResult(
            ctx.out_dir, final, self.model, self.processing_class, dict(ctx.metrics.latest), step
        )


def train_sft(
    cfg: SFTConfig, resume: bool = False, overwrite: bool = False, allow_data_change: bool = False
) -> Path:
    """Run SFT (or pretraining) as configured; returns the final model directory ``out_dir/final``
    (:class:`SFTTrainer` from the config alone)."""
    result = SFTTrainer(cfg, resume=resume, overwrite=overwrite, allow_data_change=allow_data_change).train()
    assert result.model_dir is not None
    return result.model_dir
