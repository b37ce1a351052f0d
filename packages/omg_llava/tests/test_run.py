"""The whole default pipeline on tiny parts: world export -> segmenter -> stage 1 -> stage 2 -> evaluation."""

import json

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM

from groundlab.omg_llava.inference import OMGLlavaPipeline
from groundlab.omg_llava.train import RunConfig, run, score_predictions
from groundlab.shared.tokenizer import load_tokenizer
from groundlab.shared.world import World, WorldConfig

SEG = dict(image_size=64, dims=[16, 32, 64, 32], depths=[1, 1, 1, 1], dim=16, mask_dim=16, encoder_layers=1,
           encoder_heads=2, encoder_points=2, encoder_ffn=32, groups=8, num_queries=6, decoder_layers=2,
           decoder_heads=2, decoder_ffn=32, num_classes=12, classifier="linear")


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llm")
    tok = load_tokenizer()
    cfg = AutoConfig.for_model("llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                               pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def config(llm_dir, overrides=None):
    steps = dict(max_steps=3, batch_size=4, lr=1e-3, save_steps=2, progress_bar=False)
    raw = {"name": "t", "data": {"train_scenes": 12, "val_scenes": 3},
           "segmenter": {"config": SEG, "scenes": 12, "eval_scenes": 3, "semantic": steps, "train": steps},
           "model": {"llm": str(llm_dir), "config": {"template": "vicuna", "shuffle": 1, "seg_points": 256},
                     "lora_r": 4, "lora_alpha": 2}, "stage1": steps, "stage2": steps,
           "eval": {"max_new_tokens": {"res": 4, "gcg": 6, "region": 6}}}
    path = llm_dir.parent / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return RunConfig.from_yaml(path, overrides)


def test_run_end_to_end_then_reuse(tmp_path, monkeypatch, llm_dir):
    monkeypatch.setenv("GROUNDLAB_RUNS", str(tmp_path))
    path = run(config(llm_dir))
    m = json.loads(path.read_text())
    run_dir = tmp_path / "omg_llava" / "t"
    for task, cols in (("res", ("cIoU", "gIoU")), ("gcg", ("METEOR", "CIDEr", "AP50", "mIoU", "recall")),
                       ("region", ("METEOR", "CIDEr"))):
        # every printed figure is the score of its predictions file, the trained and the untrained model's
        for prefix in ("", "baseline/untrained/"):
            rescored = score_predictions(config(llm_dir), run_dir / f"predictions_{prefix.replace('/', '_')}{task}.jsonl")
            assert {f"{prefix}{k}": v for k, v in rescored.items() if k.split("/")[1] in cols} == \
                {f"{prefix}{task}/{c}": m[f"{prefix}{task}/{c}"] for c in cols}
    assert 0 < m["baseline/whole/res/cIoU"] < 1 and 0 < m["baseline/random_object/res/gIoU"] <= 1
    # every object of the image: contains the target, so it beats the whole image on every expression
    assert m["baseline/whole/res/cIoU"] < m["baseline/union/res/cIoU"] <= 1
    # the oracle (the segmenter's best query mask per target) is scored beside the rest
    assert 0 < m["oracle/best_query/res/gIoU"] <= 1
    assert {"segmenter/panoptic/PQ", "segmenter/baseline/untrained/panoptic/PQ", "stage2/seg_mismatched",
            "time/stage1_s", "time/stage2_s"} <= set(m)
    assert m["stage2/seg_mismatched"] == 0
    # the segmenter's encoder was pre-trained on per-pixel classes first; its objects' recognition is scored
    assert list((run_dir).glob("segmenter-*/semantic/checkpoint-3"))
    assert {"segmenter/objects/class_acc", "segmenter/objects/colour_acc", "segmenter/objects/kind_acc"} <= set(m)
    # RES split by a second object of the target's category: every item in one of the two
    assert m["res/same_category/n"] + m["res/unique_category/n"] == m["data/eval/res"]
    preds = [json.loads(line) for line in (run_dir / "predictions_res.jsonl").open()]
    assert len(preds) == m["data/eval/res"] and {"id", "answer", "masks", "scores"} <= set(preds[0])
    # a second run reuses every stage (nothing retrained) and scores the same
    again = json.loads(run(config(llm_dir)).read_text())
    assert "time/stage2_s" not in again and again["res/cIoU"] == m["res/cIoU"]
    # another run name with the first run's stages linked in reuses them all: a stage's key names the
    # stages it builds on, not the run directory they lie in
    other = tmp_path / "omg_llava" / "t2"
    other.mkdir()
    for stage in [*run_dir.glob("data-*"), *run_dir.glob("segmenter-*"), *run_dir.glob("stage[12]-*")]:
        (other / stage.name).symlink_to(stage)
    renamed = json.loads(run(config(llm_dir, {"name": "t2"})).read_text())
    assert not {"time/stage1_s", "time/stage2_s"} & set(renamed) and renamed["res/cIoU"] == m["res/cIoU"]
    # the saved model answers through the inference API
    model_dir = next((tmp_path / "omg_llava" / "t").glob("stage2-*/model"))
    pipe = OMGLlavaPipeline.from_pretrained(model_dir)
    scene = World(WorldConfig(), seed=3).scene("test", 0)
    ans = pipe.segment(scene.image, "the red circle")
    assert isinstance(ans.text, str) and ans.masks.shape[1:] == scene.image.shape[:2]
    with pytest.raises(ValueError, match="1 <region> but 0 were given"):
        pipe(scene.image, "Please give me a short description of region1 <region>.")
    with pytest.raises(ValueError, match=r"region 0 has shape \(3, 3\), the image is \(64, 64\)"):
        pipe(scene.image, "region1 <region>", regions=[np.ones((3, 3), bool)])


def test_stages_built_on_the_llava_base_are_keyed_by_its_name_not_the_runs_root(tmp_path, monkeypatch, llm_dir):
    from dataclasses import replace

    from groundlab.omg_llava import train as omg_train
    from groundlab.omg_llava.omg_seg import OMGSegConfig, OMGSegModel

    seg = tmp_path / "segmenter"
    OMGSegModel(OMGSegConfig(**SEG)).save_pretrained(seg)
    cfg = config(llm_dir)
    ids = []
    for root in ("a", "b"):  # the same base under two GROUNDLAB_RUNS roots
        monkeypatch.setattr(omg_train, "ensure_base", lambda name, r=root: tmp_path / r / "bases" / "llava-0123abcd")
        ids.append(omg_train.ModelBuilder(replace(cfg, model=replace(cfg.model, llm=None)), seg).llm_id)
    assert ids == ["llava-0123abcd", "llava-0123abcd"]
    assert omg_train.ModelBuilder(cfg, seg).llm_id == str(llm_dir)  # a given LLM: its path


def test_unknown_tasks_are_refused(llm_dir):
    with pytest.raises(ValueError, match=r"stage2_tasks': 'vqa' not among"):
        config(llm_dir, {"data.stage2_tasks": ["res", "vqa"]})


def test_release_config_parses_with_the_papers_settings():
    from pathlib import Path

    cfg = RunConfig.from_yaml(Path(__file__).parents[1] / "configs" / "release_8gpu.yaml")
    assert (cfg.model.lora_r, cfg.model.lora_alpha, cfg.model.lora_dropout) == (512, 256, 0.05)
    assert cfg.stage1.lr == 1e-3 and cfg.stage2.lr == 2e-4 and cfg.stage1.batch_size * 8 == 256
    assert cfg.stage2.batch_size * 8 == 128 and cfg.stage2.deepspeed == "zero2" and cfg.model.config == {}


def test_model_llm_may_be_a_saved_llava_whose_language_model_is_taken(tmp_path, llm_dir):
    from groundlab.omg_llava.train import _is_llava, llm_from_llava
    from groundlab.shared.bases import vlm

    tok = load_tokenizer()
    cfg = vlm.TinyVLMConfig(vision_hidden=16, vision_layers=1, vision_heads=2, vision_ffn=32, text_hidden=32,
                            text_layers=1, text_heads=2, text_kv_heads=2, text_ffn=64)
    torch.manual_seed(0)
    llava = vlm.build_model(cfg, tok)
    llava.save_pretrained(tmp_path / "llava")
    tok.save_pretrained(tmp_path / "llava")
    # another build of the base (model.llm = its directory) is read as a LLaVA, a causal LM as itself
    assert _is_llava(tmp_path / "llava") and not _is_llava(llm_dir) and not _is_llava(tmp_path / "nothing")
    llm = llm_from_llava(tmp_path / "llava")
    assert torch.equal(llm.lm_head.weight, llava.lm_head.weight)
    assert torch.equal(llm.get_input_embeddings().weight, llava.get_input_embeddings().weight)


def test_ablation_reseeds_stages_and_reports_each_arm(tmp_path, monkeypatch, llm_dir):
    """Table 5 over two seeds: the full arm's seed 0 is the run's own model (reused, scored the same);
    every other arm and seed trains its own stages 1-2 on the run's data and frozen segmenter."""
    from groundlab.omg_llava.cli import _model_dir
    from groundlab.omg_llava.train import ABLATION_FIGURES, ablation

    monkeypatch.setenv("GROUNDLAB_RUNS", str(tmp_path))
    m = json.loads(run(config(llm_dir)).read_text())
    run_dir = tmp_path / "omg_llava" / "t"
    own = _model_dir("t", None)
    segmenters = sorted(run_dir.glob("segmenter-*"))
    ab = json.loads(ablation(config(llm_dir), seeds=(0, 1), arms=("full", "no_prior")).read_text())
    # seed 0 of the full arm is the run's model: nothing retrained, the same score
    full0 = json.loads((run_dir / "ablation" / "full_seed0" / "metrics.json").read_text())
    assert "time/stage2_s" not in full0 and ab["full/seed_0/res/cIoU"] == m["res/cIoU"]
    no_prior1 = json.loads((run_dir / "ablation" / "no_prior_seed1" / "metrics.json").read_text())
    assert "time/stage2_s" in no_prior1
    # the segmenter's perception of the images is computed once for every arm and seed
    assert "time/perception_s" in ab and "time/perception_s" not in no_prior1
    # 1 + 3 stage-2 models (full seed 1, no_prior seeds 0 and 1), one segmenter shared by all
    assert len(list(run_dir.glob("stage2-*"))) == 4 and sorted(run_dir.glob("segmenter-*")) == segmenters
    arm_model = json.loads((run_dir / "ablation" / "no_prior_seed0" / "metrics.json").read_text())["config"]["model"]
    assert arm_model["config"]["use_prior"] is False
    # the arms are scored on Table 5's tasks alone (the run evaluates region captioning too)
    assert "region/METEOR" in m and not any(k.startswith("region/") for k in full0 | no_prior1)
    assert not any("region" in k for k in ab) and "gcg/METEOR" in no_prior1
    for arm in ("full", "no_prior"):
        for k in ABLATION_FIGURES:
            values = [ab[f"{arm}/seed_{s}/{k}"] for s in (0, 1)]
            assert ab[f"{arm}/mean/{k}"] == pytest.approx(np.mean(values))
            assert ab[f"{arm}/std/{k}"] == pytest.approx(np.std(values, ddof=1))
    assert ab["seeds"] == 2 and not any(k.startswith("no_object_tokens/") for k in ab)
    # `segment` / `chat` still load the run's own model, not the newest of the ablation's stages
    assert _model_dir("t", None) == own
    with pytest.raises(ValueError, match="at least 2 seeds"):
        ablation(config(llm_dir), seeds=(0,))
    with pytest.raises(ValueError, match="subset of"):
        ablation(config(llm_dir), seeds=(0, 1), arms=("no_llm",))


def test_ablate_command_offers_the_recipes_arms_and_checks_its_config(tmp_path):
    from groundlab.omg_llava.cli import ABLATE, main
    from groundlab.omg_llava.train import ABLATION_ARMS

    assert ABLATE[1] == tuple(ABLATION_ARMS)
    with pytest.raises(SystemExit) as exit_info:
        main(["ablate", "--config", str(tmp_path / "missing.yaml")])
    assert exit_info.value.code == 2
