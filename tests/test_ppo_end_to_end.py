"""PPO end to end: the CLI, every monitoring metric in metrics.jsonl and TensorBoard, evaluation samples, final
models that load with plain transformers, exact resume after SIGTERM, SIGINT through the CLI, and non-finite
updates (skipped and counted; K in a row stop the run with the last good checkpoint intact)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers import assert_same_run, set_args
from launch_helpers import accelerate_launch
from ppo_helpers import FAST, config, make_setup, reward_fn
from ppomax.cli import main
from ppomax.errors import STOPPED_EXIT_CODE, RunStopped, UserError
from ppomax.monitor import read_metrics
from ppomax.ppo.trainer import PPOTrainer, TrainingDiverged, train_ppo

MONITORING = [
    "reward/raw_mean",
    "reward/raw_std",
    "reward/running_mean",
    "reward/running_std",
    "reward/final_mean",
    "kl/per_token",
    "kl/per_sequence",
    "policy/approx_kl",
    "ppl/policy",
    "ppl/reference",
    "response/length_mean",
    "policy/entropy",
    "loss/pg",
    "loss/vf",
    "loss/ptx",
    "policy/pg_clipfrac",
    "critic/vf_clipfrac",
    "critic/value_mean",
    "returns/mean",
    "advantages/mean",
    "policy/ratio_mean",
    "policy/ratio_min",
    "policy/ratio_max",
    "lr/policy",
    "lr/critic",
    "grad_norm/policy",
    "grad_norm/critic",
    "perf/samples_per_s",
    "perf/tokens_per_s",
    "time/generation",
    "time/scoring",
    "time/training",
    "response/truncated",
    "nonfinite/skipped",
    "nonfinite/total",
    "nonfinite/samples_count",
    "reward/rm_mean",
    "reward/target_tokens_mean",
]
EVAL = ["reward_mean", "ppl_policy", "ppl_reference", "kl_per_token", "kl_per_sequence", "length_mean"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup(tmp_path_factory.mktemp("ppo_run"))


def _same_weights(model, safetensors_file) -> bool:
    """The model's weights equal a checkpoint's (accelerate saves tied weights once)."""
    saved, own = load_file(str(safetensors_file)), model.state_dict()
    return bool(saved) and all(torch.equal(v, own[k]) for k, v in saved.items())


def test_cli_run_logs_every_metric_and_saves_loadable_models(setup, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ppomax.models import ValueHeadModel

    out = tmp_path / "run"
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump({"preset": "ppo_ptx", "model": {"policy": str(setup.policy)}}))
    args = [
        "train-ppo",
        "--config",
        str(cfg_file),
        *set_args(
            f"model.reward={setup.reward}",
            f"data.prompts={setup.prompts}",
            f"data.ptx={setup.ptx}",
            f"data.valid_prompts={setup.valid}",
            f"logging.out_dir={out}",
            *FAST,
            "logging.eval_every=2",
            "logging.eval_samples=3",
            "logging.tensorboard=true",
            reward_fn("ppo_helpers:target_tokens"),
        ),
    ]
    assert main(args) == 0
    records = read_metrics(out / "metrics.jsonl")
    train = [r for r in records if "reward/raw_mean" in r]
    evals = [r for r in records if "eval/reward_mean" in r]
    assert [r["step"] for r in train] == [1, 2] and [r["step"] for r in evals] == [0, 2]
    for r in train:
        missing = [k for k in MONITORING if k not in r]
        assert not missing, missing
    assert all(f"eval/{k}" in evals[-1] for k in EVAL)
    samples = [json.loads(x) for x in (out / "samples" / "eval-step-2.jsonl").read_text().splitlines()]
    assert len(samples) == 3 and {"prompt", "response", "reward", "length", "kl"} <= set(samples[0])
    tags = set(EventAccumulator(str(out / "tb")).Reload().Tags()["scalars"])
    assert set(MONITORING) <= tags and "eval/reward_mean" in tags
    assert yaml.safe_load((out / "config.yaml").read_text())["ppo"]["ptx_coef"] == 0.5
    # the final policy loads with plain transformers; the critic with ValueHeadModel
    policy = AutoModelForCausalLM.from_pretrained(out / "final" / "policy")
    AutoTokenizer.from_pretrained(out / "final" / "policy")
    critic = ValueHeadModel.from_pretrained(out / "final" / "critic")
    # the last step is checkpointed: both models and both optimisers in accelerate's files, ppomax's own state
    # as JSON, nothing pickled by ppomax
    ckpt = out / "checkpoints" / "step-2"
    names = {p.name for p in ckpt.iterdir()}
    assert {"model.safetensors", "model_1.safetensors", "optimizer.bin", "optimizer_1.bin"} <= names
    assert "ppomax_state.json" in names and not [n for n in names if n.startswith("custom_checkpoint")]
    assert _same_weights(policy, ckpt / "model.safetensors")
    assert critic.value_head.weight.shape[1] == policy.config.hidden_size
    # a second run into the same directory without --resume is refused
    assert main(args) == 2


def test_sigterm_saves_and_resume_continues_exactly(setup, tmp_path):
    """5 steps in one go == 3 steps, SIGTERM, resume, 2 more (same metrics; only timings differ)."""

    def cfg(out, at):
        return config(
            setup,
            reward_fn("ppo_helpers:signal_on_call", counter=str(tmp_path / f"{out}.count"), at=at),
            "ppo.iterations=4",
            "ppo.critic_pretrain_steps=1",
            "ppo.minibatch_size=4",
            "ppo.ppo_epochs=2",
            "optim.warmup_steps=3",
            "optim.schedule=cosine",
            out=str(tmp_path / out),
        )

    straight = train_ppo(cfg("a", at=10**6))
    stopped = PPOTrainer(
        cfg("b", at=5)
    )  # two rollout batches (reward calls) per iteration: call 5 is in step 3
    with pytest.raises(RunStopped, match="SIGTERM: stopped at step 3"):
        stopped.train()
    out = tmp_path / "b"
    assert stopped.step == 3
    assert (out / "checkpoints" / "step-3" / "ppomax_state.json").is_file() and not (out / "final").exists()
    assert train_ppo(cfg("b", at=5), resume=True) == out
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    assert_same_run(straight, out)


def test_resume_after_a_kill_replays_from_the_last_checkpoint(setup, tmp_path):
    """SIGKILL after step 4 was logged but only step 2 was checkpointed, and the run directory then moved:
    `--resume DIR` truncates DIR's log to step 2, replays steps 3-4 to the same metrics, and writes into DIR,
    not into the out_dir its config.yaml names."""
    import shutil

    cfg = config(
        setup,
        reward_fn("ppo_helpers:target_tokens"),
        "ppo.iterations=4",
        "logging.checkpoint_every=2",
        "logging.keep_checkpoints=5",
        out=str(tmp_path / "run"),
    )
    out = train_ppo(cfg)
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    shutil.rmtree(moved / "checkpoints" / "step-4")
    shutil.rmtree(moved / "final")
    (moved / "checkpoints" / "step-4.tmp-12345").mkdir()  # what a kill during a save leaves
    original = (out / "metrics.jsonl").read_text()
    assert main(["train-ppo", "--resume", str(moved)]) == 0
    assert (out / "metrics.jsonl").read_text() == original
    assert sorted(p.name for p in (moved / "checkpoints").iterdir()) == ["step-2", "step-4"]
    assert [r["step"] for r in read_metrics(moved / "metrics.jsonl")] == [1, 2, 3, 4]
    assert_same_run(out, moved)


def test_sigint_through_the_cli_then_resume_with_the_saved_config(setup, tmp_path):
    out = tmp_path / "run"
    args = set_args(
        f"model.policy={setup.policy}",
        f"model.reward={setup.reward}",
        f"data.prompts={setup.prompts}",
        f"logging.out_dir={out}",
        *FAST,
        "ppo.iterations=3",
        reward_fn("ppo_helpers:signal_on_call", counter=str(tmp_path / "n"), at=1, sig="SIGINT"),
    )
    assert main(["train-ppo", "--preset", "ppo_max", *args]) == STOPPED_EXIT_CODE
    assert (out / "checkpoints" / "step-1").is_dir()
    assert main(["train-ppo", "--resume", str(out)]) == 0  # config.yaml of the run, no --preset/--set
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3]


def test_one_nonfinite_iteration_is_skipped_and_counted(setup, tmp_path):
    tr = PPOTrainer(
        config(
            setup,
            reward_fn("ppo_helpers:nan_from_call", counter=str(tmp_path / "n"), start=3, stop=4),
            "ppo.iterations=3",
            out=str(tmp_path / "run"),
        )
    )
    tr.iteration(1)  # two reward calls per iteration: calls 3 and 4 (NaN) are step 2's
    before = [p.detach().clone() for p in tr.policy.parameters()]
    m2 = tr.iteration(2)
    assert m2["nonfinite/skipped"] == 1 and m2["nonfinite/total"] == 1
    assert all(torch.equal(a, b) for a, b in zip(before, tr.policy.parameters(), strict=True))
    m3 = tr.iteration(3)
    assert m3["nonfinite/skipped"] == 0 and tr.updater.nonfinite_in_row == 0
    assert not all(torch.equal(a, b) for a, b in zip(before, tr.policy.parameters(), strict=True))


def test_a_nonfinite_loss_skips_both_models_update_and_changes_nothing(setup, tmp_path, monkeypatch):
    """A NaN policy loss (the critic's finite) skips the minibatch's step of both models: the weights, AdamW
    states and learning-rate schedules of policy and critic are as they were (trainers/optimised.py)."""
    from ppomax.ppo.update import Updater

    tr = PPOTrainer(config(setup, reward_fn("ppo_helpers:target_tokens"), out=str(tmp_path / "run")))
    tr.iteration(1)  # AdamW has state to keep

    def state():
        models = {"policy": tr.updater.policy, "critic": tr.updater.critic}
        return {
            name: (
                {k: v.clone() for k, v in m.model.state_dict().items()},
                [{k: v.clone() for k, v in s.items()} for s in m.optimizer.state_dict()["state"].values()],
                m.schedule.state_dict()["last_epoch"],
            )
            for name, m in models.items()
        }

    before = state()
    real = Updater._policy_loss

    def nan_policy_loss(self, *args, **kwargs):
        loss, metrics = real(self, *args, **kwargs)
        return loss * float("nan"), metrics

    monkeypatch.setattr(Updater, "_policy_loss", nan_policy_loss)
    m = tr.iteration(2)
    assert m["nonfinite/skipped"] == 1 and tr.updater.nonfinite_in_row == 1
    after = state()
    for name, (weights, optim, last) in before.items():
        weights_after, optim_after, last_after = after[name]
        assert all(torch.equal(v, weights_after[k]) for k, v in weights.items()), name
        assert all(
            torch.equal(v, b[k]) for a, b in zip(optim, optim_after, strict=True) for k, v in a.items()
        )
        assert last == last_after, name


def test_repeated_nonfinite_updates_stop_with_the_last_good_checkpoint(setup, tmp_path):

    cfg = config(
        setup,
        reward_fn("ppo_helpers:nan_from_call", counter=str(tmp_path / "n"), start=5),  # from step 3
        "ppo.iterations=8",
        "ppo.max_nonfinite_in_row=2",
        "logging.checkpoint_every=1",
        out=str(tmp_path / "run"),
    )
    tr = PPOTrainer(cfg)
    with pytest.raises(TrainingDiverged, match=r"stopped at step 4: 2 updates in a row.*step-2") as err:
        tr.train()
    assert isinstance(err.value, UserError)  # the CLI prints it without a traceback
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["step-1", "step-2"]
    current = tr.unwrapped(tr.policy)  # skipped updates never touched the weights
    assert _same_weights(current, tmp_path / "run" / "checkpoints" / "step-2" / "model.safetensors")
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["nonfinite/total"] for r in records] == [0, 0, 1, 2]


def test_nonfinite_scores_skip_their_samples_and_the_run_goes_on(setup, tmp_path):
    """Each reward call gives NaN, +inf and -inf for half of its responses: those samples are left out and
    counted, the others train (one NaN used to make every update non-finite and stop the run at step 3)."""
    out = tmp_path / "run"
    records = read_metrics(
        train_ppo(config(setup, reward_fn("ppo_helpers:some_nonfinite"), "ppo.iterations=4", out=str(out)))
        / "metrics.jsonl"
    )
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(r["nonfinite/samples_count"] == 4 for r in records)  # 2 calls of 4 responses, 2 bad each
    assert all(r["nonfinite/skipped"] == 0 and r["nonfinite/total"] == 0 for r in records)
    for r in records:  # every logged number is finite: the bad scores reach no statistic
        assert all(v == v and abs(v) != float("inf") for v in r.values() if isinstance(v, float)), r


def test_a_minibatch_without_a_finite_score_is_no_update_and_no_divergence(setup, tmp_path):
    """One minibatch per sample, one finite score per reward call: most minibatches are empty. They step no
    optimiser (Adam would move the weights even on a zero gradient) and are not non-finite updates."""
    tr = PPOTrainer(
        config(
            setup,
            reward_fn("ppo_helpers:some_nonfinite", finite=1),
            "ppo.minibatch_size=1",
            "ppo.max_nonfinite_in_row=1",
            out=str(tmp_path / "run"),
        )
    )
    stepped = []
    real_step = tr.updater.policy.step
    tr.updater.policy.step = lambda: (stepped.append(1), real_step())[1]
    m = tr.iteration(1)
    assert len(stepped) == 2 and m["nonfinite/samples_count"] == 6  # 8 minibatches, 2 with a finite score
    assert m["nonfinite/skipped"] == 0 and tr.updater.nonfinite_in_row == 0


def test_a_reward_function_that_raises_is_one_line_with_its_name_and_step(setup, tmp_path, capsys):
    for kind in ("ValueError", "TypeError"):  # a TypeError from inside was "could not be called"
        args = set_args(
            f"model.policy={setup.policy}",
            f"model.reward={setup.reward}",
            f"data.prompts={setup.prompts}",
            f"logging.out_dir={tmp_path / kind}",
            *FAST,
            reward_fn("ppo_helpers:raises", kind=kind),
        )
        assert main(["train-ppo", "--preset", "ppo_max", *args]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        assert (
            err.strip()
            .splitlines()[-1]
            .endswith(
                f"step 1: reward function 'raises' (ppo_helpers:raises) raised {kind}: the scorer broke"
            )
        ), err


def test_evaluation_does_not_change_the_training_trajectory(setup, tmp_path):
    common = [f"data.valid_prompts={setup.valid}", "ppo.iterations=2", "logging.eval_greedy=false"]
    a = read_metrics(
        train_ppo(
            config(
                setup,
                reward_fn("ppo_helpers:target_tokens"),
                *common,
                "logging.eval_every=1",
                out=str(tmp_path / "a"),
            )
        )
        / "metrics.jsonl"
    )
    b = read_metrics(
        train_ppo(
            config(
                setup,
                reward_fn("ppo_helpers:target_tokens"),
                *common,
                "logging.eval_every=0",
                out=str(tmp_path / "b"),
            )
        )
        / "metrics.jsonl"
    )
    a = [r for r in a if "reward/raw_mean" in r]
    assert len(a) == len(b) == 2
    for x, y in zip(a, b, strict=True):
        assert x["reward/raw_mean"] == y["reward/raw_mean"] and x["loss/vf"] == y["loss/vf"]
    assert (tmp_path / "a" / "samples" / "eval-step-1.jsonl").is_file()


@pytest.mark.slow
def test_two_process_cpu_ddp_with_resume(setup, tmp_path):
    """`accelerate launch` with 2 CPU processes (gloo): running reward moments and the prompt stream are global
    (each rank scores its own 8 samples per iteration), PPO-ptx and evaluation run, and --resume continues."""
    import os
    import subprocess
    from pathlib import Path

    out = tmp_path / "run"
    launch = [*accelerate_launch(2), "train-ppo"]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), str(Path(__file__).parent)]),
        "OMP_NUM_THREADS": "1",
    }
    first = [
        *launch,
        "--preset",
        "ppo_ptx",
        *set_args(
            f"model.policy={setup.policy}",
            f"model.reward={setup.reward}",
            f"data.prompts={setup.prompts}",
            f"data.ptx={setup.ptx}",
            f"data.valid_prompts={setup.valid}",
            f"logging.out_dir={out}",
            *FAST,
            "logging.eval_every=2",
            "ppo.critic_pretrain_steps=1",
            "ppo.minibatch_size=4",
            reward_fn("ppo_helpers:target_tokens"),
        ),
    ]
    proc = subprocess.run(first, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((out / "checkpoints" / "step-3" / "ppomax_state.json").read_text())
    assert state["moments"]["count"] == 3 * 8 * 2  # 3 iterations x 8 samples x 2 ranks
    assert state["prompt_stream"]["epoch"] * 12 + state["prompt_stream"]["pos"] == 3 * 8 * 2
    launch = [*accelerate_launch(2), "train-ppo"]
    proc = subprocess.run(
        [*launch, "--resume", str(out), "--set", "ppo.iterations=3"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if "reward/raw_mean" in r]
    assert steps == [1, 2, 3, 4]
    assert (
        json.loads((out / "checkpoints" / "step-4" / "ppomax_state.json").read_text())["moments"]["count"]
        == 64
    )
