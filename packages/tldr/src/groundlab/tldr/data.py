"""TLDR datasets: JSONL with per-token labels and taxonomy tags, and the synthetic world exported into it.

One line per (image, prompt, response)::

    {"id": "...", "image": "images/x.jpg", "prompt": "describe en", "response": "...",
     "original": "..." | null, "taxonomy": "original" | "<one of the 8>", "task": "description" |
     "caption" | "vqa", "tokens": ["there", " are", ...], "labels": [1, 1, 0, ...]}

``tokens`` / ``labels`` are per response token of the backbone's tokenizer (the labels come from
:func:`groundlab.tldr.labels.diff_labels`); a file written with another tokenizer is refused at load
time with the line that disagrees, instead of silently shifting labels. Positives have all-ones labels.

The model's input, per backbone (:class:`Layout`):

- PaliGemma: ``[image tokens x N] <bos> prompt \\n | response </s>`` with ``token_type_ids`` 0 on the
  prefix and 1 on the suffix (its prefix-LM mask);
- Llama-3.2-Vision (Mllama): ``<bos> <|image|> prompt \\n | response </s>``; the image enters through
  cross-attention, so the text sequence holds one ``<|image|>`` token and the response is indexed in the
  text alone. Text from the ``<|image|>`` token on attends to the image's valid tiles
  (``cross_attention_mask``, built by :class:`MllamaCollator`).

Only response tokens are scored (``</s>`` and padding excluded). With the naive head, only the last
response token is scored, with the response label (1 iff every token is good).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from groundlab.shared.bases.vlm import VLMCollator
from groundlab.shared.config import iter_jsonl
from groundlab.shared.multimodal import IGNORE_INDEX, pad_batch
from groundlab.shared.world import Scene, World
from groundlab.shared.world_io import image_file_name, load_image

from .labels import diff_labels
from .perturb import TAXONOMIES, WorldPerturber, describe, perturb_caption

PROMPTS = {"description": "describe en", "caption": "caption en", "vqa": "answer en {question}"}
"""PaliGemma's task prefixes (the tiny PaliGemma base answers questions after ``answer en`` too)."""


def response_tokens(tokenizer, response: str) -> list[int]:
    return tokenizer(response, add_special_tokens=False)["input_ids"]


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


@dataclass
class Layout:
    """How responses are placed in the backbone's input (see the module docstring)."""

    image_token_id: int
    n_image_tokens: int
    """PaliGemma: image tokens in the sequence (``image_seq_length``); Mllama: 1 (cross-attention)."""
    head: str = "token"  # "token" | "last"
    backbone: str = "paligemma"  # "paligemma" | "mllama"

    def __post_init__(self):
        if self.head not in ("token", "last"):
            raise ValueError(f"Layout.head must be 'token' or 'last', got {self.head!r}")
        if self.backbone not in ("paligemma", "mllama"):
            raise ValueError(f"Layout.backbone must be 'paligemma' or 'mllama', got {self.backbone!r}")
        if self.backbone == "mllama" and self.n_image_tokens != 1:
            raise ValueError(f"an Mllama layout has one <|image|> token, got n_image_tokens={self.n_image_tokens}")


MLLAMA_IMAGE_TOKEN = "<|image|>"


def layout_for(processor, head: str = "token") -> Layout:
    """The layout of a backbone's processor (PaliGemma or Mllama), with the tokenizer's image token."""
    tok = processor.tokenizer
    if type(processor).__name__.startswith("Mllama"):
        token, n, kind = MLLAMA_IMAGE_TOKEN, 1, "mllama"
    else:
        token, n, kind = "<image>", processor.image_processor.image_seq_length, "paligemma"
    token_id = tok.convert_tokens_to_ids(token)
    if token_id is None or token_id == tok.unk_token_id:
        raise ValueError(f"the {kind} processor's tokenizer has no {token} token")
    return Layout(token_id, n, head, kind)


def encode_record(tokenizer, rec: dict, layout: Layout) -> dict[str, list[int]]:
    """input_ids, token_type_ids and labels (per scored response token; -100 elsewhere)."""
    prompt = tokenizer(rec["prompt"] + "\n", add_special_tokens=False)["input_ids"]
    if layout.backbone == "mllama":
        prefix = [tokenizer.bos_token_id, layout.image_token_id] + prompt
    else:
        prefix = [layout.image_token_id] * layout.n_image_tokens + [tokenizer.bos_token_id] + prompt
    resp = response_tokens(tokenizer, rec["response"])
    if len(resp) != len(rec["labels"]):
        raise ValueError(f"record {rec['id']}: {len(resp)} response tokens but {len(rec['labels'])} labels")
    ids = prefix + resp + [tokenizer.eos_token_id]
    if layout.head == "token":
        scored = list(rec["labels"])
    else:  # naive RM: one label, at the last response token
        scored = [IGNORE_INDEX] * (len(resp) - 1) + [int(all(rec["labels"]))]
    return {"input_ids": ids, "token_type_ids": [0] * len(prefix) + [1] * (len(resp) + 1),
            "labels": [IGNORE_INDEX] * len(prefix) + scored + [IGNORE_INDEX],
            "response_start": len(prefix), "response_len": len(resp)}


class MllamaCollator:
    """Batches of the Mllama layout: padded text, image tiles (``pixel_values`` (B, 1, tiles, 3, H, W),
    ``aspect_ratio_ids``, ``aspect_ratio_mask``) and the dense ``cross_attention_mask`` (B, T, 1, tiles):
    1 from the ``<|image|>`` token to the end of the text, on the tiles the image really has."""

    def __init__(self, processor, image_token_id: int, padding_side: str = "right"):
        self.processor, self.image_token_id, self.padding_side = processor, image_token_id, padding_side

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        batch = pad_batch([{k: s[k] for k in ("input_ids", "labels") if k in s} for s in samples],
                          self.processor.tokenizer.pad_token_id, self.padding_side)
        vision = self.processor.image_processor([[s["image"]] for s in samples], return_tensors="pt")
        n_tiles = vision.pop("num_tiles")
        batch |= {k: vision[k] for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")}
        ids = batch["input_ids"]
        xmask = torch.zeros(*ids.shape, 1, batch["pixel_values"].shape[2], dtype=torch.long)
        for row in range(len(samples)):
            where = (ids[row] == self.image_token_id).nonzero().flatten()
            if len(where) != 1:
                raise ValueError(f"sample {row}: expected one <|image|> token in the text, found {len(where)}")
            last_real = int(batch["attention_mask"][row].nonzero().max())
            xmask[row, int(where[0]) : last_real + 1, 0, : n_tiles[row][0]] = 1
        batch["cross_attention_mask"] = xmask
        return batch


def collator_for(processor, layout: Layout, padding_side: str = "right"):
    """The batch builder of ``layout``'s backbone."""
    if layout.backbone == "mllama":
        return MllamaCollator(processor, layout.image_token_id, padding_side)
    return VLMCollator(processor, padding_side)


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
