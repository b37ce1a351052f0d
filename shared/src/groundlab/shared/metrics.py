"""Metrics the papers report, defined once.

- Masks: IoU of one pair; cIoU (sum of intersections / sum of unions over a split) and gIoU (mean of
  per-sample IoUs, an empty prediction of an empty target counting 1), as LISA / OMG-LLaVA report RES.
- Boxes: pairwise IoU and REC accuracy (IoU >= 0.5 with the ground-truth box).
- Captions: BLEU-1..4, METEOR, ROUGE-L, CIDEr through pycocoevalcap with its PTB tokenizer, as the
  COCO caption evaluation computes them (SPICE is left out: it needs a download). METEOR and the PTB
  tokenizer run Java.
- Mask AP through pycocotools' COCOeval (``iouType="segm"``).
- Token-level average precision (TLDR's mAP): the step-wise AP of a ranking (scikit-learn's
  ``average_precision_score`` definition, ties grouped at equal scores).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping, Sequence

import numpy as np

# ----------------------------------------------------------------------------------------------
# masks


def _as_bool(mask, name: str) -> np.ndarray:
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D mask, got shape {arr.shape}")
    return arr.astype(bool)


def intersection_union(pred, target) -> tuple[int, int]:
    """Pixel counts of intersection and union of two (H, W) masks of the same shape."""
    p, t = _as_bool(pred, "prediction"), _as_bool(target, "target")
    if p.shape != t.shape:
        raise ValueError(f"prediction shape {p.shape} != target shape {t.shape}")
    return int((p & t).sum()), int((p | t).sum())


def mask_iou(pred, target) -> float:
    """IoU of two masks; two empty masks agree perfectly (1.0)."""
    inter, union = intersection_union(pred, target)
    return 1.0 if union == 0 else inter / union


class MaskIoUAccumulator:
    """Accumulates RES metrics over a split: ``cIoU = sum(I) / sum(U)``, ``gIoU = mean(IoU_i)``."""

    def __init__(self) -> None:
        self.inter = 0
        self.union = 0
        self.ious: list[float] = []

    def update(self, pred, target) -> float:
        inter, union = intersection_union(pred, target)
        self.inter += inter
        self.union += union
        iou = 1.0 if union == 0 else inter / union
        self.ious.append(iou)
        return iou

    def compute(self) -> dict[str, float]:
        if not self.ious:
            raise ValueError("no sample was accumulated")
        ciou = self.inter / self.union if self.union else 1.0
        return {"cIoU": ciou, "gIoU": float(np.mean(self.ious)), "n": len(self.ious)}


def res_metrics(preds: Sequence, targets: Sequence) -> dict[str, float]:
    if len(preds) != len(targets):
        raise ValueError(f"{len(preds)} predictions for {len(targets)} targets")
    acc = MaskIoUAccumulator()
    for p, t in zip(preds, targets):
        acc.update(p, t)
    return acc.compute()


# ----------------------------------------------------------------------------------------------
# boxes


def mask_box(mask) -> tuple[int, int, int, int] | None:
    """The inclusive pixel box ``(x0, y0, x1, y1)`` of a boolean mask's pixels; None when it is empty."""
    ys, xs = np.nonzero(_as_bool(mask, "mask"))
    if len(ys) == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def xywh_to_xyxy(boxes) -> np.ndarray:
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).copy()
    b[:, 2:] += b[:, :2]
    return b


def box_iou(a, b) -> np.ndarray:
    """Pairwise IoU of boxes in ``(x0, y0, x1, y1)``: (N, 4) x (M, 4) -> (N, M)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    if (a[:, 2:] < a[:, :2]).any() or (b[:, 2:] < b[:, :2]).any():
        raise ValueError("boxes must satisfy x1 >= x0 and y1 >= y0 (xyxy format)")
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def rec_accuracy(pred_boxes, gt_boxes, threshold: float = 0.5) -> dict[str, float]:
    """REC accuracy: share of samples whose predicted box has IoU >= ``threshold`` with its target (xyxy)."""
    p = np.asarray(pred_boxes, dtype=np.float64).reshape(-1, 4)
    g = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    if len(p) != len(g):
        raise ValueError(f"{len(p)} predicted boxes for {len(g)} targets")
    if len(p) == 0:
        raise ValueError("no sample to score")
    ious = np.array([box_iou(p[i], g[i])[0, 0] for i in range(len(p))])
    return {f"acc@{threshold}": float((ious >= threshold).mean()), "mean_iou": float(ious.mean()), "n": len(p)}


# ----------------------------------------------------------------------------------------------
# captions


CAPTION_METRICS = ("BLEU", "METEOR", "ROUGE_L", "CIDEr")


def caption_metrics(predictions: Mapping, references: Mapping, metrics: Sequence[str] = CAPTION_METRICS
                    ) -> dict[str, float]:
    """COCO caption metrics. ``predictions``: id -> str; ``references``: id -> list of str.

    Returns ``BLEU_1..BLEU_4``, ``METEOR``, ``ROUGE_L``, ``CIDEr`` (those asked for). Both texts go
    through the PTB tokenizer first, as in the COCO caption evaluation.
    """
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    unknown = set(metrics) - set(CAPTION_METRICS)
    if unknown:
        raise ValueError(f"unknown caption metrics {sorted(unknown)}; available {CAPTION_METRICS}")
    missing = set(predictions) ^ set(references)
    if missing:
        raise ValueError(f"predictions and references cover different ids, e.g. {sorted(missing, key=str)[:5]}")
    if not predictions:
        raise ValueError("no caption to score")
    for key, refs in references.items():
        if isinstance(refs, str) or not refs:
            raise ValueError(f"references[{key!r}] must be a non-empty list of strings")
    gts = {k: [{"caption": r} for r in refs] for k, refs in references.items()}
    res = {k: [{"caption": predictions[k]}] for k in references}
    with contextlib.redirect_stdout(io.StringIO()):
        tok = PTBTokenizer()
        gts_t, res_t = tok.tokenize(gts), tok.tokenize(res)
    out: dict[str, float] = {}
    for name in metrics:
        scorer = _scorer(name)
        with contextlib.redirect_stdout(io.StringIO()):
            score, _ = scorer.compute_score(gts_t, res_t)
        if name == "BLEU":
            out.update({f"BLEU_{i + 1}": float(s) for i, s in enumerate(score)})
        else:
            out[name] = float(score)
        close = getattr(scorer, "close", None)
        if close is not None:
            close()
    return out


def _scorer(name: str):
    if name == "BLEU":
        from pycocoevalcap.bleu.bleu import Bleu
        return Bleu(4)
    if name == "METEOR":
        from pycocoevalcap.meteor.meteor import Meteor
        return Meteor()
    if name == "ROUGE_L":
        from pycocoevalcap.rouge.rouge import Rouge
        return Rouge()
    from pycocoevalcap.cider.cider import Cider
    return Cider()


# ----------------------------------------------------------------------------------------------
# mask AP


def mask_ap(ground_truth: dict, predictions: Sequence[dict], use_categories: bool = True) -> dict[str, float]:
    """Mask AP with pycocotools' COCOeval.

    ``ground_truth``: a COCO instances dict (``images``, ``annotations`` with RLE ``segmentation``,
    ``categories``). ``predictions``: ``[{image_id, category_id, segmentation (RLE), score}]``.
    ``use_categories=False`` pools every category (class-agnostic AP, as GCG's AP50 is computed).
    Returns ``AP`` (IoU .50:.95), ``AP50``, ``AP75``.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    for i, p in enumerate(predictions):
        missing = {"image_id", "category_id", "segmentation", "score"} - set(p)
        if missing:
            raise ValueError(f"prediction #{i} lacks {sorted(missing)}")
    gt = COCO()
    gt.dataset = ground_truth
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        if not predictions:
            return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
        dt = gt.loadRes([dict(p) for p in predictions])
        ev = COCOeval(gt, dt, iouType="segm")
        ev.params.useCats = int(use_categories)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = [max(float(s), 0.0) for s in ev.stats[:3]]  # -1 means "no ground truth": report 0
    return {"AP": stats[0], "AP50": stats[1], "AP75": stats[2]}


# ----------------------------------------------------------------------------------------------
# token-level AP


def _binary(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    """Flat 0 / 1 labels and float64 scores of one length, or an error saying what is wrong."""
    y = np.asarray(labels).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"{y.size} labels for {s.size} scores")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    return y.astype(np.int64), s


def auroc(labels, scores) -> float:
    """Area under the ROC curve of ``scores`` separating the positives (``labels == 1``) from the
    negatives: the probability that a random positive scores above a random negative, ties counting
    one half (the Mann-Whitney U statistic over both counts). Defined only with both classes."""
    y, s = _binary(labels, scores)
    n_pos, n_neg = int(y.sum()), int((1 - y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUROC needs both classes, got {n_pos} positives and {n_neg} negatives")
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2.0)[inverse]  # average 1-based rank of tied scores
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def average_precision(labels, scores) -> float:
    """Average precision of ``scores`` ranking the positives (``labels == 1``) first.

    ``AP = sum_n (R_n - R_{n-1}) P_n`` over the distinct score thresholds, from the highest down
    (tied scores enter together). Defined only when there is at least one positive.
    """
    y, s = _binary(labels, scores)
    n_pos = int(y.sum())
    if n_pos == 0:
        raise ValueError("average precision is undefined without a positive label")
    order = np.argsort(-s, kind="mergesort")
    y, s = y[order], s[order]
    last_of_tie = np.r_[np.nonzero(np.diff(s))[0], y.size - 1]
    tp = np.cumsum(y)[last_of_tie]
    precision = tp / (last_of_tie + 1)
    recall = tp / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def seed_summary(arm: str, per_seed: Sequence[Mapping[str, float]], figures: Sequence[str]) -> dict[str, float]:
    """``<arm>/mean/<figure>`` and ``<arm>/std/<figure>`` (ddof 1) over the seeds' metrics, for each
    figure that every seed reported."""
    out = {}
    for k in figures:
        values = [m[k] for m in per_seed if k in m]
        if len(values) == len(per_seed):
            out |= {f"{arm}/mean/{k}": float(np.mean(values)), f"{arm}/std/{k}": float(np.std(values, ddof=1))}
    return out
