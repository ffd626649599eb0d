"""On a real pretrained instruct model (SmolLM2-135M-Instruct: a chat template, EOS = pad = its end-of-turn token)
and real HH-RLHF pairs: what random test models cannot show. Slow; skipped with the reason where the model's
package cannot be fetched (bench/real_model.py) or the data is not beside the repository.

* prompts are rendered with the model's chat template by default and cut at its turn boundaries, the system turn
  and the user header kept;
* a bf16 PPO run saves weights that reload with plain transformers and generate exactly as the trained model,
  stopping at the end-of-turn token, and its first iteration measures a KL of exactly 0 (policy = reference);
* a reward model saved from it is a LlamaForSequenceClassification that plain transformers scores as ppomax does,
  read before the trailing end-of-turn token (its pad token), right- or left-padded;
* the real-model benchmark's short version runs every command end to end.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from real_model import HH_HARMLESS, RealModelUnavailable, real_model_dir  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def model_dir() -> Path:
    try:
        return real_model_dir()
    except RealModelUnavailable as exc:
        pytest.skip(f"real model unavailable: {exc}")


@pytest.fixture(scope="module")
def hh_pairs(tmp_path_factory) -> Path:
    if not HH_HARMLESS.is_file():
        pytest.skip(f"no real data at {HH_HARMLESS}")
    import gzip

    with gzip.open(HH_HARMLESS, "rt", encoding="utf-8") as fh:
        lines = [line for line in fh if line.strip()][:200]
    out = tmp_path_factory.mktemp("hh") / "pairs.jsonl"
    out.write_text("".join(lines), encoding="utf-8")
    return out


def test_prompts_are_rendered_and_cut_in_the_models_chat_format(model_dir, hh_pairs):
    from ppomax.config import PPOConfig
    from ppomax.models import load_tokenizer
    from ppomax.ppo.data import load_prompt_set

    tok = load_tokenizer(model_dir)
    cfg = PPOConfig.model_validate({"data": {"max_prompt_tokens": 96, "on_bad_line": "skip"}})
    prompts = load_prompt_set(str(hh_pairs), cfg, tok)
    system = "<|im_start|>system\n"
    assert all(t.startswith(system) and t.endswith("<|im_start|>assistant\n") for t in prompts.texts)
    assert all(len(ids) <= 96 for ids in prompts.ids)
    cut = [
        tok.decode(ids)
        for ids, text in zip(prompts.ids, prompts.texts, strict=True)
        if len(ids) < len(tok(text)["input_ids"])
    ]
    assert cut, "no prompt of these 200 needed cutting at 96 tokens"
    for text in cut:
        assert text.startswith(system) and "<|im_start|>user\n" in text
    summary = prompts.stats.summary()
    assert "lost their oldest turns" in summary, summary


def _ppo_config(model_dir: Path, hh_pairs: Path, out: Path, *extra: str):
    from ppomax.config import load_config

    return load_config(
        "ppo",
        preset="ppo_max",
        overrides=[
            f"model.policy={model_dir}",
            "model.dtype=bfloat16",
            f"data.prompts={hh_pairs}",
            "data.on_bad_line=skip",
            "data.max_prompt_tokens=128",
            "reward.functions=[{function: ppo_helpers:response_length, weight: 1.0}]",
            "ppo.critic_init=sft",
            "ppo.critic_pretrain_steps=0",
            "ppo.iterations=1",
            "ppo.rollout_batch_size=2",
            "ppo.buffer_size=2",
            "ppo.minibatch_size=2",
            "optim.warmup_steps=0",
            "generation.max_new_tokens=12",
            f"logging.out_dir={out}",
            "logging.tensorboard=false",
            "logging.progress=false",
            *extra,
        ],
    )


def test_bf16_ppo_measures_kl_0_at_start_and_saves_a_model_that_generates_as_trained(
    model_dir, hh_pairs, tmp_path
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ppomax.ppo import PPOTrainer

    trainer = PPOTrainer(_ppo_config(model_dir, hh_pairs, tmp_path / "run"))
    first = trainer.iteration(1)
    assert first["kl/per_token"] == 0.0  # the policy is the reference before its first update
    trainer.step = 1
    trainer.save_final()
    final = tmp_path / "run" / "final" / "policy"
    assert json.loads((final / "config.json").read_text())["dtype"] == "float32"
    saved = AutoModelForCausalLM.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    trained = trainer.acc.unwrap_model(trainer.policy, keep_fp32_wrapper=False)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": QUESTION}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = saved.generate(**ids, max_new_tokens=24, do_sample=False)
        again = trained.generate(**ids, max_new_tokens=24, do_sample=False)
    assert torch.equal(out, again)
    answer = tok.decode(out[0, ids["input_ids"].shape[1] :])
    assert "Paris" in answer and answer.endswith("<|im_end|>"), answer  # stops at the end-of-turn token


def test_a_reward_model_saved_from_it_scores_in_plain_transformers_as_in_ppomax(model_dir, tmp_path):
    """EOS = pad = <|im_end|>: transformers' classifier pools at the last token that is not the pad token, the one
    before the answer's trailing <|im_end|>, and ppomax reads the reward there too, whatever the padding side."""
    from transformers import AutoModelForSequenceClassification

    from ppomax.models import ValueHeadModel, load_tokenizer

    tok = load_tokenizer(model_dir)
    rm = ValueHeadModel.from_causal_lm(model_dir, seed=1).eval()
    rm.save_pretrained(tmp_path / "rm")
    config = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert config["pad_token_id"] == tok.pad_token_id == tok.eos_token_id
    chats = [
        [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "Paris."}],
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello! How can I help you today?"},
        ],
    ]
    texts = [tok.apply_chat_template(c, tokenize=False).rstrip("\n") for c in chats]
    assert all(t.endswith("<|im_end|>") for t in texts)
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    for side in ("right", "left"):
        tok.padding_side = side
        batch = tok(texts, return_tensors="pt", padding=True)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        with torch.no_grad():
            out = rm(ids, mask)
            expected = plain(input_ids=ids, attention_mask=mask).logits[:, 0]
        torch.testing.assert_close(out.scores, expected, atol=1e-4, rtol=1e-4)
        last = mask.sum(-1) - 1 if side == "right" else torch.full((2,), ids.shape[1] - 1)
        before_eos = last - 1
        torch.testing.assert_close(out.scores, out.values[torch.arange(2), before_eos], atol=0, rtol=0)


def test_the_real_model_benchmark_runs_end_to_end(model_dir, tmp_path):
    if not HH_HARMLESS.is_file():
        pytest.skip(f"no real data at {HH_HARMLESS}")
    out = tmp_path / "bench"
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "real_model_bench.py"),
            "--quick",
            "--out",
            str(out),
            "--threads",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert 0.0 <= summary["rm_test_accuracy"] <= 1.0
    for mode in ("full", "lora"):
        assert summary[f"ppo_{mode}_metrics"], mode
        assert summary[f"eval_{mode}"]["win_tie_lose"]["n"] == 8
    assert all(s.startswith("<|im_start|>system") for s in summary["samples"]["prompts"])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_packed_forwards_of_the_real_model_equal_its_padded_ones(model_dir, dtype):
    """ppo.pack_sequences on SmolLM2 (sdpa, loaded as ppomax loads a policy): chat-templated prompts and answers of
    uneven lengths give the padded forward's per-token log-probs and critic values (a fresh head) on the response
    mask, within float rounding (float32: 1e-4; bfloat16 weights: 0.05), those of the whole forward's logits
    (the packed LM head runs on the response positions only), and the start-up check passes; so do the reward
    model's scores in packed micro-batches."""
    from transformers import AutoTokenizer

    from ppomax.models import ValueHeadModel, load_causal_lm, position_ids_from_mask
    from ppomax.models.lm_head import ResponseLogits
    from ppomax.ppo.experience import Experience
    from ppomax.ppo.models import Forward, check_packed_forwards

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = load_causal_lm(model_dir, dtype=dtype).eval()
    pairs = [
        (QUESTION, "The capital of France is Paris."),
        ("Hi", "Hello! How can I help you today? I can answer questions, write text and explain ideas."),
        ("Tell me a long story about a dragon who learned to read.", "No."),
        ("Count to five.", "1, 2, 3, 4, 5."),
    ]
    prompts = [
        tok.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        for q, _ in pairs
    ]
    answers = [tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for _, a in pairs]
    p_w, r_w = max(map(len, prompts)), max(map(len, answers))
    seqs = torch.full((len(pairs), p_w + r_w), tok.pad_token_id)
    mask = torch.zeros_like(seqs)
    for i, (p, a) in enumerate(zip(prompts, answers, strict=True)):
        seqs[i, p_w - len(p) : p_w + len(a)] = torch.tensor(p + a)
        mask[i, p_w - len(p) : p_w + len(a)] = 1
    exp = Experience(
        sequences=seqs,
        attention_mask=mask,
        response_mask=mask[:, p_w:].bool(),
        prompt_width=p_w,
        prompt_lens=torch.tensor(list(map(len, prompts))),
        response_lens=torch.tensor(list(map(len, answers))),
        truncated=torch.zeros(len(pairs), dtype=torch.bool),
    )
    padded, packed = Forward(1.0), Forward(1.0, pack=True)
    critic = ValueHeadModel(model, seed=1)
    on, labels, tol = exp.response_mask, exp.responses_ids, 1e-4 if dtype == "float32" else 0.05
    with torch.no_grad():
        a = padded.logprobs(padded.response_logits(model, exp), labels)
        b = packed.logprobs(packed.response_logits(model, exp), labels)
        torch.testing.assert_close(b[on], a[on], atol=tol, rtol=0)
        # the LM head on the response positions only, either way: the whole forward's log-probs
        whole = model(
            input_ids=seqs, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False
        ).logits[:, p_w - 1 : -1]
        torch.testing.assert_close(
            a[on], padded.logprobs(ResponseLogits(whole), labels)[on], atol=tol, rtol=0
        )
        torch.testing.assert_close(
            packed.values(critic, exp)[on], padded.values(critic, exp)[on], atol=tol, rtol=0
        )
    check_packed_forwards(
        packed, {"model.policy": model, "model.critic": critic}, len(tok), torch.device("cpu")
    )
    # the same head as a reward model, its scores read before the trailing EOS (the pad token): in micro-batches
    # of 2, packed, the scores of one padded forward
    from ppomax.ppo.reward_sources import RewardSources, check_packed_scores

    critic.use_pad_token(tok.pad_token_id)
    assert critic.pad_token_id == tok.eos_token_id
    with torch.no_grad():
        scores = RewardSources(critic, 1.0, [], chunk_size=2, pack=True).score_model(exp)
        torch.testing.assert_close(scores, critic.score(seqs, mask), atol=tol, rtol=0)
    check_packed_scores(critic, len(tok), torch.device("cpu"))
