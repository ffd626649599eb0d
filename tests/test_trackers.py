"""Experiment trackers (README: Experiment trackers): `logging.report_to` through accelerate's trackers, the
resolved config as hyperparameters, PPO's evaluation samples as tables. TensorBoard runs everywhere; wandb (offline
mode) and MLflow (a local file store) run where their packages are installed and skip with the reason elsewhere."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import ppomax
from ppo_helpers import QUESTIONS, TEXTS
from ppomax.config import load_config
from ppomax.errors import ConfigError
from ppomax.monitor import read_metrics
from tiny_lm import make_tiny_lm

pytestmark = pytest.mark.usefixtures("one_thread")

SFT_RECORDS = [{"prompt": q, "response": f"Here is my answer to: {q}"} for q in QUESTIONS[:8]]
PROMPTS = [{"prompt": q} for q in QUESTIONS]


@pytest.fixture
def base(tmp_path) -> Path:
    return make_tiny_lm(tmp_path, TEXTS, name="base")


def sft(out: Path, report_to: list[str]) -> dict:
    logging = {"out_dir": str(out), "progress": False, "report_to": report_to, "eval_every": 2}
    return {"batch_size": 2, "data": {"valid_fraction": 0.25}, "logging": logging}


def ppo(out: Path, report_to: list[str]) -> dict:
    return {
        "preset": "ppo_max",
        "generation": {"max_new_tokens": 6},
        "ppo": {
            "iterations": 2,
            "critic_pretrain_steps": 0,
            "critic_init": "sft",
            "rollout_batch_size": 4,
            "buffer_size": 4,
            "minibatch_size": 4,
        },
        "optim": {"warmup_steps": 0},
        "logging": {
            "out_dir": str(out),
            "progress": False,
            "report_to": report_to,
            "project": "ppomax-test",
            "eval_every": 1,
            "eval_samples": 3,
        },
    }


def brevity(prompts, responses, **kwargs):
    return [-len(r) / 10 for r in responses]


def run_ppo(tmp_path: Path, base: Path, report_to: list[str]) -> Path:
    out = tmp_path / "ppo"
    ppomax.PPOTrainer(
        ppo(out, report_to),
        model=str(base),
        reward_funcs=[brevity],
        train_dataset=PROMPTS,
        eval_dataset=PROMPTS[:3],
    ).train()
    return out


def test_tensorboard_gets_every_metric_and_the_config(tmp_path, base):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    ppomax.SFTTrainer(sft(out, ["tensorboard"]), model=str(base), train_dataset=SFT_RECORDS).train()
    tags = set(EventAccumulator(str(out / "tb")).Reload().Tags()["scalars"])
    logged = {k for r in read_metrics(out / "metrics.jsonl") for k in r if k != "step"}
    assert logged and logged <= tags and {"train/loss", "eval/loss"} <= tags
    (hparams,) = (out / "tb").glob("*/hparams.yml")
    params = yaml.safe_load(hparams.read_text())
    assert params["optim.lr"] == 1e-5 and params["logging.report_to"] == '["tensorboard"]'
    assert params["model.policy"] == str(base)


def test_no_tracker_writes_no_tb_directory(tmp_path, base):
    out = tmp_path / "run"
    ppomax.SFTTrainer(sft(out, []), model=str(base), train_dataset=SFT_RECORDS).train()
    assert (out / "metrics.jsonl").is_file() and not (out / "tb").exists()


def test_a_tracker_not_installed_is_an_error_before_anything_loads(tmp_path, base, monkeypatch):
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_mlflow_available", lambda: False)
    out = tmp_path / "run"
    with pytest.raises(
        ConfigError, match=r"logging\.report_to: mlflow is not installed \(pip install mlflow\)"
    ):
        ppomax.SFTTrainer(sft(out, ["mlflow"]), model=str(base), train_dataset=SFT_RECORDS)
    assert not out.exists()


def test_report_to_reads_the_earlier_tensorboard_key_and_transformers_spelling():
    def report_to(*sets):
        return load_config("sft", overrides=list(sets)).logging.report_to

    assert report_to() == ["tensorboard"]
    assert report_to("logging.tensorboard=false") == []
    assert report_to("logging.tensorboard=true") == ["tensorboard"]
    assert report_to("logging.report_to=wandb") == ["wandb"] and report_to("logging.report_to=none") == []
    assert report_to("logging.report_to=[wandb, tensorboard]", "logging.tensorboard=true") == [
        "wandb",
        "tensorboard",
    ]
    with pytest.raises(
        ConfigError, match=r"logging\.tensorboard, logging\.report_to: tensorboard: true disagrees"
    ):
        report_to("logging.report_to=[wandb]", "logging.tensorboard=true")
    with pytest.raises(ConfigError, match=r"logging\.report_to\.0: must be one of 'tensorboard', 'wandb'"):
        report_to("logging.report_to=[all]")


def test_wandb_offline_gets_metrics_config_and_the_samples_table(tmp_path, base, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="wandb is not installed (not a ppomax dependency)")
    from wandb.sdk.wandb_run import Run

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    runs, logged = [], []
    real_init, real_log = wandb.init, Run.log

    def init(*args, **kwargs):
        runs.append(real_init(*args, **kwargs))
        return runs[-1]

    # what wandb was given (an offline run keeps it in its binary log)
    def log(self, data, step=None, **kwargs):
        logged.append((step, dict(data)))
        return real_log(self, data, step=step, **kwargs)

    monkeypatch.setattr(wandb, "init", init)
    monkeypatch.setattr(Run, "log", log)
    run_ppo(tmp_path, base, ["wandb"])
    (run,) = runs
    assert (run.project, run.name) == ("ppomax-test", "ppo")
    config = dict(run.config)
    assert config["ppo.advantage_estimator"] == "gae" and config["model.policy"] == str(base)
    steps = {step for step, data in logged if "reward/raw_mean" in data}
    assert steps == {1, 2} and any("eval/reward_mean" in data for _, data in logged)
    tables = [(step, data["eval/samples"]) for step, data in logged if "eval/samples" in data]
    assert [step for step, _ in tables] == [0, 1, 2]
    table = tables[-1][1]
    assert isinstance(table, wandb.Table) and {"prompt", "response", "reward", "kl"} <= set(table.columns)
    assert len(table.data) == 3
    assert (
        len(list((tmp_path / "wandb").glob("offline-run-*/files/media/table/eval/samples_*.table.json"))) == 3
    )


def test_mlflow_file_store_gets_metrics_params_and_the_samples_table(tmp_path, base, monkeypatch):
    mlflow = pytest.importorskip("mlflow", reason="mlflow is not installed (not a ppomax dependency)")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a local store without a database (MLflow >= 3.7)
    run_ppo(tmp_path, base, ["mlflow"])
    runs = mlflow.search_runs(experiment_names=["ppomax-test"], output_format="list")
    assert len(runs) == 1 and runs[0].info.run_name == "ppo"
    data = runs[0].data
    assert data.params["ppo.advantage_estimator"] == "gae" and data.params["model.policy"] == str(base)
    assert {"reward/raw_mean", "kl/per_token", "eval/reward_mean"} <= set(data.metrics)
    client = mlflow.tracking.MlflowClient()
    history = client.get_metric_history(runs[0].info.run_id, "reward/raw_mean")
    assert sorted(m.step for m in history) == [1, 2]
    artifacts = [a.path for a in client.list_artifacts(runs[0].info.run_id, "eval/samples")]
    assert artifacts == ["eval/samples/step-0.json", "eval/samples/step-1.json", "eval/samples/step-2.json"]
