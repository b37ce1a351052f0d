"""Ask a trained model about marked regions, and draw the marks as the paper's figures do.

    from groundlab.vp_mllm.inference import VPAssistant
    assistant = VPAssistant.load()                       # the newest complete stage-2 model of runs/vp_mllm/tiny
    assistant.ask(image, "What is <Region 1>?", boxes=[(4, 3, 14, 13)])
    assistant.ask(image, "What is <Mark 1>?", points=[(9, 8)])
    assistant.ask(image, "Describe <Region 1>.", masks=[mask])         # free-form: its box
    paint_marks(image, prompts).save("marks.png")

One prompt type a sample (the paper's rule): boxes, scribbles and masks are all boxes and may be
combined; points may not be mixed with them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .processing import VisualPrompts, as_image, mask_to_box, scribble_to_box

MARK_COLOURS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
                (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40))


def make_prompts(points: Sequence | None = None, boxes: Sequence | None = None, scribbles: Sequence | None = None,
                 masks: Sequence | None = None) -> VisualPrompts:
    """One sample's prompts from what a user drew (pixels): points, or boxes / scribbles / masks."""
    regions = [tuple(b) for b in boxes or []] + [scribble_to_box(s) for s in scribbles or []]
    regions += [mask_to_box(m, f"mask {i + 1}") for i, m in enumerate(masks or [])]
    if points and regions:
        raise ValueError("points cannot be mixed with boxes, scribbles or masks in one question "
                         "(one prompt type a sample)")
    if not points and not regions:
        raise ValueError("no visual prompt: give points, or boxes / scribbles / masks")
    return VisualPrompts("point", [tuple(p) for p in points]) if points else VisualPrompts("box", regions)


def paint_marks(image, prompts: VisualPrompts, scale: int | None = None) -> Image.Image:
    """The image with each prompt drawn and numbered as the text names it (``<Mark n>`` / ``<Region n>``);
    small images are enlarged first (``scale``: by default to about 512 px) so the numbers read."""
    image = as_image(image)
    scale = scale or max(1, 512 // max(image.size))
    out = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default(size=max(12, 4 * scale))
    for i, c in enumerate(prompts.coords):
        colour = MARK_COLOURS[i % len(MARK_COLOURS)]
        label = str(i + 1)
        if prompts.kind == "point":
            x, y = c[0] * scale, c[1] * scale
            r = max(3, scale)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=colour, outline=(255, 255, 255))
            anchor = (x + r + 1, y - 2 * r)
        else:
            x0, y0, x1, y1 = (v * scale for v in c)
            draw.rectangle((x0, y0, x1, y1), outline=colour, width=max(2, scale // 2))
            anchor = (x0 + 2, y0 + 1)
        draw.text(anchor, label, fill=colour, font=font, stroke_width=2, stroke_fill=(255, 255, 255))
    return out


class VPAssistant:
    """A trained model and its processor: :meth:`ask` answers one question about marked regions."""

    def __init__(self, model, processor, max_new_tokens: int = 64):
        self.model, self.processor, self.max_new_tokens = model.eval(), processor, max_new_tokens

    @classmethod
    def load(cls, model_dir: str | Path | None = None, run: str = "tiny", template: str = "vicuna") -> VPAssistant:
        """``model_dir``: a stage directory holding ``model/``; default: the newest complete VP-LLaVA
        (stage 2) of ``runs/vp_mllm/<run>/``."""
        from groundlab.shared.runs import require_complete, runs_root

        from .train import load_model

        if model_dir is None:
            model_dir = require_complete(runs_root() / "vp_mllm" / run, "vp_stage2-*", "run `make train-vp` first")
        model_dir = Path(model_dir)
        if not (model_dir / "model" / "config.json").is_file():
            raise FileNotFoundError(f"{model_dir}: no trained model there (model/config.json missing)")
        return cls(*load_model(model_dir, template))

    def ask(self, image, question: str, points=None, boxes=None, scribbles=None, masks=None,
            prompts: VisualPrompts | None = None) -> str:
        import torch

        from .processing import VPCollator

        prompts = prompts or make_prompts(points, boxes, scribbles, masks)
        tok = self.processor.tokenizer
        sample = self.processor.prompt(image, question, prompts)
        batch = VPCollator(tok.pad_token_id, padding_side="left")([sample])
        # the inputs are made on the CPU; the model may be elsewhere
        batch = {k: v.to(self.model.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        with torch.no_grad():
            ids = self.model.generate(batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
                                      batch["vp_coords"], batch["vp_valid"], batch["vp_is_box"],
                                      max_new_tokens=self.max_new_tokens, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id)[0].tolist()
        if tok.eos_token_id in ids:
            ids = ids[: ids.index(tok.eos_token_id)]
        return self.processor.decode(ids)


def mask_from_file(path: str | Path) -> np.ndarray:
    """A free-form region drawn as an image: its non-black pixels."""
    from groundlab.shared.world_io import load_image

    arr = np.asarray(load_image(path))
    return arr.max(axis=-1) > 0
