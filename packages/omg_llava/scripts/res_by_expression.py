"""RES of a trained run on every held-out expression of every object (not only each object's first, as
``make train-omg`` scores), split by the expression's form and by whether another object of the image
shares the target's kind:

- ``colour``: the object's own attributes, its colour among them ("the yellow triangle");
- ``size``: its own attributes, no colour ("the large triangle");
- ``place``: a superlative of place ("the leftmost triangle");
- ``relation``: a relation to another object ("the triangle below the red triangle").

Usage (after the run): ``GROUNDLAB_RUNS=runs .venv/bin/python packages/omg_llava/scripts/res_by_expression.py
--run tiny [--model DIR] [--config packages/omg_llava/configs/tiny.yaml] [overrides of that run ...]``
(the model: the run's own, unless ``--model`` names one). The predictions
land in ``runs/omg_llava/<run>/predictions_res_all_sentences.jsonl``; the table is printed and written to
``res_by_expression.json`` beside them.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import numpy as np
from transformers import AutoTokenizer

from groundlab.omg_llava.cli import _model_dir
from groundlab.omg_llava.data import names_only_its_object, res_expression
from groundlab.omg_llava.dataset import PerceptionCache
from groundlab.omg_llava.evaluation import predict, read_predictions, target_shares_category
from groundlab.omg_llava.modeling import OMGLlavaForCausalLM
from groundlab.omg_llava.train import RunConfig, _dataset, _instances, prepare_data
from groundlab.shared.config import parse_overrides
from groundlab.shared.loading import load_pretrained
from groundlab.shared.metrics import mask_iou, res_metrics
from groundlab.shared.recipe import Recipe
from groundlab.shared.world import COLOURS, SUPERLATIVES

FORMS = ("colour", "size", "place", "relation")


def expression_form(expression: str) -> str:
    words = expression.lower().split()
    if not names_only_its_object(expression):
        return "place" if any(w in words for w in SUPERLATIVES) else "relation"
    return "colour" if any(c in words for c in COLOURS) else "size"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="tiny")
    ap.add_argument("--config", default="packages/omg_llava/configs/tiny.yaml")
    ap.add_argument("--model", default=None, help="an OMG-LLaVA directory (default: the run's own model)")
    args, extra = ap.parse_known_args()
    cfg = RunConfig.from_yaml(args.config, parse_overrides(extra) | {"name": args.run,
                                                                      "eval.res_all_sentences": True})
    recipe = Recipe("omg_llava", args.run)
    model_dir = _model_dir(args.run, args.model)
    data = prepare_data(recipe, cfg)
    samples = data.eval["res"]
    model = load_pretrained(OMGLlavaForCausalLM, model_dir, "OMG-LLaVA")
    tok = AutoTokenizer.from_pretrained(model_dir)
    model.check_tokenizer(tok)
    cache = PerceptionCache(model, sorted({str(s.image) for s in samples}))
    path = predict(model, _dataset(cfg, samples, tok, model, cache), tok,
                   recipe.root / "predictions_res_all_sentences.jsonl", cfg.eval.batch_size, cfg.eval.max_new_tokens["res"])
    preds = read_predictions(path, samples)
    instances, categories = _instances(data)
    groups = defaultdict(list)
    for p, s in zip(preds, samples):
        target = s.seg_masks[0]
        shared = target_shares_category(s, instances, categories)
        pred = p["masks"][0] if p["masks"] else np.zeros_like(target)
        groups["kind shared" if shared else "kind alone", expression_form(res_expression(s))].append((pred, target))
    table = {}
    print(f"{'target':12s} {'expression':10s} {'n':>5s} {'right':>7s} {'cIoU':>7s}")
    for (who, form) in sorted(groups, key=lambda k: (k[0], FORMS.index(k[1]))):
        items = groups[who, form]
        right = float(np.mean([mask_iou(a, b) >= 0.5 for a, b in items]))
        ciou = res_metrics(*map(list, zip(*items)))["cIoU"]
        table[f"{who}/{form}"] = {"n": len(items), "right_rate": right, "cIoU": ciou}
        print(f"{who:12s} {form:10s} {len(items):5d} {right:7.3f} {ciou:7.3f}")
    every = [it for items in groups.values() for it in items]
    table["all"] = {"n": len(every), "right_rate": float(np.mean([mask_iou(a, b) >= 0.5 for a, b in every])),
                    "cIoU": res_metrics(*map(list, zip(*every)))["cIoU"]}
    print(f"{'every expression':23s} {len(every):5d} {table['all']['right_rate']:7.3f} {table['all']['cIoU']:7.3f}")
    (recipe.root / "res_by_expression.json").write_text(json.dumps(table, indent=1) + "\n")


if __name__ == "__main__":
    main()
