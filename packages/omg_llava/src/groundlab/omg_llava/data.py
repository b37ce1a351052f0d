"""OMG-LLaVA's data formats, each written from the synthetic world and read back by the loader that
reads the real dataset.

- LLaVA conversations (LLaVA-Pretrain / mix665k): ``[{"id", "image", "conversations": [{"from": "human",
  "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}]}]``;
- referring segmentation: the REFER layout of RefCOCO/+/g (``instances.json`` + ``refs(unc).p``), via
  :mod:`groundlab.shared.world_io`;
- GCG, GranD-f layout: ``[{"file_name", "height", "width", "image_id", "caption", "groundings": {phrase:
  {"token_positives": [start, end], "rle_masks": [RLE, ...]}}}]`` (character spans in the caption);
- GCG, RefCOCOg-GCG layout: ``[{"id", "img_file_name", "caption", "refs": [{"sentence", "bbox",
  "segmentation"}]}]`` (phrases found in the caption by position);
- region descriptions, Osprey layout: ``[{"id", "file_name", "height", "width", "annotations": [{"bbox",
  "segmentation"}], "conversations": [...]}]`` where the human turn names its regions as ``<region>``
  placeholders, one per annotation, in order;
- point questions, MDVP layout: ``[{"id", "image", "points": [[x, y], ...], "conversations": [...]}]``
  with one ``<mark>`` per point, in order.

Every loader returns :class:`Sample`: an image path, a conversation (human / gpt turns), the masks
of the answer's ``[SEG]`` tokens in order, and the visual prompts (region masks or points) in order.
Counts are checked where they are read: a ``[SEG]`` / mask, ``<region>`` / annotation or ``<mark>`` /
point mismatch is an error naming the file and the record.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from groundlab.shared.config import read_json
from groundlab.shared.inputs import check_xywh
from groundlab.shared.world import RELATIONS, SUPERLATIVES, Scene
from groundlab.shared.world_io import decode_rle, encode_rle, image_file_name

from .processing import (
    BOP,
    EOP,
    GCG_PROMPT,
    IMAGE_TOKEN,
    MARK,
    POINT_PROMPT,
    REGION,
    REGION_PROMPT,
    RES_PROMPT,
    SEG,
)


@dataclass
class Sample:
    id: str
    image: Path
    conversation: list[dict]  # [{"from": "human" | "gpt", "value": str}, ...]
    seg_masks: list[np.ndarray] = field(default_factory=list)  # (H, W) bool per [SEG], in order
    regions: list[np.ndarray] = field(default_factory=list)  # (H, W) bool per <region>, in order
    points: list[tuple[float, float]] = field(default_factory=list)  # (x, y) per <mark>, in order
    task: str = ""


def _count(conversation: list[dict], token: str, role: str) -> int:
    return sum(turn["value"].count(token) for turn in conversation if turn["from"] == role)


def check_sample(s: Sample, where: str) -> Sample:
    """The counts a sample must satisfy (raising with ``where`` and the sample id)."""
    if not s.conversation or s.conversation[0]["from"] != "human":
        raise ValueError(f"{where}: {s.id}: a conversation starts with a human turn")
    if _count(s.conversation, IMAGE_TOKEN, "human") != 1:
        raise ValueError(f"{where}: {s.id}: expected one {IMAGE_TOKEN} in the human turns")
    n_seg = _count(s.conversation, SEG, "gpt")
    if n_seg != len(s.seg_masks):
        raise ValueError(f"{where}: {s.id}: {n_seg} {SEG} tokens in the answers but {len(s.seg_masks)} masks")
    n_region = _count(s.conversation, REGION, "human")
    if n_region != len(s.regions):
        raise ValueError(f"{where}: {s.id}: {n_region} {REGION} placeholders but {len(s.regions)} region masks")
    n_mark = _count(s.conversation, MARK, "human")
    if n_mark != len(s.points):
        raise ValueError(f"{where}: {s.id}: {n_mark} {MARK} placeholders but {len(s.points)} points")
    return s


def _load_json(path: str | Path) -> list[dict]:
    data = read_json(path, "annotation file")
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of records")
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise ValueError(f"{path}: record {i} is a {type(rec).__name__}, not an object")
    return data


def _mask(rle, where: str) -> np.ndarray:
    """A decoded, non-empty RLE mask; errors name ``where``."""
    try:
        m = decode_rle(rle)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    if not m.any():
        raise ValueError(f"{where}: the mask is empty")
    return m


def _check_conversation(conv, where: str) -> list[dict]:
    if not isinstance(conv, list) or not conv:
        raise ValueError(f"{where}: 'conversations' must be a non-empty list of turns")
    for j, turn in enumerate(conv):
        if (not isinstance(turn, dict) or turn.get("from") not in ("human", "gpt")
                or not isinstance(turn.get("value"), str)):
            raise ValueError(f"{where}: turn {j} must be {{\"from\": \"human\" | \"gpt\", \"value\": <text>}}")
    return conv


def _require(rec: dict, keys: tuple[str, ...], where: str, i: int) -> None:
    missing = [k for k in keys if k not in rec]
    if missing:
        raise ValueError(f"{where}: record {i}: missing keys {missing}")


def tag_caption(caption: str, spans: list[tuple[int, int]]) -> str:
    """``<p> phrase </p> [SEG]`` around each character span (non-overlapping), in order."""
    out, last = [], 0
    for start, end in sorted(spans):
        if start < last:
            raise ValueError(f"overlapping phrase spans in {caption!r}")
        out += [caption[last:start], f"{BOP} {caption[start:end]} {EOP} {SEG}"]
        last = end
    return "".join(out + [caption[last:]])


# ----------------------------------------------------------------------------------------------
# writers (the world export)


def llava_record(scene: Scene, qa_index: int = 0) -> dict:
    qa = scene.qa[qa_index % len(scene.qa)]
    return {"id": f"{scene.split}-{scene.index}-qa", "image": image_file_name(scene),
            "conversations": [{"from": "human", "value": f"{IMAGE_TOKEN}\n{qa.question}"},
                              {"from": "gpt", "value": qa.answer}]}


def caption_record(scene: Scene) -> dict:
    return {"id": f"{scene.split}-{scene.index}-cap", "image": image_file_name(scene),
            "conversations": [{"from": "human", "value": f"{IMAGE_TOKEN}\nDescribe the image."},
                              {"from": "gpt", "value": scene.caption}]}


def grandf_record(scene: Scene) -> dict:
    h, w = scene.image.shape[:2]
    groundings = {}
    for ph in scene.caption_phrases:
        groundings[ph.text] = {"token_positives": [ph.start, ph.end],
                               "rle_masks": [encode_rle(scene.objects[ph.object_id].mask)]}
    return {"file_name": image_file_name(scene), "height": h, "width": w, "image_id": scene.image_id,
            "caption": scene.caption, "groundings": groundings}


def refcocog_gcg_record(scene: Scene) -> dict:
    refs = []
    for ph in scene.caption_phrases:
        obj = scene.objects[ph.object_id]
        refs.append({"sentence": ph.text, "bbox": list(obj.bbox), "segmentation": encode_rle(obj.mask)})
    return {"id": f"{scene.split}-{scene.index}", "img_file_name": image_file_name(scene), "caption": scene.caption,
            "refs": refs}


def osprey_record(scene: Scene, target: int, description: str) -> dict:
    h, w = scene.image.shape[:2]
    obj = scene.objects[target]
    x, y, bw, bh = obj.bbox
    return {"id": f"{scene.split}-{scene.index}-region{target}", "file_name": image_file_name(scene), "height": h,
            "width": w, "annotations": [{"bbox": [x, y, bw, bh], "segmentation": encode_rle(obj.mask)}],
            "conversations": [{"from": "human", "value": f"{IMAGE_TOKEN}\n{REGION_PROMPT}"},
                              {"from": "gpt", "value": description}]}


def mdvp_record(scene: Scene, target: int, point: tuple[int, int], answer: str) -> dict:
    return {"id": f"{scene.split}-{scene.index}-mark{target}", "image": image_file_name(scene),
            "points": [list(point)],
            "conversations": [{"from": "human", "value": f"{IMAGE_TOKEN}\n{POINT_PROMPT}"},
                              {"from": "gpt", "value": answer}]}


def write_json(path: str | Path, records: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records))
    return path


# ----------------------------------------------------------------------------------------------
# loaders


def load_llava(path: str | Path, image_root: str | Path) -> list[Sample]:
    out = []
    for i, rec in enumerate(_load_json(path)):
        _require(rec, ("id", "image", "conversations"), str(path), i)
        _check_conversation(rec["conversations"], f"{path}: record {i}")
        out.append(check_sample(Sample(str(rec["id"]), Path(image_root) / rec["image"], rec["conversations"],
                                       task="llava"), str(path)))
    return out


def load_grandf(path: str | Path, image_root: str | Path) -> list[Sample]:
    out = []
    for i, rec in enumerate(_load_json(path)):
        _require(rec, ("file_name", "caption", "groundings", "height", "width"), str(path), i)
        where = f"{path}: record {i}"
        if not isinstance(rec["caption"], str) or not isinstance(rec["groundings"], dict):
            raise ValueError(f"{where}: 'caption' must be a string and 'groundings' a mapping")
        caption = rec["caption"].strip('"').strip()
        items = []
        for phrase, g in rec["groundings"].items():
            if g is None:
                continue  # GranD-f marks phrases it could not ground with null: they get no [SEG]
            if not isinstance(g, dict) or "token_positives" not in g or "rle_masks" not in g:
                raise ValueError(f"{where}: grounding of {phrase!r} needs 'token_positives' and 'rle_masks'")
            span = g["token_positives"]
            if (not isinstance(span, list) or len(span) != 2 or not all(isinstance(v, int) for v in span)
                    or not 0 <= span[0] < span[1] <= len(caption)):
                raise ValueError(f"{where}: 'token_positives' of {phrase!r} must be [start, end] inside the caption, "
                                 f"got {span!r}")
            start, end = span
            if caption[start:end] != phrase:
                raise ValueError(f"{where}: span {start}:{end} of the caption is "
                                 f"{caption[start:end]!r}, not the phrase {phrase!r}")
            if not isinstance(g["rle_masks"], list) or not g["rle_masks"]:
                raise ValueError(f"{where}: {phrase!r} has no mask in 'rle_masks' (its [SEG] would have no target)")
            mask = np.zeros((rec["height"], rec["width"]), bool)
            for rle in g["rle_masks"]:
                m = _mask(rle, f"{where}: mask of {phrase!r}")
                if m.shape != mask.shape:
                    raise ValueError(f"{where}: mask of {phrase!r} is {m.shape}, the image {mask.shape}")
                mask |= m
            items.append(((start, end), mask))
        items.sort(key=lambda t: t[0][0])
        answer = tag_caption(caption, [s for s, _ in items])
        conv = [{"from": "human", "value": f"{IMAGE_TOKEN}\n{GCG_PROMPT}"}, {"from": "gpt", "value": answer}]
        out.append(check_sample(Sample(str(rec.get("image_id", i)), Path(image_root) / rec["file_name"], conv,
                                       [m for _, m in items], task="gcg"), str(path)))
    return out


def load_refcocog_gcg(path: str | Path, image_root: str | Path) -> list[Sample]:
    """RefCOCOg-GCG: each ref's sentence is found in the (lower-cased) caption; phrases are ordered by
    position and a phrase overlapping the next is cut where the next begins. A sentence absent from the
    caption is an error (the release drops it silently)."""
    out = []
    for i, rec in enumerate(_load_json(path)):
        _require(rec, ("id", "img_file_name", "caption", "refs"), str(path), i)
        caption = rec["caption"].strip('"').strip().lower()
        items = []
        if not isinstance(rec["refs"], list):
            raise ValueError(f"{path}: record {i}: 'refs' must be a list")
        for ref in rec["refs"]:
            if not isinstance(ref, dict) or not isinstance(ref.get("sentence"), str) or "segmentation" not in ref:
                raise ValueError(f"{path}: record {i}: each ref needs a 'sentence' and a 'segmentation'")
            phrase = ref["sentence"].lower()
            start = caption.find(phrase)
            if start < 0:
                raise ValueError(f"{path}: record {i}: phrase {ref['sentence']!r} is not in the caption {caption!r}")
            seg = ref["segmentation"]
            if not isinstance(seg, dict) or "size" not in seg:
                raise ValueError(f"{path}: record {i}: segmentation of {phrase!r} must be an RLE with its size")
            if "bbox" in ref:
                check_xywh(ref["bbox"], f"{path}: record {i}: bbox of {phrase!r}")
            items.append([start, start + len(phrase), _mask(seg, f"{path}: record {i}: mask of {phrase!r}")])
        items.sort(key=lambda t: t[0])
        for a, b in zip(items, items[1:]):
            if a[1] > b[0]:
                a[1] = b[0]
        answer = tag_caption(caption, [(a, b) for a, b, _ in items])
        conv = [{"from": "human", "value": f"{IMAGE_TOKEN}\n{GCG_PROMPT}"}, {"from": "gpt", "value": answer}]
        out.append(check_sample(Sample(str(rec["id"]), Path(image_root) / rec["img_file_name"], conv,
                                       [m for _, _, m in items], task="gcg"), str(path)))
    return out


def load_osprey(path: str | Path, image_root: str | Path) -> list[Sample]:
    out = []
    for i, rec in enumerate(_load_json(path)):
        _require(rec, ("id", "file_name", "annotations", "conversations", "height", "width"), str(path), i)
        where = f"{path}: record {i}"
        if not isinstance(rec["annotations"], list):
            raise ValueError(f"{where}: 'annotations' must be a list")
        regions = []
        for j, a in enumerate(rec["annotations"]):
            if not isinstance(a, dict) or "segmentation" not in a:
                raise ValueError(f"{where}: annotation {j} needs a 'segmentation'")
            if "bbox" in a:
                check_xywh(a["bbox"], f"{where}: annotation {j} bbox")
            m = _mask(a["segmentation"], f"{where}: annotation {j}")
            if m.shape != (rec["height"], rec["width"]):
                raise ValueError(f"{where}: region mask {m.shape} vs image {(rec['height'], rec['width'])}")
            regions.append(m)
        _check_conversation(rec["conversations"], where)
        out.append(check_sample(Sample(str(rec["id"]), Path(image_root) / rec["file_name"], rec["conversations"],
                                       regions=regions, task="region"), str(path)))
    return out


def load_mdvp(path: str | Path, image_root: str | Path) -> list[Sample]:
    out = []
    for i, rec in enumerate(_load_json(path)):
        _require(rec, ("id", "image", "points", "conversations"), str(path), i)
        where = f"{path}: record {i}"
        if not isinstance(rec["points"], list):
            raise ValueError(f"{where}: 'points' must be a list of [x, y]")
        pts = []
        for j, p in enumerate(rec["points"]):
            if not isinstance(p, (list, tuple)) or len(p) != 2:
                raise ValueError(f"{where}: point {j} must be [x, y], got {p!r}")
            try:
                x, y = float(p[0]), float(p[1])
            except (TypeError, ValueError):
                raise ValueError(f"{where}: point {j} must be two numbers, got {p!r}") from None
            if not (math.isfinite(x) and math.isfinite(y) and x >= 0 and y >= 0):
                raise ValueError(f"{where}: point {j} must be finite pixel coordinates >= 0, got {p!r}")
            pts.append((x, y))
        _check_conversation(rec["conversations"], where)
        out.append(check_sample(Sample(str(rec["id"]), Path(image_root) / rec["image"], rec["conversations"],
                                       points=pts, task="point"), str(path)))
    return out


def res_samples(refer, split: str) -> list[Sample]:
    """Referring segmentation samples from a REFER reader (``groundlab.shared.world_io.Refer``): one per
    (ref, sentence), prompt ``"Please segment {sent} in this image."``, answer ``"It is [SEG]."``."""
    out = []
    for r in refer.samples(split):
        conv = [{"from": "human", "value": f"{IMAGE_TOKEN}\n{RES_PROMPT.format(sent=r.sentence)}"},
                {"from": "gpt", "value": f"It is {SEG}."}]
        out.append(Sample(f"{r.ref_id}-{r.sent_id}", r.image_path, conv, [r.mask], task="res"))
    return out


def same_category_refs(refer, split: str) -> set[str]:
    """The ``ref_id`` of every ``split`` ref whose object shares its ``category_id`` with another
    annotated object of its image: the refs that naming the category alone cannot resolve (nearly all
    of RefCOCO's, by its collection)."""
    out = set()
    for r in refer.samples(split):
        own = refer.coco.anns[r.ann_id].get("category_id")
        if own is not None and refer.instance_categories(r.image_id).count(own) > 1:
            out.add(str(r.ref_id))
    return out


def res_expression(sample: Sample) -> str:
    """The referring expression of a :func:`res_samples` sample (its prompt without the template)."""
    head, tail = RES_PROMPT.split("{sent}")
    text = sample.conversation[0]["value"].split("\n", 1)[-1]
    if not (text.startswith(head) and text.endswith(tail)):
        raise ValueError(f"RES sample {sample.id}: prompt {text!r} is not {RES_PROMPT!r}")
    return text[len(head):len(text) - len(tail)]


def names_only_its_object(expression: str) -> bool:
    """Whether an expression of the world's grammar describes its object by the object's own
    attributes alone: no relation to another object ("left of", "above", ...) and no superlative of
    place ("leftmost", ...)."""
    words = f" {expression.lower()} "
    return not any(f" {w} " in words for w in (*RELATIONS, *SUPERLATIVES))


# ----------------------------------------------------------------------------------------------
# the world in every format (the default run's data)

FILES = {"caption": "llava_pretrain.json", "qa": "llava_instruct.json", "gcg": "grandf_{split}.json",
         "region": "osprey_{split}.json", "point": "mdvp_{split}.json"}


def region_description(scene: Scene, target: int) -> str:
    """A region's description: the object's full phrase, capitalised, as a sentence."""
    text = scene.objects[target].phrase
    return text[0].upper() + text[1:] + "."


def export_world(world, out_dir: str | Path, n_train: int, n_val: int, qa_per_scene: int | None = None) -> dict[str, int]:
    """Write ``n_train`` train and ``n_val`` val scenes of ``world`` in every format: images under
    ``images/``, LLaVA captions (stage 1) and questions (the first ``qa_per_scene`` of each scene, all by
    default), REFER (``refcoco/``), GranD-f GCG, Osprey regions and MDVP points (one record per object,
    with an interior point). Returns record counts."""
    from groundlab.shared.world_io import save_image, write_refer

    out = Path(out_dir)
    images = out / "images"
    splits = {"train": world.scenes("train", n_train), "val": world.scenes("val", n_val)}
    counts: dict[str, int] = {}
    for split, scenes in splits.items():
        for s in scenes:
            save_image(s, images)
        gcg = [grandf_record(s) for s in scenes if s.caption_phrases]
        regions = [osprey_record(s, o.id, region_description(s, o.id)) for s in scenes for o in s.objects]
        points = []
        for s in scenes:
            for o in s.objects:
                ys, xs = np.nonzero(o.mask)
                i = len(ys) // 2  # a deterministic interior pixel (the middle one in raster order)
                points.append(mdvp_record(s, o.id, (int(xs[i]), int(ys[i])), region_description(s, o.id)))
        write_json(out / FILES["gcg"].format(split=split), gcg)
        write_json(out / FILES["region"].format(split=split), regions)
        write_json(out / FILES["point"].format(split=split), points)
        counts |= {f"{split}/gcg": len(gcg), f"{split}/region": len(regions), f"{split}/point": len(points)}
    train = splits["train"]
    write_json(out / FILES["caption"], [caption_record(s) for s in train])
    qa = [llava_record(s, k) for s in train for k in range(min(len(s.qa), qa_per_scene or len(s.qa)))]
    write_json(out / FILES["qa"], qa)
    write_refer(splits, out, images)
    counts |= {"train/caption": len(train), "train/qa": len(qa),
               "train/res_objects": sum(len(s.objects) for s in train),
               "val/res_objects": sum(len(s.objects) for s in splits["val"])}
    return counts


def refer_reader(root: str | Path, dataset: str = "refcoco", split_by: str = "unc",
                 image_dir: str | Path | None = None):
    """The REFER reader of a data folder: ``<root>/<dataset>/instances.json`` + ``refs(<split_by>).p``,
    images under ``image_dir`` (default ``<root>/images``, the export's; COCO's ``train2014`` for the
    real RefCOCO / RefCOCO+ / RefCOCOg)."""
    from groundlab.shared.world_io import Refer

    return Refer(root, Path(image_dir) if image_dir else Path(root) / "images", dataset, split_by)


def load_world_export(out_dir: str | Path, split: str, tasks: tuple[str, ...], refer: dict | None = None) -> list[Sample]:
    """Read an :func:`export_world` folder back through the real loaders: the samples of ``tasks``
    (caption, qa, res, gcg, region, point) of ``split``. ``refer``: :func:`refer_reader`'s arguments
    for RES (another REFER dataset, partition or image folder; default the export's RefCOCO (unc))."""
    out, images = Path(out_dir), Path(out_dir) / "images"
    samples: list[Sample] = []
    for task in tasks:
        if task in ("caption", "qa"):
            if split != "train":
                raise ValueError(f"the world export has {task} records for the train split only")
            samples += load_llava(out / FILES[task], images)
        elif task == "res":
            samples += res_samples(refer_reader(out, **(refer or {})), split)
        elif task == "gcg":
            samples += load_grandf(out / FILES["gcg"].format(split=split), images)
        elif task == "region":
            samples += load_osprey(out / FILES["region"].format(split=split), images)
        elif task == "point":
            samples += load_mdvp(out / FILES["point"].format(split=split), images)
        else:
            raise ValueError(f"unknown task {task!r}; known: caption, qa, res, gcg, region, point")
    return samples
