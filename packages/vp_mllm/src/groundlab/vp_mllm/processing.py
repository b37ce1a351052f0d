"""What turns (image, visual prompts, conversation) into model inputs, and back.

- **Visual prompts** (:class:`VisualPrompts`): the points *or* boxes of one sample, in image pixels.
  Free-form shapes (a scribble's points, a mask) become their bounding box (:func:`scribble_to_box`,
  :func:`mask_to_box`). :func:`encode_prompts` pads the image to a square (as the images are), divides
  by its side, and writes K slots: a point ``[x, y, -1, -1]``, a box ``[x0, y0, x1, y1]``, with an
  explicit ``valid`` flag per slot (so a real point at (0, 0) is never read as padding).
- **Text references**: plain text, no new vocabulary: ``<Mark n>`` names the n-th point, ``<Region n>``
  the n-th box (1-based, slot order). A reference to a slot that does not exist, or of the other kind,
  is an error.
- **Sequence layout**: ``[bos] USER: [image tokens][<vp> x (K + 2)]\\n question ASSISTANT: answer</s>``:
  the image's placeholders, then the prompt block (``start_vp``, K prompt tokens, ``end_vp``) right
  after them, then the text; only the assistant's words are supervised.
- **Images**: padded to a square with the processor's mean colour; ``multi`` views: the square at
  twice the tower's size, one global view (downsampled) and the four quadrants (TL, TR, BL, BR).
- **Box noise** (training, boxes only, always on in the paper): shift by up to ``int(w / 8)`` /
  ``int(h / 8)`` pixels, scale width and height by up to 15 %.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from groundlab.shared.boxes import square_padding
from groundlab.shared.inputs import check_box, check_point
from groundlab.shared.metrics import mask_box
from groundlab.shared.multimodal import (
    ChatTemplate,
    expand_token,
    pad_batch,
    tokenize_conversation,
    tokenize_prompt,
)
from groundlab.shared.tokenizer import IMAGE_TOKEN

from .configuration import VPMLLMConfig

VP_TOKEN = "<vp>"
PROMPT_KINDS = ("point", "box")
REFERENCE = re.compile(r"<(Mark|Region) (\d+)>")
REF_WORD = {"point": "Mark", "box": "Region"}

TEMPLATES = {
    # the tiny LLaVA base's (Vicuna-v1 style, the world tokenizer's chat template)
    "vicuna": ChatTemplate(),
    # SPHINX-V's conversation layout
    "sphinx": ChatTemplate(
        system="A chat between a curious human and an artificial intelligence assistant. The assistant gives "
               "helpful, detailed, and polite answers to the human's questions.\n\n",
        user_prefix="### Human: ", assistant_prefix="\n### Assistant:", answer_lead=" ", turn_end="\n###", sep="\n"),
}


def reference(kind: str, n: int) -> str:
    """How the text names prompt ``n`` (1-based): ``<Mark n>`` for points, ``<Region n>`` for boxes."""
    return f"<{REF_WORD[kind]} {n}>"


# ----------------------------------------------------------------------------------------------
# visual prompts


@dataclass
class VisualPrompts:
    """The prompts of one sample: all points or all boxes (never mixed), in image pixels; a point is
    ``(x, y)``, a box ``(x0, y0, x1, y1)``."""

    kind: str
    coords: list[tuple[float, ...]]

    def __post_init__(self) -> None:
        if self.kind not in PROMPT_KINDS:
            raise ValueError(f"prompt kind must be one of {PROMPT_KINDS}, got {self.kind!r}")
        want = 2 if self.kind == "point" else 4
        for i, c in enumerate(self.coords):
            if len(c) != want:
                raise ValueError(f"{self.kind} {i + 1}: expected {want} numbers, got {list(c)}")
        self.coords = [tuple(float(v) for v in c) for c in self.coords]

    def __len__(self) -> int:
        return len(self.coords)

    @classmethod
    def from_record(cls, record: dict, where: str) -> VisualPrompts | None:
        """MDVP-Instruct-Data's prompts: ``"bbox": [[x, y, w, h], ...]`` (pixels) or ``"points": [[x, y],
        ...]``; None when the record has neither (an image-level sample)."""
        has_box, has_point = "bbox" in record, "points" in record
        if has_box and has_point:
            raise ValueError(f"{where}: both 'bbox' and 'points' (one prompt type a sample)")
        if not (has_box or has_point):
            return None
        raw = record["bbox" if has_box else "points"]
        if not isinstance(raw, list) or not all(isinstance(c, (list, tuple)) for c in raw):
            raise ValueError(f"{where}: '{'bbox' if has_box else 'points'}' must be a list of coordinate lists")
        try:
            if has_point:
                return cls("point", [tuple(c) for c in raw])
            boxes = []
            for i, c in enumerate(raw):
                if len(c) != 4:
                    raise ValueError(f"box {i + 1}: expected [x, y, w, h], got {list(c)}")
                x, y, w, h = (float(v) for v in c)
                if w <= 0 or h <= 0:
                    raise ValueError(f"box {i + 1}: width and height must be positive, got {list(c)}")
                boxes.append((x, y, x + w, y + h))
            return cls("box", boxes)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: {err}") from None

    def to_record(self) -> dict:
        """The MDVP-Instruct-Data fields of these prompts (boxes as XYWH pixels)."""
        if self.kind == "point":
            return {"points": [list(c) for c in self.coords]}
        return {"bbox": [[x0, y0, x1 - x0, y1 - y0] for x0, y0, x1, y1 in self.coords]}


def scribble_to_box(points: Sequence[Sequence[float]]) -> tuple[float, float, float, float]:
    """A free-form stroke (its points, pixels) as the box prompt the model reads: its bounding box."""
    arr = np.asarray(points, dtype=float)
    if arr.ndim != 2 or arr.shape[1] != 2 or len(arr) < 2:
        raise ValueError(f"a scribble is at least two (x, y) points, got shape {arr.shape}")
    (x0, y0), (x1, y1) = arr.min(0), arr.max(0)
    if x1 <= x0 or y1 <= y0:
        raise ValueError("a scribble must span some width and height (its box would be empty)")
    return float(x0), float(y0), float(x1), float(y1)


def mask_to_box(mask: np.ndarray, what: str = "mask") -> tuple[float, float, float, float]:
    """A free-form region (a boolean mask) as its box prompt, pixel-edge convention."""
    box = mask_box(np.asarray(mask, bool))  # inclusive pixel indices
    if box is None:
        raise ValueError(f"{what} is empty: no region to prompt")
    x0, y0, x1, y1 = box
    return float(x0), float(y0), float(x1 + 1), float(y1 + 1)


def jitter_box(box: Sequence[float], rng: np.random.Generator, delta_size: float = 0.15) -> tuple[float, ...]:
    """The paper's box noise on an ``(x0, y0, x1, y1)`` box: the top-left corner shifted by up to
    ``int(w / 8)`` / ``int(h / 8)`` pixels, width and height scaled by ``1 + U(-0.15, 0.15)``."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    dx, dy = int(w / 8), int(h / 8)
    x0 += int(rng.integers(-dx, dx + 1))
    y0 += int(rng.integers(-dy, dy + 1))
    w = max(0.0, w * (1 + rng.uniform(-delta_size, delta_size)))
    h = max(0.0, h * (1 + rng.uniform(-delta_size, delta_size)))
    return x0, y0, x0 + w, y0 + h


def encode_prompts(prompts: VisualPrompts | None, width: int, height: int, num_slots: int,
                   where: str = "sample") -> dict[str, torch.Tensor]:
    """K slots of one sample: ``vp_coords`` (K, 4) in [0, 1] on the padded square (points ``[x, y, -1,
    -1]``), ``vp_valid`` (K,) and ``vp_is_box`` (a 0-d bool). Coordinates outside the image and more
    than K prompts are errors (never dropped)."""
    coords = torch.zeros(num_slots, 4)
    valid = torch.zeros(num_slots, dtype=torch.bool)
    kind = prompts.kind if prompts is not None else "box"
    if prompts is not None:
        if len(prompts) > num_slots:
            raise ValueError(f"{where}: {len(prompts)} {kind} prompts, more than the model's {num_slots} slots")
        pad_x, pad_y, side = square_padding(width, height)
        for i, c in enumerate(prompts.coords):
            what = f"{where}: {kind} {i + 1}"
            if kind == "point":
                x, y = check_point(c, width, height, what)
                coords[i] = torch.tensor([(x + pad_x) / side, (y + pad_y) / side, -1.0, -1.0])
            else:
                x0, y0, x1, y1 = check_box(c, width, height, what)
                coords[i] = torch.tensor([(x0 + pad_x) / side, (y0 + pad_y) / side,
                                          (x1 + pad_x) / side, (y1 + pad_y) / side])
            valid[i] = True
    if kind == "point":
        coords[~valid, 2:] = -1.0
    return {"vp_coords": coords, "vp_valid": valid, "vp_is_box": torch.tensor(kind == "box")}


def check_references(conversation: Sequence[dict], prompts: VisualPrompts | None, where: str) -> None:
    """Every ``<Mark n>`` / ``<Region n>`` of the conversation names a prompt of this sample."""
    n = 0 if prompts is None else len(prompts)
    for t, turn in enumerate(conversation):
        text = turn.get("value", turn.get("content", ""))
        for m in REFERENCE.finditer(text if isinstance(text, str) else ""):
            word, k = m.group(1), int(m.group(2))
            if prompts is None:
                raise ValueError(f"{where}, turn {t}: {m.group(0)} but the sample has no visual prompts")
            if word != REF_WORD[prompts.kind]:
                named = "point" if word == "Mark" else "box"
                raise ValueError(f"{where}, turn {t}: {m.group(0)} names a {named}, but the sample's prompts "
                                 f"are {prompts.kind}s")
            if not 1 <= k <= n:
                raise ValueError(f"{where}, turn {t}: {m.group(0)} refers to a prompt that does not exist "
                                 f"(the sample has {n} {prompts.kind}{'s' if n != 1 else ''})")


# ----------------------------------------------------------------------------------------------
# tokens and images


def add_tokens(tokenizer, config: VPMLLMConfig | None = None) -> int:
    """Add the ``<vp>`` placeholder to ``tokenizer`` (once) and return its id; with ``config``, check
    that the model was built for this tokenizer's ids (a mismatch is an error, not a silent splice of
    features into the wrong positions)."""
    if VP_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [VP_TOKEN]})
    vp_id = tokenizer.convert_tokens_to_ids(VP_TOKEN)
    if config is not None:
        image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if config.vp_token_index != vp_id or config.lmm_config.image_token_index != image_id:
            raise ValueError(f"the model's special tokens (<image> {config.lmm_config.image_token_index}, {VP_TOKEN} "
                             f"{config.vp_token_index}) differ from the tokenizer's ({image_id}, {vp_id})")
    return vp_id


def expand_to_square(image: Image.Image, fill: Sequence[float]) -> Image.Image:
    """The image centred on a square of colour ``fill`` (0-255), as LLaVA-1.5 pads (prompt
    coordinates move with it: :func:`square_padding`)."""
    w, h = image.size
    if w == h:
        return image
    pad_x, pad_y, side = square_padding(w, h)
    out = Image.new(image.mode, (side, side), tuple(int(round(c)) for c in fill))
    out.paste(image, (pad_x, pad_y))
    return out


def as_image(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"an image is an (H, W, 3) uint8 array or a PIL image, got {arr.dtype} {arr.shape}")
    return Image.fromarray(arr)


class VPProcessor:
    """Tokenizer + image processor + the model's layout: encodes training samples and prompts."""

    def __init__(self, tokenizer, image_processor, config: VPMLLMConfig, template: str = "vicuna"):
        if template not in TEMPLATES:
            raise ValueError(f"template must be one of {tuple(TEMPLATES)}, got {template!r}")
        self.tokenizer, self.image_processor, self.config = tokenizer, image_processor, config
        self.template = TEMPLATES[template]
        self.vp_id = add_tokens(tokenizer, config)
        self.image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.size = config.lmm_config.vision_config.image_size

    # images
    def pixel_values(self, image) -> torch.Tensor:
        """(views, 3, S, S) for one image."""
        image = as_image(image)
        mean = [255 * m for m in getattr(self.image_processor, "image_mean", (0.5, 0.5, 0.5))]
        square = expand_to_square(image, mean)
        if self.config.views == "single":
            views = [square]
        else:
            big = square.resize((2 * self.size, 2 * self.size), Image.BICUBIC)
            s = self.size
            views = [big.resize((s, s), Image.BICUBIC)] + [big.crop((x, y, x + s, y + s))
                                                           for y in (0, s) for x in (0, s)]
        return self.image_processor(views, return_tensors="pt")["pixel_values"]

    # text
    def _first_turn(self, text: str, use_prompts: bool) -> str:
        text = text.replace(IMAGE_TOKEN, "").strip()
        return f"{IMAGE_TOKEN}{VP_TOKEN if use_prompts else ''}\n{text}"

    def _expand(self, sample: dict, use_prompts: bool) -> dict:
        sample = expand_token(sample, self.image_id, self.config.n_image_tokens)
        return expand_token(sample, self.vp_id, self.config.n_vp_tokens) if use_prompts else sample

    def encode(self, image, conversation: Sequence[dict], prompts: VisualPrompts | None, use_prompts: bool = True,
               where: str = "sample") -> dict:
        """One supervised sample: ``input_ids``, ``labels`` (lists), ``pixel_values``, the prompt slots.
        ``use_prompts=False``: the text without the prompt block (the no-encoder baseline)."""
        check_references(conversation, prompts, where)
        conv = [dict(t) for t in conversation]
        if not conv:
            raise ValueError(f"{where}: empty conversation")
        first = "value" if "value" in conv[0] else "content"
        conv[0][first] = self._first_turn(conv[0][first], use_prompts)
        try:
            sample = tokenize_conversation(self.tokenizer, conv, self.template)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        return self._with_visuals(self._expand(sample, use_prompts), image, prompts, where)

    def prompt(self, image, question: str, prompts: VisualPrompts | None, use_prompts: bool = True,
               where: str = "prompt") -> dict:
        """A generation prompt (the conversation's first question)."""
        conv = [{"from": "human", "value": question}]
        check_references(conv, prompts, where)
        conv[0]["value"] = self._first_turn(question, use_prompts)
        sample = {"input_ids": tokenize_prompt(self.tokenizer, conv, self.template)}
        return self._with_visuals(self._expand(sample, use_prompts), image, prompts, where)

    def _with_visuals(self, sample: dict, image, prompts: VisualPrompts | None, where: str) -> dict:
        image = as_image(image)
        w, h = image.size
        return {**sample, "pixel_values": self.pixel_values(image),
                **encode_prompts(prompts, w, h, self.config.vp_config.num_slots, where)}

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()


class VPCollator:
    """Pads the token side (right for training, left for generation) and stacks the visual side.
    ``packed``: the model runs its language model on the batch's real tokens in one padding-free row
    (``VPMLLMForConditionalGeneration.forward(packed=True)``): the same loss and gradients."""

    def __init__(self, pad_token_id: int, padding_side: str = "right", packed: bool = False):
        self.pad_token_id, self.padding_side, self.packed = pad_token_id, padding_side, packed

    def __call__(self, samples: list[dict]) -> dict:
        batch = pad_batch(samples, self.pad_token_id, self.padding_side)
        for key in ("pixel_values", "vp_coords", "vp_valid", "vp_is_box"):
            batch[key] = torch.stack([s[key] for s in samples])
        if self.packed:
            batch["packed"] = True
        return batch

