"""Property-based fuzzing of the config parser: ``--set KEY=VALUE`` overrides and YAML files.

Every generated case gives a validated config or a :class:`ConfigError` whose lines name the offending key; never
another exception. A config that validates holds exactly the value that was written (read as YAML), has no
non-finite float and no boolean in a numeric field, and round-trips through the YAML every run saves.

Budgets: a small derandomised one by default; ``PPOMAX_FUZZ=full`` for the big one (see tests/conftest.py).
"""

from __future__ import annotations

import math
import os
from typing import Any, Union, get_args, get_origin

import pytest
import yaml

pytest.importorskip("hypothesis")
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from ppomax.config import CONFIG_CLASSES, load_config, to_yaml
from ppomax.errors import ConfigError

FULL = os.environ.get("PPOMAX_FUZZ", "").lower() == "full"


def budget(ci: int, full: int):
    return settings(max_examples=full if FULL else ci)


def _fields(cls: type[BaseModel], prefix: str = "") -> dict[str, Any]:
    """Dotted key -> annotation, for every leaf field (found from pydantic's resolved annotations)."""
    out: dict[str, Any] = {}
    for name, info in cls.model_fields.items():
        ann = info.annotation
        args = get_args(ann) if get_origin(ann) in (Union, type(int | None)) else (ann,)
        sub = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        if sub and get_origin(ann) is not list:
            out |= _fields(sub[0], f"{prefix}{name}.")
        else:
            out[f"{prefix}{name}"] = ann
    return out


FIELDS = {kind: _fields(cls) for kind, cls in CONFIG_CLASSES.items()}
KEYS = sorted({k for f in FIELDS.values() for k in f})
VALUES = [
    "true",
    "false",
    "yes",
    "off",
    ".inf",
    "-.inf",
    ".nan",
    ".NaN",
    "1e999",
    "-1e999",
    "1.0e+400",
    "null",
    "~",
    "",
    "0",
    "-1",
    "1",
    "3",
    "0.5",
    "1e-3",
    "1.5e+2",
    "0x10",
    "0o7",
    "1_000",
    "'5'",
    '"2.5"',
    "[1, 2]",
    "[]",
    "{}",
    "{a: 1}",
    "&a [*a]",
    "!!python/object/apply:os.system ['true']",
    "!!binary aGk=",
    '"\\ud800"',
    "2020-01-01",
    "12:30:00",
    "k1",
    "cosine",
    "hh",
    "[{function: 'm:f', weight: .inf}]",
    "[{function: 'm:f', weight: true}]",
    "[{function: 'm:f', name: 'a b'}]",
    "- a\n- b",
    "a: [",
    "'unterminated",
    "\t",
    "10000000000000000000000000000000000000",
]
VALUE = st.one_of(st.sampled_from(VALUES), st.text(max_size=12))
KEY = st.one_of(
    st.sampled_from(KEYS),
    st.sampled_from(KEYS).map(lambda k: k.upper()),
    st.sampled_from(KEYS).map(lambda k: k + ".x"),
    st.sampled_from(KEYS).map(lambda k: k.rsplit(".", 1)[0]),
    st.text(st.sampled_from("ab._= \n"), max_size=6),
)
OVERRIDE = st.builds(lambda k, v, sep: f"{k}{sep}{v}", KEY, VALUE, st.sampled_from(["=", "=", " = ", ":"]))


def _get(cfg: BaseModel, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, BaseModel):  # an optional section that is off (model.lora), or a source given
            return None  # as a plain string where it may also be a section (data.prompts)
        node = getattr(node, part)
    return node


def _check_values(cfg: BaseModel, kind: str) -> None:
    """No non-finite float anywhere in a validated config, and no bool where a number is asked for."""
    for key, ann in FIELDS[kind].items():
        value = _get(cfg, key)
        types = get_args(ann) or (ann,)
        if (int in types or float in types) and bool not in types:
            assert not isinstance(value, bool), (key, value)
        if isinstance(value, float):
            assert math.isfinite(value), (key, value)
    for f in getattr(getattr(cfg, "reward", None), "functions", []):
        assert math.isfinite(f.weight) and not isinstance(f.weight, bool), f


def _check_error(err: ConfigError, keys: list[str]) -> None:
    """Every line of a config error names a key (or says which --set / file it is about)."""
    lines = str(err).splitlines()
    assert lines and lines[0].strip(), str(err)
    for line in lines[1:]:
        assert line.startswith("  ") and ":" in line, str(err)
    assert "Traceback" not in str(err)
    if (
        len(lines) > 1 and keys
    ):  # a validation error: its lines name keys that were set (or a conflicting one)
        named = [ln.strip().split(":", 1)[0] for ln in lines[1:]]
        assert all(n for n in named), str(err)


@pytest.mark.parametrize("kind", ["sft", "rm", "ppo"])
def test_fuzz_set_overrides(kind, fuzz_cases):
    @budget(ci=100, full=2500)
    @given(st.lists(OVERRIDE, min_size=1, max_size=3), st.sampled_from([None, "ppo_max", "vanilla"]))
    def run(overrides, preset):
        fuzz_cases[f"--set {kind}"] += 1
        try:
            cfg = load_config(kind, preset=preset if kind == "ppo" else None, overrides=overrides)
        except ConfigError as e:
            _check_error(e, [o.split("=", 1)[0] for o in overrides])
            return
        _check_values(cfg, kind)
        # each key set once (and no section around it set too) holds the value written, read as YAML
        keys = [".".join(p for p in o.partition("=")[0].strip().split(".") if p) for o in overrides]
        for key, text in zip(keys, overrides, strict=True):
            others = [k for k in keys if k != key and (k.startswith(key + ".") or key.startswith(k + "."))]
            if key not in FIELDS[kind] or keys.count(key) > 1 or others:
                continue
            raw = text.partition("=")[2]
            want, got = (yaml.safe_load(raw) if raw.strip() else ""), _get(cfg, key)
            if isinstance(want, bool):
                assert got is want, (key, raw, got)
            elif isinstance(got, bool):  # pydantic reads 0/1 and words such as 'on' as booleans: not a number
                assert want in (0, 1) or isinstance(want, str), (key, raw, got)
                assert want == got or isinstance(want, str), (key, raw, got)
            elif isinstance(got, float) and isinstance(want, int | float):
                assert got == float(want), (key, raw, got)  # an int given for a float: the nearest float
            elif isinstance(got, int | float) and isinstance(want, str):
                assert got == float(want), (key, raw, got)  # a number written as a string, e.g. '5'
            elif isinstance(got, int | str):
                assert got == want, (key, raw, got)
        assert type(cfg).model_validate(yaml.safe_load(to_yaml(cfg))) == cfg

    run()


@pytest.mark.parametrize("kind", ["sft", "ppo"])
def test_fuzz_yaml_files(kind, tmp_path_factory, fuzz_cases):
    """A config file: mappings of known and unknown keys with any YAML values, or any text at all."""
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    scalar = st.sampled_from(VALUES).map(lambda v: yaml.safe_load(v) if _parses(v) else v)
    sections = st.dictionaries(
        st.sampled_from([*sorted({k.split(".")[0] for k in KEYS}), "nope"]),
        st.dictionaries(st.sampled_from(sorted({k.split(".")[-1] for k in KEYS})), scalar, max_size=3)
        | scalar,
        max_size=3,
    )

    @budget(ci=40, full=1000)
    @given(sections.map(lambda d: yaml.safe_dump(d, allow_unicode=True)) | st.text(max_size=40))
    def run(text):
        fuzz_cases[f"yaml file {kind}"] += 1
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        try:
            cfg = load_config(kind, path=path)
        except ConfigError as e:
            _check_error(e, [])
            return
        _check_values(cfg, kind)

    run()


def _parses(v: str) -> bool:
    try:
        yaml.safe_load(v)
    except yaml.YAMLError:
        return False
    return True
