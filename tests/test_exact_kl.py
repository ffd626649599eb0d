"""One KL for every run: the exact per-token KL(policy || reference) over the vocabulary, from both models' logits
in the scoring pass (or beside the update's first forward when it is fused), logged as kl/exact_*, read by the
collapse monitor and the estimators' frontier, and used by PPO's evaluation. The sampled estimators are not that
KL once the tokens come from top-p and a repetition penalty: the toy case of the first test."""

from __future__ import annotations

import pytest
import torch

from helpers import dense_logits
from ppo_helpers import config, make_setup, reward_fn
from ppomax.algos import kl_from_logits, vocab
from ppomax.ppo import PPOTrainer
from ppomax.ppo import assembly as ppo_assembly
from ppomax.ppo.advantages import compute_advantages
from ppomax.ppo.collapse import EXACT_KL, KL, LENGTH, PPL, REWARD, CollapseMonitor

TARGET = reward_fn("ppo_helpers:target_tokens")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup(tmp_path_factory.mktemp("exact_kl"), reference_seed=5)


def make(setup, tmp_path, *overrides, preset="ppo_max") -> PPOTrainer:
    ref = f"model.reference={setup.root / 'reference'}"  # a reference other than the policy: KL > 0
    return PPOTrainer(config(setup, TARGET, ref, *overrides, preset=preset, out=str(tmp_path / "run")))


def test_the_estimators_misread_the_kl_of_a_truncated_sampler():
    """pi and ref over 4 tokens, tokens drawn from pi's top-p nucleus (as generation does): E[k1] and E[k3] under
    the sampler are not KL(pi || ref), and not each other. A frontier or a threshold on them is not on the KL."""
    pi = torch.tensor([0.55, 0.3, 0.1, 0.05], dtype=torch.float64)
    ref = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    kl = float((pi * (pi / ref).log()).sum())
    q = torch.where(pi.cumsum(0) - pi < 0.9, pi, torch.zeros_like(pi))  # top-p 0.9 keeps the first 3 tokens
    q = q / q.sum()
    log_r = (ref / pi).log()
    k1 = float((q * -log_r).sum())
    k3 = float((q * (log_r.exp() - 1 - log_r)).sum())
    assert kl == pytest.approx(0.845, abs=1e-3)
    assert k1 == pytest.approx(0.999, abs=1e-3) and k3 == pytest.approx(0.631, abs=1e-3)
    exact = kl_from_logits(pi.log().view(1, 1, 4), ref.log().view(1, 1, 4))
    assert exact.item() == pytest.approx(kl, rel=1e-12)


def test_the_scoring_pass_logs_the_exact_kl_of_both_models_logits(setup, tmp_path):
    """exp.exact_kl is sum_v pi_T(v) log(pi_T(v) / ref_T(v)) at every response position, with the temperature of
    the log-probs, computed here from one full forward of each model; its token and response means are logged."""
    tr = make(setup, tmp_path, "ppo.critic_pretrain_steps=0")
    exp = tr.generate(list(range(8)), tr.data.prompts)
    tr.rollouts.score(exp)
    compute_advantages(exp, tr.cfg.ppo, tr.cfg.generation, tr.moments, kl_coef=tr.cfg.ppo.kl.coef)
    fwd, t = tr.updater.fwd, tr.cfg.generation.temperature
    assert t != 1.0
    with torch.no_grad():
        a = dense_logits(fwd.response_logits(tr.rollouts.policy, exp))
        b = dense_logits(fwd.response_logits(tr.rollouts.reference, exp))
    want = torch.where(exp.response_mask, kl_from_logits(a / t, b / t), 0.0)
    torch.testing.assert_close(exp.exact_kl, want, atol=1e-6, rtol=1e-5)
    assert want[exp.response_mask].min() > 0
    m = tr.iteration_metrics(exp, {}, False, ppo_step_clock())
    n = exp.response_mask.sum()
    assert m["kl/exact_per_token"] == pytest.approx(float(want.sum() / n), rel=1e-5)
    assert m["kl/exact_per_sequence"] == pytest.approx(float(want.sum(1).mean()), rel=1e-5)
    assert m["kl/exact_per_token"] != pytest.approx(
        m["kl/per_token"], rel=1e-3
    )  # k1 on samples: another number


def ppo_step_clock():
    from ppomax.ppo.metrics import Stopwatch

    return Stopwatch(torch.device("cpu"))


def test_position_slices_bound_the_memory_not_the_value(setup, tmp_path, monkeypatch):
    tr = make(setup, tmp_path, "ppo.critic_pretrain_steps=0")
    exp = tr.generate(list(range(8)), tr.data.prompts)
    tr.rollouts.score(exp)
    whole = exp.exact_kl.clone()
    monkeypatch.setattr(vocab, "VOCAB_SLICE_ELEMENTS", 1)  # one position per slice
    exp.exact_kl = exp.logprobs = None  # score the policy again
    tr.rollouts.score(exp)
    torch.testing.assert_close(exp.exact_kl, whole, atol=1e-7, rtol=0)


@pytest.mark.parametrize("extra", [(), ("generation.logprobs_from=generate",)])
def test_a_fused_update_gives_the_exact_kl_of_the_scoring_pass(setup, tmp_path, monkeypatch, extra):
    """One epoch over one minibatch: the reference runs beside the update's first forward (the policy's logits are
    there, not in the scoring pass); the logged KLs, reference log-probs and the update are those of a separate
    scoring pass. With the policy's logits from the sampling pass too (unfused, its exact KL comes from them)."""
    runs = []
    for fused in (True, False):
        with monkeypatch.context() as mp:
            if not fused:
                mp.setattr(ppo_assembly, "fuses_scoring", lambda p: False)
            over = ("ppo.critic_pretrain_steps=1", "ppo.minibatch_size=8", "ppo.buffer_size=8", *extra)
            tr = make(setup, tmp_path / str(fused), *over)
            assert tr.scoring.name == ("fused" if fused else "separate")
            runs.append([tr.iteration(s) for s in (1, 2, 3)])
    for a, b in zip(*runs, strict=True):
        for k in ("kl/exact_per_token", "kl/exact_per_sequence", "kl/per_token", "ppl/reference", "loss/pg"):
            if k in b:
                assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), k
    assert runs[0][-1]["kl/exact_per_token"] > 0 and "kl/exact_per_token" in runs[1][-1]


def test_the_monitor_reads_the_exact_kl_where_it_is_logged():
    """Drift fires on the exact KL (rising past 0.15) even where the estimator reads it below the threshold, and
    on the estimator's KL only in a run that logs no exact KL."""

    def point(i: int, exact: bool) -> dict[str, float]:
        m = {LENGTH: 10.0, PPL: 2.0, REWARD: 0.1 * i, KL: 0.05}
        if exact:
            m[EXACT_KL] = 0.03 * i
        return m

    for exact, fires in ((True, True), (False, False)):
        mon = CollapseMonitor(
            window=2, length_ratio=1.3, ppl_ratio=0.9, kl_per_token=0.1, drift_kl_per_token=0.15
        )
        fired = [s for s in range(1, 15) if mon.update(s, point(s, exact)) is not None]
        # the current window's mean (0.03 x 5.5) first reaches 0.15 at step 6
        assert fired == ([6] if fires else [])
