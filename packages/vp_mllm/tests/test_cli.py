"""``groundlab-vp-mllm``: bad input is one clear line and exit 2 before any model loads; ``eval
--predictions`` scores a file alone; the whole run end to end on a micro config, then ``ask``."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from groundlab.vp_mllm import cli, inference

CONFIG = Path(cli.__file__).resolve().parents[3] / "configs" / "tiny.yaml"


@pytest.fixture
def files(tmp_path, monkeypatch):
    monkeypatch.setenv("GROUNDLAB_RUNS", str(tmp_path / "runs"))

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(inference.VPAssistant, "load", refuse)
    Image.fromarray(np.full((64, 48, 3), 200, np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((64, 48, 3), np.uint8)).save(tmp_path / "empty_mask.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG broken")
    return tmp_path


@pytest.mark.parametrize("args,message", [
    (["ask", "--image", "{d}/none.png", "--box", "1,1,5,5", "What is <Region 1>?"], "image not found"),
    (["ask", "--image", "{d}/corrupt.png", "--box", "1,1,5,5", "What is <Region 1>?"], "cannot decode image"),
    (["ask", "--image", "{d}/a.png", "--box", "1,1,5,5", "  "], "question is empty"),
    (["ask", "--image", "{d}/a.png", "What is <Region 1>?"], "no visual prompt"),
    (["ask", "--image", "{d}/a.png", "--box", "1,1,5", "What is <Region 1>?"], "--box 1,1,5"),
    (["ask", "--image", "{d}/a.png", "--box", "1,1,60,5", "What is <Region 1>?"], "box 1"),
    (["ask", "--image", "{d}/a.png", "--point", "3,3", "--box", "1,1,5,5", "What?"], "cannot be mixed"),
    (["ask", "--image", "{d}/a.png", "--box", "1,1,5,5", "What is <Region 2>?"], "<Region 2> refers to a prompt"),
    (["ask", "--image", "{d}/a.png", "--point", "3,3", "What is <Region 1>?"], "names a box"),
    (["ask", "--image", "{d}/a.png", "--mask", "{d}/empty_mask.png", "Describe <Region 1>."], "mask 1 is empty"),
    (["ask", "--image", "{d}/a.png", "--scribble", "3,3", "Describe <Region 1>."], "at least two"),
    (["ask", "--image", "{d}/a.png", "--box", "1,1,5,5", "--marks", "{d}/no/x.png", "What?"], "does not exist"),
    (["ask", "--image", "{d}/a.png", "--box", "1,1,5,5", "--model", "{d}", "What is <Region 1>?"], "the model was loaded"),
    (["convert", "--shards", "{d}", "--out", "{d}/c.pth"], "consolidated.00-of-02.model.pth"),
])
def test_bad_input_is_one_line_and_exit_2(files, capsys, args, message):
    with pytest.raises(SystemExit) as err:  # (the last case passes every check: loading is what comes next)
        cli.main([a.replace("{d}", str(files)) for a in args])
    assert err.value.code == 2
    out = capsys.readouterr().err.strip()
    assert out.startswith("error: ") and message in out and "\n" not in out


def test_eval_scores_a_predictions_file_without_a_model(tmp_path, capsys):
    path = tmp_path / "p.jsonl"
    rows = [{"id": "1", "task": "labels", "kind": "box", "question": "q", "answer": "<Region 1>: red circle\n"
             "<Region 2>: blue square", "prediction": "<Region 1>: red circle\n<Region 2>: red square"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cli.main(["eval", "--config", str(CONFIG), "--predictions", str(path)])
    out = capsys.readouterr().out
    assert re.search(r"box/labels/accuracy +0.5000", out) and re.search(r"box/labels/semantic_iou +0.6667", out)


@pytest.mark.slow
def test_pipeline_end_to_end_on_a_micro_config_then_ask(tmp_path, monkeypatch, capsys):
    """Every stage on a few scenes and steps (tiny bases built in seconds), the table printed, a second
    run reusing every stage; then ``ask`` answers with the trained model and paints the marks."""
    from groundlab.shared.bases import ensure_base, smoke_spec
    from groundlab.shared.world import World, WorldConfig

    monkeypatch.setenv("GROUNDLAB_RUNS", str(tmp_path / "runs"))
    llava, sam = ensure_base(smoke_spec("llava")), ensure_base(smoke_spec("sam"))
    args = ["train", "--config", str(CONFIG), "--model.llava", str(llava), "--model.sam", str(sam),
            "--data.train_scenes", "8", "--data.eval_scenes", "2", "--stage1.max_steps", "3", "--stage2.max_steps",
            "3", "--stage1.batch_size", "4", "--stage2.batch_size", "4", "--eval.max_new_tokens", "6",
            "--stage2.compile_layers", "false"]  # compiling 3 steps would cost more than they take
    cli.main(args)
    path = tmp_path / "runs" / "vp_mllm" / "tiny" / "metrics.json"
    m = json.loads(path.read_text())
    for tag in ("vp", "no_prompts", "untrained", "baseline/majority"):
        for kind in ("box", "point"):
            assert 0 <= m[f"{tag}/{kind}/labels/accuracy"] <= 1
    assert m["vp/box/labels/regions"] == m["baseline/majority/box/labels/regions"] > 0
    assert m["start/alignment/r2/box"] > 0.5 and m["start/alignment/r2/point"] > 0.5  # vp_proj read the loc rows
    assert "| VP-LLaVA (stage 1 + 2) | box |" in capsys.readouterr().out
    cli.main(args)
    again = json.loads(path.read_text())
    assert not any(k.startswith("time/") and k != "time/total_s" for k in again)  # every stage reused
    scene = World(WorldConfig(min_objects=2, max_objects=4), seed=0).scene("test", 0)
    Image.fromarray(scene.image).save(tmp_path / "scene.png")
    x, y, w, h = scene.objects[0].bbox
    capsys.readouterr()
    cli.main(["ask", "--image", str(tmp_path / "scene.png"), "--box", f"{x},{y},{x + w},{y + h}",
              "--box", "0,0,10,10", "What is <Region 1>?"])
    answer = capsys.readouterr().out.strip()
    assert answer and "<unk>" not in answer
    marks = Image.open(tmp_path / "scene_marks.png")
    assert marks.size == (512, 512)
