"""The optimiser step every trainer takes (trainers/optimised.py) and the engine object the rest of ppomax asks
(trainers/launch.py: Engine)."""

from __future__ import annotations

import ast
import copy
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from ppomax.config import OptimConfig
from ppomax.optim import build_optimizer, build_scheduler
from ppomax.trainers.launch import Engine
from ppomax.trainers.optimised import Optimised, step_together

SRC = Path(__file__).parents[1] / "src" / "ppomax"


def trained_linear(seed: int = 0) -> Optimised:
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    cfg = OptimConfig(lr=0.1, schedule="cosine")
    optimizer = build_optimizer(model.parameters(), cfg.lr, cfg)
    return Optimised(model, optimizer, build_scheduler(optimizer, cfg, 10), Accelerator(cpu=True), Engine())


def snapshot(opt: Optimised) -> tuple:
    return (
        copy.deepcopy(opt.model.state_dict()),
        copy.deepcopy(opt.optimizer.state_dict()),
        copy.deepcopy(opt.schedule.state_dict()),
    )


def assert_same(a: tuple, b: tuple) -> None:
    weights_a, optim_a, sched_a = a
    weights_b, optim_b, sched_b = b
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    for i, state in optim_a["state"].items():
        assert all(torch.equal(v, optim_b["state"][i][k]) for k, v in state.items())
    assert optim_a["param_groups"] == optim_b["param_groups"]
    assert sched_a == sched_b


def backward(opt: Optimised, how: str) -> torch.Tensor:
    """One micro-batch's backward: a finite loss and gradient, a NaN loss, or a finite loss (0) whose gradient
    is not finite (d/dx sqrt(|x|) at 0)."""
    x = torch.ones(4, 3)
    out = opt.model(x)
    if how == "finite":
        loss = out.pow(2).mean()
    elif how == "nan_loss":
        loss = out.mean() * float("nan")
    else:
        loss = (out - out.detach()).abs().sqrt().sum()
    opt.backward(loss)
    return loss.detach()


@pytest.mark.parametrize("how", ["nan_loss", "nonfinite_gradient"])
def test_a_nonfinite_step_leaves_weights_optimiser_state_and_schedule_as_they_were(how):
    opt = trained_linear()
    step_together({"model": opt}, backward(opt, "finite"), 1.0)  # Adam has state to keep
    before = snapshot(opt)
    stepped, norms, _ = step_together({"model": opt}, backward(opt, how), 1.0)
    assert not stepped
    assert_same(before, snapshot(opt))
    assert all(p.grad is None for p in opt.model.parameters())  # dropped: the next step starts clean
    stepped, norms, _ = step_together({"model": opt}, backward(opt, "finite"), 1.0)
    assert stepped and torch.isfinite(norms["model"])
    assert not torch.equal(before[0]["weight"], opt.model.weight)
    assert opt.schedule.state_dict()["last_epoch"] == before[2]["last_epoch"] + 1


def test_one_ranks_nonfinite_step_is_skipped_on_every_rank():
    """This rank's loss and gradient are finite, another rank's are not: the sum over ranks says so, and this
    rank skips too (the ranks' weights stay identical)."""
    opt = trained_linear()
    before = snapshot(opt)
    other_rank_bad = lambda flag: flag + 1.0  # noqa: E731 - the all-reduce (sum) of this rank's flag and another's
    stepped, _, _ = step_together({"model": opt}, backward(opt, "finite"), 1.0, other_rank_bad)
    assert not stepped
    assert_same(before, snapshot(opt))
    stepped, _, _ = step_together({"model": opt}, backward(opt, "finite"), 1.0, lambda flag: flag * 2)
    assert stepped


def test_models_stepped_together_skip_together_and_clip_each_its_own_norm():
    """PPO's policy and critic: one non-finite loss skips both; each gradient is clipped to the global norm on
    its own (app. C.2) and its pre-clip norm returned."""
    a, b = trained_linear(0), trained_linear(1)
    before = snapshot(a), snapshot(b)
    loss = backward(a, "finite") + backward(b, "nan_loss")
    stepped, _, _ = step_together({"policy": a, "critic": b}, loss, 1.0)
    assert not stepped
    assert_same(before[0], snapshot(a)) and assert_same(before[1], snapshot(b))
    loss = backward(a, "finite") + backward(b, "finite")
    grads = {n: torch.cat([p.grad.flatten() for p in m.model.parameters()]) for n, m in (("p", a), ("c", b))}
    expected = {n: g.norm() for n, g in grads.items()}
    stepped, norms, _ = step_together({"policy": a, "critic": b}, loss, 1e-3)
    assert stepped
    torch.testing.assert_close(norms["policy"], expected["p"])
    torch.testing.assert_close(norms["critic"], expected["c"])


def test_micro_batches_accumulate_into_one_step():
    """Two half-weighted micro-batches, the first without gradient sync, give the step of the whole batch."""
    whole, split = trained_linear(), trained_linear()
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    whole.backward(whole.model(x).pow(2).mean())
    with split.no_sync():
        split.backward(0.5 * split.model(x[:2]).pow(2).mean())
    split.backward(0.5 * split.model(x[2:]).pow(2).mean())
    for p, q in zip(whole.model.parameters(), split.model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)


# ------------------------------------------------------------------------------------------------ float16


@pytest.fixture
def fp16_accelerator():
    """An Accelerator as accelerate builds it for float16 on a GPU (native AMP, one GradScaler for all models),
    on this CPU (where accelerate gives float16 no scaler): ``make(init_scale, growth_interval)``. accelerate's
    process-wide state is reset around it, as accelerate's own tests do, its precision differing from the others'."""
    from accelerate.state import AcceleratorState

    def make(init_scale: float, growth_interval: int = 2000) -> Accelerator:
        acc = Accelerator(mixed_precision="fp16", cpu=True)
        acc.native_amp = True
        acc.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=growth_interval)
        return acc

    AcceleratorState._reset_state(reset_partial_state=True)
    yield make
    AcceleratorState._reset_state(reset_partial_state=True)


# weights and inputs exact in float16: the autocast forward and backward are exact, as is the float32 reference
WEIGHTS = (
    ([[0.5, -0.25, 1.0], [0.75, 0.125, -0.5]], [0.25, -0.5]),
    ([[-0.5, 0.5, 0.25], [1.0, -0.75, 0.5]], [-0.25, 0.125]),
)
X = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0], [0.5, 0.5, 0.5]])


def exact_linear(index: int) -> torch.nn.Linear:
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor(WEIGHTS[index][0]))
        model.bias.copy_(torch.tensor(WEIGHTS[index][1]))
    return model


def scaled_models(acc: Accelerator, count: int) -> dict[str, Optimised]:
    """``count`` models prepared on ``acc`` in one call (as PPO's policy and critic), SGD with momentum: an
    update proportional to the gradient, so a gradient unscaled twice shows (Adam's first step would hide it)."""
    models = [exact_linear(i) for i in range(count)]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in models]
    schedules = [build_scheduler(o, OptimConfig(lr=0.1, schedule="cosine"), 10) for o in optimizers]
    prepared = acc.prepare(*(x for pair in zip(models, optimizers, strict=True) for x in pair))
    names = ("policy", "critic")[:count]
    return {
        name: Optimised(prepared[2 * i], prepared[2 * i + 1], schedules[i], acc, Engine())
        for i, name in enumerate(names)
    }


def scaled_backward(models: dict[str, Optimised], factor: float = 1.0) -> torch.Tensor:
    """One backward of all ``models``' losses (PPO's policy and value losses summed); ``factor`` large enough
    overflows the scaled float16 gradient."""
    loss = sum((m.model(X).float() * factor).pow(2).mean() for m in models.values())
    next(iter(models.values())).backward(loss)
    return loss.detach()


@pytest.mark.parametrize("count", [1, 2])
def test_float16_models_step_on_their_gradients_unscaled_once(fp16_accelerator, count):
    """Under a loss scale of 4096 the step's norms and weights are the float32 run's: each gradient unscaled
    once, by its own optimiser (a second unscale would divide it by 4096 again)."""
    acc = fp16_accelerator(4096.0)
    models = scaled_models(acc, count)
    reference = {name: exact_linear(i) for i, name in enumerate(models)}
    sum(r(X).pow(2).mean() for r in reference.values()).backward()
    expected_norms = {n: torch.nn.utils.clip_grad_norm_(r.parameters(), 1.0) for n, r in reference.items()}
    for r in reference.values():
        torch.optim.SGD(r.parameters(), lr=0.1, momentum=0.9).step()

    stepped, norms, _ = step_together(models, scaled_backward(models), 1.0)
    assert stepped
    assert expected_norms["policy"] > 1.0  # the clip is part of the step
    for name, m in models.items():
        torch.testing.assert_close(norms[name], expected_norms[name])
        for p, q in zip(m.model.parameters(), reference[name].parameters(), strict=True):
            torch.testing.assert_close(p, q)
        assert m.schedule.last_epoch == 1
        assert all(p.grad is None for p in m.model.parameters())


@pytest.mark.parametrize("count", [1, 2])
def test_a_float16_overflow_is_skipped_and_backs_the_scale_off_once(fp16_accelerator, count):
    """The first steps of a float16 run overflow while the scale settles: such a step changes no weight, optimiser
    state or schedule, halves the scale once (for all models) and the next step is taken at the new scale."""
    acc = fp16_accelerator(65536.0)
    models = scaled_models(acc, count)
    stepped, _, _ = step_together(models, scaled_backward(models, factor=0.25), 1.0)  # momentum to keep
    assert stepped and acc.scaler.get_scale() == 65536.0
    before = {name: snapshot(m) for name, m in models.items()}
    stepped, norms, overflow = step_together(models, scaled_backward(models, factor=64.0), 1.0)
    assert not stepped and not torch.isfinite(norms["policy"])
    assert overflow  # the scale settling: trainers do not count it towards max_nonfinite_in_row
    for name, m in models.items():
        assert_same(before[name], snapshot(m))
        assert all(p.grad is None for p in m.model.parameters())
    assert acc.scaler.get_scale() == 32768.0
    stepped, _, _ = step_together(models, scaled_backward(models, factor=0.25), 1.0)
    assert stepped and acc.scaler.get_scale() == 32768.0
    for name, m in models.items():
        assert not torch.equal(before[name][0]["weight"], m.model.weight)
        assert m.schedule.last_epoch == before[name][2]["last_epoch"] + 1


def test_only_a_float16_overflow_above_scale_1_with_a_finite_loss_is_the_scale_settling(fp16_accelerator):
    """A NaN loss, or an overflow once the scale is down to 1 (the gradient itself is not finite), is a skipped
    step like any other: it counts towards max_nonfinite_in_row."""
    acc = fp16_accelerator(2.0)
    models = scaled_models(acc, 1)
    assert step_together(models, scaled_backward(models, factor=1e5), 1.0).loss_scale_overflow  # scale 2 -> 1
    assert acc.scaler.get_scale() == 1.0
    result = step_together(models, scaled_backward(models, factor=1e5), 1.0)
    assert not result.stepped and not result.loss_scale_overflow
    result = step_together(models, scaled_backward(models, factor=0.25) * float("nan"), 1.0)
    assert not result.stepped and not result.loss_scale_overflow


@pytest.mark.parametrize("count", [1, 2])
def test_the_float16_scale_is_updated_once_per_step(fp16_accelerator, count):
    """The scale grows after ``growth_interval`` steps, however many models each step trains."""
    acc = fp16_accelerator(1024.0, growth_interval=2)
    models = scaled_models(acc, count)
    scales = []
    for _ in range(4):
        stepped, _, _ = step_together(models, scaled_backward(models), None)
        assert stepped
        scales.append(acc.scaler.get_scale())
    assert scales == [1024.0, 2048.0, 2048.0, 4096.0]
    assert all(m.schedule.last_epoch == 4 for m in models.values())


# ------------------------------------------------------------------------------------------------ the engine


def fake_accelerator(kind: DistributedType, processes: int, stage: int | None = None) -> SimpleNamespace:
    plugin = SimpleNamespace(zero_stage=stage)
    return SimpleNamespace(
        distributed_type=kind, num_processes=processes, state=SimpleNamespace(deepspeed_plugin=plugin)
    )


@pytest.mark.parametrize(
    ("kind", "processes", "stage", "facts"),
    [
        # name, owns_step, autocasts, shards_parameters, sharded_forward, gathers_for_save, syncs_each_backward
        (DistributedType.NO, 1, None, ("ddp", False, True, False, False, False, False)),
        (DistributedType.MULTI_CPU, 2, None, ("ddp", False, True, False, False, False, True)),
        (DistributedType.MULTI_GPU, 8, None, ("ddp", False, True, False, False, False, True)),
        (DistributedType.DEEPSPEED, 2, 2, ("deepspeed", True, False, False, False, True, False)),
        (DistributedType.DEEPSPEED, 2, 3, ("deepspeed", True, False, True, True, True, False)),
        (DistributedType.DEEPSPEED, 1, 3, ("deepspeed", True, False, True, False, True, False)),
        (DistributedType.FSDP, 2, None, ("fsdp", False, True, True, True, True, True)),
    ],
)
def test_the_engine_is_read_from_the_accelerator_and_answers_for_it(kind, processes, stage, facts):
    engine = Engine.of(fake_accelerator(kind, processes, stage))
    assert engine.zero_stage == (stage or 0) and engine.processes == processes
    names = ("owns_step", "autocasts", "shards_parameters", "sharded_forward", "gathers_for_save")
    got = (engine.name, *(getattr(engine, n) for n in names), engine.syncs_each_backward)
    assert got == facts


def test_only_the_launch_module_asks_accelerate_which_engine_runs():
    """Everything engine-specific is decided from the Engine (trainers/launch.py): no other module compares
    accelerate's distributed_type or looks at its DeepSpeed plugins."""
    pattern = re.compile(r"distributed_type|DistributedType|deepspeed_plugin|launch_engine\(")
    offenders = [
        f"{path.relative_to(SRC)}:{n}"
        for path in sorted(SRC.rglob("*.py"))
        if path.name != "launch.py"
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []


# ------------------------------------------------------------------------------------------------ DeepSpeed

DEEPSPEED_STEP = """
import torch
from ppomax.config import OptimConfig
from ppomax.optim import build_optimizer, build_scheduler
from ppomax.trainers.launch import Engine, build_accelerator
from ppomax.trainers.optimised import Optimised, step_together

acc = build_accelerator()
engine = Engine.of(acc)
assert engine.owns_step, engine
torch.manual_seed(0)
model = torch.nn.Linear(3, 2)
cfg = OptimConfig(lr=0.1, schedule="cosine")
optimizer = build_optimizer(model.parameters(), cfg.lr, cfg)
schedule = build_scheduler(optimizer, cfg, 20)
prepared = engine.prepare_trained(acc, {"model": (model, optimizer)}, 4, 1e6, "max_grad_norm")
opt = Optimised(*prepared["model"], schedule, acc, engine)
# under ZeRO-3 a parameter's own data is empty outside a forward: its partition is this rank's weights
local = lambda p: getattr(p, "ds_tensor", p)
weights = lambda: torch.cat([local(p).detach().clone().flatten() for p in opt.model.parameters()])
x = torch.ones(4, 3)
results, norms = [], []
for how in STEPS:
    before, last = weights(), schedule.last_epoch
    for _ in range(2):  # two micro-batches
        out = opt.model(x)
        loss = out.sum()  # a gradient that does not depend on the weights: each step's alike
        if how == "nan_loss":
            loss = loss * float("nan")
        elif how == "nonfinite_gradient":
            loss = (out - out.detach()).abs().sqrt().sum()
        opt.backward(loss)
    other_rank = (lambda flag: flag + 1.0) if how == "other_rank_nonfinite" else None
    stepped, measured, _ = step_together({"model": opt}, loss.detach(), 1e6, other_rank)
    if stepped:
        norms.append(round(float(measured["model"]), 4))
    results.append((how, stepped, not torch.equal(before, weights()), schedule.last_epoch - last))
print("RESULTS", results)
print("NORMS", norms)
"""
STEPS = ["finite", "other_rank_nonfinite", "finite", "nonfinite_gradient", "finite", "nan_loss", "finite"]


@pytest.mark.slow
@pytest.mark.parametrize("config", ["zero2", "zero3"])
def test_a_skipped_step_under_deepspeed_changes_nothing_and_leaves_no_gradient_behind(tmp_path, config):
    """Under DeepSpeed (one CPU process) the engine clips inside its step and skips a non-finite gradient
    itself: that step is reported skipped and the schedule stays, as on every other engine. A step ppomax skips
    (a NaN loss, another rank's non-finite step) drops the gradients the engine accumulated in its own buffers:
    the next step's gradient is its own only (the same norm as every other step's here)."""
    pytest.importorskip("deepspeed")
    from launch_helpers import free_port

    script = tmp_path / "step.py"
    script.write_text(f"STEPS = {STEPS!r}\n" + DEEPSPEED_STEP, encoding="utf-8")
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--config_file", str(SRC / "configs" / "accelerate" / f"{config}.yaml")]
    cmd += ["--num_processes", "1", "--num_machines", "1", "--main_process_port", str(free_port())]
    cmd += ["--mixed_precision", "no", str(script)]
    env = {**os.environ, "PYTHONPATH": str(SRC.parent), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(x.split(" ", 1) for x in proc.stdout.splitlines() if x.startswith(("RESULTS", "NORMS")))
    taken = [how == "finite" for how in STEPS]
    assert lines["RESULTS"] == str([(how, t, t, int(t)) for how, t in zip(STEPS, taken, strict=True)])
    norms = ast.literal_eval(lines["NORMS"])
    assert len(norms) == 4 and len(set(norms)) == 1, norms
