"""Checks of what a user hands a model: coordinates, boxes, thresholds, prompts, images.

Every check raises ``ValueError`` (``FileNotFoundError`` for a missing file) with a message that
names the argument and says what is wrong, so a CLI can print it as one line and an API caller gets
it before any model runs. Coordinates are pixels of the image as given: x in [0, width), y in [0,
height); a box is ``(x0, y0, x1, y1)`` with x0 < x1 <= width and y0 < y1 <= height.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def parse_numbers(text: str, n: int, what: str) -> list[float]:
    """``"1,2.5,3,4"`` -> ``[1.0, 2.5, 3.0, 4.0]``: exactly ``n`` finite numbers."""
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != n:
        raise ValueError(f"{what} needs {n} comma-separated numbers, got {text!r}")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"{what} needs {n} comma-separated numbers, got {text!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{what} must be finite numbers, got {text!r}")
    return values


def _finite(values: Sequence[float], what: str) -> list[float]:
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be numbers, got {values!r}") from None
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"{what} must be finite, got {values!r}")
    return out


def check_point(point: Sequence[float], width: int, height: int, what: str = "point") -> tuple[float, float]:
    """An (x, y) inside a ``width`` x ``height`` image."""
    if len(point) != 2:
        raise ValueError(f"{what} must be (x, y), got {point!r}")
    x, y = _finite(point, what)
    if not (0 <= x < width and 0 <= y < height):
        raise ValueError(f"{what} ({x:g}, {y:g}) lies outside the {width}x{height} image")
    return x, y


def check_box(box: Sequence[float], width: int, height: int, what: str = "box") -> tuple[float, float, float, float]:
    """An (x0, y0, x1, y1) box with positive area inside a ``width`` x ``height`` image."""
    if len(box) != 4:
        raise ValueError(f"{what} must be (x0, y0, x1, y1), got {box!r}")
    x0, y0, x1, y1 = _finite(box, what)
    if not (x0 < x1 and y0 < y1):
        raise ValueError(f"{what} ({x0:g}, {y0:g}, {x1:g}, {y1:g}) is empty: need x0 < x1 and y0 < y1")
    if not (0 <= x0 and 0 <= y0 and x1 <= width and y1 <= height):
        raise ValueError(f"{what} ({x0:g}, {y0:g}, {x1:g}, {y1:g}) reaches outside the {width}x{height} image")
    return x0, y0, x1, y1


def check_xywh(box: Sequence[float], what: str = "bbox") -> tuple[float, float, float, float]:
    """A COCO ``[x, y, w, h]`` box as annotation files hold it: finite, x, y >= 0, w, h > 0."""
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        raise ValueError(f"{what} must be [x, y, w, h], got {box!r}")
    x, y, w, h = _finite(box, what)
    if x < 0 or y < 0 or w <= 0 or h <= 0:
        raise ValueError(f"{what} {list(box)} needs x, y >= 0 and w, h > 0")
    return x, y, w, h


def check_probability(value: float, what: str = "threshold") -> float:
    """A number in [0, 1]."""
    (v,) = _finite([value], what)
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{what} must be in [0, 1], got {value!r}")
    return v


def check_text(text: str, what: str = "prompt") -> str:
    """A non-empty string."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{what} is empty")
    return text


def check_mask(mask, shape: tuple[int, int], what: str = "mask") -> np.ndarray:
    """A non-empty (H, W) boolean mask of the image's shape."""
    m = np.asarray(mask)
    if m.shape != tuple(shape):
        raise ValueError(f"{what} has shape {m.shape}, the image is {tuple(shape)}")
    m = m.astype(bool)
    if not m.any():
        raise ValueError(f"{what} is empty")
    return m


def check_image_array(image, what: str = "image") -> np.ndarray:
    """An (H, W, 3) uint8 RGB array."""
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[2] != 3 or a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"{what} must be (H, W, 3) RGB, got shape {a.shape}")
    if a.dtype != np.uint8:
        raise ValueError(f"{what} must be uint8, got {a.dtype}")
    return a


def existing_file(path: str | Path, what: str = "file") -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path
