"""Reward sources: programmatic `module:function` rewards (interface, weights, errors) and the value-head RM score
of a rollout's (left- and right-padded) sequences against scoring each text alone."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError

from ppo_helpers import make_setup
from ppomax.config import RewardConfig
from ppomax.errors import ConfigError
from ppomax.models import ValueHeadModel, load_tokenizer
from ppomax.ppo.experience import Experience
from ppomax.ppo.reward_sources import RewardError, RewardFunction, RewardSources, build_reward_functions

EOS = 2


def _exp() -> Experience:
    # two rows: prompt [5, 6] + response [7, 8, EOS]; prompt [9] + response [10, 11, 12, 13] (no EOS: truncated)
    seq = torch.tensor([[5, 6, 7, 8, EOS, 0], [0, 9, 10, 11, 12, 13]])
    att = torch.tensor([[1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]])
    rmask = att[:, 2:].bool()
    return Experience(
        seq,
        att,
        rmask,
        2,
        torch.tensor([2, 1]),
        torch.tensor([3, 4]),
        torch.tensor([False, True]),
        prompts=["p0", "p1"],
        responses=["r0", "r1"],
        meta=[{"id": 0}, {"id": 1}],
    )


def plain(prompts, responses):
    return [float(len(r)) for r in responses]


def constant(prompts, responses, *, prompt_ids, response_ids, value=1.0):
    return torch.full((len(prompts),), value)


def wrong_length(prompts, responses, **_):
    return [1.0]


def test_functions_get_texts_ids_meta_and_kwargs(tmp_path):
    path = tmp_path / "seen.json"
    cfg = RewardConfig(functions=[{"function": "ppo_helpers:echo_inputs", "kwargs": {"path": str(path)}}])
    sources = RewardSources(None, 1.0, build_reward_functions(cfg))
    total, parts = sources(_exp(), [EOS])
    seen = json.loads(path.read_text())
    assert seen["prompts"] == ["p0", "p1"] and seen["responses"] == ["r0", "r1"]
    assert seen["prompt_ids"] == [[5, 6], [9]]  # no padding
    assert seen["response_ids"] == [[7, 8], [10, 11, 12, 13]]  # no padding, the final EOS dropped
    assert seen["meta"] == [{"id": 0}, {"id": 1}]
    assert total.tolist() == [1.0, 1.0] and list(parts) == ["echo_inputs"]


def test_several_functions_are_summed_with_weights():
    fns = [
        RewardFunction("plain", plain, weight=0.5),
        RewardFunction("constant", constant, weight=-2.0, kwargs={"value": 3.0}),
    ]
    exp = _exp()
    exp.responses = ["abcd", "xy"]
    total, parts = RewardSources(None, 1.0, fns)(exp, [EOS])
    assert parts["plain"].tolist() == [4.0, 2.0]  # a plain f(prompts, responses) works: no ids passed
    assert parts["constant"].tolist() == [3.0, 3.0]
    assert total.tolist() == [0.5 * 4 - 2 * 3, 0.5 * 2 - 2 * 3]


def test_functions_are_named_by_their_config_not_their_position():
    """Metrics were reward/fn<i>_<function>_mean, so a report had to know where in the list a function sat: the
    name is the config's ``name``, by default the function's own name, unique, never one the trainer logs."""
    cfg = RewardConfig(
        functions=[
            {"function": "test_rewards:constant", "name": "gold", "kwargs": {"value": 2.0}},
            {"function": "test_rewards:plain"},
        ]
    )
    fns = build_reward_functions(cfg)
    assert [f.name for f in fns] == ["gold", "plain"]
    _, parts = RewardSources(None, 1.0, fns)(_exp(), [EOS])
    assert list(parts) == ["gold", "plain"]
    assert parts["gold"].tolist() == [2.0, 2.0]
    swapped = RewardConfig(functions=list(reversed(cfg.functions)))
    assert [f.name for f in build_reward_functions(swapped)] == ["plain", "gold"]
    twice = RewardConfig(functions=[{"function": "test_rewards:plain"}, {"function": "test_rewards:plain"}])
    with pytest.raises(
        ConfigError, match=r"reward.functions\[1\].name: 'plain' is also the name of reward.functions\[0\]"
    ):
        build_reward_functions(twice)
    with pytest.raises(ConfigError, match=r"reward.functions\[0\].name: 'raw' is taken"):
        build_reward_functions(RewardConfig(functions=[{"function": "test_rewards:plain", "name": "raw"}]))
    with pytest.raises(ValidationError, match="pattern"):
        RewardConfig(functions=[{"function": "test_rewards:plain", "name": "gold reward"}])


def test_bad_reward_functions_are_reported_with_their_name():
    with pytest.raises(
        ConfigError, match=r"reward.functions\[0\].*cannot import module 'no_such_module_xyz'"
    ):
        build_reward_functions(RewardConfig(functions=[{"function": "no_such_module_xyz:f"}]))
    with pytest.raises(ConfigError, match="has no callable 'nope'"):
        build_reward_functions(RewardConfig(functions=[{"function": "ppo_helpers:nope"}]))
    with pytest.raises(RewardError, match=r"returned \(1,\) scores for 2 responses"):
        RewardSources(None, 1.0, [RewardFunction("w", wrong_length)])(_exp(), [EOS])
    with pytest.raises(ConfigError, match="no reward source"):
        RewardSources(None, 1.0, [])


@torch.no_grad()
def test_reward_model_scores_padded_rollouts_like_single_texts(tmp_path):
    setup = make_setup(tmp_path)
    rm = ValueHeadModel.from_pretrained(setup.reward).eval()
    tok = load_tokenizer(setup.policy)
    exp = _exp()
    fn = RewardFunction("constant", constant, weight=0.25, kwargs={"value": 2.0})
    total, parts = RewardSources(rm, 3.0, [fn])(exp, [EOS])
    # independent: each row's real tokens alone, unpadded; the reward is the value at the last token
    alone = []
    for row, m in zip(exp.sequences, exp.attention_mask, strict=True):
        ids = row[m.bool()].unsqueeze(0)
        alone.append(float(rm(ids, torch.ones_like(ids)).values[0, -1]))
    torch.testing.assert_close(parts["rm"], torch.tensor(alone), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(total, 3.0 * torch.tensor(alone) + 0.25 * 2.0, rtol=1e-5, atol=1e-5)
    assert tok.eos_token_id == EOS


def needs_a_key(prompts, responses, *, prompt_ids, response_ids, key):
    return [1.0] * len(prompts)


def test_a_function_that_cannot_be_called_so_is_a_config_error_before_training():
    """A calling-convention mismatch is found when the functions are built, naming the config entry; an
    exception raised inside a function is reported as raised, whatever its type."""
    cfg = RewardConfig(functions=[{"function": "test_rewards:needs_a_key", "kwargs": {"kee": 1}}])
    with pytest.raises(
        ConfigError, match=r"reward.functions\[0\]: .*needs_a_key.* could not be called .*'key'"
    ):
        build_reward_functions(cfg)

    def broken(prompts, responses):
        return [len(None)]  # a TypeError from inside

    with pytest.raises(RewardError, match=r"^reward function 'b' raised TypeError: object of type"):
        RewardSources(None, 1.0, [RewardFunction("b", broken)])(_exp(), [EOS])
