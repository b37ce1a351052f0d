"""IVM-Mix-1M data: JSONL + grayscale JPEG heatmaps, and the synthetic world exported into it.

One split is a folder::

    <root>/<Split>/meta.jsonl     {"uuid": "...", "image"?: "...", "instruction": ["...", ...]} per line
    <root>/<Split>/images/img_<uuid>.jpg   (the default when "image" is absent)
    <root>/<Split>/masks/mask_<uuid>.jpg   grayscale heatmap, normalised to [0, 1] when read

A line may carry ``"box": [x0, y0, x1, y1]`` instead of a mask file: a box normalised to [0, 1] on the
image centre-padded to a square (side ``max(W, H)``); its heatmap is the filled box.

The release's splits are ``HumanLabelData`` (human-annotated) and the machine-annotated
``RobotMachineData`` / ``VQAMachineData``; a split's annotator is given by its name (``is_human``).
One instruction is sampled per item and step. The image and its heatmap are cropped together
(RandomResizedCrop, scale 0.8-1.0) to the model's square input.

The world export writes a small clean ``HumanLabelData`` split (the target object's exact mask) and a
larger ``VQAMachineData`` split whose labels are corrupted the ways automatic annotators fail: the
wrong object, the right object shifted, a region far too large, part of the object only. Machine lines
carry an extra ``"corruption"`` key (``"none"`` or the kind) so analyses can see the truth; the reader
ignores it.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.transforms import RandomResizedCrop

from groundlab.shared.config import iter_jsonl
from groundlab.shared.world import Scene, World
from groundlab.shared.world_io import load_image

from .processing import DISCRIMINATOR_PROMPT, POLICY_PROMPT, encode_prompt, masked_image

HUMAN_SPLITS = ("HumanLabelData",)
MACHINE_SPLITS = ("RobotMachineData", "VQAMachineData")
CORRUPTIONS = ("wrong_object", "shifted", "too_large", "partial")
INSTRUCTION_TYPES = ("attribute", "superlative", "relation", "question")
"""The world's instruction types (:func:`typed_instructions`)."""



# ----------------------------------------------------------------------------------------------
# reading


def read_mask(path: str | Path, contrast: float = 1.5) -> np.ndarray:
    """A heatmap JPEG as float32 (H, W) in [0, 1]: grayscale, multiplied by ``contrast`` and saturated
    at 255 (the release's reader does this), then min-max normalised; a flat map is divided by its max
    (all zeros stays zeros)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mask not found: {path}")
    try:
        with Image.open(path) as im:
            gray = np.asarray(im.convert("L"), dtype=np.float32)
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"cannot read mask {path}: {err}") from err
    gray = np.minimum(np.round(gray * contrast), 255.0)
    lo, hi = float(gray.min()), float(gray.max())
    if hi - lo >= 1e-4:
        return (gray - lo) / (hi - lo)
    return gray / hi if hi > 0 else gray


@dataclass
class Item:
    uuid: str
    image: Path
    mask: Path
    instructions: list[str]
    is_human: bool
    split: str
    extra: dict
    box: tuple[float, float, float, float] | None = None

    def heatmap(self, width: int, height: int, contrast: float = 1.5) -> np.ndarray:
        """The label: the mask file, or the filled box when the line gave a box and no mask file."""
        if self.mask.is_file() or self.box is None:
            return read_mask(self.mask, contrast)
        return box_heatmap(self.box, width, height)


def box_heatmap(box, width: int, height: int) -> np.ndarray:
    """A box normalised on the centre-padded square image, as a filled (H, W) heatmap of the image."""
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (0 <= x0 <= x1 <= 1 and 0 <= y0 <= y1 <= 1):
        raise ValueError(f"box {box} is not [x0, y0, x1, y1] normalised to [0, 1] with x0 <= x1, y0 <= y1")
    side = max(width, height)
    ox, oy = (side - width) / 2, (side - height) / 2
    xs = np.arange(width) + 0.5 + ox  # pixel centres on the padded square
    ys = np.arange(height) + 0.5 + oy
    inside_x = (xs >= x0 * side) & (xs <= x1 * side)
    inside_y = (ys >= y0 * side) & (ys <= y1 * side)
    return (inside_y[:, None] & inside_x[None, :]).astype(np.float32)


def read_split(split_dir: str | Path, is_human: bool | None = None) -> list[Item]:
    """The items of one split folder; ``is_human`` defaults from the split's name."""
    split_dir = Path(split_dir)
    meta = split_dir / "meta.jsonl"
    name = split_dir.name
    if is_human is None:
        if name not in HUMAN_SPLITS + MACHINE_SPLITS:
            raise ValueError(f"{split_dir}: unknown split name {name!r}; pass is_human= or use one of "
                             f"{HUMAN_SPLITS + MACHINE_SPLITS}")
        is_human = name in HUMAN_SPLITS
    items = []
    for n, rec in iter_jsonl(meta, "IVM split's meta.jsonl"):
        if "uuid" not in rec or "instruction" not in rec:
            raise ValueError(f"{meta}:{n}: needs 'uuid' and 'instruction'")
        ins = rec["instruction"]
        if isinstance(ins, str):
            ins = [ins]
        if not ins or not all(isinstance(x, str) and x.strip() for x in ins):
            raise ValueError(f"{meta}:{n}: 'instruction' must be a non-empty list of non-empty strings")
        uuid = str(rec["uuid"])
        # the release's utilities read the box as "boxes" (one flat [x0, y0, x1, y1]); "box" here
        if "box" in rec and "boxes" in rec and rec["box"] != rec["boxes"]:
            raise ValueError(f"{meta}:{n}: 'box' {rec['box']!r} and 'boxes' {rec['boxes']!r} disagree")
        key = "box" if "box" in rec else "boxes"
        box = rec.get(key)
        if box is not None:
            ok = (isinstance(box, list) and len(box) == 4
                  and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box))
            if not ok or not (0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1):
                raise ValueError(f"{meta}:{n}: '{key}' must be [x0, y0, x1, y1] normalised to [0, 1] with x0 < x1 "
                                 f"and y0 < y1, got {box!r}")
        if "image" in rec and (not isinstance(rec["image"], str) or not rec["image"]):
            raise ValueError(f"{meta}:{n}: 'image' must be a file name, got {rec['image']!r}")
        extra = {k: v for k, v in rec.items() if k not in ("uuid", "image", "instruction", "box", "boxes")}
        items.append(Item(uuid, split_dir / "images" / rec.get("image", f"img_{uuid}.jpg"),
                          split_dir / "masks" / f"mask_{uuid}.jpg", list(ins), bool(is_human), name, extra,
                          tuple(box) if box is not None else None))
    return items


# ----------------------------------------------------------------------------------------------
# writing (the world export)


def write_split(out_dir: str | Path, rows: list[tuple[str, np.ndarray, np.ndarray, list[str], dict]]) -> Path:
    """Write ``(uuid, image (H, W, 3) uint8, heatmap (H, W) float [0, 1], instructions, extra)`` rows."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "masks").mkdir(parents=True, exist_ok=True)
    with open(out_dir / "meta.jsonl", "w") as f:
        for uuid, image, heat, instructions, extra in rows:
            Image.fromarray(image).save(out_dir / "images" / f"img_{uuid}.jpg", quality=95, subsampling=0)
            gray = np.clip(np.round(heat * 255), 0, 255).astype(np.uint8)
            Image.fromarray(gray, mode="L").save(out_dir / "masks" / f"mask_{uuid}.jpg", quality=95)
            f.write(json.dumps({"uuid": uuid, "instruction": instructions, **extra}) + "\n")
    return out_dir


def typed_instructions(scene: Scene) -> dict[int, list[tuple[str, str]]]:
    """``(type, instruction)`` per target object: its referring expressions ("find the ...", typed
    ``attribute`` / ``superlative`` / ``relation`` as the world made them), then the questions about it
    alone (colour / size / shape; typed ``question``)."""
    out: dict[int, list[tuple[str, str]]] = {}
    for r in scene.refs:
        out.setdefault(r.target, []).append((r.type, f"find {r.text}."))
    for q in scene.qa:
        if q.type in ("colour", "size", "shape") and len(q.objects) == 1:
            out.setdefault(q.objects[0], []).append(("question", q.question))
    return out


def target_instructions(scene: Scene, types: tuple[str, ...] = INSTRUCTION_TYPES) -> dict[int, list[str]]:
    """The instructions of :func:`typed_instructions` of the given types, per target object (a target
    with none of them is absent)."""
    unknown = set(types) - set(INSTRUCTION_TYPES)
    if unknown:
        raise ValueError(f"unknown instruction types {sorted(unknown)}; known: {list(INSTRUCTION_TYPES)}")
    out = {t: [x for kind, x in typed if kind in types] for t, typed in typed_instructions(scene).items()}
    return {t: xs for t, xs in out.items() if xs}


def corrupt(scene: Scene, target: int, kind: str, rng: np.random.Generator) -> np.ndarray | None:
    """A machine-annotator failure of ``kind`` for ``target``'s mask (None if the scene allows none)."""
    mask = scene.objects[target].mask
    h, w = mask.shape
    if kind == "wrong_object":
        others = [o for o in scene.objects if o.id != target]
        return others[int(rng.integers(len(others)))].mask.copy() if others else None
    if kind == "shifted":
        ys, xs = np.nonzero(mask)
        for _ in range(20):
            dy, dx = (int(v) for v in rng.integers(-h // 3, h // 3 + 1, size=2))
            if abs(dy) + abs(dx) < h // 5:
                continue
            y2, x2 = ys + dy, xs + dx
            keep = (y2 >= 0) & (y2 < h) & (x2 >= 0) & (x2 < w)
            if keep.sum() >= 0.5 * len(ys):
                out = np.zeros_like(mask)
                out[y2[keep], x2[keep]] = True
                return out
        return None
    if kind == "too_large":
        ys, xs = np.nonzero(mask)
        cy, cx = (ys.min() + ys.max()) / 2, (xs.min() + xs.max()) / 2
        half = 1.5 * max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1) + 4
        yy, xx = np.mgrid[:h, :w]
        return (np.abs(yy - cy) <= half) & (np.abs(xx - cx) <= half)
    if kind == "partial":
        ys, xs = np.nonzero(mask)
        out = mask.copy()
        axis = int(rng.integers(2))
        cut = np.median(ys if axis == 0 else xs)
        side = rng.random() < 0.5
        grid = np.mgrid[:h, :w][axis]
        out &= (grid < cut) if side else (grid >= cut)
        return out if out.sum() >= 4 else None
    raise ValueError(f"unknown corruption {kind!r}; known: {CORRUPTIONS}")


def export_world(world: World, out_root: str | Path, human_scenes: int, machine_scenes: int,
                 corrupt_prob: float = 0.5, seed: int = 0,
                 human_types: tuple[str, ...] = INSTRUCTION_TYPES) -> dict[str, int]:
    """Write ``HumanLabelData`` (clean labels, train scenes [0, human_scenes)) and ``VQAMachineData``
    (train scenes after them, each label corrupted with ``corrupt_prob``, kind chosen uniformly among
    those the scene allows). One item per (scene, target object). ``human_types``: the instruction
    types the human items carry (the machine items carry every type); a target with none of them
    gives no human item, counted as ``HumanLabelData/no_instruction_of_types``. Returns counts per
    split / corruption."""
    out_root = Path(out_root)
    rng = np.random.default_rng(seed)
    counts: Counter = Counter()
    human = _rows(world, "train", 0, human_scenes, None, rng, counts, types=human_types)
    machine = _rows(world, "train", human_scenes, machine_scenes, corrupt_prob, rng, counts, "VQAMachineData")
    write_split(out_root / "HumanLabelData", human)
    write_split(out_root / "VQAMachineData", machine)
    counts["HumanLabelData"], counts["VQAMachineData"] = len(human), len(machine)
    return dict(counts)


def export_heldout_machine(world: World, out_root: str | Path, scenes: int, corrupt_prob: float = 0.5,
                           seed: int = 0) -> dict[str, int]:
    """``VQAMachineData`` of held-out scenes (the world's ``val`` split [0, scenes)), corrupted as
    :func:`export_world` corrupts the training ones: the items on which a discriminator's separation of
    clean from corrupted labels is measured."""
    counts: Counter = Counter()
    rows = _rows(world, "val", 0, scenes, corrupt_prob, np.random.default_rng(seed), counts, "VQAMachineData")
    write_split(Path(out_root) / "VQAMachineData", rows)
    counts["VQAMachineData"] = len(rows)
    return dict(counts)


def _rows(world: World, split: str, start: int, n: int, corrupt_prob: float | None, rng: np.random.Generator,
          counts: Counter, name: str = "HumanLabelData", types: tuple[str, ...] = INSTRUCTION_TYPES) -> list:
    """One row per (scene, target object) of ``world``'s ``split`` scenes [start, start + n) with an
    instruction of ``types``; labels corrupted with ``corrupt_prob`` (None: clean, no ``corruption`` tag)."""
    rows = []
    for i in range(start, start + n):
        scene = world.scene(split, i)
        mine = target_instructions(scene, types)
        counts[f"{name}/no_instruction_of_types"] += len(scene.objects) - len(mine)
        for target, instructions in sorted(mine.items()):
            heat, extra = scene.objects[target].mask, {}
            if corrupt_prob is not None:
                kind = "none"
                if rng.random() < corrupt_prob:
                    options = [k for k in CORRUPTIONS if corrupt(scene, target, k, np.random.default_rng(0)) is not None]
                    kind = options[int(rng.integers(len(options)))] if options else "none"
                    if kind != "none":
                        heat = corrupt(scene, target, kind, rng)
                extra = {"corruption": kind}
                counts[f"{name}/{kind}"] += 1
            rows.append((f"{scene.split}{scene.index:06d}_{target}", scene.image, heat.astype(np.float32),
                         instructions, extra))
    return rows


# ----------------------------------------------------------------------------------------------
# the training dataset


class IVMDataset(Dataset):
    """Items of one or more splits for the generator (``role="generator"``: image, policy prompt,
    heatmap target, is_human) or the discriminator (``role="discriminator"``: the label-masked image
    and the discriminator prompt). Images and heatmaps are loaded once (the world's are tiny); an
    unreadable file is an error naming it."""

    def __init__(self, items: list[Item], tokenizer, n_image_tokens: int, size: int, role: str = "generator",
                 augment: bool = True, seed: int = 0, mask_contrast: float = 1.5):
        if role not in ("generator", "discriminator"):
            raise ValueError(f"role must be generator or discriminator, got {role!r}")
        self.items, self.tok, self.n_img, self.size, self.role = items, tokenizer, n_image_tokens, size, role
        self.augment, self.rng = augment, random.Random(seed)
        self.crop = RandomResizedCrop(size, scale=(0.8, 1.0), antialias=True)
        self.images, self.heats = [], []
        for it in items:
            self.images.append(np.array(load_image(it.image)))
            h, w = self.images[-1].shape[:2]
            heat = it.heatmap(w, h, mask_contrast)
            if heat.shape != self.images[-1].shape[:2]:
                raise ValueError(f"{it.mask}: mask is {heat.shape}, its image {it.image} is {self.images[-1].shape[:2]}")
            self.heats.append(heat)
        template = POLICY_PROMPT if role == "generator" else DISCRIMINATOR_PROMPT
        self.prompts = [[encode_prompt(tokenizer, template.format(instruction=x), n_image_tokens)
                         for x in it.instructions] for it in items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        image = torch.from_numpy(self.images[i]).permute(2, 0, 1)  # (3, H, W) uint8
        heat = torch.from_numpy(self.heats[i])[None]
        if self.augment:
            top, left, h, w = self.crop.get_params(image, self.crop.scale, self.crop.ratio)
            image = TF.resized_crop(image, top, left, h, w, [self.size, self.size], antialias=True)
            heat = TF.resized_crop(heat, top, left, h, w, [self.size, self.size], antialias=True)
        else:
            image = TF.resize(image, [self.size, self.size], antialias=True)
            heat = TF.resize(heat, [self.size, self.size], antialias=True)
        ids = self.prompts[i][self.rng.randrange(len(self.prompts[i]))] if self.augment else self.prompts[i][0]
        image_np, heat_t = image.permute(1, 2, 0).numpy(), heat[0].clamp(0, 1)
        if self.role == "discriminator":
            image_np = masked_image(image_np, heat_t.numpy())
        return {"input_ids": ids, "image": image_np, "mask": heat_t, "is_human": float(self.items[i].is_human),
                "index": i}
