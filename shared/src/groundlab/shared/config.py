"""Run configs: nested dataclasses read from YAML, with dotted overrides from the command line.

    cfg = load_config(RunConfig, "packages/x/configs/tiny.yaml", {"train.max_steps": 100})

A section of the YAML (a mapping) fills the dataclass field of the same name; its missing keys keep
the field's defaults. Unknown keys are an error naming the file and the section. Lists become tuples.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, fields, is_dataclass
from pathlib import Path

import yaml


def apply_overrides(raw: dict, overrides: dict | None) -> dict:
    """Set ``{"a.b": value}`` overrides into a nested mapping (in place; returned for convenience)."""
    for key, value in (overrides or {}).items():
        node = raw
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {key}: {p} is not a section")
        node[leaf] = value
    return raw


def _default(f):
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def build(cls, raw: dict, where: str):
    """``cls`` from a mapping; fields whose default is a dataclass are built from their section,
    merged over that default."""
    known = {f.name: f for f in fields(cls)}
    unknown = set(raw) - set(known)
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)} for {cls.__name__}; known: {sorted(known)}")
    kwargs = {}
    for name, value in raw.items():
        default = _default(known[name])
        if is_dataclass(default):
            if not isinstance(value, dict):
                raise ValueError(f"{where}: '{name}' must be a mapping, got {value!r}")
            kwargs[name] = build(type(default), asdict(default) | value, f"{where}:{name}")
        else:
            kwargs[name] = tuple(value) if isinstance(value, list) else value
    return cls(**kwargs)


def load_config(cls, path: str | Path, overrides: dict | None = None):
    """``cls`` from a YAML file and dotted overrides."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config not found: {path}")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a config is a mapping at the top level")
    return build(cls, apply_overrides(raw, overrides), str(path))


def parse_overrides(extra: list[str]) -> dict:
    """``["--train.max_steps", "100", ...]`` -> ``{"train.max_steps": 100}`` (values parsed as YAML)."""
    out, it = {}, iter(extra)
    for key in it:
        if not key.startswith("--"):
            raise SystemExit(f"unexpected argument {key!r}; overrides look like --train.max_steps 100")
        try:
            value = next(it)
        except StopIteration:
            raise SystemExit(f"override {key} has no value") from None
        out[key[2:]] = yaml.safe_load(value)  # "3" -> 3, "false" -> False, "[a, b]" -> list
    return out


def add_run_commands(subparsers) -> None:
    """The ``train`` and ``eval`` sub-commands every package CLI has: ``--config`` and ``--force``."""
    for name in ("train", "eval"):
        p = subparsers.add_parser(name, help=f"{name} the run a config describes (finished stages are reused)")
        p.add_argument("--config", required=True, type=Path)
        p.add_argument("--force", action="store_true", help="recompute every stage")


def iter_jsonl(path: str | Path, what: str = "JSONL file"):
    """``(line number, record)`` for every non-empty line of a JSONL file; a missing file or a line that
    is not JSON is an error naming the file (and the line)."""
    import json

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not JSON ({err})") from err
