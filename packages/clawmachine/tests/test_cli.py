"""``groundlab-clawmachine``: bad input is one clear line and exit 2 before any model loads; ``eval
--predictions`` scores a file alone; the whole run end to end on a micro config, then ``ground`` and
``refer``."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from groundlab.clawmachine import cli, inference

CONFIG = Path(cli.__file__).resolve().parents[3] / "configs" / "tiny.yaml"


@pytest.fixture
def files(tmp_path, monkeypatch):
    monkeypatch.setenv("GROUNDLAB_RUNS", str(tmp_path / "runs"))

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(inference.ClawAssistant, "load", refuse)
    Image.fromarray(np.full((64, 48, 3), 200, np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG broken")
    return tmp_path


@pytest.mark.parametrize("args,message", [
    (["ground", "--image", "{d}/none.png", "the red circle"], "image not found"),
    (["ground", "--image", "{d}/corrupt.png", "the red circle"], "cannot decode image"),
    (["ground", "--image", "{d}/a.png", "  "], "expression is empty"),
    (["ground", "--image", "{d}/a.png", "--overlay", "{d}/no/x.png", "the circle"], "does not exist"),
    (["refer", "--image", "{d}/a.png", "--box", "1,1,5"], "--box 1,1,5"),
    (["refer", "--image", "{d}/a.png", "--box", "1,1,60,5"], "--box"),
    (["refer", "--image", "{d}/a.png", "--box", "5,5,1,1"], "--box"),
    (["convert", "--tokenizer", "{d}/none.bin", "--out", "{d}/c.pth"], "none.bin"),
    (["ground", "--image", "{d}/a.png", "--model", "{d}", "the circle"], "the model was loaded"),
])
def test_bad_input_is_one_line_and_exit_2(files, capsys, args, message):
    with pytest.raises(SystemExit) as err:  # (the last case passes every check: loading is what comes next)
        cli.main([a.replace("{d}", str(files)) for a in args])
    assert err.value.code == 2
    out = capsys.readouterr().err.strip()
    assert out.startswith("error: ") and message in out and "\n" not in out


def test_eval_scores_a_predictions_file_without_a_model(tmp_path, capsys):
    path = tmp_path / "p.jsonl"
    rows = [{"id": "1", "task": "rec", "question": "q", "prediction": "", "references": ["x"], "box": [0, 0, 10, 10],
             "target": [0, 0, 10, 10]},
            {"id": "2", "task": "rec", "question": "q", "prediction": "", "references": ["x"], "box": [20, 20, 30, 30],
             "target": [0, 0, 10, 10]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cli.main(["eval", "--config", str(CONFIG), "--predictions", str(path)])
    assert re.search(r"rec/acc50 +0.5000", capsys.readouterr().out)


@pytest.mark.slow
def test_pipeline_end_to_end_on_a_micro_config_then_ground_and_refer(tmp_path, monkeypatch, capsys):
    """Every stage on a few scenes and steps (tiny bases built in seconds), the table printed, a second
    run reusing every stage; then ``ground`` draws a box and ``refer`` answers in words."""
    from groundlab.shared.bases import ensure_base, smoke_spec
    from groundlab.shared.world import World, WorldConfig

    monkeypatch.setenv("GROUNDLAB_RUNS", str(tmp_path / "runs"))
    llava, sam = ensure_base(smoke_spec("llava")), ensure_base(smoke_spec("sam"))
    args = ["train", "--config", str(CONFIG), "--model.llava", str(llava), "--tokenizer.sam", str(sam),
            "--data.train_scenes", "12", "--data.eval_scenes", "3", "--tokenizer.train.max_steps", "4",
            "--tokenizer.train.batch_size", "4", "--stage1.max_steps", "3", "--stage2.max_steps", "3",
            "--stage1.batch_size", "4", "--stage2.batch_size", "4", "--eval.max_new_tokens", "6"]
    cli.main(args)
    path = tmp_path / "runs" / "clawmachine" / "tiny" / "metrics.json"
    m = json.loads(path.read_text())
    for tag in ("clawmachine", "untrained", "baseline/random_object", "baseline/largest_object",
                "baseline/whole_image", "bound/kept_cells", "bound/true_codes"):
        assert 0 <= m[f"{tag}/rec/acc50"] <= 1
    assert m["bound/true_codes/rec/acc50"] <= m["bound/kept_cells/rec/acc50"]
    assert m["clawmachine/rec/n"] == m["untrained/rec/n"] > 0 and 0 <= m["clawmachine/yesno/accuracy"] <= 1
    assert m["tokenizer/trained/codes_used"] >= 1
    assert "| ClawMachine (stage 1 + 2) |" in capsys.readouterr().out
    cli.main(args)
    again = json.loads(path.read_text())
    assert not any(k.startswith("time/") and k != "time/total_s" for k in again)  # every stage reused
    linked = path.parent.parent / "linked"  # another run with this one's stages linked in reuses them
    linked.mkdir()
    for stage in path.parent.iterdir():
        if stage.is_dir():
            (linked / stage.name).symlink_to(stage)
    cli.main([*args, "--name", "linked"])
    reused = json.loads((linked / "metrics.json").read_text())
    assert not any(k.startswith("time/") and k != "time/total_s" for k in reused)
    assert reused["clawmachine/rec/acc50"] == again["clawmachine/rec/acc50"]
    cli.main([*args, "--name", "linked", "--data.rec_shortest", "0.5"])  # other conversations, the same images
    redone = json.loads((linked / "metrics.json").read_text())
    assert {"time/data_s", "time/stage1_s", "time/stage2_s"} <= redone.keys()
    assert not {"time/tokenizer_s", "time/tokens_s", "time/start_s"} & redone.keys()
    scene = World(WorldConfig(), seed=0).scene("test", 0)
    Image.fromarray(scene.image).save(tmp_path / "scene.png")
    capsys.readouterr()
    cli.main(["ground", "--image", str(tmp_path / "scene.png"), "the circle"])
    printed = capsys.readouterr().out.strip()
    assert printed == "no region generated" or re.fullmatch(r"box [\d.]+,[\d.]+,[\d.]+,[\d.]+", printed)
    assert Image.open(tmp_path / "scene_ground.png").size == (512, 512)
    x, y, w, h = scene.objects[0].bbox
    cli.main(["refer", "--image", str(tmp_path / "scene.png"), "--box", f"{x},{y},{x + w},{y + h}"])
    answer = capsys.readouterr().out.strip()
    assert answer and "<unk>" not in answer


def test_the_release_config_loads_and_names_the_papers_setup():
    from groundlab.clawmachine.train import RunConfig

    cfg = RunConfig.from_yaml(CONFIG.with_name("release_8gpu.yaml"))
    assert cfg.stage1.deepspeed == cfg.stage2.deepspeed == "zero2" and cfg.stage1.bf16 is True
    assert (cfg.stage1.lr, cfg.stage2.lr) == (2e-5, 1e-5) and cfg.stage1.batch_size * 8 == 256
    assert cfg.tokenizer.pretrained and cfg.model.llm and cfg.data.refer_root
