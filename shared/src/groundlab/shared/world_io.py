"""Export the synthetic world into real on-disk formats, and read those formats back.

- COCO instances JSON (``images`` / ``annotations`` with RLE ``segmentation`` / ``categories``), the
  layout pycocotools' ``COCO`` reads, with the images written as JPEG files beside it.
- The REFER layout of RefCOCO / RefCOCO+ / RefCOCOg (github.com/lichengunc/refer):
  ``<root>/<dataset>/instances.json`` and ``<root>/<dataset>/refs(<split_by>).p``, a pickled list of
  refs ``{ref_id, ann_id, image_id, split, category_id, file_name, sent_ids, sentences: [{sent_id,
  sent, raw, tokens}]}``.

The readers are the ones the packages use for the real datasets; they validate what they read and
name the file and record when something is wrong.
"""

from __future__ import annotations

import json
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from .world import Scene

CATEGORIES: tuple[str, ...] = ("circle", "square", "triangle")


def encode_rle(mask: np.ndarray) -> dict:
    """Binary (H, W) mask -> COCO compressed RLE with ``counts`` as str (JSON-able)."""
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {mask.shape}")
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def compressed_counts(text: str) -> list[int]:
    """The run lengths of COCO's compressed RLE string (6 bits a character from '0', 5 of value and a
    continuation bit, sign-extended; runs after the second are stored as differences to the run two
    before), as pycocotools' ``rleFrString`` reads them."""
    counts, i = [], 0
    while i < len(text):
        x, k, more = 0, 0, True
        while more:
            if i >= len(text):
                raise ValueError("RLE string ends inside a number")
            c = ord(text[i]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"RLE string has an invalid character {text[i]!r}")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            i, k = i + 1, k + 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        if x < 0:
            raise ValueError("RLE string decodes to a negative run")
        counts.append(x)
    return counts


def decode_rle(rle: dict) -> np.ndarray:
    """COCO RLE (compressed or uncompressed) -> (H, W) bool mask; ``ValueError`` for anything else."""
    size = rle.get("size") if isinstance(rle, dict) else None
    if (not isinstance(size, (list, tuple)) or len(size) != 2
            or not all(isinstance(v, int) and v > 0 for v in size)):
        raise ValueError(f"not an RLE mask (needs 'size': [h, w] and 'counts'): {str(rle)[:80]}")
    counts = rle.get("counts")
    try:
        if isinstance(counts, list):
            if sum(counts) != size[0] * size[1]:
                raise ValueError(f"RLE counts add up to {sum(counts)}, not {size[0]} x {size[1]}")
            rle = mask_utils.frPyObjects(rle, *size)
        elif isinstance(counts, str):
            total = sum(compressed_counts(counts))
            if total != size[0] * size[1]:
                raise ValueError(f"RLE counts add up to {total}, not {size[0]} x {size[1]}")
            rle = {"size": list(size), "counts": counts.encode("ascii")}
        elif not isinstance(counts, bytes):
            raise ValueError(f"RLE 'counts' must be a string or a list, got {type(counts).__name__}")
        return mask_utils.decode(rle).astype(bool)
    except (TypeError, UnicodeEncodeError) as err:
        raise ValueError(f"unreadable RLE mask ({err})") from err


def image_file_name(scene: Scene) -> str:
    return f"shapes_{scene.split}_{scene.image_id:012d}.jpg"


def save_image(scene: Scene, image_dir: Path, quality: int = 95) -> str:
    image_dir.mkdir(parents=True, exist_ok=True)
    name = image_file_name(scene)
    # 4:4:4 chroma: no colour bleeding across the sharp shape edges
    Image.fromarray(scene.image).save(image_dir / name, quality=quality, subsampling=0)
    return name


def coco_dict(scenes: list[Scene]) -> dict:
    """The COCO instances dict of ``scenes`` (annotation ids are ``image_id * 100 + object id``)."""
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CATEGORIES)]
    cat_id = {c["name"]: c["id"] for c in categories}
    images, annotations = [], []
    for scene in scenes:
        images.append({"id": scene.image_id, "file_name": image_file_name(scene),
                       "width": scene.size, "height": scene.size})
        for obj in scene.objects:
            annotations.append({
                "id": annotation_id(scene, obj.id), "image_id": scene.image_id,
                "category_id": cat_id[obj.kind], "segmentation": encode_rle(obj.mask),
                "area": float(obj.area), "bbox": [float(v) for v in obj.bbox], "iscrowd": 0,
                "attributes": {"colour": obj.colour, "size": obj.size, "glyph": obj.glyph},
            })
    return {"info": {"description": "groundlab synthetic shapes world"}, "licenses": [],
            "images": images, "annotations": annotations, "categories": categories}


def annotation_id(scene: Scene, object_id: int) -> int:
    return scene.image_id * 100 + object_id


def write_coco(scenes: list[Scene], ann_file: str | Path, image_dir: str | Path) -> Path:
    """Write ``scenes`` as COCO instances JSON plus JPEG images. Returns the annotation path."""
    ann_file, image_dir = Path(ann_file), Path(image_dir)
    for scene in scenes:
        save_image(scene, image_dir)
    ann_file.parent.mkdir(parents=True, exist_ok=True)
    ann_file.write_text(json.dumps(coco_dict(scenes)))
    return ann_file


def _tokens(sentence: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", sentence.lower())


def write_refer(splits: dict[str, list[Scene]], data_root: str | Path, image_dir: str | Path,
                dataset: str = "refcoco", split_by: str = "unc") -> Path:
    """Write scenes in the REFER layout. ``splits`` maps a REFER split name (train / val / testA ...)
    to its scenes; every object becomes one ref whose sentences are all its expressions."""
    check_refer(dataset, split_by)
    root = Path(data_root) / dataset
    root.mkdir(parents=True, exist_ok=True)
    all_scenes = [s for scenes in splits.values() for s in scenes]
    write_coco(all_scenes, root / "instances.json", image_dir)
    refs, sent_id, ref_id = [], 0, 0
    cat_id = {name: i + 1 for i, name in enumerate(CATEGORIES)}
    for split, scenes in splits.items():
        for scene in scenes:
            for obj in scene.objects:
                sentences = []
                for ref in scene.refs_for(obj.id):
                    sentences.append({"sent_id": sent_id, "sent": ref.text, "raw": ref.text,
                                      "tokens": _tokens(ref.text)})
                    sent_id += 1
                ann = annotation_id(scene, obj.id)
                refs.append({"ref_id": ref_id, "ann_id": ann, "image_id": scene.image_id, "split": split,
                             "category_id": cat_id[obj.kind],
                             "file_name": image_file_name(scene).replace(".jpg", f"_{ann}.jpg"),
                             "sent_ids": [s["sent_id"] for s in sentences], "sentences": sentences})
                ref_id += 1
    path = root / f"refs({split_by}).p"
    with open(path, "wb") as f:
        pickle.dump(refs, f)
    return path


@dataclass
class ReferSample:
    """One (expression, object) pair of a REFER dataset."""

    ref_id: int
    sent_id: int
    sentence: str
    image_id: int
    image_path: Path
    ann_id: int
    bbox: list[float]  # COCO xywh, pixels
    mask: np.ndarray  # (H, W) bool


REFER_DATASETS: dict[str, tuple[str, ...]] = {
    "refcoco": ("unc", "google"), "refcoco+": ("unc",), "refcocog": ("umd", "google"), "refclef": ("unc", "berkeley")}
"""The REFER datasets and the partitions (``split_by``) each is published with: ``<data_root>/<dataset>/
instances.json`` + ``refs(<split_by>).p``. RefCOCO / RefCOCO+ (unc) evaluate on val / testA / testB,
RefCOCOg (umd) on val / test."""


def check_refer(dataset: str, split_by: str) -> None:
    """A clear error for a REFER dataset / partition pair that is not published."""
    if dataset not in REFER_DATASETS:
        raise ValueError(f"unknown REFER dataset {dataset!r}; known: {sorted(REFER_DATASETS)}")
    if split_by not in REFER_DATASETS[dataset]:
        raise ValueError(f"REFER dataset {dataset!r} has no {split_by!r} partition; it has "
                         f"{list(REFER_DATASETS[dataset])}")


class Refer:
    """Reader of the REFER layout (RefCOCO / RefCOCO+ / RefCOCOg / RefCLEF, :data:`REFER_DATASETS`).

    ``refs(<split_by>).p`` is a pickle, the format the datasets are published in: load only files
    you trust.
    """

    REQUIRED_REF_KEYS = ("ref_id", "ann_id", "image_id", "split", "sentences")

    def __init__(self, data_root: str | Path, image_dir: str | Path, dataset: str = "refcoco",
                 split_by: str = "unc"):
        from .config import read_json
        from .inputs import check_xywh

        check_refer(dataset, split_by)
        self.dataset, self.split_by = dataset, split_by
        root = Path(data_root) / dataset
        ann_file, refs_file = root / "instances.json", root / f"refs({split_by}).p"
        for path in (ann_file, refs_file):
            if not path.is_file():
                raise FileNotFoundError(f"REFER dataset {dataset!r}: missing {path}")
        self.image_dir = Path(image_dir)
        instances = read_json(ann_file, "REFER instances")
        if not isinstance(instances, dict) or not all(isinstance(instances.get(k), list)
                                                      for k in ("images", "annotations")):
            raise ValueError(f"{ann_file}: not COCO instances (needs 'images' and 'annotations' lists)")
        for i, img in enumerate(instances["images"]):
            if not isinstance(img, dict) or not {"id", "file_name", "height", "width"} <= set(img):
                raise ValueError(f"{ann_file}: image #{i} needs id, file_name, height and width")
        for i, ann in enumerate(instances["annotations"]):
            if not isinstance(ann, dict) or not {"id", "image_id", "segmentation", "bbox"} <= set(ann):
                raise ValueError(f"{ann_file}: annotation #{i} needs id, image_id, segmentation and bbox")
            try:
                check_xywh(ann["bbox"], f"annotation {ann['id']} bbox")
            except ValueError as err:
                raise ValueError(f"{ann_file}: {err}") from None
        self.coco = COCO()
        self.coco.dataset = instances
        self.coco.createIndex()
        try:
            with open(refs_file, "rb") as f:
                self.refs = pickle.load(f)
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, ValueError) as err:
            raise ValueError(f"{refs_file}: not a REFER refs pickle ({type(err).__name__}: {err})") from err
        if not isinstance(self.refs, list):
            raise ValueError(f"{refs_file}: expected a list of refs, got {type(self.refs).__name__}")
        for i, ref in enumerate(self.refs):
            if not isinstance(ref, dict):
                raise ValueError(f"{refs_file}: ref #{i} is a {type(ref).__name__}, not a dict")
            missing = [k for k in self.REQUIRED_REF_KEYS if k not in ref]
            if missing:
                raise ValueError(f"{refs_file}: ref #{i} lacks keys {missing}")
            if ref["ann_id"] not in self.coco.anns:
                raise ValueError(f"{refs_file}: ref {ref['ref_id']} points at annotation {ref['ann_id']}, "
                                 f"which {ann_file} does not contain")
            if ref["image_id"] not in self.coco.imgs:
                raise ValueError(f"{refs_file}: ref {ref['ref_id']} points at image {ref['image_id']}, "
                                 f"which {ann_file} does not contain")
            sentences = ref["sentences"]
            if (not isinstance(sentences, list) or not sentences
                    or not all(isinstance(x, dict) and isinstance(x.get("sent"), str) and x["sent"].strip()
                               and "sent_id" in x for x in sentences)):
                raise ValueError(f"{refs_file}: ref {ref['ref_id']} needs a non-empty list of sentences, each "
                                 "with a non-empty 'sent' and a 'sent_id'")
        self.ann_file, self.refs_file = ann_file, refs_file

    def splits(self) -> list[str]:
        return sorted({r["split"] for r in self.refs})

    def image_ids(self) -> dict[Path, int]:
        """Each image file's id (the paths :meth:`samples` gives)."""
        return {self.image_dir / img["file_name"]: img_id for img_id, img in self.coco.imgs.items()}

    def instance_masks(self, image_id: int) -> list[np.ndarray]:
        """Every annotated object's (H, W) bool mask in one image (each image's decoded once a call)."""
        return [self.coco.annToMask(a).astype(bool) for a in self.coco.loadAnns(self.coco.getAnnIds(imgIds=[image_id]))]

    def instance_categories(self, image_id: int) -> list[int | None]:
        """Every annotated object's ``category_id`` in one image (None where an annotation has none),
        in :meth:`instance_masks`' order."""
        return [a.get("category_id") for a in self.coco.loadAnns(self.coco.getAnnIds(imgIds=[image_id]))]

    def samples(self, split: str) -> list[ReferSample]:
        """Every (expression, object) pair of ``split``; a split without refs is an error naming the
        splits the file has."""
        if split not in self.splits():
            raise ValueError(f"{self.refs_file}: no refs of split {split!r}; its splits: {self.splits()}")
        out = []
        for ref in self.refs:
            if ref["split"] != split:
                continue
            ann = self.coco.anns[ref["ann_id"]]
            img = self.coco.imgs[ref["image_id"]]
            try:
                seg = ann["segmentation"]  # RLE (checked here) or polygons (RefCOCO's own)
                mask = decode_rle(seg) if isinstance(seg, dict) else self.coco.annToMask(ann).astype(bool)
            except Exception as err:  # noqa: BLE001 - pycocotools raises bare types for bad RLE / polygons
                raise ValueError(f"{self.ann_file}: annotation {ann['id']}: unreadable segmentation ({err})") from err
            if mask.shape != (img["height"], img["width"]):
                raise ValueError(f"{self.ann_file}: annotation {ann['id']}: mask {mask.shape} vs image "
                                 f"{(img['height'], img['width'])}")
            if not mask.any():
                raise ValueError(f"{self.ann_file}: annotation {ann['id']} (ref {ref['ref_id']}) has an empty mask")
            for sent in ref["sentences"]:
                out.append(ReferSample(ref["ref_id"], sent["sent_id"], sent["sent"], ref["image_id"],
                                       self.image_dir / img["file_name"], ref["ann_id"], list(ann["bbox"]), mask))
        return out


def load_image(path: str | Path) -> Image.Image:
    """Open an image as RGB, with an error that names the file when it is missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, SyntaxError) as err:
        raise ValueError(f"cannot decode image {path}: {err}") from err


# ----------------------------------------------------------------------------------------------
# command line: export the default world


def contact_sheet(scenes: list[Scene], path: str | Path, columns: int = 8, scale: int = 2) -> Path:
    """A PNG grid of scenes with their instance outlines, for a look at the data."""
    size = scenes[0].size * scale
    rows = (len(scenes) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * size, rows * size), (255, 255, 255))
    for i, scene in enumerate(scenes):
        img = np.repeat(np.repeat(scene.image, scale, 0), scale, 1).copy()
        inst = np.repeat(np.repeat(scene.instance_map(), scale, 0), scale, 1)
        edge = np.zeros(inst.shape, bool)
        edge[1:] |= inst[1:] != inst[:-1]
        edge[:, 1:] |= inst[:, 1:] != inst[:, :-1]
        img[edge] = 0
        sheet.paste(Image.fromarray(img), ((i % columns) * size, (i // columns) * size))
    path = Path(path)
    sheet.save(path)
    return path


def main(argv: list[str] | None = None) -> None:
    import argparse

    from .world import World, WorldConfig

    p = argparse.ArgumentParser(prog="python -m groundlab.shared.world_io",
                                description="Export the synthetic world as COCO instances + RefCOCO (REFER) files.")
    p.add_argument("--out", type=Path, default=Path("runs/world/default"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--val", type=int, default=200)
    p.add_argument("--test", type=int, default=200)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--max-objects", type=int, default=3)
    args = p.parse_args(argv)
    world = World(WorldConfig(image_size=args.image_size, max_objects=args.max_objects), seed=args.seed)
    splits = {name: world.scenes(name, n) for name, n in (("train", args.train), ("val", args.val),
                                                           ("test", args.test))}
    image_dir = args.out / "images"
    for name, scenes in splits.items():
        write_coco(scenes, args.out / "annotations" / f"instances_{name}.json", image_dir)
    write_refer(splits, args.out / "refer", image_dir, dataset="refcoco", split_by="unc")
    contact_sheet(splits["train"][:32], args.out / "preview.png")
    stats: dict = {"world": world.key()}
    for name, scenes in splits.items():
        stats[f"{name}/images"] = len(scenes)
        stats[f"{name}/objects"] = sum(len(s.objects) for s in scenes)
        stats[f"{name}/expressions"] = sum(len(s.refs) for s in scenes)
        stats[f"{name}/qa"] = sum(len(s.qa) for s in scenes)
    (args.out / "metrics.json").write_text(json.dumps(stats, indent=2))
    for k, v in stats.items():
        print(f"{k}: {v}")
    print(args.out / "metrics.json")


if __name__ == "__main__":
    main()
