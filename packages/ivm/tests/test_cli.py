"""Bad input to ``groundlab-ivm mask``: one clear line, exit 2, before any base is trained or model built."""

import numpy as np
import pytest
from PIL import Image

from groundlab.ivm import cli


@pytest.fixture
def image(tmp_path, monkeypatch):
    monkeypatch.setenv("GROUNDLAB_RUNS", str(tmp_path / "runs"))

    def refuse(*args, **kwargs):
        raise AssertionError("a base was built or a model loaded before the input was checked")

    monkeypatch.setattr("groundlab.shared.bases.ensure_base", refuse)
    monkeypatch.setattr("groundlab.ivm.train.build_from_bases", refuse)
    path = tmp_path / "scene.png"
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(path)
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (tmp_path / "ivm.pth").write_bytes(b"x")
    return path


@pytest.mark.parametrize("args,message", [
    (["--image", "{dir}/none.png"], "image not found"),
    (["--image", "{dir}/corrupt.jpg"], "cannot decode image"),
    (["--threshold", "7"], "--threshold must be in [0, 1], got 7.0"),
    (["--threshold", "nan"], "--threshold must be finite"),
    (["--threshold=-0.5"], "--threshold must be in [0, 1]"),
    (["--instruction", " "], "--instruction is empty"),
    (["--mode", "sepia"], "invalid choice: 'sepia'"),
    (["--arm", "mixed_magic"], "invalid choice: 'mixed_magic'"),
    (["--out", "{dir}/missing/out.png"], "does not exist"),
    ([], "nothing trained under"),
    (["--checkpoint", "{dir}/none.pth"], "--checkpoint not found"),
    (["--checkpoint", "{dir}/ivm.pth", "--llava", "{dir}/no_llava"], "--llava"),
])
def test_bad_input_is_one_line_and_exit_2(image, capsys, args, message):
    argv = ["mask", "--image", str(image), "--instruction", "the red circle"]
    argv += [a.replace("{dir}", str(image.parent)) for a in args]
    with pytest.raises(SystemExit) as err:
        cli.main(argv)
    assert err.value.code == 2
    out = capsys.readouterr().err.strip()
    assert out.startswith("error: ") and message in out and "\n" not in out


def test_eval_scores_a_predictions_file_without_a_model(image, capsys):
    """``eval --predictions FILE``: perfect heatmaps score 1, the every-object heatmaps score what the
    run's baseline does; a file that misses a sample is refused naming it."""
    from pathlib import Path

    from groundlab.ivm.evaluation import all_objects_baseline, read_heatmaps, write_heatmaps
    from groundlab.ivm.train import RunConfig, eval_samples

    config = Path(cli.__file__).resolve().parents[3] / "configs" / "tiny.yaml"
    samples = eval_samples(RunConfig.from_yaml(config, {"data": {"eval_scenes": 6}}))
    argv = ["eval", "--config", str(config), "--data.eval_scenes", "6", "--predictions"]
    def printed(path) -> dict[str, float]:
        cli.main(argv + [str(path)])
        return {k: float(v) for k, v in (line.split() for line in capsys.readouterr().out.splitlines())}

    perfect = write_heatmaps([s.mask.astype(np.float32) for s in samples], samples, image.parent / "predictions_perfect.jsonl")
    scores = printed(perfect)
    assert scores["perfect/mIoU"] == scores["perfect/pixel_AP"] == scores["perfect/rec_acc"] == 1.0
    union = write_heatmaps([s.all_objects.astype(np.float32) for s in samples], samples, image.parent / "union.jsonl")
    scores = printed(union)
    want = all_objects_baseline(samples, name="union")
    assert scores.keys() == want.keys() and want["union/mIoU"] < 0.9
    for key, value in want.items():
        assert scores[key] == pytest.approx(value, abs=6e-5), key  # printed to 4 decimals
    assert [h.shape for h in read_heatmaps(union, samples)] == [s.mask.shape for s in samples]
    short = write_heatmaps([s.mask.astype(np.float32) for s in samples[:-1]], samples[:-1], image.parent / "short.jsonl")
    with pytest.raises(SystemExit):
        cli.main(argv + [str(short)])
    assert f"1 sample(s) without a prediction ['{samples[-1].id}']" in capsys.readouterr().err
