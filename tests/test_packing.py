"""Packed sequences (ppomax.ppo.packing): the layout against a hand-computed case and a plain loop, and packed
forwards of tiny models against padded ones (Forward, ValueHeadModel, the reward model's scores)."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from transformers import AutoModelForCausalLM

from ppomax.algos import score_token_index
from ppomax.errors import ConfigError
from ppomax.models import ValueHeadModel
from ppomax.ppo.experience import Experience
from ppomax.ppo.models import Forward, check_packed_forwards
from ppomax.ppo.packing import first_fit_decreasing, pack
from ppomax.ppo.reward_sources import RewardSources, check_packed_scores
from tiny_lm import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


def padded_batch(lengths: list[tuple[int, int]], vocab: int = 300, seed: int = 0) -> Experience:
    """Rows with these (prompt, response) lengths, laid out as the rollout lays them out, random tokens >= 3."""
    p_w, r_w = max(p for p, _ in lengths), max(r for _, r in lengths)
    mask = torch.zeros(len(lengths), p_w + r_w, dtype=torch.long)
    for i, (p, r) in enumerate(lengths):
        mask[i, p_w - p : p_w + r] = 1
    gen = torch.Generator().manual_seed(seed)
    return Experience(
        sequences=torch.randint(3, vocab, mask.shape, generator=gen) * mask,
        attention_mask=mask,
        response_mask=mask[:, p_w:].bool(),
        prompt_width=p_w,
        prompt_lens=torch.tensor([p for p, _ in lengths]),
        response_lens=torch.tensor([r for _, r in lengths]),
        truncated=torch.zeros(len(lengths), dtype=torch.bool),
    )


def test_first_fit_decreasing():
    """Longest first, each into the first bin with room (ties in index order)."""
    assert first_fit_decreasing([3, 8, 4, 5, 1, 4], 8) == [[1], [3, 0], [2, 5], [4]]
    assert first_fit_decreasing([2, 2, 2], 6) == [[0, 1, 2]]
    assert first_fit_decreasing([], 4) == []


def test_pack_a_hand_computed_case():
    """Rows (prompt, response) = (2, 1), (1, 3), (3, 1): lengths 3, 4, 4, rows of 4: [row 1], [row 2], [row 0 +
    1 pad]; positions restart at 0 per sequence and in the padding; response token j of a row is read at the
    position of its token p - 1 + j, past its response at its last token."""
    seqs = torch.tensor(
        [
            [0, 11, 12, 13, 0, 0],
            [0, 0, 21, 22, 23, 24],
            [31, 32, 33, 34, 0, 0],
        ]
    )
    out = pack(seqs, torch.tensor([2, 1, 3]), torch.tensor([1, 3, 1]), prompt_width=3, pad_id=9)
    assert out.input_ids.tolist() == [[21, 22, 23, 24], [31, 32, 33, 34], [11, 12, 13, 9]]
    assert out.position_ids.tolist() == [[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 0]]
    # flat positions: row 0 starts at 8, row 1 at 0, row 2 at 4
    assert out.response_index.tolist() == [[9, 10, 10], [0, 1, 2], [6, 7, 7]]
    gathered = out.gather(torch.arange(12).view(3, 4, 1).expand(3, 4, 2))
    assert gathered.shape == (3, 3, 2) and gathered[..., 0].tolist() == out.response_index.tolist()


@pytest.mark.parametrize("seed", range(5))
def test_pack_equals_a_loop_over_the_rows(seed):
    """Random lengths: each row's real tokens appear once, contiguous, with positions 0..len-1; no packed row is
    wider than the longest sequence; the token after each response read position is the response token it
    predicts, and the read position's id is the padded forward's (its column P + j - 1); fewer positions."""
    gen = torch.Generator().manual_seed(seed)
    n = 12
    lengths = list(
        zip(
            torch.randint(1, 20, (n,), generator=gen).tolist(),
            torch.randint(1, 15, (n,), generator=gen).tolist(),
            strict=True,
        )
    )
    exp = padded_batch(lengths, seed=seed)
    out = pack(exp.sequences, exp.prompt_lens, exp.response_lens, exp.prompt_width)
    width = max(p + r for p, r in lengths)
    assert out.input_ids.shape[1] == width and out.input_ids.numel() < exp.sequences.numel()
    flat_ids, flat_pos = out.input_ids.flatten().tolist(), out.position_ids.flatten().tolist()
    starts = []
    for i, (p, r) in enumerate(lengths):
        real = exp.sequences[i, exp.prompt_width - p : exp.prompt_width + r].tolist()
        # the one place this sequence's position run 0..len-1 holds its tokens
        found = [
            s
            for s in range(len(flat_ids) - len(real) + 1)
            if flat_pos[s : s + len(real)] == list(range(len(real))) and flat_ids[s : s + len(real)] == real
        ]
        assert found, i
        starts.append(found[0])
        assert found[0] // width == (found[0] + len(real) - 1) // width  # within one row
        for j in range(exp.response_width):
            at = int(out.response_index[i, j])
            if j < r:
                assert at == found[0] + p - 1 + j
                assert flat_ids[at + 1] == int(exp.sequences[i, exp.prompt_width + j])
                assert flat_pos[at] == p - 1 + j
            else:
                assert at == found[0] + p + r - 1
    spans = sorted((s, s + p + r) for s, (p, r) in zip(starts, lengths, strict=True))
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))  # no overlap


def _model(arch: str, impl: str, seed: int = 0):
    torch.manual_seed(seed)
    config = tiny_config(300, arch)
    config._attn_implementation = impl
    return AutoModelForCausalLM.from_config(config, attn_implementation=impl).eval()


LENGTHS = [(5, 3), (2, 7), (9, 1), (1, 1), (3, 2), (4, 4)]


@torch.no_grad()
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_packed_forwards_equal_padded_ones(arch, impl):
    """Forward's packed response logits and critic values equal the padded ones on the response mask (float
    rounding only), with fewer positions computed."""
    exp = padded_batch(LENGTHS)
    model = _model(arch, impl)
    padded, packed = Forward(1.0), Forward(1.0, pack=True)
    seen: list[int] = []
    model.get_input_embeddings().register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0].numel()))
    on = exp.response_mask
    a, b = padded.response_logits(model, exp), packed.response_logits(model, exp)
    assert a.values.shape == b.values.shape == (1, int(on.sum()), 300)
    torch.testing.assert_close(b.values, a.values, atol=1e-5, rtol=1e-5)
    critic = ValueHeadModel(model, seed=3)
    v_a, v_b = padded.values(critic, exp), packed.values(critic, exp)
    assert v_a.shape == v_b.shape == on.shape
    torch.testing.assert_close(v_b[on], v_a[on], atol=1e-5, rtol=1e-5)
    assert seen[0] == exp.sequences.numel() and seen[1] < 0.8 * seen[0]


@torch.no_grad()
def test_without_the_packed_position_ids_the_outputs_differ():
    """What the layout relies on: with an all-ones attention mask (no packed detection) the packed sequences
    attend to each other, and the logits move."""
    exp = padded_batch(LENGTHS)
    model = _model("llama", "sdpa")
    out = pack(exp.sequences, exp.prompt_lens, exp.response_lens, exp.prompt_width)
    ok = model(input_ids=out.input_ids, position_ids=out.position_ids, use_cache=False).logits
    leaky = model(
        input_ids=out.input_ids,
        attention_mask=torch.ones_like(out.input_ids),
        position_ids=out.position_ids,
        use_cache=False,
    ).logits
    on = exp.response_mask
    assert (out.gather(ok)[on] - out.gather(leaky)[on]).abs().max() > 1e-3


def test_value_head_scores_without_a_mask_read_the_last_token_that_is_not_padding():
    """ValueHeadModel without an attention mask (packed rows): values from the given position ids; the score is
    read as transformers' classifier reads it without a mask."""
    model = _model("llama", "sdpa")
    critic = ValueHeadModel(model, seed=3)
    critic.use_pad_token(0)
    ids = torch.tensor([[5, 6, 7, 0], [5, 6, 0, 0]])
    with torch.no_grad():
        out = critic(ids, None, position_ids=torch.tensor([[0, 1, 2, 0], [0, 1, 0, 1]]))
        masked = critic(ids, (ids != 0).long())
    assert out.scores.tolist() == [out.values[0, 2].item(), out.values[1, 1].item()]
    torch.testing.assert_close(out.values[0, :3], masked.values[0, :3])


def test_the_start_up_check_reads_the_critic_s_values(monkeypatch):
    """check_packed_forwards passes models whose attention honours packing (a causal LM, a critic) and names the
    critic and its values where packed sequences leak into each other."""
    from transformers import masking_utils

    model = _model("llama", "eager")
    models = {"model.policy": model, "model.critic": ValueHeadModel(_model("llama", "eager", seed=1), seed=3)}
    fwd = Forward(1.0, pack=True)
    check_packed_forwards(fwd, models, 300, torch.device("cpu"))
    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    with pytest.raises(ConfigError, match=r"model\.critic's packed forward gives values .*\(eager\)"):
        check_packed_forwards(fwd, {"model.critic": models["model.critic"]}, 300, torch.device("cpu"))


def test_the_start_up_check_draws_tokens_every_model_can_embed():
    """A reference (or critic) with a smaller embedding table than the policy's: the check's tokens are below
    every model's table (not an IndexError deep in torch)."""
    small = AutoModelForCausalLM.from_config(tiny_config(200)).eval()
    models = {"model.policy": _model("llama", "sdpa"), "model.reference": small}
    check_packed_forwards(Forward(1.0, pack=True), models, 300, torch.device("cpu"))


def _under_bf16_autocast(model):
    """How accelerate runs a float32 model under bf16 mixed precision: autocast, outputs converted to float32."""
    from accelerate.utils import convert_outputs_to_fp32

    model.forward = convert_outputs_to_fp32(torch.autocast("cpu", dtype=torch.bfloat16)(model.forward))
    return model


@pytest.mark.parametrize("key", ["model.policy", "model.critic"])
def test_the_start_up_check_s_tolerance_is_that_of_the_dtype_the_forward_computes_in(monkeypatch, key):
    """Float32 weights under bf16 autocast compute in bf16 (and return float32 outputs): the tolerance is bf16's,
    not float32's, which its rounding alone could exceed. Read from the message of a leaking attention."""
    from transformers import masking_utils

    model = _model("llama", "eager", seed=1)
    model = ValueHeadModel(model, seed=3) if key == "model.critic" else model
    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    for autocast, tolerance in ((False, "0.001"), (True, "0.05")):
        checked = _under_bf16_autocast(model) if autocast else model
        with pytest.raises(ConfigError, match=rf"\(tolerance {tolerance}\)"):
            check_packed_forwards(Forward(1.0, pack=True), {key: checked}, 300, torch.device("cpu"))


def test_the_start_up_check_refuses_packing_on_every_process_when_one_process_s_gap_is_too_large():
    """Every process decides on the largest gap of all (``across_ranks``): one whose own forwards pass refuses
    packing with the others, instead of going on alone into a collective the others never join."""
    models = {"model.policy": _model("llama", "sdpa")}
    fwd = Forward(1.0, pack=True)
    check_packed_forwards(fwd, models, 300, torch.device("cpu"), across_ranks=lambda gap: gap)
    elsewhere = 0.5  # another process's gap

    def largest(gap: torch.Tensor) -> torch.Tensor:
        return torch.maximum(gap, torch.tensor(elsewhere))

    with pytest.raises(ConfigError, match=r"model\.policy's packed forward gives log-probs 0\.5 away"):
        check_packed_forwards(fwd, models, 300, torch.device("cpu"), across_ranks=largest)
    with pytest.raises(ConfigError, match=r"model\.reward's packed forward gives scores 0\.5 away"):
        check_packed_scores(_reward_model("llama"), 300, torch.device("cpu"), across_ranks=largest)


# ------------------------------------------------------------------------- the reward model's scores


def _reward_model(arch: str, impl: str = "sdpa", eos: int = 2) -> ValueHeadModel:
    """A tiny value-head RM whose pad token is its EOS (as in many chat models): a trailing EOS is not scored."""
    rm = ValueHeadModel(_model(arch, impl), seed=3)
    rm.backbone.config.pad_token_id = eos
    return rm


def _with_eos(exp: Experience, eos: int = 2) -> Experience:
    """``exp`` (of :data:`LENGTHS`) with responses ending in EOS where the score is read elsewhere than at the
    last token: before it (row 0), at the prompt's last token (row 2, a response that is EOS only) and inside
    the prompt (row 5, whose prompt ends with EOS and whose response is all EOS)."""
    seqs, p_w = exp.sequences.clone(), exp.prompt_width
    for row in (0, 2):
        seqs[row, p_w + int(exp.response_lens[row]) - 1] = eos
    seqs[5, p_w - 1 : p_w + int(exp.response_lens[5])] = eos
    return dataclasses.replace(exp, sequences=seqs)


@torch.no_grad()
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_reward_model_scores_in_micro_batches_and_packed_equal_one_padded_forward(arch):
    """RewardSources' RM forwards in micro-batches of rows of similar length (narrower forwards), packed (fewer
    positions) or both give the scores of one padded forward over all the rows, in the rows' order, wherever a
    row's score is read (before a trailing EOS that is the pad token, at or inside the prompt)."""
    exp = _with_eos(padded_batch(LENGTHS))
    rm = _reward_model(arch)
    whole = rm.score(exp.sequences, exp.attention_mask)
    columns = score_token_index(exp.sequences, exp.attention_mask, 2)
    assert columns[[0, 2, 5]].tolist() == [
        exp.prompt_width + 1,
        exp.prompt_width - 1,
        exp.prompt_width - 2,
    ]
    shapes: list[tuple[int, int]] = []
    rm.backbone.get_input_embeddings().register_forward_hook(
        lambda _m, inputs, _o: shapes.append(tuple(inputs[0].shape))
    )
    for chunk_size, packs in [(None, False), (None, True), (2, False), (2, True), (4, True)]:
        shapes.clear()
        got = RewardSources(rm, 1.0, [], chunk_size=chunk_size, pack=packs).score_model(exp)
        torch.testing.assert_close(got, whole, atol=1e-5, rtol=1e-5)
        chunks = [exp if chunk_size is None else exp.select(rows) for rows in exp.micro_batches(chunk_size)]
        if packs:
            expect = [
                tuple(pack(c.sequences, c.prompt_lens, c.response_lens, c.prompt_width).input_ids.shape)
                for c in chunks
            ]
        else:
            expect = [tuple(c.sequences.shape) for c in chunks]
        assert shapes == expect, (chunk_size, packs)
        positions = sum(a * b for a, b in shapes)
        if (chunk_size, packs) == (None, False):
            assert shapes == [tuple(exp.sequences.shape)]
        else:
            assert positions < 0.8 * exp.sequences.numel(), (chunk_size, packs)


def test_the_start_up_check_reads_the_reward_model_s_scores(monkeypatch):
    """check_packed_scores passes a reward model whose attention honours packing and names model.reward and its
    scores where packed sequences leak into each other."""
    from transformers import masking_utils

    rm = _reward_model("llama", "eager")
    check_packed_scores(rm, 300, torch.device("cpu"))
    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    with pytest.raises(
        ConfigError, match=r"^ppo\.pack_sequences: model\.reward's packed forward gives scores .*\(eager\)"
    ) as err:
        check_packed_scores(rm, 300, torch.device("cpu"))
    assert "\n" not in str(err.value)
