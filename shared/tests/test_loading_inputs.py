"""Strict loading, input checks and the one-line CLI errors."""

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from groundlab.shared.bases.vlm import TinyVLMConfig, build_model
from groundlab.shared.cli import cli_main
from groundlab.shared.inputs import (
    check_box,
    check_image_array,
    check_mask,
    check_point,
    check_probability,
    check_text,
    check_xywh,
    parse_numbers,
)
from groundlab.shared.loading import load_partial, load_pretrained, load_state, torch_load
from groundlab.shared.tokenizer import load_tokenizer


@pytest.mark.parametrize("kind", ["llava", "paligemma"])
def test_a_saved_vlm_reloads_strictly_to_the_same_logits(tmp_path, kind):
    from transformers import LlavaForConditionalGeneration, PaliGemmaForConditionalGeneration

    cls = {"llava": LlavaForConditionalGeneration, "paligemma": PaliGemmaForConditionalGeneration}[kind]
    cfg = TinyVLMConfig(kind=kind)
    torch.manual_seed(0)
    model = build_model(cfg, load_tokenizer()).eval()
    ids = torch.full((1, cfg.n_image_tokens + 5), 7)
    ids[0, : cfg.n_image_tokens] = model.config.image_token_index
    inputs = {"input_ids": ids, "pixel_values": torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))}
    if kind == "paligemma":  # prefix (image + prompt) and suffix, as every PaliGemma input here
        inputs["token_type_ids"] = (torch.arange(ids.shape[1]) >= ids.shape[1] - 2).long()[None]
    with torch.no_grad():
        before = model(**inputs).logits
    model.save_pretrained(tmp_path)
    back = load_pretrained(cls, tmp_path).eval()  # SDPA attention now (eager before): the same function
    with torch.no_grad():
        torch.testing.assert_close(back(**inputs).logits, before, atol=1e-5, rtol=1e-5)
    state = load_file(tmp_path / "model.safetensors")
    gone = sorted(state)[3]
    save_file({k: v for k, v in state.items() if k != gone}, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing") as err:
        load_pretrained(cls, tmp_path)
    assert str(tmp_path) in str(err.value)


def test_state_loads_name_what_and_the_keys(tmp_path):
    lin = nn.Linear(3, 2)
    good = {k: torch.ones_like(v) for k, v in lin.state_dict().items()}
    load_state(lin, good, "lin.pt")
    assert torch.equal(lin.weight, torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"lin.pt does not fit Linear: missing bias"):
        load_state(lin, {"weight": good["weight"]}, "lin.pt")
    with pytest.raises(ValueError, match=r"unexpected extra"):
        load_state(lin, good | {"extra": torch.zeros(1)}, "lin.pt")
    with pytest.raises(ValueError, match=r"shape mismatches weight \(3, 2\) vs \(2, 3\)"):
        load_state(lin, good | {"weight": torch.zeros(3, 2)}, "lin.pt")
    load_partial(lin, {"bias": torch.zeros(2)}, required=["bias"], what="head")
    assert torch.equal(lin.bias, torch.zeros(2)) and torch.equal(lin.weight, torch.ones(2, 3))
    with pytest.raises(ValueError, match="missing weight"):
        load_partial(lin, {"bias": torch.zeros(2)}, required=["bias", "weight"], what="head")
    torch.save(good, tmp_path / "ok.pt")
    assert torch_load(tmp_path / "ok.pt").keys() == good.keys()
    (tmp_path / "bad.pt").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="cannot read checkpoint .*bad.pt"):
        torch_load(tmp_path / "bad.pt")
    with pytest.raises(FileNotFoundError, match="none.pt"):
        torch_load(tmp_path / "none.pt")
    torch.save(torch.zeros(2), tmp_path / "tensor.pt")
    with pytest.raises(ValueError, match="holds a Tensor, not a dict"):
        torch_load(tmp_path / "tensor.pt")


def test_coordinates_thresholds_and_prompts_are_checked():
    assert parse_numbers("1, 2.5,3,4", 4, "--region") == [1.0, 2.5, 3.0, 4.0]
    for text, match in (("1,2,3", "needs 4"), ("1,2,x,4", "needs 4"), ("1,nan,3,4", "finite"), ("inf,2,3,4", "finite")):
        with pytest.raises(ValueError, match=match):
            parse_numbers(text, 4, "--region")
    assert check_point((3, 4), 10, 10) == (3.0, 4.0)
    for p in ((-1, 2), (10, 2), (2, 10), (math.nan, 1)):
        with pytest.raises(ValueError, match="point"):
            check_point(p, 10, 10)
    assert check_box((0, 0, 10, 10), 10, 10) == (0, 0, 10, 10)
    for b, match in (((0, 0, -1, -1), "empty"), ((5, 5, 5, 9), "empty"), ((0, 0, 11, 5), "outside"),
                     ((-1, 0, 3, 3), "outside"), ((0, 0, math.inf, 3), "finite")):
        with pytest.raises(ValueError, match=match):
            check_box(b, 10, 10)
    assert check_xywh([1, 2, 3, 4]) == (1, 2, 3, 4)
    for b in ([1, 2, 0, 4], [-1, 2, 3, 4], [1, 2, math.nan, 4], [1, 2, 3]):
        with pytest.raises(ValueError, match="bbox"):
            check_xywh(b)
    assert check_probability(0.5) == 0.5
    for v in (-0.1, 1.5, 7, math.nan):
        with pytest.raises(ValueError, match="threshold"):
            check_probability(v)
    with pytest.raises(ValueError, match="prompt is empty"):
        check_text("   ")
    with pytest.raises(ValueError, match="region 0 is empty"):
        check_mask(np.zeros((4, 4), bool), (4, 4), "region 0")
    with pytest.raises(ValueError, match="shape"):
        check_mask(np.ones((4, 5), bool), (4, 4))
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        check_image_array(np.zeros((4, 4), np.uint8))


def test_cli_main_turns_errors_into_one_line_and_exit_2(capsys, monkeypatch):
    @cli_main
    def main(argv=None):
        kind = argv[0]
        if kind == "value":
            raise ValueError("--point 3,4 lies outside the 2x2 image\nsecond line")
        if kind == "missing":
            raise FileNotFoundError("image not found: x.png")
        if kind == "other":
            raise KeyError("k")
        return "ok"

    assert main(["fine"]) == "ok"
    for kind, line in (("value", "error: --point 3,4 lies outside the 2x2 image"),
                       ("missing", "error: image not found: x.png"), ("other", "error: KeyError: 'k'")):
        with pytest.raises(SystemExit) as exit_info:
            main([kind])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.strip() == line and "Traceback" not in err
    monkeypatch.setenv("GROUNDLAB_DEBUG", "1")
    with pytest.raises(ValueError):
        main(["value"])


def test_package_cli_dispatches_train_to_the_recipe_and_commands_to_their_handlers(tmp_path, monkeypatch):
    import sys
    import types
    from dataclasses import dataclass

    from groundlab.shared.cli import package_cli

    calls = []

    @dataclass
    class RunConfig:
        name: str = "x"
        steps: int = 1

        @classmethod
        def from_yaml(cls, path, overrides=None):
            return cls(**(overrides or {}))

    recipe = types.ModuleType("fake_recipe")
    recipe.RunConfig = RunConfig
    recipe.run = lambda cfg, force=False: calls.append(("run", cfg, force))
    monkeypatch.setitem(sys.modules, "fake_recipe", recipe)

    def add(sub):
        sub.add_parser("hello").add_argument("--who", required=True)

    commands = {"hello": lambda args: calls.append(("hello", args.who))}
    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    package_cli("prog", "fake_recipe", ["train", "--config", str(config), "--force", "--steps", "3"], add, commands)
    package_cli("prog", "fake_recipe", ["hello", "--who", "me"], add, commands)
    assert calls == [("run", RunConfig(steps=3), True), ("hello", "me")]
    with pytest.raises(ValueError, match="unexpected arguments"):
        package_cli("prog", "fake_recipe", ["hello", "--who", "me", "--extra", "1"], add, commands)
