"""Launching several processes: what `accelerate launch` hands each process in each mode, the warning when a
launch that asked for several processes runs one, and one result line per run (not one per rank)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from helpers import assert_same_run
from launch_helpers import accelerate_launch
from ppomax.cli import main
from ppomax.trainers import launch as common
from ppomax.trainers.launch import launch_mismatch
from tiny_lm import make_tiny_lm, write_jsonl, write_yaml

# The variables accelerate 1.15 sets in the launched process (accelerate/utils/launch.py), trimmed to those that
# matter here. `--cpu --num_processes 2` takes the "simple launcher": ONE process, with a rendezvous address but
# no rank or world size (it expects mpirun, --mpirun_hostfile, to start the others).
CPU_SIMPLE_2 = {
    "ACCELERATE_USE_CPU": "True",
    "MASTER_ADDR": "127.0.0.1",
    "MASTER_PORT": "29500",
    "OMP_NUM_THREADS": "1",
}
CPU_SIMPLE_1 = {"ACCELERATE_USE_CPU": "True", "OMP_NUM_THREADS": "1"}
# `--multi_gpu --num_processes 2` runs torchrun's agent: every process gets its rank and the world size.
MULTI_GPU_2 = {
    "MASTER_ADDR": "127.0.0.1",
    "MASTER_PORT": "29500",
    "RANK": "1",
    "LOCAL_RANK": "1",
    "WORLD_SIZE": "2",
    "LOCAL_WORLD_SIZE": "2",
    "OMP_NUM_THREADS": "1",
}
# `--cpu --mpirun_hostfile H --num_processes 2`: mpirun's own variables say how many there are.
MPIRUN_2 = {**CPU_SIMPLE_2, "PMI_SIZE": "2", "PMI_RANK": "0"}

LAUNCH_VARS = (
    "ACCELERATE_USE_CPU",
    "MASTER_ADDR",
    "MASTER_PORT",
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "PMI_SIZE",
    "PMI_RANK",
    "OMPI_COMM_WORLD_SIZE",
    "MV2_COMM_WORLD_SIZE",
)


@pytest.mark.parametrize(
    "env", [{}, CPU_SIMPLE_1, MULTI_GPU_2, MPIRUN_2], ids=["plain", "cpu-1", "multi_gpu-2", "mpirun-2"]
)
def test_no_warning_when_the_processes_are_there(env):
    assert launch_mismatch(env) is None


def test_cpu_launch_of_several_processes_is_named():
    msg = launch_mismatch(CPU_SIMPLE_2)
    assert msg is not None and "\n" not in msg
    assert "accelerate launch --cpu" in msg and "one process" in msg
    assert "accelerate launch --multi_gpu --num_processes N" in msg  # the command that works


@pytest.fixture
def launch_env(monkeypatch):
    def set_env(env):
        for k in LAUNCH_VARS:
            monkeypatch.delenv(k, raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)

    monkeypatch.setattr(common.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(common, "_warned", set())
    return set_env


def test_accelerator_setup_warns_once_on_stderr(launch_env, capsys):
    """Every trainer builds its Accelerator from `_cpu_distributed()`: that is where the launch is read."""
    launch_env(CPU_SIMPLE_2)
    assert common._cpu_distributed() is False
    assert common._cpu_distributed() is False
    err = capsys.readouterr().err
    assert err.count("ppomax: warning: ") == 1 and err.count("\n") == 1, err


@pytest.mark.parametrize(
    ("env", "cpu"),
    [
        ({}, False),
        (CPU_SIMPLE_2, False),
        (MULTI_GPU_2, True),
        (MPIRUN_2, True),
        ({"OMPI_COMM_WORLD_SIZE": "4"}, True),
    ],
)
def test_cpu_ddp_without_cuda_for_every_multi_process_launcher(launch_env, env, cpu):
    """torchrun/accelerate set WORLD_SIZE, mpirun its own size variables: any of them means gloo DDP on CPU
    (left to accelerate without cpu=True, a plain mpirun launch would give N independent runs)."""
    launch_env(env)
    assert common._cpu_distributed() is cpu


@pytest.mark.parametrize("command", ["train-sft", "train-rm"])
@pytest.mark.parametrize("main_process", [True, False])
def test_result_path_printed_by_the_main_process_only(monkeypatch, capsys, tmp_path, command, main_process):
    import ppomax.trainers.reward_model
    import ppomax.trainers.sft

    final = tmp_path / "run" / "final"

    def trainer(cfg, **run):  # what the commands run: the trainer's train() gives the final model's directory
        return SimpleNamespace(train=lambda: SimpleNamespace(model_dir=final))

    monkeypatch.setattr(ppomax.trainers.sft, "SFTTrainer", trainer)
    monkeypatch.setattr(ppomax.trainers.reward_model, "RewardTrainer", trainer)
    monkeypatch.setattr("accelerate.PartialState", lambda: SimpleNamespace(is_main_process=main_process))
    assert (
        main([command, "--set", f"model.policy={tmp_path}", "--set", f"data.train={tmp_path / 'x.jsonl'}"])
        == 0
    )
    assert capsys.readouterr().out == (f"{final}\n" if main_process else "")


@pytest.mark.slow
def test_real_launches_train_sft(tmp_path):
    """`--multi_gpu --num_processes 2` on CPU: two ranks, the final path printed once; `--cpu --num_processes 2`:
    one process and the warning naming the command that works."""
    words = ["apple", "river", "stone", "cloud"]
    records = [{"prompt": f"Repeat {w}.", "response": f"{w} {w}"} for w in words]
    model = make_tiny_lm(tmp_path, [r["prompt"] + " " + r["response"] for r in records])
    train = write_jsonl(tmp_path / "train.jsonl", records)
    for mode, ranks in (("--multi_gpu", 2), ("--cpu", 1)):
        out = tmp_path / mode.strip("-")
        cfg = {
            "model": {"policy": str(model)},
            "data": {"train": str(train)},
            "epochs": 1,
            "batch_size": 1,
            "logging": {"out_dir": str(out), "progress": False, "tensorboard": False},
        }
        path = write_yaml(tmp_path / f"{mode.strip('-')}.yaml", cfg)
        proc = subprocess.run(
            [*accelerate_launch(2, mode), "train-sft", "--config", str(path)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.splitlines().count(str(Path(out) / "final")) == 1, proc.stdout
        train_steps = sum('"train/loss"' in line for line in (out / "metrics.jsonl").read_text().splitlines())
        assert train_steps == len(records) // ranks  # batch 1 per rank
        warned = "ppomax: warning: " in proc.stderr
        assert warned is (ranks == 1), proc.stderr[-3000:]


@pytest.mark.parametrize(("rank", "printed"), [("0", True), ("1", False)])
def test_a_user_error_before_the_ranks_connect_is_printed_by_rank_0_only(monkeypatch, capsys, rank, printed):
    """Every rank finds a config error alike: one line from rank 0, exit 2 on every rank."""
    monkeypatch.setenv("RANK", rank)
    assert main(["train-sft", "--set", "model.policy=somewhere"]) == 2
    err = capsys.readouterr().err
    assert (
        err == "ppomax: data.train: required (SFT examples, or {'text'} records with objective: pretrain)\n"
    ) is printed
    assert printed or err == ""


@pytest.mark.slow
def test_a_user_error_under_a_launcher_is_one_line_and_every_rank_exits_2(tmp_path):
    """Two ranks failing alike (a bad data file), and a refusal the main process finds (a directory holding a
    run) that every rank then raises: the line is printed once, both ranks exit 2 (torchrun's summary says so;
    the launcher itself exits 1, with ``--quiet`` without a traceback), and no rank is left waiting."""
    records = [{"prompt": f"Repeat {w}.", "response": f"{w} {w}"} for w in ("apple", "river")]
    model = make_tiny_lm(tmp_path, [r["prompt"] + " " + r["response"] for r in records])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": \n')
    held = tmp_path / "held"
    (held / "final").mkdir(parents=True)
    cases = {
        f"{bad}:1: malformed JSON": (bad, tmp_path / "run"),
        f"{held} already holds a run (final/)": (write_jsonl(tmp_path / "train.jsonl", records), held),
    }
    for line, (data, out) in cases.items():
        proc = subprocess.run(
            [
                *accelerate_launch(2, ["--quiet", "--multi_gpu"]),
                *("train-sft", "--set", f"model.policy={model}", "--set", f"data.train={data}"),
                *("--set", f"logging.out_dir={out}"),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 1, proc.stderr[-3000:]
        assert proc.stderr.count(line) == 1, proc.stderr[-3000:]
        assert proc.stderr.count("exitcode  : 2") == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize(
    ("dtype", "launched", "expect"),
    [
        ("float32", None, "no"),
        ("bfloat16", None, "bf16"),
        ("bfloat16", "no", "bf16"),
        ("bfloat16", "bf16", "bf16"),
        ("float16", "fp16", "fp16"),
        ("float32", "bf16", None),
        ("bfloat16", "fp16", None),
    ],
)
def test_mixed_precision_follows_model_dtype_and_refuses_a_conflicting_launch(dtype, launched, expect):
    """model.dtype decides; a launch's --mixed_precision may only agree (or say no, accelerate's default)."""
    from ppomax.errors import ConfigError
    from ppomax.trainers.launch import mixed_precision

    env = {} if launched is None else {"ACCELERATE_MIXED_PRECISION": launched}
    if expect is None:
        with pytest.raises(ConfigError, match=r"model\.dtype"):
            mixed_precision(dtype, env)
    else:
        assert mixed_precision(dtype, env) == expect


@pytest.mark.parametrize(
    ("dtype", "adapters", "engine", "expect"),
    [
        ("bfloat16", False, "ddp", "float32"),  # float32 masters under autocast, as the policy
        ("bfloat16", True, "ddp", "bfloat16"),  # a LoRA base stays in model.dtype
        ("bfloat16", False, "deepspeed", "bfloat16"),  # the engine holds bf16 parameters, no autocast
        ("float32", False, "fsdp", "float32"),
    ],
)
def test_the_reference_is_held_in_the_dtype_the_policy_reads_its_weights_in(dtype, adapters, engine, expect):
    assert common.reference_dtype(dtype, adapters, common.Engine(engine)) == expect


@pytest.mark.slow
def test_two_process_sft_resume_continues_as_if_uninterrupted(tmp_path):
    """Two ranks (gloo) with a ragged last step per epoch (8 examples, 3 per rank: shares of 3/3 then 1/1): a
    run resumed from its step-4 checkpoint ends exactly as the run that went on (metrics, weights, optimiser),
    so each rank's share of a step (data.batching.rank_share) is re-derived exactly on resume."""
    import shutil

    from ppomax.monitor import read_metrics

    words = ["apple", "river", "stone", "cloud", "green", "seven", "table", "music"]
    records = [{"prompt": f"Repeat {w}.", "response": f"{w} {w}"} for w in words]
    model = make_tiny_lm(tmp_path, [r["prompt"] + " " + r["response"] for r in records])
    run = tmp_path / "run"
    cfg = {
        "model": {"policy": str(model)},
        "data": {"train": str(write_jsonl(tmp_path / "train.jsonl", records))},
        "epochs": 3,
        "batch_size": 3,
        "optim": {"lr": 3e-3, "schedule": "linear"},
        "logging": {"out_dir": str(run), "progress": False, "tensorboard": False, "checkpoint_every": 2},
    }
    path = write_yaml(tmp_path / "sft.yaml", cfg)

    def launch(*args: str) -> None:
        proc = subprocess.run(
            [*accelerate_launch(2), "train-sft", *args], capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stderr[-3000:]

    launch("--config", str(path))
    crashed = tmp_path / "crashed"
    shutil.copytree(run, crashed)
    shutil.rmtree(crashed / "final")
    shutil.rmtree(crashed / "checkpoints" / "step-6")
    launch("--resume", str(crashed))
    steps = [r["step"] for r in read_metrics(crashed / "metrics.jsonl") if "train/loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert_same_run(run, crashed)


@pytest.mark.parametrize(
    ("dtype", "cuda", "native", "warns"),
    [
        ("float32", False, {}, False),
        ("bfloat16", True, {}, False),  # GPUs have native bf16
        ("bfloat16", False, {}, True),  # an AVX2 CPU: emulated
        ("bfloat16", False, {"avx512_bf16": True}, False),
        ("bfloat16", False, {"amx_tile": True}, False),
        (
            "float16",
            False,
            {"amx_tile": True, "avx512_bf16": True},
            True,
        ),  # bf16 hardware is not fp16 hardware
        ("float16", False, {"amx_fp16": True}, False),
    ],
)
def test_half_precision_on_a_cpu_without_its_matmuls_is_a_warning_naming_the_key(dtype, cuda, native, warns):
    from ppomax.trainers.launch import emulated_precision_warning

    got = emulated_precision_warning(dtype, cuda, native)
    if not warns:
        assert got is None
    else:
        assert got is not None and f"model.dtype: {dtype}" in got and "float32" in got and "\n" not in got


def test_this_cpus_half_precision_support_is_read_from_torch():
    from ppomax.trainers.launch import cpu_half_precision_support

    got = cpu_half_precision_support()
    assert set(got) == {"avx512_bf16", "amx_tile", "amx_fp16"} and all(
        isinstance(v, bool) for v in got.values()
    )
