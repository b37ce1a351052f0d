import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from groundlab.ivm.configuration import IVMConfig
from groundlab.ivm.data import HUMAN_SPLITS, INSTRUCTION_TYPES, Item
from groundlab.ivm.train import ARMS, Data, DataConfig, RunConfig, arm_items, oracle_weights
from groundlab.shared.bases import ensure_base, smoke_spec

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_diagnostic_arms_read_the_corruption_tags():
    def item(name, human, corruption=None):
        extra = {} if corruption is None else {"corruption": corruption}
        return Item(name, Path("i.jpg"), Path("m.jpg"), ["x"], human, "HumanLabelData" if human else "VQAMachineData", extra)

    human = [item("h0", True), item("h1", True)]
    machine = [item("m0", False, "none"), item("m1", False, "wrong_object"), item("m2", False, "shifted"),
               item("m3", False, "none")]
    data = Data(Path("."), human, machine)
    assert [it.uuid for it in arm_items(data, "human_only")] == ["h0", "h1"]
    assert [it.uuid for it in arm_items(data, "mixed_uniform")] == ["h0", "h1", "m0", "m1", "m2", "m3"]
    assert [it.uuid for it in arm_items(data, "mixed_clean")] == ["h0", "h1", "m0", "m3"]
    assert oracle_weights(data.mixed).tolist() == pytest.approx([0.9, 0.9, 0.9, 0.1, 0.1, 0.9])
    untagged = Data(Path("."), human, [item("real0", False)])  # real data: no tags, the diagnostics refuse it
    with pytest.raises(ValueError, match="real0: the diagnostic arms need"):
        arm_items(untagged, "mixed_clean")
    with pytest.raises(ValueError, match="real0: the diagnostic arms need"):
        oracle_weights(untagged.mixed)


def test_config_parses_and_rejects_unknown_keys_and_arms(tmp_path):
    cfg = RunConfig.from_yaml(CONFIGS / "tiny.yaml")
    assert cfg.arms == ARMS[:4] and cfg.model.config["condition_hidden"] == 128
    ivm = cfg.model.ivm_config({}, {})  # the paper's LoRA unless overridden
    assert (ivm.lora_r, ivm.lora_alpha, ivm.lora_targets, ivm.decoder_heads) == (8, 16, ("q_proj", "v_proj"), 4)
    with pytest.raises(ValueError, match=r"model: 'config': unknown IVMConfig arguments \['condtion_hidden'\]"):
        RunConfig.from_yaml(CONFIGS / "tiny.yaml", {"model.config.condtion_hidden": 64})
    with pytest.raises(ValueError, match="unknown IVMConfig arguments \\['vision_config'\\]"):
        RunConfig.from_yaml(CONFIGS / "tiny.yaml", {"model.config.vision_config": {}})  # taken from the checkpoint
    with pytest.raises(TypeError, match=r"IVMConfig: unknown arguments \['lora_rr'\]"):
        IVMConfig(lora_rr=4)  # a misspelt argument is not kept as an attribute
    assert cfg.generator.bf16 == "auto" and cfg.data.clutter_objects == (4, 6)
    bad = tmp_path / "bad.yaml"
    bad.write_text("generator:\n  max_stepz: 3\n")
    with pytest.raises(ValueError, match="max_stepz"):
        RunConfig.from_yaml(bad)
    assert cfg.data.human_instructions == ("attribute",)  # the toy's human labels: scarce in kind
    wide = RunConfig.from_yaml(CONFIGS / "tiny.yaml", {"data.human_instructions": list(INSTRUCTION_TYPES)})
    assert wide.data.human_instructions == INSTRUCTION_TYPES == DataConfig().human_instructions
    with pytest.raises(ValueError, match="'human_instructions' must be a non-empty subset"):
        RunConfig.from_yaml(CONFIGS / "tiny.yaml", {"data.human_instructions": ["adjectives"]})
    with pytest.raises(ValueError, match="'arms': 'magic' not among"):
        RunConfig.from_yaml(CONFIGS / "tiny.yaml", {"arms": ["human_only", "magic"]})


@pytest.mark.slow
def test_pipeline_end_to_end_on_a_micro_config(tmp_path, monkeypatch):
    from groundlab.ivm.train import run

    monkeypatch.setenv("GROUNDLAB_RUNS", str(tmp_path / "runs"))
    llava = smoke_spec("llava", steps=3, train_scenes=16, eval_scenes=4)
    sam = smoke_spec("sam", steps=3, train_scenes=8, eval_scenes=4)
    llava_path, sam_path = ensure_base(llava), ensure_base(sam)
    overrides = {
        "name": "micro", "model.llava": str(llava_path), "model.sam": str(sam_path),
        "data.human_scenes": 3, "data.machine_scenes": 6, "data.eval_scenes": 3, "data.clutter_scenes": 4,
        "discriminator.max_steps": 4, "discriminator.save_steps": 2, "discriminator.progress_bar": False,
        "generator.max_steps": 4, "generator.save_steps": 2, "generator.progress_bar": False, "arms": list(ARMS)}
    cfg = RunConfig.from_yaml(CONFIGS / "tiny.yaml", overrides)
    path = run(cfg)
    m = json.loads(Path(path).read_text())
    from groundlab.ivm.train import eval_samples, score_predictions

    run_dir = Path(path).parent
    for arm in (*ARMS, "untrained"):  # every arm's figures are its predictions file's scores
        rescored = score_predictions(cfg, run_dir / f"predictions_{arm}.jsonl")
        for k in ("mIoU", "pixel_AP", "rec_acc"):
            key = f"{arm}/{k}" if arm != "untrained" else f"baseline/untrained/{k}"
            assert m[key] == pytest.approx(rescored[f"{arm}/{k}"], abs=1e-9), key
    vqa = [json.loads(x) for x in (run_dir / "predictions_vqa.jsonl").read_text().splitlines()]
    assert len(vqa) == m["vqa/n"] > 0
    for name in ("without_ivm", "with_ivm", "oracle_mask"):  # the accuracies are the answers file's
        assert m[f"vqa/{name}/accuracy"] == pytest.approx(sum(r[name] == r["answer"] for r in vqa) / len(vqa))
    assert m["baseline/whole_image/mIoU"] == pytest.approx(  # keeping everything: IoU = object area / image area
        np.mean([s.mask.mean() for s in eval_samples(cfg)]))
    assert 0.0 <= m["discriminator/train_accuracy"] <= 1.0
    assert 0.1 <= m["dwsl/mean_weight_human"] <= 0.9 and 0.1 <= m["dwsl/mean_weight_machine"] <= 0.9
    # every object kept: exact where the scene holds one object, never below keeping the whole image
    assert m["baseline/all_objects/mIoU"] > m["baseline/whole_image/mIoU"]
    assert m.get("baseline/all_objects/mIoU_1_objects", 1.0) == pytest.approx(1.0)
    assert any(k.startswith("mixed_dwsl/mIoU_") and k.endswith("_objects") for k in m)
    assert -1.0 <= m["mixed_dwsl/condition_cosine"] <= 1.0 and m["vqa/ivm_arm"] != "mixed_oracle"
    weights = [json.loads(x) for x in (run_dir / "dwsl_weights.jsonl").read_text().splitlines()]
    assert len(weights) == m["data/human_items"] + m["data/machine_items"]
    assert all(0.1 <= w["weight"] <= 0.9 for w in weights)
    # the discriminator's AUROCs: the training ones are those of the logits it wrote; the held-out one is
    # over the corrupted val scenes (7 items of the 3 val scenes, clean and corrupted both present)
    from groundlab.shared.metrics import auroc

    human = [w["split"] in HUMAN_SPLITS for w in weights]
    assert m["discriminator/train_auroc_human_vs_machine"] == pytest.approx(auroc(human, [w["logit"] for w in weights]))
    machine = [w for w in weights if w["split"] not in HUMAN_SPLITS]
    assert m["discriminator/train_auroc_clean_vs_corrupted"] == pytest.approx(
        auroc([w["corruption"] == "none" for w in machine], [w["logit"] for w in machine]))
    heldout = next(run_dir.glob("heldout_machine-*")) / "VQAMachineData" / "meta.jsonl"
    tags = [json.loads(x)["corruption"] for x in heldout.read_text().splitlines()]
    assert m["discriminator/heldout_items"] == len(tags) == 7 and 0 < tags.count("none") < 7
    assert 0.0 <= m["discriminator/heldout_auroc_clean_vs_corrupted"] <= 1.0
    preds = (run_dir / "predictions_mixed_dwsl.jsonl").read_text().splitlines()
    assert len(preds) == m["mixed_dwsl/n"]
    # each arm is saved in the release's layout and reloaded from it on a second run
    ckpts = sorted(run_dir.glob("*/ivm.pth"))
    assert len(ckpts) == len(ARMS)
    before = [p.stat().st_mtime_ns for p in ckpts]
    again = json.loads(Path(run(cfg)).read_text())
    assert [p.stat().st_mtime_ns for p in ckpts] == before
    for arm in ARMS:  # reloaded models score exactly as the trained ones did
        assert again[f"{arm}/mIoU"] == pytest.approx(m[f"{arm}/mIoU"], abs=1e-6)

    # a run of the diagnostic oracle arm alone: its figures (reloaded), no downstream VQA to pick an arm for
    oracle_only = RunConfig.from_yaml(CONFIGS / "tiny.yaml", {**overrides, "arms": ["mixed_oracle"]})
    alone = json.loads(Path(run(oracle_only)).read_text())
    assert alone["mixed_oracle/mIoU"] == pytest.approx(m["mixed_oracle/mIoU"], abs=1e-6)
    assert not any(k.startswith("vqa/") for k in alone)

    # the DWSL comparison over two seeds: seed 0 is the run's own models (scored the same), seed 1 trains
    # its own discriminator and arms; the table's mean and spread are the seeds' figures
    from groundlab.ivm.cli import ABLATE
    from groundlab.ivm.train import ablation

    assert ABLATE[1] == ARMS
    with pytest.raises(ValueError, match="at least 2 seeds"):
        ablation(cfg, (0,))
    arms = ("human_only", "mixed_dwsl")
    table = json.loads(Path(ablation(cfg, (0, 1), arms=arms)).read_text())
    assert table["seeds"] == 2 and table["config"]["ablation_arms"] == list(arms)
    for arm in arms:
        assert table[f"{arm}/seed_0/mIoU"] == pytest.approx(m[f"{arm}/mIoU"], abs=1e-6)
        seed1 = json.loads((run_dir / "ablation" / "seed1" / "metrics.json").read_text())[f"{arm}/mIoU"]
        assert table[f"{arm}/seed_1/mIoU"] == seed1
        assert table[f"{arm}/mean/mIoU"] == pytest.approx((m[f"{arm}/mIoU"] + seed1) / 2)
        assert table[f"{arm}/std/mIoU"] == pytest.approx(abs(m[f"{arm}/mIoU"] - seed1) / np.sqrt(2))
    assert table["discriminator/mean/dwsl/mean_weight_human"] == pytest.approx(
        (m["dwsl/mean_weight_human"] + json.loads((run_dir / "ablation" / "seed1" / "metrics.json").read_text())[
            "dwsl/mean_weight_human"]) / 2)
    assert len(list(run_dir.glob("discriminator-*"))) == 2  # one per seed
    assert table["dwsl_vs_human_only/mIoU_gap"] == pytest.approx(
        table["mixed_dwsl/mean/mIoU"] - table["human_only/mean/mIoU"])
    assert table["dwsl_vs_human_only/larger_std"] == max(table["mixed_dwsl/std/mIoU"], table["human_only/std/mIoU"])
    assert "dwsl_vs_mixed_uniform/mIoU_gap" not in table  # that arm was not in this ablation

    # the CLI masks an image with a trained arm
    from groundlab.ivm.cli import main as cli

    image = np.full((64, 64, 3), 235, np.uint8)
    image[10:30, 10:30] = (200, 30, 30)
    Image.fromarray(image).save(tmp_path / "x.png")
    cli(["mask", "--image", str(tmp_path / "x.png"), "--instruction", "find the red square.", "--run", "micro",
         "--arm", "mixed_dwsl", "--mode", "blur", "--threshold", "0.5", "--out", str(tmp_path / "masked.png"),
         "--llava", str(llava_path), "--sam", str(sam_path)])
    assert np.asarray(Image.open(tmp_path / "masked.png")).shape == (64, 64, 3)
    assert (tmp_path / "masked.heatmap.png").is_file()
