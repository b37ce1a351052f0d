"""Where a trained run's REC is lost: two readings of one run directory.

1. **Misses** (from ``predictions_clawmachine.jsonl``): each held-out REC item is a hit (IoU >= 0.5),
   a box on the right object that is too loose or too tight (it overlaps the target more than any
   other object of the image), a box on another object, or none.
2. **Copying** (teacher forcing, the model of the run's finished stage 2): the expression asked, the
   true region given code by code; how often the model's likeliest next token is the true one, for
   the region's first code (finding the object), its second, the later ones (copying on) and
   ``[/IMG]`` (where to stop), on the held-out items and on as many training grounding turns (asked
   alone, as the held-out ones are); beside them, how many of the later codes are simply the scene's
   next token after the previous one (what a copier that keeps its place in the scene gets by
   continuing).

Usage (after ``make train-claw`` or ``tools/pkg.sh train claw --name <run> ...``):
``GROUNDLAB_RUNS=runs .venv/bin/python packages/clawmachine/scripts/diagnose_rec.py --run tiny``.
Prints both tables and writes them to ``diagnose_rec.json`` in the run directory.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch

from groundlab.clawmachine.data import GROUNDING, load_tokens
from groundlab.clawmachine.evaluation import read_predictions, rec_items
from groundlab.clawmachine.processing import ClawCollator, fetch_region, to_square
from groundlab.clawmachine.train import load_model
from groundlab.shared.metrics import box_iou
from groundlab.shared.runs import require_complete, runs_root
from groundlab.shared.world_io import Refer


def newest(run: Path, pattern: str) -> Path:
    found = sorted(run.glob(pattern), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"{run}: no {pattern} (train the run first)")
    return found[-1]


def misses(predictions: Path, items) -> Counter:
    """Hit / right object, loose or tight / another object / no box, per held-out REC item."""
    objects = {it.id: it for it in items}
    out = Counter()
    for row in read_predictions(predictions):
        if row["task"] != "rec":
            continue
        if row.get("box") is None:
            out["no box"] += 1
            continue
        it = objects[row["id"]]
        ious = box_iou(np.asarray([row["box"]]), np.asarray([box for box, _ in it.objects]))[0]
        own = float(box_iou(np.asarray([row["box"]]), np.asarray([row["target"]]))[0, 0])
        if own >= 0.5:
            out["hit"] += 1
        elif own >= ious.max() - 1e-9 and own > 0:
            out["right object, loose or tight"] += 1
        elif ious.max() > 0:
            out["another object"] += 1
        else:
            out["no object"] += 1
    return out


@torch.no_grad()
def copying(model, processor, cases) -> dict[str, float]:
    """Teacher-forced next-token accuracy over the regions of ``cases`` ((question, image tokens, box in
    the padded square) each), by place in the region."""
    hits = defaultdict(list)
    collate = ClawCollator(processor.tokenizer.pad_token_id)
    for question, image, box in cases:
        conv = [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": "<ref_patch>"}]
        enc = processor.encode(conv, image, [[box]])
        batch = collate([{"input_ids": enc.input_ids, "labels": enc.labels, **processor.scene_inputs(enc, image)}])
        labels = batch.pop("labels")[0, 1:]
        predicted = model(**batch).logits[0, :-1].argmax(-1)
        codes = [p for p in (labels != -100).nonzero().flatten().tolist() if model.config.is_code(int(labels[p]))]
        for k, p in enumerate(codes):
            hits["first code" if k == 0 else "second code" if k == 1 else "later codes"].append(
                int(predicted[p] == labels[p]))
        hits["[/IMG]"] += [int(predicted[p] == labels[p]) for p in (labels == model.config.image_end_token_id)
                           .nonzero().flatten().tolist()]
        cells = fetch_region([box], image.remained_map, model.config.grid)
        hits["later codes next in the scene"] += [int(b == a + 1) for a, b in zip(cells[1:], cells[2:])]
    return {f"{k} ({len(v)})": round(sum(v) / len(v), 3) for k, v in hits.items()}


def training_cases(stage2: Path, tokens, n: int) -> list:
    """The first grounding turn of the first ``n`` training conversations, with its region."""
    cases = []
    for rec in json.loads(stage2.read_text()):
        k = 0
        for q, a in zip(rec["conversations"][::2], rec["conversations"][1::2]):
            question = q["value"].replace("<image>\n", "")
            if question.startswith(GROUNDING.split("{")[0]) and a["value"] == "<ref_patch>":
                cases.append((question, tokens[rec["image"]], rec["ref_list"][k][0]))
                break
            k += question.count("<ref_patch>") + a["value"].count("<ref_patch>")
        if len(cases) == n:
            break
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="tiny", help="runs/clawmachine/<run>")
    args = parser.parse_args()
    torch.set_num_threads(2)
    run = runs_root() / "clawmachine" / args.run
    data = newest(run, "data-*")
    tokens = load_tokens(newest(run, "tokens-*") / "tokens.pt")
    items = rec_items(Refer(data / "refer", data / "images"), "val", data)
    model, processor = load_model(require_complete(run, "stage2-*", "train the run first"))
    model.eval()
    held_out = [(it.question, tokens[it.image], list(to_square(it.target, it.width, it.height))) for it in items]
    report = {"misses": dict(misses(run / "predictions_clawmachine.jsonl", items)),
              "copying, held-out": copying(model, processor, held_out),
              "copying, training": copying(model, processor, training_cases(data / "train_stage2.json", tokens,
                                                                            len(held_out)))}
    for name, table in report.items():
        print(f"{name}: " + ", ".join(f"{k} {v}" for k, v in table.items()))
    (run / "diagnose_rec.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
