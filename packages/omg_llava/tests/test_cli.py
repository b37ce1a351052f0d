"""Bad input to the CLI: one clear line on stderr, exit status 2, before any model is loaded."""

import numpy as np
import pytest
from PIL import Image

from groundlab.omg_llava import cli


@pytest.fixture
def image(tmp_path, monkeypatch):
    monkeypatch.setenv("GROUNDLAB_RUNS", str(tmp_path / "runs"))  # no trained model anywhere

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr("groundlab.omg_llava.inference.OMGLlavaPipeline.from_pretrained", refuse)
    path = tmp_path / "scene.png"
    Image.fromarray(np.full((64, 48, 3), 200, np.uint8)).save(path)
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return path


@pytest.mark.parametrize("args,message", [
    (["--image", "{dir}/none.png"], "image not found"),
    (["--image", "{dir}/corrupt.png"], "cannot decode image"),
    (["--prompt", "   "], "--prompt is empty"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--region", "0,0,-1,-1", "--prompt", "the <region>"], "is empty: need x0 < x1"),
    (["--region", "0,0,60,10", "--prompt", "the <region>"], "reaches outside the 48x64 image"),
    (["--region", "1,2,3", "--prompt", "the <region>"], "needs 4 comma-separated numbers"),
    (["--point", "nan,3", "--prompt", "the <mark>"], "must be finite"),
    (["--point", "48,3", "--prompt", "the <mark>"], "lies outside the 48x64 image"),
    (["--point=-1,3", "--prompt", "the <mark>"], "lies outside"),
    (["--point", "-1,3", "--prompt", "the <mark>"], "argument --point: expected one argument (see --help)"),
    (["--bogus", "1"], "unexpected arguments"),
    (["--point", "3,3"], "0 <mark> placeholder(s) but 1 --point"),
    (["--prompt", "the <region>"], "1 <region> placeholder(s) but 0 --region"),
    (["--out", "{dir}/no/such/dir/out.png"], "does not exist"),
    ([], "nothing trained under"),
    (["--model", "{dir}/nowhere"], "no saved OMG-LLaVA there"),
])
def test_bad_input_is_one_line_and_exit_2(image, capsys, args, message):
    argv = ["segment", "--image", str(image), "--prompt", "the red circle"]
    argv += [a.replace("{dir}", str(image.parent)) for a in args]
    with pytest.raises(SystemExit) as err:
        cli.main(argv)
    assert err.value.code == 2
    out = capsys.readouterr().err.strip()
    assert out.startswith("error: ") and message in out and "\n" not in out and "Traceback" not in out


def test_bad_config_and_overrides_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage2:\n  lr: fast\n")
    for argv, message in ((["train", "--config", str(bad)], "bad.yaml:stage2: 'lr' must be a number"),
                          (["train", "--config", str(tmp_path / "none.yaml")], "config not found"),
                          (["train", "--config", str(bad), "--stage2.lr"], "has no value")):
        with pytest.raises(SystemExit) as err:
            cli.main(argv)
        assert err.value.code == 2 and message in capsys.readouterr().err


def test_eval_scores_a_predictions_file_without_a_model(image, capsys):
    """``eval --predictions FILE``: a RES predictions file (here the whole-image baseline's) scored
    against the run's held-out samples, as the run scores it; a file of two tasks is refused."""
    import json
    from pathlib import Path

    from groundlab.omg_llava.evaluation import baseline_predictions, score
    from groundlab.omg_llava.train import RunConfig, prepare_data
    from groundlab.shared.recipe import Recipe

    config = Path(cli.__file__).resolve().parents[3] / "configs" / "tiny.yaml"
    small = ["--data.train_scenes", "2", "--data.val_scenes", "4"]
    cfg = RunConfig.from_yaml(config, {"data": {"train_scenes": 2, "val_scenes": 4}})
    samples = prepare_data(Recipe("omg_llava", cfg.name), cfg).eval["res"]
    path = baseline_predictions(samples, "whole", image.parent / "res.jsonl")
    cli.main(["eval", "--config", str(config), *small, "--predictions", str(path)])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("res/")]  # pycocotools prints too
    got = {k: float(v) for k, v in (line.split() for line in lines)}
    want = {f"res/{k}": v for k, v in score("res", path, samples).items()}
    assert got.keys() == want.keys() and 0 < want["res/cIoU"] < 1
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=6e-5), key
    rows = path.read_text().splitlines()
    mixed = image.parent / "mixed.jsonl"
    mixed.write_text("\n".join(rows[:-1] + [json.dumps({**json.loads(rows[-1]), "task": "gcg"})]) + "\n")
    with pytest.raises(SystemExit):
        cli.main(["eval", "--config", str(config), *small, "--predictions", str(mixed)])
    assert "holds one task's predictions" in capsys.readouterr().err


def test_res_same_category_repeat_repeats_exactly_the_samples_whose_kind_is_shared():
    """Stage 2 holds every sample once, and each RES sample whose target shares its kind with another
    object of its image ``N - 1`` more times; the export (and its cache key) does not change."""
    from collections import Counter
    from pathlib import Path

    from groundlab.omg_llava.data import (
        names_only_its_object,
        refer_reader,
        res_expression,
        same_category_refs,
    )
    from groundlab.omg_llava.train import RunConfig, prepare_data
    from groundlab.shared.recipe import Recipe

    config = Path(cli.__file__).resolve().parents[3] / "configs" / "tiny.yaml"
    data = {}
    for n, which in ((1, "all"), (3, "all"), (3, "attribute")):
        cfg = RunConfig.from_yaml(config, {"data": {"train_scenes": 12, "val_scenes": 2, "res_same_category_repeat": n,
                                                    "res_repeat_expressions": which}})
        data[n, which] = prepare_data(Recipe("omg_llava", cfg.name), cfg)
    assert data[1, "all"].root == data[3, "all"].root == data[3, "attribute"].root
    hard = same_category_refs(refer_reader(data[1, "all"].root, **data[1, "all"].refer), "train")
    key = lambda s: (s.task, s.id)  # noqa: E731
    for which in ("all", "attribute"):
        extra = Counter(map(key, data[3, which].stage2))
        extra.subtract(Counter(map(key, data[1, "all"].stage2)))
        want = Counter()
        for s in data[1, "all"].stage2:
            if s.task == "res" and s.id.split("-")[0] in hard and (
                    which == "all" or names_only_its_object(res_expression(s))):
                want[key(s)] += 2
        assert sum(want.values()) > 0 and +extra == want and not -extra  # nothing else added or lost
    # "attribute" leaves out the hard expressions that name another object or a place
    assert 0 < len(data[3, "attribute"].stage2) - len(data[1, "all"].stage2) < len(data[3, "all"].stage2) - len(
        data[1, "all"].stage2)


def test_names_only_its_object_tells_attribute_expressions_from_relations_and_places():
    from pathlib import Path

    from groundlab.omg_llava.data import Sample, names_only_its_object, res_expression
    from groundlab.omg_llava.processing import RES_PROMPT

    assert names_only_its_object("the yellow triangle") and names_only_its_object("the small red square")
    assert not names_only_its_object("the triangle below the red triangle")
    assert not names_only_its_object("the green circle left of the square")
    assert not names_only_its_object("the leftmost circle")
    sample = Sample("1-2", Path("x.jpg"), [{"from": "human", "value": "<image>\n" + RES_PROMPT.format(sent="the big one")},
                                          {"from": "gpt", "value": "It is [SEG]."}], task="res")
    assert res_expression(sample) == "the big one"
    sample.conversation[0]["value"] = "<image>\nWhat is this?"
    with pytest.raises(ValueError, match="RES sample 1-2: prompt 'What is this\\?' is not"):
        res_expression(sample)
