"""train-rm end to end on a tiny Llama: eq. 2 against a hand computation, learning a rule, artefacts, batching."""

from __future__ import annotations

import json
import math
import random
import subprocess

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import assert_same_run
from launch_helpers import accelerate_launch
from ppomax.checkpoint import step_dirs
from ppomax.cli import main
from ppomax.config import load_config
from ppomax.data import PreferenceCollator, load_preference_pairs, pad_id_of, tokenize_pair
from ppomax.models import ValueHeadModel
from ppomax.monitor import read_metrics
from ppomax.trainers.common import eval_shards, global_batches
from ppomax.trainers.launch import Engine
from ppomax.trainers.loop import accumulate
from ppomax.trainers.optimised import Optimised
from ppomax.trainers.reward_model import make_rm_loss, rm_counts
from ppomax.trainers.reward_model_report import margin_summary
from tiny_lm import make_tiny_lm, write_jsonl, write_yaml

WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "green",
    "seven",
    "table",
    "music",
    "bread",
    "light",
    "water",
    "paper",
    "horse",
    "glass",
    "chair",
    "field",
]


def rule_pairs(n: int, seed: int) -> list[dict]:
    """The preferred answer thanks the user (the word "thanks" replaces one of four random words)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ws = rng.sample(WORDS, 4)
        good = list(ws)
        good[rng.randrange(4)] = "thanks"
        out.append(
            {
                "prompt": f"Say four words about {rng.choice(WORDS)}.",
                "chosen": " ".join(good),
                "rejected": " ".join(ws),
            }
        )
    return out


def _texts(pairs):
    return [f"\n\nHuman: {p['prompt']}\n\nAssistant: {p['chosen']} {p['rejected']}" for p in pairs]


@pytest.fixture
def rm_setup(tmp_path):
    train, test = rule_pairs(128, 0), rule_pairs(64, 1)
    model = make_tiny_lm(tmp_path, _texts(train))
    cfg = {
        "model": {"policy": str(model)},
        "data": {
            "train": str(write_jsonl(tmp_path / "train.jsonl", train)),
            "valid": str(write_jsonl(tmp_path / "valid.jsonl", test[:32])),
            "test": str(write_jsonl(tmp_path / "test.jsonl", test[32:])),
        },
        "optim": {"lr": 3e-3, "warmup_ratio": 0.1},
        "epochs": 2,
        "batch_size": 16,
        "logging": {"out_dir": str(tmp_path / "run"), "progress": False, "eval_every": 8},
    }
    return tmp_path, cfg


def _accuracy(model_dir_or_model, feats, tok) -> float:
    model = model_dir_or_model
    if not isinstance(model, ValueHeadModel):
        model = ValueHeadModel.from_pretrained(model)
    model.eval()
    batch = PreferenceCollator(pad_id_of(tok))(feats)
    with torch.no_grad():
        s = model.score(batch["input_ids"], batch["attention_mask"])
    n = len(feats)
    return margin_summary((s[:n] - s[n:]).tolist())["accuracy"]


def test_without_a_test_split_the_validation_pairs_are_scored_once_at_the_end(rm_setup, monkeypatch):
    """With no data.test the final model's validation evaluation is the test split's score too: the held-out
    pairs are not run through the model a second time (on a 135M model that second pass took minutes)."""
    import ppomax.trainers.reward_model as reward

    tmp_path, cfg = rm_setup
    del cfg["data"]["test"]
    cfg["epochs"], cfg["logging"]["eval_every"] = 1, 0
    calls: list[str] = []
    real = reward.rm_margins

    def counted(*args, **kwargs):
        calls.append(kwargs.get("desc", "eval"))
        return real(*args, **kwargs)

    monkeypatch.setattr(reward, "rm_margins", counted)
    torch.set_num_threads(1)
    assert main(["train-rm", "--config", str(write_yaml(tmp_path / "rm.yaml", cfg))]) == 0
    assert calls == ["valid"]
    run = tmp_path / "run"
    final_eval = json.loads((run / "rm_eval_valid.json").read_text())
    evals = [r for r in read_metrics(run / "metrics.jsonl") if "eval/accuracy" in r]
    assert final_eval["pairs"] == 32 and final_eval["accuracy"] == pytest.approx(evals[-1]["eval/accuracy"])
    assert final_eval["accuracy"] == pytest.approx(_accuracy(run / "final", _feats(cfg, "valid"), _tok(cfg)))


def _tok(cfg):
    return AutoTokenizer.from_pretrained(cfg["model"]["policy"])


def _feats(cfg, split):
    return [tokenize_pair(_tok(cfg), p, 64, 32) for p in load_preference_pairs(cfg["data"][split])]


def test_rm_learns_a_rule_and_writes_its_artefacts(rm_setup, capsys):
    """Held-out accuracy >= 0.9 on pairs where the preferred answer contains "thanks" (untrained: far lower)."""
    tmp_path, cfg = rm_setup
    path = write_yaml(tmp_path / "rm.yaml", cfg)
    tok = AutoTokenizer.from_pretrained(cfg["model"]["policy"])
    held_out = [tokenize_pair(tok, p, 64, 32) for p in load_preference_pairs(cfg["data"]["test"])]
    before = _accuracy(ValueHeadModel.from_causal_lm(cfg["model"]["policy"], seed=42), held_out, tok)
    assert before < 0.8

    assert main(["train-rm", "--config", str(path)]) == 0
    run = tmp_path / "run"
    assert capsys.readouterr().out.strip().endswith(str(run / "final"))
    after = _accuracy(run / "final", held_out, tok)
    assert after >= 0.9, (before, after)

    records = read_metrics(run / "metrics.jsonl")
    train = [r for r in records if "train/loss" in r]
    assert len(train) == 16  # 128 pairs / 16 * 2 epochs
    assert {
        "train/rm_loss",
        "train/lm_loss",
        "train/accuracy",
        "train/margin_mean",
        "train/tokens_per_s",
    } <= set(train[0])
    assert train[-1]["train/loss"] < train[0]["train/loss"]
    evals = [r for r in records if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [8, 16]
    assert "eval/margin_mean" in evals[0] and evals[-1]["eval/accuracy"] >= 0.9
    final_test = json.loads((run / "rm_eval_test.json").read_text())
    assert final_test["pairs"] == 32 and final_test["accuracy"] == pytest.approx(after)
    assert len(final_test["margins"]) == 32
    assert (run / "rm_margins_test.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert load_config("rm", run / "config.yaml").batch_size == 16
    # best and final both load as value-head models and as plain causal LMs
    best = json.loads((run / "best" / "ppomax_eval.json").read_text())
    assert best["accuracy"] == max(r["eval/accuracy"] for r in evals)
    for d in ("best", "final"):
        ValueHeadModel.from_pretrained(run / d)
        AutoModelForCausalLM.from_pretrained(run / d)
        AutoTokenizer.from_pretrained(run / d)


def test_rm_loss_matches_eq2_by_hand(tmp_path):
    """make_rm_loss = -lam * mean log sigmoid(r_w - r_l) + beta * mean NLL(chosen response tokens), with the
    rewards from each sequence scored alone and the NLL from a plain loop over the backbone's logits."""
    pairs = rule_pairs(3, 5)
    model_dir = make_tiny_lm(tmp_path, _texts(pairs))
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = ValueHeadModel.from_causal_lm(model_dir, seed=1).eval()
    feats = [
        tokenize_pair(tok, p, 64, 32) for p in load_preference_pairs(write_jsonl(tmp_path / "p.jsonl", pairs))
    ]
    batch = PreferenceCollator(pad_id_of(tok))(feats)
    beta, lam = 0.7, 1.3
    with torch.no_grad():
        loss, metrics, _ = make_rm_loss(beta, lam)(model, batch)
        margins, nll_sum, nll_count = [], 0.0, 0
        for f in feats:
            r = {}
            for side in ("chosen", "rejected"):
                ids = torch.tensor([f["prompt_ids"] + f[f"{side}_ids"]])
                r[side] = model.score(ids, torch.ones_like(ids)).item()
            margins.append(r["chosen"] - r["rejected"])
            ids = f["prompt_ids"] + f["chosen_ids"]
            logits = model.backbone(torch.tensor([ids])).logits[0]
            for t in range(len(f["prompt_ids"]), len(ids)):
                nll_sum -= torch.log_softmax(logits[t - 1], -1)[ids[t]].item()
                nll_count += 1
    rank = sum(-math.log(1 / (1 + math.exp(-m))) for m in margins) / len(margins)
    expected = lam * rank + beta * nll_sum / nll_count
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    assert metrics["rm_loss"].item() == pytest.approx(rank, rel=1e-4)
    assert metrics["lm_loss"].item() == pytest.approx(nll_sum / nll_count, rel=1e-4)


def test_grad_accum_gives_the_gradient_of_one_big_batch(tmp_path):
    """4 pairs of different lengths as 3 + 1 micro-batches (as token-balanced batches give varying pair counts):
    the pairwise term is a mean over the step's pairs and the LM term over its chosen tokens, so the gradient
    equals that of the 4 pairs at once within 1e-6, and so do the logged means."""
    from accelerate import Accelerator

    pairs = rule_pairs(4, 7)
    for p, n in zip(pairs, [1, 6, 2, 4], strict=True):
        p["chosen"] = " ".join([p["chosen"]] * n)
    model_dir = make_tiny_lm(tmp_path, _texts(pairs))
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = ValueHeadModel.from_causal_lm(model_dir, seed=1)
    feats = [
        tokenize_pair(tok, p, 64, 64) for p in load_preference_pairs(write_jsonl(tmp_path / "p.jsonl", pairs))
    ]
    collate = PreferenceCollator(pad_id_of(tok))
    out = {}
    for split in ([feats], [feats[:3], feats[3:]]):
        trained = Optimised(model, None, None, Accelerator(cpu=True), Engine())
        metrics, *_ = accumulate(trained, [collate(b) for b in split], make_rm_loss(0.7, 1.3), rm_counts)
        out[len(split)] = [p.grad.clone() for p in model.parameters() if p.grad is not None], metrics
        model.zero_grad(set_to_none=True)
    (whole, m1), (micro, m2) = out[1], out[2]
    assert len(whole) == len(micro) > 0
    for a, b in zip(whole, micro, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    for k in ("loss", "rm_loss", "lm_loss", "accuracy", "margin_mean"):
        assert m2[k].item() == pytest.approx(m1[k].item(), rel=1e-5, abs=1e-7), k


def test_beta_zero_freezes_unused_lm_head_and_token_balanced_batches(rm_setup):
    tmp_path, cfg = rm_setup
    cfg.update(beta_rm=0.0, max_tokens_per_batch=600, epochs=1)
    cfg["logging"]["out_dir"] = str(tmp_path / "run0")
    assert main(["train-rm", "--config", str(write_yaml(tmp_path / "rm0.yaml", cfg))]) == 0
    records = [r for r in read_metrics(tmp_path / "run0" / "metrics.jsonl") if "train/loss" in r]
    assert all(r["train/lm_loss"] == 0 for r in records)
    assert all(r["train/loss"] == pytest.approx(r["train/rm_loss"]) for r in records)
    assert len({r["train/pairs"] for r in records}) > 1  # dynamic batch sizes
    base = AutoModelForCausalLM.from_pretrained(cfg["model"]["policy"])
    # the run's last checkpoint holds the module as trained, LM head included (the saved classifier has none)
    (_, last), *_ = reversed(step_dirs(tmp_path / "run0" / "checkpoints"))
    trained = load_file(str(last / "model.safetensors"))
    assert torch.equal(base.lm_head.weight, trained["backbone.lm_head.weight"])  # frozen: untouched
    assert not torch.equal(base.model.embed_tokens.weight, trained["backbone.model.embed_tokens.weight"])


def test_global_batches_respect_budget_and_shard_evenly():
    rng = random.Random(0)
    lengths = [rng.randint(5, 60) for _ in range(101)]
    for world in (1, 2, 3):
        steps = global_batches(lengths, world, epoch=0, seed=1, max_tokens=300)
        assert all(len(parts) == world for parts in steps)
        seen = [i for parts in steps for part in parts for i in part]
        assert len(seen) == len(set(seen))
        for parts in steps:
            for part in parts:
                assert max(lengths[i] for i in part) * len(part) <= 300
        fixed = global_batches(lengths, world, epoch=0, seed=1, batch_size=8)
        flat = sorted(i for parts in fixed for part in parts for i in part)
        assert flat == list(range(101))  # every example once per epoch
        assert all(0 < len(part) <= 8 for parts in fixed for part in parts)
    assert global_batches(lengths, 1, 0, 1, batch_size=8) != global_batches(lengths, 1, 1, 1, batch_size=8)


def test_eval_shards_cover_every_example_once_with_equal_counts():
    class Ctx:
        def __init__(self, rank, world):
            self.rank, self.world = rank, world

    for n, world, bs in [(10, 3, 2), (1, 2, 4), (7, 1, 3), (0, 2, 2)]:
        shards = [eval_shards(n, bs, Ctx(r, world)) for r in range(world)]
        assert len({len(s) for s in shards}) <= 1
        real = sorted(i for s in shards for idx, ok in s if ok for i in idx)
        assert real == list(range(n))


def test_missing_model_path_exit_code_2(tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", rule_pairs(4, 0))
    missing = tmp_path / "sft-model-that-is-not-there"
    rc = main(
        [
            "train-rm",
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


@pytest.mark.slow
def test_two_process_cpu_ddp(rm_setup):
    """The same command under `accelerate launch` with 2 CPU processes (gloo): trains, metrics reduced, one
    final model written, test margins of every pair gathered."""
    tmp_path, cfg = rm_setup
    cfg["epochs"] = 1
    path = write_yaml(tmp_path / "rm.yaml", cfg)
    proc = subprocess.run(
        [*accelerate_launch(2), "train-rm", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    train = [r for r in read_metrics(run / "metrics.jsonl") if "train/loss" in r]
    assert len(train) == 4  # 128 pairs / (16 per rank * 2 ranks)
    assert json.loads((run / "rm_eval_test.json").read_text())["pairs"] == 32
    ValueHeadModel.from_pretrained(run / "final")


def test_sigterm_saves_and_resume_ends_with_the_same_model(rm_setup, monkeypatch, capsys):
    """SIGTERM mid-run: checkpoint, the exit code every trainer uses, where and how to resume; --resume DIR
    then ends with the weights and best-model record of an uninterrupted run (2N == N + N)."""
    import signal

    import ppomax.trainers.reward_model as reward_mod
    from ppomax.errors import STOPPED_EXIT_CODE

    tmp_path, cfg = rm_setup
    cfg["epochs"] = 1  # 8 steps, evaluated at steps 4 and 8
    cfg["logging"].update(eval_every=4, tensorboard=False)
    path = write_yaml(tmp_path / "rm.yaml", cfg)
    assert main(["train-rm", "--config", str(path), "--set", f"logging.out_dir={tmp_path / 'ref'}"]) == 0
    real = reward_mod.make_rm_loss

    def make_loss_then_sigterm(beta_rm, lam):
        inner, calls = real(beta_rm, lam), {"n": 0}

        def loss(model, batch, weights=None):
            calls["n"] += 1
            if calls["n"] == 5:
                signal.raise_signal(signal.SIGTERM)
            return inner(model, batch, weights)

        return loss

    monkeypatch.setattr(reward_mod, "make_rm_loss", make_loss_then_sigterm)
    capsys.readouterr()
    assert main(["train-rm", "--config", str(path)]) == STOPPED_EXIT_CODE
    run = tmp_path / "run"
    assert f"ppomax train-rm --resume {run}" in capsys.readouterr().err
    assert (run / "checkpoints" / "step-5").is_dir() and not (run / "final").exists()
    monkeypatch.setattr(reward_mod, "make_rm_loss", real)
    assert main(["train-rm", "--resume", str(run)]) == 0
    assert (run / "best" / "ppomax_eval.json").is_file()
    assert_same_run(tmp_path / "ref", run)
    # resuming the finished run changes nothing: no step (nor the test-split record) logged twice
    text = (run / "metrics.jsonl").read_text()
    assert main(["train-rm", "--resume", str(run)]) == 0
    assert (run / "metrics.jsonl").read_text() == text


def test_a_run_checkpointed_before_value_heads_lost_their_bias_resumes(rm_setup, monkeypatch):
    """Earlier versions trained a head with a bias and did not record the layout: such a checkpoint (weights and
    optimiser state with the bias) resumes, and the run ends as it would have: a sequence classifier with the
    weights of an uninterrupted run (the ranking loss never moves the bias, so dropping it changes no score)."""
    import signal

    import ppomax.trainers.reward_model as reward_mod
    from ppomax.errors import STOPPED_EXIT_CODE
    from ppomax.trainers.run import LAYOUT_KEY, STATE_FILE

    def head_with_bias(hidden_size, seed=0):  # the head of earlier versions: a zero bias, trained
        head = torch.nn.Linear(hidden_size, 1)
        with torch.no_grad():
            head.weight.copy_(
                torch.randn(1, hidden_size, generator=torch.Generator().manual_seed(seed)) * 0.2
            )
            head.bias.zero_()
        return head

    tmp_path, cfg = rm_setup
    cfg["epochs"] = 1
    cfg["logging"].update(eval_every=4, tensorboard=False)
    path = write_yaml(tmp_path / "rm.yaml", cfg)
    with monkeypatch.context() as old:
        old.setattr(ValueHeadModel, "new_head", staticmethod(head_with_bias))
        assert main(["train-rm", "--config", str(path), "--set", f"logging.out_dir={tmp_path / 'ref'}"]) == 0
        real = reward_mod.make_rm_loss

        def make_loss_then_sigterm(beta_rm, lam):
            inner, calls = real(beta_rm, lam), {"n": 0}

            def loss(model, batch, weights=None):
                calls["n"] += 1
                if calls["n"] == 5:
                    signal.raise_signal(signal.SIGTERM)
                return inner(model, batch, weights)

            return loss

        old.setattr(reward_mod, "make_rm_loss", make_loss_then_sigterm)
        assert main(["train-rm", "--config", str(path)]) == STOPPED_EXIT_CODE
    run = tmp_path / "run"
    state_file = run / "checkpoints" / "step-5" / STATE_FILE
    state = json.loads(state_file.read_text())
    assert state.pop(LAYOUT_KEY) == {"value_head_bias": True}
    state_file.write_text(json.dumps(state))  # as an earlier version wrote it
    assert "value_head.bias" in load_file(str(state_file.parent / "model.safetensors"))
    assert main(["train-rm", "--resume", str(run)]) == 0
    a, b = (load_file(str(d / "final" / "model.safetensors")) for d in (tmp_path / "ref", run))
    assert "score.weight" in b and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_lm_term_runs_the_head_on_the_chosen_answers_only_with_the_same_loss_and_gradient(tmp_path):
    """Eq. 2's LM term reads the logits before each chosen-response token: the LM head runs on those K positions
    only (not the prompts, the rejected rows or the padding), and the loss and its gradient equal those of the
    full [2B, T, V] logits."""
    pairs = rule_pairs(4, 7)
    model_dir = make_tiny_lm(tmp_path, _texts(pairs))
    tok = AutoTokenizer.from_pretrained(model_dir)
    feats = [
        tokenize_pair(tok, p, 64, 32) for p in load_preference_pairs(write_jsonl(tmp_path / "p.jsonl", pairs))
    ]
    batch = PreferenceCollator(pad_id_of(tok))(feats)
    n, beta, lam = batch["num_pairs"], 0.7, 1.3

    def full_loss(model):
        out = model(batch["input_ids"], batch["attention_mask"], return_lm_logits=True)
        mask = batch["lm_mask"][:n, 1:]
        logp = torch.log_softmax(out.lm_logits[:n, :-1].float(), -1)
        token = logp.gather(-1, batch["input_ids"][:n, 1:].unsqueeze(-1)).squeeze(-1)
        nll = -(token * mask).sum() / mask.sum()
        rank = -torch.nn.functional.logsigmoid(out.scores[:n] - out.scores[n:]).mean()
        return lam * rank + beta * nll

    seen: list[int] = []
    losses, grads = [], []
    for narrowed in (True, False):
        model = ValueHeadModel.from_causal_lm(model_dir, seed=1)
        if narrowed:
            model.backbone.get_output_embeddings().register_forward_hook(
                lambda _m, args, _o: seen.append(args[0].shape[:-1].numel())
            )
            loss = make_rm_loss(beta, lam)(model, batch)[0]
        else:
            loss = full_loss(model)
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert seen == [int(batch["lm_mask"][:n, 1:].sum())]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
