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
    (["ablate", "--config", "{d}/none.yaml"], "--config {d}/none.yaml: no such file"),
    (["ablate", "--config", "{d}/none.yaml", "--seeds", "0", "1", "--unknown"], "override --unknown has no value"),
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
    assert out.startswith("error: ") and message.replace("{d}", str(files)) in out and "\n" not in out


def test_ablate_offers_the_recipes_arms():
    from groundlab.tldr.train import ABLATION_ARMS

    assert set(cli.ABLATE[1]) == {*ABLATION_ARMS, "naive"}


def test_eval_scores_a_predictions_file_without_a_model(files, capsys):
    """``eval --predictions FILE``: TLDR's token predictions and the naive RM's response predictions are
    scored from the file alone; a record of neither shape is refused naming it."""
    import json
    from pathlib import Path

    from groundlab.tldr.evaluation import score_naive, score_tldr

    config = Path(cli.__file__).resolve().parents[3] / "configs" / "tiny.yaml"
    tokens = ["a", " red", " circle", ".", " it", " is", " big", "."]
    records = [{"id": "r0", "taxonomy": "visual_attribute", "task": "caption", "tokens": tokens,
                "labels": [1, 0, 1, 1, 1, 1, 1, 1], "probs": [0.9, 0.2, 0.6, 0.8, 0.7, 0.9, 0.4, 0.9]},
               {"id": "r1", "taxonomy": "none", "task": "caption", "tokens": tokens,
                "labels": [1] * 8, "probs": [0.8] * 7 + [0.3]}]

    def printed(rows, name) -> dict[str, float]:
        path = files / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        cli.main(["eval", "--config", str(config), "--predictions", str(path)])
        return {k: float(v) for k, v in (line.split() for line in capsys.readouterr().out.splitlines())}

    for got, want in ((printed(records, "tldr.jsonl"), score_tldr(records)),
                      (printed([{**r, "probs": r["probs"][-1:]} for r in records], "naive.jsonl"),
                       score_naive([{**r, "probs": r["probs"][-1:]} for r in records]))):
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert got[key] == pytest.approx(value, abs=6e-5), key
    with pytest.raises(SystemExit):
        printed([records[0], {**records[1], "probs": [0.5, 0.5]}], "bad.jsonl")
    assert "record r1 has neither one probability per token nor one per response" in capsys.readouterr().err
