"""Evaluation in two steps, as the paper's scripts: predictions to JSONL, then scores from the JSONL.

- RES (referring segmentation): prompt ``"Please segment {sent} in this image."``, greedy answer, the
  first ``[SEG]``'s last-layer mask, padding undone, ``sigmoid > 0.5``; cIoU (sum of intersections over
  sum of unions) and gIoU (mean per-sample IoU).
- GCG (grounded captioning): the caption (tags removed) against the reference by METEOR and CIDEr;
  masks by class-agnostic mask AP50 (COCOeval), mIoU after greedy one-to-one IoU matching of predicted
  to reference masks (unmatched references count 0), and recall: a reference phrase is recalled when
  its matched mask has IoU > 0.5 and the phrases' similarity > 0.5. The paper's similarity is a
  sentence-embedding cosine; here it is the F1 of word overlap (no embedding model offline).
- Region captioning (``<region>`` prompts): METEOR and CIDEr against the reference description.

Each prediction record: ``{"id", "task", "answer", "masks": [RLE], "scores": [float]}`` (masks in the
original image's frame, in ``[SEG]`` order; scores = mean probability inside each mask).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

from groundlab.shared.config import iter_jsonl
from groundlab.shared.devices import model_device
from groundlab.shared.distributed import gather_shards, shard, write_jsonl
from groundlab.shared.metrics import caption_metrics, mask_ap, mask_box, mask_iou, res_metrics
from groundlab.shared.world_io import decode_rle, encode_rle, load_image

from .data import Sample
from .dataset import OMGDataset
from .processing import BOP, EOP, SEG, OMGCollator, from_input_frame

TAG = re.compile(rf"{re.escape(BOP)}\s*(.*?)\s*{re.escape(EOP)}")


def answer_text(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False).strip()


def plain_caption(answer: str) -> str:
    """A GCG answer without its tags: ``<p> a red circle </p> [SEG] and ...`` -> ``a red circle and ...``."""
    text = TAG.sub(r"\1", answer).replace(SEG, "")
    return re.sub(r"\s+([.,])", r"\1", re.sub(r"\s+", " ", text)).strip()


def seg_phrases(answer: str) -> list[str]:
    """The phrase each ``[SEG]`` of an answer grounds, in order: the ``<p> ... </p>`` just before it
    (empty when there is none)."""
    out, last = [], 0
    for m in re.finditer(re.escape(SEG), answer):
        tags = list(TAG.finditer(answer, last, m.start()))
        out.append(tags[-1].group(1) if tags else "")
        last = m.end()
    return out


@torch.no_grad()
def predict(model, dataset: OMGDataset, tokenizer, out_path: str | Path, batch_size: int = 32,
            max_new_tokens: int = 48) -> Path:
    """Greedy answers and masks for every sample of ``dataset`` -> JSONL at ``out_path``. Under
    torchrun each process predicts its share and the first writes the whole file (the same file)."""
    collate = OMGCollator(tokenizer.pad_token_id, padding_side="left")
    mine, rows = shard(len(dataset)), []
    for start in range(mine.start, mine.stop, batch_size):
        idx = list(range(start, min(start + batch_size, mine.stop)))
        items = [dataset.prompt(i) for i in idx]
        batch = collate(items)
        results = model.generate_with_masks(batch["input_ids"], batch["attention_mask"], batch["perception"],
                                            batch["prompts"], max_new_tokens=max_new_tokens,
                                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        for i, item, (ids, logits) in zip(idx, items, results):
            prob = from_input_frame(logits, item["hw"]).sigmoid().float().cpu()
            masks = (prob > 0.5).numpy()
            scores = [float(p[m].mean()) if m.any() else 0.0 for p, m in zip(prob.numpy(), masks)]
            s = dataset.samples[i]
            rows.append({"id": s.id, "task": s.task, "image": str(s.image), "answer": answer_text(tokenizer, ids),
                         "masks": [encode_rle(m) for m in masks], "scores": scores})
    return write_jsonl(gather_shards(rows), out_path)


def read_predictions(path: str | Path, samples: list[Sample]) -> list[dict]:
    """Predictions in the order of ``samples``; a missing or extra id is an error."""
    recs = {}
    for n, r in iter_jsonl(path, "predictions"):
        if "id" not in r or "masks" not in r or "answer" not in r:
            raise ValueError(f"{path}:{n}: a prediction needs id, answer and masks")
        recs[r["id"]] = r
    ids = [s.id for s in samples]
    missing = [i for i in ids if i not in recs]
    if missing or len(recs) != len(ids):
        raise ValueError(f"{path}: predictions do not match the samples (missing {missing[:5]}, "
                         f"{len(recs)} records for {len(ids)} samples)")
    out = []
    for i in ids:
        r = dict(recs[i])
        r["masks"] = [decode_rle(m) for m in r["masks"]]
        out.append(r)
    return out


# ----------------------------------------------------------------------------------------------
# scores


def score_res(predictions: list[dict], samples: list[Sample]) -> dict[str, float]:
    """cIoU / gIoU of the first ``[SEG]``'s mask (an answer without one predicts an empty mask)."""
    preds = [p["masks"][0] if p["masks"] else np.zeros_like(s.seg_masks[0]) for p, s in zip(predictions, samples)]
    out = res_metrics(preds, [s.seg_masks[0] for s in samples])
    out["no_seg_rate"] = float(np.mean([not p["masks"] for p in predictions]))
    return out


def res_breakdown(predictions: list[dict], samples: list[Sample], instance_masks: dict) -> dict[str, float]:
    """Where RES goes wrong: the share of answers whose first mask overlaps its object at IoU >= 0.5
    (``right``), overlaps another object of the image at IoU >= 0.5 instead (``wrong_object``), or
    neither (``poor_mask``). ``instance_masks``: image path -> every object's mask."""
    counts = {"right": 0, "wrong_object": 0, "poor_mask": 0}
    for p, s in zip(predictions, samples):
        target = s.seg_masks[0]
        pred = p["masks"][0] if p["masks"] else np.zeros_like(target)
        others = [mask_iou(pred, m) for m in instance_masks[str(s.image)] if not np.array_equal(m, target)]
        if mask_iou(pred, target) >= 0.5:
            counts["right"] += 1
        elif others and max(others) >= 0.5:
            counts["wrong_object"] += 1
        else:
            counts["poor_mask"] += 1
    return {f"{k}_rate": v / max(1, len(samples)) for k, v in counts.items()}


def target_shares_category(sample: Sample, instance_masks: dict, instance_categories: dict) -> bool:
    """Whether another annotated object of a RES sample's image has its target's category (the
    target found among the image's objects by its mask; not exactly one match is an error)."""
    path = str(sample.image)
    masks, cats = instance_masks[path], instance_categories[path]
    if len(masks) != len(cats):
        raise ValueError(f"{path}: {len(masks)} instance masks but {len(cats)} categories")
    own = [i for i, m in enumerate(masks) if np.array_equal(m, sample.seg_masks[0])]
    if len(own) != 1:
        raise ValueError(f"RES sample {sample.id}: its target is {len(own)} of the image's annotated objects, not one")
    return sum(c == cats[own[0]] for c in cats) > 1


def res_by_distractor(predictions: list[dict], samples: list[Sample], instance_masks: dict,
                      instance_categories: dict) -> dict[str, float]:
    """RES split by whether another object of the image shares the target's category (RefCOCO's
    same-category distractor: the expression must then say more than the category; in the world, a
    second object of the same kind, so the colour or the place decides). Per split: cIoU / gIoU, the
    share of answers on the right object (IoU >= 0.5) and the item count. ``instance_categories``:
    image path -> every object's category id, in ``instance_masks``' order."""
    groups: dict[str, list] = {"same_category": [], "unique_category": []}
    for p, s in zip(predictions, samples):
        target = s.seg_masks[0]
        pred = p["masks"][0] if p["masks"] else np.zeros_like(target)
        shared = target_shares_category(s, instance_masks, instance_categories)
        groups["same_category" if shared else "unique_category"].append((pred, target))
    out: dict[str, float] = {}
    for name, items in groups.items():
        out[f"{name}/n"] = len(items)
        if items:
            preds, targets = zip(*items)
            out |= {f"{name}/{k}": v for k, v in res_metrics(list(preds), list(targets)).items()}
            out[f"{name}/right_rate"] = float(np.mean([mask_iou(a, b) >= 0.5 for a, b in items]))
    return out


def phrase_similarity(a: str, b: str) -> float:
    """F1 of the two phrases' word multisets (lower-cased)."""
    wa, wb = a.lower().split(), b.lower().split()
    if not wa or not wb:
        return 0.0
    common = sum(min(wa.count(w), wb.count(w)) for w in set(wa))
    if common == 0:
        return 0.0
    p, r = common / len(wa), common / len(wb)
    return 2 * p * r / (p + r)


def greedy_match(ious: np.ndarray) -> list[tuple[int, int]]:
    """One-to-one (reference, prediction) pairs, highest IoU first (pairs with IoU 0 are not made)."""
    pairs, used_r, used_p = [], set(), set()
    order = np.dstack(np.unravel_index(np.argsort(-ious, axis=None), ious.shape))[0] if ious.size else []
    for r, p in order:
        if r in used_r or p in used_p or ious[r, p] <= 0:
            continue
        pairs.append((int(r), int(p)))
        used_r.add(r)
        used_p.add(p)
    return pairs


def reference_phrases(s: Sample) -> list[str]:
    return seg_phrases(s.conversation[-1]["value"])


def score_gcg(predictions: list[dict], samples: list[Sample]) -> dict[str, float]:
    caps = {s.id: plain_caption(p["answer"]) or "." for p, s in zip(predictions, samples)}
    refs = {s.id: [plain_caption(s.conversation[-1]["value"])] for s in samples}
    out = {k: v for k, v in caption_metrics(caps, refs, ("METEOR", "CIDEr")).items()}
    ious_all, recalled, n_ref = [], 0, 0
    images, anns, dets = [], [], []
    for k, (p, s) in enumerate(zip(predictions, samples)):
        h, w = s.seg_masks[0].shape
        images.append({"id": k, "height": h, "width": w})
        for m in s.seg_masks:
            anns.append({"id": len(anns) + 1, "image_id": k, "category_id": 1, "segmentation": encode_rle(m),
                         "area": float(m.sum()), "bbox": _bbox(m), "iscrowd": 0})
        for m, sc in zip(p["masks"], p["scores"]):
            if m.any():
                dets.append({"image_id": k, "category_id": 1, "segmentation": encode_rle(m), "score": sc})
        ious = np.array([[mask_iou(pm, gm) for pm in p["masks"]] for gm in s.seg_masks]).reshape(
            len(s.seg_masks), len(p["masks"]))
        matched = dict(greedy_match(ious))
        pred_phr, ref_phr = seg_phrases(p["answer"]), reference_phrases(s)
        for r in range(len(s.seg_masks)):
            n_ref += 1
            iou = ious[r, matched[r]] if r in matched else 0.0
            ious_all.append(iou)
            if r in matched and iou > 0.5 and matched[r] < len(pred_phr) and \
                    phrase_similarity(pred_phr[matched[r]], ref_phr[r]) > 0.5:
                recalled += 1
    gt = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "object"}]}
    out["AP50"] = mask_ap(gt, dets, use_categories=False)["AP50"]
    out["mIoU"] = float(np.mean(ious_all)) if ious_all else 0.0
    out["recall"] = recalled / max(1, n_ref)
    return out


def _bbox(m: np.ndarray) -> list[float]:
    """COCO's ``[x, y, width, height]`` of a mask (zeros when empty)."""
    box = mask_box(m)
    if box is None:
        return [0.0, 0.0, 0.0, 0.0]
    x0, y0, x1, y1 = box
    return [float(x0), float(y0), float(x1 - x0 + 1), float(y1 - y0 + 1)]


def score_region(predictions: list[dict], samples: list[Sample]) -> dict[str, float]:
    caps = {s.id: p["answer"] or "." for p, s in zip(predictions, samples)}
    refs = {s.id: [s.conversation[-1]["value"]] for s in samples}
    return caption_metrics(caps, refs, ("METEOR", "CIDEr"))


SCORERS = {"res": score_res, "gcg": score_gcg, "region": score_region}


def score(task: str, predictions_path: str | Path, samples: list[Sample]) -> dict[str, float]:
    if task not in SCORERS:
        raise ValueError(f"no scorer for task {task!r}; known: {sorted(SCORERS)}")
    return SCORERS[task](read_predictions(predictions_path, samples), samples)


# ----------------------------------------------------------------------------------------------
# trivial baselines (written as predictions, scored by the same code)


def baseline_predictions(samples: list[Sample], kind: str, out_path: str | Path, seed: int = 0,
                         instance_masks: dict | None = None, answer: str = "") -> Path:
    """``whole`` (every pixel), ``random_object`` (a uniformly drawn instance of the same image from
    ``instance_masks``: image path -> list of masks), ``largest_object`` (its largest instance),
    ``union`` (every instance of the image: the
    strongest mask that ignores the expression) or ``constant`` (the same ``answer`` text for every
    sample, with whole-image masks for its ``[SEG]`` tokens)."""
    rng = np.random.default_rng(seed)
    with open(out_path, "w") as f:
        for s in samples:
            h, w = s.seg_masks[0].shape if s.seg_masks else (1, 1)
            text = answer
            if kind == "whole":
                masks = [np.ones((h, w), bool)]
                text = f"It is {SEG}."
            elif kind == "random_object":
                pool = instance_masks[str(s.image)]
                masks = [pool[rng.integers(len(pool))]]
                text = f"It is {SEG}."
            elif kind == "largest_object":
                masks = [max(instance_masks[str(s.image)], key=lambda m: int(m.sum()))]
                text = f"It is {SEG}."
            elif kind == "union":
                masks = [np.any(instance_masks[str(s.image)], axis=0)]
                text = f"It is {SEG}."
            elif kind == "constant":
                masks = [np.ones((h, w), bool) for _ in range(answer.count(SEG))]
            else:
                raise ValueError(f"unknown baseline {kind!r}")
            f.write(json.dumps({"id": s.id, "task": s.task, "image": str(s.image), "answer": text,
                                "masks": [encode_rle(m) for m in masks], "scores": [1.0] * len(masks)}) + "\n")
    return Path(out_path)


@torch.no_grad()
def oracle_query_predictions(segmenter, samples: list[Sample], out_path: str | Path, batch_size: int = 32) -> Path:
    """RES's upper bound through the frozen segmenter's own queries: per sample, the one of the
    decoder's query masks (last layer, thresholded at 0.5 in the image's frame) that overlaps the
    target best, what a ``[SEG]`` that picked the right query would give. Scored as predictions."""
    images = sorted({str(s.image) for s in samples})
    masks: dict[str, np.ndarray] = {}
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        arrays = [np.asarray(load_image(p)) for p in chunk]
        pixels = segmenter.preprocess(arrays).to(model_device(segmenter))
        logits = segmenter(pixels)[-1].mask_logits  # (B, Q, s, s)
        for path, im, q in zip(chunk, arrays, logits):
            masks[path] = (from_input_frame(q, im.shape[:2]) > 0).cpu().numpy()
    rows = []
    for s in samples:
        queries = masks[str(s.image)]
        best = max(range(len(queries)), key=lambda i: mask_iou(queries[i], s.seg_masks[0]))
        rows.append({"id": s.id, "task": s.task, "image": str(s.image), "answer": f"It is {SEG}.",
                     "masks": [encode_rle(queries[best])], "scores": [1.0]})
    return write_jsonl(rows, out_path)



@torch.no_grad()
def object_token_coverage(model, samples: list[Sample], instances: dict[str, list[np.ndarray]],
                          batch_size: int = 32) -> dict[str, float]:
    """Which RES targets can get an object-centric token, on ``model.config``'s token grid (where the
    object tokens are chosen: a query that wins no cell gets none):

    - ``coverage_perfect_masks``: the design's bound: with every object's true mask as its query's,
      the share of targets that win at least one cell against the image's other objects;
    - ``coverage``: with the segmenter's own masks, the share of targets whose best-overlapping query
      (as :func:`oracle_query_predictions` picks it) is a valid one.
    """
    from .perception import perception_prior
    from .processing import to_input_frame

    seg, g = model.segmenter, model.config.grid
    size = seg.config.image_size
    images = sorted({str(s.image) for s in samples})
    won: dict[str, set[int]] = {}
    best_valid: dict[str, tuple[np.ndarray, torch.Tensor]] = {}
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        arrays = [np.asarray(load_image(p)) for p in chunk]
        last = seg(seg.preprocess(arrays).to(model.device))[-1]
        for b, (path, im) in enumerate(zip(chunk, arrays)):
            _, valid = perception_prior(last.class_logits[b], last.mask_logits[b], last.query[b],
                                        seg.decoder.query_embed.weight, (g, g))
            best_valid[path] = ((from_input_frame(last.mask_logits[b], im.shape[:2]) > 0).cpu().numpy(), valid.cpu())
            truth = to_input_frame(instances[path], size).float()
            cells = torch.nn.functional.interpolate(truth[None], size=(g, g), mode="bilinear", align_corners=False)[0]
            cells = cells.flatten(1)
            won[path] = {int(i) for i, top in zip(cells.argmax(0), cells.max(0).values) if top > 0}
    perfect, real = [], []
    for s in samples:
        path, target = str(s.image), s.seg_masks[0]
        own = [i for i, m in enumerate(instances[path]) if np.array_equal(m, target)]
        if len(own) != 1:
            raise ValueError(f"RES sample {s.id}: its target is {len(own)} of the image's annotated objects, not one")
        perfect.append(own[0] in won[path])
        masks, valid = best_valid[path]
        real.append(bool(valid[max(range(len(masks)), key=lambda i: mask_iou(masks[i], target))]))
    return {"coverage_perfect_masks": float(np.mean(perfect)), "coverage": float(np.mean(real))}


def _decode_alone(model, p, queries: torch.Tensor) -> list[torch.Tensor]:
    """(n, 2d) ``[query ; position]`` vectors of one image through the frozen decoder, each as if alone
    (how a ``[SEG]`` is decoded): the ``layers + 1`` mask logits, each (n, s, s)."""
    from .modeling import seg_self_mask

    feat, pos = queries[None].split(model.config.seg_config.dim, dim=-1)
    preds = model.segmenter.decoder.run_queries(feat, pos, p.mask_features, p.memory, p.pos,
                                                self_mask=seg_self_mask([len(queries)], False, queries.device))
    return [pr.mask_logits[0] for pr in preds]


def _oracle_rows(samples: list[Sample], masks: dict[str, np.ndarray]) -> list[dict]:
    return [{"id": s.id, "task": s.task, "image": str(s.image), "answer": f"It is {SEG}.",
             "masks": [encode_rle(masks[s.id])], "scores": [1.0]} for s in samples]


@torch.no_grad()
def _object_token_candidates(model, samples: list[Sample]):
    """Per image of ``samples``: ``(group, image, perception, starts, best)``: its samples, the image, its
    perception, the ``[Q ; E]`` queries the object-token oracles start from (the object tokens, or the
    decoder's learned queries when the image has none) and, per sample of ``group``, the start whose
    mask re-decoded alone by the frozen decoder overlaps its target best, and that mask."""
    dec = model.segmenter.decoder
    for path, group in _by_image(samples).items():
        im = np.asarray(load_image(path))
        p = model.perceive(model.segmenter.preprocess([im]).to(model.device))[0]
        starts = p.objects if len(p.objects) else torch.cat([dec.query_feat.weight, dec.query_embed.weight], -1)
        cand = (from_input_frame(_decode_alone(model, p, starts)[-1], im.shape[:2]) > 0).cpu().numpy()
        best = []
        for s in group:
            i = max(range(len(cand)), key=lambda k: mask_iou(cand[k], s.seg_masks[0]))
            best.append((i, cand[i]))
        yield group, im, p, starts, best


def oracle_object_token_predictions(model, samples: list[Sample], out_path: str | Path) -> Path:
    """RES's bound through the object tokens: per sample, the best (IoU with the target) of the image's
    object-centric tokens, each ``[Q ; E]`` re-decoded by the frozen decoder as a ``[SEG]`` query:
    what an LLM that copied the right object token into ``text2vision`` (stage 1 teaches it to
    reconstruct them) would give. A target with no object token of its own scores what the nearest
    does; an image with no object token at all, an empty mask."""
    out = {}
    for group, im, p, _, best in _object_token_candidates(model, samples):
        for s, (_, mask) in zip(group, best):
            out[s.id] = mask if len(p.objects) else np.zeros(im.shape[:2], bool)
    return write_jsonl(_oracle_rows(samples, out), out_path)


def oracle_free_query_predictions(model, samples: list[Sample], out_path: str | Path, steps: int = 60,
                                  lr: float = 0.05, batch_size: int = 32) -> Path:
    """RES's ceiling for any LLM and ``text2vision``: per sample, a free ``[query ; position]`` vector
    optimised through the frozen decoder (Adam, ``steps``, the ``[SEG]`` mask loss on every prediction)
    to reproduce the target, started from the best object-token query (or the decoder's best learned
    query when the image has no object token); ``batch_size`` targets optimised at once, each alone
    against its own image."""
    from .losses import mask_loss
    from .modeling import stack_perception
    from .processing import to_input_frame

    size, dim, cfg = model.segmenter.config.image_size, model.config.seg_config.dim, model.config
    dec = model.segmenter.decoder
    items = []  # (sample, perception, start query, target in the input frame, image size)
    for group, im, p, starts, best in _object_token_candidates(model, samples):
        for s, (i, _) in zip(group, best):
            target = to_input_frame([s.seg_masks[0]], size).float().to(model.device)[0]
            items.append((s, p, starts[i], target, im.shape[:2]))
    out = {}
    for lo in range(0, len(items), batch_size):
        chunk = items[lo:lo + batch_size]
        enc = stack_perception([p for _, p, _, _, _ in chunk])
        q = torch.stack([x for _, _, x, _, _ in chunk])[:, None].clone().requires_grad_(True)  # (B, 1, 2d)
        targets = torch.stack([t for _, _, _, t, _ in chunk])
        opt = torch.optim.Adam([q], lr=lr)
        for step in range(steps):
            feat, pos = q.split(dim, dim=-1)
            preds = dec.run_queries(feat, pos, enc["mask_features"], enc["memory"], enc["pos"])
            seeds = [lo + k + step * len(items) for k in range(len(chunk))]  # fixed per target and step
            loss = sum(mask_loss(pr.mask_logits[:, 0], targets, cfg.seg_points, bce_weight=cfg.seg_bce_weight,
                                 dice_weight=cfg.seg_dice_weight, seeds=seeds) for pr in preds)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            feat, pos = q.split(dim, dim=-1)
            last = dec.run_queries(feat, pos, enc["mask_features"], enc["memory"], enc["pos"])[-1].mask_logits[:, 0]
        for (s, _, _, _, hw), logits in zip(chunk, last):
            out[s.id] = (from_input_frame(logits[None], hw)[0] > 0).cpu().numpy()
    return write_jsonl(_oracle_rows(samples, out), out_path)


def _by_image(samples: list[Sample]) -> dict[str, list[Sample]]:
    out: dict[str, list[Sample]] = {}
    for s in samples:
        out.setdefault(str(s.image), []).append(s)
    return out
