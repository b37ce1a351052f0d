import numpy as np
import pytest
from pycocotools import mask as mask_utils

from groundlab.shared.metrics import (
    MaskIoUAccumulator,
    auroc,
    average_precision,
    box_iou,
    caption_metrics,
    mask_ap,
    mask_iou,
    rec_accuracy,
    res_metrics,
    xywh_to_xyxy,
)
from groundlab.shared.world import World, WorldConfig
from groundlab.shared.world_io import coco_dict, encode_rle


def _world_masks(n=30):
    scenes = World(WorldConfig(max_objects=3), seed=5).scenes("val", n)
    return [o.mask for s in scenes for o in s.objects]


def test_mask_iou_hand_made_and_empty_cases():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[:2, :2] = True  # 4 px
    b[1:3, 1:3] = True  # 4 px, overlap 1
    assert mask_iou(a, b) == pytest.approx(1 / 7)
    assert mask_iou(np.zeros((3, 3)), np.zeros((3, 3))) == 1.0
    assert mask_iou(a, np.zeros((4, 4))) == 0.0
    with pytest.raises(ValueError, match="shape"):
        mask_iou(a, np.zeros((4, 5)))
    with pytest.raises(ValueError, match="2-D"):
        mask_iou(np.zeros((1, 4, 4)), a)


def test_mask_iou_matches_pycocotools_on_world_masks():
    masks = _world_masks()
    rng = np.random.default_rng(0)
    for _ in range(40):
        i, j = rng.integers(len(masks), size=2)
        # shift one mask so that pairs overlap partially
        shifted = np.roll(masks[j], int(rng.integers(-4, 5)), axis=1)
        p, t = masks[i] | shifted, masks[j]
        ref = mask_utils.iou([encode_rle(p)], [encode_rle(t)], [0])[0, 0]
        assert mask_iou(p, t) == pytest.approx(ref, abs=1e-12)


def test_ciou_giou_definitions():
    masks = _world_masks()
    rng = np.random.default_rng(1)
    preds = [np.roll(m, int(rng.integers(-3, 4)), axis=0) for m in masks]
    out = res_metrics(preds, masks)
    inter = sum((p & t).sum() for p, t in zip(preds, masks))
    union = sum((p | t).sum() for p, t in zip(preds, masks))
    assert out["cIoU"] == pytest.approx(inter / union)
    assert out["gIoU"] == pytest.approx(np.mean([(p & t).sum() / (p | t).sum() for p, t in zip(preds, masks)]))
    # the same per-sample IoUs from pycocotools, and cIoU from its RLE areas
    coco_ious = [mask_utils.iou([encode_rle(p)], [encode_rle(t)], [0])[0, 0] for p, t in zip(preds, masks)]
    assert out["gIoU"] == pytest.approx(np.mean(coco_ious))
    areas = [mask_utils.area([encode_rle(p & t), encode_rle(p | t)]) for p, t in zip(preds, masks)]
    assert out["cIoU"] == pytest.approx(sum(a[0] for a in areas) / sum(a[1] for a in areas))
    # hand-made: one perfect empty pair (IoU 1) and one total miss (IoU 0)
    acc = MaskIoUAccumulator()
    acc.update(np.zeros((2, 2)), np.zeros((2, 2)))
    acc.update(np.array([[1, 0], [0, 0]]), np.array([[0, 0], [0, 1]]))
    assert acc.compute() == {"cIoU": 0.0, "gIoU": 0.5, "n": 2}


def test_box_iou_matches_pycocotools_and_rec_accuracy():
    rng = np.random.default_rng(2)
    xywh_a = np.c_[rng.uniform(0, 50, (20, 2)), rng.uniform(1, 30, (20, 2))]
    xywh_b = np.c_[rng.uniform(0, 50, (15, 2)), rng.uniform(1, 30, (15, 2))]
    ours = box_iou(xywh_to_xyxy(xywh_a), xywh_to_xyxy(xywh_b))
    ref = mask_utils.iou(xywh_a.tolist(), xywh_b.tolist(), [0] * 15)
    np.testing.assert_allclose(ours, ref, atol=1e-12)
    gt = [[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]]
    pred = [[0, 0, 10, 10], [0, 0, 10, 5], [0, 0, 10, 4.9]]  # IoU 1, 0.5, 0.49
    out = rec_accuracy(pred, gt)
    assert out["acc@0.5"] == pytest.approx(2 / 3)
    assert out["mean_iou"] == pytest.approx((1 + 0.5 + 0.49) / 3)
    with pytest.raises(ValueError, match="xyxy"):
        box_iou([5, 5, 1, 1], [0, 0, 1, 1])


def test_caption_metrics_match_pycocoevalcap_scorers_on_world_captions():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    scenes = World(seed=3).scenes("test", 12)
    refs = {s.image_id: [s.caption] for s in scenes}
    # predictions: every other caption replaced by another scene's (a plausible but wrong caption)
    preds = {s.image_id: (s.caption if i % 2 == 0 else scenes[(i + 5) % 12].caption) for i, s in enumerate(scenes)}
    ours = caption_metrics(preds, refs)
    tok = PTBTokenizer()
    g = tok.tokenize({k: [{"caption": c} for c in v] for k, v in refs.items()})
    r = tok.tokenize({k: [{"caption": v}] for k, v in preds.items()})
    bleu, _ = Bleu(4).compute_score(g, r)
    meteor = Meteor()
    m, _ = meteor.compute_score(g, r)
    assert ours["BLEU_4"] == pytest.approx(bleu[3])
    assert ours["BLEU_1"] == pytest.approx(bleu[0])
    assert ours["METEOR"] == pytest.approx(m)
    assert ours["ROUGE_L"] == pytest.approx(Rouge().compute_score(g, r)[0])
    assert ours["CIDEr"] == pytest.approx(Cider().compute_score(g, r)[0])
    assert 0.2 < ours["BLEU_1"] < 1.0
    perfect = caption_metrics(refs and {k: v[0] for k, v in refs.items()}, refs, metrics=("BLEU", "ROUGE_L"))
    assert perfect["BLEU_4"] == pytest.approx(1.0, abs=1e-6) and perfect["ROUGE_L"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="different ids"):
        caption_metrics({1: "a"}, {2: ["a"]})


def test_mask_ap_through_cocoeval_hand_computed_values():
    scenes = World(seed=4).scenes("val", 20)
    gt = coco_dict(scenes)
    anns = gt["annotations"]
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "segmentation": a["segmentation"],
                "score": 0.9} for a in anns]
    assert mask_ap(gt, perfect) == {"AP": 1.0, "AP50": 1.0, "AP75": 1.0}
    # Half the objects found with high scores; the other half predicted as an empty corner (IoU 0)
    # with low scores: precision 1 up to recall 0.5, then 0 -> 101-point AP = 51/101.
    n = len(anns)
    half = n // 2
    corner = np.zeros((64, 64), bool)
    corner[:2, :2] = True
    preds = perfect[:half] + [{**p, "segmentation": encode_rle(corner), "score": 0.1} for p in perfect[half:]]
    assert n % 2 == 0, "the fixture needs an even number of objects"
    assert mask_ap(gt, preds, use_categories=False)["AP50"] == pytest.approx(51 / 101)
    assert mask_ap(gt, [])["AP"] == 0.0
    with pytest.raises(ValueError, match="lacks"):
        mask_ap(gt, [{"image_id": 1}])


def test_average_precision_matches_sklearn_with_ties():
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(0)
    for trial in range(25):
        n = int(rng.integers(5, 300))
        y = (rng.random(n) < rng.uniform(0.05, 0.95)).astype(int)
        if y.sum() == 0:
            y[0] = 1
        scores = rng.random(n)
        if trial % 2:
            scores = np.round(scores, 1)  # many ties
        assert average_precision(y, scores) == pytest.approx(average_precision_score(y, scores), abs=1e-12)
    assert average_precision([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1]) == pytest.approx((1 + 2 / 3) / 2)
    with pytest.raises(ValueError, match="undefined"):
        average_precision([0, 0], [0.1, 0.2])


def test_auroc_matches_sklearn_with_ties():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    for trial in range(25):
        n = int(rng.integers(5, 300))
        y = (rng.random(n) < rng.uniform(0.05, 0.95)).astype(int)
        y[0], y[1] = 1, 0
        scores = rng.random(n)
        if trial % 2:
            scores = np.round(scores, 1)  # many ties
        assert auroc(y, scores) == pytest.approx(roc_auc_score(y, scores), abs=1e-12)
    assert auroc([1, 1, 0, 0], [0.9, 0.4, 0.5, 0.1]) == pytest.approx(0.75)  # 3 of the 4 pairs in order
    assert auroc([1, 0], [0.3, 0.3]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="both classes"):
        auroc([1, 1], [0.1, 0.2])
