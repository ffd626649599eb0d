"""`ppomax eval`: one policy against a baseline on held-out prompts (win/tie/lose, reward, KL, perplexity, length)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ppomax.commands.common import finite_float
from ppomax.errors import UserError


def parse_judge(spec: str) -> tuple[str, str | None]:
    """``gold`` / ``gold:WORLD_DIR`` / ``reward-model:PATH`` (a directory or a Hub id ``org/name[@revision]``) ->
    (kind, path)."""
    from ppomax.models import parse_hub_id

    kind, _, path = spec.partition(":")
    if kind == "gold":
        return "gold", path or None
    if kind in ("reward-model", "rm"):
        if not path:
            raise UserError(
                "--judge reward-model:PATH needs the reward model (a directory or Hub id) after the colon"
            )
        if not Path(path).is_dir() and (Path(path).exists() or parse_hub_id(path) is None):
            raise UserError(
                f"--judge {spec}: no reward model directory at {path} (nor a Hub id ORG/NAME[@REVISION])"
            )
        return "reward-model", path
    raise UserError(f"--judge {spec!r}: expected 'gold', 'gold:WORLD_DIR' or 'reward-model:PATH'")


def load_judges(specs: list[str], prompts_file: str) -> dict[str, tuple[str, Any]]:
    """The judges of :func:`ppomax.evaluate.evaluate`, keyed by spec. The gold judge is the demo's (hh-mini's
    gold reward): imported only when asked for, since the library itself never imports the demo."""
    judges: dict[str, tuple[str, Any]] = {}
    for spec in specs:
        kind, path = parse_judge(spec)
        if kind == "gold":
            from ppomax.demo.world.reward import find_world_dir, gold_judge

            judges[spec] = ("gold", gold_judge(find_world_dir(prompts_file, path)))
        else:
            judges[spec] = (kind, path)
    return judges


def prompts_source(text: str) -> Any:
    """``--prompts``: a path, glob or Hub dataset id, or (text starting with ``{``) a YAML mapping of load_dataset's
    arguments, e.g. ``{path: Anthropic/hh-rlhf, data_dir: harmless-base, split: test}``."""
    if not text.lstrip().startswith("{"):
        return text
    import yaml
    from pydantic import ValidationError

    from ppomax.config import DatasetArgs

    try:
        return DatasetArgs.model_validate(yaml.safe_load(text))
    except yaml.YAMLError:
        what = "not valid YAML"
    except ValidationError as e:
        first = e.errors()[0]
        what = f"{'.'.join(map(str, first['loc'])) or 'the value'}: {first['msg']}"
    raise UserError(f"--prompts {text!r}: not a mapping of load_dataset's arguments ({what})")


def _run(args: argparse.Namespace) -> int:
    from ppomax.evaluate import EvalSettings, evaluate, format_table, write_json

    settings = EvalSettings(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        greedy=args.greedy,
        max_prompt_tokens=args.max_prompt_tokens,
        batch_size=args.batch_size,
        tie_margin=args.tie_margin,
        seed=args.seed,
        limit=args.limit,
        on_bad_line=args.on_bad_line,
    )
    result = evaluate(
        args.policy,
        args.baseline,
        prompts_source(args.prompts),
        judges=load_judges(args.judge or ["gold"], args.prompts),
        settings=settings,
        tokenizer_dir=args.tokenizer,
        progress=not args.no_progress,
        chat_format=args.chat_format,
    )
    print(f"chat format: {result['chat_format']} ({result['chat_format_reason']})", file=sys.stderr)
    if result["prompts_skipped"]:
        reasons = "; ".join(f"{r} x{n}" for r, n in result["prompts_skip_reasons"].items())
        print(f"prompts: skipped {result['prompts_skipped']} records ({reasons})", file=sys.stderr)
    if args.json == "-":
        json.dump(
            {k: v for k, v in result.items() if k != "samples"} | {"samples": result["samples"]},
            sys.stdout,
            indent=1,
        )
        print()
        return 0
    print(format_table(result, args.policy_name, args.baseline_name))
    if args.json:
        print(f"results: {write_json(result, args.json)}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="policy vs baseline on held-out prompts: win/tie/lose, reward, KL, perplexity, length",
        description="Both models answer the same prompts once (paper 6.1 sampling unless --greedy); a judge "
        "scores the answers. Prints a table; --json FILE also writes every number and every response.",
    )
    p.add_argument(
        "--policy",
        required=True,
        help="the policy: a model directory (e.g. a PPO run's final/policy) or Hub id",
    )
    p.add_argument(
        "--baseline", required=True, help="the baseline: a model directory (e.g. the SFT model) or Hub id"
    )
    p.add_argument(
        "--prompts",
        required=True,
        help="held-out prompts: a file, directory or glob, or a mapping of load_dataset's arguments such as "
        "'{path: Anthropic/hh-rlhf, data_dir: harmless-base, split: test}' (any prompts format of the README's "
        "Data section; a 'subset' field splits the table into helpful / harmless)",
    )
    p.add_argument(
        "--judge",
        action="append",
        metavar="SPEC",
        help="gold (hh-mini's gold reward; the world is found next to --prompts or in $PPOMAX_WORLD), "
        "gold:WORLD_DIR, or reward-model:PATH (a reward model's directory or Hub id ORG/NAME[@REVISION], "
        "ppomax's, TRL's or the Hub's, sharing the policy's tokenizer); repeatable, default gold",
    )
    p.add_argument(
        "--tie-margin",
        type=finite_float,
        default=0.05,
        help="|score difference| <= this is a tie (default 0.05)",
    )
    p.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    p.add_argument(
        "--on-bad-line",
        choices=("fail", "skip"),
        default="fail",
        help="a prompt record ppomax cannot read: stop with its file:line (default) or skip it and count it",
    )
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=None,
        help="prompt budget (default: the policy run's data.max_prompt_tokens, else 256)",
    )
    p.add_argument("--temperature", type=finite_float, default=0.8)
    p.add_argument("--top-p", type=finite_float, default=0.9)
    p.add_argument("--repetition-penalty", type=finite_float, default=1.1)
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory or Hub id (default: the policy's)")
    p.add_argument(
        "--chat-format",
        choices=("auto", "hh", "chat_template"),
        default=None,
        help="how prompts are rendered (default: data.chat_format of the policy's run, read from the "
        "config.yaml at or up to two levels above --policy, as PPO's own evaluation rendered them; without one, "
        "auto: the tokenizer's chat template when it has one, else hh)",
    )
    p.add_argument(
        "--json", default=None, metavar="FILE", help="write the full results as JSON ('-' = stdout only)"
    )
    p.add_argument("--policy-name", default="policy")
    p.add_argument("--baseline-name", default="baseline")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run)
