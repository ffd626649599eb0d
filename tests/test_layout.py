"""The layout rules of README's Layout paragraph, checked on the import graph.

* The library (every module of ``ppomax`` but the demo package and the CLI) never imports ``ppomax.demo``: not
  at the top, not inside a function, not as a side effect of importing something else.
* No module of the package is in an import cycle (hidden inside functions or not).
* The top level of ``ppomax`` holds the library's modules and one demo package: a module of the demo (or of
  one trainer, like the reward model's report) does not sit beside them.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import ppomax

SRC = Path(ppomax.__file__).resolve().parent
DEMO = "ppomax.demo"
# The CLI may import the demo: `ppomax demo` runs it and `ppomax eval --judge gold` uses its gold reward.
NOT_LIBRARY = (DEMO, "ppomax.commands", "ppomax.cli", "ppomax.__main__")


# What README's Layout paragraph names at the top of src/ppomax/ (a new entry here needs a line there).
TOP_LEVEL = {
    "__init__.py",
    "__main__.py",
    "algos",
    "allocator.py",
    "checkpoint.py",
    "cli.py",
    "commands",
    "config",
    "config_compat.py",
    "config_keys.py",
    "configs",
    "console.py",
    "data",
    "demo",
    "errors.py",
    "evaluate",
    "models",
    "monitor.py",
    "optim.py",
    "plan.py",
    "ppo",
    "threads.py",
    "trainers",
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _in(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _imports(name: str, path: Path) -> set[str]:
    """Every module ``path`` imports, wherever the statement is (top level, function, TYPE_CHECKING block):
    ``from a import b`` counts as ``a`` and, when ``b`` is a module, ``a.b``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def test_library_modules_never_import_the_demo():
    modules = _modules()
    bad = {
        name: sorted(m for m in _imports(name, path) if _in(m, (DEMO,)))
        for name, path in modules.items()
        if not _in(name, NOT_LIBRARY)
    }
    assert not {k: v for k, v in bad.items() if v}


def test_importing_the_library_loads_no_demo_module():
    """Each library module imported in a fresh interpreter: no ``ppomax.demo`` module gets loaded."""
    library = sorted(name for name in _modules() if not _in(name, NOT_LIBRARY))
    code = (
        "import importlib, sys\n"
        f"for name in {library!r}:\n"
        "    importlib.import_module(name)\n"
        f"    loaded = [m for m in sys.modules if m == {DEMO!r} or m.startswith({DEMO + '.'!r})]\n"
        "    if loaded:\n"
        "        sys.exit(f'{name} loaded {loaded}')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC.parent), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_no_import_cycle_anywhere():
    """Between any modules of the package, demo included (an ``__init__`` re-exporting its package's names is no
    module of its own here), whether the import is at the top or hidden inside a function."""
    modules = {n: p for n, p in _modules().items() if p.name != "__init__.py"}
    graph = {n: sorted(m for m in _imports(n, p) if m in modules and m != n) for n, p in modules.items()}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycle = [*path[path.index(nxt) :], nxt] if nxt in path else [node, nxt]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])
    assert {"ppomax.demo.world.world", "ppomax.models.loading"} <= set(graph)  # the graph is the real one


def test_the_top_level_holds_the_library_and_one_demo_package():
    """The reward model's report (report_rm.py) sat beside the library modules; it is the RM trainer's
    (trainers/reward_model_report.py), and the demo's modules are in demo/."""
    here = {p.name for p in SRC.iterdir() if p.name != "__pycache__" and (p.suffix == ".py" or p.is_dir())}
    assert here == TOP_LEVEL


def test_nothing_shipped_cites_a_document_outside_the_package():
    """DESIGN.md, the project's original notes, is not in the repository or the wheel: code, presets and help cite
    the paper, the MOSS-RLHF code or the README instead."""
    shipped = [p for p in SRC.rglob("*") if p.suffix in (".py", ".yaml") and "__pycache__" not in p.parts]
    citing = [str(p.relative_to(SRC)) for p in shipped if "DESIGN" in p.read_text(encoding="utf-8")]
    assert not citing, citing
