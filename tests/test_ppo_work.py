"""No work that is not needed: forwards the PPO iteration can skip or narrow give the same run. Tiny models (see
ppo_helpers)."""

from __future__ import annotations

import pytest
import torch

from ppo_helpers import config, make_setup, reward_fn
from ppomax.trainers import ppo_step
from ppomax.trainers.ppo import PPOTrainer

TARGET = reward_fn("ppo_helpers:target_tokens")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup(tmp_path_factory.mktemp("ppo_work"), reference_seed=5)


def make(setup, tmp_path, *overrides, engine=None) -> PPOTrainer:
    return PPOTrainer(config(setup, TARGET, *overrides, out=str(tmp_path / "run")), engine=engine)


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _metrics(m: dict) -> dict:
    return {k: v for k, v in m.items() if not k.startswith(("time/", "perf/"))}


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


def _uneven(setup, tmp_path, *over):
    """8 rows: a short prompt with a 1-token response first, long prompts with long responses last."""
    tr = make(setup, tmp_path, "ppo.rollout_batch_size=8", *over)
    tr.rollouts.engine = FixedLengths([1, 1, 2, 3, 20, 24, 30, 30], tr.rollouts.eos_ids[0])
    by_length = sorted(range(len(tr.data.prompts.ids)), key=lambda i: len(tr.data.prompts.ids[i]))
    return tr, by_length[:4] + by_length[-4:]


@torch.no_grad()
def test_scoring_micro_batches_drop_the_columns_that_are_padding_in_all_their_rows(
    setup, tmp_path, monkeypatch
):
    """ppo.micro_batch_size=4 over rows of very uneven lengths: the first chunk's forwards are only as wide as
    its own longest prompt + response, and every scoring output on the response mask equals the unchunked pass
    within 1e-6 (only float rounding differs: position ids come from the mask)."""
    tr, rows = _uneven(setup, tmp_path, "ppo.micro_batch_size=4")
    widths: list[int] = []
    real = ppo_step.Forward.response_logits
    monkeypatch.setattr(
        ppo_step.Forward,
        "response_logits",
        lambda fwd, model, seqs, *a: (widths.append(seqs.shape[1]), real(fwd, model, seqs, *a))[1],
    )
    exp = tr.generate(rows, tr.data.prompts)
    tr.score(exp)
    full = exp.sequences.shape[1]
    short = int(exp.prompt_lens[:4].max()) + int(exp.response_lens[:4].max())
    assert short < full - 20 and widths == [short, short, full, full]  # policy and reference per chunk
    whole = ppo_step.Experience(
        **{f: getattr(exp, f) for f in ("sequences", "attention_mask", "response_mask", "prompt_width")},
        prompt_lens=exp.prompt_lens,
        response_lens=exp.response_lens,
        truncated=exp.truncated,
        prompts=exp.prompts,
        responses=exp.responses,
        meta=exp.meta,
    )
    ppo_step.score_experience(
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
        assert (got[:4, int(exp.response_lens[:4].max()) :] == 0).all()  # the dropped columns: zeros
    torch.testing.assert_close(exp.scores, whole.scores, atol=1e-6, rtol=1e-6)


def test_update_micro_batches_of_uneven_lengths_give_the_same_iteration(setup, tmp_path):
    """The update's micro-batches are trimmed too (Experience.select): an iteration over rows of very uneven
    lengths in micro-batches of 2 gives the losses, metrics and weights of one without micro-batches, within
    1e-6 (float rounding of narrower forwards and of the gradient accumulation)."""
    results = []
    for over in ((), ("ppo.micro_batch_size=2",)):
        tr, rows = _uneven(setup, tmp_path / str(len(over)), *over)
        tr.data.prompt_stream.take = lambda k, rows=rows: rows
        m = _metrics(tr.iteration(1))
        results.append((m, flat(tr.policy), flat(tr.critic)))
    (m0, p0, c0), (m1, p1, c1) = results
    assert m0.keys() == m1.keys()
    for k in m0:
        assert m1[k] == pytest.approx(m0[k], rel=1e-5, abs=1e-6), k
    torch.testing.assert_close(p1, p0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c1, c0, rtol=1e-5, atol=1e-6)
