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
