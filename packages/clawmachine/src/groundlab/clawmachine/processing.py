"""What turns (image tokens, conversation, ``ref_list``) into ids, and generated ids back into text
and boxes.

- **Joint vocabulary**: text ids, ``[IMG]``, ``[/IMG]``, then code ``c`` as ``code_offset + c``
  (:class:`groundlab.clawmachine.configuration.ClawMachineConfig`). :func:`add_tokens` adds ``[IMG]`` /
  ``[/IMG]`` to a text tokenizer and places the codes after its last id.
- **Sample format** (the release's)::

      {"image": "images/x.jpg",
       "conversations": [{"from": "human", "value": "<image>\\nWhere is the red circle?"},
                         {"from": "gpt", "value": "<ref_patch>"}],
       "ref_list": [[[x0, y0, x1, y1], ...], ...]}

  ``<image>`` becomes ``[IMG] codes of the whole image [/IMG]`` (never supervised); the n-th
  ``<ref_patch>`` of the conversation becomes ``[IMG] codes of region n [/IMG]``, where region n is
  ``ref_list[n]``: one or more boxes normalised to the padded square (one entity's boxes are merged).
  In an assistant turn the region's ids are targets (grounding); in a human turn they are input
  (referring). A sample without ``<image>`` is text only. Markers and ``ref_list`` must agree in
  number, else an error names the sample.
- **Fetching** (:func:`fetch_region`): a box covers grid rows ``floor(y0 G) .. ceil(y1 G) - 1`` (columns
  alike); its kept patches are those of ``remained_map`` in those cells; a box holding none takes the
  kept patch nearest its centre in 2-D grid distance (the release measures the distance between raster
  indices, which puts the next row's first patch beside a row's last); copied in raster order.
- **Decoding** (:func:`decode_region`): each generated code is matched to a kept patch of the image
  with that code; a code several patches share is resolved by position and connectivity: the chosen
  patches follow raster order (as the targets do) and, among such choices, those whose consecutive
  patches lie closest together on the grid, a code with no copy near the rest being dropped; then
  the largest 8-connected group of the chosen cells is the region. A code the image does not hold
  is skipped. The box is the cells' enclosing box / G in the padded square, mapped back to the image.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import LogitsProcessor

from groundlab.shared.boxes import square_padding
from groundlab.shared.multimodal import IGNORE_INDEX, ChatTemplate, conversation_segments, pad_batch

from .configuration import ClawMachineConfig
from .visual_tokenizer import TokenizedImage

IMAGE_MARKER = "<image>"
REGION_MARKER = "<ref_patch>"
IMG_START, IMG_END = "[IMG]", "[/IMG]"
_MARKERS = re.compile(f"({re.escape(IMAGE_MARKER)}|{re.escape(REGION_MARKER)})")
TEMPLATE = ChatTemplate()  # Vicuna-v1, the release's stage-2 template and the LLaVA base's


# ----------------------------------------------------------------------------------------------
# vocabulary


def add_tokens(tokenizer, config: ClawMachineConfig | None = None) -> tuple[int, int, int]:
    """Add ``[IMG]`` / ``[/IMG]`` to ``tokenizer`` (once); return their ids and the first code's id
    (right after the tokenizer's last id). With ``config``, check that the model was built for these
    ids: a mismatch is an error, not codes read as the wrong tokens."""
    missing = [t for t in (IMG_START, IMG_END) if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    start, end = tokenizer.convert_tokens_to_ids([IMG_START, IMG_END])
    offset = len(tokenizer)
    if config is not None:
        want = (config.image_start_token_id, config.image_end_token_id, config.code_offset)
        if want != (start, end, offset):
            raise ValueError(f"the model's [IMG], [/IMG] and first code ids {want} differ from the tokenizer's "
                             f"{(start, end, offset)}")
    return start, end, offset


# ----------------------------------------------------------------------------------------------
# boxes <-> cells


def check_region(boxes, where: str) -> list[tuple[float, float, float, float]]:
    """One ``ref_list`` entry: a non-empty list of ``[x0, y0, x1, y1]`` in [0, 1] with x0 < x1, y0 < y1."""
    if not isinstance(boxes, (list, tuple)) or not boxes:
        raise ValueError(f"{where}: a region is a non-empty list of [x0, y0, x1, y1] boxes, got {boxes!r}")
    out = []
    for box in boxes:
        if not isinstance(box, (list, tuple)) or len(box) != 4:
            raise ValueError(f"{where}: a box is [x0, y0, x1, y1], got {box!r}")
        try:
            x0, y0, x1, y1 = (float(v) for v in box)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: box {box!r} is not four numbers") from None
        if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
            raise ValueError(f"{where}: box {list(box)} must satisfy 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 "
                             "(normalised to the padded square)")
        out.append((x0, y0, x1, y1))
    return out


def box_cells(box: Sequence[float], grid: int) -> list[int]:
    """Raster indices of the grid cells a normalised box covers (rows ``floor(y0 G) .. ceil(y1 G) - 1``)."""
    x0, y0, x1, y1 = box
    c0, r0 = max(0, math.floor(x0 * grid)), max(0, math.floor(y0 * grid))
    c1, r1 = min(grid, math.ceil(x1 * grid)) - 1, min(grid, math.ceil(y1 * grid)) - 1
    return [r * grid + c for r in range(r0, r1 + 1) for c in range(c0, c1 + 1)]


def fetch_region(boxes: Sequence[Sequence[float]], remained_map: torch.Tensor | Sequence[int], grid: int) -> list[int]:
    """Positions (into the image's kept tokens, increasing) of the region's tokens (see the module
    docstring)."""
    kept = [int(i) for i in remained_map]
    index = {cell: pos for pos, cell in enumerate(kept)}
    rows, cols = np.divmod(np.asarray(kept), grid)
    chosen: set[int] = set()
    for box in boxes:
        inside = [index[c] for c in box_cells(box, grid) if c in index]
        if not inside:  # nearest kept patch to the box centre, in 2-D grid distance
            cy, cx = (box[1] + box[3]) / 2 * grid - 0.5, (box[0] + box[2]) / 2 * grid - 0.5
            inside = [int(np.argmin((rows - cy) ** 2 + (cols - cx) ** 2))]
        chosen.update(inside)
    return sorted(chosen)


def cells_box(cells: Sequence[int], grid: int) -> tuple[float, float, float, float]:
    """The enclosing box of grid cells, normalised to the padded square."""
    rows, cols = np.divmod(np.asarray(cells), grid)
    return cols.min() / grid, rows.min() / grid, (cols.max() + 1) / grid, (rows.max() + 1) / grid


def to_square(box: Sequence[float], width: int, height: int) -> tuple[float, float, float, float]:
    """A pixel box of the image -> normalised to its padded square."""
    pad_x, pad_y, side = square_padding(width, height)
    x0, y0, x1, y1 = box
    return (x0 + pad_x) / side, (y0 + pad_y) / side, (x1 + pad_x) / side, (y1 + pad_y) / side


def from_square(box: Sequence[float], width: int, height: int) -> tuple[float, float, float, float]:
    """A box normalised to the padded square -> pixels of the image (clipped to it)."""
    pad_x, pad_y, side = square_padding(width, height)
    x0, y0, x1, y1 = (v * side for v in box)
    return (min(max(x0 - pad_x, 0), width), min(max(y0 - pad_y, 0), height),
            min(max(x1 - pad_x, 0), width), min(max(y1 - pad_y, 0), height))


SKIP_COST = 3.0
"""What leaving a generated code unmatched costs the alignment, in grid cells: a code whose nearest
in-order copy lies further than this from the rest of the region is dropped rather than stretching it."""


def _align(steps: list[list[int]], rc: np.ndarray, skip: float) -> list[int]:
    """Positions chosen for the steps (each a list of candidate positions) by a monotone alignment
    minimising the grid distance between consecutive choices plus ``skip`` per unmatched step."""
    n = len(rc)
    best = np.full(n, np.inf)  # best[p]: cost of an alignment so far whose last choice is p
    none_cost = 0.0  # cost of choosing nothing so far
    backs = []
    for cand in steps:
        new, arg = best + skip, np.full(n, -2)  # -2: this step skipped
        for p in cand:
            prev = np.flatnonzero(np.isfinite(best[:p]))
            options = [(none_cost, -1)]  # -1: the alignment starts here
            if len(prev):
                d = best[prev] + np.linalg.norm(rc[prev] - rc[p], axis=1)
                options.append((float(d.min()), int(prev[d.argmin()])))
            cost, source = min(options)
            if cost < new[p]:
                new[p], arg[p] = cost, source
        backs.append(arg)
        best, none_cost = new, none_cost + skip
    if not np.isfinite(best).any() or best.min() >= none_cost:
        return []
    p, chosen = int(best.argmin()), []
    for arg in reversed(backs):
        if arg[p] == -2:
            continue
        chosen.append(p)
        if arg[p] == -1:
            break
        p = int(arg[p])
    return chosen


def _largest_component(cells: list[int], grid: int) -> list[int]:
    """The largest 8-connected group of ``cells`` on the grid (the first such group in raster order on a tie)."""
    left, groups = set(cells), []
    for c in sorted(cells):
        if c not in left:
            continue
        group, todo = [], [c]
        left.discard(c)
        while todo:
            x = todo.pop()
            group.append(x)
            r, q = divmod(x, grid)
            for dr in (-1, 0, 1):
                for dq in (-1, 0, 1):
                    y = (r + dr) * grid + q + dq
                    if 0 <= r + dr < grid and 0 <= q + dq < grid and y in left:
                        left.discard(y)
                        todo.append(y)
        groups.append(sorted(group))
    return max(groups, key=len) if groups else []


def decode_region(region_codes: Sequence[int], image: TokenizedImage, grid: int, skip: float = SKIP_COST
                  ) -> list[int] | None:
    """Grid cells (raster indices) of a generated region (see the module docstring): its codes aligned
    to the image's kept patches in raster order, each step as close on the grid to the previous as
    possible (a code with no copy within ``skip`` cells is dropped), then the largest 8-connected
    group of the chosen cells; None when no code of the region is in the image."""
    cells = image.remained_map.tolist()
    where: dict[int, list[int]] = {}
    for pos, c in enumerate(image.codes.tolist()):
        where.setdefault(c, []).append(pos)
    steps = [where[c] for c in region_codes if c in where]
    if not steps:
        return None
    rc = np.stack(np.divmod(np.asarray(cells), grid), 1).astype(float)
    chosen = _align(steps, rc, skip) or [steps[0][0]]
    return _largest_component([cells[p] for p in chosen], grid)


# ----------------------------------------------------------------------------------------------
# samples


@dataclass
class Encoded:
    """A sample's ids and labels; ``scene``: (position of the first code, number of codes) of the whole
    image's span, where the hybrid layout puts the scene's features and ``scene_positions`` its cells
    (None: no image)."""

    input_ids: list[int]
    labels: list[int]
    scene: tuple[int, int] | None = None


class ClawProcessor:
    """Text tokenizer + the model's joint vocabulary: encodes samples and prompts, decodes answers."""

    def __init__(self, tokenizer, config: ClawMachineConfig, template: ChatTemplate = TEMPLATE,
                 max_length: int = 2048):
        self.tokenizer, self.config, self.template, self.max_length = tokenizer, config, template, max_length
        self.start_id, self.end_id, self.offset = add_tokens(tokenizer, config)

    def image_ids(self, codes: Sequence[int]) -> list[int]:
        return [self.start_id, *(self.offset + int(c) for c in codes), self.end_id]

    def region_ids(self, boxes, image: TokenizedImage) -> list[int]:
        positions = fetch_region(boxes, image.remained_map, self.config.grid)
        return self.image_ids(image.codes[positions].tolist())

    def _text(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def encode(self, conversation: Sequence[dict], image: TokenizedImage | None, ref_list=None,
               where: str = "sample", generation: bool = False) -> Encoded:
        """``input_ids`` and ``labels`` of a conversation (see the module docstring); ``generation``: a
        prompt ending in the assistant prefix (the conversation ends with a user turn)."""
        ref_list = [] if ref_list is None else ref_list
        texts = [t.get("value", t.get("content", "")) for t in conversation]
        n_regions = sum(t.count(REGION_MARKER) for t in texts if isinstance(t, str))
        if not isinstance(ref_list, list) or n_regions != len(ref_list):
            got = len(ref_list) if isinstance(ref_list, list) else type(ref_list).__name__
            raise ValueError(f"{where}: {n_regions} {REGION_MARKER} markers but ref_list has {got} entries")
        n_images = sum(t.count(IMAGE_MARKER) for t in texts if isinstance(t, str))
        if n_images > 1:
            raise ValueError(f"{where}: {n_images} {IMAGE_MARKER} markers (one image a sample)")
        if (n_images or n_regions) and image is None:
            raise ValueError(f"{where}: the conversation has image or region markers but no image was given")
        regions = [check_region(r, f"{where}: ref_list[{i}]") for i, r in enumerate(ref_list)]
        try:
            segments = conversation_segments(conversation, self.template, add_generation_prompt=generation)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        ids = [self.tokenizer.bos_token_id] if self.template.add_bos else []
        labels = [IGNORE_INDEX] * len(ids)
        k, scene = 0, None
        for text, supervised in segments:
            for piece in _MARKERS.split(text):
                if piece == IMAGE_MARKER:
                    span, target = self.image_ids(image.codes.tolist()), False
                    scene = (len(ids) + 1, len(image.codes))
                elif piece == REGION_MARKER:
                    span, target = self.region_ids(regions[k], image), supervised
                    k += 1
                else:
                    span, target = self._text(piece), supervised
                ids += span
                labels += span if target else [IGNORE_INDEX] * len(span)
        if len(ids) > self.max_length:
            raise ValueError(f"{where}: {len(ids)} tokens, more than max_length {self.max_length}")
        if not generation and all(label == IGNORE_INDEX for label in labels):
            raise ValueError(f"{where}: no supervised (assistant) token")
        return Encoded(ids, labels, scene)

    def prompt(self, question: str, image: TokenizedImage | None, ref_list=None, where: str = "prompt") -> list[int]:
        """Ids of a generation prompt: ``question`` as the user turn (with the image first when it has
        no ``<image>`` of its own), then the assistant prefix."""
        return self.prompt_inputs(question, image, ref_list, where)["input_ids"]

    def prompt_inputs(self, question: str, image: TokenizedImage | None, ref_list=None,
                      where: str = "prompt") -> dict:
        """A :class:`ClawCollator` sample of a generation prompt (:meth:`prompt`): its ids and the
        scene's inputs the model takes (:meth:`scene_inputs`)."""
        if image is not None and IMAGE_MARKER not in question:
            question = f"{IMAGE_MARKER}\n{question}"
        enc = self.encode([{"from": "human", "value": question}], image, ref_list, where, generation=True)
        return {"input_ids": enc.input_ids, **self.scene_inputs(enc, image, where)}

    def scene_inputs(self, enc: Encoded, image: TokenizedImage | None, where: str = "sample") -> dict:
        """What the model takes for the scene beside the ids (none unless ``config.scene_inputs``): its
        span (``scene``), the kept tokens' merged features (``hybrid``) and cells (``scene_positions``);
        None for a sample without an image."""
        if not self.config.scene_inputs:
            return {}
        seen = enc.scene is not None
        out = {"scene": enc.scene}
        if self.config.hybrid:
            if seen and image.features is None:
                raise ValueError(f"{where}: a hybrid model needs the image tokenized with its features")
            out["scene_features"] = image.features if seen else None
        if self.config.scene_positions:
            out["scene_cells"] = image.remained_map if seen else None
        return out

    def split_answer(self, ids: Sequence[int]) -> tuple[str, list[list[int]]]:
        """Generated ids -> (the text, with ``<ref_patch>`` where a region was; the regions' codes)."""
        text, regions, words, inside = "", [], [], None
        for t in ids:
            if t == self.tokenizer.eos_token_id:
                break
            if t == self.start_id and inside is None:
                text += self.tokenizer.decode(words, skip_special_tokens=True)
                words, inside = [], []
            elif t == self.end_id and inside is not None:
                regions.append(inside)
                text += REGION_MARKER
                inside = None
            elif inside is not None:
                if self.config.is_code(t):
                    inside.append(t - self.offset)
            elif not self.config.is_code(t):
                words.append(t)
        if inside is not None:  # generation stopped inside a region: keep what it produced
            regions.append(inside)
            text += REGION_MARKER
        text += self.tokenizer.decode(words, skip_special_tokens=True)
        return text.strip(), regions


class RegionConstraint(LogitsProcessor):
    """Inside ``[IMG] ... [/IMG]`` a sample may generate only the codes of its own image (and ``[/IMG]``);
    outside, no code at all. ``allowed`` (B, codebook) bool: the codes each sample's image holds."""

    def __init__(self, config: ClawMachineConfig, allowed: torch.Tensor, prompt_length: int):
        self.config, self.allowed, self.prompt_length = config, allowed, prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        c = self.config
        new = input_ids[:, self.prompt_length:]
        opened = (new == c.image_start_token_id).cumsum(1) > (new == c.image_end_token_id).cumsum(1)
        inside = opened[:, -1] if new.shape[1] else torch.zeros(len(new), dtype=torch.bool, device=new.device)
        codes = slice(c.code_offset, c.code_offset + c.codebook_size)
        scores = scores.clone()
        block = torch.full_like(scores[:, codes], float("-inf"))
        scores[:, codes] = torch.where(inside[:, None] & self.allowed.to(scores.device), scores[:, codes], block)
        scores[inside, c.image_start_token_id] = float("-inf")  # no region inside a region
        scores[~inside, c.image_end_token_id] = float("-inf")
        return scores


class ClawCollator:
    """Pads ``input_ids`` / ``labels`` (right for training, left for generation); ``packed``: the model
    runs its LM on the batch's real tokens in one padding-free row (same loss and gradients)."""

    def __init__(self, pad_token_id: int, padding_side: str = "right", packed: bool = False):
        self.pad_token_id, self.padding_side, self.packed = pad_token_id, padding_side, packed

    def __call__(self, samples: list[dict]) -> dict:
        batch = pad_batch(samples, self.pad_token_id, self.padding_side)
        if "scene" in samples[0]:  # the scene's inputs (ClawProcessor.scene_inputs) and where they go
            mask = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
            width = batch["input_ids"].shape[1]
            for b, s in enumerate(samples):
                if s["scene"] is not None:
                    first = s["scene"][0] + (width - len(s["input_ids"]) if self.padding_side == "left" else 0)
                    mask[b, first:first + s["scene"][1]] = True
            batch["scene_mask"] = mask
            for key, cast in (("scene_features", torch.Tensor.float), ("scene_cells", torch.Tensor.long)):
                if key in samples[0]:
                    parts = [cast(s[key]) for s in samples if s["scene"] is not None]
                    batch[key] = torch.cat(parts) if parts else None
        if self.packed:
            batch["packed"] = True
        return batch
