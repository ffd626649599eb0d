"""PPO, SFT and RM under the shipped accelerate configs (configs/accelerate/) with 2 CPU processes over gloo.

What runs on this CPU: DDP (``--multi_gpu``) and DeepSpeed ZeRO-2/ZeRO-3 (its CPU accelerator), launched exactly
as a user launches them on GPUs. FSDP does not: accelerate enables it only on GPU devices, and ppomax refuses
the config on a machine without one (tested here) instead of running plain DDP under an FSDP name.

The equivalence test: a 1-process run and a 2-process run with the same global batch (8 prompts, one minibatch)
and seed must agree on the first update. Rollouts are sampled with ``top_k=1`` so both draw the same responses
whatever their random streams; the prompt stream, running reward moments, advantage whitening and the token
weighting of the loss are global, so the update differs only by floating-point reduction order.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import assert_same_run, set_args
from launch_helpers import accelerate_launch
from ppo_helpers import FAST, make_setup
from tiny_lm import make_tiny_lm, write_jsonl

CONFIGS = Path(__file__).parents[1] / "src" / "ppomax" / "configs" / "accelerate"
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), str(Path(__file__).parent)]),
    "OMP_NUM_THREADS": "1",
}
pytest.importorskip("deepspeed")


def launch(engine: str | None, processes: int, *args: str) -> subprocess.CompletedProcess[str]:
    """``accelerate launch --config_file configs/accelerate/<engine>.yaml`` (DDP on CPU: ``--multi_gpu``), or a
    plain single process when ``engine`` is None."""
    if engine is None:
        cmd = [sys.executable, "-m", "ppomax.cli", *args]
    else:
        where = "--multi_gpu" if engine == "ddp" else ["--config_file", str(CONFIGS / f"{engine}.yaml")]
        cmd = [*accelerate_launch(processes, where), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup(tmp_path_factory.mktemp("engines"))


def ppo_args(setup, out: Path, per_rank: int, *extra: str) -> list[str]:
    return [
        "train-ppo",
        *set_args(
            f"model.policy={setup.policy}",
            f"model.reward={setup.reward}",
            f"data.prompts={setup.prompts}",
            f"logging.out_dir={out}",
            *FAST,
            "generation.top_k=1",
            "ppo.iterations=1",
            f"ppo.rollout_batch_size={per_rank}",
            f"ppo.buffer_size={per_rank}",
            f"ppo.minibatch_size={per_rank}",
            *extra,
        ),
    ]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_process(setup):
    out = setup.root / "single"
    proc = launch(None, 1, *ppo_args(setup, out, 8))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _assert_same_first_update(setup, one: Path, two: Path) -> None:
    before = weights(setup.policy)
    a, b = weights(one / "final" / "policy"), weights(two / "final" / "policy")
    moved = max((a[k] - before[k]).abs().max().item() for k in a)
    assert moved > 1e-4  # the update did something
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=2e-6, rtol=1e-4, msg=k)
    ca, cb = weights(one / "final" / "critic"), weights(two / "final" / "critic")
    for k in ca:
        torch.testing.assert_close(cb[k], ca[k], atol=2e-6, rtol=1e-4, msg=k)
    ma, mb = metrics(one)[0], metrics(two)[0]
    for key in ("reward/raw_mean", "loss/pg", "loss/vf", "grad_norm/policy", "grad_norm/critic"):
        assert mb[key] == pytest.approx(ma[key], rel=1e-4, abs=1e-6), key


def test_zero3_two_processes_match_one_process(setup, one_process):
    """ZeRO-3 (parameters of policy and critic partitioned, reference and reward model as ZeRO-3 inference
    engines, generation with synced ranks) gives the one-process update; final/ holds gathered full weights."""
    out = setup.root / "zero3"
    proc = launch("zero3", 2, *ppo_args(setup, out, 4))
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the launcher itself may log (DeepSpeed to stdout); ppomax's processes print only the result, once
    assert proc.stdout.splitlines()[-1] == str(out / "final" / "policy")
    assert proc.stdout.count("final/policy") == 1
    _assert_same_first_update(setup, one_process, out)


def test_bf16_under_zero2_trains_with_bf16_weights(setup):
    """DeepSpeed's bf16 mode trains bf16 weights (no autocast), so attention takes ppomax's float32 path with
    gradients (ppomax/models/attention.py): two iterations with 2 processes, finite losses, the policy moved."""
    out = setup.root / "zero2-bf16"
    proc = launch("zero2", 2, *ppo_args(setup, out, 4, "model.dtype=bfloat16", "ppo.iterations=2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = metrics(out)
    assert len(rows) == 2
    for row in rows:
        for key in ("loss/pg", "loss/vf", "grad_norm/policy"):
            assert math.isfinite(row[key]), (key, row[key])
    before, after = weights(setup.policy), weights(out / "final" / "policy")
    assert max((after[k].float() - before[k].float()).abs().max().item() for k in after) > 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "zero2"])
def test_two_processes_match_one_process(setup, one_process, engine):
    out = setup.root / engine
    proc = launch(engine, 2, *ppo_args(setup, out, 4))
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_first_update(setup, one_process, out)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["zero2", "zero3"])
def test_deepspeed_resume_is_exact(setup, engine):
    """2N iterations == N + N under DeepSpeed with 2 processes (engines' checkpoints, ppomax_state.json,
    RNG): the same metrics, final weights and newest checkpoint (the engines' weight and optimiser shards)."""
    common = ["generation.top_k=0", "ppo.critic_pretrain_steps=1", "ppo.minibatch_size=2"]
    whole, part = setup.root / f"{engine}-whole", setup.root / f"{engine}-part"
    proc = launch(engine, 2, *ppo_args(setup, whole, 4, *common, "ppo.iterations=2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = launch(engine, 2, *ppo_args(setup, part, 4, *common, "ppo.iterations=1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = launch(engine, 2, "train-ppo", "--resume", str(part), *set_args("ppo.iterations=2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(whole, part)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["zero2", "zero3"])
def test_sft_and_rm_under_deepspeed(tmp_path, engine):
    """SFT (with gradient accumulation) and RM training under DeepSpeed with 2 processes, final weights saved; the
    SFT weights are DDP's (ppomax ends every step, on every engine: trainers/optimised.py)."""
    words = ["apple", "river", "stone", "cloud", "green", "light", "sound", "water"]
    records = [{"prompt": f"Repeat {w}.", "response": f"{w} {w}"} for w in words]
    model = make_tiny_lm(tmp_path, [r["prompt"] + " " + r["response"] for r in records])
    train_file = write_jsonl(tmp_path / "sft.jsonl", records)
    pairs = write_jsonl(
        tmp_path / "pairs.jsonl",
        [{"prompt": r["prompt"], "chosen": r["response"], "rejected": "no"} for r in records],
    )
    base = [f"model.policy={model}", "epochs=1", "batch_size=1", "logging.progress=false"]
    base += ["logging.tensorboard=false"]

    def train(where: str, command: str, data: Path, *extra: str) -> tuple[Path, str]:
        out = tmp_path / f"{command}-{where}"
        args = set_args(
            *base, *extra, f"data.train={data}", f"logging.out_dir={out}", "data.valid_fraction=0"
        )
        proc = launch(where, 2, command, *args)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return out, proc.stderr

    for command, data, extra in (
        ("train-sft", train_file, ["grad_accum=2", "optim.lr=1e-3"]),
        ("train-rm", pairs, []),
    ):
        out, stderr = train(engine, command, data, *extra)
        assert (out / "final" / "model.safetensors").is_file()
        assert any("train/loss" in r for r in metrics(out))
        # the start-up line counts ZeRO-3's partitioned parameters in full
        counts = re.findall(r"\(([\d,]+) parameters, ([\d,]+) trained\)", stderr)
        assert counts and all(int(n.replace(",", "")) > 38_000 for c in counts for n in c), counts
    ddp = weights(train("ddp", "train-sft", train_file, "grad_accum=2", "optim.lr=1e-3")[0] / "final")
    deepspeed, before = weights(tmp_path / f"train-sft-{engine}" / "final"), weights(model)
    assert max((ddp[k] - before[k]).abs().max().item() for k in ddp) > 1e-4  # it trained
    for k in ddp:
        torch.testing.assert_close(deepspeed[k], ddp[k], atol=1e-5, rtol=1e-4, msg=k)


def test_parameter_counts_of_a_zero3_partitioned_model_are_its_full_sizes(tmp_path):
    """Under ZeRO-3 (zero.Init) every parameter's local tensor is empty and ``ds_numel`` holds its size."""
    from transformers import AutoModelForCausalLM

    from ppomax.models import model_summary

    model = AutoModelForCausalLM.from_pretrained(make_tiny_lm(tmp_path))
    model.lm_head.requires_grad_(False)
    full = model_summary(model)
    for param in model.parameters():
        param.ds_numel = param.numel()
        param.data = torch.empty(0)
    assert model_summary(model) == full and full["trainable_params"] < full["params"]


def test_fsdp_without_cuda_is_refused_not_downgraded(monkeypatch):
    """What `accelerate launch --config_file configs/accelerate/fsdp.yaml` hands every process, on a machine
    without CUDA: one line naming what runs instead, before any model is loaded (not a DDP run under an FSDP name)."""
    from ppomax.errors import ConfigError
    from ppomax.trainers.launch import build_accelerator

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="FSDP accelerate config needs CUDA GPUs") as err:
        build_accelerator(("policy", "critic"))
    assert "\n" not in str(err.value)


def test_a_deepspeed_launch_without_deepspeed_installed_is_one_line(monkeypatch):
    import importlib.util

    from ppomax.errors import ConfigError
    from ppomax.trainers.launch import build_accelerator

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a)
    )
    with pytest.raises(ConfigError, match=r"pip install 'ppomax\[deepspeed\]'"):
        build_accelerator(("policy", "critic"))


def test_each_engine_prepares_the_trained_models_as_it_must():
    """ppomax's side of FSDP, which cannot run on this CPU (accelerate's FSDP2 takes one model and its optimiser
    per `prepare`): a fake accelerator records the calls. DDP prepares everything in one call, in order."""
    from types import SimpleNamespace

    from ppomax.trainers.launch import Engine

    policy, critic, frozen = torch.nn.Linear(2, 2), torch.nn.Linear(2, 1), torch.nn.Linear(2, 2)
    p_opt, c_opt = torch.optim.SGD(policy.parameters(), 0.1), torch.optim.SGD(critic.parameters(), 0.1)
    for engine, expect in (
        (Engine("fsdp", 0, 2), [(policy, p_opt), (critic, c_opt)]),
        (Engine("ddp", 0, 2), [(policy, p_opt, critic, c_opt)]),
    ):
        calls: list[tuple] = []
        acc = SimpleNamespace(
            device=torch.device("cpu"),
            native_amp=False,
            prepare=lambda *o, calls=calls: calls.append(o) or o,
        )
        out = engine.prepare_trained(acc, {"policy": (policy, p_opt), "critic": (critic, c_opt)}, 1, 1.0, "k")
        assert calls == expect
        assert out == {"policy": (policy, p_opt), "critic": (critic, c_opt)}
        assert (
            engine.prepare_frozen(acc, frozen, 1) is frozen
        )  # replicated, never given to FSDP without an optimiser


@pytest.mark.slow
def test_lora_ppo_under_zero3(setup):
    """LoRA under ZeRO-3 with 2 processes: the reference is the policy's base with adapters off (inside the
    policy's engine), adapters and merged weights are saved from the gathered state."""
    from transformers import AutoModelForCausalLM

    out = setup.root / "lora-zero3"
    proc = launch("zero3", 2, *ppo_args(setup, out, 4, "model.lora.r=4", "model.lora.save_merged=true"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "final" / "policy" / "adapter_model.safetensors").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out / "final" / "policy" / "merged")
    before = weights(setup.policy)
    after = merged.state_dict()
    assert max((after[k] - before[k]).abs().max().item() for k in before if k in after) > 0  # it trained


@pytest.mark.slow
def test_deepspeed_resume_never_runs_a_planted_pickle(setup, tmp_path):
    """DeepSpeed reads its checkpoints with torch.load(weights_only=False); ppomax makes it read tensors only: a
    crafted optimiser-states file is refused in one line and nothing in it runs."""
    from test_models import write_hostile_pickle

    out = tmp_path / "run"
    proc = launch("zero2", 2, *ppo_args(setup, out, 4))
    assert proc.returncode == 0, proc.stderr[-3000:]
    states = sorted((out / "checkpoints" / "step-1" / "pytorch_model").glob("*optim_states.pt"))
    marker = tmp_path / "PWNED"
    write_hostile_pickle(states[0], marker)
    proc = launch("zero2", 2, "train-ppo", "--resume", str(out), *set_args("ppo.iterations=2"))
    assert not marker.exists()
    assert proc.returncode != 0
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("ppomax: ") and "refused" in ln]
    assert errors and "step-1" in errors[0], proc.stderr[-3000:]


@pytest.mark.slow
def test_critic_free_zero3_two_processes_match_one_process(setup):
    """REINFORCE++ and no critic (one trained model beside the frozen ones, each with its own DeepSpeed plugin):
    ZeRO-3 over 2 ranks gives the one-process update. Its advantages are whitened over the global batch, all ranks:
    a per-rank normalisation would differ. (Not the baseline variant with groups: this test samples greedily
    (generation.top_k=1) so that both layouts draw the same responses, and a group of identical responses has
    advantage 0 under a group baseline: no update to compare.)"""
    extra = ("--preset", "reinforce_pp")
    one, two = setup.root / "rpp-single", setup.root / "rpp-zero3"
    proc = launch(None, 1, *ppo_args(setup, one, 8), *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = launch("zero3", 2, *ppo_args(setup, two, 4), *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = weights(setup.policy)
    a, b = weights(one / "final" / "policy"), weights(two / "final" / "policy")
    assert max((a[k] - before[k]).abs().max().item() for k in a) > 1e-4  # the update did something
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=2e-6, rtol=1e-4, msg=k)
    assert sorted(p.name for p in (two / "final").iterdir()) == ["policy"]
    ma, mb = metrics(one)[0], metrics(two)[0]
    for key in ("reward/raw_mean", "loss/pg", "advantages/mean", "grad_norm/policy"):
        assert mb[key] == pytest.approx(ma[key], rel=1e-4, abs=1e-6), key
    assert not [k for k in mb if k.startswith(("critic/", "loss/vf", "lr/critic", "grad_norm/critic"))]


def _assert_same_runs(setup, padded: Path, packed: Path) -> None:
    """Every metric (not timings) and the final weights of policy and critic (where there is one) within float
    rounding."""
    ma, mb = metrics(padded), metrics(packed)
    assert len(ma) == len(mb) > 0
    for a, b in zip(ma, mb, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            if not k.startswith(("time/", "perf/")):
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5, nan_ok=True), k
    files = sorted(f.relative_to(padded) for f in (padded / "final").rglob("*.safetensors"))
    for f in files:
        a, b = load_file(str(padded / f)), load_file(str(packed / f))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4, msg=f"{f}: {k}")
    policy = packed / "final" / "policy"
    if (policy / "model.safetensors").is_file():
        before, after = weights(setup.policy), weights(policy)
        assert max((after[k] - before[k]).abs().max().item() for k in after) > 1e-4  # it trained
    else:  # LoRA's B matrices start at zero
        after = load_file(str(policy / "adapter_model.safetensors"))
        assert max(t.abs().max().item() for k, t in after.items() if "lora_B" in k) > 0


@pytest.mark.slow
@pytest.mark.parametrize(
    "engine, over, cli",
    [
        ("zero2", (), ()),
        ("zero3", (), ()),
        ("zero3", ("model.lora.r=4",), ()),
        ("zero3", (), ("--preset", "reinforce_pp")),
    ],
    ids=["zero2", "zero3", "zero3_lora", "zero3_critic_free"],
)
def test_packed_sequences_give_the_padded_run_under_deepspeed(setup, request, engine, over, cli):
    """ppo.pack_sequences under DeepSpeed with 2 processes (the start-up checks' forwards, the scoring pass, the
    reward model and two minibatch updates on packed rows; under ZeRO-3 every forward gathers the partitioned
    weights, the LM head's narrowed to the response positions): two iterations give the padded run's metrics
    and final weights within float rounding."""
    runs = {}
    for packed in (False, True):
        out = setup.root / f"{request.node.callspec.id}-packed-{packed}"
        over_all = ("ppo.iterations=2", "ppo.minibatch_size=2", f"ppo.pack_sequences={packed}", *over)
        proc = launch(engine, 2, *ppo_args(setup, out, 4, *over_all), *cli)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[packed] = out
    _assert_same_runs(setup, runs[False], runs[True])
