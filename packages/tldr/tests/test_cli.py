"""Bad input to ``groundlab-tldr score`` / ``score-jsonl``: one clear line, exit 2, before the model loads."""

import numpy as np
import pytest
from PIL import Image

from groundlab.tldr import cli


@pytest.fixture
def files(tmp_path, monkeypatch):
    monkeypatch.setenv("GROUNDLAB_RUNS", str(tmp_path / "runs"))

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(cli, "_load", refuse)
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG broken")
    return tmp_path


@pytest.mark.parametrize("args,message", [
    (["score", "--image", "{d}/none.png", "--text", "a red circle."], "image not found"),
    (["score", "--image", "{d}/corrupt.png", "--text", "a red circle."], "cannot decode image"),
    (["score", "--image", "{d}/a.png", "--text", "  "], "--text is empty"),
    (["score", "--image", "{d}/a.png", "--text", "a red circle.", "--html", "{d}/x/y.html"], "does not exist"),
    (["score", "--image", "{d}/a.png", "--text", "a red circle."], "nothing trained under"),
    (["score", "--image", "{d}/a.png", "--text", "a red circle.", "--model", "{d}"], "model.json missing"),
    (["score-jsonl", "--input", "{d}/none.jsonl", "--image-root", "{d}", "--out", "{d}/o.jsonl"], "--input not found"),
    (["score-jsonl", "--input", "{d}/bad.jsonl", "--image-root", "{d}", "--out", "{d}/o.jsonl"], "bad.jsonl:2: not JSON"),
    (["score-jsonl", "--input", "{d}/latin.jsonl", "--image-root", "{d}", "--out", "{d}/o.jsonl"], "latin.jsonl:1: not UTF-8"),
    (["score-jsonl", "--input", "{d}/keys.jsonl", "--image-root", "{d}", "--out", "{d}/o.jsonl"], "keys.jsonl:1: missing keys ['response']"),
    (["score-jsonl", "--input", "{d}/img.jsonl", "--image-root", "{d}", "--out", "{d}/o.jsonl"], "image not found"),
    (["score-jsonl", "--input", "{d}/ok.jsonl", "--image-root", "{d}/nowhere", "--out", "{d}/o.jsonl"], "is not a directory"),
])
def test_bad_input_is_one_line_and_exit_2(files, capsys, args, message):
    good = '{"image": "a.png", "prompt": "caption en", "response": "a red circle."}\n'
    (files / "bad.jsonl").write_text(good + "{oops\n")
    (files / "latin.jsonl").write_bytes(b'{"image": "a.png", "prompt": "caption en", "response": "caf\xe9"}\n')
    (files / "keys.jsonl").write_text('{"image": "a.png", "prompt": "caption en"}\n')
    (files / "img.jsonl").write_text('{"image": "b.png", "prompt": "caption en", "response": "x"}\n')
    (files / "ok.jsonl").write_text("\ufeff" + good)
    with pytest.raises(SystemExit) as err:
        cli.main([a.replace("{d}", str(files)) for a in args])
    assert err.value.code == 2
    out = capsys.readouterr().err.strip()
    assert out.startswith("error: ") and message in out and "\n" not in out
