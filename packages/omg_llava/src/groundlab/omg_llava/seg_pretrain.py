"""Pre-training the tiny OMG-Seg on the synthetic world (the CPU default's stand-in for the released
segmenter), and its evaluation.

Tasks, as OMG-Seg is trained: panoptic segmentation (every object is a "thing" of class
kind x colour; Hungarian set loss over the learned queries) and interactive segmentation (one prompt
per image, a point, a box or the object's mask, kind drawn per batch; the prompt query's masks
trained with the point-sampled mask loss at every prediction).

Evaluation on held-out scenes: panoptic quality (PQ, with its SQ / RQ factors) from Mask2Former's
panoptic inference, mean IoU of the prompted masks per prompt kind, and how often each object's
best-overlapping query names its class, colour and kind.
"""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from groundlab.shared.world import Scene, World

from .losses import mask_loss, set_loss
from .omg_seg import OMGSegModel
from .segmenter import Prediction

KINDS = ("point", "box", "mask")


def class_names(world: World) -> list[str]:
    cfg = world.config
    return [f"{c} {k}" for k in cfg.kinds for c in cfg.colours]


def class_index(world: World, obj) -> int:
    return class_names(world).index(f"{obj.colour} {obj.kind}")


def interior_point(mask: np.ndarray, rng: random.Random) -> tuple[int, int]:
    ys, xs = np.nonzero(mask)
    i = rng.randrange(len(ys))
    return int(xs[i]), int(ys[i])


class WorldPanopticDataset(Dataset):
    def __init__(self, world: World, split: str, n_scenes: int, seed: int = 0):
        self.world, self.scenes = world, [world.scene(split, i) for i in range(n_scenes)]
        self.rng = random.Random(seed)

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, i: int) -> dict:
        s: Scene = self.scenes[i]
        target = self.rng.randrange(len(s.objects))
        obj = s.objects[target]
        x0, y0, w, h = obj.bbox
        return {"image": s.image, "labels": torch.tensor([class_index(self.world, o) for o in s.objects]),
                "masks": torch.from_numpy(np.stack([o.mask for o in s.objects])),
                "point": torch.tensor(interior_point(obj.mask, self.rng), dtype=torch.float32),
                "box": torch.tensor([x0, y0, x0 + w, y0 + h], dtype=torch.float32),
                "prompt_mask": torch.from_numpy(obj.mask)}


class PanopticCollator:
    """Images through the model's preprocessing; targets as lists; one prompt kind per batch (drawn,
    or always ``kind``)."""

    def __init__(self, model: OMGSegModel, seed: int = 0, kind: str | None = None):
        if kind is not None and kind not in KINDS:
            raise ValueError(f"prompt kind must be one of {KINDS}, got {kind!r}")
        self.model, self.rng, self.kind = model, random.Random(seed), kind

    def __call__(self, samples: list[dict]) -> dict:
        kind = self.kind or KINDS[self.rng.randrange(len(KINDS))]
        batch = {"pixel_values": self.model.preprocess([s["image"] for s in samples]),
                 "labels": [s["labels"] for s in samples], "masks": [s["masks"] for s in samples],
                 "prompt_target": torch.stack([s["prompt_mask"] for s in samples]),
                 "prompt_kind": kind}
        scale = self.model.config.image_size / samples[0]["image"].shape[0]
        if kind == "point":
            batch["prompts"] = torch.stack([s["point"] for s in samples])[:, None] * scale
        elif kind == "box":
            batch["prompts"] = torch.stack([s["box"] for s in samples])[:, None] * scale
        else:
            m = batch["prompt_target"][:, None].float()
            size = self.model.config.image_size
            batch["prompts"] = F.interpolate(m, size=(size, size), mode="nearest") > 0.5
        return batch


def semantic_map(labels: list[torch.Tensor], masks: list[torch.Tensor], background: int) -> torch.Tensor:
    """(B, H, W) per-pixel class ids of a batch: each object's class on its mask, ``background`` elsewhere
    (the world's visible masks do not overlap)."""
    from groundlab.shared.bases.sam import class_map  # 0 = background there

    shape = masks[0].shape[-2:]
    out = []
    for b, (lab, m) in enumerate(zip(labels, masks)):
        if m.shape[-2:] != shape:
            raise ValueError(f"image {b} of the batch: masks of {tuple(m.shape[-2:])}, the first image's {tuple(shape)}")
        ids = class_map(m.float(), lab + 1)
        out.append(torch.where(ids == 0, background, ids - 1))
    return torch.stack(out).to(masks[0].device)


class SemanticPretraining(nn.Module):
    """The tiny segmenter's first stage: its encoder (ConvNeXt backbone + pixel decoder) learns per-pixel
    classes through a 1x1 head on the stride-4 mask features (cross-entropy against the class map,
    background included); the head is dropped afterwards. It stands in for what the release's OMG-Seg
    starts from, a CLIP-pretrained ConvNeXt that already knows what things are: trained from scratch
    on panoptic + prompt losses alone, the tiny encoder learns each object's colour but not its kind
    (circle / square / triangle at chance), and nothing downstream (object tokens, the LLM) can then
    tell kinds apart (README). Square images only: the mask features cover the padded square."""

    def __init__(self, model: OMGSegModel):
        super().__init__()
        self.model = model
        self.head = nn.Conv2d(model.config.mask_dim, model.config.num_classes + 1, 1)

    def forward(self, pixel_values, labels, masks, **unused):
        h, w = masks[0].shape[-2:]
        if h != w:
            raise ValueError(f"semantic pre-training takes square images; got masks of {h}x{w}")
        target = semantic_map(labels, masks, self.model.config.num_classes)
        logits = self.head(self.model.encode(pixel_values)["mask_features"])
        logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        return {"loss": F.cross_entropy(logits, target)}


class SegmenterForTraining(nn.Module):
    def __init__(self, model: OMGSegModel, num_points: int = 1024, prompt_weight: float = 1.0):
        super().__init__()
        dec = model.decoder
        if dec.classifier == "clip" and not bool(dec.class_embeddings.abs().sum() > 0):
            raise ValueError("the 'clip' classifier has no class text embeddings (decoder.class_embeddings is all "
                             "zero): load them (convert.convert_omg_seg) or use classifier='linear'")
        self.model, self.num_points, self.prompt_weight = model, num_points, prompt_weight

    def forward(self, pixel_values, labels, masks, prompts, prompt_kind, prompt_target):
        enc = self.model.encode(pixel_values)
        preds = self.model.decode(enc)
        targets = [{"labels": lab, "masks": m} for lab, m in zip(labels, masks)]
        out = set_loss(preds, targets, self.model.config.num_classes, num_points=self.num_points)
        prompt_preds = self.model.run_prompts(enc, prompt_kind, prompts)
        logits = torch.stack([p.mask_logits[:, 0] for p in prompt_preds])  # (L, B, h, w): every prediction at once
        tgt = prompt_target.float()  # full resolution: mask_loss samples it at the logits' points
        p_loss = mask_loss(logits.flatten(0, 1), tgt.repeat(len(prompt_preds), 1, 1), self.num_points,
                           bce_weight=5.0, dice_weight=5.0, reduce=False).view(len(prompt_preds), -1).mean(1).sum()
        return {"loss": out["loss"] + self.prompt_weight * p_loss}


# ----------------------------------------------------------------------------------------------
# evaluation


def panoptic_inference(pred, image_size: int, score_threshold: float = 0.5, overlap: float = 0.8):
    """Mask2Former's panoptic inference for one image: (segment map (H, W) int, -1 = void,
    [(segment id, class)]) from one prediction (class logits (Q, C+1), mask logits (Q, h, w))."""
    scores, classes = pred.class_logits.softmax(-1)[:, :-1].max(-1)
    keep = scores > score_threshold
    masks = F.interpolate(pred.mask_logits[None], size=(image_size, image_size), mode="bilinear",
                          align_corners=False)[0].sigmoid()
    seg = torch.full((image_size, image_size), -1, dtype=torch.long)
    segments = []
    if keep.any():
        prob = scores[keep][:, None, None] * masks[keep]
        owner = prob.argmax(0)
        for k, (q_cls, q_mask) in enumerate(zip(classes[keep], masks[keep])):
            region = (owner == k) & (q_mask >= 0.5)
            original = q_mask >= 0.5
            if region.sum() == 0 or original.sum() == 0 or region.sum() / original.sum() < overlap:
                continue
            seg[region] = len(segments)
            segments.append(int(q_cls))
    return seg, segments


def panoptic_quality(pred_segs, gt_segs) -> dict[str, float]:
    """PQ / SQ / RQ over images: ``pred_segs`` and ``gt_segs`` are per image (segment map, classes)
    with -1 void; a prediction matches a ground-truth segment of its class at IoU > 0.5."""
    tp, fp, fn, iou_sum = 0, 0, 0, 0.0
    for (pmap, pcls), (gmap, gcls) in zip(pred_segs, gt_segs):
        matched_p = set()
        for g, gc in enumerate(gcls):
            gm = gmap == g
            best = None
            for p, pc in enumerate(pcls):
                if pc != gc or p in matched_p:
                    continue
                pm = pmap == p
                inter = (gm & pm).sum().item()
                union = (gm | pm).sum().item()
                if union and inter / union > 0.5:
                    best = (p, inter / union)
                    break
            if best is None:
                fn += 1
            else:
                matched_p.add(best[0])
                tp += 1
                iou_sum += best[1]
        fp += len(pcls) - len(matched_p)
    sq = iou_sum / tp if tp else 0.0
    rq = tp / (tp + 0.5 * fp + 0.5 * fn) if (tp + fp + fn) else 1.0
    return {"PQ": sq * rq, "SQ": sq, "RQ": rq, "TP": tp, "FP": fp, "FN": fn}


@torch.no_grad()
def evaluate(model: OMGSegModel, world: World, split: str = "val", n_scenes: int = 100, seed: int = 0) -> dict:
    """PQ of panoptic inference and prompted-mask mIoU per prompt kind on held-out scenes."""
    model.eval()
    ds = WorldPanopticDataset(world, split, n_scenes, seed)
    pred_segs, gt_segs = [], []
    ious = {k: [] for k in KINDS}
    names = [n.split() for n in class_names(world)]  # (colour, kind) per class
    recognised = {"class": [], "colour": [], "kind": []}
    collate = PanopticCollator(model, seed)
    size = world.config.image_size
    for start in range(0, len(ds), 16):
        samples = [ds[i] for i in range(start, min(start + 16, len(ds)))]
        batch = collate(samples)
        enc = model.encode(batch["pixel_values"])
        last = model.decode(enc)[-1]
        for b, s in enumerate(samples):
            one = Prediction(last.class_logits[b], last.mask_logits[b], last.iou[b], last.query[b])
            pred_segs.append(panoptic_inference(one, size))
            gmap = torch.full((size, size), -1, dtype=torch.long)
            for g, m in enumerate(s["masks"]):
                gmap[m] = g
            gt_segs.append((gmap, s["labels"].tolist()))
            # each object's best-overlapping query: does its class name the object?
            masks = F.interpolate(one.mask_logits[None], size=(size, size), mode="bilinear", align_corners=False)[0] > 0
            classes = one.class_logits[:, :-1].argmax(-1)
            for m, lab in zip(s["masks"], s["labels"].tolist()):
                q = int(((masks & m).sum((1, 2)) / (masks | m).sum((1, 2)).clamp(min=1)).argmax())
                guess, truth = names[int(classes[q])], names[lab]
                recognised["class"].append(guess == truth)
                recognised["colour"].append(guess[0] == truth[0])
                recognised["kind"].append(guess[1] == truth[1])
        for kind in KINDS:
            batch_k = PanopticCollator(model, seed, kind)(samples)
            logits = model.run_prompts(enc, kind, batch_k["prompts"])[-1].mask_logits[:, 0]
            up = F.interpolate(logits[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
            for pm, tm in zip(up > 0, batch_k["prompt_target"]):
                inter, union = (pm & tm).sum().item(), (pm | tm).sum().item()
                ious[kind].append(inter / union if union else 1.0)
    out = {f"panoptic/{k}": v for k, v in panoptic_quality(pred_segs, gt_segs).items()}
    out |= {f"prompt_{k}/mIoU": float(np.mean(v)) for k, v in ious.items()}
    out |= {f"objects/{k}_acc": float(np.mean(v)) for k, v in recognised.items()}
    return out
