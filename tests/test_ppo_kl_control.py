"""Beyond the paper, in the PPO trainer: the dual clip (``ppo.dual_clip``), the adaptive KL coefficient
(``ppo.kl.target`` / ``horizon``) and KL as a loss term (``ppo.kl.acts_in: loss``), one switch at a time, each
against an observable change of behaviour or an independent computation. Tiny models (see ppo_helpers)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from helpers import assert_same_run
from ppo_helpers import config, make_setup, reward_fn, synthetic_experience
from ppomax.algos import RunningMoments
from ppomax.config import load_config
from ppomax.errors import ConfigError, RunStopped
from ppomax.monitor import read_metrics
from ppomax.ppo import PPOTrainer, train_ppo
from ppomax.ppo import advantages as ppo_advantages
from ppomax.ppo import update as ppo_update
from ppomax.ppo.advantages import compute_advantages

TARGET = reward_fn("ppo_helpers:target_tokens")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup(tmp_path_factory.mktemp("ppo_kl"), reference_seed=5)


def make(setup, tmp_path, *overrides) -> PPOTrainer:
    return PPOTrainer(config(setup, TARGET, *overrides, out=str(tmp_path / "run")))


def reference(setup) -> str:
    """The override that makes the reference a model other than the policy (the KL is then > 0 from the start)."""
    return f"model.reference={setup.root / 'reference'}"


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _timeless(m: dict) -> dict:
    return {k: v for k, v in m.items() if not k.startswith(("time/", "perf/"))}


# ------------------------------------------------------------------------------------------------ dual clip


def test_dual_clip_binds_where_the_ratio_exceeds_c_and_zeroes_those_gradients(setup, tmp_path):
    """Old log-probs 3 nats below the new ones: every ratio is e^3 ~ 20. Tokens with A > 0 are clipped as usual;
    with the dual clip (c = 3) every token with A < 0 is bounded by c * A, so no token has a gradient and the
    policy does not move (no weight decay: Adam steps by 0). Without it the A < 0 tokens push the policy."""

    def run(tag, *over):
        tr = make(setup, tmp_path / tag, "ppo.minibatch_size=4", *over)  # two minibatches: not fused
        before, inner = flat(tr.policy), tr.updater.update

        def update(exp, step, critic_only, **kw):
            return inner(dataclasses.replace(exp, logprobs=exp.logprobs - 3.0), step, critic_only, **kw)

        tr.updater.update = update
        m = tr.iteration(1)
        return before, flat(tr.policy), m

    before, after, m = run("dual", "ppo.dual_clip=3")
    assert torch.equal(before, after)
    assert 0.1 < m["policy/dual_clip_frac"] < 0.9  # the tokens whose whitened advantage is negative
    assert m["policy/pg_clipfrac"] + m["policy/dual_clip_frac"] == pytest.approx(1.0)
    before, after, plain = run("plain")
    assert not torch.equal(before, after) and "policy/dual_clip_frac" not in plain
    assert plain["policy/pg_clipfrac"] == pytest.approx(m["policy/pg_clipfrac"])


def test_dual_clip_never_binds_on_policy(setup, tmp_path):
    """One fused update: the ratio is exactly 1 < c, so the dual clip changes nothing, bit for bit."""
    tr = make(setup, tmp_path / "a", "ppo.dual_clip=3")
    m = _timeless(tr.iteration(1))
    ref = make(setup, tmp_path / "b")
    m_ref = _timeless(ref.iteration(1))
    assert m.pop("policy/dual_clip_frac") == 0.0 and m == m_ref
    assert torch.equal(flat(tr.policy), flat(ref.policy))


# ------------------------------------------------------------------------------------------------ KL as a loss


def test_kl_in_loss_takes_the_kl_out_of_the_token_rewards():
    over = ["ppo.kl.coef=0.5", "ppo.kl.estimator=k3", "ppo.reward_transform=none", "ppo.reward_clip=null"]
    cfg = load_config("ppo", preset="ppo_max", overrides=[*over, "ppo.kl.acts_in=loss"])
    exp = synthetic_experience([1.5, -0.5, 2.0])
    compute_advantages(exp, cfg.ppo, cfg.generation, RunningMoments(), kl_coef=cfg.ppo.kl.coef)
    in_reward = load_config("ppo", preset="ppo_max", overrides=over)
    exp_r = synthetic_experience([1.5, -0.5, 2.0])
    compute_advantages(
        exp_r, in_reward.ppo, in_reward.generation, RunningMoments(), kl_coef=in_reward.ppo.kl.coef
    )
    torch.testing.assert_close(exp.kl, exp_r.kl)  # still measured (monitoring, the adaptive coefficient)
    assert exp.kl[exp.response_mask].abs().sum() > 0
    for i in range(exp.batch_size):
        n = int(exp.response_lens[i])
        expect = torch.zeros(n)
        expect[-1] = exp.scores[i]
        assert torch.equal(exp.rewards[i, :n], expect)
        assert not torch.equal(exp_r.rewards[i, :n], expect)


def test_kl_clamp_bounds_the_penalty_and_the_logged_estimate_stays_unclamped():
    """``ppo.kl.clamp``: the k3 penalty of a token at log-ratio 5 (142.4) is bounded to the clamp, while ``kl``
    (what the rollout spent, logged with its largest value) keeps the estimate; without it the penalty is the
    estimate."""
    over = ["ppo.kl.coef=0.5", "ppo.kl.estimator=k3", "ppo.reward_transform=none", "ppo.reward_clip=null"]
    for clamp in (None, 1.0):
        cfg = load_config(
            "ppo", preset="ppo_max", overrides=over + ([f"ppo.kl.clamp={clamp}"] if clamp else [])
        )
        exp = synthetic_experience([1.5, -0.5, 2.0])
        exp.ref_logprobs = exp.logprobs + 5.0
        compute_advantages(exp, cfg.ppo, cfg.generation, RunningMoments(), kl_coef=cfg.ppo.kl.coef)
        k3 = math.exp(5) - 1 - 5
        torch.testing.assert_close(exp.kl[exp.response_mask], torch.full_like(exp.kl[exp.response_mask], k3))
        first = exp.rewards[1, 0].item()  # not the last token: the penalty alone
        assert first == pytest.approx(-0.5 * (k3 if clamp is None else clamp), rel=1e-5)


def test_kl_in_loss_adds_the_kl_term_to_the_policy_loss(setup, tmp_path):
    """One fused update (the first forward is the old policy): the KL term is kl.coef x the token mean of k3
    between the update's log-probs and the scoring pass's reference log-probs, i.e. kl.coef x kl/per_token; and
    it changes the update (the reference differs from the policy)."""
    common = [reference(setup), "ppo.kl.estimator=k3"]
    tr = make(setup, tmp_path / "loss", *common, "ppo.kl.acts_in=loss", "ppo.kl.coef=0.5")
    m = tr.iteration(1)
    assert m["loss/kl"] == pytest.approx(0.5 * m["kl/per_token"], rel=1e-5) and m["kl/per_token"] > 1e-3
    off = make(setup, tmp_path / "off", *common, "ppo.kl.acts_in=loss", "ppo.kl.coef=0")
    m_off = off.iteration(1)
    assert "loss/kl" not in m_off and "loss/kl" not in make(setup, tmp_path / "r", *common).iteration(1)
    assert not torch.equal(flat(tr.policy), flat(off.policy))


def test_kl_in_loss_with_kl_coef_0_is_the_update_of_kl_in_reward_with_kl_coef_0(setup, tmp_path):
    common = [reference(setup), "ppo.kl.estimator=k3", "ppo.kl.coef=0"]
    runs = []
    for where in ("reward", "loss"):
        tr = make(setup, tmp_path / where, *common, f"ppo.kl.acts_in={where}", "ppo.minibatch_size=4")
        runs.append(([_timeless(tr.iteration(s)) for s in (1, 2)], flat(tr.policy), flat(tr.critic)))
    (m_r, p_r, c_r), (m_l, p_l, c_l) = runs
    assert m_r == m_l and torch.equal(p_r, p_l) and torch.equal(c_r, c_l)


def test_kl_in_loss_holds_the_policy_near_the_reference(setup, tmp_path):
    """Three epochs an iteration, the reward off (weight 0), a reference other than the policy: the updates move
    the policy (the critic's advantages are noise here) and the KL to the reference grows; with the KL loss it
    grows far less (observed: 0.017 -> 0.019 with kl.coef 2, -> 0.054 without)."""
    common = [
        reference(setup),
        "ppo.critic_init=sft",
        "ppo.kl.estimator=k3",
        "ppo.kl.acts_in=loss",
        "ppo.ppo_epochs=3",
        "ppo.advantage_norm=true",  # whitened noise advantages: updates of a known size, whatever the default
        "optim.policy_lr=0.01",
        reward_fn("ppo_helpers:target_tokens", weight=0.0),
    ]

    def kl_after(tag, coef):
        tr = PPOTrainer(config(setup, *common, f"ppo.kl.coef={coef}", out=str(tmp_path / tag), rm=False))
        first = tr.iteration(1)["kl/per_token"]
        return first, tr.iteration(2)["kl/per_token"]

    start, pulled = kl_after("on", 2.0)
    start_off, free = kl_after("off", 0.0)
    assert start == start_off and pulled < 0.5 * free


# ------------------------------------------------------------------------------------------------ adaptive KL


def test_adaptive_kl_coefficient_moves_towards_its_target_and_is_what_the_rewards_use(
    setup, tmp_path, monkeypatch
):
    """n = 8 responses an iteration, horizon 80: K = 0.1. The coefficient of iteration t + 1 is that of t times
    1 + K * clip(KL_t / target - 1, -0.2, 0.2), KL_t the logged kl/per_sequence; a target far below the KL raises
    it by 2% an iteration, one far above lowers it by 2%; critic pre-training leaves it alone. The token rewards
    use the logged value. (A reference other than the policy: the KL is far above 1e-6 from the start.)"""
    used = []
    real = ppo_advantages.token_level_rewards

    def spy(scores, kl, mask, kl_coef):
        used.append(kl_coef)
        return real(scores, kl, mask, kl_coef)

    monkeypatch.setattr(ppo_advantages, "token_level_rewards", spy)

    def coefs(tag, target, *over):
        used.clear()
        adaptive = [f"ppo.kl.target={target}", "ppo.kl.horizon=80", "ppo.kl.coef=0.1"]
        tr = make(setup, tmp_path / tag, reference(setup), *adaptive, *over)
        ms = [tr.iteration(s) for s in range(1, 4)]
        assert used == [m["ppo/kl_coef"] for m in ms]
        return [m["ppo/kl_coef"] for m in ms], [m["kl/per_sequence"] for m in ms], tr

    up, _, _ = coefs("up", 1e-6)
    assert up == pytest.approx([0.1, 0.1 * 1.02, 0.1 * 1.02**2], rel=1e-12)
    down, _, _ = coefs("down", 1e6)
    assert down == pytest.approx([0.1, 0.1 * 0.98, 0.1 * 0.98**2], rel=1e-12)
    mid, kls, tr = coefs("mid", 1.0)
    for t in range(2):
        error = min(max(kls[t] / 1.0 - 1, -0.2), 0.2)
        assert mid[t + 1] == pytest.approx(mid[t] * (1 + 0.1 * error), rel=1e-12)
    assert tr.kl_control.value == pytest.approx(mid[2] * (1 + 0.1 * min(max(kls[2] - 1, -0.2), 0.2)))
    pre, _, _ = coefs("pre", 1e-6, "ppo.critic_pretrain_steps=1")
    assert pre == pytest.approx([0.1, 0.1, 0.1 * 1.02], rel=1e-12)


def test_adaptive_kl_coefficient_in_the_kl_loss(setup, tmp_path, monkeypatch):
    used = []
    real = ppo_update.kl_loss

    def spy(logprobs, ref_logprobs, mask, kl_coef, *args, **kwargs):
        used.append(kl_coef)
        return real(logprobs, ref_logprobs, mask, kl_coef, *args, **kwargs)

    monkeypatch.setattr(ppo_update, "kl_loss", spy)
    over = ["ppo.kl.target=1e-6", "ppo.kl.horizon=80", "ppo.kl.acts_in=loss", "ppo.kl.estimator=k3"]
    tr = make(setup, tmp_path, reference(setup), *over, "ppo.minibatch_size=4")
    ms = [tr.iteration(s) for s in (1, 2)]
    assert used == pytest.approx([0.05, 0.05, 0.05 * 1.02, 0.05 * 1.02], rel=1e-12)  # two minibatches each
    assert [m["ppo/kl_coef"] for m in ms] == [used[0], used[2]]


def test_a_horizon_shorter_than_a_fifth_of_an_iteration_is_a_config_error(setup, tmp_path):
    with pytest.raises(
        ConfigError, match=r"^ppo\.kl\.horizon, ppo\.buffer_size: kl\.horizon \(1\) must exceed"
    ):
        make(setup, tmp_path, "ppo.kl.target=1", "ppo.kl.horizon=1")


def test_resume_with_the_adaptive_kl_coefficient_continues_exactly(setup, tmp_path):
    """5 steps in one go == 3 steps, SIGTERM, resume, 2 more, with every switch of this file on: the coefficient
    is checkpointed (ppomax_state.json) and continues as if uninterrupted."""

    def cfg(out, at):
        return config(
            setup,
            reward_fn("ppo_helpers:signal_on_call", counter=str(tmp_path / f"{out}.count"), at=at),
            "ppo.iterations=4",
            "ppo.critic_pretrain_steps=1",
            "ppo.minibatch_size=4",
            "ppo.kl.target=0.5",
            "ppo.kl.horizon=80",
            "ppo.kl.acts_in=loss",
            "ppo.kl.estimator=k3",
            "ppo.dual_clip=3",
            out=str(tmp_path / out),
        )

    straight = train_ppo(cfg("a", at=10**6))
    stopped = PPOTrainer(cfg("b", at=5))  # two reward calls per iteration: call 5 is in step 3
    with pytest.raises(RunStopped, match="stopped at step 3"):
        stopped.train()
    state = (tmp_path / "b" / "checkpoints" / "step-3" / "ppomax_state.json").read_text()
    assert '"kl_control"' in state
    resumed = train_ppo(cfg("b", at=5), resume=True)
    assert [r["step"] for r in read_metrics(resumed / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    coefs = [r["ppo/kl_coef"] for r in read_metrics(straight / "metrics.jsonl")]
    assert coefs[0] == coefs[1] == 0.05 and len(set(coefs[1:])) == 4  # it moved every policy iteration
    assert_same_run(straight, resumed)


# ------------------------------------------------------------------------------- precision of the reference


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param([], id="full"),
        # LoRA with a reference of its own (a copy of the policy elsewhere): loaded, not the policy's base
        pytest.param(["model.lora={r: 4}", "COPY"], id="lora-own-reference"),
    ],
)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "scored"])
def test_identical_policy_and_reference_give_a_kl_of_exactly_0_in_bfloat16(setup, tmp_path, extra, fused):
    """With model.dtype bfloat16 the policy runs under autocast; the reference, a copy of the same weights, must
    run the same precision path (its weights in the dtype the policy reads its own in, under the same autocast):
    the first iteration's log-probs are then bit-identical and the KL is exactly 0, not rounding noise."""
    import shutil

    over = ["model.dtype=bfloat16", "generation.max_new_tokens=4"]
    if "COPY" in extra:
        copy = tmp_path / "reference-copy"
        shutil.copytree(setup.policy, copy)
        over += [f"model.reference={copy}", *(e for e in extra if e != "COPY")]
    if not fused:
        over.append("ppo.minibatch_size=4")
    tr = make(setup, tmp_path / "run", *over)
    assert tr.scoring.name == ("fused" if fused else "separate")
    m = tr.iteration(1)
    assert m["kl/per_token"] == 0.0 and m["kl/per_sequence"] == 0.0
