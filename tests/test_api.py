"""The Python API (README: Python API): ppomax.SFTTrainer / RewardTrainer / PPOTrainer with model, tokenizer and
dataset objects, reward callables, a PEFT config and callbacks; what config.yaml records for them; the resume rule
of a run started with objects; the CLI as the same trainer run from the config alone; the README's example."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

import ppomax
from ppo_helpers import QUESTIONS, TEXTS
from ppomax.cli import main
from ppomax.errors import ConfigError, UserError
from ppomax.monitor import read_metrics
from tiny_lm import make_tiny_lm, write_jsonl, write_yaml

datasets = pytest.importorskip("datasets", reason="the optional 'datasets' package is not installed")

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
SFT_RECORDS = [{"prompt": q, "response": f"Here is my answer to: {q}"} for q in QUESTIONS[:8]]
PAIRS = [{"prompt": q, "chosen": "Gladly, here it is.", "rejected": "No."} for q in QUESTIONS[:8]]
PROMPTS = [{"prompt": q} for q in QUESTIONS]


@pytest.fixture
def base(tmp_path) -> Path:
    return make_tiny_lm(tmp_path, TEXTS, name="base")


def logging(out: Path, **extra) -> dict:
    return {"out_dir": str(out), "progress": False, "report_to": [], **extra}


def sft_config(out: Path, **extra) -> dict:
    """4 steps (8 examples, batch 2), a checkpoint after each."""
    return {
        "epochs": 1,
        "batch_size": 2,
        "optim": {"lr": 3e-3},
        "logging": logging(out, checkpoint_every=1, keep_checkpoints=10),
        **extra,
    }


def ppo_config(out: Path) -> dict:
    return {
        "preset": "ppo_max",
        "generation": {"max_new_tokens": 8},
        "ppo": {
            "iterations": 2,
            "critic_pretrain_steps": 0,
            "rollout_batch_size": 4,
            "buffer_size": 8,
            "minibatch_size": 8,
        },
        "optim": {"warmup_steps": 0, "policy_lr": 1e-3, "critic_lr": 1e-3},
        "logging": logging(out),
    }


class Recorder:
    """A callback that records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def on_step_end(self, step, metrics):
        self.calls.append(("step", step, dict(metrics)))

    def on_evaluate(self, step, metrics):
        self.calls.append(("eval", step, dict(metrics)))

    def on_save(self, path):
        self.calls.append(("save", Path(path).name))


def brevity(prompts, responses, **kwargs):
    return [-len(r) / 100 for r in responses]


def weights(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in model.parameters()])


def saved(run: Path) -> dict:
    return yaml.safe_load((run / "config.yaml").read_text())


# ----------------------------------------------------------------------------------------------------- SFT


def test_sft_trains_the_objects_it_is_given_and_records_them(tmp_path, base):
    model = AutoModelForCausalLM.from_pretrained(base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    side = tokenizer.padding_side
    before = weights(model)
    rec = Recorder()
    run = tmp_path / "run"
    result = ppomax.SFTTrainer(
        sft_config(run),
        model=model,
        processing_class=tokenizer,
        train_dataset=datasets.Dataset.from_list(SFT_RECORDS),
        eval_dataset=SFT_RECORDS[:2],
        callbacks=[rec],
    ).train()
    assert result.model is model and not torch.equal(before, weights(model))  # trained in place
    assert result.out_dir == run and result.model_dir == run / "final" and result.step == 4
    assert torch.equal(weights(AutoModelForCausalLM.from_pretrained(run / "final")), weights(model))
    assert {"train/loss", "train/lr", "eval/loss", "eval/ppl"} <= set(result.metrics)
    assert result.metrics["train/loss"] == read_metrics(run / "metrics.jsonl")[-2]["train/loss"]
    # the tokenizer is a prepared copy: the caller's is left as it was
    assert result.tokenizer is not tokenizer and tokenizer.padding_side == side
    steps = [(c[1], sorted(c[2])) for c in rec.calls if c[0] == "step"]
    assert [s for s, _ in steps] == [1, 2, 3, 4] and all("train/loss" in keys for _, keys in steps)
    assert [c[1] for c in rec.calls if c[0] == "eval"] == [4]
    assert "eval/loss" in next(c[2] for c in rec.calls if c[0] == "eval")
    assert [c[1] for c in rec.calls if c[0] == "save"] == ["step-1", "step-2", "step-3", "step-4", "final"]
    cfg = saved(run)
    assert re.fullmatch(
        rf"<object LlamaForCausalLM {re.escape(str(base))} params=\d+>", cfg["model"]["policy"]
    )
    assert (
        cfg["model"]["tokenizer"].startswith("<object ")
        and f"vocab={len(tokenizer)}>" in cfg["model"]["tokenizer"]
    )
    assert cfg["data"]["train"] == "<object Dataset>" and cfg["data"]["valid"] == "<object list>"


def test_the_cli_is_the_python_trainer_run_from_the_config(tmp_path, base):
    """Strings are config: SFTTrainer(model=DIR, train_dataset=FILE) is the run `ppomax train-sft` makes."""
    data = write_jsonl(tmp_path / "train.jsonl", SFT_RECORDS)
    cli = sft_config(tmp_path / "cli", model={"policy": str(base)}, data={"train": str(data)})
    assert main(["train-sft", "--config", str(write_yaml(tmp_path / "sft.yaml", cli))]) == 0
    py = ppomax.SFTTrainer(sft_config(tmp_path / "py"), model=str(base), train_dataset=data).train()
    a, b = saved(tmp_path / "cli"), saved(tmp_path / "py")
    assert a.pop("logging")["out_dir"] != b.pop("logging")["out_dir"] and a == b
    cli_model = AutoModelForCausalLM.from_pretrained(tmp_path / "cli" / "final")
    assert torch.equal(weights(cli_model), weights(py.model))


def test_a_run_started_with_objects_resumes_only_with_them(tmp_path, base, capsys):
    class StopAfterStep2:
        def on_save(self, path):
            if path.name == "step-2":
                raise RuntimeError("stop here")

    run = tmp_path / "run"
    model = AutoModelForCausalLM.from_pretrained(base)
    data = datasets.Dataset.from_list(SFT_RECORDS)
    with pytest.raises(RuntimeError, match="stop here"):
        ppomax.SFTTrainer(
            sft_config(run), model=model, train_dataset=data, callbacks=[StopAfterStep2()]
        ).train()
    # the run's own config.yaml without the objects: the error names the argument to pass
    with pytest.raises(
        UserError, match=r"model\.policy: this run was started with an object .*\(model=\.\.\.\)"
    ):
        ppomax.SFTTrainer(run / "config.yaml", train_dataset=data, resume=True)
    assert main(["train-sft", "--resume", str(run)]) == 2
    assert "pass it again (model=...)" in capsys.readouterr().err
    # other data is refused as a changed data file is (when the run starts: train())
    with pytest.raises(UserError, match=r"the data changed since checkpoint step-2 .*data\.train \(Dataset"):
        ppomax.SFTTrainer(
            sft_config(run), model=model, train_dataset=data.select(range(6)), resume=True
        ).train()
    # the same objects again: the run goes on from step 2, each step logged once
    result = ppomax.SFTTrainer(sft_config(run), model=model, train_dataset=data, resume=True).train()
    assert result.step == 4 and [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3, 4]


def test_arguments_that_cannot_be_used_are_refused_before_anything_loads(tmp_path, base):
    out = tmp_path / "run"
    model = AutoModelForCausalLM.from_pretrained(base)
    with pytest.raises(ConfigError, match=r"model \(argument\) and model\.policy \(config\): both given"):
        ppomax.SFTTrainer(
            {**sft_config(out), "model": {"policy": "elsewhere"}}, model=model, train_dataset="x"
        )
    with pytest.raises(
        UserError, match=r"train_dataset: a path, a Hub dataset id, a datasets\.Dataset or a list"
    ):
        ppomax.SFTTrainer(sft_config(out), model=model, train_dataset=3)
    with pytest.raises(UserError, match="model: a causal LM"):
        ppomax.SFTTrainer(sft_config(out), model=model.model, train_dataset=SFT_RECORDS)
    from transformers import TrainerCallback

    with pytest.raises(UserError, match=r"callbacks\[0\]: TrainerCallback is a transformers TrainerCallback"):
        ppomax.SFTTrainer(
            sft_config(out), model=model, train_dataset=SFT_RECORDS, callbacks=[TrainerCallback()]
        )
    with pytest.raises(UserError, match=r"callbacks\[0\]: object has none of on_step_end"):
        ppomax.SFTTrainer(sft_config(out), model=model, train_dataset=SFT_RECORDS, callbacks=[object()])
    with pytest.raises(ConfigError, match="config: the sft trainer takes its SFTConfig, not a PPOConfig"):
        ppomax.SFTTrainer(ppomax.PPOConfig(), model=model, train_dataset=SFT_RECORDS)
    assert not out.exists()


def test_peft_config_is_model_lora(tmp_path, base):
    peft = pytest.importorskip("peft", reason="the optional 'peft' package is not installed")
    out = tmp_path / "run"
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj", "q_proj"], task_type="CAUSAL_LM")
    trainer = ppomax.SFTTrainer(sft_config(out), model=str(base), train_dataset=SFT_RECORDS, peft_config=lora)
    try:
        settings = trainer.cfg.model.lora
        assert (settings.r, settings.alpha, settings.target_modules) == (4, 8.0, ["q_proj", "v_proj"])
        assert hasattr(trainer.model, "peft_config") and trainer.model.peft_config["default"].r == 4
    finally:
        trainer.ctx.close()
    with pytest.raises(UserError, match=r"peft_config\.use_dora=True: not supported"):
        ppomax.SFTTrainer(
            sft_config(out), model=str(base), train_dataset="x", peft_config=peft.LoraConfig(use_dora=True)
        )
    other = {**sft_config(out), "model": {"lora": {"r": 16}}}
    with pytest.raises(ConfigError, match=r"peft_config \(argument\) and model\.lora \(config\): both given"):
        ppomax.SFTTrainer(other, model=str(base), train_dataset="x", peft_config=lora)


# ----------------------------------------------------------------------------------------------------- RM


def test_reward_trainer_puts_a_value_head_on_a_model_object(tmp_path, base):
    from ppomax.models import ValueHeadModel

    model = AutoModelForCausalLM.from_pretrained(base)
    run = tmp_path / "rm"
    result = ppomax.RewardTrainer(
        {"batch_size": 2, "logging": logging(run)},
        model=model,
        train_dataset=datasets.Dataset.from_list(PAIRS),
        eval_dataset=PAIRS[:4],
    ).train()
    assert isinstance(result.model, ValueHeadModel) and result.model.backbone is model
    assert result.model_dir == run / "final" and ValueHeadModel.from_pretrained(run / "final") is not None
    assert {"train/loss", "eval/accuracy", "valid_final/accuracy"} <= set(result.metrics)


# ----------------------------------------------------------------------------------------------------- PPO


def test_ppo_with_objects_reward_callables_and_a_frozen_copy_as_reference(tmp_path, base):
    from ppomax.models import ValueHeadModel

    policy = AutoModelForCausalLM.from_pretrained(base)
    reward_model = ValueHeadModel.from_causal_lm(base, seed=1)
    start = weights(policy)
    rec = Recorder()
    run = tmp_path / "ppo"
    trainer = ppomax.PPOTrainer(
        ppo_config(run),
        model=policy,
        reward_model=reward_model,
        reward_funcs=[
            brevity,
            {"function": "ppo_helpers:response_length", "weight": 0.0},
            lambda p, r: [0.0] * len(r),
        ],
        train_dataset=PROMPTS,
        callbacks=[rec],
    )
    reference = trainer.models.reference
    assert reference is not policy and torch.equal(weights(reference), start)
    result = trainer.train()
    assert result.model is policy and not torch.equal(weights(policy), start)
    assert torch.equal(weights(reference), start)  # the reference stayed the policy as it was given
    assert result.critic is not None and result.model_dir == run / "final" / "policy"
    assert {
        "reward/brevity_mean",
        "reward/response_length_mean",
        "reward/reward_2_mean",
        "reward/rm_mean",
    } <= set(result.metrics)
    assert [c[1] for c in rec.calls if c[0] == "step"] == [1, 2]
    assert [c[1] for c in rec.calls if c[0] == "save"] == ["step-2", "final"]
    functions = saved(run)["reward"]["functions"]
    assert functions[0]["function"] == "<object test_api:brevity>" and functions[0]["name"] == "brevity"
    assert functions[1]["function"] == "ppo_helpers:response_length"
    assert functions[2]["function"].endswith("<lambda>>") and functions[2]["name"] == "reward_2"
    # resuming needs the reward callables again, named by the key that records them
    with pytest.raises(UserError, match=r"reward\.functions\[0\]\.function: .* pass reward_funcs= again"):
        ppomax.PPOTrainer(
            run / "config.yaml", model=policy, reward_model=reward_model, train_dataset=PROMPTS, resume=True
        )


# ----------------------------------------------------------------------------------------------------- the package


def test_import_ppomax_is_light_and_exports_the_trainers():
    code = "import sys, ppomax; print('torch' in sys.modules, sorted(ppomax.__all__))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("False ")
    from ppomax import ppo
    from ppomax.trainers import inputs, reward_model, sft

    assert ppomax.SFTTrainer is sft.SFTTrainer and ppomax.RewardTrainer is reward_model.RewardTrainer
    assert ppomax.PPOTrainer is ppo.PPOTrainer and ppomax.TrainResult is inputs.TrainResult
    with pytest.raises(AttributeError):
        _ = ppomax.NoSuchThing


def test_the_readme_python_example_runs(tmp_path, monkeypatch, base):
    """README's Python API example, with its Hub id replaced by a tiny local model (tests never download)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Python API") : text.index("## Launching")]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert blocks and '"HuggingFaceTB/SmolLM2-135M-Instruct"' in blocks[0]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        code = block.replace('"HuggingFaceTB/SmolLM2-135M-Instruct"', repr(str(base)))
        exec(compile(code, "README.md", "exec"), namespace)
    assert (tmp_path / "runs" / "py-ppo" / "final" / "policy" / "config.json").is_file()
    assert namespace["ppo"].model is namespace["sft"].model
