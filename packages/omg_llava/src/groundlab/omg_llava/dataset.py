"""Samples (:class:`groundlab.omg_llava.data.Sample`) -> training batches of :class:`OMGLlavaForCausalLM`.

The segmenter is frozen and sees each image un-augmented, so its perception of every image is
computed once (:class:`PerceptionCache`) and shared by all samples of that image. Masks and visual
prompts are brought to the segmenter's input frame: padded to a square (bottom / right) and
resized to ``image_size``; points are scaled the same way.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from groundlab.shared.devices import to_device
from groundlab.shared.multimodal import (
    ChatTemplate,
    expand_token,
    tokenize_conversation,
    tokenize_prompt,
)
from groundlab.shared.world_io import load_image

from .data import Sample
from .modeling import OMGLlavaForCausalLM, Perception
from .processing import IMAGE_TOKEN, MARK, REGION, to_input_frame


class PerceptionCache:
    """The frozen segmenter's :class:`Perception` of each image path, computed once in batches."""

    def __init__(self, model: OMGLlavaForCausalLM, paths, batch_size: int = 64):
        self.items: dict[str, tuple[Perception, tuple[int, int]]] = {}
        self.model = model
        self.add(paths, batch_size)

    def add(self, paths, batch_size: int = 64) -> None:
        todo = sorted({str(p) for p in paths} - set(self.items))
        seg = self.model.segmenter
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            images = [np.asarray(load_image(p)) for p in chunk]
            for path, im, p in zip(chunk, images, self.model.perceive(seg.preprocess(images))):
                self.items[path] = (to_device(p, "cpu"), im.shape[:2])  # host memory; forward moves it

    def __getitem__(self, path) -> tuple[Perception, tuple[int, int]]:
        key = str(path)
        if key not in self.items:
            raise KeyError(f"no perception cached for image {key}")
        return self.items[key]


def check_against_image(s: Sample, hw: tuple[int, int]) -> None:
    """A sample's masks have its image's shape and its points lie inside the image (errors name the
    sample and the image)."""
    h, w = hw
    for kind, masks in (("[SEG] mask", s.seg_masks), ("region", s.regions)):
        for j, m in enumerate(masks):
            if tuple(np.shape(m)) != (h, w):
                raise ValueError(f"sample {s.id} ({s.image}): {kind} {j} is {tuple(np.shape(m))}, the image {(h, w)}")
    for j, (x, y) in enumerate(s.points):
        if not (0 <= x < w and 0 <= y < h):
            raise ValueError(f"sample {s.id} ({s.image}): point {j} ({x:g}, {y:g}) lies outside the {w}x{h} image")


class OMGDataset(Dataset):
    """Tokenized conversations with their image's visual-token count, ``[SEG]`` target masks and visual
    prompts in the segmenter's frame."""

    def __init__(self, samples: list[Sample], tokenizer, template: ChatTemplate, model: OMGLlavaForCausalLM,
                 cache: PerceptionCache, max_length: int | None = None):
        self.samples, self.tok, self.template, self.cache = samples, tokenizer, template, cache
        self.max_length = max_length
        cfg = model.config
        self.image_id = cfg.token_ids[IMAGE_TOKEN]
        self.use_objects = cfg.use_object_tokens
        self.size = cfg.seg_config.image_size
        for smp in samples:
            check_against_image(smp, cache[smp.image][1])
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """The training epoch, which the mask loss's per-sample random points depend on (the shared
        ``train`` sets it at every epoch's start, on every process)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def prompts(self, s: Sample, hw: tuple[int, int]) -> dict:
        side = max(hw)
        out = {}
        if s.regions:
            out[REGION] = to_input_frame(s.regions, self.size)
        if s.points:
            out[MARK] = torch.tensor(s.points, dtype=torch.float32) * (self.size / side)
        return out

    def __getitem__(self, i: int) -> dict:
        s = self.samples[i]
        p, hw = self.cache[s.image]
        try:
            ids = tokenize_conversation(self.tok, s.conversation, self.template, self.max_length)
        except ValueError as err:
            raise ValueError(f"sample {s.id} ({s.image}): {err}") from err
        ids = expand_token(ids, self.image_id, p.num_tokens(self.use_objects))
        # the mask loss's random points: a seed per (sample, epoch), whichever process or batch holds it
        return {**ids, "perception": p, "seg_masks": to_input_frame(s.seg_masks, self.size),
                "prompts": self.prompts(s, hw), "point_seed": i * 1_000_003 + self.epoch}

    def prompt(self, i: int) -> dict:
        """The generation prompt of sample ``i`` (its conversation without the last answer)."""
        s = self.samples[i]
        p, hw = self.cache[s.image]
        ids = expand_token({"input_ids": tokenize_prompt(self.tok, s.conversation[:-1], self.template)},
                           self.image_id, p.num_tokens(self.use_objects))
        return {**ids, "perception": p, "prompts": self.prompts(s, hw), "hw": hw}


def image_paths(samples: list[Sample]) -> list[Path]:
    return sorted({s.image for s in samples})
