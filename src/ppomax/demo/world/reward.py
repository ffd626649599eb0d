"""The gold reward as a programmatic PPO reward function (``ppomax.demo.world.reward:gold``) and as the
``ppomax eval --judge gold`` judge (:func:`gold_judge`, :func:`find_world_dir`).

It finds the world in this order: ``world=`` (a directory written by :func:`~.corpora.write_world` or its
``world.json``), ``seed=`` (the default ``WorldConfig`` with that seed), env ``PPOMAX_WORLD`` (directory), env
``PPOMAX_WORLD_SEED``, else the default ``WorldConfig()``. Worlds are built once per process and cached.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

from ppomax.errors import UserError

from .world import World, WorldConfig, build_world, load_world

SPEC = "ppomax.demo.world.reward:gold"


@lru_cache(maxsize=8)
def _world_from_dir(path: str, mtime: float) -> World:
    return load_world(path)


@lru_cache(maxsize=8)
def _world_from_seed(seed: int) -> World:
    return build_world(WorldConfig(seed=seed))


def resolve_world(world: str | os.PathLike | None = None, seed: int | None = None) -> World:
    """The world the gold reward reads (lookup order in the module docstring)."""
    if world is None and seed is None:
        world = os.environ.get("PPOMAX_WORLD") or None
        env_seed = os.environ.get("PPOMAX_WORLD_SEED")
        if world is None and env_seed:
            try:
                seed = int(env_seed)
            except ValueError:
                raise ValueError(f"PPOMAX_WORLD_SEED must be an integer, got {env_seed!r}") from None
    if world is not None:
        path = Path(world)
        if path.is_dir():
            path = path / "world.json"
        if not path.is_file():
            raise FileNotFoundError(f"no hh-mini world at {world}: expected a directory with world.json")
        return _world_from_dir(str(path.resolve()), path.stat().st_mtime)
    return _world_from_seed(0 if seed is None else int(seed))


def gold(
    prompts: list[str],
    responses: list[str],
    world: str | None = None,
    seed: int | None = None,
    prompt_ids: Any = None,
    response_ids: Any = None,
    **unknown: Any,
) -> list[float]:
    """Programmatic PPO reward ``ppomax.demo.world.reward:gold``: the gold reward of each (prompt, response).

    Config: ``reward.functions: [{function: "ppomax.demo.world.reward:gold", kwargs: {world: runs/demo/world}}]``.
    ``prompt_ids`` / ``response_ids`` (passed by the PPO trainer to every reward function) are ignored: the
    gold reward reads text only.
    """
    if unknown:
        raise TypeError(f"{SPEC} got unknown kwargs {sorted(unknown)}; accepted: world, seed")
    return resolve_world(world, seed).gold_reward(prompts, responses)


def find_world_dir(prompts_file: str | os.PathLike[str] | None, explicit: str | None = None) -> str:
    """The hh-mini world behind ``--judge gold``: ``explicit``, else the prompts file's directory when it holds
    ``world.json``, else ``$PPOMAX_WORLD``."""
    if explicit:
        return explicit
    if prompts_file is not None and (Path(prompts_file).parent / "world.json").is_file():
        return str(Path(prompts_file).parent)
    env = os.environ.get("PPOMAX_WORLD")
    if env:
        return env
    raise UserError(
        "--judge gold needs the hh-mini world: put the prompts file next to its world.json, "
        "write --judge gold:WORLD_DIR, or set PPOMAX_WORLD"
    )


def gold_judge(world_dir: str) -> Callable[[list[str], list[str]], list[float]]:
    """The gold judge of :func:`ppomax.evaluate.evaluate_models` (kind ``gold``): the gold reward of each
    (prompt, response) in the world at ``world_dir``."""

    def score(prompts: list[str], responses: list[str]) -> list[float]:
        return gold(prompts, responses, world=world_dir)

    return score
