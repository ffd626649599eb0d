"""The PPO trainer's parts, one switch of the paper's fig. 5 at a time, each against an independent computation or
an observable change of behaviour. Tiny models (see ppo_helpers); one iteration takes tens of milliseconds."""

from __future__ import annotations

import dataclasses
import math
import threading

import pytest
import torch
import torch.nn.functional as F

from ppo_helpers import config, make_setup, reward_fn
from ppomax.algos import RunningMoments
from ppomax.config import load_config
from ppomax.ppo import PPOTrainer
from ppomax.ppo import advantages as ppo_advantages
from ppomax.ppo import scoring as ppo_scoring
from ppomax.ppo import update as ppo_update
from ppomax.ppo.advantages import compute_advantages
from ppomax.ppo.experience import Experience

TARGET = reward_fn("ppo_helpers:target_tokens")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup(tmp_path_factory.mktemp("ppo"), reference_seed=5)


def make(setup, tmp_path, *overrides, preset="ppo_max", rm=True) -> PPOTrainer:
    return PPOTrainer(config(setup, TARGET, *overrides, preset=preset, rm=rm, out=str(tmp_path / "run")))


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


# ------------------------------------------------------------------------------------------ scoring pass


@torch.no_grad()
@pytest.mark.parametrize("mode", ["sampling", "raw"])
def test_scoring_pass_matches_unpadded_forward_passes(setup, tmp_path, mode):
    """Old log-probs (from temperature-scaled or raw logits: generation.logprobs_from), reference log-probs,
    entropy and critic values of every padded row equal those of the row run alone: the logit at t-1 scores
    token t, and the value of response token j is read before it is emitted."""
    tr = make(
        setup,
        tmp_path,
        f"generation.logprobs_from={mode}",
        f"model.reference={setup.root / 'reference'}",
        "generation.temperature=0.7",
    )
    exp = tr.generate([0, 1, 2, 3], tr.data.prompts)
    tr.rollouts.score(exp)
    temp = 0.7 if mode == "sampling" else 1.0
    policy, ref, critic = tr.unwrapped(tr.policy), tr.models.reference, tr.unwrapped(tr.critic)
    for i in range(exp.batch_size):
        ids = exp.sequences[i][exp.attention_mask[i].bool()].unsqueeze(0)
        p, r = int(exp.prompt_lens[i]), int(exp.response_lens[i])
        tokens = ids[0, p:]
        for model, lp, raw in (
            (policy, exp.logprobs, exp.raw_logprobs),
            (ref, exp.ref_logprobs, exp.ref_raw_logprobs),
        ):
            logits = model(ids).logits[0, p - 1 : -1]
            expect = F.log_softmax(logits / temp, -1).gather(1, tokens[:, None])[:, 0]
            torch.testing.assert_close(lp[i, :r], expect, atol=1e-5, rtol=1e-5)
            expect_raw = F.log_softmax(logits, -1).gather(1, tokens[:, None])[:, 0]
            torch.testing.assert_close(raw[i, :r], expect_raw, atol=1e-5, rtol=1e-5)
            if model is policy:
                probs = F.softmax(logits / temp, -1)
                torch.testing.assert_close(
                    exp.entropy[i, :r], -(probs * probs.log()).sum(-1), atol=1e-4, rtol=1e-4
                )
        values = critic(ids, torch.ones_like(ids)).values[0, p - 1 : -1]
        torch.testing.assert_close(exp.values[i, :r], values, atol=1e-5, rtol=1e-5)
    assert (exp.logprobs != exp.raw_logprobs).any() == (mode == "sampling")
    assert not torch.allclose(exp.logprobs, exp.ref_logprobs)  # the reference is another model here


def test_reward_sources_are_weighted_in_the_trainer(setup, tmp_path):
    tr = make(setup, tmp_path, "reward.model_weight=0.5")
    exp = tr.generate([0, 1, 2, 3], tr.data.prompts)
    tr.rollouts.score(exp)
    parts = exp.score_parts
    assert set(parts) == {"rm", "target_tokens"}
    torch.testing.assert_close(exp.scores, 0.5 * parts["rm"] + parts["target_tokens"])


# ------------------------------------------------------------------------------------------ advantages


def _synthetic(scores, truncated=None, seed=0) -> Experience:
    g = torch.Generator().manual_seed(seed)
    b, r = len(scores), 5
    rmask = torch.ones(b, r, dtype=torch.bool)
    rmask[0, 3:] = False  # a short response
    seq = torch.randint(3, 50, (b, 2 + r), generator=g)
    att = torch.cat([torch.ones(b, 2, dtype=torch.long), rmask.long()], 1)
    return Experience(
        seq,
        att,
        rmask,
        2,
        torch.full((b,), 2),
        rmask.sum(1),
        torch.tensor(truncated or [False] * b),
        logprobs=-torch.rand(b, r, generator=g) * 3,
        ref_logprobs=-torch.rand(b, r, generator=g) * 3,
        values=torch.randn(b, r, generator=g),
        scores=torch.tensor(scores, dtype=torch.float32),
    )


def _settings(*overrides):
    cfg = load_config("ppo", preset="ppo_max", overrides=list(overrides))
    return cfg.ppo, cfg.generation


def _gae_loop(rewards, values, n, gamma, lam):
    adv = [0.0] * n
    nxt_v, nxt_a = 0.0, 0.0
    for t in reversed(range(n)):
        delta = rewards[t] + gamma * nxt_v - values[t]
        nxt_a = delta + gamma * lam * nxt_a
        adv[t], nxt_v = nxt_a, values[t]
    return adv


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize(("kl_coef", "gamma", "lam"), [(0.0, 1.0, 0.95), (0.2, 0.9, 0.0), (0.05, 1.0, 1.0)])
def test_token_rewards_kl_and_gae_follow_the_switches(kl_coef, gamma, lam, estimator):
    ppo, gen = _settings(
        f"ppo.kl.coef={kl_coef}",
        f"ppo.gamma={gamma}",
        f"ppo.lam={lam}",
        f"ppo.kl.estimator={estimator}",
        "ppo.reward_transform=none",
        "ppo.reward_clip=null",
    )
    exp = _synthetic([1.5, -0.5, 2.0])
    compute_advantages(exp, ppo, gen, RunningMoments(), kl_coef=ppo.kl.coef)
    for i in range(exp.batch_size):
        n = int(exp.response_lens[i])
        log_r = exp.ref_logprobs[i, :n] - exp.logprobs[i, :n]
        kl = {"k1": -log_r, "k2": 0.5 * log_r**2, "k3": log_r.exp() - 1 - log_r}[estimator]
        torch.testing.assert_close(exp.kl[i, :n], kl)
        expect = -kl_coef * kl
        expect[-1] += exp.scores[i]  # the raw score: no re-parameterisation switched on
        torch.testing.assert_close(exp.rewards[i, :n], expect)
        if kl_coef == 0:
            assert (exp.rewards[i, : n - 1] == 0).all()
        adv = _gae_loop(exp.rewards[i, :n].tolist(), exp.values[i, :n].tolist(), n, gamma, lam)
        torch.testing.assert_close(exp.advantages[i, :n], torch.tensor(adv), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            exp.returns[i, :n], torch.tensor(adv) + exp.values[i, :n], atol=1e-5, rtol=1e-5
        )
        assert (exp.advantages[i, n:] == 0).all()


@pytest.mark.parametrize("switch", ["norm_clip", "norm", "scaling", "scaling_clip", "raw", "penalty"])
def test_score_reparameterisation_switches(switch):
    """reward_transform normalize/scale, reward_clip (eq. 18), truncated_response: penalty; the running statistics
    cover every raw score seen so far (two batches here), computed independently with torch.mean/std."""
    over = {
        "norm_clip": ["ppo.reward_transform=normalize", "ppo.reward_clip=0.8"],
        "norm": ["ppo.reward_transform=normalize", "ppo.reward_clip=null"],
        "scaling": ["ppo.reward_transform=scale", "ppo.reward_clip=null"],
        "scaling_clip": ["ppo.reward_transform=scale", "ppo.reward_clip=1.0"],
        "raw": ["ppo.reward_transform=none", "ppo.reward_clip=null"],
        "penalty": [
            "ppo.reward_transform=normalize",
            "ppo.reward_clip=null",
            "generation.truncated_response=penalty",
            "generation.truncated_penalty=-3.0",
        ],
    }[switch]
    ppo, gen = _settings("ppo.kl.coef=0", *over)
    moments = RunningMoments()
    first = _synthetic([1.0, 4.0, -2.0])
    compute_advantages(first, ppo, gen, moments, kl_coef=ppo.kl.coef)
    second = _synthetic([3.0, 0.5, 7.0], truncated=[False, False, True], seed=1)
    compute_advantages(second, ppo, gen, moments, kl_coef=ppo.kl.coef)
    seen = torch.tensor([1.0, 4.0, -2.0, 3.0, 0.5] + ([] if switch == "penalty" else [7.0]))
    mean, std = seen.mean(), seen.std()
    raw = second.scores
    expect = {
        "norm_clip": ((raw - mean) / std).clamp(-0.8, 0.8),
        "norm": (raw - mean) / std,
        "scaling": raw / std,
        "scaling_clip": (raw / std).clamp(-1.0, 1.0),
        "raw": raw,
        "penalty": torch.tensor([(3.0 - mean) / std, (0.5 - mean) / std, -3.0]),
    }[switch]
    torch.testing.assert_close(second.final_scores, expect.float(), atol=1e-5, rtol=1e-5)
    last = second.response_lens - 1
    torch.testing.assert_close(second.rewards[torch.arange(3), last], expect.float(), atol=1e-5, rtol=1e-5)


def test_nonfinite_scores_never_enter_the_running_moments():
    ppo, gen = _settings()
    moments = RunningMoments()
    compute_advantages(_synthetic([1.0, float("nan"), 3.0]), ppo, gen, moments, kl_coef=ppo.kl.coef)
    assert moments.count == 2 and moments.mean == 2.0


def test_samples_with_nonfinite_scores_are_left_out_as_if_absent():
    """NaN, +inf and -inf scores alike: the row leaves the moments, the token rewards, the advantages and the
    losses (its response mask is zeroed), and the other rows get exactly what they get without it. +inf used to
    be clamped to reward_clip and trained on as the best possible reward."""
    nan, inf = float("nan"), float("inf")
    ppo, gen = _settings()
    full = _synthetic([1.0, nan, inf, -inf, 3.0, 0.5])
    keep = [0, 4, 5]
    alone = full.select(keep)
    m_full, m_alone = RunningMoments(), RunningMoments()
    compute_advantages(full, ppo, gen, m_full, kl_coef=ppo.kl.coef)
    compute_advantages(alone, ppo, gen, m_alone, kl_coef=ppo.kl.coef)
    assert (m_full.count, m_full.mean, m_full.std) == (m_alone.count, m_alone.mean, m_alone.std)
    bad = torch.tensor([1, 2, 3])
    for name in ("rewards", "advantages", "returns"):
        assert torch.equal(getattr(full, name)[bad], torch.zeros_like(getattr(full, name)[bad])), name
    for name in ("rewards", "advantages", "returns", "kl"):
        torch.testing.assert_close(getattr(full, name)[keep], getattr(alone, name), atol=0, rtol=0)
    assert torch.isnan(full.final_scores[bad]).all()  # no score was added to them
    torch.testing.assert_close(full.final_scores[keep], alone.final_scores, atol=0, rtol=0)
    trained = ppo_advantages.trainable_part(full)  # what the updates see: no token of theirs
    assert not trained.response_mask[bad].any() and torch.equal(
        trained.response_mask[keep], alone.response_mask
    )


def test_a_truncated_response_under_penalty_keeps_its_row_whatever_its_score():
    ppo, gen = _settings("generation.truncated_response=penalty", "generation.truncated_penalty=-2")
    exp = _synthetic([1.0, float("nan"), float("inf")], truncated=[False, True, False])
    compute_advantages(exp, ppo, gen, RunningMoments(), kl_coef=ppo.kl.coef)
    assert exp.final_scores[1] == -2.0 and torch.isnan(exp.final_scores[2])
    mask = ppo_advantages.trainable_part(exp).response_mask
    assert mask[1].any() and not mask[2].any()


# ------------------------------------------------------------------------------------------ updates


def test_importance_sampling_off_uses_the_reference_as_old_policy(setup, tmp_path):
    """With a reference different from the policy: the first minibatch's ratio is exactly 1 against the sampling
    policy (importance_sampling: true), and pi/pi_ref (not 1) when the reference is the old policy. The ratio
    metrics then say so in their names (``*_vs_ref``): a dashboard must not show a KL to the reference under
    the name of the KL to the sampling policy."""
    common = [f"model.reference={setup.root / 'reference'}", "ppo.minibatch_size=8", "ppo.buffer_size=8"]
    on = make(setup, tmp_path / "on", *common).iteration(1)
    off = make(setup, tmp_path / "off", *common, "ppo.importance_sampling=false").iteration(1)
    assert on["policy/ratio_mean"] == pytest.approx(1.0, abs=1e-6) and on["policy/approx_kl"] < 1e-9
    assert abs(off["policy/ratio_vs_ref_mean"] - 1.0) > 1e-3 and off["policy/approx_kl_vs_ref"] > 1e-3
    plain = [
        "policy/approx_kl",
        "policy/pg_clipfrac",
        "policy/ratio_mean",
        "policy/ratio_min",
        "policy/ratio_max",
        "policy/ratio_clamped_count",
    ]
    vs_ref = [
        "policy/approx_kl_vs_ref",
        "policy/pg_clipfrac_vs_ref",
        "policy/ratio_vs_ref_mean",
        "policy/ratio_vs_ref_min",
        "policy/ratio_vs_ref_max",
        "policy/ratio_vs_ref_clamped_count",
    ]
    assert set(plain) <= set(on) and not set(vs_ref) & set(on)
    assert set(vs_ref) <= set(off) and not set(plain) & set(off)


@torch.no_grad()
@pytest.mark.parametrize("init", ["reward_model", "sft", "random", "explicit"])
def test_critic_initialisation(setup, tmp_path, init):
    from ppomax.models import ValueHeadModel, load_causal_lm

    over = [f"ppo.critic_init={init if init != 'explicit' else 'sft'}"]
    if init == "explicit":
        over.append(f"model.critic={setup.reward}")
    tr = make(setup, tmp_path, *over)
    critic = tr.unwrapped(tr.critic)
    rm = ValueHeadModel.from_pretrained(setup.reward)
    sft = load_causal_lm(setup.policy)
    same_backbone = torch.equal(flat(critic.backbone.model), flat(sft.model))
    same_as_rm = torch.equal(flat(critic), flat(rm))
    if init in ("reward_model", "explicit"):
        assert same_as_rm
        assert (
            critic is not tr.models.reward_model
        )  # a copy: training the critic never moves the reward model
    elif init == "sft":
        assert same_backbone and not torch.equal(critic.value_head.weight, rm.value_head.weight)
    else:
        assert not same_backbone and not same_as_rm
        assert critic.backbone.config.num_hidden_layers == sft.config.num_hidden_layers


def test_critic_pretraining_trains_only_the_critic_first(setup, tmp_path):
    tr = make(setup, tmp_path, "ppo.critic_pretrain_steps=2", "ppo.iterations=1")
    policy0, critic0 = flat(tr.policy), flat(tr.critic)
    m1 = tr.iteration(1)
    m2 = tr.iteration(2)
    policy2, critic2 = flat(tr.policy), flat(tr.critic)
    assert torch.equal(policy0, policy2) and not torch.equal(critic0, critic2)
    assert m1["train/critic_only"] == m2["train/critic_only"] == 1 and "loss/pg" not in m2
    m3 = tr.iteration(3)
    assert m3["train/critic_only"] == 0 and "loss/pg" in m3
    assert not torch.equal(policy2, flat(tr.policy))
    assert tr.total_steps == 3


class _Spy:
    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.fn(*args, **kwargs)


@pytest.mark.parametrize(("norm", "clip"), [(True, None), (True, 0.5), (False, None), (False, 0.05)])
def test_advantage_normalisation_and_clipping_per_minibatch(setup, tmp_path, monkeypatch, norm, clip):
    spy = _Spy(ppo_update.policy_loss)
    monkeypatch.setattr(ppo_update, "policy_loss", spy)
    tr = make(
        setup,
        tmp_path,
        f"ppo.advantage_norm={str(norm).lower()}",
        f"ppo.advantage_clip={clip or 'null'}",
        "ppo.minibatch_size=4",
    )
    captured = {}
    orig = tr.updater.update

    def grab(exp, step, critic_only, **kw):
        captured["exp"] = exp
        return orig(exp, step, critic_only, **kw)

    tr.updater.update = grab
    tr.iteration(1)
    assert len(spy.calls) == 2  # two minibatches of 4
    raw_values = set(captured["exp"].advantages[captured["exp"].response_mask].tolist())
    for args, _ in spy.calls:
        adv, mask = args[2], args[3]
        a = adv[mask]
        if norm and clip is None:
            assert a.mean().abs() < 1e-5 and (a.var() - 1).abs() < 1e-4
        if clip is not None:
            assert a.abs().max() <= clip + 1e-6
        if not norm and clip is None:
            assert set(a.tolist()) <= raw_values  # the GAE advantages themselves
        assert (adv[~mask] == 0).all()


def _two_epochs(setup, tmp_path, *over):
    return make(
        setup, tmp_path, "ppo.ppo_epochs=3", "optim.policy_lr=0.05", "optim.critic_lr=0.05", *over
    ).iteration(1)


def test_value_clip_switch(setup, tmp_path):
    clipped = _two_epochs(setup, tmp_path / "a", "ppo.value_clip=0.001")
    free = _two_epochs(setup, tmp_path / "b", "ppo.value_clip=null")
    assert clipped["critic/vf_clipfrac"] > 0.05 and free["critic/vf_clipfrac"] == 0.0


def test_clip_ratio_switch(setup, tmp_path):
    clipped = _two_epochs(setup, tmp_path / "a", "ppo.clip_ratio=0.001")
    free = _two_epochs(setup, tmp_path / "b", "ppo.clip_ratio=null")
    assert clipped["policy/pg_clipfrac"] > 0.05 and free["policy/pg_clipfrac"] == 0.0
    assert free["policy/approx_kl"] > 0  # the policy did move in the later epochs


def test_a_huge_log_ratio_is_clamped_and_counted_not_a_skipped_update(setup, tmp_path):
    """Old log-probs 100 nats below the new ones overflow exp(log-ratio) in float32: the update must still be
    finite (not skipped) and log how many tokens had their log-ratio clamped, summed over the iteration. (Two
    minibatches: with one, the update computes the old log-probs itself, see test_ppo_skipped_work.)"""
    tr = make(setup, tmp_path, "ppo.minibatch_size=4")
    inner, seen = tr.updater.update, []

    def update(exp, step, critic_only, **kw):
        seen.append(float(exp.response_mask.sum()))
        return inner(dataclasses.replace(exp, logprobs=exp.logprobs - 100.0), step, critic_only, **kw)

    tr.updater.update = update
    m = tr.iteration(1)
    assert m["nonfinite/skipped"] == 0
    assert math.isfinite(m["loss/pg"]) and math.isfinite(m["policy/approx_kl"])
    assert m["policy/ratio_clamped_count"] == seen[0] > 0  # every response token, one epoch
    assert (
        make(setup, tmp_path / "plain", "ppo.minibatch_size=4").iteration(1)["policy/ratio_clamped_count"]
        == 0
    )


def test_entropy_bonus_and_its_clip(setup, tmp_path):
    """The bonus changes the update; a clip below the policy's entropy (~5.7 nats here) stops its gradient on
    every token, so the update is exactly the one without bonus (paper app. B.3)."""

    def policy_after(tag, *over):
        tr = make(setup, tmp_path / tag, *over)
        m = tr.iteration(1)
        return flat(tr.policy), m

    base, m0 = policy_after("base", "ppo.entropy_coef=0")
    bonus, m1 = policy_after("bonus", "ppo.entropy_coef=0.5")
    clipped, m2 = policy_after("clipped", "ppo.entropy_coef=0.5", "ppo.entropy_clip=1.0")
    assert not torch.equal(base, bonus) and torch.equal(base, clipped)
    assert "loss/entropy" not in m0 and m1["loss/entropy"] < 0 and m2["policy/entropy_clipfrac"] == 1.0


def test_ptx_loss_mixes_sft_batches_into_the_policy_update(setup, tmp_path, monkeypatch):
    spy = _Spy(ppo_update.lm_nll)
    monkeypatch.setattr(ppo_update, "lm_nll", spy)
    tr0 = make(setup, tmp_path / "off", "ppo.ptx_coef=0")
    m0 = tr0.iteration(1)
    tr = make(setup, tmp_path / "on", "ppo.ptx_coef=0.5", f"data.ptx={setup.ptx}", "ppo.ptx_batch_size=3")
    before = flat(tr.policy)
    batch = tr.data.ptx.batch(list(tr.data.ptx_stream._order[:3]), tr.data.pad_id, tr.acc.device)
    with torch.no_grad():  # independent NLL of the first PTX batch under the initial policy
        logits = tr.unwrapped(tr.policy)(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
        expect = F.cross_entropy(
            logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100
        )
    m1 = tr.iteration(1)
    assert "loss/ptx" not in m0 and len(spy.calls) == 1
    assert m1["loss/ptx"] == pytest.approx(float(expect), rel=1e-5)
    assert tr.data.ptx_stream.pos == 3
    assert not torch.equal(before, flat(tr.policy))
    # the same rollouts with and without the LM term give different policies
    assert not torch.equal(flat(tr0.policy), flat(tr.policy))


@pytest.mark.parametrize("max_norm", [1e-3, None])
def test_global_gradient_clipping(setup, tmp_path, max_norm):
    tr = make(setup, tmp_path, f"ppo.max_grad_norm={max_norm or 'null'}")
    seen = []
    for opt in (tr.updater.policy.optimizer, tr.updater.critic.optimizer):
        inner = opt.step

        def step(*a, _inner=inner, _opt=opt, **k):
            grads = [p.grad for g in _opt.param_groups for p in g["params"] if p.grad is not None]
            seen.append(
                float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
            )
            return _inner(*a, **k)

        opt.step = step
    m = tr.iteration(1)
    policy_norm, critic_norm = seen
    if max_norm:
        assert policy_norm <= max_norm * 1.001 and critic_norm <= max_norm * 1.001
        assert m["grad_norm/policy"] > 10 * max_norm  # the logged norm is the one before clipping
    else:
        assert policy_norm == pytest.approx(m["grad_norm/policy"], rel=1e-4) and policy_norm > 1e-2


@torch.no_grad()
def test_scoring_in_micro_batches_gives_the_same_experience(setup, tmp_path):
    tr = make(setup, tmp_path, "ppo.micro_batch_size=3")
    exp = tr.generate([0, 1, 2, 3, 4, 5, 6, 7], tr.data.prompts)
    tr.rollouts.score(exp)
    whole = dataclasses.replace(exp, logprobs=None, ref_logprobs=None, values=None, scores=None)
    ppo_scoring.score_experience(
        whole,
        policy=tr.unwrapped(tr.policy),
        reference=tr.models.reference,
        critic=tr.unwrapped(tr.critic),
        fwd=tr.rollouts.fwd,
        rewards=tr.rollouts.rewards,
        eos_ids=tr.rollouts.eos_ids,
    )
    for name in ("logprobs", "ref_logprobs", "raw_logprobs", "entropy", "values", "scores"):
        torch.testing.assert_close(getattr(exp, name), getattr(whole, name), atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_the_same_update(setup, tmp_path):
    """Checkpointing needs train mode; dropout is off, so the first ratio is still exactly 1 and the update the
    same as without checkpointing."""
    plain = make(setup, tmp_path / "a")
    m0 = plain.iteration(1)  # (the global RNG is seeded when a trainer is built: build, then run)
    ckpt = make(setup, tmp_path / "b", "model.gradient_checkpointing=true")
    m1 = ckpt.iteration(1)
    assert ckpt.unwrapped(ckpt.policy).training and m1["policy/ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    assert m1["loss/vf"] == pytest.approx(m0["loss/vf"], rel=1e-5)
    torch.testing.assert_close(flat(plain.policy), flat(ckpt.policy), atol=1e-6, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")  # the optimisers' step is stubbed
@pytest.mark.parametrize(
    ("micro", "aggregation"),
    [(3, "token_mean"), (1, "token_mean"), (3, "seq_mean_token_mean"), (1, "seq_mean_token_sum_norm")],
)
def test_micro_batches_give_the_whole_minibatch_gradient(setup, tmp_path, micro, aggregation):
    """ppo.micro_batch_size only bounds memory: 4 rows with different response lengths split 3 + 1 (or 1 + 1 + 1
    + 1), with the entropy bonus and PPO-ptx (3 LM rows of different lengths, split 1 + 2), give the gradients of
    the whole minibatch within 1e-6 (policy and critic), and the same metrics, whatever ppo.loss_aggregation
    (a mean over responses weighs each chunk by its responses, not its tokens)."""
    tr = make(
        setup,
        tmp_path,
        f"ppo.loss_aggregation={aggregation}",
        "ppo.buffer_size=4",
        "ppo.rollout_batch_size=4",
        "ppo.minibatch_size=4",
        "ppo.entropy_coef=0.01",
        "ppo.entropy_clip=null",
        "ppo.max_grad_norm=null",
        "ppo.ptx_coef=0.5",
        f"data.ptx={setup.ptx}",
        "ppo.ptx_batch_size=3",
    )
    exp = tr.generate([0, 1, 2, 3], tr.data.prompts)
    tr.rollouts.score(exp)
    compute_advantages(exp, tr.cfg.ppo, tr.cfg.generation, tr.moments, kl_coef=tr.cfg.ppo.kl.coef)
    keep = torch.arange(exp.response_mask.shape[1]) < torch.tensor([[8], [2], [5], [1]])
    exp = dataclasses.replace(exp, response_mask=exp.response_mask & keep)  # ragged response lengths
    ptx = tr.data.ptx.batch([0, 1, 2], tr.data.pad_id, tr.acc.device)
    assert len(set((ptx["labels"][:, 1:] != -100).sum(1).tolist())) == 3
    tr.updater.ptx_batch = lambda k: ptx
    grads = []
    for opt in (tr.updater.policy.optimizer, tr.updater.critic.optimizer):
        opt.step = lambda *a, _opt=opt, **k: grads.append(
            [p.grad.clone() for g in _opt.param_groups for p in g["params"] if p.grad is not None]
        )
    runs = {}
    for size in (None, micro):
        tr.updater.ppo = tr.cfg.ppo.model_copy(update={"micro_batch_size": size})
        runs[size], ok = tr.updater._minibatch(exp, critic_only=False, kl_coef=tr.cfg.ppo.kl.coef)
        assert ok
    (p_whole, c_whole, p_micro, c_micro) = grads
    for a, b in zip(p_whole + c_whole, p_micro + c_micro, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert set(runs[None]) == set(runs[micro])
    for k, v in runs[None].items():
        assert float(runs[micro][k]) == pytest.approx(float(v), rel=1e-5, abs=1e-7), k


def test_minibatches_micro_batches_and_epochs(setup, tmp_path):
    """buffer 8 / minibatch 4 / 2 epochs = 4 optimiser steps; micro-batches of 3 rows change nothing else."""
    tr = make(setup, tmp_path, "ppo.minibatch_size=4", "ppo.ppo_epochs=2", "ppo.micro_batch_size=3")
    m = tr.iteration(1)
    assert tr.updater.policy.schedule.last_epoch == 4 and tr.updater.critic.schedule.last_epoch == 4
    assert math.isfinite(m["loss/total"]) and m["nonfinite/skipped"] == 0


# ------------------------------------------------------------------------------------------ metric reduction


def test_metrics_reduce_across_ranks_by_kind():
    """Two ranks (threads, with a reduce that really combines both ranks' tensors): ``*_max`` metrics are the
    max over ranks (a rank's outlier ratio must not be averaged away), ``*_min`` the min (through the max: the
    reduce, like accelerate's, has no min), ``*_count`` and the named sums are summed, the rest averaged; the
    trainer's reduction is this function."""
    from ppomax.ppo import metrics as ppo_metrics
    from ppomax.trainers.reduce import reduce_metrics

    ranks = [
        {
            "policy/ratio_max": 1.5,
            "policy/ratio_min": 0.5,
            "loss/pg": 1.0,
            "policy/ratio_clamped_count": 2.0,
            "response/truncated": 3.0,
        },
        {
            "policy/ratio_max": 9.0,
            "policy/ratio_min": 0.75,
            "loss/pg": 3.0,
            "policy/ratio_clamped_count": 0.0,
            "response/truncated": 1.0,
        },
    ]
    barrier, slots, results = threading.Barrier(2), [None, None], [None, None]

    def worker(rank):
        def reduce(t, op):
            slots[rank] = t.clone()
            barrier.wait()
            both = torch.stack([slots[0], slots[1]])
            barrier.wait()
            return {"mean": both.mean(0), "sum": both.sum(0), "max": both.amax(0)}[op]

        metrics = {k: torch.tensor(v) for k, v in ranks[rank].items()}
        results[rank] = reduce_metrics(metrics, reduce, sums=("response/truncated",))

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    expect = {
        "policy/ratio_max": 9.0,
        "policy/ratio_min": 0.5,
        "loss/pg": 2.0,
        "policy/ratio_clamped_count": 2.0,
        "response/truncated": 4.0,
    }
    assert results[0] == results[1] == expect
    assert list(results[0]) == list(ranks[0])  # the caller's order
    assert reduce_metrics({"a_max": torch.tensor(2.0), "b": 1}, None) == {"a_max": 2.0, "b": 1.0}
    assert ppo_metrics.reduce_metrics is reduce_metrics


def test_min_and_max_metrics_fold_by_min_and_max_over_micro_batches_and_minibatches():
    """A micro-batch's smallest ratio must survive the minibatch's fold (a mean would lift it), and the
    iteration's min is the min over its minibatches and epochs."""
    from ppomax.ppo.update import _accumulate, _combine

    into: dict[str, torch.Tensor] = {}
    for lo, hi, pg in ((0.9, 1.1, 1.0), (0.7, 1.3, 3.0)):
        folded = {"policy/ratio_min": lo, "policy/ratio_max": hi, "loss/pg": pg}
        _accumulate(into, {k: torch.tensor(v) for k, v in folded.items()}, 0.5)
    assert {k: v.item() for k, v in into.items()} == pytest.approx(
        {"policy/ratio_min": 0.7, "policy/ratio_max": 1.3, "loss/pg": 2.0}
    )
    seen = [torch.tensor(0.8), torch.tensor(0.6), torch.tensor(0.9)]
    assert _combine("policy/ratio_min", seen).item() == pytest.approx(0.6)
    assert _combine("policy/ratio_max", seen).item() == pytest.approx(0.9)


def test_the_trainer_is_a_few_explicit_collaborators(setup, tmp_path):
    """No object with more than about 12 attributes; evaluation gets what it uses, not the trainer."""
    import inspect

    from ppomax.ppo import evaluation

    tr = make(setup, tmp_path)
    for obj in (tr, tr.run, tr.data, tr.models, tr.rollouts, tr.updater, tr.collapse):
        assert len(vars(obj)) <= 12, (type(obj).__name__, sorted(vars(obj)))
    params = inspect.signature(evaluation.evaluate).parameters
    assert "trainer" not in params and {"rollouts", "prompts"} <= set(params)
