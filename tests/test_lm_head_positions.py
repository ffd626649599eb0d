"""The LM head of PPO's forwards, packed or padded, runs only on the positions whose logits are read (Forward,
ResponsePositions, ResponseLogits): its logits, log-probs and gradients equal those of the whole forward's logits at
the response positions, on GPT-2 and Llama tiny models (tied and untied heads), under LoRA, and with Gemma 2's
soft-capping after the head."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config

from helpers import dense_logits
from ppomax.errors import UserError
from ppomax.models import AdaptersOff, position_ids_from_mask
from ppomax.models.lm_head import ResponseLogits
from ppomax.ppo.models import Forward
from ppomax.ppo.packing import pack
from test_packing import LENGTHS, padded_batch
from tiny_lm import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 300


def _model(arch: str, tie: bool | None = None, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if arch == "gemma2":
        config = Gemma2Config(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=16,
            final_logit_softcapping=2.0,
            pad_token_id=0,
        )
    else:
        config = tiny_config(VOCAB, arch, tie=tie)
    impl = "eager" if arch == "gemma2" else "sdpa"  # transformers' Gemma 2 has no sdpa
    return AutoModelForCausalLM.from_config(config, attn_implementation=impl).eval()


def _lora(model: torch.nn.Module, arch: str) -> torch.nn.Module:
    """PEFT adapters with random B (so they change the outputs), on attention and on the LM head."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    attention = ["c_attn"] if arch == "gpt2" else ["q_proj", "v_proj"]
    head = [] if arch == "gpt2" else ["lm_head"]  # GPT-2's head is tied to the input embeddings
    lora = LoraConfig(
        r=4, target_modules=attention + head, init_lora_weights=False, fan_in_fan_out=arch == "gpt2"
    )
    return get_peft_model(model, lora)


def whole_response_logits(model, exp) -> torch.Tensor:
    """[B, R, V]: the model's logits at every position, read at columns P - 1 .. P + R - 2 (no narrowing)."""
    mask = exp.attention_mask
    logits = model(
        input_ids=exp.sequences,
        attention_mask=mask,
        position_ids=position_ids_from_mask(mask),
        use_cache=False,
    ).logits
    return logits[:, exp.prompt_width - 1 : -1]


class HeadPositions:
    """The positions (rows x width) the LM head of ``model`` runs on, per call."""

    def __init__(self, head: torch.nn.Module) -> None:
        self.seen: list[int] = []
        self.handle = head.register_forward_hook(
            lambda _m, inputs, _o: self.seen.append(inputs[0][..., 0].numel())
        )


def _head(model) -> torch.nn.Module:
    return (model.model if isinstance(model, AdaptersOff) else model).get_output_embeddings()


CASES = [("gpt2", None), ("llama", False), ("llama", True), ("gemma2", None)]


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize(("arch", "tie"), CASES, ids=["gpt2", "llama_untied", "llama_tied", "gemma2_softcap"])
def test_the_head_runs_on_the_real_response_positions_only(arch, tie, packed):
    """Response logits (no gradient) are the whole forward's at the real response tokens, [1, K, V], no more
    (their per-token results read zeros past each row's response); the head runs once per forward, on exactly
    the real response tokens (EOS included)."""
    exp = padded_batch(LENGTHS)
    model = _model(arch, tie)
    count = HeadPositions(_head(model))
    with torch.no_grad():
        got = Forward(1.0, pack=packed).response_logits(model, exp)
        expect = whole_response_logits(model, exp)
    on, k = exp.response_mask, int(exp.response_lens.sum())
    assert got.positions is not None and got.values.shape == (1, k, VOCAB) and int(on.sum()) == k
    torch.testing.assert_close(got.values[0], expect[on], atol=1e-5, rtol=1e-5)
    assert (dense_logits(got)[~on] == 0).all()
    assert count.seen == [k, exp.sequences.numel()]  # ours, then the whole one


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize(("arch", "tie"), CASES[:3], ids=["gpt2", "llama_untied", "llama_tied"])
def test_the_gradient_is_the_whole_forwards(arch, tie, packed):
    """The update's backward through the narrowed head: log-probs and entropy on the response mask, and every
    parameter's gradient of a masked loss of them, equal those through the whole forward's logits."""
    exp = padded_batch(LENGTHS)
    model = _model(arch, tie)
    fwd, on = Forward(0.7, pack=packed), exp.response_mask
    grads, outputs = [], []
    for narrowed in (True, False):
        model.zero_grad()
        if narrowed:
            logits = fwd.response_logits(model, exp)
        else:
            logits = ResponseLogits(whole_response_logits(model, exp))
        lp, ent = fwd.logprobs(logits, exp.responses_ids), fwd.entropy(logits)
        ((lp + 0.1 * ent) * on).sum().backward()
        outputs.append((lp[on].detach(), ent[on].detach()))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for a, b in zip(*outputs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_lora_and_its_adapters_off(arch, packed):
    """Under PEFT (adapters on attention and, for Llama, on the LM head itself) and through AdaptersOff (the
    LoRA reference): the head found through the wrappers runs on the response tokens only, with the same logits
    and adapter gradients as the whole forward."""
    exp = padded_batch(LENGTHS)
    policy = _lora(_model(arch), arch)
    reference = AdaptersOff(policy)
    fwd, on = Forward(1.0, pack=packed), exp.response_mask
    count = HeadPositions(_head(policy))
    with torch.no_grad():
        ref_got = dense_logits(fwd.response_logits(reference, exp))
        ref_expect = whole_response_logits(reference, exp)
    torch.testing.assert_close(ref_got[on], ref_expect[on], atol=1e-5, rtol=1e-5)
    grads = []
    for narrowed in (True, False):
        policy.zero_grad()
        if narrowed:
            logits = fwd.response_logits(policy, exp)
        else:
            logits = ResponseLogits(whole_response_logits(policy, exp))
        (fwd.logprobs(logits, exp.responses_ids) * on).sum().backward()
        grads.append({n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None})
    assert grads[0] and grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4, msg=name)
    k = int(exp.response_lens.sum())
    assert count.seen[0] == count.seen[2] == k  # the reference's and the policy's forwards
    policy_got = dense_logits(fwd.response_logits(policy, exp).detach())
    assert not torch.allclose(ref_got[on], policy_got[on])  # the adapters act


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_micro_batches_of_a_chunk(packed):
    """Trimmed micro-batches (Experience.select: fewer columns, other rows) read their own rows' positions."""
    exp = padded_batch(LENGTHS)
    model = _model("llama")
    fwd = Forward(1.0, pack=packed)
    with torch.no_grad():
        whole = whole_response_logits(model, exp)
        for rows in ([3, 0], [5, 1, 2], [4]):
            part = exp.select(rows)
            got = dense_logits(fwd.response_logits(model, part))
            on = part.response_mask
            expect = whole[rows][:, : part.response_width]
            torch.testing.assert_close(got[on], expect[on], atol=1e-5, rtol=1e-5)


def test_a_model_without_an_output_embedding_module_gets_the_head_as_before():
    """No get_output_embeddings(): no hook, padded logits_to_keep=R + 1 (and every packed position), same
    logits."""
    exp = padded_batch(LENGTHS)
    model = _model("llama")
    count = HeadPositions(model.lm_head)
    model.get_output_embeddings = lambda: None
    on, rows, r = exp.response_mask, len(LENGTHS), exp.response_width
    with torch.no_grad():
        expect = whole_response_logits(model, exp)
        for packed in (False, True):
            got = Forward(1.0, pack=packed).response_logits(model, exp)
            assert got.positions is None
            torch.testing.assert_close(got.values[on], expect[on], atol=1e-5, rtol=1e-5)
    n_w = pack(exp.sequences, exp.prompt_lens, exp.response_lens, exp.prompt_width).input_ids.numel()
    assert count.seen[1:] == [rows * (r + 1), n_w]


def test_the_hook_is_removed_on_exit_and_on_an_exception():
    exp = padded_batch(LENGTHS)
    model = _model("llama")
    fwd = Forward(1.0, pack=True)
    with torch.no_grad():
        fwd.response_logits(model, exp)
    assert not model.lm_head._forward_pre_hooks

    def fail(*_args):
        raise RuntimeError("boom")

    handle = model.lm_head.register_forward_hook(fail)
    with torch.no_grad(), pytest.raises(RuntimeError, match="boom"):
        fwd.response_logits(model, exp)
    handle.remove()
    assert not model.lm_head._forward_pre_hooks


class ReshapesItsLogits(torch.nn.Module):
    """A causal LM whose forward rearranges the logits its head returns (as a repository's own code might)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.inner.get_output_embeddings()

    def forward(self, input_ids, logits_to_keep=0, **kwargs):
        out = self.inner(input_ids=input_ids, logits_to_keep=logits_to_keep, **kwargs)
        out.logits = out.logits.transpose(0, 1)
        return out


def test_logits_that_are_not_the_heads_output_are_refused_in_one_line():
    """Where the head ran on the selected positions but the forward returns its logits otherwise laid out, the
    logits are not misread: one line."""
    exp = padded_batch(LENGTHS)
    model = ReshapesItsLogits(_model("llama"))
    with torch.no_grad(), pytest.raises(UserError, match=r"are not its LM head's output") as err:
        Forward(1.0, pack=True).response_logits(model, exp)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_the_exact_kl_of_a_narrowed_head_and_a_whole_one(packed):
    """A policy whose head runs on the response tokens ([1, K, V]) against a reference whose head cannot be
    narrowed ([B, R, V]), either way round: the exact KL of the whole forwards' logits on the response mask."""
    from ppomax.algos import kl_from_logits

    exp = padded_batch(LENGTHS)
    policy, reference = _model("llama", seed=0), _model("llama", seed=1)
    reference.get_output_embeddings = lambda: None
    fwd, on = Forward(0.7, pack=packed), exp.response_mask
    with torch.no_grad():
        a, b = fwd.response_logits(policy, exp), fwd.response_logits(reference, exp)
        assert a.positions is not None and b.positions is None
        whole_a, whole_b = whole_response_logits(policy, exp), whole_response_logits(reference, exp)
        for x, y, want in (
            (a, b, kl_from_logits(whole_a, whole_b, 0.7)),
            (b, a, kl_from_logits(whole_b, whole_a, 0.7)),
        ):
            got = fwd.scoring_stats(x, y, exp.responses_ids)["exact_kl"]
            assert got.shape == on.shape and want[on].min() > 0
            torch.testing.assert_close(got[on], want[on], atol=1e-5, rtol=1e-5)
