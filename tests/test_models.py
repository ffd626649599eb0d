"""ppomax.models: loading, the value-head model, save/load round trips on tiny Llama, GPT-2, Qwen2, GPT-NeoX."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    Qwen2Config,
)

from helpers import make_tiny_tokenizer, set_args
from ppomax.errors import ModelPathError
from ppomax.models import (
    HEAD_META,
    ValueHeadModel,
    init_causal_lm_from_config,
    is_value_head_model,
    load_causal_lm,
    load_tokenizer,
    position_ids_from_mask,
)

VOCAB = 64


def tiny_config(arch: str):
    common = {"vocab_size": VOCAB, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    if arch == "llama":
        return LlamaConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=64,
            **common,
        )
    if arch == "gpt2":
        return GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=64, **common)
    if arch == "qwen2":
        return Qwen2Config(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=64,
            **common,
        )
    if arch == "neox":
        return GPTNeoXConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=64,
            **common,
        )
    raise ValueError(arch)


def save_tiny_lm(tmp_path, arch: str = "llama", name: str = "lm"):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch))
    out = tmp_path / name
    model.save_pretrained(out)
    return out


ARCHS = ["llama", "gpt2", "qwen2", "neox"]
CLASSIFIERS = {
    "llama": "LlamaForSequenceClassification",
    "gpt2": "GPT2ForSequenceClassification",
    "qwen2": "Qwen2ForSequenceClassification",
    "neox": "GPTNeoXForSequenceClassification",
}


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (3, 7), generator=g)
    lengths = torch.tensor([7, 4, 5])
    return ids, lengths


def _pad(ids, lengths, side: str, width: int = 9):
    b = ids.shape[0]
    out = torch.zeros(b, width, dtype=torch.long)
    mask = torch.zeros(b, width, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        if side == "left":
            out[i, width - n :] = ids[i, :n]
            mask[i, width - n :] = 1
        else:
            out[i, :n] = ids[i, :n]
            mask[i, :n] = 1
    return out, mask


def test_position_ids_from_mask():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]]


@pytest.mark.parametrize("arch", ARCHS)
def test_score_equal_under_left_and_right_padding(tmp_path, arch):
    vh = ValueHeadModel.from_causal_lm(save_tiny_lm(tmp_path, arch)).eval()
    ids, lengths = _batch()
    with torch.no_grad():
        left = vh.score(*_pad(ids, lengths, "left"))
        right = vh.score(*_pad(ids, lengths, "right"))
        # each row alone, unpadded: the independent reference
        alone = torch.stack(
            [
                vh.score(ids[i : i + 1, :n], torch.ones(1, n, dtype=torch.long))[0]
                for i, n in enumerate(lengths.tolist())
            ]
        )
    assert left.shape == (3,) and left.dtype == torch.float32
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_values_match_head_on_last_hidden_state_and_lm_logits_match_backbone(tmp_path, arch):
    path = save_tiny_lm(tmp_path, arch)
    vh = ValueHeadModel.from_causal_lm(path).eval()
    ids, lengths = _batch(1)
    x, m = _pad(ids, lengths, "right")
    with torch.no_grad():
        out = vh(x, m, return_lm_logits=True)
        plain = AutoModelForCausalLM.from_pretrained(path).eval()
        ref = plain(input_ids=x, attention_mask=m, output_hidden_states=True)
        ref_values = ref.hidden_states[-1] @ vh.value_head.weight[0]
        no_logits = vh(x, m)
    assert out.values.shape == (3, 9) and out.lm_logits.shape == (3, 9, VOCAB)
    assert no_logits.lm_logits is None
    # right padding: HF's default positions equal ours on real tokens
    real = m.bool()
    torch.testing.assert_close(out.lm_logits[real], ref.logits[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.values[real], ref_values[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(no_logits.values, out.values, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.scores, out.values[torch.arange(3), lengths - 1])


def _classifier_scores(path, x, m, positions: bool = False):
    """``AutoModelForSequenceClassification(dir)(input_ids, attention_mask).logits[:, 0]``: plain transformers' score
    (``positions``: with position ids counted from the mask, as TRL's get_reward passes them)."""
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    kwargs = {"position_ids": position_ids_from_mask(m)} if positions else {}
    with torch.no_grad():
        return model(input_ids=x, attention_mask=m, **kwargs).logits[:, 0]


@pytest.mark.parametrize("arch", ARCHS)
def test_a_saved_rm_is_a_sequence_classifier_that_plain_transformers_scores_as_ppomax(tmp_path, arch):
    vh = ValueHeadModel.from_causal_lm(save_tiny_lm(tmp_path, arch), seed=3).eval()
    out_dir = tmp_path / "rm"
    vh.save_pretrained(out_dir)
    config = json.loads((out_dir / "config.json").read_text())
    assert config["architectures"] == [CLASSIFIERS[arch]]
    assert config["id2label"] == {"0": "LABEL_0"} and config["pad_token_id"] == 0
    with safe_open(str(out_dir / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "score.weight" in keys and not any("lm_head" in k or "embed_out" in k for k in keys)
    assert not is_value_head_model(out_dir)
    loaded = ValueHeadModel.from_pretrained(out_dir).eval()
    ids, lengths = _batch(2)
    for side in ("right", "left"):
        x, m = _pad(ids, lengths, side)
        with torch.no_grad():
            ours = vh.score(x, m)
            torch.testing.assert_close(loaded(x, m).values, vh(x, m).values, atol=0, rtol=0)
        # GPT-2 and GPT-NeoX (absolute or partial-rotary positions) need the positions of a left-padded row counted
        # from the mask, as ppomax and TRL count them; the rotary Llama and Qwen2 give the same scores without
        torch.testing.assert_close(
            _classifier_scores(out_dir, x, m, positions=True), ours, atol=1e-5, rtol=1e-5
        )
        if side == "right" or arch in ("llama", "qwen2"):
            torch.testing.assert_close(_classifier_scores(out_dir, x, m), ours, atol=1e-5, rtol=1e-5)


def test_with_eos_as_pad_the_score_is_read_before_the_trailing_eos_as_transformers_reads_it(tmp_path):
    """Chat models often pad with their EOS: transformers' classifier then pools at the last token that is not
    EOS, and so does ppomax (also for the PPO reward of a response)."""
    path = save_tiny_lm(tmp_path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "pad_token_id": 2}))
    vh = ValueHeadModel.from_causal_lm(path, seed=1).eval()
    vh.save_pretrained(tmp_path / "rm")
    # rows ending in EOS (2), right- and left-padded with EOS
    x = torch.tensor([[5, 6, 7, 2, 2, 2], [5, 6, 9, 10, 11, 2], [2, 2, 5, 8, 9, 2]])
    m = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    with torch.no_grad():
        out = vh(x, m)
    before_eos = torch.tensor([2, 4, 4])
    torch.testing.assert_close(out.scores, out.values[torch.arange(3), before_eos], atol=0, rtol=0)
    torch.testing.assert_close(_classifier_scores(tmp_path / "rm", x, m), out.scores, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_trl_or_hub_reward_model_loads_with_the_scores_transformers_gives(tmp_path, arch):
    """A reward model saved by AutoModelForSequenceClassification (num_labels=1), as TRL's RewardTrainer saves one
    and as every Hub reward model is: read as ppomax's reward model and critic."""
    torch.manual_seed(0)
    config = tiny_config(arch)
    config.num_labels = 1
    clf = AutoModelForSequenceClassification.from_config(config)
    clf.save_pretrained(tmp_path / "trl-rm")
    rm = ValueHeadModel.from_pretrained(tmp_path / "trl-rm").eval()
    x, m = _pad(*_batch(3), "right")
    with torch.no_grad():
        torch.testing.assert_close(rm.score(x, m), clf.eval()(input_ids=x, attention_mask=m).logits[:, 0])
        # per-token values: the same score head on every position's final hidden state (TRL's value model)
        hidden = clf.base_model(input_ids=x, attention_mask=m).last_hidden_state
        torch.testing.assert_close(rm(x, m).values[m.bool()], clf.score(hidden)[..., 0][m.bool()])
    assert rm.value_head.bias is None


def test_under_zero3_the_saving_rank_builds_no_model_inside_zero_init(tmp_path, monkeypatch):
    """Under ZeRO-3 transformers builds models inside deepspeed.zero.Init, a collective every rank must enter; only
    the main rank saves the final model, so the sequence classifier it writes is built without it (else the run
    hangs at its final save)."""
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig, unset_hf_deepspeed_config

    vh = ValueHeadModel.from_causal_lm(save_tiny_lm(tmp_path), seed=3).eval()

    def collective(*_args, **_kwargs):
        raise AssertionError("deepspeed.zero.Init entered on one rank")

    monkeypatch.setattr(deepspeed.zero, "Init", collective)
    zero3 = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    try:
        vh.save_pretrained(tmp_path / "rm")
    finally:
        unset_hf_deepspeed_config()
        del zero3
    loaded = ValueHeadModel.from_pretrained(tmp_path / "rm")
    torch.testing.assert_close(loaded.value_head.weight, vh.value_head.weight, atol=0, rtol=0)


def test_a_value_head_directory_of_an_earlier_version_loads_with_its_values(tmp_path):
    """Earlier ppomax versions saved a causal LM + value_head.safetensors (weight and bias): it loads with the
    values it was saved with (bias kept when not zero); saved again, it is a sequence classifier."""
    path = save_tiny_lm(tmp_path)
    lm = AutoModelForCausalLM.from_pretrained(path)
    x, m = _pad(*_batch(4), "right")
    for bias in (0.0, 0.5):
        old = tmp_path / f"old-{bias}"
        lm.save_pretrained(old)
        weight = torch.randn(1, 16, generator=torch.Generator().manual_seed(1))
        save_file({"weight": weight, "bias": torch.tensor([bias])}, str(old / "value_head.safetensors"))
        (old / HEAD_META).write_text(
            json.dumps({"format": "ppomax-value-head", "version": 1, "hidden_size": 16})
        )
        vh = ValueHeadModel.from_pretrained(old).eval()
        assert (vh.value_head.bias is None) == (bias == 0.0)
        with torch.no_grad():
            hidden = lm(input_ids=x, attention_mask=m, output_hidden_states=True).hidden_states[-1]
            real = m.bool()  # right padding: transformers' positions are ppomax's on the real tokens
            torch.testing.assert_close(vh(x, m).values[real], (hidden @ weight[0] + bias)[real])
    vh.save_pretrained(tmp_path / "again")  # the bias has no place in a score head: dropped, with a warning
    again = ValueHeadModel.from_pretrained(tmp_path / "again").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x, m).values, vh(x, m).values - 0.5)


def test_a_classifier_with_two_labels_or_without_a_decoder_is_one_line(tmp_path):
    from transformers import BertConfig, DebertaV2Config

    AutoModelForSequenceClassification.from_config(tiny_config("llama")).save_pretrained(tmp_path / "two")
    with pytest.raises(
        ModelPathError, match=r"model\.reward: .* 2 labels: a reward model or critic has one output"
    ):
        ValueHeadModel.from_pretrained(tmp_path / "two", key="model.reward")
    # encoder reward models (OpenAssistant's DeBERTa ones): DeBERTa has no causal LM, BERT's needs more than its
    # encoder
    small = {"vocab_size": VOCAB, "hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2}
    for name, config in (("deberta", DebertaV2Config(**small)), ("bert", BertConfig(**small))):
        config.num_hidden_layers, config.num_labels = 1, 1
        AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / name)
        with pytest.raises(
            ModelPathError, match=r"model\.reward: .*ForSequenceClassification.* decoder LMs"
        ) as err:
            ValueHeadModel.from_pretrained(tmp_path / name, key="model.reward")
        assert "\n" not in str(err.value)


def test_from_causal_lm_on_saved_rm_keeps_the_decoder_and_gives_fresh_seeded_head(tmp_path):
    vh = ValueHeadModel.from_causal_lm(save_tiny_lm(tmp_path), seed=0)
    with torch.no_grad():
        vh.value_head.weight.fill_(1.0)
    vh.save_pretrained(tmp_path / "rm")
    a = ValueHeadModel.from_causal_lm(tmp_path / "rm", seed=7)
    b = ValueHeadModel.from_causal_lm(tmp_path / "rm", seed=7)
    c = ValueHeadModel.from_causal_lm(tmp_path / "rm", seed=8)
    decoder = vh.backbone.base_model.named_parameters()
    for (name, p), q in zip(decoder, a.backbone.base_model.parameters(), strict=True):
        assert torch.equal(p, q), name
    assert not torch.equal(a.value_head.weight, vh.value_head.weight)
    assert torch.equal(a.value_head.weight, b.value_head.weight)
    assert not torch.equal(a.value_head.weight, c.value_head.weight)
    std = a.value_head.weight.std().item()
    assert 0.5 / 17**0.5 < std < 2.0 / 17**0.5
    assert a.value_head.bias is None


def test_fresh_head_does_not_touch_global_rng(tmp_path):
    path = save_tiny_lm(tmp_path)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    ValueHeadModel.from_causal_lm(path, seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_gradients_flow_to_backbone_and_head(tmp_path):
    vh = ValueHeadModel.from_causal_lm(save_tiny_lm(tmp_path))
    x, m = _pad(*_batch(), "left")
    vh.score(x, m).sum().backward()
    assert vh.value_head.weight.grad is not None and vh.value_head.weight.grad.abs().sum() > 0
    emb = vh.backbone.get_input_embeddings().weight
    assert emb.grad is not None and emb.grad.abs().sum() > 0


def test_bfloat16_backbone_gives_float32_values(tmp_path):
    vh = ValueHeadModel.from_causal_lm(save_tiny_lm(tmp_path), dtype="bfloat16")
    assert next(vh.backbone.parameters()).dtype == torch.bfloat16
    assert vh.value_head.weight.dtype == torch.float32
    x, m = _pad(*_batch(), "right")
    with torch.no_grad():
        assert vh(x, m).values.dtype == torch.float32


# ---------------------------------------------------------------- errors and tokenizer


def test_missing_model_path_names_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ModelPathError, match=str(missing)):
        load_causal_lm(missing)
    with pytest.raises(ModelPathError, match="not found"):
        ValueHeadModel.from_pretrained(missing)
    with pytest.raises(ModelPathError, match=str(missing)):
        load_tokenizer(missing)


def test_directory_without_config_or_weights(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelPathError, match=r"no config\.json"):
        load_causal_lm(tmp_path / "empty")
    cfg_only = tmp_path / "cfg"
    tiny_config("llama").save_pretrained(cfg_only)
    with pytest.raises(ModelPathError, match="init_from_config"):
        load_causal_lm(cfg_only)
    model = init_causal_lm_from_config(cfg_only, seed=1)
    again = init_causal_lm_from_config(cfg_only, seed=1)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters(), strict=True))


def test_from_pretrained_on_plain_lm_explains(tmp_path):
    with pytest.raises(ModelPathError, match=r"model.critic: .* is not a reward model \(LlamaForCausalLM\)"):
        ValueHeadModel.from_pretrained(save_tiny_lm(tmp_path), key="model.critic")


def test_load_tokenizer_pads_left_and_falls_back_to_eos(tmp_path):
    path = make_tiny_tokenizer(tmp_path)
    tok = load_tokenizer(path)
    assert tok.padding_side == "left" and tok.pad_token == "<pad>"
    # a tokenizer saved without a pad token gets EOS as pad
    tok.pad_token = None
    tok.save_pretrained(tmp_path / "nopad")
    tok2 = load_tokenizer(tmp_path / "nopad")
    assert tok2.pad_token == tok2.eos_token == "</s>"
    (tmp_path / "notok").mkdir()
    with pytest.raises(ModelPathError, match="no tokenizer files"):
        load_tokenizer(tmp_path / "notok")


# ---------------------------------------------------------------- broken, hostile and NaN weight files


class _Hostile:
    """Unpickling this would run ``touch MARKER``: a weight file must never be unpickled as objects."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def write_hostile_pickle(path, marker) -> None:
    """A ``torch.save``-style file (a zip holding a pickle) whose unpickling would create ``marker``."""
    torch.save({"model.embed_tokens.weight": _Hostile(marker)}, path)


def _one_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text and "Traceback" not in text, text
    return text


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
@pytest.mark.parametrize("loader", ["causal_lm", "value_head"])
def test_a_broken_safetensors_file_is_one_line_naming_the_file(tmp_path, damage, loader):
    path = save_tiny_lm(tmp_path)
    if loader == "value_head":
        ValueHeadModel.from_causal_lm(path).save_pretrained(tmp_path / "rm")
        path = tmp_path / "rm"
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "garbage": b"\xff" * 64}[damage])
    with pytest.raises(ModelPathError) as err:
        (load_causal_lm if loader == "causal_lm" else ValueHeadModel.from_pretrained)(path)
    assert _one_line(err.value).startswith(f"{weights}: unreadable weights, truncated or corrupt")


def test_a_malicious_pickle_is_refused_naming_the_file_and_never_run(tmp_path):
    path = save_tiny_lm(tmp_path)
    (path / "model.safetensors").unlink()
    marker = tmp_path / "PWNED"
    write_hostile_pickle(path / "pytorch_model.bin", marker)
    for load in (load_causal_lm, ValueHeadModel.from_causal_lm):
        with pytest.raises(ModelPathError) as err:
            load(path)
        assert _one_line(err.value).startswith(f"{path / 'pytorch_model.bin'}: refused: a pickle that holds")
    assert not marker.exists()


def _nan_model(tmp_path, name: str = "lm"):
    path = save_tiny_lm(tmp_path, name=name)
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")
    model.save_pretrained(path)
    return path


def test_nan_weights_stop_at_load_naming_the_model(tmp_path):
    path = _nan_model(tmp_path)
    with pytest.raises(ModelPathError) as err:
        load_causal_lm(path)
    assert _one_line(err.value).startswith(f"{path}: the weights hold NaN or inf values (model.embed_tokens")
    vh = ValueHeadModel.from_causal_lm(save_tiny_lm(tmp_path, name="ok"))
    with torch.no_grad():
        vh.value_head.weight[0, 3] = float("inf")
    vh.save_pretrained(tmp_path / "rm")
    with pytest.raises(ModelPathError, match=r"rm: the weights hold NaN or inf values \(score\.weight\)"):
        ValueHeadModel.from_pretrained(tmp_path / "rm")


@pytest.mark.parametrize("command", ["train-ppo", "eval"])
def test_a_nan_policy_stops_before_sampling_with_one_line(tmp_path, capsys, one_thread, command):
    """Through the commands users run (today: a RuntimeError traceback from torch.multinomial)."""
    from transformers.utils import logging as hf_logging

    from ppo_helpers import FAST, make_setup
    from ppomax.cli import main

    s = make_setup(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(s.policy)
    with torch.no_grad():
        model.get_input_embeddings().weight[5] = float("nan")
    model.save_pretrained(tmp_path / "nan")
    (tmp_path / "nan" / "model.safetensors").replace(s.policy / "model.safetensors")
    if command == "train-ppo":
        sets = [f"model.policy={s.policy}", f"model.reward={s.reward}", f"data.prompts={s.prompts}"]
        sets += [f"logging.out_dir={tmp_path / 'run'}", *FAST]
        argv = ["train-ppo", *set_args(*sets)]
    else:
        argv = ["eval", "--policy", str(s.policy), "--baseline", str(s.policy), "--prompts", str(s.prompts)]
        argv += ["--judge", f"reward-model:{s.reward}", "--no-progress", "--max-new-tokens", "4"]
    capsys.readouterr()
    hf_logging.disable_progress_bar()  # in a fresh interpreter the CLI hides transformers' weight bars
    try:
        assert main(argv) == 2
    finally:
        hf_logging.enable_progress_bar()
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err and all(ln.startswith("ppomax: ") for ln in lines), err
    assert lines[-1] == (
        f"ppomax: {s.policy}: the weights hold NaN or inf values (model.embed_tokens.weight): not a usable model "
        "(saved by a run that diverged?); use an earlier checkpoint"
    )


# ---------------------------------------------------------------- hostile pickles in a run's checkpoint


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """A finished 4-step SFT run checkpointed at steps 2 and 4 (resuming it with epochs=3 has work left)."""
    import os

    from ppomax.cli import main
    from tiny_lm import make_tiny_lm, write_jsonl, write_yaml

    root = tmp_path_factory.mktemp("sft-run")
    records = [
        {"prompt": f"Repeat {w}.", "response": f"{w} {w}"} for w in ("apple", "river", "stone", "cloud")
    ]
    model = make_tiny_lm(root, [f"\n\nHuman: {r['prompt']}\n\nAssistant: {r['response']}" for r in records])
    cfg = {
        "model": {"policy": str(model)},
        "data": {"train": str(write_jsonl(root / "train.jsonl", records))},
        "epochs": 2,
        "batch_size": 2,
        "logging": {
            "out_dir": str(root / "run"),
            "progress": False,
            "tensorboard": False,
            "checkpoint_every": 2,
        },
    }
    threads, os.environ["PPOMAX_THREADS"] = os.environ.get("PPOMAX_THREADS"), "1"
    try:
        assert main(["train-sft", "--config", str(write_yaml(root / "sft.yaml", cfg))]) == 0
    finally:
        os.environ.pop("PPOMAX_THREADS") if threads is None else os.environ.update(PPOMAX_THREADS=threads)
    assert sorted(p.name for p in (root / "run" / "checkpoints" / "step-4").iterdir()) == [
        "model.safetensors",
        "optimizer.bin",
        "ppomax_state.json",
        "random_states_0.pkl",
    ]
    return root / "run"


@pytest.mark.parametrize(
    "planted", ["custom_checkpoint_0.pkl", "optimizer.bin", "pytorch_model.bin", "random_states_0.pkl"]
)
def test_resume_never_runs_a_pickle_planted_in_a_checkpoint(sft_run, tmp_path, capsys, one_thread, planted):
    """Each file a resume may read, replaced by a pickle whose unpickling would create a marker file: nothing
    runs, and the user gets one line (or the file is ignored: accelerate skips RNG states it cannot load)."""
    import pickle
    import shutil

    from transformers.utils import logging as hf_logging

    from ppomax.cli import main

    run = tmp_path / "run"
    shutil.copytree(sft_run, run)
    ckpt = run / "checkpoints" / "step-4"
    marker = tmp_path / "PWNED"
    if planted == "custom_checkpoint_0.pkl":  # accelerate would load it with weights_only=False
        (ckpt / planted).write_bytes(pickle.dumps(_Hostile(marker)))
    else:
        if planted == "pytorch_model.bin":
            (ckpt / "model.safetensors").unlink()
        write_hostile_pickle(ckpt / planted, marker)
    capsys.readouterr()
    hf_logging.disable_progress_bar()
    try:
        rc = main(["train-sft", "--resume", str(run), "--set", "epochs=3"])
    finally:
        hf_logging.enable_progress_bar()
    assert not marker.exists()
    err = capsys.readouterr().err
    assert rc == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err and all(ln.startswith("ppomax: ") for ln in lines), err
    assert str(ckpt) in lines[-1] and ("refused" in lines[-1] or "never writes or loads" in lines[-1])


def test_a_checkpoint_without_its_random_states_is_refused_not_resumed_inexactly(sft_run, tmp_path, capsys):
    """accelerate skips RNG states it cannot load and resumes with fresh random streams: not the run it continues."""
    import shutil

    from ppomax.cli import main

    run = tmp_path / "run"
    shutil.copytree(sft_run, run)
    (run / "checkpoints" / "step-4" / "random_states_0.pkl").unlink()
    capsys.readouterr()
    assert main(["train-sft", "--resume", str(run), "--set", "epochs=3"]) == 2
    assert "random_states_0.pkl: missing" in capsys.readouterr().err
