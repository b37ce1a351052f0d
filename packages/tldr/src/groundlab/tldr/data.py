"""TLDR datasets: JSONL with per-token labels and taxonomy tags, and the synthetic world exported into it.

One line per (image, prompt, response)::

    {"id": "...", "image": "images/x.jpg", "prompt": "describe en", "response": "...",
     "original": "..." | null, "taxonomy": "original" | "<one of the 8>", "task": "description" |
     "caption" | "vqa", "tokens": ["there", " are", ...], "labels": [1, 1, 0, ...]}

``tokens`` / ``labels`` are per response token of the backbone's tokenizer (the labels come from
:func:`groundlab.tldr.labels.diff_labels`); a file written with another tokenizer is refused at load
time with the line that disagrees, instead of silently shifting labels. Positives have all-ones labels.

The model's input per backbone (``Layout``, ``encode_record``, the collators) is in
:mod:`groundlab.tldr.processing`.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from groundlab.shared.config import iter_jsonl
from groundlab.shared.world import Scene, World
from groundlab.shared.world_io import image_file_name, load_image

from .labels import diff_labels
from .perturb import TAXONOMIES, WorldPerturber, describe, perturb_caption
from .processing import PROMPTS, Layout, encode_record, response_tokens


def make_record(tokenizer, rid: str, image: str, prompt: str, response: str, task: str,
                original: str | None = None, taxonomy: str = "original") -> dict:
    ids = response_tokens(tokenizer, response)
    labels = [1] * len(ids) if original is None else diff_labels(response_tokens(tokenizer, original), ids)
    return {"id": rid, "image": image, "prompt": prompt, "response": response, "original": original,
            "taxonomy": taxonomy, "task": task, "tokens": tokenizer.convert_ids_to_tokens(ids), "labels": labels}


def export_world(world: World, split: str, n_scenes: int, out_dir: str | Path, tokenizer,
                 tasks: tuple[str, ...] = ("description", "caption", "vqa"), seed: int = 0) -> tuple[Path, dict]:
    """Write ``<out_dir>/tldr_<split>.jsonl`` and the images. Per scene and task: the positive and one
    negative per taxonomy the scene allows (VQA: one question, its answer and a wrong answer).
    Returns the path and counts, including the (scene, taxonomy) pairs that allowed no negative."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    perturber = WorldPerturber(seed)
    records, counts = [], Counter()
    for i in range(n_scenes):
        scene = world.scene(split, i)
        name = image_file_name(scene)
        Image.fromarray(scene.image).save(out_dir / "images" / name, quality=95, subsampling=0)
        img = f"images/{name}"
        for task in tasks:
            for rec in _scene_records(scene, task, img, tokenizer, perturber, seed, counts):
                records.append(rec)
                counts[f"{task}/{rec['taxonomy']}"] += 1
    path = out_dir / f"tldr_{split}.jsonl"
    with open(path, "w") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    return path, dict(counts)


def _scene_records(scene: Scene, task: str, img: str, tok, perturber: WorldPerturber, seed: int, counts: Counter):
    sid = f"{scene.split}-{scene.index}"
    if task == "vqa":
        rng = np.random.default_rng([seed, scene.image_id])
        qi = int(rng.integers(len(scene.qa)))
        qa = scene.qa[qi]
        prompt = PROMPTS["vqa"].format(question=qa.question)
        yield make_record(tok, f"{sid}-vqa", img, prompt, qa.answer, task)
        neg = perturber.perturb_answer(scene, qi)
        if neg is None:
            counts["vqa/no_negative"] += 1
        else:
            yield make_record(tok, f"{sid}-vqa-neg", img, prompt, neg.perturbed, task, neg.original, neg.taxonomy)
        return
    original = describe(scene) if task == "description" else scene.caption
    yield make_record(tok, f"{sid}-{task}", img, PROMPTS[task], original, task)
    for t in TAXONOMIES:
        neg = (perturber.perturb(scene, original, t) if task == "description" else perturb_caption(scene, t, seed))
        if neg is None:
            counts[f"{task}/no_negative/{t}"] += 1
            continue
        yield make_record(tok, f"{sid}-{task}-{t}", img, PROMPTS[task], neg.perturbed, task, original, t)


REQUIRED = ("id", "image", "prompt", "response", "taxonomy", "tokens", "labels")


def read_jsonl(path: str | Path, tokenizer=None) -> list[dict]:
    """Read and validate a TLDR JSONL file; with ``tokenizer``, check that it reproduces ``tokens``."""
    path = Path(path)
    out = []
    for n, rec in iter_jsonl(path, "TLDR dataset"):
        missing = [k for k in REQUIRED if k not in rec]
        if missing:
            raise ValueError(f"{path}:{n}: missing keys {missing}")
        if len(rec["tokens"]) != len(rec["labels"]) or not rec["labels"]:
            raise ValueError(f"{path}:{n}: {len(rec['tokens'])} tokens but {len(rec['labels'])} labels")
        if any(lab not in (0, 1) for lab in rec["labels"]):
            raise ValueError(f"{path}:{n}: labels must be 0 or 1")
        if rec["taxonomy"] not in ("original", *TAXONOMIES):
            raise ValueError(f"{path}:{n}: unknown taxonomy {rec['taxonomy']!r}")
        if rec["taxonomy"] != "original" and all(rec["labels"]):
            raise ValueError(f"{path}:{n}: a negative ({rec['taxonomy']}) with every token labelled good")
        if tokenizer is not None:
            toks = tokenizer.convert_ids_to_tokens(response_tokens(tokenizer, rec["response"]))
            if toks != rec["tokens"]:
                raise ValueError(f"{path}:{n}: the tokenizer splits the response into {toks[:6]}... but the "
                                 f"labels were made for {rec['tokens'][:6]}...: labels from another tokenizer")
        out.append(rec)
    return out


class TldrDataset(Dataset):
    """Records of a TLDR JSONL file with their images (loaded once; the world's are tiny)."""

    def __init__(self, records: list[dict], image_root: str | Path, tokenizer, layout: Layout):
        self.records, self.layout, self.tokenizer = records, layout, tokenizer
        root = Path(image_root)
        self.images = {}
        for rec in records:
            if rec["image"] not in self.images:
                self.images[rec["image"]] = np.array(load_image(root / rec["image"]))
        self.encoded = [encode_record(tokenizer, r, layout) for r in records]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        e = self.encoded[i]
        return {"input_ids": e["input_ids"], "labels": e["labels"], "token_type_ids": e["token_type_ids"],
                "image": self.images[self.records[i]["image"]]}
