"""Rollouts: EOS handling and trimming, HF generation with the KV cache against a plain no-cache loop, the sampling
switches (top-k, temperature, repetition penalty, max_new_tokens, stop at EOS) as HF applies them, whatever the
model's own generation_config says, and Experience merging/slicing."""

from __future__ import annotations

import copy
import dataclasses
from typing import get_args

import pytest
import torch

from ppo_helpers import make_setup
from ppomax.config import GenerationConfig
from ppomax.data import pad_left
from ppomax.errors import UserError
from ppomax.models import load_causal_lm, load_tokenizer
from ppomax.ppo.experience import Experience, RowField, TokenField
from ppomax.ppo.rollout import HFGenerateEngine, eos_ids_of, finish_rollout, rollout

PAD, EOS = 0, 2


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    setup = make_setup(tmp_path_factory.mktemp("rollout"))
    tok = load_tokenizer(setup.policy)
    model = load_causal_lm(setup.policy).eval()
    prompts = ["\n\nHuman: Hi\n\nAssistant:", "\n\nHuman: What is the capital of France?\n\nAssistant:"]
    ids, mask = pad_left([tok(p)["input_ids"] for p in prompts], tok.pad_token_id)
    return tok, model, ids, mask, prompts


# ------------------------------------------------------------------------------------------ finish_rollout


def test_finish_rollout_cuts_at_the_first_eos_and_trims():
    prompt = torch.tensor([[0, 5, 6], [7, 8, 9]])
    pmask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    # row 0: EOS at response position 1 then junk (another EOS, tokens); row 1: no EOS in 4 tokens
    seqs = torch.cat([prompt, torch.tensor([[11, EOS, 12, EOS, 0], [13, 14, 15, 16, 0]])], dim=1)
    full, mask, resp_mask, truncated, lens = finish_rollout(prompt, pmask, seqs, [EOS], PAD)
    assert lens.tolist() == [2, 5]  # row 1 kept all 5 columns (the last token happened to be id 0)
    assert truncated.tolist() == [False, True]
    assert resp_mask.tolist() == [[True, True, False, False, False], [True] * 5]
    assert full[0].tolist() == [0, 5, 6, 11, EOS, PAD, PAD, PAD]
    assert mask[0].tolist() == [0, 1, 1, 1, 1, 0, 0, 0]
    # trimming: when every response ends early, the batch is cut to the longest one
    seqs2 = torch.cat([prompt, torch.tensor([[EOS, 3, 3, 3], [4, EOS, 3, 3]])], dim=1)
    full2, _, resp2, trunc2, lens2 = finish_rollout(prompt, pmask, seqs2, [EOS], PAD)
    assert full2.shape == (2, 5) and resp2.shape == (2, 2)
    assert lens2.tolist() == [1, 2] and not trunc2.any()


def test_finish_rollout_any_of_several_eos_ids_ends_a_response():
    prompt, pmask = torch.tensor([[5]]), torch.tensor([[1]])
    seqs = torch.tensor([[5, 9, 42, 9, 9]])
    _, _, resp_mask, truncated, lens = finish_rollout(prompt, pmask, seqs, [EOS, 42], PAD)
    assert lens.tolist() == [2] and not truncated.any() and resp_mask.shape == (1, 2)


# ------------------------------------------------------------------------------------------ generation


def _greedy_no_cache(model, ids: list[int], n: int, eos: int, penalty: float = 1.0) -> list[int]:
    """Reference: plain argmax loop over full forward passes, no cache, no padding; the repetition penalty
    acts on the tokens generated so far only (MOSS-RLHF), never on the prompt's."""
    seq = list(ids)
    out: list[int] = []
    for _ in range(n):
        logits = model(torch.tensor([seq])).logits[0, -1].clone()
        if penalty != 1.0 and out:
            seen = torch.tensor(sorted(set(out)))
            vals = logits[seen]
            logits[seen] = torch.where(vals > 0, vals / penalty, vals * penalty)
        t = int(logits.argmax())
        out.append(t)
        seq.append(t)
        if t == eos:
            break
    return out


@torch.no_grad()
@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_generation_with_kv_cache_and_left_padding_matches_a_plain_loop(tiny, penalty):
    _tok, model, ids, mask, _ = tiny
    gen = GenerationConfig(max_new_tokens=6, repetition_penalty=penalty)
    out = HFGenerateEngine(gen, [EOS], PAD).generate(model, ids, mask, greedy=True)
    for row in range(ids.shape[0]):
        real = ids[row][mask[row].bool()].tolist()
        expected = _greedy_no_cache(model, real, 6, EOS, penalty)
        assert out[row, ids.shape[1] : ids.shape[1] + len(expected)].tolist() == expected


@torch.no_grad()
def test_sampling_switches_change_generation(tiny):
    _tok, model, ids, mask, _ = tiny
    greedy = HFGenerateEngine(GenerationConfig(max_new_tokens=6, repetition_penalty=1.0), [EOS], PAD)
    ref = greedy.generate(model, ids, mask, greedy=True)
    # top_k=1 sampling is greedy; a tiny temperature too
    for gen in (
        GenerationConfig(max_new_tokens=6, top_k=1, repetition_penalty=1.0),
        GenerationConfig(max_new_tokens=6, temperature=1e-4, top_p=1.0, repetition_penalty=1.0),
    ):
        torch.manual_seed(0)
        assert torch.equal(HFGenerateEngine(gen, [EOS], PAD).generate(model, ids, mask), ref)
    # plain sampling from a near-uniform tiny model differs from greedy
    torch.manual_seed(0)
    sampled = HFGenerateEngine(GenerationConfig(max_new_tokens=6, top_p=1.0), [EOS], PAD).generate(
        model, ids, mask
    )
    assert not torch.equal(sampled, ref)
    # a strong repetition penalty forbids repeating a token of the response
    strong = HFGenerateEngine(GenerationConfig(max_new_tokens=8, repetition_penalty=1e6), [EOS], PAD)
    out = strong.generate(model, ids, mask, greedy=True)
    for row in range(ids.shape[0]):
        resp = out[row, ids.shape[1] :].tolist()
        assert len(set(resp)) == len(resp)


# ----------------------------------------------------------------------------------------- effective sampling
# What HF builds inside generate() (processors, stopping criteria), not what ppomax hands it: HF fills every
# unset field from the model's generation_config, then from its global defaults (top_k 50).

# A model's generation_config that sets every sampling knob HF has: none of it may reach PPO's sampling.
POLLUTED = dict(
    do_sample=True,
    temperature=0.3,
    top_k=3,
    top_p=0.5,
    repetition_penalty=3.0,
    min_length=40,
    min_new_tokens=5,
    no_repeat_ngram_size=1,
    bad_words_ids=[[5]],
    typical_p=0.5,
    min_p=0.2,
    top_h=0.5,
    epsilon_cutoff=0.01,
    eta_cutoff=0.01,
    suppress_tokens=[6],
    begin_suppress_tokens=[7],
    forced_bos_token_id=3,
    forced_eos_token_id=9,
    exponential_decay_length_penalty=(2, 1.5),
    renormalize_logits=True,
    remove_invalid_values=True,
    max_length=7,
    max_time=1e-6,
    stop_strings=["Hi"],
)


@pytest.fixture(scope="module")
def polluted(tiny):
    model = copy.deepcopy(tiny[1])
    for key, value in POLLUTED.items():
        setattr(model.generation_config, key, value)
    return model


def _capture(monkeypatch, model) -> dict:
    """Record the logits processors and stopping criteria HF builds in ``model.generate``."""
    seen: dict = {}
    for name in ("_get_logits_processor", "_get_stopping_criteria"):
        orig = getattr(model, name)

        def wrapped(*a, _orig=orig, _name=name, **k):
            seen[_name] = out = _orig(*a, **k)
            return out

        monkeypatch.setattr(model, name, wrapped)
    return seen


def _describe(procs) -> list[tuple]:
    params = {
        "RepetitionPenaltyLogitsProcessor": ("penalty", "prompt_ignore_length"),
        "TemperatureLogitsWarper": ("temperature",),
        "TopKLogitsWarper": ("top_k",),
        "TopPLogitsWarper": ("top_p",),
        "MaxLengthCriteria": ("max_length",),
    }
    return [(type(p).__name__, *(getattr(p, a) for a in params.get(type(p).__name__, ()))) for p in procs]


@torch.no_grad()
@pytest.mark.parametrize(
    ("gen", "expected"),
    [
        # every value equal to HF's global default ("off"): nothing may act on the logits
        (dict(temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0), []),
        (
            dict(temperature=0.8, top_p=0.9, top_k=0, repetition_penalty=1.1),
            [
                ("RepetitionPenaltyLogitsProcessor", 1.1, "P"),
                ("TemperatureLogitsWarper", 0.8),
                ("TopPLogitsWarper", 0.9),
            ],
        ),
        (dict(temperature=1.0, top_p=1.0, top_k=4, repetition_penalty=1.0), [("TopKLogitsWarper", 4)]),
    ],
)
@pytest.mark.parametrize("model_config", ["default", "polluted"])
def test_the_effective_sampling_processors_are_exactly_the_configs(
    tiny, polluted, monkeypatch, gen, expected, model_config
):
    _tok, clean, ids, mask, _ = tiny
    model = polluted if model_config == "polluted" else clean
    seen = _capture(monkeypatch, model)
    width = ids.shape[1]
    HFGenerateEngine(GenerationConfig(max_new_tokens=3, **gen), [EOS], PAD).generate(model, ids, mask)
    want = [tuple(width if v == "P" else v for v in e) for e in expected]
    assert _describe(seen["_get_logits_processor"]) == want
    # the length rule is max_new_tokens and EOS only: no max_time, stop strings or max_length of the model's
    stops = _describe(seen["_get_stopping_criteria"])
    assert stops == [("MaxLengthCriteria", width + 3), ("EosTokenCriteria",)]
    # applied to logits, the "all off" setting is the identity: PPO samples from softmax(logits) itself
    if not expected:
        scores = torch.randn(ids.shape[0], model.config.vocab_size)
        assert torch.equal(seen["_get_logits_processor"](ids, scores.clone()), scores)


@torch.no_grad()
@pytest.mark.parametrize("model_config", ["default", "polluted"])
def test_greedy_decoding_applies_only_the_repetition_penalty(tiny, polluted, monkeypatch, model_config):
    _tok, clean, ids, mask, _ = tiny
    model = polluted if model_config == "polluted" else clean
    seen = _capture(monkeypatch, model)
    gen = GenerationConfig(max_new_tokens=3, temperature=0.5, top_p=0.5, top_k=2, repetition_penalty=1.2)
    HFGenerateEngine(gen, [EOS], PAD).generate(model, ids, mask, greedy=True)
    procs = _describe(seen["_get_logits_processor"])
    assert procs == [("RepetitionPenaltyLogitsProcessor", 1.2, ids.shape[1])]


@torch.no_grad()
def test_a_lora_policy_samples_without_its_generation_config_and_keeps_it(tiny, polluted, monkeypatch):
    """PEFT's generate copies the wrapper's generation_config onto its base: the model's own config must neither
    reach sampling nor be replaced by the blank one (a LoRA policy's merged export would save it)."""
    peft = pytest.importorskip("peft")
    _tok, _clean, ids, mask, _ = tiny
    model = peft.get_peft_model(
        copy.deepcopy(polluted), peft.LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")
    )
    base = model.get_base_model()
    own = base.generation_config
    seen = _capture(monkeypatch, base)
    gen = GenerationConfig(max_new_tokens=3, temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0)
    HFGenerateEngine(gen, [EOS], PAD).generate(model, ids, mask)
    assert _describe(seen["_get_logits_processor"]) == []
    assert base.generation_config is own and model.generation_config is own


@torch.no_grad()
def test_top_k_zero_samples_from_the_whole_vocabulary(tiny, polluted):
    """top_k: 0 is off: neither HF's default top-k 50 nor a model's own top_k (here 3) truncates sampling."""
    _tok, clean, ids, mask, _ = tiny
    gen = GenerationConfig(max_new_tokens=1, temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0)
    many = ids[:1].repeat(3000, 1), mask[:1].repeat(3000, 1)
    for model in (clean, polluted):
        torch.manual_seed(0)
        first = HFGenerateEngine(gen, [EOS], PAD).generate(model, *many)[:, ids.shape[1]]
        # a random tiny model is near uniform over ~300 tokens: 3000 draws hit far more than 50 of them
        assert len(set(first.tolist())) > 100


@torch.no_grad()
def test_repetition_penalty_acts_on_response_tokens_only(tiny, monkeypatch):
    """MOSS-RLHF penalises generated tokens only: a token that is only in the prompt keeps its logit."""
    _tok, model, ids, mask, _ = tiny
    seen = _capture(monkeypatch, model)
    gen = GenerationConfig(max_new_tokens=2, temperature=1.0, top_p=1.0, repetition_penalty=2.0)
    HFGenerateEngine(gen, [EOS], PAD).generate(model, ids, mask)
    procs = seen["_get_logits_processor"]
    scores = torch.randn(ids.shape[0], model.config.vocab_size)
    # before the first new token nothing is penalised, whatever the prompt holds
    assert torch.equal(procs(ids, scores.clone()), scores)
    prompt_tokens = set(ids[0][mask[0].bool()].tolist())
    fresh = next(t for t in range(3, model.config.vocab_size) if t not in prompt_tokens)
    ids2 = torch.cat([ids, torch.full((ids.shape[0], 1), fresh)], dim=1)
    out = procs(ids2, scores.clone())
    changed = (out != scores).any(dim=0).nonzero().flatten().tolist()
    assert changed == [fresh]  # the one generated token, and no prompt token
    s = scores[:, fresh]
    assert torch.allclose(out[:, fresh], torch.where(s > 0, s / 2.0, s * 2.0))


@torch.no_grad()
def test_identical_prompts_padded_differently_get_identical_logits_and_continuations(tiny, monkeypatch):
    """Padding (here pad = EOS, as for many chat tokenizers) is never penalised, so how much a prompt is
    padded changes neither its processed logits nor its greedy continuation."""
    tok, model, *_ = tiny
    short = tok("\n\nHuman: Hi\n\nAssistant:")["input_ids"]
    long = tok("\n\nHuman: What is the capital of France and why?\n\nAssistant:")["input_ids"]
    engine = HFGenerateEngine(GenerationConfig(max_new_tokens=6, repetition_penalty=1.5), [EOS], EOS)
    seen = _capture(monkeypatch, model)
    runs = []
    for batch, row in (([short], 0), ([long, short], 1)):
        ids, mask = pad_left(batch, EOS)
        exp = rollout(engine, model, tok, ids, mask, eos_ids=[EOS], pad_id=EOS, greedy=True)
        runs.append((ids, row, seen["_get_logits_processor"], exp.responses_ids[row].tolist()))
    (ids_a, row_a, procs_a, resp_a), (ids_b, row_b, procs_b, resp_b) = runs
    assert ids_b.shape[1] > ids_a.shape[1] and (ids_b[row_b, : ids_b.shape[1] - len(short)] == EOS).all()
    assert resp_a[: len(resp_b)] == resp_b[: len(resp_a)] and len(resp_a) > 1
    # the same response so far, with an EOS and a repeated token in it, after either padding
    gen = torch.tensor([EOS, 7, 7, 11])
    scores = torch.randn(1, model.config.vocab_size)
    out = []
    for ids, row, procs in ((ids_a, row_a, procs_a), (ids_b, row_b, procs_b)):
        batch = torch.cat([ids, gen.expand(ids.shape[0], -1)], dim=1)
        out.append(procs(batch, scores.expand(ids.shape[0], -1).clone())[row : row + 1])
    out_a, out_b = out
    assert torch.equal(out_a, out_b)
    assert ((out_a != scores).any(dim=0).nonzero().flatten().tolist()) == sorted({EOS, 7, 11})


@torch.no_grad()
def test_evaluation_generation_follows_the_same_rules(tiny, polluted, monkeypatch):
    """`ppomax eval` samples with the rollout engine's rules: no top-k, the model's own settings ignored."""
    from ppomax.evaluate import generate

    tok, *_ = tiny
    seen = _capture(monkeypatch, polluted)
    generate(
        polluted, tok, ["Hi there"], max_new_tokens=2, temperature=0.8, top_p=0.9, repetition_penalty=1.1
    )
    procs = _describe(seen["_get_logits_processor"])
    assert [p[0] for p in procs] == [
        "RepetitionPenaltyLogitsProcessor",
        "TemperatureLogitsWarper",
        "TopPLogitsWarper",
    ]
    assert procs[1][1] == 0.8 and procs[2][1] == 0.9


@torch.no_grad()
def test_rollout_stops_at_eos_masks_after_it_and_respects_max_new_tokens(tiny):
    tok, model, ids, mask, prompts = tiny
    gen = GenerationConfig(max_new_tokens=5, repetition_penalty=1.0)
    free = rollout(
        HFGenerateEngine(gen, [EOS], PAD),
        model,
        tok,
        ids,
        mask,
        eos_ids=[EOS],
        pad_id=PAD,
        prompts=prompts,
        greedy=True,
    )
    assert free.response_width <= 5 and free.truncated.all()  # a random model never picks EOS greedily here
    # Declare row 0's second greedy token an EOS: row 0 must stop after 2 tokens, row 1 runs on.
    stop = int(free.responses_ids[0, 1])
    exp = rollout(
        HFGenerateEngine(gen, [stop], PAD),
        model,
        tok,
        ids,
        mask,
        eos_ids=[stop],
        pad_id=PAD,
        prompts=prompts,
        greedy=True,
    )
    first = free.responses_ids[1].tolist()
    n1 = first.index(stop) + 1 if stop in first else 5
    assert exp.response_lens.tolist() == [2, n1]
    assert exp.truncated.tolist() == [False, stop not in first]
    assert exp.response_mask[0].tolist()[:2] == [True, True] and not exp.response_mask[0, 2:].any()
    assert (exp.responses_ids[0, 2:] == PAD).all()
    assert exp.attention_mask.shape == exp.sequences.shape
    assert exp.prompt_lens.tolist() == mask.sum(1).tolist()
    # texts are the decoded response tokens, specials skipped
    for row in range(2):
        n = int(exp.response_lens[row])
        assert exp.responses[row] == tok.decode(exp.responses_ids[row, :n].tolist(), skip_special_tokens=True)
    assert exp.prompts == prompts


def test_eos_ids_include_the_models_generation_config(tiny):
    tok, model, *_ = tiny
    model.generation_config.eos_token_id = [EOS, 7]
    try:
        assert eos_ids_of(tok, model) == [EOS, 7]
    finally:
        model.generation_config.eos_token_id = EOS


# ------------------------------------------------------------------------------------------ Experience


def _exp(prompts: list[list[int]], responses: list[list[int]]) -> Experience:
    p = max(map(len, prompts))
    r = max(map(len, responses))
    seq = torch.zeros(len(prompts), p + r, dtype=torch.long)
    att = torch.zeros_like(seq)
    rmask = torch.zeros(len(prompts), r, dtype=torch.bool)
    for i, (a, b) in enumerate(zip(prompts, responses, strict=True)):
        seq[i, p - len(a) : p] = torch.tensor(a)
        seq[i, p : p + len(b)] = torch.tensor(b)
        att[i, p - len(a) : p + len(b)] = 1
        rmask[i, : len(b)] = True
    lp = torch.where(rmask, seq[:, p:].float(), 0.0)  # a per-token field that encodes the token itself
    return Experience(
        seq,
        att,
        rmask,
        p,
        torch.tensor(list(map(len, prompts))),
        torch.tensor(list(map(len, responses))),
        torch.zeros(len(prompts), dtype=torch.bool),
        logprobs=lp,
        scores=torch.arange(len(prompts), dtype=torch.float32),
    )


def _rows(exp: Experience) -> list[tuple[list[int], list[int], list[float]]]:
    out = []
    for i in range(exp.batch_size):
        p, r = int(exp.prompt_lens[i]), int(exp.response_lens[i])
        seq = exp.sequences[i].tolist()
        assert exp.attention_mask[i].sum() == p + r
        out.append(
            (
                seq[exp.prompt_width - p : exp.prompt_width],
                seq[exp.prompt_width : exp.prompt_width + r],
                exp.logprobs[i, :r].tolist(),
            )
        )
    return out


def test_experience_computed_returns_a_filled_field_and_names_one_not_computed_yet():
    exp = _exp([[5, 6]], [[10, 11]])
    assert exp.computed("logprobs") is exp.logprobs and exp.computed("scores") is exp.scores
    with pytest.raises(ValueError, match=r"Experience\.advantages: read before"):
        exp.computed("advantages")
    # the fields cat/select carry and computed() reads are exactly the stages' fields (those that start as None),
    # beside the sampling pass's [B, R, V] logits, which cat and select carry on their own
    later = {f.name for f in dataclasses.fields(Experience) if f.default is None}
    assert later == set(get_args(TokenField)) | set(get_args(RowField)) | {"sampling_logits"}


def test_experience_cat_and_select_keep_rows_and_trim_padding():
    a = _exp([[5, 6], [7]], [[10, 11, 12], [13]])
    b = _exp([[8, 9, 10, 11]], [[14, 15]])
    both = Experience.cat([a, b], PAD)
    assert both.prompt_width == 4 and both.response_width == 3
    assert _rows(both) == _rows(a) + _rows(b)
    assert both.scores.tolist() == [0.0, 1.0, 0.0]
    sub = both.select([1, 2])  # prompts of length 1 and 4, responses of 1 and 2
    assert sub.prompt_width == 4 and sub.response_width == 2
    assert _rows(sub) == [_rows(a)[1], _rows(b)[0]]
    small = both.select([1])
    assert small.sequences.shape == (1, 2) and _rows(small) == [_rows(a)[1]]


def test_experience_cat_and_select_carry_the_sampling_logits():
    """generation.logprobs_from: generate's [B, R, V] logits follow their rows: padded on the right by cat (a
    field set in some batches only is an error, as for the others), trimmed by select."""
    a = _exp([[5, 6], [7]], [[10, 11, 12], [13]])
    b = _exp([[8, 9, 10, 11]], [[14, 15]])
    a.sampling_logits = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 4)
    b.sampling_logits = -torch.arange(1 * 2 * 4, dtype=torch.float32).view(1, 2, 4) - 1
    both = Experience.cat([a, b], PAD)
    assert both.sampling_logits.shape == (3, 3, 4)
    assert torch.equal(both.sampling_logits[:2], a.sampling_logits)
    assert (
        torch.equal(both.sampling_logits[2, :2], b.sampling_logits[0])
        and not both.sampling_logits[2, 2].any()
    )
    sub = both.select([2, 1])  # responses of 2 and 1 tokens: two columns
    assert torch.equal(sub.sampling_logits, both.sampling_logits[[2, 1], :2])
    b.sampling_logits = None
    with pytest.raises(ValueError, match="sampling_logits"):
        Experience.cat([a, b], PAD)


# ------------------------------------------------------------------------------------------ generation.compile


def test_compile_asks_hf_for_a_static_cache_and_a_compiled_step_on_any_device():
    engine = HFGenerateEngine(GenerationConfig(max_new_tokens=4, compile=True), [EOS], PAD)
    for greedy in (False, True):
        cpu = engine.generation_config(greedy, "cpu")
        assert cpu.cache_implementation == "static" and not cpu.disable_compile
        assert cpu.compile_config._compile_all_devices and cpu.compile_config.mode == "default"
    assert engine.generation_config(False, "cuda").compile_config.mode == "reduce-overhead"  # CUDA graphs
    plain = HFGenerateEngine(GenerationConfig(max_new_tokens=4), [EOS], PAD).generation_config(False, "cpu")
    assert plain.disable_compile and plain.cache_implementation is None and plain.compile_config is None


def test_compile_with_a_sharded_policy_is_an_error_naming_the_key():
    with pytest.raises(UserError, match=r"generation\.compile: true needs an unsharded policy"):
        HFGenerateEngine(GenerationConfig(max_new_tokens=4, compile=True), [EOS], PAD, synced=True)


@torch.no_grad()
def test_compiled_generation_decodes_as_the_dynamic_cache_does(tiny):
    """Greedy decoding (ties aside, deterministic) with the compiled static-cache step gives the same tokens as
    the default engine, with the repetition penalty on, and the model's forward really was compiled."""
    _tok, model, ids, mask, _ = tiny
    model = copy.deepcopy(model)  # the compiled call is cached on the model: keep the module's fixture clean
    settings = dict(max_new_tokens=6, repetition_penalty=1.3)
    want = HFGenerateEngine(GenerationConfig(**settings), [EOS], PAD).generate(model, ids, mask, greedy=True)
    assert not hasattr(model, "_compiled_call")
    engine = HFGenerateEngine(GenerationConfig(**settings, compile=True), [EOS], PAD)
    got = engine.generate(model, ids, mask, greedy=True)
    assert hasattr(model, "_compiled_call")  # HF's compiled forward (PreTrainedModel.get_compiled_call)
    assert torch.equal(got, want)
