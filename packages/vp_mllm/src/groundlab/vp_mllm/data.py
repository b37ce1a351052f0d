"""MDVP-Instruct-Data: reading it, and the synthetic world exported into it.

A file is a JSON list of records::

    {"id": "...", "image": "images/000001.png",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is <Region 1>?"},
                       {"from": "gpt", "value": "<Region 1>: red circle"}],
     "bbox": [[x, y, w, h], ...]}            # or "points": [[x, y], ...] (pixels)

Stage 1 (image-visual prompt alignment) is point2label / box2label: every prompt of the image
listed with its label, one line each (``<Region 1>: red circle``). Stage 2 adds the instruction data
of the world: region captions, regional OCR (the letters on some shapes), region questions and
relations between marked regions. Held-out records carry ``task`` and ``answer`` for scoring.

:func:`read_mdvp` checks every record before training starts (image file, prompt lists, at most K
prompts, every ``<Mark n>`` / ``<Region n>`` naming a prompt of the record) and names the file and
record of the first problem; nothing is dropped silently.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from groundlab.shared.bases.vlm import box_text
from groundlab.shared.config import read_json
from groundlab.shared.world import World, holds
from groundlab.shared.world_io import load_image, save_image

from .processing import VisualPrompts, VPProcessor, check_references, jitter_box, reference

LABELS_QUESTION = "Please identify the labels of each marked region in the image."
CAPTION_QUESTION = "Please give a brief description of {ref}."
OCR_QUESTION = "What is the text in {ref}?"
ATTRIBUTE_QUESTIONS = {"colour": "What colour is {ref}?", "shape": "What shape is {ref}?", "size": "What size is {ref}?"}
RELATION_QUESTION = "Is {a} {relation} {b}?"
LABEL_QUESTION = "What is {ref}?"
LOCATE_QUESTION = "Please provide the bounding box of {ref}."  # the LLaVA base's grounding prompt
TASKS = ("labels", "single", "caption", "ocr")
MULTI_MARKED = ("subset", "all")
EXPORT_VERSION = 2
"""The world export's layout (part of the data stage's key: a cached export of another version is
remade). 2: the ``single`` evaluation records."""


def label(obj) -> str:
    """An object's category in the world: ``"red circle"``."""
    return f"{obj.colour} {obj.kind}"


def labels_answer(kind: str, labels: list[str]) -> str:
    return "\n".join(f"{reference(kind, i + 1)}: {text}" for i, text in enumerate(labels))


def parse_labels(text: str, kind: str) -> dict[int, str]:
    """``<Region n>: label`` lines -> {n: label} (the first line for each n; other lines ignored)."""
    out: dict[int, str] = {}
    word = "Mark" if kind == "point" else "Region"
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(f"<{word} ") and ">:" in line:
            head, _, rest = line.partition(">:")
            try:
                n = int(head[len(word) + 2:])
            except ValueError:
                continue
            out.setdefault(n, rest.strip())
    return out


# ----------------------------------------------------------------------------------------------
# reading


def read_mdvp(path: str | Path, image_root: str | Path, num_slots: int) -> list[dict]:
    """The records of an MDVP JSON file, every one checked (see the module docstring)."""
    path, root = Path(path), Path(image_root)
    records = read_json(path, "MDVP-Instruct-Data file")
    if not isinstance(records, list):
        raise ValueError(f"{path}: an MDVP file is a JSON list of records")
    for i, rec in enumerate(records):
        where = f"{path}: record {i}" + (f" (id {rec.get('id')})" if isinstance(rec, dict) and "id" in rec else "")
        if not isinstance(rec, dict):
            raise ValueError(f"{where}: a record is an object")
        if not isinstance(rec.get("image"), str):
            raise ValueError(f"{where}: 'image' (a path under {root}) is missing")
        if not (root / rec["image"]).is_file():
            raise FileNotFoundError(f"{where}: image not found: {root / rec['image']}")
        conv = rec.get("conversations")
        if not isinstance(conv, list) or len(conv) < 2:
            raise ValueError(f"{where}: 'conversations' must hold at least a human and a gpt turn")
        prompts = VisualPrompts.from_record(rec, where)
        if prompts is not None and len(prompts) > num_slots:
            raise ValueError(f"{where}: {len(prompts)} {prompts.kind} prompts, more than the model's {num_slots} slots")
        check_references(conv, prompts, where)
    return records


class MDVPDataset(Dataset):
    """Records -> model samples. ``box_noise``: the paper's box jitter, drawn per (seed, item, epoch)
    (the shared ``train`` sets the epoch), so a resumed run sees the same boxes. ``use_prompts=False``:
    the no-encoder baseline (the text without the prompt block)."""

    def __init__(self, records: list[dict], image_root: str | Path, processor: VPProcessor, box_noise: bool = True,
                 use_prompts: bool = True, seed: int = 0, source: str = "records"):
        self.records, self.root, self.processor = records, Path(image_root), processor
        self.box_noise, self.use_prompts, self.seed, self.source = box_noise, use_prompts, seed, source
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.records)

    def prompts(self, idx: int, width: int, height: int) -> VisualPrompts | None:
        rec = self.records[idx]
        prompts = VisualPrompts.from_record(rec, f"{self.source}: record {idx}")
        if prompts is None or prompts.kind == "point" or not self.box_noise:
            return prompts
        rng = np.random.default_rng([self.seed, idx, self.epoch])
        boxes = []
        for box in prompts.coords:
            x0, y0, x1, y1 = jitter_box(box, rng)
            x0, y0 = min(max(x0, 0.0), width - 1.0), min(max(y0, 0.0), height - 1.0)
            boxes.append((x0, y0, min(max(x1, x0 + 1.0), float(width)), min(max(y1, y0 + 1.0), float(height))))
        return VisualPrompts("box", boxes)

    def __getitem__(self, idx: int) -> dict:
        rec = self.records[idx]
        image = load_image(self.root / rec["image"])
        prompts = self.prompts(idx, *image.size)
        return self.processor.encode(image, rec["conversations"], prompts, self.use_prompts,
                                     where=f"{self.source}: record {idx}")


# ----------------------------------------------------------------------------------------------
# the world in MDVP's format


def click(obj, rng: np.random.Generator) -> tuple[float, float]:
    """A point prompt: a seeded random pixel of the object's visible mask (its centre)."""
    ys, xs = np.nonzero(obj.mask)
    k = int(rng.integers(len(xs)))
    return float(xs[k]) + 0.5, float(ys[k]) + 0.5


def prompts_for(objects: list, kind: str, rng: np.random.Generator) -> VisualPrompts:
    if kind == "point":
        return VisualPrompts("point", [click(o, rng) for o in objects])
    return VisualPrompts("box", [(x, y, x + w, y + h) for x, y, w, h in (o.bbox for o in objects)])


def _record(rid: str, image: str, turns: list[tuple[str, str]], prompts: VisualPrompts, **extra) -> dict:
    conv = []
    for k, (q, a) in enumerate(turns):
        conv += [{"from": "human", "value": ("<image>\n" if k == 0 else "") + q}, {"from": "gpt", "value": a}]
    return {"id": rid, "image": image, "conversations": conv, **prompts.to_record(), **extra}


def _stage2_turns(scene, order: list, kind: str, rng: np.random.Generator, margin: float,
                  locate: float = 0.0, label_question: float = 0.0) -> list[tuple[str, str]]:
    """A few instruction turns about the marked regions (the order of the turns shuffled); with
    probability ``locate`` one asks for a marked region's box, in the LLaVA base's location tokens;
    with probability ``label_question`` one asks for one marked region's label (``What is <Region
    k>?``)."""
    refs = [reference(kind, i + 1) for i in range(len(order))]
    turns = []
    if label_question > 0 and rng.random() < label_question:
        i = int(rng.integers(len(order)))
        turns.append((LABEL_QUESTION.format(ref=refs[i]), label(order[i])))
    if locate > 0 and rng.random() < locate:
        i = int(rng.integers(len(order)))
        turns.append((LOCATE_QUESTION.format(ref=refs[i]), box_text(order[i], "llava", scene.size)))
    if rng.random() < 0.5:
        turns.append((LABELS_QUESTION, labels_answer(kind, [label(o) for o in order])))
    i = int(rng.integers(len(order)))
    turns.append((CAPTION_QUESTION.format(ref=refs[i]), order[i].phrase))
    i = int(rng.integers(len(order)))
    attr = list(ATTRIBUTE_QUESTIONS)[int(rng.integers(3))]
    value = {"colour": order[i].colour, "shape": order[i].kind, "size": order[i].size}[attr]
    turns.append((ATTRIBUTE_QUESTIONS[attr].format(ref=refs[i]), value))
    glyphs = [k for k, o in enumerate(order) if o.glyph]
    if glyphs:
        i = glyphs[int(rng.integers(len(glyphs)))]
        turns.append((OCR_QUESTION.format(ref=refs[i]), order[i].glyph))
    if len(order) >= 2:
        a, b = (int(v) for v in rng.choice(len(order), size=2, replace=False))
        relation = ("left of", "right of", "above", "below")[int(rng.integers(4))]
        if holds(relation, order[a], order[b], margin) or not holds(relation, order[a], order[b], 0.0):
            answer = "yes" if holds(relation, order[a], order[b], margin) else "no"
            turns.append((RELATION_QUESTION.format(a=refs[a], relation=relation, b=refs[b]), answer))
    return [turns[int(k)] for k in rng.permutation(len(turns))]


def marked_count(n: int, rng: np.random.Generator, one_marked: float | None, rest: str = "subset") -> int:
    """How many of a training scene's ``n`` objects a record marks: uniform in 1..n; or, with
    ``one_marked``, 1 with that probability and otherwise uniform in 2..n (``rest="subset"``) or
    all ``n`` (``rest="all"``; :func:`export_world` checks both arguments)."""
    if one_marked is None or n == 1:
        return int(rng.integers(1, n + 1))
    if rng.random() < one_marked:
        return 1
    return n if rest == "all" else int(rng.integers(2, n + 1))


def export_world(world: World, split: str, n_scenes: int, out: Path, seed: int = 0, locate: float = 0.0,
                 files: tuple[str, ...] = ("stage1", "stage2", "eval"), one_marked: float | None = None,
                 label_question: float = 0.0, multi_marked: str = "subset") -> dict[str, int]:
    """Scenes of ``split`` as MDVP files under ``out``: ``<split>_stage1.json`` (labels of every marked
    region), ``<split>_stage2.json`` (instruction turns) and ``<split>_eval.json`` (one record per
    held-out question, with ``task``, ``kind`` and the ``answer``: ``labels`` marks every object,
    ``single`` each object alone, with the same prompt). Each scene gives a box record and a
    point record of each, the regions in a shuffled slot order (seeded); training records mark a random
    non-empty subset of the objects (its size uniform; ``one_marked``: that share of the records mark
    one object, the others two or more, or all of them with ``multi_marked="all"``), evaluation
    records all of them. ``files``: which of the three to write. ``locate`` / ``label_question``: the
    stage-2 turns of :func:`_stage2_turns`. Returns record counts."""
    if one_marked is not None and not 0.0 <= one_marked <= 1.0:
        raise ValueError(f"one_marked must be in [0, 1], got {one_marked}")
    if multi_marked not in MULTI_MARKED:
        raise ValueError(f"multi_marked must be one of {MULTI_MARKED}, got {multi_marked!r}")
    (out / "images").mkdir(parents=True, exist_ok=True)
    margin = world.config.spatial_margin * world.config.image_size
    records = {"stage1": [], "stage2": [], "eval": []}
    for scene in world.scenes(split, n_scenes):
        image = "images/" + save_image(scene, out / "images")
        for kind in ("box", "point"):
            rng = np.random.default_rng([seed, scene.image_id, kind == "box"])
            order = [scene.objects[int(k)] for k in rng.permutation(len(scene.objects))]
            prompts = prompts_for(order, kind, rng)
            rid = f"{scene.image_id}-{kind}"
            answer = labels_answer(kind, [label(o) for o in order])
            for stage in ("stage1", "stage2"):  # training marks a random subset: the scene alone never tells
                marked = order[: marked_count(len(order), rng, one_marked, multi_marked)]  # which objects the answer is about
                some = prompts_for(marked, kind, rng)
                turns = ([(LABELS_QUESTION, labels_answer(kind, [label(o) for o in marked]))] if stage == "stage1"
                         else _stage2_turns(scene, marked, kind, rng, margin, locate, label_question))
                records[stage].append(_record(f"{rid}-{stage}", image, turns, some))
            records["eval"].append(_record(f"{rid}-labels", image, [(LABELS_QUESTION, answer)], prompts,
                                         task="labels", kind=kind))
            for i, obj in enumerate(order):
                ref = reference(kind, i + 1)
                alone = VisualPrompts(kind, [prompts.coords[i]])  # the same prompt, the only one marked
                records["eval"].append(_record(f"{rid}-single-{i + 1}", image,
                                             [(LABELS_QUESTION, labels_answer(kind, [label(obj)]))], alone,
                                             task="single", kind=kind))
                records["eval"].append(_record(f"{rid}-caption-{i + 1}", image,
                                             [(CAPTION_QUESTION.format(ref=ref), obj.phrase)], prompts,
                                             task="caption", kind=kind))
                if obj.glyph:
                    records["eval"].append(_record(f"{rid}-ocr-{i + 1}", image, [(OCR_QUESTION.format(ref=ref), obj.glyph)],
                                                 prompts, task="ocr", kind=kind))
    counts = {}
    for name in files:
        (out / f"{split}_{name}.json").write_text(json.dumps(records[name]))
        counts[f"{split}_{name}"] = len(records[name])
    return counts


def majority_label(records: list[dict]) -> str | None:
    """The most frequent region label of stage-1 records (the trivial baseline's answer); None when
    no record answers with ``<Region n>: label`` lines."""
    counts: dict[str, int] = {}
    for rec in records:
        kind = "point" if "points" in rec else "box"
        for text in parse_labels(rec["conversations"][1]["value"], kind).values():
            counts[text] = counts.get(text, 0) + 1
    return max(sorted(counts), key=counts.get) if counts else None


def eval_records(records: list[dict], tasks: tuple[str, ...] = TASKS) -> list[dict]:
    """Held-out records of the given tasks (each with its ``task``, ``kind`` and the answer)."""
    bad = [i for i, r in enumerate(records) if r.get("task") not in TASKS or r.get("kind") not in ("box", "point")]
    if bad:
        raise ValueError(f"evaluation record {bad[0]} has no valid 'task' ({TASKS}) and 'kind' (box, point)")
    return [r for r in records if r["task"] in tasks]

