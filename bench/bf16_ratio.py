"""How far apart PPO's old and new log-probs are under ``model.dtype: bfloat16``, and why.

    .venv/bin/python bench/bf16_ratio.py [--model DIR] [--device cpu|cuda] [--lr 5e-7] [--rows 12] [--threads 1]
        [--kl-steps 0 1e-8 1e-7 5e-7 3e-6 3e-5]

The real model (SmolLM2-135M-Instruct by default, built by ``bench/real_model.py``), float32 master weights, its
forward as the trainer runs it (``Forward``: position ids from the mask, the LM head on the response columns),
on ``--rows`` responses it samples itself (chat template, seed 0). Two measurements, each in float32 and under
bf16 autocast (on CPU with ppomax's float32 attention, as the trainer loads models), the second also with the
LM head computed in float32 from the final hidden states (``--fp32-head`` variant, a hook that replaces the
head's forward):

1. identical weights: each row's per-token log-probs in the whole batch against the same row in six random
   4-row subsets and alone (each trimmed to its longest prompt and response, as ``Experience.select`` trims a
   micro-batch), padded and packed: the gap between a scoring chunk and an update micro-batch of other rows;
2. one optimiser step: the log-probs of the whole batch before and after one AdamW step of ``--lr`` on a
   token-mean log-prob loss (an Adam step moves every weight by about ``lr``), in the same layout both times:
   how much the model's distribution moves per step.

Prints max and mean |delta log p| over response tokens and exp(max), the ratio PPO would log.

3. the exact KL's floor (``--kl-steps``): every weight moved by ``s * sign(noise)`` (the size of a first Adam
   step of learning rate ``s``, in random directions) for each size ``s``, and the exact KL per response token
   (``Forward.scoring_stats``, the trainer's ``kl/exact_per_token``) of the moved model against the original,
   both forwards in float32 and both under bf16 autocast.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = [
    "What is the capital of France?",
    "How do I bake bread?",
    "Tell me a joke.",
    "Count to five.",
    "Why is the sky blue?",
    "Name three colours and say why you like each of them.",
    "Who are you?",
    "What do dogs eat?",
    "Explain in one paragraph how a bicycle stays upright.",
    "Say something nice.",
    "What is bread made of?",
    "Where is Paris?",
]


@contextlib.contextmanager
def float32_head(model: torch.nn.Module, on: bool) -> Iterator[None]:
    """Within the block, the model's LM head runs in float32 outside autocast (weights and hidden states)."""
    head = model.get_output_embeddings()
    if not on:
        yield
        return

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        with torch.autocast(hidden.device.type, enabled=False):
            return F.linear(hidden.float(), head.weight.float(), head.bias)

    head.forward = forward
    try:
        yield
    finally:
        del head.forward


def sample(model, tokenizer, device, rows: int):
    from ppomax.ppo.experience import Experience

    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        for q in (QUESTIONS * (rows // len(QUESTIONS) + 1))[:rows]
    ]
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=True, max_new_tokens=32, pad_token_id=tokenizer.pad_token_id)
    p_w = enc["input_ids"].shape[1]
    resp = out[:, p_w:]
    eos = tokenizer.eos_token_id
    is_eos = resp == eos
    first = torch.where(
        is_eos.any(1), is_eos.float().argmax(1) + 1, torch.full_like(resp[:, 0], resp.shape[1])
    )
    r_mask = torch.arange(resp.shape[1], device=device)[None] < first[:, None]
    mask = torch.cat([enc["attention_mask"], r_mask.long()], dim=1)
    return Experience(
        sequences=out * mask,
        attention_mask=mask,
        response_mask=r_mask,
        prompt_width=p_w,
        prompt_lens=enc["attention_mask"].sum(1).cpu(),
        response_lens=first.cpu(),
        truncated=torch.zeros(len(prompts), dtype=torch.bool, device=device),
    )


def logprobs(fwd, model, batch) -> torch.Tensor:
    return fwd.logprobs(fwd.response_logits(model, batch), batch.responses_ids)


def gap(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (a.float() - b.float()).abs()[mask]


def show(name: str, g: torch.Tensor) -> None:
    print(f"  {name:<44} max {g.max():.4g}  mean {g.mean():.3g}  exp(max) {torch.exp(g.max()):.4f}")


def kl_floor(base: torch.nn.Module, batch, steps: list[float], device: torch.device) -> None:
    """Part 3 of the module's docstring."""
    from ppomax.ppo.models import Forward

    fwd = Forward(1.0)
    moved = copy.deepcopy(base).eval()
    g = torch.Generator().manual_seed(2)
    signs = [torch.randn(p.shape, generator=g).sign().to(device) for p in base.parameters()]
    labels, mask = batch.responses_ids, batch.response_mask
    print("exact KL per response token of the moved model against the original (nats)")
    for step in steps:
        with torch.no_grad():
            for p, q, sign in zip(moved.parameters(), base.parameters(), signs, strict=True):
                p.copy_(q + step * sign)
        cells = []
        for dtype in ("float32", "bfloat16"):
            with (
                torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"),
                torch.no_grad(),
            ):
                logits = fwd.response_logits(moved, batch)
                ref = fwd.response_logits(base, batch)
                kl = fwd.scoring_stats(logits, ref, labels)["exact_kl"][mask].mean()
            cells.append(f"{dtype} {float(kl):.3g}")
        print(f"  step {step:<8g} " + "   ".join(cells))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--lr", type=float, default=5e-7)
    ap.add_argument("--rows", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--kl-steps",
        type=float,
        nargs="*",
        default=[0.0, 1e-8, 1e-7, 5e-7, 3e-6, 3e-5],
        help="part 3's step sizes (none: skip it)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(REPO / "bench"))
    from transformers import AutoTokenizer

    from ppomax.models import load_causal_lm
    from ppomax.models.attention import use_cpu_float32_attention
    from ppomax.ppo.models import Forward

    if args.model is None:
        from real_model import real_model_dir

        args.model = str(real_model_dir())
    device = torch.device(args.device)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    base = use_cpu_float32_attention(load_causal_lm(args.model, dtype="float32")).to(device).eval()
    batch = sample(base, tokenizer, device, args.rows)
    print(f"{args.model} on {device}: {args.rows} rows, response lengths {batch.response_lens.tolist()}")
    g = torch.Generator().manual_seed(1)
    subsets = [torch.randperm(args.rows, generator=g)[:4].sort().values.tolist() for _ in range(6)]
    subsets += [[i] for i in range(args.rows)]
    for dtype in ("float32", "bfloat16"):
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
        for head32 in (False, True) if dtype == "bfloat16" else (False,):
            label = f"{dtype}{' + float32 head' if head32 else ''}"
            print(label)
            for pack in (False, True):
                fwd = Forward(1.0, pack=pack)
                with float32_head(base, head32), autocast, torch.no_grad():
                    whole = logprobs(fwd, base, batch)
                    gaps = []
                    for rows in subsets:
                        sub = batch.select(rows)
                        gaps.append(
                            gap(
                                logprobs(fwd, base, sub),
                                whole[rows][:, : sub.response_width],
                                sub.response_mask,
                            )
                        )
                show(
                    f"identical weights, subsets vs whole ({'packed' if pack else 'padded'})", torch.cat(gaps)
                )
            model = copy.deepcopy(base).train()
            fwd = Forward(1.0)
            opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
            with float32_head(model, head32), autocast:
                with torch.no_grad():
                    before = logprobs(fwd, model, batch)
                lp = logprobs(fwd, model, batch)
                (-lp[batch.response_mask].mean()).backward()
                opt.step()
                with torch.no_grad():
                    after = logprobs(fwd, model, batch)
            show(f"one AdamW step of lr {args.lr:g}, same layout", gap(after, before, batch.response_mask))
            del model, opt
    if args.kl_steps:
        kl_floor(base, batch, args.kl_steps, device)


if __name__ == "__main__":
    main()
