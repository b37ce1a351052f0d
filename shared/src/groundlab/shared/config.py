"""Run configs: nested dataclasses read from YAML, with dotted overrides from the command line.

    cfg = load_config(RunConfig, "packages/x/configs/tiny.yaml", {"train.max_steps": 100})

A section of the YAML (a mapping) fills the dataclass field of the same name; its missing keys keep
the field's defaults. Every value is checked against the field's annotation (``int``, ``float``,
``bool``, ``str``, ``X | None``, ``tuple[str, ...]``, ``tuple[int, int]``, ``dict``, nested dataclasses):
a wrong type, an unknown key, a value out of the range a dataclass's ``__post_init__`` allows, or a
YAML syntax error is an error naming the file, the section and the key (or the line). Lists become
tuples; ``1e-4`` (a string to YAML 1.1) is read as the float it means where a float is expected.
"""

from __future__ import annotations

import re
import types
import typing
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


_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?(inf|nan)", re.IGNORECASE)


def _describe(tp) -> str:
    if tp is type(None):
        return "null"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            plural = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}
            return f"a list of {plural.get(args[0], _describe(args[0]))}"
        return f"a list of {len(args)} ({', '.join(_describe(a) for a in args)})"
    if origin is typing.Literal:
        return " or ".join(repr(a) for a in args)
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a mapping",
             list: "a list"}
    return names.get(origin or tp, getattr(tp, "__name__", str(tp)))


def check_value(value, tp, what: str):
    """``value`` checked against the annotation ``tp`` (and converted where YAML is loose: int -> float,
    ``"1e-4"`` -> float, list -> tuple). Raises ``ValueError`` naming ``what``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is typing.Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in args:  # exact types first, so that "auto" stays a str in ``bool | str``
            try:
                return check_value(value, arg, what)
            except ValueError:
                continue
        raise ValueError(f"{what} must be {_describe(tp)}, got {value!r}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise ValueError(f"{what} must be {_describe(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin is tuple or tp is tuple:
        if isinstance(value, (list, tuple)):
            if not args:
                return tuple(value)
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(check_value(v, args[0], f"{what}[{i}]") for i, v in enumerate(value))
            if len(value) == len(args):
                return tuple(check_value(v, a, f"{what}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    elif origin is list or tp is list:
        if isinstance(value, (list, tuple)):
            return [check_value(v, args[0], f"{what}[{i}]") for i, v in enumerate(value)] if args else list(value)
    elif origin is dict or tp is dict:
        if isinstance(value, dict):
            return value
    elif isinstance(tp, type):
        if isinstance(value, tp):
            return value
    else:
        return value  # an annotation this checker does not know: left to the dataclass
    raise ValueError(f"{what} must be {_describe(tp)}, got {value!r}")


def _optional_dataclass(tp):
    """The dataclass ``X`` of an ``X | None`` annotation, else None."""
    if typing.get_origin(tp) not in (typing.Union, types.UnionType):
        return None
    classes = [a for a in typing.get_args(tp) if a is not type(None)]
    return classes[0] if len(classes) == 1 and is_dataclass(classes[0]) else None


def build(cls, raw: dict, where: str):
    """``cls`` from a mapping; fields whose default is a dataclass are built from their section,
    merged over that default. Values are checked against the annotations (:func:`check_value`)."""
    known = {f.name: f for f in fields(cls)}
    unknown = set(raw) - set(known)
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)} for {cls.__name__}; known: {sorted(known)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in raw.items():
        default = _default(known[name])
        if is_dataclass(default):
            if not isinstance(value, dict):
                raise ValueError(f"{where}: '{name}' must be a mapping, got {value!r}")
            kwargs[name] = build(type(default), asdict(default) | value, f"{where}:{name}")
        elif isinstance(value, dict) and (section := _optional_dataclass(hints.get(name))) is not None:
            kwargs[name] = build(section, value, f"{where}:{name}")  # an ``X | None`` section, set here
        else:
            kwargs[name] = check_value(value, hints.get(name, typing.Any), f"{where}: '{name}'")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:  # the dataclass's own range checks
        raise ValueError(f"{where}: {err}") from err


def model_overrides(config_cls, overrides: dict, filled: tuple[str, ...] = ()) -> dict:
    """A run config's ``model.config``: arguments of the package's one model config class
    (``config_cls``, its defaults the paper's) that this run sets otherwise. Each key must be an
    argument of ``config_cls.__init__`` that the recipe does not fill itself (``filled``: the parts
    it takes from the pretrained checkpoints), its value of that argument's annotated type."""
    import inspect

    if not isinstance(overrides, dict):
        raise ValueError(f"'config' must be a mapping of {config_cls.__name__} arguments, got {overrides!r}")
    params = inspect.signature(config_cls.__init__).parameters
    allowed = [n for n, p in params.items() if n != "self" and n not in filled
               and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ValueError(f"'config': unknown {config_cls.__name__} arguments {unknown}; known: {sorted(allowed)}")
    try:
        hints = typing.get_type_hints(config_cls.__init__)
    except (NameError, TypeError):  # an annotation that does not resolve here: left to the class
        hints = {}
    return {k: check_value(v, hints.get(k, typing.Any), f"'config.{k}'") for k, v in overrides.items()}


def load_config(cls, path: str | Path, overrides: dict | None = None):
    """``cls`` from a YAML file and dotted overrides."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err})") from err
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"{where}: invalid YAML: {problem}") from err
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a config is a mapping at the top level")
    return build(cls, apply_overrides(raw, overrides), str(path))


# ----------------------------------------------------------------------------------------------
# range checks for a dataclass's __post_init__ (None means "not set" and passes)


def positive(obj, *names: str) -> None:
    for name in names:
        v = getattr(obj, name)
        if v is not None and not v > 0:
            raise ValueError(f"'{name}' must be > 0, got {v!r}")


def non_negative(obj, *names: str) -> None:
    for name in names:
        v = getattr(obj, name)
        if v is not None and not v >= 0:
            raise ValueError(f"'{name}' must be >= 0, got {v!r}")


def within(obj, name: str, lo: float, hi: float) -> None:
    v = getattr(obj, name)
    if v is not None and not lo <= v <= hi:
        raise ValueError(f"'{name}' must be in [{lo}, {hi}], got {v!r}")


def one_of(obj, name: str, options) -> None:
    v = getattr(obj, name)
    values = tuple(v) if isinstance(v, (tuple, list, dict, set)) else (v,)
    bad = [x for x in values if x not in options]
    if bad:
        raise ValueError(f"'{name}': {', '.join(map(repr, bad))} not among {tuple(options)}")


def parse_overrides(extra: list[str]) -> dict:
    """``["--train.max_steps", "100", ...]`` -> ``{"train.max_steps": 100}`` (values parsed as YAML)."""
    out, it = {}, iter(extra)
    for key in it:
        if not key.startswith("--"):
            raise ValueError(f"unexpected argument {key!r}; overrides look like --train.max_steps 100")
        try:
            value = next(it)
        except StopIteration:
            raise ValueError(f"override {key} has no value") from None
        try:
            out[key[2:]] = yaml.safe_load(value)  # "3" -> 3, "false" -> False, "[a, b]" -> list
        except yaml.YAMLError as err:
            raise ValueError(f"override {key}: {value!r} is not a YAML value ({err})") from err
    return out


def iter_jsonl(path: str | Path, what: str = "JSONL file"):
    """``(line number, record)`` for every non-empty line of a UTF-8 JSONL file (a leading byte-order
    mark is allowed); a missing file, a line that is not UTF-8 or not JSON, or a record that is not a
    JSON object is an error naming the file and the line."""
    import json

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}:{n}: not UTF-8 text ({err.reason} at byte {err.start})") from err
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not JSON ({err})") from err
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object, got {type(record).__name__}")
            yield n, record


def read_json(path: str | Path, what: str = "JSON file"):
    """A whole JSON file (UTF-8, a byte-order mark allowed), with errors naming the file and the line."""
    import json

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from err
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}:{err.colno}: not JSON ({err.msg})") from err


_PRETRAINED_KEYS: frozenset[str] | None = None


def pretrained_config_kwargs(config_cls, kwargs: dict) -> dict:
    """``kwargs`` left over by a ``PretrainedConfig`` subclass's own arguments, checked: each must be
    one of ``PretrainedConfig``'s (``architectures``, ``torch_dtype``, ``transformers_version``, ...),
    not a misspelt argument that ``PretrainedConfig`` would keep as an attribute and nothing would
    read. Call as ``super().__init__(**pretrained_config_kwargs(type(self), kwargs))``."""
    global _PRETRAINED_KEYS
    if _PRETRAINED_KEYS is None:
        from transformers import PretrainedConfig

        base = PretrainedConfig()
        _PRETRAINED_KEYS = frozenset(base.to_dict()) | frozenset(vars(base)) | {
            "transformers_version", "architectures", "name_or_path", "_name_or_path", "torch_dtype", "dtype",
            "attn_implementation", "_attn_implementation", "_attn_implementation_autoset", "_commit_hash",
            "auto_map", "model_type", "use_cache"}
    unknown = sorted(k for k in kwargs if k not in _PRETRAINED_KEYS)
    if unknown:
        import inspect

        own = [n for n in inspect.signature(config_cls.__init__).parameters if n not in ("self", "kwargs")]
        raise TypeError(f"{config_cls.__name__}: unknown arguments {unknown}; its own: {own}")
    return kwargs


class RunConfigFile:
    """What every package's run config (a dataclass) does with its YAML file: ``RunConfig.from_yaml(path,
    overrides)`` (checked field by field, errors naming the file and key) and ``to_dict()`` (what the
    run's ``metrics.json`` records)."""

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict | None = None):
        return load_config(cls, path, overrides)

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)
