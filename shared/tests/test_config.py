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
    extra: TrainConfig | None = None


def test_an_optional_section_is_built_when_given_and_checked():
    """An ``X | None`` field with a dataclass X: absent or null -> None; a mapping -> X, with X's own
    checks and unknown keys refused under the section's name."""
    from groundlab.shared.config import build

    assert build(Outer, {}, "c.yaml").extra is None and build(Outer, {"extra": None}, "c.yaml").extra is None
    got = build(Outer, {"extra": {"max_steps": 5, "batch_size": 2, "lr": 1e-3, "grad_clip": 0.0}}, "c.yaml").extra
    assert got == TrainConfig(max_steps=5, batch_size=2, lr=1e-3, grad_clip=0.0)
    with pytest.raises(ValueError, match=r"c.yaml:extra: unknown keys \['steps'\]"):
        build(Outer, {"extra": {"steps": 5}}, "c.yaml")
    with pytest.raises(ValueError, match="c.yaml:extra: .*max_steps"):
        build(Outer, {"extra": {"max_steps": 0, "batch_size": 2, "lr": 1e-3}}, "c.yaml")


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
    with pytest.raises(ValueError, match="no value"):
        parse_overrides(["--train.lr"])
    with pytest.raises(ValueError, match="unexpected argument"):
        parse_overrides(["train.lr", "1"])


def test_values_are_checked_against_the_annotations(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-4\n")  # YAML 1.1 reads 1e-4 as a string; a float field takes it
    assert load_config(Outer, path).train.lr == 1e-4
    for text, match in (("train:\n  max_steps: abc\n", r"c.yaml:train: 'max_steps' must be an integer, got 'abc'"),
                        ("train:\n  lr: fast\n", r"'lr' must be a number, got 'fast'"),
                        ("train:\n  batch_size: -2\n", r"'batch_size' must be > 0, got -2"),
                        ("train:\n  max_steps: 2.5\n", r"'max_steps' must be an integer"),
                        ("train:\n  bf16: maybe\n", r"'bf16' must be true, false or 'auto'"),
                        ("train:\n  lr_scheduler: wobbly\n", r"'wobbly' not among"),
                        ("inner:\n  b: xyz\n", r"'b' must be a list of strings, got 'xyz'"),
                        ("inner:\n  a: true\n", r"'a' must be an integer, got True"),
                        ("sizes: [1, 2, 3]\n", r"'sizes' must be a list of 2"),
                        ("name: [1]\n", r"'name' must be a string")):
        path.write_text(text)
        with pytest.raises(ValueError, match=match):
            load_config(Outer, path)
    path.write_text("train:\n  bf16: auto\n")
    assert load_config(Outer, path).train.bf16 == "auto"


def test_yaml_errors_name_the_file_and_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: run\ninner:\n  a: [1, 2\n")
    with pytest.raises(ValueError, match=r"c.yaml:\d+:\d+: invalid YAML"):
        load_config(Outer, path)
    path.write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(ValueError, match="c.yaml: not UTF-8"):
        load_config(Outer, path)


def test_jsonl_and_json_readers_name_file_and_line(tmp_path):
    from groundlab.shared.config import iter_jsonl, read_json

    path = tmp_path / "a.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\n\n{"a": 2}\n')  # a byte-order mark is fine
    assert [r for _, r in iter_jsonl(path)] == [{"a": 1}, {"a": 2}]
    for data, match in ((b'{"a": 1}\n{"a": \xff}\n', "a.jsonl:2: not UTF-8"), (b'{"a": 1}\n{oops}\n', "a.jsonl:2: not JSON"),
                        (b'{"a": 1}\n[1, 2]\n', "a.jsonl:2: expected a JSON object")):
        path.write_bytes(data)
        with pytest.raises(ValueError, match=match):
            list(iter_jsonl(path))
    j = tmp_path / "a.json"
    j.write_text('{"a": [1,\n 2,,]}')
    with pytest.raises(ValueError, match=r"a.json:2:\d+: not JSON"):
        read_json(j)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        read_json(tmp_path / "nope.json")


def test_pretrained_configs_reject_misspelt_arguments_and_round_trip(tmp_path):
    """A PretrainedConfig keeps any unknown keyword as an attribute; the packages' configs refuse it,
    and still reload from their own config.json (whose keys include PretrainedConfig's)."""
    from transformers import PretrainedConfig

    from groundlab.shared.config import pretrained_config_kwargs

    class Tiny(PretrainedConfig):
        model_type = "groundlab_test_tiny"

        def __init__(self, width: int = 4, **kwargs):
            self.width = width
            super().__init__(**pretrained_config_kwargs(type(self), kwargs))

    with pytest.raises(TypeError, match=r"Tiny: unknown arguments \['widht'\]; its own: \['width'\]"):
        Tiny(widht=8)
    Tiny(width=8, architectures=["X"], torch_dtype="float32").save_pretrained(tmp_path)
    back = Tiny.from_pretrained(tmp_path)
    assert back.width == 8 and back.architectures == ["X"]
