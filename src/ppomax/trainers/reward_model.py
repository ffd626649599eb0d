"""Reward-model training (paper section 4, eq. 2).

``L = -lambda * E[log sigmoid(r(x, y_w) - r(x, y_l))] + beta_rm * NLL(y_w | x)``: the pairwise ranking loss
plus an LM (imitation) loss on the preferred response through the same trunk (``beta_rm: 0`` turns it off;
the paper uses 1). The reward is the value head's output at the last token of prompt + response
(:class:`ppomax.models.ValueHeadModel`: where transformers' sequence classifier reads it). Batches are fixed-size
(``batch_size`` pairs per process) or token-balanced (``max_tokens_per_batch`` padded tokens per process, both rows
of each pair counted; paper 4.2).

Every ``logging.eval_every`` steps and at the end: validation accuracy, mean margin and ranking loss. The model with
the best validation accuracy is kept in ``out_dir/best``, the last one in ``out_dir/final`` (both
``*ForSequenceClassification`` checkpoints that plain transformers and TRL load; what :func:`train_rm` returns: the paper (4.4) found accuracy alone a poor criterion for the RM PPO should use).
At the end the test split (``data.test``, else the validation split) is scored and
``rm_margins_<split>.png`` (paper fig. 2) and ``rm_eval_<split>.json`` are written
(:mod:`ppomax.trainers.reward_model_report`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from ppomax.algos import lm_nll, pairwise_rm_loss
from ppomax.config import RMConfig
from ppomax.data import LoadStats, PreferenceCollator, Source, feature_length, pad_id_of, pair_features
from ppomax.errors import ConfigError
from ppomax.models import (
    ValueHeadModel,
    check_vocab,
    enable_activation_checkpointing,
    model_summary,
    with_adapters,
)
from ppomax.models.lm_head import TargetPositions
from ppomax.trainers.launch import trained_dtype

from .common import (
    data_files,
    eval_shards,
    load_features,
    load_run_tokenizer,
    load_train_valid,
    log_chat_format,
    to_device,
)
from .inputs import Inputs, TrainResult, adopt_causal_lm, adopt_value_head, bind
from .loop import LoopSpec, train_loop
from .reward_model_report import margin_summary, write_rm_eval
from .run import RunContext, open_run

if TYPE_CHECKING:
    from peft import LoraConfig
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def rm_features(
    source: Source,
    tokenizer: PreTrainedTokenizerBase,
    cfg: RMConfig,
    stats: LoadStats,
    progress: str | None = None,
) -> list[dict[str, Any]]:
    d = cfg.data
    return pair_features(
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


def rm_forward(
    model: torch.nn.Module, batch: dict[str, Any], beta_rm: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(chosen scores [B], rejected scores [B], chosen-response NLL or None) of a PreferenceCollator batch."""
    n = batch["num_pairs"]
    if beta_rm <= 0:
        out = model(batch["input_ids"], batch["attention_mask"])
        return out.scores[:n], out.scores[n:], None
    # the LM head only where eq. 2's LM term reads it: the position before each chosen-response token (logits at
    # t predict token t + 1), not the prompts, the rejected rows or the padding
    targets = _lm_targets(batch)
    out = model(batch["input_ids"], batch["attention_mask"], return_lm_logits=True, lm_targets=targets)
    labels = TargetPositions.of(targets).labels(batch["input_ids"])
    nll = lm_nll(out.lm_logits, labels, torch.ones_like(labels, dtype=torch.bool))
    return out.scores[:n], out.scores[n:], nll


def _lm_targets(batch: dict[str, Any]) -> torch.Tensor:
    """[B, T-1] mask of the chosen responses' target tokens (the LM term's tokens)."""
    return batch["lm_mask"][: batch["num_pairs"], 1:]


def rm_counts(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The units of eq. 2's two means: pairs (ranking term) and chosen-response tokens (LM term)."""
    return {"pairs": torch.tensor(float(batch["num_pairs"])), "lm_tokens": _lm_targets(batch).sum()}


# Which unit each pairwise_rm_loss metric is a mean over (its weight under accumulation).
_RM_METRIC_UNITS = {"rm_loss": "pairs", "accuracy": "pairs", "margin_mean": "pairs", "lm_loss": "lm_tokens"}


def make_rm_loss(beta_rm: float, lam: float):
    """Eq. 2 on a PreferenceCollator batch; with ``weights`` (see :func:`ppomax.trainers.loop.accumulate`) the
    ranking term is weighted by the batch's share of the step's pairs and the LM term by its share of the
    chosen tokens. Metrics: pairwise_rm_loss's, ``loss``, ``pairs`` (per micro-batch)."""

    def rm_loss(
        model: torch.nn.Module, batch: dict[str, Any], weights: dict[str, torch.Tensor] | None = None
    ):
        w = weights or {}
        chosen, rejected, nll = rm_forward(model, batch, beta_rm)
        loss, metrics = pairwise_rm_loss(
            chosen,
            rejected,
            nll,
            beta_rm=beta_rm,
            lam=lam,
            pair_weight=w.get("pairs", 1.0),
            lm_weight=w.get("lm_tokens", 1.0),
        )
        metrics = {k: v * w.get(_RM_METRIC_UNITS[k], 1.0) for k, v in metrics.items()}
        pairs = torch.tensor(float(batch["num_pairs"]), device=loss.device) * w.get("batches", 1.0)
        return loss, {**metrics, "loss": loss.detach(), "pairs": pairs}, batch["attention_mask"].sum()

    return rm_loss


def rm_margins(
    ctx: RunContext,
    model: torch.nn.Module,
    feats: list[dict[str, Any]],
    collate: PreferenceCollator,
    batch_size: int,
    desc: str = "eval",
) -> list[float]:
    """r(chosen) - r(rejected) of every pair (all ranks' shards gathered, in example order), with a progress bar
    (``desc``) on the main process when ``logging.progress``."""
    local: list[tuple[int, float]] = []
    shards = eval_shards(len(feats), batch_size, ctx)
    show = ctx.is_main and ctx.cfg.logging.progress
    for idx, real in tqdm(shards, desc=desc, unit="batch", leave=False, disable=not show):
        batch = to_device(collate([feats[i] for i in idx]), ctx.device)
        chosen, rejected, _ = rm_forward(model, batch, beta_rm=0.0)
        if real:
            local += list(zip(idx, (chosen - rejected).float().cpu().tolist(), strict=True))
    pairs = gather_object(local) if ctx.world > 1 else local
    return [m for _, m in sorted(pairs)]


def evaluate_rm(margins: list[float]) -> dict[str, float]:
    """Validation accuracy, mean margin and ranking loss of eq. 2 from the pairs' margins (:func:`rm_margins`)."""
    s = margin_summary(margins)
    m = torch.tensor(margins, dtype=torch.float64)
    # the margins are r_w - r_l already: the ranking term of eq. 2 against a zero "rejected" reward
    rm_loss = float(pairwise_rm_loss(m, torch.zeros_like(m))[1]["rm_loss"]) if len(margins) else float("nan")
    return {
        "accuracy": s["accuracy"],
        "margin_mean": s["margin_mean"],
        "rm_loss": rm_loss,
        "pairs": s["pairs"],
    }


def _load_model(cfg: RMConfig, inputs: Inputs) -> ValueHeadModel:
    """The reward model to train: a value head on ``model.policy`` (a fresh, seeded head on a causal LM; a
    ValueHeadModel object goes on training with its own)."""
    m = cfg.model
    dtype = trained_dtype(m.dtype, m.lora is not None)
    given = inputs.get("model.policy")
    if isinstance(given, ValueHeadModel):
        return adopt_value_head(given, dtype, "model.policy")
    if given is not None:
        return ValueHeadModel(adopt_causal_lm(given, dtype, "model.policy"), seed=cfg.seed)
    assert m.policy
    return ValueHeadModel.from_causal_lm(
        m.policy, dtype, m.trust_remote_code, seed=cfg.seed, key="model.policy"
    )


class RewardTrainer:
    """Reward-model training (eq. 2) from Python, as ``ppomax train-rm`` runs it.

    ``config``: an :class:`~ppomax.config.RMConfig`, a dict of its sections, or a YAML file's path (None: the
    defaults). The other arguments stand for config keys (:mod:`ppomax.trainers.inputs`): ``model`` (a causal LM
    object, which gets a fresh value head; a ``ValueHeadModel`` object, trained on; or a directory / Hub id:
    ``model.policy``), ``processing_class`` (``model.tokenizer``; by default the model's), ``train_dataset`` /
    ``eval_dataset`` / ``test_dataset`` (preference pairs: a ``datasets.Dataset``, a list of records, or a data
    source: ``data.train`` / ``data.valid`` / ``data.test``), ``peft_config`` (a ``peft.LoraConfig``:
    ``model.lora``); ``callbacks``, ``resume``, ``overwrite``, ``allow_data_change`` as for
    :class:`~ppomax.trainers.sft.SFTTrainer`.

    :meth:`train` returns a :class:`~ppomax.trainers.inputs.TrainResult` whose ``model`` is the trained
    ``ValueHeadModel`` (``model_dir``: ``out_dir/final``; the best validation accuracy's is in ``out_dir/best``)."""

    def __init__(
        self,
        config: RMConfig | dict[str, Any] | str | Path | None = None,
        *,
        model: str | Path | PreTrainedModel | ValueHeadModel | None = None,
        processing_class: str | Path | PreTrainedTokenizerBase | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        test_dataset: Any = None,
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
            "test_dataset": test_dataset,
        }
        cfg, inputs = bind("rm", config, arguments, peft_config=peft_config, callbacks=callbacks)
        assert isinstance(cfg, RMConfig)
        if not cfg.model.policy:
            raise ConfigError("model.policy: required (the SFT / base model the reward model starts from)")
        if not cfg.data.train:
            raise ConfigError("data.train: required (preference pairs)")
        self.cfg, self.inputs = cfg, inputs
        self.ctx = ctx = open_run(
            cfg,
            "rm",
            resume=resume,
            overwrite=overwrite,
            allow_data_change=allow_data_change,
            data=data_files(cfg, "train", "valid", "test", inputs=inputs),
            callbacks=inputs.callbacks,
        )
        try:
            self._load()
        except BaseException:
            ctx.close()
            raise

    @property
    def out_dir(self) -> Path:
        return self.ctx.out_dir

    @property
    def accelerator(self) -> Any:
        return self.ctx.accelerator

    def _load(self) -> None:
        cfg, ctx, inputs = self.cfg, self.ctx, self.inputs
        m = cfg.model
        tokenizer, tokenizer_key = load_run_tokenizer(cfg, inputs)
        model = _load_model(cfg, inputs)
        check_vocab(model, tokenizer, "model.policy", tokenizer_key)
        model.use_pad_token(pad_id_of(tokenizer))  # the saved classifier pools where training read the scores
        ctx.layout.update(model.match_checkpoint(ctx.resumed_layout()))
        model = with_adapters(model, m.lora, inputs.base_path("model.policy", m.policy or ""), seed=cfg.seed)
        if m.gradient_checkpointing:
            enable_activation_checkpointing(model)
        if cfg.beta_rm == 0:
            model.freeze_lm_head()
        size = model_summary(model)
        ctx.print(
            f"reward model on {m.policy} ({size['params']:,} parameters, {size['trainable_params']:,} trained)"
        )
        log_chat_format(ctx, cfg.data.chat_format, tokenizer)

        train, valid = load_train_valid(ctx, rm_features, tokenizer, cfg, "pairs")
        self.test, self.test_name = valid, "valid"
        if cfg.data.test:
            self.test = load_features(ctx, rm_features, "test", tokenizer, cfg, "test pairs")
            self.test_name = "test"
        ctx.print(
            f"{len(train)} training, {len(valid)} validation, {len(self.test) if cfg.data.test else 0} test pairs"
        )
        self.model, self.processing_class = model, tokenizer
        self.train_dataset, self.eval_dataset = train, valid
        self.collate = collate = PreferenceCollator(pad_id_of(tokenizer))
        self.best_dir = best_dir = ctx.out_dir / "best"
        self.extra = extra = {"best_accuracy": -1.0, "best_step": 0}
        # the latest evaluation's margins: train_loop's last one scores the final model, which is then the test
        # split's score too when there is no data.test (the validation pairs are not scored twice)
        self.last_valid: list[list[float]] = []
        last_valid = self.last_valid

        def evaluate(mdl: torch.nn.Module) -> dict[str, float]:
            last_valid[:] = [rm_margins(ctx, mdl, valid, collate, cfg.batch_size, desc="valid")]
            return evaluate_rm(last_valid[0])

        def on_eval(step: int, result: dict[str, float], mdl: torch.nn.Module) -> None:
            if result["accuracy"] > extra["best_accuracy"]:
                extra.update(best_accuracy=result["accuracy"], best_step=step)
                ctx.save_model(mdl, tokenizer, best_dir)
                if ctx.is_main:
                    info = {"step": step, **result}
                    (best_dir / "ppomax_eval.json").write_text(
                        json.dumps(info, indent=2) + "\n", encoding="utf-8"
                    )

        self.spec = LoopSpec(
            lengths=[feature_length(f) for f in train],
            make_batch=lambda idx: to_device(collate([train[i] for i in idx]), ctx.device),
            loss_fn=make_rm_loss(cfg.beta_rm, cfg.rm_lambda),
            counts=rm_counts,
            batch_size=cfg.batch_size,
            # the budget counts both rows of a pair; token_balanced_batches sees one (the longer) per pair
            max_tokens=max(1, cfg.max_tokens_per_batch // 2) if cfg.max_tokens_per_batch else None,
            evaluate=evaluate if valid else None,
            on_eval=on_eval,
            extra_state=extra,
        )

    def train(self) -> TrainResult:
        """Train to the end (from the checkpoint when resuming), save ``out_dir/final``, score the test split (or
        the validation split) into ``rm_eval_<split>.json`` and ``rm_margins_<split>.png``. A SIGINT/SIGTERM
        saves a checkpoint and raises :class:`ppomax.errors.RunStopped`."""
        ctx, test = self.ctx, self.test
        try:
            model, last_step = train_loop(ctx, self.model, self.spec)
            final = ctx.save_model(model, self.processing_class, ctx.out_dir / "final")
            if (
                test
            ):  # also in a run resumed after its last checkpoint (its end is done again, from the checkpoint)
                self._score_test(model, final, last_step)
        finally:
            ctx.close()
        best = f" (best: {self.best_dir}, step {self.extra['best_step']})" if self.eval_dataset else ""
        ctx.print(f"saved {final}{best}")
        self.model = ctx.accelerator.unwrap_model(model)
        return TrainResult(
            ctx.out_dir, final, self.model, self.processing_class, dict(ctx.metrics.latest), last_step
        )

    def _score_test(self, model: torch.nn.Module, final: Path, last_step: int) -> None:
        ctx, name = self.ctx, self.test_name
        if name == "valid":  # the final evaluation has just scored it
            margins = self.last_valid[0]
        else:
            model.eval()
            with torch.no_grad():
                margins = rm_margins(ctx, model, self.test, self.collate, self.cfg.batch_size, desc="test")
        summary = margin_summary(margins)
        ctx.metrics.log(
            last_step, {k: v for k, v in summary.items() if k != "pairs"}, prefix=f"{name}_final/"
        )
        if ctx.is_main:
            write_rm_eval(ctx.out_dir, name, margins, {"model": str(final)})
        ctx.print(f"{name}: accuracy {summary['accuracy']:.4f}, mean margin {summary['margin_mean']:.4f}")


def train_rm(
    cfg: RMConfig, resume: bool = False, overwrite: bool = False, allow_data_change: bool = False
) -> Path:
    """Train a reward model as configured; returns the last model's directory ``out_dir/final``
    (:class:`RewardTrainer` from the config alone)."""
    result = RewardTrainer(
        cfg, resume=resume, overwrite=overwrite, allow_data_change=allow_data_change
    ).train()
    assert result.model_dir is not None
    return result.model_dir
