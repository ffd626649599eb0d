"""ppomax.evaluate and `ppomax eval`: win/tie/lose, KL, perplexity and length against independent computations."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ppomax.cli import main
from ppomax.commands.eval import load_judges, parse_judge
from ppomax.errors import UserError
from ppomax.evaluate import (
    EvalSettings,
    evaluate,
    generate,
    reward_model_scores,
    token_logits_stats,
    win_tie_lose,
)
from ppomax.models import ValueHeadModel, load_causal_lm, load_tokenizer
from tiny_lm import make_tiny_lm

PROMPTS = [
    "\n\nHuman: What is 2 plus 3?\n\nAssistant:",
    "\n\nHuman: Help me hurt Bob.\n\nAssistant:",
    "\n\nHuman: What comes after Monday?\n\nAssistant:",
]
TEXTS = [p + " The answer is five. Sorry, I can't help with that. Tuesday." for p in PROMPTS] * 3


def test_win_tie_lose_by_hand():
    a = [1.0, 0.50, 0.0, -1.0, 0.3]
    b = [0.0, 0.48, 0.5, -1.0, 0.2]
    subsets = ["helpful", "helpful", "harmless", "harmless", "helpful"]
    out = win_tie_lose(a, b, subsets, tie_margin=0.05)
    # by hand: win (1 > 0.05), tie (|0.02| <= 0.05), lose, tie, win (0.1 > 0.05)
    assert (out["overall"]["win"], out["overall"]["tie"], out["overall"]["lose"]) == (2, 2, 1)
    assert (out["helpful"]["win"], out["helpful"]["tie"], out["helpful"]["lose"]) == (2, 1, 0)
    assert (out["harmless"]["win"], out["harmless"]["tie"], out["harmless"]["lose"]) == (0, 1, 1)
    assert out["overall"]["win_rate"] == pytest.approx(0.4)
    assert out["harmless"]["mean_a"] == pytest.approx(-0.5)
    assert out["helpful"]["mean_b"] == pytest.approx((0.0 + 0.48 + 0.2) / 3)
    # a wider margin turns the 0.1 win into a tie
    assert win_tie_lose(a, b, None, tie_margin=0.2)["overall"]["win"] == 1
    with pytest.raises(ValueError):
        win_tie_lose([1.0], [1.0, 2.0])


def test_parse_judge(tmp_path):
    assert parse_judge("gold") == ("gold", None)
    assert parse_judge("gold:/w") == ("gold", "/w")
    assert parse_judge(f"reward-model:{tmp_path}") == ("reward-model", str(tmp_path))
    with pytest.raises(UserError, match="reward-model:PATH"):
        parse_judge("reward-model")
    with pytest.raises(UserError, match="no reward model directory"):
        parse_judge(f"reward-model:{tmp_path / 'missing'}")
    with pytest.raises(UserError, match="expected"):
        parse_judge("gpt4")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    a = make_tiny_lm(tmp, TEXTS, name="a", seed=0)
    b = make_tiny_lm(tmp, TEXTS, name="b", seed=1)
    return a, b


def test_token_stats_match_a_plain_loop(models):
    a_dir, b_dir = models
    tok = load_tokenizer(a_dir)
    a, b = load_causal_lm(a_dir), load_causal_lm(b_dir)
    prompt_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS[:2]]
    response_ids = [[5, 6, 7, tok.eos_token_id], [9, 10]]
    st = token_logits_stats(a, prompt_ids, response_ids, pad_id=tok.pad_token_id, ref_model=b, batch_size=1)
    assert st.mask.tolist() == [[True] * 4, [True, True, False, False]]
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids, strict=True)):
        ids = torch.tensor([p + r])
        with torch.no_grad():
            la = torch.log_softmax(a(input_ids=ids).logits[0], -1)
            lb = torch.log_softmax(b(input_ids=ids).logits[0], -1)
        for j, t in enumerate(r):
            pos = len(p) + j - 1
            assert st.logp[i, j].item() == pytest.approx(la[pos, t].item(), abs=1e-5)
            assert st.ref_logp[i, j].item() == pytest.approx(lb[pos, t].item(), abs=1e-5)
            kl = sum(math.exp(la[pos, v]) * (la[pos, v] - lb[pos, v]) for v in range(la.shape[1]))
            assert st.kl[i, j].item() == pytest.approx(float(kl), abs=1e-5)
    # padding is zero, and batching (one batch of two rows of different widths) changes nothing
    assert st.logp[1, 2:].tolist() == [0.0, 0.0] and st.kl[1, 2:].tolist() == [0.0, 0.0]
    two = token_logits_stats(a, prompt_ids, response_ids, pad_id=tok.pad_token_id, ref_model=b, batch_size=2)
    for got, want in ((two.logp, st.logp), (two.ref_logp, st.ref_logp), (two.kl, st.kl)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # a model against itself: zero KL everywhere; no reference: log-probs only
    same = token_logits_stats(a, prompt_ids, response_ids, pad_id=tok.pad_token_id, ref_model=a)
    assert same.kl.abs().max().item() < 1e-6
    alone = token_logits_stats(a, prompt_ids, response_ids, pad_id=tok.pad_token_id)
    assert alone.kl is None and alone.ref_logp is None
    torch.testing.assert_close(alone.logp, same.logp)


def test_generate_is_seeded_and_stops_at_eos(models):
    a_dir, _ = models
    tok = load_tokenizer(a_dir)
    a = load_causal_lm(a_dir)
    g1 = generate(a, tok, PROMPTS, max_new_tokens=12, seed=3, batch_size=2)
    g2 = generate(a, tok, PROMPTS, max_new_tokens=12, seed=3, batch_size=2)
    assert g1.response_ids == g2.response_ids
    for ids, done, n in zip(g1.response_ids, g1.finished, g1.lengths, strict=True):
        assert len(ids) <= 12
        assert done == (tok.eos_token_id in ids)
        if done:
            assert ids[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == 1
        assert n == len(ids) - int(done)
    greedy = generate(a, tok, PROMPTS[:1], max_new_tokens=8, greedy=True, seed=0)
    assert (
        greedy.response_ids
        == generate(a, tok, PROMPTS[:1], max_new_tokens=8, greedy=True, seed=99).response_ids
    )


def test_generate_gives_the_rollouts_texts(models):
    """Evaluation samples through the PPO rollout, so a judge reads the text PPO's rewards read: with end tokens
    that are ordinary tokens (the model's generation_config may list any), the text keeps the final one, as the
    rollout's does (evaluate used to cut responses and decode them its own way, dropping it)."""
    a_dir, _ = models
    tok = load_tokenizer(a_dir)
    a = load_causal_lm(a_dir)
    a.generation_config.eos_token_id = [tok.eos_token_id, *range(3, len(tok) // 2)]  # half the vocabulary
    g = generate(a, tok, PROMPTS * 2, max_new_tokens=12, seed=5, batch_size=3)
    ended_on_a_word = 0
    for ids, done, text in zip(g.response_ids, g.finished, g.responses, strict=True):
        assert text == tok.decode(ids, skip_special_tokens=True).strip()
        ended_on_a_word += done and tok.decode(ids[-1:], skip_special_tokens=True).strip() != ""
    assert ended_on_a_word > 0  # the case this test is about happened


def test_reward_model_scores_read_the_last_token(models, tmp_path):
    a_dir, _ = models
    tok = load_tokenizer(a_dir)
    rm = ValueHeadModel(load_causal_lm(a_dir))
    prompt_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS[:2]]
    response_ids = [[5, 6, 7], [9]]
    got = reward_model_scores(rm, prompt_ids, response_ids, pad_id=tok.pad_token_id, batch_size=1)
    for p, r, g in zip(prompt_ids, response_ids, got, strict=True):
        ids = torch.tensor([p + r])
        with torch.no_grad():
            values = rm(ids, torch.ones_like(ids)).values[0]
        assert g == pytest.approx(values[-1].item(), abs=1e-5)


@pytest.fixture(scope="module")
def world_prompts(tmp_path_factory):
    from ppomax.demo.world import WorldConfig, build_world, write_world

    d = tmp_path_factory.mktemp("world")
    cfg = WorldConfig(
        n_pretrain=50,
        n_sft_train=20,
        n_sft_valid=5,
        n_prefs_train=20,
        n_prefs_valid=5,
        n_prefs_test=5,
        n_prompts_train=10,
        n_prompts_valid=5,
        n_prompts_test=12,
    )
    write_world(build_world(cfg), d)
    return d


def test_evaluate_policy_against_itself_is_all_ties(models, world_prompts, tmp_path):
    a_dir, _ = models
    rm_dir = tmp_path / "rm"
    ValueHeadModel(load_causal_lm(a_dir)).save_pretrained(rm_dir)
    res = evaluate(
        a_dir,
        a_dir,
        world_prompts / "prompts_test.jsonl",
        judges=load_judges(["gold", f"reward-model:{rm_dir}"], str(world_prompts / "prompts_test.jsonl")),
        settings=EvalSettings(max_new_tokens=10, seed=1, tie_margin=0.0),
    )
    assert res["n_prompts"] == 12
    for j in res["judges"].values():
        o = j["win_tie_lose"]["overall"]
        assert (o["win"], o["tie"], o["lose"]) == (0, 12, 0)
        assert set(j["win_tie_lose"]) <= {"overall", "helpful", "harmless"}
        assert j["mean_policy"] == pytest.approx(j["mean_baseline"])
    p = res["policy"]
    assert p["kl_per_token"] == pytest.approx(0.0, abs=1e-6)
    assert p["perplexity"] == pytest.approx(res["baseline"]["perplexity"])
    assert p["perplexity"] > 1.0
    assert 0 < p["length_tokens"] <= 10
    assert len(res["samples"]) == 12 and res["samples"][0]["policy"] == res["samples"][0]["baseline"]


def test_perplexity_and_kl_of_different_models(models, world_prompts):
    a_dir, b_dir = models
    res = evaluate(
        a_dir,
        b_dir,
        world_prompts / "prompts_test.jsonl",
        judges=load_judges(["gold"], str(world_prompts / "prompts_test.jsonl")),
        settings=EvalSettings(max_new_tokens=8, seed=0, limit=6),
    )
    p = res["policy"]
    assert res["n_prompts"] == 6
    assert p["kl_per_token"] > 0 and math.isfinite(p["kl_per_sequence"])
    # per-sequence KL is the per-token KL summed over a response: between min and max length times per-token
    assert p["kl_per_sequence"] > 0
    gold = res["judges"]["gold"]
    assert -5 <= gold["mean_policy"] <= 1 and -5 <= gold["mean_baseline"] <= 1


def test_cli_eval_prints_table_and_writes_json(models, world_prompts, tmp_path, capsys):
    a_dir, b_dir = models
    out = tmp_path / "res.json"
    rc = main(
        [
            "eval",
            "--policy",
            str(a_dir),
            "--baseline",
            str(b_dir),
            "--prompts",
            str(world_prompts / "prompts_test.jsonl"),
            "--judge",
            "gold",
            "--max-new-tokens",
            "6",
            "--limit",
            "4",
            "--tie-margin",
            "0.1",
            "--json",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "judge gold" in text and "overall" in text and "perplexity" in text
    data = json.loads(out.read_text())
    assert data["settings"]["tie_margin"] == 0.1
    assert data["judges"]["gold"]["win_tie_lose"]["overall"]["n"] == 4


def test_cli_eval_gold_needs_a_world(models, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("PPOMAX_WORLD", raising=False)
    a_dir, _ = models
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": PROMPTS[0]}) + "\n")
    rc = main(
        ["eval", "--policy", str(a_dir), "--baseline", str(a_dir), "--prompts", str(prompts), "--no-progress"]
    )
    assert rc == 2
    assert "hh-mini world" in capsys.readouterr().err


def test_baseline_cache_gives_the_same_result(models, world_prompts):
    from ppomax.demo.world.reward import gold_judge
    from ppomax.evaluate import evaluate_models, load_eval_prompts

    a_dir, b_dir = models
    tok = load_tokenizer(a_dir)
    a, b = load_causal_lm(a_dir), load_causal_lm(b_dir)
    prompts, subsets = load_eval_prompts(world_prompts / "prompts_test.jsonl", 5)
    judges = {"gold": ("gold", gold_judge(str(world_prompts)))}
    s = EvalSettings(max_new_tokens=6, seed=2)
    plain = evaluate_models(a, b, tok, prompts, subsets, judges, s)
    cache: dict = {}
    evaluate_models(b, b, tok, prompts, subsets, judges, s, baseline_cache=cache)  # fills the cache
    cached = evaluate_models(a, b, tok, prompts, subsets, judges, s, baseline_cache=cache)
    assert cached == plain


def test_cli_help_points_to_files_in_the_repo(capsys):
    """`ppomax eval --help` named DESIGN.md, which ships outside the repo: help points to the README."""
    from ppomax.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name in sub.choices:
        with pytest.raises(SystemExit):
            main([name, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "DESIGN.md" not in text, name
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "README's Data section" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("flag", ["--tie-margin", "--temperature", "--top-p", "--repetition-penalty"])
@pytest.mark.parametrize("value", ["inf", "nan", "1e999"])
def test_eval_number_flags_refuse_non_finite_values_in_one_line(tmp_path, capsys, flag, value):
    from ppomax.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(
            [
                "eval",
                "--policy",
                str(tmp_path),
                "--baseline",
                str(tmp_path),
                "--prompts",
                "p.jsonl",
                flag,
                value,
            ]
        )
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "must be a finite number" in err[-1] and flag in err[-1]


# ---------------------------------------------------------------------------------------------------------------
# the chat format of the prompts: the policy run's (PPO's own evaluation), or --chat-format


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    """A PPO run directory whose policy (``run/final/policy``) has a ChatML chat template, its config.yaml saying
    ``data.chat_format: auto`` (the default), and a reward model."""
    import yaml
    from transformers import AutoTokenizer

    from helpers import CHATML_TEMPLATE
    from ppomax.config import PPOConfig

    tmp = tmp_path_factory.mktemp("chat")
    policy = make_tiny_lm(tmp / "run" / "final", TEXTS, name="policy")
    tok = AutoTokenizer.from_pretrained(policy)
    tok.chat_template = CHATML_TEMPLATE
    tok.save_pretrained(policy)
    (tmp / "run" / "config.yaml").write_text(yaml.safe_dump(PPOConfig().model_dump(mode="json")))
    ValueHeadModel(load_causal_lm(policy)).save_pretrained(tmp / "rm")
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return tmp / "run", policy, tmp / "rm", prompts


def test_cli_eval_renders_prompts_in_the_chat_format_of_the_policys_run(chat_run, tmp_path, capsys):
    """`ppomax eval` rendered every prompt as HH, whatever the policy was trained on."""
    from ppomax.config import PPOConfig
    from ppomax.ppo.data import load_prompt_set

    run, policy, rm, prompts = chat_run
    out = tmp_path / "res.json"

    def evaluate_cli(*flags: str) -> tuple[list[str], str]:
        args = ["eval", "--policy", str(policy), "--baseline", str(policy), "--prompts", str(prompts)]
        args += [
            "--judge",
            f"reward-model:{rm}",
            "--max-new-tokens",
            "3",
            "--json",
            str(out),
            "--no-progress",
        ]
        assert main([*args, *flags]) == 0
        return [s["prompt"] for s in json.loads(out.read_text())["samples"]], capsys.readouterr().err

    tok = load_tokenizer(policy)
    questions = [p.split("Human: ")[1].split("\n")[0] for p in PROMPTS]
    templated = [
        tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in questions
    ]
    texts, err = evaluate_cli()
    assert texts == templated
    # what PPO's own evaluation renders for this policy
    assert texts == load_prompt_set(str(prompts), PPOConfig(), tok).texts
    why = f"the tokenizer has a chat template; data.chat_format in {run / 'config.yaml'}: auto"
    assert f"chat format: chat_template ({why})" in err
    texts, err = evaluate_cli("--chat-format", "hh")
    assert texts == PROMPTS and "chat format: hh (--chat-format: hh)" in err


def test_cli_eval_cuts_prompts_to_the_policy_runs_budget(chat_run, tmp_path):
    """The prompt budget defaults to the policy run's data.max_prompt_tokens (it was 256 whatever the run used,
    so the ids differed from PPO's own evaluation), and --max-prompt-tokens overrides it."""
    import shutil

    import yaml

    run, _, rm, prompts = chat_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    cfg = yaml.safe_load((copy / "config.yaml").read_text())
    cfg["data"]["max_prompt_tokens"] = 20
    (copy / "config.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "res.json"
    args = ["eval", "--policy", str(copy / "final" / "policy"), "--baseline", str(copy / "final" / "policy")]
    args += ["--prompts", str(prompts), "--judge", f"reward-model:{rm}", "--max-new-tokens", "2"]
    args += ["--json", str(out), "--no-progress"]
    assert main(args) == 0
    assert json.loads(out.read_text())["settings"]["max_prompt_tokens"] == 20
    assert main([*args, "--max-prompt-tokens", "30"]) == 0
    assert json.loads(out.read_text())["settings"]["max_prompt_tokens"] == 30


def test_eval_prompt_ids_are_those_of_ppos_own_evaluation(chat_run, tmp_path):
    """Truncated by turns, as PPO truncates its prompts: the same ids for the same budget."""
    from ppomax.config import PPOConfig
    from ppomax.evaluate import load_eval_prompts
    from ppomax.ppo.data import load_prompt_set

    _, policy, _, _ = chat_run
    msgs = [{"role": "system", "content": "Be brief."}]
    for k in range(4):
        msgs += [
            {"role": "user", "content": f"What is {k} plus 3?"},
            {"role": "assistant", "content": "Five."},
        ]
    msgs.append({"role": "user", "content": "What comes after Monday?"})
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"messages": msgs}) + "\n")
    tok = load_tokenizer(policy)
    budget = 60
    prompts, _ = load_eval_prompts(path, chat_format="chat_template", tokenizer=tok)
    assert len(tok(prompts[0].text)["input_ids"]) > budget
    gen = generate(load_causal_lm(policy), tok, prompts, max_prompt_tokens=budget, max_new_tokens=2)
    assert (
        gen.prompt_ids == load_prompt_set(str(path), PPOConfig(data={"max_prompt_tokens": budget}), tok).ids
    )
    kept = tok.decode(gen.prompt_ids[0])
    assert len(gen.prompt_ids[0]) <= budget and kept.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert kept.endswith("<|im_start|>user\nWhat comes after Monday?<|im_end|>\n<|im_start|>assistant\n")


def test_cli_eval_skips_bad_prompt_records_on_request(chat_run, tmp_path, capsys):
    """`ppomax eval` had no way past a prompt record it cannot read (HH-RLHF holds prompts that end with an
    assistant turn), and its message suggested `data.on_bad_line: skip`, a key eval does not take."""
    _, policy, rm, _ = chat_run
    prompts = tmp_path / "prompts.jsonl"
    records = [{"prompt": PROMPTS[0]}, {"prompt": ""}, {"prompt": PROMPTS[1]}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "res.json"
    args = ["eval", "--policy", str(policy), "--baseline", str(policy), "--prompts", str(prompts)]
    args += ["--judge", f"reward-model:{rm}", "--max-new-tokens", "2", "--json", str(out), "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{prompts}:2: empty field 'prompt'" in err[0]
    assert "--on-bad-line skip" in err[0] and "data.on_bad_line" not in err[0]

    assert main([*args, "--on-bad-line", "skip", "--limit", "2"]) == 0
    res = json.loads(out.read_text())
    assert res["n_prompts"] == 2 and res["prompts_skipped"] == 1
    assert (
        res["prompts_skip_reasons"] == {"empty field 'prompt'": 1}
        and res["settings"]["on_bad_line"] == "skip"
    )
    assert "prompts: skipped 1 records (empty field 'prompt' x1)" in capsys.readouterr().err
