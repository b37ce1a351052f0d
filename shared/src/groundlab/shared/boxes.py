"""Boxes as text, the two ways the VLMs here read and write them.

- LLaVA-1.5 (RefCOCO / Visual Genome in its instruction mix): ``[x0, y0, x1, y1]`` normalised to
  [0, 1] by the image size, two decimals, as plain text: ``[0.12, 0.34, 0.56, 0.78]``. Real-size
  loaders and prompts keep this format.
- PaliGemma: location tokens, one per coordinate, in the order y0, x0, y1, x1:
  ``<loc0123><loc0045><loc0678><loc0910>``. The tiny LLaVA base uses the same tokens in LLaVA's
  x0, y0, x1, y1 order (``order="xyxy"``): see ``groundlab.shared.bases.vlm`` for why. The released model has 1024 of them (``<loc0000>`` ...
  ``<loc1023>``); the world tokenizer has :data:`LOC_BINS`. A value v in [0, size] is the token
  ``round(v / size * (bins - 1))`` and reads back as ``token / (bins - 1) * size``.

Boxes are ``(x0, y0, x1, y1)`` in pixels with x1, y1 the far edges (a COCO ``[x, y, w, h]`` box is
``(x, y, x + w, y + h)``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

LOC_BINS = 32
"""Location tokens of the world tokenizer: 2 px apart on its 64 px images (a coordinate is off by at
most ~1 px), few enough that each token is seen often in a few minutes of training."""

_LOC = re.compile(r"<loc(\d{4})>")
_FLOAT_BOX = re.compile(r"\[\s*(-?\d*\.?\d+)\s*,\s*(-?\d*\.?\d+)\s*,\s*(-?\d*\.?\d+)\s*,\s*(-?\d*\.?\d+)\s*\]")


def loc_token_names(bins: int = LOC_BINS) -> list[str]:
    return [f"<loc{i:04d}>" for i in range(bins)]


def loc_bins(tokenizer) -> int:
    """How many location tokens ``tokenizer`` has (``<loc0000>`` upwards, contiguous); 0 if none."""
    vocab = tokenizer.get_vocab()
    n = 0
    while f"<loc{n:04d}>" in vocab:
        n += 1
    return n


def xywh_to_xyxy(box: Sequence[float]) -> tuple[float, float, float, float]:
    x, y, w, h = box
    return x, y, x + w, y + h


def square_padding(width: int, height: int) -> tuple[int, int, int]:
    """(pad_x, pad_y, side): where an image sits on the square it is padded to (LLaVA-1.5's
    ``expand2square``: centred on the short side)."""
    side = max(width, height)
    return (side - width) // 2, (side - height) // 2, side


def to_bin(v: float, size: float, bins: int) -> int:
    return min(bins - 1, max(0, round(v / size * (bins - 1))))


def from_bin(t: int, size: float, bins: int) -> float:
    return t / (bins - 1) * size


ORDERS = ("yxyx", "xyxy")


def box_to_loc(box: Sequence[float], width: float, height: float, bins: int = LOC_BINS, order: str = "yxyx") -> str:
    """``(x0, y0, x1, y1)`` pixels -> ``<loc y0><loc x0><loc y1><loc x1>`` (PaliGemma's order) or, with
    ``order="xyxy"``, ``<loc x0><loc y0><loc x1><loc y1>``."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    x0, y0, x1, y1 = box
    xs, ys = (to_bin(x0, width, bins), to_bin(x1, width, bins)), (to_bin(y0, height, bins), to_bin(y1, height, bins))
    tokens = (ys[0], xs[0], ys[1], xs[1]) if order == "yxyx" else (xs[0], ys[0], xs[1], ys[1])
    return "".join(f"<loc{t:04d}>" for t in tokens)


def loc_to_boxes(text: str, width: float, height: float, bins: int = LOC_BINS,
                 order: str = "yxyx") -> list[tuple[float, ...]]:
    """Every run of four location tokens in ``text`` as an ``(x0, y0, x1, y1)`` pixel box, in order
    (tokens beyond ``bins`` or an incomplete run are ignored: a model's malformed answer has no box)."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    out, run = [], []
    for m in _LOC.finditer(text):
        t = int(m.group(1))
        if t >= bins:
            run = []
            continue
        run.append(t)
        if len(run) == 4:
            y0, x0, y1, x1 = run if order == "yxyx" else (run[1], run[0], run[3], run[2])
            out.append((from_bin(x0, width, bins), from_bin(y0, height, bins),
                        from_bin(x1, width, bins), from_bin(y1, height, bins)))
            run = []
    return out


def box_to_text(box: Sequence[float], width: float, height: float) -> str:
    """``(x0, y0, x1, y1)`` pixels -> LLaVA-1.5's ``[0.12, 0.34, 0.56, 0.78]``."""
    x0, y0, x1, y1 = box
    return "[" + ", ".join(f"{min(1.0, max(0.0, v)):.2f}" for v in (x0 / width, y0 / height, x1 / width, y1 / height)) + "]"


def text_to_boxes(text: str, width: float, height: float) -> list[tuple[float, ...]]:
    """Every ``[x0, y0, x1, y1]`` of normalised numbers in ``text`` as a pixel box, in order."""
    return [(float(a) * width, float(b) * height, float(c) * width, float(d) * height)
            for a, b, c, d in _FLOAT_BOX.findall(text)]
