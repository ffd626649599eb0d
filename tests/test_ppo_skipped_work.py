"""No work that is not needed: forwards the PPO iteration can skip or narrow give the same run. Tiny models (see
ppo_helpers)."""

from __future__ import annotations

import pytest
import torch

from ppo_helpers import config, make_setup, reward_fn
from ppomax.errors import ConfigError, UserError
from ppomax.models import RewardOnCriticBase
from ppomax.ppo import PPOTrainer
from ppomax.ppo import assembly as ppo_assembly
from ppomax.ppo import models as ppo_models
from ppomax.ppo import scoring as ppo_scoring
from ppomax.ppo.experience import Experience
from ppomax.ppo.models import Forward
from ppomax.trainers.optimised import Optimised

TARGET = reward_fn("ppo_helpers:target_tokens")

pytestmark = pytest.mark.usefixtures("one_thread")


def generated_only(exp):
    """A copy of ``exp`` with what generation fills and none of the scoring pass's fields."""
    return Experience(
        **{f: getattr(exp, f) for f in ("sequences", "attention_mask", "response_mask", "prompt_width")},
        prompt_lens=exp.prompt_lens,
        response_lens=exp.response_lens,
        truncated=exp.truncated,
        prompts=exp.prompts,
        responses=exp.responses,
        meta=exp.meta,
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup(tmp_path_factory.mktemp("ppo_work"), reference_seed=5)


def make(setup, tmp_path, *overrides, engine=None) -> PPOTrainer:
    return PPOTrainer(config(setup, TARGET, *overrides, out=str(tmp_path / "run")), engine=engine)


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


class CountForwards:
    """Counts ``Forward.response_logits`` calls per model (the scoring pass's and the update's policy/reference
    forwards; generation does not go through it)."""

    def __init__(self, monkeypatch) -> None:
        self.calls: list[int] = []
        real = Forward.response_logits

        def spy(fwd, model, *args, **kwargs):
            self.calls.append(id(model))
            return real(fwd, model, *args, **kwargs)

        monkeypatch.setattr(Forward, "response_logits", spy)

    def of(self, model) -> int:
        return self.calls.count(id(model))


def _metrics(m: dict) -> dict:
    return {k: v for k, v in m.items() if not k.startswith(("time/", "perf/"))}


# ------------------------------------------------------------------------- old log-probs from the update


def _fused_and_apart(setup, tmp_path, monkeypatch, *over):
    """(metrics of two iterations, policy weights, critic weights) with the fused scoring and without it."""
    runs = []
    for fused in (True, False):
        with monkeypatch.context() as mp:
            if not fused:
                mp.setattr(ppo_assembly, "fuses_scoring", lambda p: False)
            count = CountForwards(mp)
            tr = make(setup, tmp_path / str(fused), *over)
            assert tr.scoring.name == ("fused" if fused else "separate")
            metrics = [_metrics(tr.iteration(step)) for step in (1, 2)]
            p = tr.cfg.ppo
            batches, pretrain = p.buffer_size // p.rollout_batch_size, p.critic_pretrain_steps
            # the update's policy forwards (none in critic pre-training), and the scoring pass's: all of them
            # apart, those of critic pre-training only when fused
            scoring = 2 * batches if not fused else pretrain * batches
            assert count.of(tr.policy) == (2 - pretrain) + scoring
            runs.append((metrics, flat(tr.policy), flat(tr.critic)))
    return runs


@pytest.mark.parametrize(
    "over",
    [
        (),
        ("ppo.critic_pretrain_steps=1",),
        ("generation.temperature=0.7", "ppo.entropy_coef=0.01", "ppo.kl.estimator=k3"),
        ("ppo.importance_sampling=false", "model.reference=REF"),
        (reward_fn("ppo_helpers:some_nonfinite", finite=5),),
        ("ppo.kl.target=0.5", "ppo.kl.horizon=80", "model.reference=REF"),
        (
            "ppo.kl.acts_in=loss",
            "ppo.kl.estimator=k3",
            "ppo.kl.target=0.5",
            "ppo.kl.horizon=80",
            "ppo.dual_clip=3",
        ),
        ("ppo.ptx_coef=0.5", "data.ptx=PTX", "ppo.ptx_batch_size=3", "ppo.critic_pretrain_steps=1"),
    ],
    ids=[
        "ppo_max",
        "critic_pretrain",
        "temperature_entropy_k3",
        "no_importance_sampling",
        "some_nan_scores",
        "adaptive_kl_in_reward",
        "adaptive_kl_in_loss_dual_clip",
        "ptx_after_critic_pretrain",
    ],
)
def test_one_epoch_over_one_minibatch_takes_the_old_logprobs_from_the_update(
    setup, tmp_path, monkeypatch, over
):
    """ppo_epochs 1, minibatch = buffer, one micro-batch: the scoring pass runs neither the policy nor the critic
    (the update's first forward gives them). One rollout batch per buffer: the update's forward runs the same
    ops on the same rows (permuted) as the scoring pass would, so two iterations give bit for bit the metrics and
    weights of the run that scores apart."""
    over = tuple(o.replace("REF", str(setup.root / "reference")).replace("PTX", str(setup.ptx)) for o in over)
    (m_fused, p_fused, c_fused), (m_apart, p_apart, c_apart) = _fused_and_apart(
        setup, tmp_path, monkeypatch, "ppo.rollout_batch_size=8", *over
    )
    diff = {
        (i, k): (a[k], b[k])
        for i, (a, b) in enumerate(zip(m_fused, m_apart, strict=True))
        for k in a
        if a[k] != b[k] and not (a[k] != a[k] and b[k] != b[k])  # NaN == NaN here
    }
    assert not diff, diff
    assert torch.equal(p_fused, p_apart) and torch.equal(c_fused, c_apart)


def test_fused_scoring_over_several_rollout_batches_differs_by_rounding_only(setup, tmp_path, monkeypatch):
    """Two rollout batches of 4: the scoring pass would run each batch at its own width, the update runs the
    merged buffer at the widest one; the outputs of a row do not depend on its padding (position ids from the
    mask), so the two runs differ only by float rounding: metrics and weights within 1e-5 after two iterations
    (observed: ~1e-7 relative)."""
    (m_fused, p_fused, c_fused), (m_apart, p_apart, c_apart) = _fused_and_apart(setup, tmp_path, monkeypatch)
    for a, b in zip(m_fused, m_apart, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), k
    torch.testing.assert_close(p_fused, p_apart, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c_fused, c_apart, rtol=1e-5, atol=1e-6)


def test_no_fusion_where_the_update_cannot_give_the_old_logprobs(setup, tmp_path):
    """Two epochs, two minibatches or two micro-batches: the old log-probs must exist before the first step, or
    before the first micro-batch's loss (the minibatch's advantages are whitened together)."""
    for over in ("ppo.ppo_epochs=2", "ppo.minibatch_size=4", "ppo.micro_batch_size=4"):
        assert make(setup, tmp_path / over, over).scoring.name == "separate"
    assert make(setup, tmp_path / "one", "ppo.micro_batch_size=8").scoring.name == "fused"


def test_a_fused_buffer_without_a_finite_score_still_gets_its_logprobs_and_values(setup, tmp_path):
    """No finite score: no update, but the metrics (KL, entropy, values) still describe what was generated."""
    tr = PPOTrainer(
        config(
            setup,
            reward_fn("ppo_helpers:some_nonfinite", finite=0),
            "ppo.critic_init=sft",
            rm=False,
            out=str(tmp_path / "run"),
        )
    )
    assert tr.scoring.name == "fused"
    m = tr.iteration(1)
    assert m["nonfinite/skipped"] == 1
    for key in ("kl/per_token", "policy/entropy", "critic/value_mean"):
        assert torch.isfinite(torch.as_tensor(m[key])), key


# ------------------------------------------------------------------------- padding not computed


class FixedLengths:
    """A rollout engine that continues row i of each call with ``lengths[i]`` tokens, then EOS: responses of
    chosen, very different lengths."""

    def __init__(self, lengths: list[int], eos: int) -> None:
        self.lengths, self.eos = lengths, eos

    def generate(self, model, input_ids, attention_mask, *, greedy=False):
        out = torch.full((len(input_ids), max(self.lengths) + 1), self.eos)
        for i, n in enumerate(self.lengths[: len(input_ids)]):
            out[i, :n] = 10 + (torch.arange(n) * 7) % 200
        return torch.cat([input_ids, out], dim=1)


def _uneven(setup, tmp_path, *over, interleaved=False):
    """(trainer, prompt rows, positions of the short rows) for 8 rows: short prompts with 1-3 token responses and
    long prompts with 20-30 token responses, the short ones first or (``interleaved``) every other row."""
    short_lens, long_lens = [1, 1, 2, 3], [20, 24, 30, 30]
    tr = make(setup, tmp_path, "ppo.rollout_batch_size=8", *over)
    by_length = sorted(range(len(tr.data.prompts.ids)), key=lambda i: len(tr.data.prompts.ids[i]))
    short_rows, long_rows = by_length[:4], by_length[-4:]
    if interleaved:
        rows = [i for pair in zip(short_rows, long_rows, strict=True) for i in pair]
        lengths = [n for pair in zip(short_lens, long_lens, strict=True) for n in pair]
    else:
        rows, lengths = short_rows + long_rows, short_lens + long_lens
    tr.rollouts.engine = FixedLengths(lengths, tr.rollouts.eos_ids[0])
    return tr, rows, [rows.index(i) for i in short_rows]


def _short_width(exp, short):
    return int(exp.prompt_lens[short].max()) + int(exp.response_lens[short].max())


def test_micro_batches_group_rows_of_similar_length():
    """Experience.micro_batches: chunks of the given size (the last one smaller), each of rows of similar prompt
    + response length (sorted by it, ties in row order), every row once; None or a size of at least the batch:
    one chunk of all rows in order."""
    prompt = torch.tensor([5, 1, 9, 2, 2, 7, 1])
    response = torch.tensor([5, 1, 9, 1, 3, 1, 2])  # totals 10, 2, 18, 3, 5, 8, 3
    exp = Experience(
        torch.zeros(7, 18, dtype=torch.long),
        torch.ones(7, 18, dtype=torch.long),
        torch.ones(7, 9, dtype=torch.bool),
        9,
        prompt,
        response,
        torch.zeros(7, dtype=torch.bool),
    )
    assert exp.micro_batches(3) == [[1, 3, 6], [4, 5, 0], [2]]
    assert exp.micro_batches(None) == exp.micro_batches(7) == exp.micro_batches(9) == [list(range(7))]


@torch.no_grad()
@pytest.mark.parametrize("interleaved", [False, True])
def test_scoring_micro_batches_drop_the_columns_that_are_padding_in_all_their_rows(
    setup, tmp_path, monkeypatch, interleaved
):
    """ppo.micro_batch_size=4 over rows of very uneven lengths, whatever their order: the short rows share a chunk
    whose forwards are only as wide as its own longest prompt + response, and every scoring output on the
    response mask, in the batch's row order, equals the unchunked pass within 1e-6 (only float rounding differs:
    position ids come from the mask)."""
    tr, rows, short = _uneven(setup, tmp_path, "ppo.micro_batch_size=4", interleaved=interleaved)
    widths: list[int] = []
    real = Forward.response_logits
    monkeypatch.setattr(
        Forward,
        "response_logits",
        lambda fwd, model, batch: (widths.append(batch.sequences.shape[1]), real(fwd, model, batch))[1],
    )
    exp = tr.generate(rows, tr.data.prompts)
    tr.rollouts.score(exp)
    full, narrow = exp.sequences.shape[1], _short_width(exp, short)
    assert narrow < full - 20 and widths == [narrow, narrow, full, full]  # policy and reference per chunk
    whole = generated_only(exp)
    ppo_scoring.score_experience(
        whole,
        policy=tr.unwrapped(tr.policy),
        reference=tr.models.reference,
        critic=tr.unwrapped(tr.critic),
        fwd=tr.rollouts.fwd,
        rewards=tr.rollouts.rewards,
        eos_ids=tr.rollouts.eos_ids,
    )
    mask = exp.response_mask
    for name in ("logprobs", "ref_logprobs", "raw_logprobs", "entropy", "values"):
        got, expect = getattr(exp, name), getattr(whole, name)
        assert got.shape == expect.shape
        torch.testing.assert_close(got[mask], expect[mask], atol=1e-6, rtol=1e-6)
        assert (got[short, int(exp.response_lens[short].max()) :] == 0).all()  # the dropped columns: zeros
    torch.testing.assert_close(exp.scores, whole.scores, atol=1e-6, rtol=1e-6)


def test_update_micro_batches_group_rows_of_similar_length(setup, tmp_path, monkeypatch):
    """The update's micro-batches of a shuffled minibatch put the short rows together: with micro-batches of 4 over
    4 short and 4 long rows, the policy's and the critic's forwards are as wide as the short rows in one
    micro-batch and as the whole minibatch in the other (consecutive rows of the shuffle would mix them)."""
    tr, rows, short = _uneven(
        setup, tmp_path, "ppo.micro_batch_size=4", "ppo.minibatch_size=8", interleaved=True
    )
    exp = tr.generate(rows, tr.data.prompts)
    tr.scoring.score(exp, 1, False)
    tr.scoring.advantages(exp, kl_coef=tr.cfg.ppo.kl.coef)
    widths: list[int] = []
    logits, values = Forward.response_logits, Forward.values
    monkeypatch.setattr(
        Forward,
        "response_logits",
        lambda fwd, model, batch: (widths.append(batch.sequences.shape[1]), logits(fwd, model, batch))[1],
    )
    monkeypatch.setattr(
        Forward,
        "values",
        lambda fwd, model, batch: (widths.append(batch.sequences.shape[1]), values(fwd, model, batch))[1],
    )
    tr.scoring.update(exp, 1, False, kl_coef=tr.cfg.ppo.kl.coef)
    full, narrow = exp.sequences.shape[1], _short_width(exp, short)
    assert sorted(widths) == [narrow, narrow, full, full]


@pytest.mark.parametrize("interleaved", [False, True])
def test_update_micro_batches_of_uneven_lengths_give_the_same_iteration(setup, tmp_path, interleaved):
    """The update's micro-batches are trimmed too (Experience.select) and grouped by length: an iteration over
    rows of very uneven lengths in micro-batches of 2 gives the losses, metrics and weights of one without
    micro-batches, within 1e-6 (float rounding of narrower forwards and of the gradient accumulation)."""
    results = []
    for over in ((), ("ppo.micro_batch_size=2",)):
        tr, rows, _ = _uneven(setup, tmp_path / str(len(over)), *over, interleaved=interleaved)
        tr.data.prompt_stream.take = lambda k, rows=rows: rows
        m = _metrics(tr.iteration(1))
        results.append((m, flat(tr.policy), flat(tr.critic)))
    (m0, p0, c0), (m1, p1, c1) = results
    assert m0.keys() == m1.keys()
    for k in m0:
        assert m1[k] == pytest.approx(m0[k], rel=1e-5, abs=1e-6), k
    torch.testing.assert_close(p1, p0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c1, c0, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------- no logits nobody reads


@pytest.mark.parametrize("fused", [True, False])
def test_no_forward_computes_logits_nobody_reads(setup, tmp_path, fused):
    """Over an iteration and an evaluation: the critic's and the reward model's LM heads never run (values and
    scores read the final hidden state), and the policy's and the reference's run on at most the real response
    tokens of a batch (response scoring: the head on those positions only) or on one position per row and step
    (generation)."""
    over = () if fused else ("ppo.minibatch_size=4",)
    tr = make(
        setup,
        tmp_path,
        f"model.reference={setup.root / 'reference'}",
        f"data.valid_prompts={setup.valid}",
        *over,
    )
    assert tr.scoring.name == ("fused" if fused else "separate")
    seen: dict[str, list[int]] = {}
    heads = {
        "policy": tr.unwrapped(tr.policy).get_output_embeddings(),
        "reference": tr.models.reference.get_output_embeddings(),
        "critic": tr.unwrapped(tr.critic).backbone.get_output_embeddings(),
        "reward": tr.models.reward_model.backbone.get_output_embeddings(),
    }
    for name, head in heads.items():
        head.register_forward_hook(
            lambda _m, inputs, _o, name=name: seen.setdefault(name, []).append(inputs[0][..., 0].numel())
        )
    tokens: list[int] = []
    widths: list[int] = []
    real = tr.generate

    def generate(*args, **kw):
        exp = real(*args, **kw)
        tokens.append(int(exp.response_lens.sum()))
        widths.append(exp.sequences.shape[1])
        return exp

    tr.generate = generate
    tr.iteration(1)
    tr.evaluate(1)
    assert "critic" not in seen and "reward" not in seen
    assert seen["policy"] and seen["reference"]
    # a forward scores at most the buffer (the fused update takes both rollout batches at once), and its head
    # runs on their real response tokens, not on their prompts or padding
    assert max(seen["policy"]) <= sum(tokens) and max(seen["reference"]) <= sum(tokens)
    assert sum(tokens) < sum(exp_width * 4 for exp_width in widths)
    rows = 4  # ppo.rollout_batch_size: generation runs the head on the last position of each row only
    assert rows in seen["policy"] and min(seen["policy"]) <= rows


# ------------------------------------------------------------------------- one model's activations at a time


def test_unfused_updates_free_one_models_graph_before_the_other_models_forward(setup, tmp_path, monkeypatch):
    """The update's forwards hold their activations until their backward: without fusion each model's backward
    comes right after its own forward, so the policy's and the critic's activations never coexist (on a 135M
    Llama they are each ~2.5x the model's weights). Two minibatches of two micro-batches each."""
    tr = make(setup, tmp_path, "ppo.minibatch_size=4", "ppo.micro_batch_size=2")
    assert tr.scoring.name == "separate"
    events: list[str] = []
    names = {id(tr.policy): "policy", id(tr.critic): "critic"}
    logits, values, backward = (
        Forward.response_logits,
        Forward.values,
        Optimised.backward,
    )

    def spy_logits(fwd, model, *args, **kwargs):
        if torch.is_grad_enabled():
            events.append("policy forward")
        return logits(fwd, model, *args, **kwargs)

    def spy_values(fwd, critic, *args, **kwargs):
        if torch.is_grad_enabled():
            events.append("critic forward")
        return values(fwd, critic, *args, **kwargs)

    def spy_backward(self, loss):
        events.append(f"{names[id(self.model)]} backward")
        return backward(self, loss)

    monkeypatch.setattr(Forward, "response_logits", spy_logits)
    monkeypatch.setattr(Forward, "values", spy_values)
    monkeypatch.setattr(Optimised, "backward", spy_backward)
    tr.iteration(1)
    one = ["policy forward", "policy backward", "critic forward", "critic backward"]
    assert events == one * 4


# ------------------------------------------------------------------------- log-probs from the sampling pass


@torch.no_grad()
def test_logprobs_from_generate_are_the_recomputed_ones_without_the_policy_forward(
    setup, tmp_path, monkeypatch
):
    """generation.logprobs_from: generate (temperature 0.7, repetition penalty 1.1, top-p 0.9: the raw logits
    before those processors): the rollout carries the sampling pass's logits; the scoring pass runs only the
    reference and drops them; the policy's log-probs, raw log-probs, entropy and the exact KL equal the
    recomputed ones within 1e-5 (observed ~1e-6)."""
    tr = make(setup, tmp_path, "generation.logprobs_from=generate", "generation.temperature=0.7")
    assert tr.cfg.generation.repetition_penalty != 1.0 and tr.cfg.generation.top_p < 1.0
    count = CountForwards(monkeypatch)
    exp = tr.generate(list(range(8)), tr.data.prompts)
    assert exp.sampling_logits is not None and exp.logprobs is None
    again = generated_only(exp)
    tr.rollouts.score(exp)
    assert count.of(tr.unwrapped(tr.policy)) == 0 and count.of(tr.models.reference) == 1
    assert exp.sampling_logits is None
    tr.rollouts.score(again)
    mask = exp.response_mask
    for name in ("logprobs", "raw_logprobs", "entropy", "exact_kl"):
        torch.testing.assert_close(getattr(exp, name)[mask], getattr(again, name)[mask], atol=1e-5, rtol=1e-5)
    assert float(exp.exact_kl[mask].sum()) > 0
    assert not torch.equal(exp.logprobs, exp.raw_logprobs)  # temperature-scaled, as with sampling
    greedy = tr.generate([0, 1], tr.data.prompts, greedy=True)  # evaluation recomputes
    assert greedy.sampling_logits is None


@pytest.mark.parametrize("minibatch", [8, 4])
def test_logprobs_from_generate_logs_its_mismatch_with_the_recompute(setup, tmp_path, minibatch):
    """Every iteration logs |log-prob from generate - the update's first forward's| (max, mean over the first
    minibatch's response tokens): free, before any step; under 1e-5 on these fp32 models. Not logged by
    default (sampling: the old log-probs are the recompute)."""
    tr = make(setup, tmp_path, "generation.logprobs_from=generate", f"ppo.minibatch_size={minibatch}")
    assert tr.scoring.name == ("fused" if minibatch == 8 else "separate")
    m = tr.iteration(1)
    assert 0 <= m["policy/logprob_mismatch_mean"] <= m["policy/logprob_mismatch_max"] < 1e-5
    if minibatch == 8:  # one minibatch: no step before it, its ratio is the mismatch's exp
        assert m["policy/ratio_max"] < 1 + 1e-5
    assert "policy/logprob_mismatch_max" not in make(setup, tmp_path / "default").iteration(1)


def test_logprobs_from_generate_needs_an_engine_with_logits(setup, tmp_path):
    class TokensOnly:
        def generate(self, model, input_ids, attention_mask, *, greedy=False):
            return torch.cat([input_ids, torch.full((len(input_ids), 2), 7)], dim=1)

    tr = make(setup, tmp_path, "generation.logprobs_from=generate", engine=TokensOnly())
    with pytest.raises(UserError, match="logprobs_from: generate needs a rollout engine") as err:
        tr.iteration(1)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------- packed sequences


class CountPositions:
    """Positions of the batches ``Forward``'s response logits and values run on (rows x width, padded) and of the
    packed rows they actually run on (``ppo.pack_sequences``)."""

    def __init__(self, monkeypatch) -> None:
        self.padded: list[int] = []
        self.packed: list[int] = []
        logits, values, pack = Forward.response_logits, Forward.values, ppo_models._pack

        def spy_logits(fwd, model, batch):
            self.padded.append(batch.sequences.numel())
            return logits(fwd, model, batch)

        def spy_values(fwd, critic, batch):
            self.padded.append(batch.sequences.numel())
            return values(fwd, critic, batch)

        def spy_pack(batch):
            out = pack(batch)
            self.packed.append(out.input_ids.numel())
            return out

        monkeypatch.setattr(Forward, "response_logits", spy_logits)
        monkeypatch.setattr(Forward, "values", spy_values)
        monkeypatch.setattr(ppo_models, "_pack", spy_pack)


CRITIC_FREE = ("ppo.advantage_estimator=reinforce_pp", "ppo.critic_pretrain_steps=0")


@pytest.mark.slow
@pytest.mark.parametrize(
    "over",
    [
        (),
        ("ppo.micro_batch_size=6",),
        ("ppo.minibatch_size=4",),
        CRITIC_FREE,
        (*CRITIC_FREE, "ppo.micro_batch_size=6"),
        ("model.lora={r: 4}", "ppo.micro_batch_size=6"),
    ],
    ids=[
        "fused",
        "micro_batches",
        "two_minibatches",
        "critic_free_fused",
        "critic_free_micro_batches",
        "lora",
    ],
)
def test_packed_sequences_give_the_padded_iterations(setup, tmp_path, monkeypatch, over):
    """ppo.pack_sequences over rows of very uneven lengths: two iterations (scoring pass, fused or apart, and
    update; with and without micro-batches; with a critic and critic-free; under LoRA, the reference being
    the policy with its adapters off) give the metrics and weights of the
    padded run within float rounding, every forward over the packed rows only, never more positions than the padded ones and fewer
    in all."""
    results = []
    for packed in (False, True):
        with monkeypatch.context() as mp:
            count = CountPositions(mp)
            tr, rows, _ = _uneven(
                setup, tmp_path / str(packed), f"ppo.pack_sequences={packed}", *over, interleaved=True
            )
            tr.data.prompt_stream.take = lambda k, rows=rows: rows
            assert tr.scoring.name == ("fused" if over in ((), CRITIC_FREE) else "separate")
            count.packed.clear()  # the start-up check's
            metrics = [_metrics(tr.iteration(step)) for step in (1, 2)]
            critic = flat(tr.critic) if tr.critic is not None else None
            results.append((metrics, flat(tr.policy), critic))
        if packed:
            assert len(count.packed) == len(count.padded) > 0
            assert all(a <= b for a, b in zip(count.packed, count.padded, strict=True))
            assert sum(count.packed) < sum(count.padded), (count.packed, count.padded)
        else:
            assert not count.packed
    _same_iterations(results)


def test_packing_is_refused_where_the_attention_lets_packed_sequences_see_each_other(
    setup, tmp_path, monkeypatch
):
    """An attention that does not honour packed position ids (here: transformers without its detection of packed
    sequences) would silently change every output: the start-up check refuses it in one line naming the key and
    the attention implementation. Padded forwards do not depend on it."""
    from transformers import masking_utils

    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    with pytest.raises(ConfigError, match=r"^ppo\.pack_sequences: model\.policy's packed forward") as err:
        make(setup, tmp_path / "packed", "ppo.pack_sequences=true")
    assert "\n" not in str(err.value) and "attention implementation (ppomax_cpu_float32_sdpa)" in str(
        err.value
    )
    make(setup, tmp_path / "padded").iteration(1)


# ------------------------------------------------------------------------- the reward model's forwards


class CountRewardPositions:
    """Positions of every forward of the run's reward model (rows x width of its padded or packed input)."""

    def __init__(self, monkeypatch, rm) -> None:
        self.positions: list[int] = []
        for name in ("score", "values"):  # padded, packed
            real = getattr(rm, name)

            def spy(input_ids, *args, real=real, **kwargs):
                self.positions.append(input_ids.numel())
                return real(input_ids, *args, **kwargs)

            monkeypatch.setattr(rm, name, spy)


@pytest.mark.parametrize(
    "base, over",
    [
        ((), ("ppo.micro_batch_size=2",)),
        ((), ("ppo.pack_sequences=true",)),
        (("model.lora={r: 4}",), ("ppo.micro_batch_size=4", "ppo.pack_sequences=true")),
    ],
    ids=["micro_batches", "packed", "lora_micro_batches_packed"],
)
def test_reward_model_forwards_follow_micro_batches_and_packing(setup, tmp_path, monkeypatch, base, over):
    """Over rows of very uneven lengths, the reward model runs as the scoring pass's other forwards do: one
    forward per micro-batch (rows of similar length, only as wide as they are), over packed rows with
    ppo.pack_sequences (under LoRA: the reward model on the critic's base), fewer positions than its one
    padded forward over the rollout batch; two iterations give the run's metrics and weights without them
    within float rounding."""
    results, counts = [], []
    for o in (base, (*base, *over)):
        with monkeypatch.context() as mp:
            tr, rows, _ = _uneven(setup, tmp_path / str(len(o)), *o, interleaved=True)
            tr.data.prompt_stream.take = lambda k, rows=rows: rows
            assert isinstance(tr.models.reward_model, RewardOnCriticBase) == bool(base)
            count = CountRewardPositions(mp, tr.models.reward_model)
            metrics = [_metrics(tr.iteration(step)) for step in (1, 2)]
            results.append((metrics, flat(tr.policy), flat(tr.critic)))
            counts.append(count.positions)
    (m0, p0, c0), (m1, p1, c1) = results
    micro = tr.cfg.ppo.micro_batch_size or 8
    full, chunked = counts
    assert len(full) == 2 and len(chunked) == 2 * (8 // micro)  # one forward of 8 rows per iteration before
    assert max(chunked) < min(full), (full, chunked)
    for a, b in zip(m0, m1, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6, nan_ok=True), k
    torch.testing.assert_close(p1, p0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c1, c0, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------- the LM head on the response positions


@pytest.fixture(scope="module")
def tied_setup(tmp_path_factory):
    return make_setup(tmp_path_factory.mktemp("ppo_work_tied"), tie=True)


def _same_iterations(results) -> None:
    (m0, p0, c0), (m1, p1, c1) = results
    for a, b in zip(m0, m1, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6, nan_ok=True), k
    torch.testing.assert_close(p1, p0, rtol=1e-5, atol=1e-6)
    if c0 is not None:
        torch.testing.assert_close(c1, c0, rtol=1e-5, atol=1e-6)


def _uneven_iterations(
    setup, tmp_path, *over
) -> tuple[list[dict], torch.Tensor, torch.Tensor | None, list[int]]:
    """(metrics of two iterations over the uneven rows, policy weights, critic weights, the positions the
    policy's LM head ran on per call)."""
    tr, rows, _ = _uneven(setup, tmp_path, *over, interleaved=True)
    tr.data.prompt_stream.take = lambda k, rows=rows: rows
    head: list[int] = []
    tr.unwrapped(tr.policy).get_output_embeddings().register_forward_hook(
        lambda _m, inputs, _o: head.append(inputs[0][..., 0].numel())
    )
    metrics = [_metrics(tr.iteration(step)) for step in (1, 2)]
    return metrics, flat(tr.policy), flat(tr.critic) if tr.critic is not None else None, head


@pytest.mark.slow
@pytest.mark.parametrize(
    "over",
    [
        (),
        ("ppo.micro_batch_size=3", "generation.temperature=0.7", "ppo.entropy_coef=0.01"),
        ("ppo.minibatch_size=4",),
        ("model.lora={r: 4}", "ppo.micro_batch_size=3"),
        ("TIED", "ppo.micro_batch_size=3"),
    ],
    ids=["fused", "micro_batches", "two_minibatches", "lora", "tied_head"],
)
def test_the_head_on_the_response_positions_gives_the_whole_heads_iterations(
    setup, tied_setup, tmp_path, monkeypatch, over
):
    """Two iterations over rows of very uneven lengths (scoring, fused or apart, and update; micro-batches; LoRA,
    the reference being the policy's base; an LM head tied to the input embeddings), packed: with the head on the
    response positions only, the metrics and weights of the head on every packed position within float rounding,
    and the policy's head on fewer positions."""
    if over[:1] == ("TIED",):
        setup, over = tied_setup, over[1:]
    whole_head = ppo_models._lm_head
    runs = []
    for narrowed in (False, True):
        with monkeypatch.context() as mp:
            if not narrowed:  # the model's head as it was: no hook
                mp.setattr(ppo_models, "_lm_head", lambda model: (None, whole_head(model)[1]))
            runs.append(_uneven_iterations(setup, tmp_path / str(narrowed), "ppo.pack_sequences=true", *over))
    _same_iterations([run[:3] for run in runs])
    whole, narrow = runs[0][3], runs[1][3]
    assert all(a <= b for a, b in zip(narrow, whole, strict=True)) and sum(narrow) < sum(whole), (
        narrow,
        whole,
    )


@pytest.mark.slow
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "separate"])
def test_the_outputs_past_a_rows_response_are_never_read(setup, tmp_path, monkeypatch, packed, fused):
    """The per-token outputs of the response logits (log-probs, entropy, exact KL) past each row's response
    (zeros: no logits are computed there) are never read: NaN there gives the same two iterations (scoring,
    exact KL, entropy bonus, update), every metric and weight as with zeros."""
    from ppomax.models.lm_head import ResponseLogits

    over = (
        f"ppo.pack_sequences={packed}",
        "generation.temperature=0.7",
        "ppo.entropy_coef=0.01",
        *(() if fused else ("ppo.micro_batch_size=3",)),
    )
    real = ResponseLogits.rows
    runs = []
    for poisoned in (False, True):
        with monkeypatch.context() as mp:
            if poisoned:

                def nan_past_the_response(logits, per_token):
                    out = real(logits, per_token)
                    assert logits.positions is not None, "the head runs on the response tokens only"
                    on = torch.zeros(out.numel(), dtype=torch.bool, device=out.device)
                    on[logits.positions.target] = True
                    return out.masked_fill(~on.view_as(out), float("nan"))

                mp.setattr(ResponseLogits, "rows", nan_past_the_response)
            runs.append(_uneven_iterations(setup, tmp_path / str(poisoned), *over)[:3])
    assert all(torch.isfinite(torch.as_tensor(v)) for v in runs[0][0][-1].values() if isinstance(v, float))
    _same_iterations(runs)
