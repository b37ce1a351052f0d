"""Running a trained OMG-LLaVA: text and masks for an image and a prompt.

    from groundlab.omg_llava.inference import OMGLlavaPipeline
    pipe = OMGLlavaPipeline.from_pretrained("runs/omg_llava/tiny/stage2-.../model")
    answer = pipe(image, "Please segment the red circle in this image.")
    answer.text, answer.masks            # masks: (n_seg, H, W) bool, in [SEG] order
    pipe(image, "Please give me a short description of region1 <region>.", regions=[mask])
    pipe(image, "What is the object at Mark 1 <mark>?", points=[(x, y)])

``overlay`` draws the masks over the image (one colour per ``[SEG]``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer

from groundlab.shared.inputs import check_image_array, check_mask, check_point, check_text
from groundlab.shared.loading import load_pretrained
from groundlab.shared.multimodal import expand_token, tokenize_prompt

from .evaluation import answer_text
from .modeling import OMGLlavaForCausalLM
from .processing import IMAGE_TOKEN, MARK, REGION, RES_PROMPT, TEMPLATES, from_input_frame, to_input_frame

PALETTE = np.array([(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
                    (240, 50, 230), (210, 245, 60)], np.uint8)


@dataclass
class Answer:
    text: str
    masks: np.ndarray  # (n_seg, H, W) bool
    scores: list[float]


class OMGLlavaPipeline:
    def __init__(self, model: OMGLlavaForCausalLM, tokenizer, template: str | None = None):
        name = template or model.config.template
        if name not in TEMPLATES:
            raise ValueError(f"unknown chat template {name!r}; known: {sorted(TEMPLATES)}")
        model.check_tokenizer(tokenizer)
        self.model, self.tok, self.template = model.eval(), tokenizer, TEMPLATES[name]

    @classmethod
    def from_pretrained(cls, path: str | Path, template: str | None = None) -> OMGLlavaPipeline:
        path = Path(path)
        model = load_pretrained(OMGLlavaForCausalLM, path, "OMG-LLaVA")
        if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
            raise FileNotFoundError(f"no tokenizer saved with the OMG-LLaVA model at {path}")
        return cls(model, AutoTokenizer.from_pretrained(path), template)

    @torch.no_grad()
    def __call__(self, image: np.ndarray, prompt: str, regions: list[np.ndarray] | None = None,
                 points: list[tuple[float, float]] | None = None, max_new_tokens: int = 64) -> Answer:
        image = check_image_array(image)
        check_text(prompt, "prompt")
        hw = image.shape[:2]
        regions, points = list(regions or []), list(points or [])
        for token, given in ((REGION, regions), (MARK, points)):
            if prompt.count(token) != len(given):
                raise ValueError(f"the prompt has {prompt.count(token)} {token} but {len(given)} were given")
        regions = [check_mask(m, hw, f"region {i}") for i, m in enumerate(regions)]
        points = [check_point(p, hw[1], hw[0], f"point {i}") for i, p in enumerate(points)]
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        seg, device = self.model.segmenter, self.model.device
        p = self.model.perceive(seg.preprocess([image]).to(device))[0]
        text = prompt if IMAGE_TOKEN in prompt else f"{IMAGE_TOKEN}\n{prompt}"
        ids = tokenize_prompt(self.tok, [{"from": "human", "value": text}], self.template)
        ids = expand_token({"input_ids": ids}, self.model.config.token_ids[IMAGE_TOKEN],
                           p.num_tokens(self.model.config.use_object_tokens))["input_ids"]
        size = seg.config.image_size
        prompts = {}
        if regions:
            prompts[REGION] = to_input_frame(regions, size).to(device)
            for i, m in enumerate(prompts[REGION]):
                if not bool(m.any()):
                    raise ValueError(f"region {i} vanishes when the image is resized to the segmenter's {size} px "
                                     "input: give a larger region")
        if points:
            prompts[MARK] = torch.tensor(points, dtype=torch.float32, device=device) * (size / max(hw))
        (answer, logits), = self.model.generate_with_masks(
            torch.tensor([ids], device=device), torch.ones(1, len(ids), dtype=torch.long, device=device), [p], [prompts],
            max_new_tokens=max_new_tokens, eos_token_id=self.tok.eos_token_id, pad_token_id=self.tok.pad_token_id)
        prob = from_input_frame(logits, hw).sigmoid().float().cpu()
        masks = (prob > 0.5).numpy()
        scores = [float(pr[m].mean()) if m.any() else 0.0 for pr, m in zip(prob.numpy(), masks)]
        return Answer(answer_text(self.tok, answer), masks, scores)

    def segment(self, image: np.ndarray, expression: str) -> Answer:
        return self(image, RES_PROMPT.format(sent=expression))


def overlay(image: np.ndarray, masks: np.ndarray, alpha: float = 0.5, outline: bool = True) -> np.ndarray:
    """The image with each mask tinted in its own colour (``PALETTE`` in order) and, with ``outline``,
    its border pixels (those with a 4-neighbour outside the mask) painted black: a tint alone is
    invisible on an object of the tint's own colour."""
    out = np.asarray(image, np.float32).copy()
    for i, m in enumerate(masks):
        out[m] = (1 - alpha) * out[m] + alpha * PALETTE[i % len(PALETTE)]
    if outline:
        for m in masks:
            inner = np.pad(m, 1, constant_values=False)
            inner = inner[1:-1, 1:-1] & inner[:-2, 1:-1] & inner[2:, 1:-1] & inner[1:-1, :-2] & inner[1:-1, 2:]
            out[m & ~inner] = 0.0
    return out.round().astype(np.uint8)
