from dataclasses import dataclass, field

import pytest

from groundlab.shared.config import apply_overrides, load_config, parse_overrides
from groundlab.shared.training import TrainConfig


@dataclass
class Inner:
    a: int = 1
    b: tuple[str, ...] = ("x",)


@dataclass
class Outer:
    name: str = "n"
    inner: Inner = field(default_factory=Inner)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=10, batch_size=2, lr=1e-3))
    sizes: tuple[int, int] = (1, 2)


def test_sections_merge_over_defaults_and_overrides_apply(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: run\ninner:\n  b: [p, q]\ntrain:\n  lr: 0.5\nsizes: [3, 4]\n")
    cfg = load_config(Outer, path, {"train.max_steps": 7, "inner.a": 5})
    assert cfg.name == "run" and cfg.inner == Inner(a=5, b=("p", "q")) and cfg.sizes == (3, 4)
    assert (cfg.train.max_steps, cfg.train.batch_size, cfg.train.lr) == (7, 2, 0.5)
    assert load_config(Outer, path).inner.a == 1


def test_errors_name_the_file_and_section(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("inner:\n  c: 3\n")
    with pytest.raises(ValueError, match=r"c.yaml:inner: unknown keys \['c'\]"):
        load_config(Outer, path)
    path.write_text("inner: 3\n")
    with pytest.raises(ValueError, match="'inner' must be a mapping"):
        load_config(Outer, path)
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(Outer, tmp_path / "nope.yaml")
    with pytest.raises(ValueError, match="not a section"):
        apply_overrides({"name": "x"}, {"name.sub": 1})


def test_cli_overrides_parse_as_yaml():
    assert parse_overrides(["--train.max_steps", "3", "--arms", "[a, b]", "--x", "false"]) == {
        "train.max_steps": 3, "arms": ["a", "b"], "x": False}
    with pytest.raises(SystemExit, match="no value"):
        parse_overrides(["--train.lr"])
    with pytest.raises(SystemExit, match="unexpected argument"):
        parse_overrides(["train.lr", "1"])
