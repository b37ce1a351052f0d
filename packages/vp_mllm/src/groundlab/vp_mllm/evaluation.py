"""Evaluation in two steps: predictions to JSONL (:func:`predict`), then scores from the file
(:func:`score`; ``groundlab-vp-mllm eval --predictions FILE`` does the second step alone).

A prediction row: ``{"id", "task", "kind", "question", "answer", "prediction"}``. Tasks:

- ``labels`` (referring object classification): every marked region's category, one
  ``<Region n>: label`` line each; per region: label accuracy (colour and kind named), Semantic
  Similarity and Semantic IoU against the true ``colour kind`` (:mod:`groundlab.vp_mllm.metrics`). A
  region the answer leaves out scores as the empty prediction.
- ``single``: the same with one region marked (the same prompt as in its ``labels`` record): the
  prompt's reading without the binding of ``<Region n>`` to the n-th of several slots.
- ``caption`` (region captioning): METEOR and CIDEr against the region's phrase (COCO caption eval).
- ``ocr`` (regional OCR): case-insensitive exact match of the letter on the region.

Every figure is reported per prompt kind (``box/...``, ``point/...``). Prediction is split over
torchrun processes (one block of records each) and gathered in record order.
"""

from __future__ import annotations

from pathlib import Path

import torch

from groundlab.shared.config import iter_jsonl
from groundlab.shared.devices import model_device, to_device
from groundlab.shared.distributed import gather_shards, shard, write_jsonl
from groundlab.shared.metrics import caption_metrics
from groundlab.shared.world_io import load_image

from .data import parse_labels
from .metrics import default_embedder, names_label, semantic_iou
from .processing import VisualPrompts, VPCollator, VPProcessor

FIELDS = ("id", "task", "kind", "question", "answer", "prediction")


def question_of(record: dict) -> str:
    return record["conversations"][0]["value"].replace("<image>", "").strip()


@torch.no_grad()
def predict(model, processor: VPProcessor, records: list[dict], image_root: str | Path, out_path: str | Path,
            batch_size: int = 16, use_prompts: bool = True, max_new_tokens: int = 48) -> Path:
    """Greedy answers to each record's first question, written as JSONL rows (see the module docstring)."""
    model.eval()
    tok = processor.tokenizer
    collate = VPCollator(tok.pad_token_id, padding_side="left")
    mine = list(shard(len(records)))
    rows = []
    for start in range(0, len(mine), batch_size):
        chunk = [records[i] for i in mine[start:start + batch_size]]
        samples = []
        for rec in chunk:
            image = load_image(Path(image_root) / rec["image"])
            prompts = VisualPrompts.from_record(rec, f"record {rec.get('id')}")
            samples.append(processor.prompt(image, question_of(rec), prompts, use_prompts, where=f"record {rec.get('id')}"))
        batch = to_device(collate(samples), model_device(model))  # the model may be on a GPU
        gen = model.generate(batch["input_ids"], batch["pixel_values"], batch["attention_mask"], batch["vp_coords"],
                             batch["vp_valid"], batch["vp_is_box"], max_new_tokens=max_new_tokens,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        for rec, ids in zip(chunk, gen.tolist()):
            if tok.eos_token_id in ids:
                ids = ids[: ids.index(tok.eos_token_id)]
            rows.append({"id": rec["id"], "task": rec["task"], "kind": rec["kind"], "question": question_of(rec),
                         "answer": rec["conversations"][1]["value"], "prediction": processor.decode(ids)})
    return write_jsonl(gather_shards(rows), out_path)


def read_predictions(path: str | Path) -> list[dict]:
    rows = []
    for lineno, row in iter_jsonl(path, "predictions file"):
        missing = [k for k in FIELDS if not isinstance(row.get(k), str)]
        if missing:
            raise ValueError(f"{path}:{lineno}: missing or non-text fields {missing}")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no predictions")
    return rows


def constant_predictions(records: list[dict], answer: str) -> list[dict]:
    """Rows answering every region of every ``labels`` / ``single`` record with ``answer`` (the majority
    baseline)."""
    rows = []
    for rec in records:
        if rec["task"] not in ("labels", "single"):
            continue
        truth = rec["conversations"][1]["value"]
        regions = sorted(parse_labels(truth, rec["kind"]))
        ref = "Mark" if rec["kind"] == "point" else "Region"
        rows.append({"id": rec["id"], "task": rec["task"], "kind": rec["kind"], "question": question_of(rec),
                     "answer": truth, "prediction": "\n".join(f"<{ref} {n}>: {answer}" for n in regions)})
    return rows


def random_object_scores(records: list[dict], embedder=None) -> dict[str, float]:
    """The expected label scores of naming, for each region, a uniformly random object of its scene
    (what a model that lists the scene without reading the prompts gets), per prompt kind, for the
    ``labels`` and ``single`` records of the world export: a scene's objects are those of its
    ``<scene>-<kind>-labels`` record (every object marked). Keys as :func:`score`'s."""
    scenes = {r["id"].removesuffix("-labels"): list(parse_labels(r["conversations"][1]["value"], r["kind"]).values())
              for r in records if r["task"] == "labels"}
    out: dict[str, float] = {}
    for kind in sorted({r["kind"] for r in records}):
        for task in ("labels", "single"):
            preds, truths, weights = [], [], []
            for r in records:
                if r["kind"] != kind or r["task"] != task:
                    continue
                stem = r["id"].removesuffix("-labels") if task == "labels" else r["id"].rsplit("-single-", 1)[0]
                if stem not in scenes:
                    raise ValueError(f"record {r['id']}: no labels record {stem}-labels lists its scene's objects")
                for text in parse_labels(r["conversations"][1]["value"], kind).values():
                    preds += scenes[stem]
                    truths += [text] * len(scenes[stem])
                    weights += [1 / len(scenes[stem])] * len(scenes[stem])
            if not preds:
                continue
            n = sum(weights)
            sims = (embedder or default_embedder()).similarity(preds, truths)
            out |= {f"{kind}/{task}/accuracy": sum(w * names_label(p, *t.split()) for p, t, w in zip(preds, truths, weights)) / n,
                    f"{kind}/{task}/semantic_similarity": sum(w * v for v, w in zip(sims, weights)) / n,
                    f"{kind}/{task}/semantic_iou": sum(w * semantic_iou(p, t) for p, t, w in zip(preds, truths, weights)) / n,
                    f"{kind}/{task}/regions": round(n)}
    return out


def score(rows: list[dict], embedder=None) -> dict[str, float]:
    """Every figure of the module docstring, per prompt kind, from prediction rows."""
    out: dict[str, float] = {}
    for kind in sorted({r["kind"] for r in rows}):
        mine = [r for r in rows if r["kind"] == kind]
        for task in ("labels", "single"):
            out |= {f"{kind}/{task}/{k}": v for k, v in _score_labels([r for r in mine if r["task"] == task],
                                                                      embedder).items()}
        caps = [r for r in mine if r["task"] == "caption"]
        if caps:
            scores = caption_metrics({r["id"]: r["prediction"] for r in caps}, {r["id"]: [r["answer"]] for r in caps},
                                     metrics=("METEOR", "CIDEr"))
            out |= {f"{kind}/caption/{k}": v for k, v in scores.items()} | {f"{kind}/caption/n": len(caps)}
        ocr = [r for r in mine if r["task"] == "ocr"]
        if ocr:
            hits = [r["prediction"].strip().lower() == r["answer"].strip().lower() for r in ocr]
            out |= {f"{kind}/ocr/exact_match": sum(hits) / len(hits), f"{kind}/ocr/n": len(ocr)}
    return out


def _score_labels(rows: list[dict], embedder=None) -> dict[str, float]:
    if not rows:
        return {}
    preds, truths = [], []
    for r in rows:
        truth, pred = parse_labels(r["answer"], r["kind"]), parse_labels(r["prediction"], r["kind"])
        for n, text in sorted(truth.items()):
            truths.append(text)
            preds.append(pred.get(n, ""))
    hits = [names_label(p, *t.split()) for p, t in zip(preds, truths)]
    sims = (embedder or default_embedder()).similarity(preds, truths)
    n = len(truths)
    return {"accuracy": sum(hits) / n, "semantic_similarity": sum(sims) / n,
            "semantic_iou": sum(semantic_iou(p, t) for p, t in zip(preds, truths)) / n, "regions": n}
