"""Ground an expression to a box, or describe a box, with a trained model.

    from groundlab.clawmachine.inference import ClawAssistant
    claw = ClawAssistant.load()                        # the newest complete stage-2 model of runs/clawmachine/tiny
    box, answer = claw.ground(image, "the red circle")  # (x0, y0, x1, y1) pixels or None, and the raw answer
    claw.refer(image, (4, 3, 14, 13))                   # "the red circle"
    draw_box(image, box, cells=claw.last_cells).save("ground.png")

The image is tokenized by the model's own (frozen, deterministic) tokenizer; a region is fetched from
its kept tokens as in training, and a generated region is decoded as in evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from groundlab.shared.inputs import check_box

from .data import GROUNDING, REFERRING
from .processing import ClawCollator, cells_box, decode_region, from_square, to_square


def as_pixels(image) -> torch.Tensor:
    """A PIL image or an (H, W, 3) uint8 array -> (1, 3, H, W) uint8."""
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"an image is an (H, W, 3) uint8 array or a PIL image, got {arr.dtype} {arr.shape}")
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)[None]


def pad_to_square(image) -> torch.Tensor:
    """(1, 3, side, side): the image centred on a square of its mean colour (the release pads this way)."""
    x = as_pixels(image)
    _, _, h, w = x.shape
    side = max(h, w)
    if h == w:
        return x
    out = x.float().mean((2, 3), keepdim=True).round().to(torch.uint8).expand(1, 3, side, side).clone()
    py, px = (side - h) // 2, (side - w) // 2
    out[:, :, py:py + h, px:px + w] = x
    return out


class ClawAssistant:
    """A trained model and its processor: :meth:`ground` and :meth:`refer`."""

    def __init__(self, model, processor, max_new_tokens: int = 64):
        self.model, self.processor, self.max_new_tokens = model.eval(), processor, max_new_tokens
        self.last_cells: list[int] | None = None

    @classmethod
    def load(cls, model_dir: str | Path | None = None, run: str = "tiny") -> ClawAssistant:
        """``model_dir``: a stage directory holding ``model/``; default: the newest complete stage-2
        model of ``runs/clawmachine/<run>/``."""
        from groundlab.shared.runs import require_complete, runs_root

        from .train import load_model

        if model_dir is None:
            model_dir = require_complete(runs_root() / "clawmachine" / run, "stage2-*", "run `make train-claw` first")
        model_dir = Path(model_dir)
        if not (model_dir / "model" / "config.json").is_file():
            raise FileNotFoundError(f"{model_dir}: no trained model there (model/config.json missing)")
        return cls(*load_model(model_dir))

    def _answer(self, image, question: str, ref_list=None):
        device = self.model.device  # the inputs are made on the CPU; the model may be elsewhere
        tokenized = self.model.tokenize(pad_to_square(image).to(device))[0]
        tok = self.processor.tokenizer
        batch = ClawCollator(tok.pad_token_id, padding_side="left")(
            [self.processor.prompt_inputs(question, tokenized, ref_list)])
        ids = self.model.generate(batch.pop("input_ids"), batch.pop("attention_mask"), [tokenized],
                                  max_new_tokens=self.max_new_tokens, eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.pad_token_id, **batch)[0].tolist()
        return tokenized, *self.processor.split_answer(ids)

    def ground(self, image, expression: str) -> tuple[tuple[float, float, float, float] | None, str]:
        """The box (pixels) of the first region the model generates for ``expression`` (None when it
        generates none), and its answer text; the region's grid cells stay in ``last_cells``."""
        h, w = as_pixels(image).shape[-2:]
        tokenized, text, regions = self._answer(image, GROUNDING.format(expression=expression))
        grid = self.model.config.grid
        self.last_cells = decode_region(regions[0], tokenized, grid) if regions else None
        box = None if self.last_cells is None else from_square(cells_box(self.last_cells, grid), w, h)
        return box, text

    def refer(self, image, box: Sequence[float]) -> str:
        """What the model says the region ``box`` (x0, y0, x1, y1 pixels) is."""
        h, w = as_pixels(image).shape[-2:]
        box = check_box(box, w, h, "box")
        _, text, _ = self._answer(image, REFERRING, [[list(to_square(box, w, h))]])
        return text


def draw_box(image, box: Sequence[float] | None, cells: Sequence[int] | None = None, grid: int = 16,
             scale: int | None = None) -> Image.Image:
    """The image (enlarged to about 512 px) with the decoded region's grid cells shaded and its box
    outlined."""
    image = image.convert("RGB") if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    scale = scale or max(1, 512 // max(image.size))
    out = image.resize((image.width * scale, image.height * scale), Image.NEAREST).convert("RGBA")
    layer = Image.new("RGBA", out.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    side = max(image.size)
    pad_x, pad_y = (side - image.width) // 2, (side - image.height) // 2
    cell = side / grid
    for c in cells or []:
        r, q = divmod(int(c), grid)
        x0, y0 = (q * cell - pad_x) * scale, (r * cell - pad_y) * scale
        draw.rectangle((x0, y0, x0 + cell * scale, y0 + cell * scale), fill=(0, 130, 200, 70))
    if box is not None:
        draw.rectangle(tuple(v * scale for v in box), outline=(230, 25, 75, 255), width=max(2, scale // 2))
    return Image.alpha_composite(out, layer).convert("RGB")
