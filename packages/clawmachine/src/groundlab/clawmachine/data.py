"""ClawMachine's data: the release's sample format, read and checked, and the synthetic world
exported into it.

A file is a JSON list of samples (:mod:`groundlab.clawmachine.processing` has the format)::

    {"id": "...", "image": "images/x.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhere is the red circle?"},
                       {"from": "gpt", "value": "<ref_patch>"}],
     "ref_list": [[[0.12, 0.30, 0.41, 0.62]]]}

The world gives

- **stage 1** (grounded captions, the release's GRIT adaptation): the scene's caption with each
  object's phrase followed by its region, ``"a large red circle<ref_patch>, a blue square<ref_patch>
  and ..."``;
- **stage 2** (referring and grounding conversations): one multi-turn conversation per scene, its
  turns shuffled: grounding (``Where is <expression>?`` -> the object's region), referring (``What is
  <ref_patch>?`` -> the object's first, shortest expression) and yes / no questions about a
  (colour, kind) being in the image (half yes, half no);
- **held-out**: the REFER layout (``refcoco/refs(unc).p`` + ``instances.json``) for grounding, and
  records with ``task`` (``reg`` with every expression of the object as ``references``, or ``yesno``)
  for the other two.

:func:`read_samples` checks every sample before training starts (image file, turns, markers against
``ref_list``, box values) and names the file and sample of the first problem.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from groundlab.shared.config import read_json
from groundlab.shared.world import World, draw_expression, shares_kind
from groundlab.shared.world_io import save_image, write_refer

from .processing import IMAGE_MARKER, REGION_MARKER, ClawProcessor, check_region
from .visual_tokenizer import TokenizedImage

GROUNDED_CAPTION = "Describe the image and ground every object."
GROUNDING = "Where is {expression}?"
REFERRING = f"What is {REGION_MARKER}?"
COPY = f"Repeat {REGION_MARKER}."
YES_NO = "Is there a {colour} {kind} in the image?"
EVAL_TASKS = ("reg", "yesno")


def normalised_box(obj, size: int) -> list[float]:
    """An object's box, normalised to the (square) image: x0, y0, x1, y1."""
    x, y, w, h = obj.bbox
    return [round(x / size, 6), round(y / size, 6), round((x + w) / size, 6), round((y + h) / size, 6)]


# ----------------------------------------------------------------------------------------------
# reading


def read_samples(path: str | Path, image_root: str | Path) -> list[dict]:
    """The samples of a JSON file, every one checked (see the module docstring)."""
    path, root = Path(path), Path(image_root)
    samples = read_json(path, "ClawMachine sample file")
    if not isinstance(samples, list):
        raise ValueError(f"{path}: a sample file is a JSON list of samples")
    for i, rec in enumerate(samples):
        where = f"{path}: sample {i}" + (f" (id {rec.get('id')})" if isinstance(rec, dict) and "id" in rec else "")
        if not isinstance(rec, dict):
            raise ValueError(f"{where}: a sample is an object")
        conv = rec.get("conversations")
        if not isinstance(conv, list) or len(conv) < 2 or not all(isinstance(t, dict) for t in conv):
            raise ValueError(f"{where}: 'conversations' must hold at least a human and a gpt turn")
        texts = [t.get("value") for t in conv]
        if not all(isinstance(t, str) for t in texts):
            raise ValueError(f"{where}: every turn needs a text 'value'")
        refs = rec.get("ref_list", [])
        n_markers = sum(t.count(REGION_MARKER) for t in texts)
        if not isinstance(refs, list) or len(refs) != n_markers:
            got = len(refs) if isinstance(refs, list) else type(refs).__name__
            raise ValueError(f"{where}: {n_markers} {REGION_MARKER} markers but ref_list has {got} entries")
        for k, region in enumerate(refs):
            check_region(region, f"{where}: ref_list[{k}]")
        uses_image = any(IMAGE_MARKER in t for t in texts) or n_markers > 0
        if uses_image:
            if not isinstance(rec.get("image"), str):
                raise ValueError(f"{where}: the conversation shows an image but 'image' is missing")
            if not (root / rec["image"]).is_file():
                raise FileNotFoundError(f"{where}: image not found: {root / rec['image']}")
    return samples


def load_tokens(path: str | Path) -> dict[str, TokenizedImage]:
    """The tokenized images of a run (``image path -> codes, remained_map[, features]``)."""
    raw = torch.load(path, weights_only=True)
    return {name: TokenizedImage(*item) for name, item in raw.items()}


class ClawDataset(Dataset):
    """Samples -> ``input_ids`` / ``labels`` over the images' cached tokens (the tokenizer is frozen
    and deterministic, so each image is tokenized once), with the scene's inputs the model takes
    (:meth:`ClawProcessor.scene_inputs`)."""

    def __init__(self, samples: list[dict], tokens: dict[str, TokenizedImage], processor: ClawProcessor,
                 source: str = "samples"):
        self.samples, self.tokens, self.processor, self.source = samples, tokens, processor, source
        missing = sorted({s["image"] for s in samples if "image" in s} - set(tokens))
        if missing:
            raise ValueError(f"{source}: {len(missing)} images were never tokenized, e.g. {missing[0]}")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, idx: int) -> dict:
        rec = self.samples[idx]
        image = self.tokens.get(rec.get("image"))
        where = f"{self.source}: sample {idx}"
        enc = self.processor.encode(rec["conversations"], image, rec.get("ref_list", []), where)
        return {"input_ids": enc.input_ids, "labels": enc.labels, **self.processor.scene_inputs(enc, image, where)}


# ----------------------------------------------------------------------------------------------
# the world in this format


def _turns_record(rid: str, image: str, turns: list[tuple[str, str, list]], **extra) -> dict:
    conv, refs = [], []
    for k, (question, answer, regions) in enumerate(turns):
        conv += [{"from": "human", "value": (f"{IMAGE_MARKER}\n" if k == 0 else "") + question},
                 {"from": "gpt", "value": answer}]
        refs += regions
    return {"id": rid, "image": image, "conversations": conv, "ref_list": refs, **extra}


def grounded_caption(scene) -> tuple[str, list]:
    """The caption with ``<ref_patch>`` after each object's phrase, and their regions in order."""
    text, regions, cursor = "", [], 0
    for phrase in scene.caption_phrases:
        text += scene.caption[cursor:phrase.end] + REGION_MARKER
        regions.append([normalised_box(scene.objects[phrase.object_id], scene.size)])
        cursor = phrase.end
    return text + scene.caption[cursor:], regions


def yes_no_turns(scene, world: World, rng: np.random.Generator) -> list[tuple[str, str, list]]:
    """One question about a (colour, kind) in the scene (yes) and one about one that is not (no)."""
    present = sorted({(o.colour, o.kind) for o in scene.objects})
    absent = [(c, k) for c in world.config.colours for k in world.config.kinds if (c, k) not in present]
    yes = present[int(rng.integers(len(present)))]
    no = absent[int(rng.integers(len(absent)))]
    return [(YES_NO.format(colour=yes[0], kind=yes[1]), "yes", []), (YES_NO.format(colour=no[0], kind=no[1]), "no", [])]


def stage2_turns(scene, world: World, rng: np.random.Generator, rec_contrast: float = 0.0,
                 rec_shortest: float = 0.0, copy_turns: bool = False) -> list[tuple[str, str, list]]:
    """Grounding and referring turns for every object that has an expression, and the yes / no pair,
    in a shuffled order. The grounding turn's expression:
    :func:`groundlab.shared.world.draw_expression` (uniform unless ``rec_contrast`` / ``rec_shortest``).
    ``copy_turns``: each object also gets ``Repeat <ref_patch>.`` -> the same region written back (the
    copy a grounding answer makes, without finding the object)."""
    turns = []
    for obj in scene.objects:
        refs = scene.refs_for(obj.id)
        if not refs:
            continue
        region = [normalised_box(obj, scene.size)]
        expression = draw_expression(scene, obj.id, rng, rec_contrast, rec_shortest, first=True).text
        turns.append((GROUNDING.format(expression=expression), REGION_MARKER, [region]))
        turns.append((REFERRING, refs[0].text, [region]))
        if copy_turns:
            turns.append((COPY, REGION_MARKER, [region, region]))
    turns += yes_no_turns(scene, world, rng)
    return [turns[int(k)] for k in rng.permutation(len(turns))]


def same_kind_turns(scene, rng: np.random.Generator) -> list[tuple[str, str, list]]:
    """A grounding turn for every object whose kind another object of the scene shares, each with
    one of its attribute expressions drawn at random (``the red circle``, ``the small circle``: the
    object told apart by what it looks like, not by where it is); none when no object shares a kind."""
    turns = []
    for obj in scene.objects:
        refs = [r for r in scene.refs_for(obj.id) if r.type == "attribute"]
        if refs and shares_kind(scene, obj):
            expression = refs[int(rng.integers(len(refs)))].text
            turns.append((GROUNDING.format(expression=expression), REGION_MARKER, [[normalised_box(obj, scene.size)]]))
    return [turns[int(k)] for k in rng.permutation(len(turns))]


def export_world(world: World, split: str, n_scenes: int, out: Path, seed: int = 0, same_kind_repeat: int = 1,
                 rec_contrast: float = 0.0, rec_shortest: float = 0.0, copy_turns: bool = False) -> dict[str, int]:
    """Scenes of ``split`` under ``out``: ``images/``; for training, ``<split>_stage1.json`` (grounded
    captions) and ``<split>_stage2.json`` (conversations, :func:`stage2_turns` with ``rec_contrast`` /
    ``rec_shortest`` / ``copy_turns``; ``same_kind_repeat`` N > 1 adds N - 1 conversations of :func:`same_kind_turns` a
    scene that has such objects); for held-out splits, the
    REFER layout under ``refer/`` and ``<split>_eval.json`` (``reg`` and ``yesno`` records). Returns
    counts."""
    if same_kind_repeat < 1:
        raise ValueError(f"same_kind_repeat must be >= 1, got {same_kind_repeat}")
    for name, p in (("rec_contrast", rec_contrast), ("rec_shortest", rec_shortest)):
        if not 0 <= p <= 1:
            raise ValueError(f"{name} is a probability in [0, 1], got {p}")
    (out / "images").mkdir(parents=True, exist_ok=True)
    scenes = world.scenes(split, n_scenes)
    files: dict[str, list[dict]] = {}
    for scene in scenes:
        image = "images/" + save_image(scene, out / "images")
        rng = np.random.default_rng([seed, scene.image_id])
        if split == "train":
            caption, regions = grounded_caption(scene)
            files.setdefault("stage1", []).append(_turns_record(f"{scene.image_id}-caption", image,
                                                                [(GROUNDED_CAPTION, caption, regions)]))
            files.setdefault("stage2", []).append(_turns_record(f"{scene.image_id}-conv", image,
                                                                stage2_turns(scene, world, rng, rec_contrast,
                                                                             rec_shortest, copy_turns)))
            for k in range(1, same_kind_repeat):
                turns = same_kind_turns(scene, rng)
                if turns:
                    files["stage2"].append(_turns_record(f"{scene.image_id}-kind{k}", image, turns))
            continue
        for obj in scene.objects:
            refs = scene.refs_for(obj.id)
            if refs:
                files.setdefault("eval", []).append(_turns_record(
                    f"{scene.image_id}-reg-{obj.id}", image, [(REFERRING, refs[0].text, [[normalised_box(obj, scene.size)]])],
                    task="reg", references=[r.text for r in refs]))
        for k, turn in enumerate(yes_no_turns(scene, world, rng)):
            files.setdefault("eval", []).append(_turns_record(f"{scene.image_id}-yesno-{k}", image, [turn], task="yesno"))
    if split != "train":
        write_refer({split: scenes}, out / "refer", out / "images")
    counts = {}
    for name, records in files.items():
        (out / f"{split}_{name}.json").write_text(json.dumps(records))
        counts[f"{split}_{name}"] = len(records)
    return counts
