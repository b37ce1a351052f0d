"""Evaluation in two steps: predictions to JSONL (:func:`predict`), then scores from the file
(:func:`score`; ``groundlab-clawmachine eval --predictions FILE`` does the second step alone).

Items (:class:`Item`), one question each:

- ``rec`` (grounding, REFER splits): ``Where is <expression>?``; the answer's first region is decoded
  to a box (:func:`groundlab.clawmachine.processing.decode_region`); accuracy = IoU >= 0.5 with the
  object's box (no region, or none of its codes in the image: a miss);
- ``reg`` (referring): ``What is <ref_patch>?`` with the object's region; METEOR and CIDEr against all
  of the object's expressions;
- ``yesno``: accuracy of the answer's first word (``yes`` / ``no``).

A prediction row: ``{"id", "task", "question", "prediction", "references"}`` plus, for ``rec``,
``"box"`` (the decoded box in image pixels, or null) and ``"target"`` (the object's box). Prediction is
split over torchrun processes (one block of items each) and gathered in item order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from groundlab.shared.config import iter_jsonl
from groundlab.shared.distributed import gather_shards, shard, write_jsonl
from groundlab.shared.metrics import box_iou, caption_metrics

from .data import GROUNDING
from .processing import ClawCollator, ClawProcessor, cells_box, decode_region, from_square
from .visual_tokenizer import TokenizedImage

TASKS = ("rec", "reg", "yesno")


@dataclass
class Item:
    """One evaluation question: its image (a key of the tokens), size, question, regions it shows,
    and what it is scored against (``target``: an xyxy pixel box for ``rec``)."""

    id: str
    task: str
    image: str
    width: int
    height: int
    question: str
    references: list[str]
    ref_list: list = field(default_factory=list)
    target: list[float] | None = None
    objects: list = field(default_factory=list)
    """``rec``: every object of the image as (xyxy box, area), for the trivial baselines."""


def rec_items(refer, split: str, root: str | Path, first_only: bool = True) -> list[Item]:
    """REC items of a REFER split (:class:`groundlab.shared.world_io.Refer`), their images named
    relative to ``root``; ``first_only``: each object's first expression."""
    seen, items = set(), []
    for s in refer.samples(split):
        if first_only and s.ref_id in seen:
            continue
        seen.add(s.ref_id)
        x, y, w, h = s.bbox
        height, width = s.mask.shape
        image = Path(s.image_path).resolve().relative_to(Path(root).resolve()).as_posix()
        anns = refer.coco.loadAnns(refer.coco.getAnnIds(imgIds=[s.image_id]))
        objects = [([a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]],
                    float(a["area"])) for a in anns]
        items.append(Item(f"rec-{s.ref_id}-{s.sent_id}", "rec", image, width, height,
                          GROUNDING.format(expression=s.sentence), [s.sentence], [], [x, y, x + w, y + h], objects))
    return items


def record_items(records: list[dict], sizes: dict[str, tuple[int, int]]) -> list[Item]:
    """``reg`` / ``yesno`` items of held-out records (:func:`groundlab.clawmachine.data.export_world`)."""
    items = []
    for rec in records:
        if rec.get("task") not in ("reg", "yesno"):
            raise ValueError(f"evaluation record {rec.get('id')}: 'task' must be reg or yesno, got {rec.get('task')!r}")
        refs = rec.get("references") or [rec["conversations"][1]["value"]]
        question = rec["conversations"][0]["value"].replace("<image>", "").strip()
        w, h = sizes[rec["image"]]
        items.append(Item(rec["id"], rec["task"], rec["image"], w, h, question, refs, rec.get("ref_list", [])))
    return items


@torch.no_grad()
def predict(model, processor: ClawProcessor, items: list[Item], tokens: dict[str, TokenizedImage],
            out_path: str | Path, batch_size: int = 32, max_new_tokens: int = 64, constrained: bool = True) -> Path:
    """Greedy answers to every item, written as JSONL rows (see the module docstring)."""
    model.eval()
    tok = processor.tokenizer
    collate = ClawCollator(tok.pad_token_id, padding_side="left")
    mine = list(shard(len(items)))
    rows = []
    for start in range(0, len(mine), batch_size):
        chunk = [items[i] for i in mine[start:start + batch_size]]
        images = [tokens[it.image] for it in chunk]
        batch = collate([processor.prompt_inputs(it.question, im, it.ref_list, where=it.id)
                         for it, im in zip(chunk, images)])
        gen = model.generate(batch.pop("input_ids"), batch.pop("attention_mask"), images, max_new_tokens=max_new_tokens,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, constrained=constrained,
                             **batch)
        for it, im, ids in zip(chunk, images, gen.tolist()):
            text, regions = processor.split_answer(ids)
            row = {"id": it.id, "task": it.task, "question": it.question, "prediction": text,
                   "references": it.references}
            if it.task == "rec":
                cells = decode_region(regions[0], im, processor.config.grid) if regions else None
                row["box"] = None if cells is None else list(from_square(cells_box(cells, processor.config.grid),
                                                                          it.width, it.height))
                row["target"] = it.target
            rows.append(row)
    return write_jsonl(gather_shards(rows), out_path)


def read_predictions(path: str | Path) -> list[dict]:
    rows = []
    for lineno, row in iter_jsonl(path, "predictions file"):
        bad = [k for k in ("id", "task", "question", "prediction") if not isinstance(row.get(k), str)]
        if bad or row.get("task") not in TASKS or not isinstance(row.get("references"), list):
            raise ValueError(f"{path}:{lineno}: a prediction row needs text id / task ({TASKS}) / question / "
                             f"prediction and a references list")
        if row["task"] == "rec" and not (isinstance(row.get("target"), list) and len(row["target"]) == 4):
            raise ValueError(f"{path}:{lineno}: a rec row needs its target box [x0, y0, x1, y1]")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no predictions")
    return rows


def rec_hits(boxes: list, targets: list) -> list[bool]:
    """IoU >= 0.5 per item; a missing box is a miss."""
    return [box is not None and float(box_iou(np.asarray([box]), np.asarray([t]))[0, 0]) >= 0.5
            for box, t in zip(boxes, targets)]


def score(rows: list[dict]) -> dict[str, float]:
    """Every figure of the module docstring from prediction rows."""
    out: dict[str, float] = {}
    rec = [r for r in rows if r["task"] == "rec"]
    if rec:
        hits = rec_hits([r.get("box") for r in rec], [r["target"] for r in rec])
        out |= {"rec/acc50": sum(hits) / len(rec), "rec/no_box": sum(r.get("box") is None for r in rec) / len(rec),
                "rec/n": len(rec)}
    reg = [r for r in rows if r["task"] == "reg"]
    if reg:
        scores = caption_metrics({r["id"]: r["prediction"] for r in reg}, {r["id"]: r["references"] for r in reg},
                                 metrics=("METEOR", "CIDEr"))
        out |= {f"reg/{k}": v for k, v in scores.items()} | {"reg/n": len(reg)}
    yn = [r for r in rows if r["task"] == "yesno"]
    if yn:
        hits = [(r["prediction"].strip().lower().split() or [""])[0].strip(".,") == r["references"][0].lower()
                for r in yn]
        out |= {"yesno/accuracy": sum(hits) / len(yn), "yesno/n": len(yn)}
    return out
