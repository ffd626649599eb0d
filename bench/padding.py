"""How much of the PPO iteration's forwards is padding: token positions counted, not timed.

    .venv/bin/python bench/padding.py [--model DIR] [--iterations 20] [--micro 0 8 4] [--max-new-tokens 128]
    .venv/bin/python bench/padding.py --micro 0 8 --time 1 [--device cuda] [--threads 1]   # + the real model's time

Prompts: the HH-RLHF harmless test pairs (../shared/data/hh-rlhf-harmless-test.jsonl.gz, relative to the
repository root) rendered with the chat template of the real model's tokenizer (SmolLM2-135M-Instruct by default,
built by ``bench/real_model.py``) and cut to ``--max-prompt-tokens`` as the trainer cuts them
(``prompt_features``, as ``ppo/data.py`` loads prompts). Response lengths: a recorded distribution, each prompt's
own HH-RLHF chosen answer tokenised (+1 for the EOS), or ``--max-new-tokens`` without EOS where it is longer (a
truncated response).

Each iteration draws ``--buffer`` prompts (seeded), builds the rollout batches' :class:`Experience` (only the
lengths matter: sequences are pad ids), merges them as the trainer does and counts, for every forward of the
separate scoring pass (each rollout batch in chunks of the micro-batch size) and of the update (``--epochs``
passes over shuffled minibatches, each in micro-batches), the positions it computes (rows x width) and the real
ones (the attention mask). Chunks are formed two ways: ``consecutive`` (rows in their shuffled order) and
``grouped`` (:meth:`Experience.micro_batches`, where the checkout has it). ``packed`` is ``ppo.pack_sequences``
(where the checkout has :mod:`ppomax.ppo.packing`): the chunks ppomax forms (grouped where it groups) packed by
ppomax's own code, each chunk's sequences (prompt + response, no padding between them) first-fit decreasing into
rows as wide as its longest sequence, so no row's attention is wider than the padded one's. The policy, reference
and critic forwards of a chunk have the same rows and width: the shares are every model's. The ``rm`` pass is the
reward model's scoring forward of each rollout batch: in the same chunks (and packed) where the checkout's
:class:`~ppomax.ppo.reward_sources.RewardSources` follows ``ppo.micro_batch_size`` and ``ppo.pack_sequences``,
else one padded forward over the whole rollout batch.
A second table counts the positions the policy's (and the reference's) LM head runs on per iteration: the
``R + 1`` last columns of each padded chunk (``logits_to_keep``), every packed position, and the positions before
the rows' real response tokens only (what ppomax computes where its ``Forward`` narrows the head).

``--time N`` also times the real model on the first N minibatches of one iteration (seed 0): the policy's
forward and backward (``Forward.response_logits``, a token-mean log-prob loss) over each micro-batch, rows laid out
as above with random token ids, consecutive, grouped, then packed, one warm-up micro-batch first; the process's
CPU time (one thread: usable on a busy machine), the wall time (CUDA synchronised) and the positions the LM head
ran on (counted by a hook on it).
``--memory`` measures, each in a fresh process, the peak memory (CPU: peak RSS; CUDA: peak allocated) above the
loaded model and the CPU time of one scoring chunk (no gradient: log-probs and entropy of the response logits)
and one update micro-batch (forward and backward of a token-mean log-prob loss) of the real model: the chunk of
the first rollout batch (scoring) or minibatch (update), grouped as ppomax groups them at each nonzero
``--micro``, with the most padded positions; padded and packed, with the positions its LM head ran on;
``--before SRC`` runs the same measurements with an older checkout's ``src`` first:

    .venv/bin/python bench/padding.py --iterations 1 --micro 8 --memory --before /path/to/main/src

Works with older checkouts too (their ``Forward`` API; no packed column), so the same command measures any
checkout (``PYTHONPATH=.../src``).
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "hh-rlhf-harmless-test.jsonl.gz"


def load_lengths(model: str, data: str, max_prompt_tokens: int, max_new_tokens: int) -> list[tuple[int, int]]:
    """(prompt tokens, response tokens) of every usable HH-RLHF pair (see the module docstring)."""
    from ppomax.data import LoadStats, encode, parse_hh, prompt_features
    from ppomax.models import load_tokenizer

    tok = load_tokenizer(model)
    with gzip.open(data, "rt", encoding="utf-8") as fh:
        records = [json.loads(line) for line in fh]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "prompts.jsonl"
        with path.open("w", encoding="utf-8") as out:
            for i, rec in enumerate(records):
                out.write(json.dumps({"chosen": rec["chosen"], "row": i}) + "\n")
        rows = prompt_features(
            str(path),
            tok,
            format="chat_template",
            max_prompt_tokens=max_prompt_tokens,
            on_error="skip",
            stats=LoadStats(),
        )
    out = []
    for ids, _text, meta in rows:
        answer = [c for role, c in parse_hh(records[meta["row"]]["chosen"]) if role == "assistant"][-1]
        out.append((len(ids), min(len(encode(tok, answer)) + 1, max_new_tokens)))
    return out


def rollout_batch(lengths: list[tuple[int, int]]) -> object:
    """An :class:`Experience` with these (prompt, response) lengths, laid out as the rollout lays it out."""
    from ppomax.ppo.experience import Experience

    p = max(a for a, _ in lengths)
    r = max(b for _, b in lengths)
    mask = torch.zeros(len(lengths), p + r, dtype=torch.long)
    for i, (a, b) in enumerate(lengths):
        mask[i, p - a : p + b] = 1
    return Experience(
        sequences=torch.zeros_like(mask),
        attention_mask=mask,
        response_mask=mask[:, p:].bool(),
        prompt_width=p,
        prompt_lens=torch.tensor([a for a, _ in lengths]),
        response_lens=torch.tensor([b for _, b in lengths]),
        truncated=torch.zeros(len(lengths), dtype=torch.bool),
    )


def chunks(exp: object, size: int | None, how: str) -> list[list[int]]:
    n = exp.batch_size  # type: ignore[attr-defined]
    if how == "grouped":
        return exp.micro_batches(size)  # type: ignore[attr-defined]
    step = size or n
    return [list(range(lo, min(lo + step, n))) for lo in range(0, n, step)]


def packer() -> Any:
    """ppomax's packing of a chunk (:func:`ppomax.ppo.packing.pack`), None in checkouts without it."""
    try:
        from ppomax.ppo.packing import pack
    except ImportError:
        return None
    return pack


def count(exp: object, size: int | None, how: str, tally: dict[str, int], packed: bool) -> None:
    """Add the positions and real tokens of ``exp``'s forwards in chunks of ``size`` rows to ``tally`` (and, if
    ``packed``, the positions of the chunks packed)."""
    parts = chunks(exp, size, how)
    pack = packer() if packed else None
    for rows in parts:
        chunk = exp if len(parts) == 1 else exp.select(rows)  # type: ignore[attr-defined]
        tally["positions"] += chunk.attention_mask.numel()
        tally["real"] += int(chunk.attention_mask.sum())
        tally["forwards"] += 1
        tally["head_last_columns"] += chunk.batch_size * (chunk.response_width + 1)
        tally["head_response"] += int(chunk.response_lens.sum())
        if pack is not None:
            out = pack(chunk.sequences, chunk.prompt_lens, chunk.response_lens, chunk.prompt_width)
            tally["packed"] += out.input_ids.numel()


def rm_follows_chunks() -> bool:
    """Whether the checkout's reward-model forward runs in the scoring pass's chunks (and packs them)."""
    from ppomax.ppo.reward_sources import RewardSources

    return "chunk_size" in inspect.signature(RewardSources).parameters


def iteration(
    lengths: list[tuple[int, int]],
    args: argparse.Namespace,
    micro: int | None,
    how: str,
    seed: int,
    packed: bool = False,
) -> dict[str, dict[str, int]]:
    """The counts of one iteration's scoring pass, reward-model forwards and update (and of their chunks packed,
    if ``packed``)."""
    from ppomax.ppo.experience import Experience

    g = torch.Generator().manual_seed(seed)
    drawn = [lengths[i] for i in torch.randperm(len(lengths), generator=g)[: args.buffer].tolist()]
    keys = ("positions", "real", "forwards", "packed", "head_last_columns", "head_response")
    tallies = {k: dict.fromkeys(keys, 0) for k in ("scoring", "rm", "update")}
    rm_chunks = rm_follows_chunks()
    batches = []
    for lo in range(0, args.buffer, args.rollout):
        exp = rollout_batch(drawn[lo : lo + args.rollout])
        count(exp, micro, how, tallies["scoring"], packed)
        if rm_chunks:
            count(exp, micro, how, tallies["rm"], packed)
        else:
            count(exp, None, how, tallies["rm"], False)
        batches.append(exp)
    buffer = Experience.cat(batches, pad_id=0)
    for _ in range(args.epochs):
        perm = torch.randperm(buffer.batch_size, generator=g)
        for lo in range(0, buffer.batch_size, args.minibatch):
            count(buffer.select(perm[lo : lo + args.minibatch]), micro, how, tallies["update"], packed)
    return tallies


def forward_of(model: Any, packed: bool) -> Any:
    """This checkout's ``Forward`` (older ones take the unwrapped policy first; only newer ones pack)."""
    from ppomax.ppo.models import Forward

    first = [model] if "policy_unwrapped" in inspect.signature(Forward).parameters else []
    return Forward(*first, temperature=1.0, **({"pack": True} if packed else {}))


def takes_chunk() -> bool:
    """Whether this checkout's ``Forward.response_logits`` takes the experience chunk (else its padded tensors)."""
    from ppomax.ppo.models import Forward

    return "batch" in inspect.signature(Forward.response_logits).parameters


def load_model(args: argparse.Namespace) -> Any:
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    return AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(torch.device(args.device))


def random_buffer(lengths: list[tuple[int, int]], args: argparse.Namespace, vocab: int) -> tuple[Any, Any]:
    """(the rollout batches, the merged buffer's minibatches) of one iteration (seed 0), random token ids."""
    from ppomax.ppo.experience import Experience

    g = torch.Generator().manual_seed(0)
    drawn = [lengths[i] for i in torch.randperm(len(lengths), generator=g)[: args.buffer].tolist()]
    batches = [rollout_batch(drawn[lo : lo + args.rollout]) for lo in range(0, args.buffer, args.rollout)]
    buffer = Experience.cat(batches, pad_id=0)
    buffer.sequences = torch.randint(10, vocab, buffer.sequences.shape, generator=g) * buffer.attention_mask
    for b in batches:  # the rollout batches' rows of the buffer, in its columns
        b.sequences = torch.randint(10, vocab, b.sequences.shape, generator=g) * b.attention_mask
    perm = torch.randperm(buffer.batch_size, generator=g)
    minibatches = [
        buffer.select(perm[lo : lo + args.minibatch]) for lo in range(0, buffer.batch_size, args.minibatch)
    ]
    return batches, minibatches


class HeadPositions:
    """Counts the positions the model's LM head runs on (rows x width of its input)."""

    def __init__(self, model: Any) -> None:
        self.n = 0
        model.get_output_embeddings().register_forward_hook(self._count)

    def _count(self, _module: Any, inputs: tuple[Any, ...], _output: Any) -> None:
        self.n += inputs[0][..., 0].numel()


def policy_pass(fwd: Any, model: Any, e: Any, device: torch.device, grad: bool) -> None:
    """The policy's forward over ``e``: with ``grad``, a token-mean log-prob loss and its backward (the update),
    else the scoring pass's log-probs and entropy."""
    seqs, mask, rmask = e.sequences.to(device), e.attention_mask.to(device), e.response_mask.to(device)
    with torch.set_grad_enabled(grad):
        if takes_chunk():
            on_device = dataclasses.replace(e, sequences=seqs, attention_mask=mask, response_mask=rmask)
            logits = fwd.response_logits(model, on_device)
        else:
            logits = fwd.response_logits(model, seqs, mask, e.prompt_width)
        lp = fwd.logprobs(logits, seqs[:, e.prompt_width :])
        if grad:
            (-(lp * rmask).sum() / rmask.sum()).backward()
        else:
            fwd.entropy(logits)


def time_update(
    lengths: list[tuple[int, int]], args: argparse.Namespace, micro: int, ways: list[str]
) -> None:
    """Print the real policy's forward+backward time over the micro-batches of ``args.time`` minibatches: for each
    way of forming the chunks, padded, then (where the checkout packs) the last way's chunks packed."""
    device = torch.device(args.device)
    model = load_model(args)
    can_pack = takes_chunk() and packer() is not None
    fwds = {False: forward_of(model, False)}
    if can_pack:
        fwds[True] = forward_of(model, True)
    _, minibatches = random_buffer(lengths, args, model.config.vocab_size)
    head = HeadPositions(model)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    warm = minibatches[0].select(list(range(micro)))
    for packed in fwds:
        policy_pass(fwds[packed], model, warm, device, grad=True)  # warm-up
    runs = [(how, False) for how in ways] + ([(ways[-1], True)] if can_pack else [])
    pack = packer()
    for how, packed in runs:
        sync()
        cpu, wall, positions, head.n = time.process_time(), time.perf_counter(), 0, 0
        for mb in minibatches[: args.time]:
            for rows in chunks(mb, micro, how):
                part = mb.select(rows)
                if packed:
                    out = pack(part.sequences, part.prompt_lens, part.response_lens, part.prompt_width)
                    positions += out.input_ids.numel()
                else:
                    positions += part.attention_mask.numel()
                policy_pass(fwds[packed], model, part, device, grad=True)
        sync()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        name = f"{how}, packed" if packed else how
        print(
            f"time, micro_batch_size {micro}, {name}: CPU {cpu:.1f} s, wall {wall:.1f} s over {positions} positions, "
            f"LM head on {head.n} ({args.time} minibatch(es))"
        )


def measure_chunk(
    lengths: list[tuple[int, int]], args: argparse.Namespace, micro: int, packed: bool, part: str
) -> dict:
    """Peak memory above the loaded model, CPU time and LM head positions of one ``part`` ("scoring" or
    "update") chunk of ``micro`` rows (see the module docstring). Meant for a fresh process."""
    sys.path.insert(0, str(REPO / "bench"))
    from logprob_memory import peak_rss, reset_peak_rss

    device = torch.device(args.device)
    model = load_model(args)
    fwd = forward_of(model, packed)
    batches, minibatches = random_buffer(lengths, args, model.config.vocab_size)
    source = batches[0] if part == "scoring" else minibatches[0]
    how = "grouped" if hasattr(source, "micro_batches") else "consecutive"
    chunk = max(
        (source.select(rows) for rows in chunks(source, micro, how)), key=lambda c: c.attention_mask.numel()
    )
    head = HeadPositions(model)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = reset_peak_rss()
    cpu = time.process_time()
    policy_pass(fwd, model, chunk, device, grad=part == "update")
    if cuda:
        torch.cuda.synchronize()
    cpu = time.process_time() - cpu
    peak = torch.cuda.max_memory_allocated() if cuda else peak_rss()
    return {
        "rows": chunk.batch_size,
        "positions": chunk.attention_mask.numel(),
        "response_tokens": int(chunk.response_lens.sum()),
        "head": head.n,
        "peak_mib": (peak - base) / (1 << 20),
        "cpu_s": cpu,
    }


def memory_table(args: argparse.Namespace, argv: list[str]) -> None:
    """Run :func:`measure_chunk` in fresh processes (with ``--before``'s checkout first) and print the table."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PPOMAX_THREADS": str(args.threads)}
    versions = ([("before", {**env, "PYTHONPATH": args.before})] if args.before else []) + [("this", env)]
    memory = "peak allocated" if args.device.startswith("cuda") else "peak RSS"
    print(
        f"\n| micro_batch_size | pass | layout | checkout | rows x width | LM head positions | {memory} above the model (MiB) | CPU s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for micro in [m for m in args.micro if m]:
        for part in ("scoring", "update"):
            for layout in ("padded", "packed"):
                for name, run_env in versions:
                    cmd = [sys.executable, __file__, *argv, "--one-memory", str(micro), layout, part]
                    done = subprocess.run(cmd, env=run_env, capture_output=True, text=True)
                    if done.returncode != 0:
                        print(
                            f"| {micro} | {part} | {layout} | {name} | failed: {done.stderr.strip().splitlines()[-1:]} |"
                        )
                        continue
                    r = json.loads(done.stdout.splitlines()[-1])
                    if r is None:
                        continue  # a checkout that does not pack
                    print(
                        f"| {micro} | {part} | {layout} | {name} | {r['rows']} x {r['positions'] // r['rows']} | "
                        f"{r['head']} ({r['response_tokens']} response tokens) | {r['peak_mib']:.0f} | "
                        f"{r['cpu_s']:.1f} |",
                        flush=True,
                    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model directory (default: bench/real_model.py's)")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--max-prompt-tokens", type=int, default=256, help="data.max_prompt_tokens")
    ap.add_argument("--max-new-tokens", type=int, default=128, help="generation.max_new_tokens")
    ap.add_argument("--buffer", type=int, default=128, help="ppo.buffer_size")
    ap.add_argument("--rollout", type=int, default=32, help="ppo.rollout_batch_size")
    ap.add_argument("--minibatch", type=int, default=32, help="ppo.minibatch_size")
    ap.add_argument("--epochs", type=int, default=1, help="ppo.ppo_epochs")
    ap.add_argument("--micro", type=int, nargs="+", default=[0, 8, 4], help="ppo.micro_batch_size (0: null)")
    ap.add_argument("--iterations", type=int, default=20, help="iterations averaged (seeds 0..N-1)")
    ap.add_argument(
        "--time", type=int, default=0, help="time the real model on N minibatches (0: count only)"
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--memory", action="store_true", help="peak memory of a scoring chunk and an update micro-batch"
    )
    ap.add_argument("--before", metavar="SRC", help="--memory: also measure the checkout whose src is SRC")
    ap.add_argument("--one-memory", nargs=3, metavar=("MICRO", "LAYOUT", "PASS"), help=argparse.SUPPRESS)
    argv = sys.argv[1:]
    args = ap.parse_args(argv)

    from ppomax.ppo.experience import Experience

    if args.model is None:
        sys.path.insert(0, str(REPO / "bench"))
        from real_model import real_model_dir

        args.model = str(real_model_dir())
    lengths = load_lengths(args.model, args.data, args.max_prompt_tokens, args.max_new_tokens)
    if args.one_memory:
        micro, layout, part = args.one_memory
        packed = layout == "packed"
        if packed and not (takes_chunk() and packer() is not None):
            print(json.dumps(None))
        else:
            print(json.dumps(measure_chunk(lengths, args, int(micro), packed, part)))
        return 0
    prompt = torch.tensor([a for a, _ in lengths], dtype=torch.float)
    response = torch.tensor([b for _, b in lengths], dtype=torch.float)
    print(
        f"{len(lengths)} prompts: prompt tokens mean {prompt.mean():.1f} median {prompt.median():.0f} max "
        f"{prompt.max():.0f}; response tokens mean {response.mean():.1f} median {response.median():.0f}, "
        f"{int((response == args.max_new_tokens).sum())} at the cap of {args.max_new_tokens}"
    )
    ways = ["consecutive"] + (["grouped"] if hasattr(Experience, "micro_batches") else [])
    print(
        f"buffer {args.buffer}, rollout batch {args.rollout}, minibatch {args.minibatch}, {args.epochs} epoch(s), "
        f"{args.iterations} iterations; padding share of the positions computed (forwards per iteration)\n"
    )
    print("| micro_batch_size | pass | " + " | ".join(ways) + " | packed |")
    print("|---|---|" + "---|" * (len(ways) + 1))
    packs = packer() is not None
    heads: dict[int, list[dict[str, dict[str, int]]]] = {}
    for micro in args.micro:
        size = micro or None
        # the chunks ppomax forms (the last way) are the ones it packs
        totals = {
            how: [
                iteration(lengths, args, size, how, seed, packed=packs and how == ways[-1])
                for seed in range(args.iterations)
            ]
            for how in ways
        }
        for part in ("scoring", "rm", "update"):
            cells = []
            for how in ways:
                pos = sum(t[part]["positions"] for t in totals[how])
                real = sum(t[part]["real"] for t in totals[how])
                fwd = totals[how][0][part]["forwards"]
                cells.append(f"{1 - real / pos:.1%} ({fwd})")
            packed = sum(t[part]["packed"] for t in totals[ways[-1]])
            cells.append(f"{1 - real / packed:.1%}" if packed else "-")
            print(f"| {micro or 'null'} | {part} | " + " | ".join(cells) + " |")
        heads[micro] = totals[ways[-1]]
    print(
        f"\nLM head positions per iteration ({ways[-1]} chunks, mean over the iterations): padded R + 1 last "
        "columns | packed: every position | the real response tokens only\n"
    )
    print(
        "| micro_batch_size | pass | padded, R + 1 columns | packed, every position | response tokens only |"
    )
    print("|---|---|---|---|---|")
    for micro, tallies in heads.items():
        for part in ("scoring", "update"):
            n = len(tallies)
            last, packed = (sum(t[part][k] for t in tallies) / n for k in ("head_last_columns", "packed"))
            response = sum(t[part]["head_response"] for t in tallies) / n
            cell = f"{packed:.0f} ({packed / last:.2f}x)" if packed else "-"
            print(
                f"| {micro or 'null'} | {part} | {last:.0f} | {cell} | {response:.0f} ({response / last:.2f}x) |"
            )
    if args.memory:
        memory_table(args, [a for a in argv if a != "--memory"])
    if args.time:
        for micro in args.micro:
            time_update(lengths, args, micro or args.minibatch, ways)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
