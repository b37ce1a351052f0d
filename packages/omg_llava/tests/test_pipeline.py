"""The data -> batches path, evaluation scoring, inference API and the whole run on tiny parts."""

import json

import numpy as np
import pytest
import torch

from groundlab.omg_llava.data import export_world, load_world_export
from groundlab.omg_llava.evaluation import (
    greedy_match,
    phrase_similarity,
    plain_caption,
    read_predictions,
    score_gcg,
    score_res,
    seg_phrases,
)
from groundlab.omg_llava.inference import overlay
from groundlab.omg_llava.processing import from_input_frame, to_input_frame
from groundlab.shared.world import World, WorldConfig
from groundlab.shared.world_io import encode_rle


def test_input_frame_round_trip_on_a_non_square_image():
    m = np.zeros((40, 64), bool)
    m[5:20, 30:50] = True
    sq = to_input_frame([m], 32)
    assert sq.shape == (1, 32, 32) and not sq[0, 20:].any()  # the padding (bottom) stays empty
    logits = sq.float() * 20 - 10
    back = from_input_frame(logits, (40, 64)) > 0
    assert back.shape == (1, 40, 64)
    assert (back[0].numpy() == m).mean() > 0.97
    assert from_input_frame(torch.zeros(0, 16, 16), (40, 64)).shape == (0, 40, 64)


def test_answer_parsing():
    a = "<p> a red circle </p> [SEG] and <p> a blue square </p> [SEG] ."
    assert plain_caption(a) == "a red circle and a blue square."
    assert seg_phrases(a) == ["a red circle", "a blue square"]
    assert seg_phrases("It is [SEG].") == [""]
    assert phrase_similarity("a red circle", "the red circle") == pytest.approx(2 / 3)
    assert greedy_match(np.array([[0.2, 0.9], [0.8, 0.1]])) == [(0, 1), (1, 0)]
    assert greedy_match(np.array([[0.0, 0.0]])) == []


def _pred(i, answer, masks, scores=None):
    return {"id": i, "task": "x", "answer": answer, "masks": masks, "scores": scores or [1.0] * len(masks)}


def test_res_scores_by_hand():
    from groundlab.omg_llava.data import Sample

    t1, t2 = np.zeros((4, 4), bool), np.zeros((4, 4), bool)
    t1[:2] = True  # 8 px
    t2[:, :1] = True  # 4 px
    samples = [Sample("a", None, [], [t1]), Sample("b", None, [], [t2])]
    p1 = np.zeros((4, 4), bool)
    p1[:1] = True  # 4 of 8 -> IoU 0.5
    out = score_res([_pred("a", "It is [SEG].", [p1]), _pred("b", "no mask", [])], samples)
    assert out["cIoU"] == pytest.approx(4 / (8 + 4)) and out["gIoU"] == pytest.approx(0.25)
    assert out["no_seg_rate"] == 0.5


def test_gcg_scores_by_hand():
    from groundlab.omg_llava.data import Sample

    a, b = np.zeros((8, 8), bool), np.zeros((8, 8), bool)
    a[:4, :4] = True
    b[4:, 4:] = True
    ref = "<p> a red circle </p> [SEG] and <p> a blue square </p> [SEG]."
    conv = [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": ref}]
    samples = [Sample("s", None, conv, [a, b])]
    half = np.zeros((8, 8), bool)
    half[4:, 4:5] = True  # IoU 0.25 with b
    pred = _pred("s", "<p> a red circle </p> [SEG] and <p> a green square </p> [SEG].", [a, half], [0.9, 0.8])
    out = score_gcg([pred], samples)
    assert out["mIoU"] == pytest.approx((1.0 + 0.25) / 2)
    assert out["recall"] == pytest.approx(0.5)  # the circle: IoU 1, same phrase; the square fails IoU > 0.5
    assert out["AP50"] == pytest.approx(0.5, abs=0.02)  # one of two references found, at the top score
    # one caption in the corpus: every n-gram's document frequency is the whole corpus, idf 0, CIDEr 0
    assert 0.3 < out["METEOR"] < 0.6 and out["CIDEr"] == 0.0


def test_read_predictions_checks_ids(tmp_path):
    from groundlab.omg_llava.data import Sample

    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(_pred("a", "x", [encode_rle(np.ones((2, 2), bool))])) + "\n")
    assert read_predictions(path, [Sample("a", None, [])])[0]["masks"][0].all()
    with pytest.raises(ValueError, match="do not match"):
        read_predictions(path, [Sample("b", None, [])])


def test_overlay_pixels():
    im = np.full((2, 2, 3), 100, np.uint8)
    m = np.zeros((1, 2, 2), bool)
    m[0, 0, 0] = True
    out = overlay(im, m, alpha=0.5, outline=False)
    assert tuple(out[0, 0]) == (165, 62, 88) and tuple(out[1, 1]) == (100, 100, 100)
    im = np.full((5, 5, 3), 100, np.uint8)
    m = np.zeros((1, 5, 5), bool)
    m[0, 1:4, 1:4] = True  # a 3x3 square: its 8 border pixels black, its centre tinted, the rest untouched
    out = overlay(im, m, alpha=0.5)
    border = m[0].copy()
    border[2, 2] = False
    assert (out[border] == 0).all() and tuple(out[2, 2]) == (165, 62, 88) and (out[~m[0]] == 100).all()


def test_world_export_reads_back_every_task(tmp_path):
    world = World(WorldConfig(), seed=0)
    counts = export_world(world, tmp_path, n_train=6, n_val=3)
    for task in ("caption", "qa", "res", "gcg", "region", "point"):
        samples = load_world_export(tmp_path, "train", (task,))
        assert samples and all(s.task in (task, "llava") for s in samples)
    res = load_world_export(tmp_path, "val", ("res",))
    assert len({(s.image, s.seg_masks[0].tobytes()) for s in res}) == counts["val/res_objects"]
    with pytest.raises(ValueError, match="train split only"):
        load_world_export(tmp_path, "val", ("caption",))


def test_res_reads_any_refer_dataset_and_each_image_instances_once(tmp_path):
    """RES from another REFER dataset / partition / split / image folder, chosen by the data config;
    the every-object masks of each evaluated image, decoded once per image."""
    from groundlab.omg_llava.train import Data, DataConfig, _instances
    from groundlab.shared.world_io import image_file_name, save_image, write_refer

    world = World(WorldConfig(), seed=0)
    scenes = [world.scene("val", i) for i in range(5)]
    for s in scenes:
        save_image(s, tmp_path / "coco")
    write_refer({"train": scenes[:2], "val": scenes[2:3], "test": scenes[3:]}, tmp_path, tmp_path / "coco",
                dataset="refcocog", split_by="umd")
    d = DataConfig(root=str(tmp_path), refer_dataset="refcocog", refer_split_by="umd",
                   refer_image_dir=str(tmp_path / "coco"), res_eval_split="test")
    res = load_world_export(tmp_path, d.res_eval_split, ("res",), d.refer())
    assert len(res) == sum(len(s.refs) for s in scenes[3:])
    assert {r.image for r in res} == {tmp_path / "coco" / image_file_name(s) for s in scenes[3:]}
    instances, categories = _instances(Data(tmp_path, [], [], {"res": res}, d.refer()))
    from groundlab.shared.world_io import CATEGORIES

    for s in scenes[3:]:
        masks = instances[str(tmp_path / "coco" / image_file_name(s))]
        assert len(masks) == len(s.objects) and all(np.array_equal(m, o.mask) for m, o in zip(masks, s.objects))
        assert categories[str(tmp_path / "coco" / image_file_name(s))] == [CATEGORIES.index(o.kind) + 1 for o in s.objects]
    with pytest.raises(ValueError, match="no refs of split 'testA'"):
        load_world_export(tmp_path, "testA", ("res",), d.refer())
    with pytest.raises(ValueError, match="'refcoco\\+' has no 'umd' partition"):
        DataConfig(root=str(tmp_path), refer_dataset="refcoco+", refer_split_by="umd")
    with pytest.raises(ValueError, match="the world export holds RES as"):
        DataConfig(refer_dataset="refcocog", refer_split_by="umd")


def test_res_breakdown_separates_wrong_objects_from_poor_masks():
    from groundlab.omg_llava.data import Sample
    from groundlab.omg_llava.evaluation import res_breakdown

    a, b = np.zeros((4, 4), bool), np.zeros((4, 4), bool)
    a[:2], b[2:] = True, True
    samples = [Sample(str(i), "img", [], [a]) for i in range(3)]
    small = np.zeros((4, 4), bool)
    small[0, 0] = True
    preds = [_pred("0", "", [a]), _pred("1", "", [b]), _pred("2", "", [small])]
    out = res_breakdown(preds, samples, {"img": [a, b]})
    assert out == {"right_rate": 1 / 3, "wrong_object_rate": 1 / 3, "poor_mask_rate": 1 / 3}


def test_res_by_distractor_splits_on_a_second_object_of_the_targets_category():
    """Two images: one with two objects of category 1 (each target has a same-category distractor),
    one whose target is its only object of category 2; per split the right-object share and cIoU."""
    from groundlab.omg_llava.data import Sample
    from groundlab.omg_llava.evaluation import res_by_distractor

    a, b = np.zeros((4, 4), bool), np.zeros((4, 4), bool)
    a[:2], b[2:] = True, True
    samples = [Sample("0", "two", [], [a]), Sample("1", "two", [], [b]), Sample("2", "one", [], [a])]
    preds = [_pred("0", "", [a]), _pred("1", "", [a]), _pred("2", "", [a])]  # the second answer: the wrong one
    instances, categories = {"two": [a, b], "one": [a, b]}, {"two": [1, 1], "one": [2, 1]}
    out = res_by_distractor(preds, samples, instances, categories)
    assert (out["same_category/n"], out["unique_category/n"]) == (2, 1)
    assert out["same_category/right_rate"] == 0.5 and out["unique_category/right_rate"] == 1.0
    assert out["same_category/cIoU"] == 8 / 24 and out["unique_category/cIoU"] == 1.0
    with pytest.raises(ValueError, match="2 instance masks but 1 categories"):
        res_by_distractor(preds, samples, instances, {"two": [1], "one": [2, 1]})


def test_object_token_coverage_with_perfect_masks_follows_the_token_grid(tmp_path):
    """The share of RES targets whose true mask wins a cell of the token grid: every target on a fine
    grid; on a 2x2 grid at 64 px, the targets that hold the most of a cell centre's 2x2 pixels (what
    bilinear shrinking by 32 reads), counted here by hand."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_modeling import tiny  # the tests' tiny model

    from groundlab.omg_llava.evaluation import object_token_coverage
    from groundlab.omg_llava.train import Data, _instances

    export_world(World(WorldConfig(), seed=0), tmp_path, n_train=1, n_val=12)
    res = list({s.id.split("-")[0]: s for s in load_world_export(tmp_path, "val", ("res",))}.values())
    instances = _instances(Data(tmp_path, [], [], {"res": res}, {}))[0]
    fine, _ = tiny(feature_stride=4, shuffle=1)  # 16x16 cells of 4 px
    coarse, _ = tiny(feature_stride=16, shuffle=2)  # 2x2 cells of 32 px
    assert (fine.config.grid, coarse.config.grid) == (16, 2)
    assert object_token_coverage(fine, res, instances)["coverage_perfect_masks"] == 1.0
    won = 0
    for s in res:
        masks = np.stack(instances[str(s.image)]).astype(float)
        target = next(i for i, m in enumerate(instances[str(s.image)]) if np.array_equal(m, s.seg_masks[0]))
        centres = [masks[:, y - 1:y + 1, x - 1:x + 1].mean((1, 2)) for y in (16, 48) for x in (16, 48)]
        won += any(c.max() > 0 and c.argmax() == target for c in centres)
    out = object_token_coverage(coarse, res, instances)
    assert out["coverage_perfect_masks"] == won / len(res) < 1.0
    assert set(out) == {"coverage_perfect_masks", "coverage"}


def test_mask_baselines_pick_what_they_say(tmp_path):
    from groundlab.omg_llava.data import Sample
    from groundlab.omg_llava.evaluation import baseline_predictions

    small, big = np.zeros((8, 8), bool), np.zeros((8, 8), bool)
    small[:2, :2] = True
    big[4:, 2:] = True
    conv = [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "It is [SEG]."}]
    samples = [Sample("s", "img.png", conv, [small], task="res")]
    instances = {"img.png": [small, big]}
    for kind, expected in (("largest_object", big), ("union", small | big), ("whole", np.ones((8, 8), bool))):
        path = baseline_predictions(samples, kind, tmp_path / f"{kind}.jsonl", instance_masks=instances)
        (pred,) = read_predictions(path, samples)
        np.testing.assert_array_equal(pred["masks"][0], expected)
