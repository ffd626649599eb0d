"""train-sft end to end on a tiny Llama, the response-only loss checked directly, pretraining from a config, resume."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import assert_same_run, set_args
from ppomax.cli import main
from ppomax.config import load_config
from ppomax.data import IGNORE_INDEX, LoadStats, SFTCollator, SFTExample, pad_id_of, tokenize_sft
from ppomax.errors import STOPPED_EXIT_CODE
from ppomax.monitor import read_metrics
from ppomax.trainers.launch import Engine
from ppomax.trainers.loop import accumulate
from ppomax.trainers.optimised import Optimised
from ppomax.trainers.sft import pretrain_features, sft_counts, sft_features, sft_loss
from tiny_lm import make_tiny_lm, write_jsonl, write_yaml

WORDS = ["apple", "river", "stone", "cloud", "green", "seven", "table", "music"]
RECORDS = [{"prompt": f"Repeat the word {w}.", "response": f"{w} {w} {w}"} for w in WORDS]
TEXTS = [f"\n\nHuman: {r['prompt']}\n\nAssistant: {r['response']}" for r in RECORDS]


@pytest.fixture
def sft_setup(tmp_path):
    model = make_tiny_lm(tmp_path, TEXTS)
    train = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    cfg = {
        "model": {"policy": str(model)},
        "data": {"train": str(train), "valid": str(train)},
        "optim": {"lr": 3e-3, "schedule": "cosine"},
        "epochs": 4,
        "batch_size": 4,
        "logging": {"out_dir": str(tmp_path / "run"), "eval_every": 4, "progress": False},
    }
    return tmp_path, cfg


def _losses(records, key):
    return [r[key] for r in records if key in r]


def test_train_sft_cli_end_to_end(sft_setup, capsys):
    tmp_path, cfg = sft_setup
    path = write_yaml(tmp_path / "sft.yaml", cfg)
    assert main(["train-sft", "--config", str(path), "--set", "seed=3"]) == 0
    run = tmp_path / "run"
    out = capsys.readouterr()
    assert out.out == f"{run / 'final'}\n"  # the result alone on stdout; messages on stderr, one way
    assert "ppomax: model: " in out.err and f"ppomax: saved {run / 'final'}" in out.err
    assert load_config("sft", run / "config.yaml").seed == 3  # the resolved config, overrides included
    records = read_metrics(run / "metrics.jsonl")
    train = _losses(records, "train/loss")
    assert len(train) == 8  # 8 examples / batch 4 * 4 epochs
    assert sum(train[-2:]) < sum(train[:2]) - 0.5
    evals = _losses(records, "eval/loss")
    assert len(evals) == 2 and evals[-1] < evals[0]  # at step 4 and at the end
    ppl = [r["eval/ppl"] for r in records if "eval/ppl" in r]
    assert ppl[-1] == pytest.approx(math.exp(evals[-1]), rel=1e-6)
    # cosine schedule decaying to 10% of the peak at the end of training (paper 5.1)
    lrs = _losses(records, "train/lr")
    expected = [3e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / 7))) for k in range(8)]
    assert lrs == pytest.approx(expected, rel=1e-6)
    assert lrs[-1] == pytest.approx(3e-4, rel=1e-6)
    assert list((run / "tb").glob("events.out.tfevents.*"))
    model = AutoModelForCausalLM.from_pretrained(run / "final")
    tok = AutoTokenizer.from_pretrained(run / "final")
    assert model.get_input_embeddings().num_embeddings == len(tok)
    # the same command again is refused (it would append to this run), and nothing is touched
    before = (run / "metrics.jsonl").read_text()
    assert main(["train-sft", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{run} already holds a run" in err and "--overwrite" in err and f"--resume {run}" in err
    assert (run / "metrics.jsonl").read_text() == before
    # --overwrite replaces it: one run's steps, not two
    assert main(["train-sft", "--config", str(path), "--overwrite"]) == 0
    assert len(_losses(read_metrics(run / "metrics.jsonl"), "train/loss")) == 8


def test_sft_loss_is_response_only(tmp_path):
    """Labels are -100 on the prompt; the loss equals a hand loop over response tokens; logits at positions
    that predict prompt tokens get exactly zero gradient."""
    model_dir = make_tiny_lm(tmp_path, TEXTS)
    tok = AutoTokenizer.from_pretrained(model_dir)
    ex = SFTExample("\n\nHuman: Repeat the word apple.\n\nAssistant:", " apple apple apple")
    ex2 = SFTExample("\n\nHuman: Repeat the word stone, please.\n\nAssistant:", " stone")
    feats = [tokenize_sft(tok, e, 64, 64) for e in (ex, ex2)]
    for f, e in zip(feats, (ex, ex2), strict=True):
        n_prompt = f["prompt_length"]
        assert all(label == IGNORE_INDEX for label in f["labels"][:n_prompt])
        assert f["labels"][n_prompt:] == f["input_ids"][n_prompt:]
        assert tok.decode(f["input_ids"][n_prompt:], skip_special_tokens=True) == e.response
    batch = SFTCollator(pad_id_of(tok))(feats)

    torch.manual_seed(0)
    vocab = len(tok)
    logits = torch.randn(*batch["input_ids"].shape, vocab, requires_grad=True)

    class FakeLM(torch.nn.Module):
        def forward(self, input_ids, attention_mask, use_cache=False):
            return type("Out", (), {"logits": logits})()

    loss, metrics, _ = sft_loss(FakeLM(), batch)
    # independent: plain loop over rows and positions
    total, count = 0.0, 0
    for b, f in enumerate(feats):
        for t in range(f["prompt_length"], len(f["input_ids"])):
            total -= torch.log_softmax(logits[b, t - 1].detach(), -1)[f["input_ids"][t]].item()
            count += 1
    assert loss.item() == pytest.approx(total / count, rel=1e-5)
    assert metrics["target_tokens"].item() == count
    loss.backward()
    grad_rows = logits.grad.abs().sum(-1)
    for b, f in enumerate(feats):
        for t in range(logits.shape[1]):
            trains = f["prompt_length"] <= t + 1 < len(f["input_ids"])  # logit t predicts token t + 1
            assert (grad_rows[b, t] > 0).item() == trains, (b, t)


def test_hh_dialogue_trains_assistant_turns_only(tmp_path):
    model_dir = make_tiny_lm(tmp_path, TEXTS)
    tok = AutoTokenizer.from_pretrained(model_dir)
    dialogue = "\n\nHuman: Say apple.\n\nAssistant: apple\n\nHuman: Now river.\n\nAssistant: river"
    path = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": dialogue}])
    cfg = load_config("sft", overrides=[f"model.policy={model_dir}", f"data.train={path}"])
    (f,) = sft_features(str(path), tok, cfg, LoadStats())
    trained = tok.decode(
        [i for i, lab in zip(f["input_ids"], f["labels"], strict=True) if lab != IGNORE_INDEX]
    )
    assert "apple" in trained and "river" in trained
    assert "Human" not in trained and "Say" not in trained and "Now" not in trained


def test_pretrain_from_config_only_directory(tmp_path, capsys):
    """objective=pretrain + init_from_config: a directory with config.json and a tokenizer, no weights."""
    model_dir = make_tiny_lm(tmp_path, TEXTS, weights=False)
    assert not (model_dir / "model.safetensors").exists()
    data = write_jsonl(tmp_path / "pretrain.jsonl", [{"text": t} for t in TEXTS] + [{"text": "apple " * 40}])
    tok = AutoTokenizer.from_pretrained(model_dir)
    feats = pretrain_features(str(data), tok, block=16)
    assert all(f["labels"] == f["input_ids"] and 2 <= len(f["input_ids"]) <= 16 for f in feats)
    assert len(feats) > len(TEXTS) + 1  # long texts were split into blocks
    assert feats[0]["input_ids"][-1] != tok.eos_token_id or len(feats[0]["input_ids"]) < 16
    overrides = [
        f"model.policy={model_dir}",
        f"data.train={data}",
        "objective=pretrain",
        "init_from_config=true",
        "optim.lr=3e-3",
        "epochs=6",
        "batch_size=4",
        f"logging.out_dir={tmp_path / 'run'}",
        "logging.progress=false",
    ]
    args = ["train-sft", *set_args(*overrides)]
    assert main(args) == 0
    losses = _losses(read_metrics(tmp_path / "run" / "metrics.jsonl"), "train/loss")
    assert losses[0] > math.log(len(tok)) - 1.0  # random init: about uniform
    assert losses[-1] < losses[0] - 1.0
    AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    # without init_from_config the weightless directory is refused with a hint
    again = [o for o in overrides if not o.startswith(("init_from_config", "logging.out_dir"))]
    again.append(f"logging.out_dir={tmp_path / 'r2'}")
    assert main(["train-sft", *set_args(*again)]) == 2
    assert "init_from_config" in capsys.readouterr().err


def test_missing_model_path_is_a_clear_error(tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    missing = tmp_path / "no-such-model"
    rc = main(
        [
            "train-sft",
            "--set",
            f"model.policy={missing}",
            "--set",
            f"data.train={train}",
            "--set",
            f"logging.out_dir={tmp_path / 'run'}",
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "Traceback" not in err


def test_missing_data_file_is_a_clear_error(sft_setup, capsys):
    tmp_path, cfg = sft_setup
    cfg["data"]["train"] = str(tmp_path / "nope.jsonl")
    assert main(["train-sft", "--config", str(write_yaml(tmp_path / "c.yaml", cfg))]) == 2
    assert "nope.jsonl" in capsys.readouterr().err


def test_resume_continues_as_if_uninterrupted(sft_setup):
    """A run resumed from its step-4 checkpoint logs the same metrics and ends with the same weights. The
    resumed directory is a copy: `--resume DIR` writes into DIR, never into the out_dir its config.yaml names."""
    tmp_path, cfg = sft_setup
    cfg["logging"].update(checkpoint_every=4, eval_every=0)
    cfg["epochs"] = 3
    cfg["optim"]["schedule"] = "linear"
    a = write_yaml(tmp_path / "a.yaml", cfg)
    assert main(["train-sft", "--config", str(a)]) == 0
    run = tmp_path / "run"
    # the last step (6) is checkpointed too, so resuming a finished run has nothing left to do
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-4", "step-6"]
    assert (run / "checkpoints" / "step-4" / "ppomax_state.json").is_file()
    # "crash" after step 4: a copy of the run dir without the final model, the step-6 checkpoint and with the
    # later log lines
    crashed = tmp_path / "crashed"
    shutil.copytree(run, crashed)
    shutil.rmtree(crashed / "final")
    shutil.rmtree(crashed / "checkpoints" / "step-6")
    full_text = (run / "metrics.jsonl").read_text()
    assert main(["train-sft", "--resume", str(crashed)]) == 0
    assert (run / "metrics.jsonl").read_text() == full_text  # the original run was not touched
    assert_same_run(run, crashed)
    # resuming the finished run: nothing to do, nothing logged twice
    assert main(["train-sft", "--resume", str(run)]) == 0
    assert (run / "metrics.jsonl").read_text() == full_text


def test_sigterm_saves_a_checkpoint_and_resume_finishes_identically(sft_setup, monkeypatch, capsys):
    """SIGTERM mid-run: a checkpoint at the current step, the documented exit code and a message saying where
    and how to resume; --resume DIR ends where an uninterrupted run ends (same weights)."""
    import signal

    import ppomax.trainers.sft as sft_mod

    tmp_path, cfg = sft_setup
    cfg["logging"]["eval_every"] = 0
    cfg["epochs"] = 2  # 4 steps
    path = write_yaml(tmp_path / "c.yaml", cfg)
    assert main(["train-sft", "--config", str(path), "--set", f"logging.out_dir={tmp_path / 'ref'}"]) == 0

    calls = {"n": 0}
    real_loss = sft_mod.sft_loss

    def loss_then_sigterm(model, batch, weights=None):
        calls["n"] += 1
        if calls["n"] == 3:
            signal.raise_signal(signal.SIGTERM)  # handled: the step finishes, then checkpoint + stop
        return real_loss(model, batch, weights)

    monkeypatch.setattr(sft_mod, "sft_loss", loss_then_sigterm)
    capsys.readouterr()
    assert main(["train-sft", "--config", str(path)]) == STOPPED_EXIT_CODE
    run = tmp_path / "run"
    err = capsys.readouterr().err
    assert f"checkpoint saved in {run / 'checkpoints' / 'step-3'}" in err
    assert f"ppomax train-sft --resume {run}" in err and "Traceback" not in err
    assert (run / "checkpoints" / "step-3").is_dir() and not (run / "final").exists()
    monkeypatch.setattr(sft_mod, "sft_loss", real_loss)
    assert main(["train-sft", "--resume", str(run)]) == 0
    assert_same_run(tmp_path / "ref", run)


def test_nonfinite_updates_are_skipped_then_stop_the_run(sft_setup, monkeypatch, capsys):
    import ppomax.trainers.sft as sft_mod

    tmp_path, cfg = sft_setup
    cfg["logging"]["eval_every"] = 0
    path = write_yaml(tmp_path / "c.yaml", cfg)
    real_loss = sft_mod.sft_loss
    bad_calls = {1, 3, 4}  # one isolated bad step, then two in a row (limit 2)

    def sometimes_nan(model, batch, weights=None):
        sometimes_nan.n += 1
        loss, metrics, n = real_loss(model, batch, weights)
        return (loss * float("nan") if sometimes_nan.n in bad_calls else loss), metrics, n

    sometimes_nan.n = 0
    monkeypatch.setattr(sft_mod, "sft_loss", sometimes_nan)
    before = AutoModelForCausalLM.from_pretrained(cfg["model"]["policy"]).state_dict()
    assert main(["train-sft", "--config", str(path), "--set", "max_nonfinite_in_row=2"]) == 2
    assert "2 non-finite updates in a row at step 4" in capsys.readouterr().err
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["train/skipped_updates"] for r in records] == [1, 1, 2]
    assert all(math.isfinite(r["train/grad_norm"]) for r in records[1:2])
    # an isolated skipped step leaves the weights as they were: run only the first step with a NaN
    bad_calls.clear()
    bad_calls.add(1)
    sometimes_nan.n = 0
    cfg["epochs"] = 0.5  # one step
    cfg["logging"]["out_dir"] = str(tmp_path / "one")
    assert main(["train-sft", "--config", str(write_yaml(tmp_path / "one.yaml", cfg))]) == 0
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "one" / "final").state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_skipped_step_leaves_the_learning_rate_schedule_where_it_was(sft_setup, monkeypatch):
    """A skipped (non-finite) step is no optimiser step: the schedule does not advance, so the step after it
    runs at the rate the skipped one had, and the rest of the run follows the schedule one step late (as PPO's
    skipped updates, and on every engine: under DeepSpeed the engine's own skip counts alike)."""
    import ppomax.trainers.sft as sft_mod

    tmp_path, cfg = sft_setup
    cfg["logging"]["eval_every"] = 0
    real_loss = sft_mod.sft_loss
    calls = {"n": 0, "bad": 0}

    def nan_at(model, batch, weights=None):
        calls["n"] += 1
        loss, metrics, n = real_loss(model, batch, weights)
        return (loss * float("nan") if calls["n"] == calls["bad"] else loss), metrics, n

    monkeypatch.setattr(sft_mod, "sft_loss", nan_at)
    lrs = {}
    for name, bad in (("clean", 0), ("skipped", 2)):
        calls.update(n=0, bad=bad)
        cfg["logging"]["out_dir"] = str(tmp_path / name)
        assert main(["train-sft", "--config", str(write_yaml(tmp_path / f"{name}.yaml", cfg))]) == 0
        records = [r for r in read_metrics(tmp_path / name / "metrics.jsonl") if "train/lr" in r]
        lrs[name] = [r["train/lr"] for r in records]
    clean, skipped = lrs["clean"], lrs["skipped"]
    assert len(clean) == len(skipped) == 8 and len(set(clean)) == 8  # cosine: a new rate every step
    assert skipped == [clean[0], clean[1], *clean[1:-1]]


def test_bf16_trains_float32_masters_and_saves_them(sft_setup):
    """model.dtype bfloat16 is mixed precision: the loss falls as in float32 (pure bf16 weights lose small
    updates), and final/ holds the float32 masters, which load with plain transformers (tests/test_saving.py)."""
    tmp_path, cfg = sft_setup
    cfg["model"]["dtype"] = "bfloat16"
    cfg["logging"]["eval_every"] = 0
    assert main(["train-sft", "--config", str(write_yaml(tmp_path / "bf16.yaml", cfg))]) == 0
    train = _losses(read_metrics(tmp_path / "run" / "metrics.jsonl"), "train/loss")
    assert sum(train[-2:]) < sum(train[:2]) - 0.5
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final", dtype="auto")
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_grad_accum_counts_optimizer_steps(sft_setup):
    tmp_path, cfg = sft_setup
    cfg.update(batch_size=2, grad_accum=2, epochs=2)
    cfg["logging"]["eval_every"] = 0
    assert main(["train-sft", "--config", str(write_yaml(tmp_path / "c.yaml", cfg))]) == 0
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "train/loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # 8 examples / (2 * 2) * 2 epochs


def _grads(model):
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_grad_accum_gives_the_gradient_of_one_big_batch(tmp_path):
    """grad_accum only bounds memory: 4 examples with different response lengths as 3 + 1 micro-batches give the
    gradient of the 4 at once within 1e-6 (the loss is the token mean over the whole step), and the same loss."""
    from accelerate import Accelerator

    model_dir = make_tiny_lm(tmp_path, TEXTS)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    lengths = zip(WORDS[:4], [5, 1, 3, 2], strict=True)
    examples = [SFTExample(f"Repeat the word {w}.", " " + " ".join([w] * n)) for w, n in lengths]
    feats = [tokenize_sft(tok, e, 64, 64) for e in examples]
    collate = SFTCollator(pad_id_of(tok))
    out = {}
    for split in ([feats], [feats[:3], feats[3:]]):
        trained = Optimised(model, None, None, Accelerator(cpu=True), Engine())
        metrics, *_ = accumulate(trained, [collate(b) for b in split], sft_loss, sft_counts)
        out[len(split)] = _grads(model), metrics
        model.zero_grad(set_to_none=True)
    (whole, m1), (micro, m2) = out[1], out[2]
    for a, b in zip(whole, micro, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert m2["loss"].item() == pytest.approx(m1["loss"].item(), rel=1e-6)
